"""charts/moe-watch, rendered by Helm's own template engine (helm-python-sdk binds the Helm v4 Go
SDK: no helm binary), linted, and every object validated offline against the Kubernetes schema
(kubernetes_validate) and the Prometheus Operator CRD schemas (tests/crds/). deploy/base is the
chart's rendering with its defaults (scripts/render_chart.py) and must not go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.crd_schema import validate as validate_crd

helm = pytest.importorskip("helm_python", reason="pip install -e '.[test]' (helm-python-sdk)")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/moe-watch"
KUBERNETES_VERSION = "1.30"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

_spec = importlib.util.spec_from_file_location("render_chart", ROOT / "scripts/render_chart.py")
assert _spec is not None
assert _spec.loader is not None
render_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_chart)

NON_DEFAULT: dict[str, Any] = {
    "port": 9555,
    "image": {"repository": "123456789012.dkr.ecr.us-west-2.amazonaws.com/moe-watch", "tag": "0.1.0",
              "digest": "sha256:" + "ab" * 32},
    "config": {"interval_seconds": 10, "listen": "0.0.0.0:1", "expert_top_n": 8},
    "plans": {"mixtral.yaml": (ROOT / "deploy/examples/plans/example-mixtral.yaml").read_text()},
    "kubeletPath": "/var/lib/kubelet-custom/",
    "webConfig": {"secretName": "moe-watch-web", "tls": True},
    "priorityClassName": "gpu-node-agents",
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"karpenter.sh/nodepool": "gpu"},
    "affinity": None,  # Helm: null drops a default map (an empty one would merge into it)
    "extraEnv": [{"name": "MOE_WATCH_EXPERT_FULL_DETAIL", "value": "true"}],
    "extraArgs": ["--interval", "10"],
    "serviceMonitor": {
        "interval": "30s", "scrapeTimeout": "20s", "honorLabels": True,
        "additionalLabels": {"release": "kps"},
        "relabelings": [{"targetLabel": "cluster", "replacement": "prod-us-west-2"}],
        "metricRelabelings": [{"action": "labeldrop", "regex": "driver_version"}],
        "tlsConfig": {"insecureSkipVerify": True},
        "basicAuth": {"username": {"name": "moe-watch-scrape", "key": "username"},
                      "password": {"name": "moe-watch-scrape", "key": "password"}},
    },
    "prometheusRule": {"additionalLabels": {"release": "kps"}},
    "state": {"hostPath": "/var/lib/moe-watch-state"},
    "dashboards": {"label": "grafana_dashboard_moe", "labelValue": "yes",
                   "annotations": {"grafana_folder": "MoE"}},
}  # fmt: skip


def validate_all(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            validate_crd(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


# -- the engine itself, against a chart whose output is known --------------------------------


def test_the_helm_engine_renders_a_chart_whose_output_is_known() -> None:
    known = ROOT / "tests/fixtures/helm/known"
    with helm.Chart.load(known) as chart:
        out = chart.render({"labels": {"a": "b"}, "x": "y"}, name="rel", namespace="ns")
        assert out["fx/templates/cm.yaml"] == (known / "expected.yaml").read_text()
        with pytest.raises(helm.HelmRenderError, match="x is required"):
            chart.render({}, name="rel", namespace="ns")
    assert helm.lint(known, strict=True)["errors"] == []


# -- the moe-watch chart ----------------------------------------------------------------------


def test_the_chart_lints_clean_with_default_and_non_default_values() -> None:
    for values in (None, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace="gpu")
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


def test_default_rendering_passes_every_schema_and_matches_the_kustomize_base() -> None:
    objects = render_chart.objects(render_chart.render())
    kinds = {o["kind"] for o in objects}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "Service", "DaemonSet", "ServiceMonitor", "PrometheusRule"}  # fmt: skip
    assert "Namespace" not in kinds  # the namespace is chosen at install time, never owned
    validate_all(objects)
    assert len(by_kind(objects, "ConfigMap")) == 1 + 4  # config + the four dashboards
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (rule,) = by_kind(objects, "PrometheusRule")
    for obj in (monitor, rule):
        assert "release" not in obj["metadata"]["labels"]  # no hard-coded kube-prometheus-stack
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is False  # docs/metrics.md: the k8s_* labels stay the agent's
    stale = [str(p) for p, text in render_chart.base_files().items() if p.read_text() != text]
    assert not stale, f"run python3 scripts/render_chart.py: {stale}"


def test_one_port_value_drives_container_service_probes_and_listen() -> None:
    from moe_watch.config import DEFAULT_PORT, Settings

    with helm.Chart.load(CHART) as chart:
        assert chart.values["port"] == DEFAULT_PORT
    for port in (DEFAULT_PORT, 9555):
        objects = render_chart.objects(render_chart.render({"port": port}))
        (ds,) = by_kind(objects, "DaemonSet")
        (container,) = ds["spec"]["template"]["spec"]["containers"]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
        assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
        (service,) = by_kind(objects, "Service")
        assert service["spec"]["ports"][0]["port"] == port
        config = next(c for c in by_kind(objects, "ConfigMap") if "config.yaml" in c["data"])
        settings = Settings(**yaml.safe_load(config["data"]["config.yaml"]))
        assert settings.listen == f"0.0.0.0:{port}"


def test_non_default_values_reach_every_object_and_still_pass_the_schemas() -> None:
    objects = render_chart.objects(
        render_chart.render(NON_DEFAULT, name="gpu-obs", namespace="o11y")
    )
    validate_all(objects)
    assert {o["metadata"].get("namespace", "o11y") for o in objects} == {"o11y"}
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "o11y"

    (ds,) = by_kind(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith("moe-watch:0.1.0@sha256:" + "ab" * 32)
    assert container["args"][-2:] == ["--interval", "10"]
    assert pod["priorityClassName"] == "gpu-node-agents"
    assert pod["nodeSelector"] == {"karpenter.sh/nodepool": "gpu"}
    assert "affinity" not in pod
    assert pod["tolerations"] == NON_DEFAULT["tolerations"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOE_WATCH_WEB_CONFIG_FILE"] == "/etc/moe-watch/web/web-config.yml"
    assert env["MOE_WATCH_EXPERT_FULL_DETAIL"] == "true"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["web-config"]["secret"]["secretName"] == "moe-watch-web"
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet-custom/pod-resources"
    assert volumes["plans"]["configMap"]["name"] == "gpu-obs-moe-watch-plans"
    # the batching curves survive a new pod: a host directory (its owner is the node's job)
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/moe-watch-state", "type": "Directory"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/moe-watch"

    configs = {c["metadata"]["name"]: c for c in by_kind(objects, "ConfigMap")}
    config = yaml.safe_load(configs["gpu-obs-moe-watch-config"]["data"]["config.yaml"])
    assert config["listen"] == "0.0.0.0:9555"  # `port` wins over a `config.listen`
    assert config["expert_top_n"] == 8
    assert config["state_dir"] == "/var/lib/moe-watch"  # the chart's default, kept beside them
    from moe_watch.sizing.plan import load_plan

    plan = configs["gpu-obs-moe-watch-plans"]["data"]["mixtral.yaml"]
    assert plan == NON_DEFAULT["plans"]["mixtral.yaml"]
    assert load_plan(ROOT / "deploy/examples/plans/example-mixtral.yaml").gpus == 2

    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"], endpoint["scheme"]) == (
        "30s",
        "20s",
        "https",
    )
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["targetLabel"] == "node"
    assert endpoint["relabelings"][1]["targetLabel"] == "cluster"
    assert endpoint["basicAuth"]["username"]["name"] == "moe-watch-scrape"
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    dashboards = [c for c in configs.values() if "grafana_dashboard_moe" in c["metadata"]["labels"]]
    assert len(dashboards) == 4
    assert {d["metadata"]["annotations"]["grafana_folder"] for d in dashboards} == {"MoE"}


def test_optional_objects_can_be_switched_off() -> None:
    off = {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
           "dashboards": {"enabled": False}, "rbac": {"create": False},
           "serviceAccount": {"create": False, "name": "existing"}, "podResources": {"enabled": False}}  # fmt: skip
    objects = render_chart.objects(render_chart.render(off))
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "DaemonSet"}
    validate_all(objects)
    (ds,) = by_kind(objects, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    assert "pod-resources" not in {v["name"] for v in ds["spec"]["template"]["spec"]["volumes"]}


def test_rule_overrides_from_the_cli_replace_the_shipped_groups() -> None:
    from moe_watch.rules import RulesConfig, operator_manifest

    custom = operator_manifest(RulesConfig(additional_labels={"team": "ml-platform"}))
    objects = render_chart.objects(
        render_chart.render({"prometheusRule": {"manifest": yaml.safe_dump(custom)}})
    )
    (rule,) = by_kind(objects, "PrometheusRule")
    validate_all([rule])
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    assert all(a["labels"]["team"] == "ml-platform" for a in alerts)
    with pytest.raises(helm.HelmRenderError, match="moe-watch rules --print prometheusrule"):
        render_chart.render({"prometheusRule": {"manifest": "groups: []"}})


def test_the_shipped_rules_are_the_generator_s() -> None:
    from moe_watch.rules import operator_manifest

    objects = render_chart.objects(render_chart.render())
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["spec"] == operator_manifest()["spec"]


def test_the_crd_validator_rejects_what_the_operator_would() -> None:
    objects = render_chart.objects(render_chart.render())
    (monitor,) = by_kind(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["honorLabel"] = True  # a typo: unknown field
    with pytest.raises(jsonschema.ValidationError, match="honorLabel"):
        validate_crd(monitor)
    del monitor["spec"]["endpoints"][0]["honorLabel"]
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError, match="15 seconds"):
        validate_crd(monitor)
