"""The kustomize manifests (deploy/base is the Helm chart's rendering, tests/test_chart.py): kustomize
builds them, the Kubernetes and Prometheus Operator schemas accept them, and the DaemonSet is
locked down and never takes a GPU from a workload."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.crd_schema import validate as validate_crd

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.30"
CRDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator: tests/crds/ (vendored)


def build(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: it builds the kustomize overlays (kubectl kustomize)"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["deploy/base", "deploy/overlays/eks"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return build(request.param)


def test_every_object_passes_the_kubernetes_schema(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert "Namespace" not in kinds  # `kubectl delete -k` must not take the namespace with it
    assert {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Service",
        "ConfigMap",
    } <= kinds
    assert kinds >= CRDS
    for obj in objects:
        if obj["kind"] in CRDS:
            validate_crd(obj)
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "DaemonSet")


def test_the_daemonset_is_locked_down_and_requests_no_gpu(objects: list[dict[str, Any]]) -> None:
    pod = daemonset(objects)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}  # no capability, not even as uid 0
    # uid 0 only to open the kubelet's pod-resources socket (root's, in a 0750 directory)
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert "runtimeClassName" not in pod  # the node's default runtime unless the value is set
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    # every NoSchedule taint (nvidia.com/gpu, Karpenter / Auto Mode NodePool taints), no NoExecute
    assert pod["tolerations"] == [{"operator": "Exists", "effect": "NoSchedule"}]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for term in terms["nodeSelectorTerms"] for e in term["matchExpressions"]}
    assert keys == {
        "nvidia.com/gpu.present",
        "karpenter.k8s.aws/instance-gpu-count",
        "eks.amazonaws.com/instance-gpu-count",
        "node.kubernetes.io/instance-type",
    }
    resources = container["resources"]
    assert not any(
        "nvidia.com" in key for part in resources.values() for key in part
    )  # never takes a GPU
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in container["env"]
    assert {
        "name": "MOE_WATCH_NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    } in container["env"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_rbac_reads_pods_and_nothing_else(objects: list[dict[str, Any]]) -> None:
    role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(objects: list[dict[str, Any]]) -> None:
    dashboards = [
        o
        for o in objects
        if o["kind"] == "ConfigMap"
        and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert len(dashboards) == 4


def test_the_shipped_agent_config_and_plan_are_valid(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    from moe_watch.config import DEFAULT_PORT, load_settings
    from moe_watch.sizing.plan import load_plan

    config = next(o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o["data"])
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    assert load_settings(tmp_path / "config.yaml").listen == f"0.0.0.0:{DEFAULT_PORT}"
    assert load_plan(ROOT / "deploy/examples/plans/example-mixtral.yaml").gpus == 2


def test_the_eks_overlay_adds_the_kube_prometheus_stack_release_label() -> None:
    objects = build("deploy/overlays/eks")
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert (labels.get("release") == "prometheus") == (obj["kind"] in CRDS), obj["kind"]


def test_the_example_workloads_are_valid_and_discoverable() -> None:
    from moe_watch.sources.discovery import SCRAPE

    deployment, plan = yaml.safe_load_all((ROOT / "deploy/examples/vllm-mixtral.yaml").read_text())
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(plan, KUBERNETES_VERSION, strict=True)
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"][SCRAPE] == "true"
    (container,) = template["spec"]["containers"]
    assert "--enable-expert-parallel" in container["args"]
    assert {
        "name": "MOE_WATCH_EXPERTS_DIR",
        "value": "/run/moe-watch/experts/llm-mixtral-0",
    } in container["env"]
    (lws,) = yaml.safe_load_all((ROOT / "deploy/examples/vllm-deepseek-lws.yaml").read_text())
    assert lws["kind"] == "LeaderWorkerSet"
    assert (
        lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["annotations"][SCRAPE]
        == "true"
    )
