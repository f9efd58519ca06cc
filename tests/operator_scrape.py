"""The scrape config the Prometheus Operator generates from the chart's ServiceMonitor, for a
Prometheus on 127.0.0.1 that labels series exactly as a real cluster does.

Follows prometheus-operator v0.93.0 (commit 6adcebc5, pkg/prometheus/promcfg.go,
``generateServiceMonitorConfig``) for the ServiceMonitor fields moe-watch uses: ``jobLabel``,
``selector.matchLabels``, ``endpoints[].port|interval|scrapeTimeout|relabelings|honorLabels``, with
the default ``endpoints`` service-discovery role (no EndpointSlice), one shard, no scrape class,
no enforced namespace label. The relabelings are the Operator's, in its order: keep on the
service's labels and on the endpoint's port name, node/pod from the address target, namespace,
service, pod, container, drop Failed/Succeeded pods, job from the service name then from
``jobLabel``, endpoint from the port name, the ServiceMonitor's own ``relabelings``, the hashmod
sharding (``$(SHARD)`` is 0: the config reloader substitutes it for shard 0).

Kubernetes service discovery cannot run on loopback, so each agent pod becomes a
``static_configs`` entry (or one of a ``file_sd_configs`` file, which Prometheus re-reads when
a test replaces a pod, as kubernetes_sd_configs follows the Endpoints object) carrying the ``__meta_kubernetes_*`` labels the ``endpoints`` role attaches
to a pod-backed endpoint (endpoints, service and pod metadata), with ``__address__`` the agent's
127.0.0.1 port (a cluster has ``<pod IP>:<container port>``). Prometheus applies the relabelings
itself: nothing here computes a label. The manifests are read as ``kustomize build deploy/base``
renders them for these fields (the kustomization's namespace and common labels applied).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "base"
OPERATOR_VERSION = "v0.93.0"
SHARD = "0"


@dataclass(frozen=True)
class AgentPod:
    """One DaemonSet pod of the agent: its name, the node it runs on, where it listens."""

    name: str
    node: str
    address: str  # host:port Prometheus scrapes

    @property
    def ip(self) -> str:
        return self.address.rsplit(":", 1)[0]


def sanitize(name: str) -> str:
    """The Operator's sanitizeLabelName (and Prometheus SD's label-name mangling)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def manifest(kind: str) -> dict[str, Any]:
    """The object of this kind in deploy/base (the chart rendered with its default values), with
    the kustomization's namespace applied as `kustomize build deploy/base` would."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = [d for d in yaml.safe_load_all((BASE / "moe-watch.yaml").read_text()) if d]
    (doc,) = [d for d in docs if d["kind"] == kind]
    meta = doc.setdefault("metadata", {})
    meta.setdefault("namespace", kustomization["namespace"])
    for entry in kustomization.get("labels", []):
        meta.setdefault("labels", {}).update(entry["pairs"])
    return dict(doc)


def _labels(prefix: str, labels: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in labels.items():
        out[f"{prefix}_label_{sanitize(key)}"] = value
        out[f"{prefix}_labelpresent_{sanitize(key)}"] = "true"
    return out


def endpoints_targets(pods: list[AgentPod]) -> list[dict[str, Any]]:
    """What ``kubernetes_sd_configs: [{role: endpoints}]`` discovers for the agent's Service: one
    target per (pod, service port), as static_configs entries."""
    service, daemonset = manifest("Service"), manifest("DaemonSet")
    namespace = service["metadata"]["namespace"]
    template = daemonset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    targets = []
    for pod in pods:
        for port in service["spec"]["ports"]:
            container_port = next(
                p for p in container["ports"] if p["name"] == port.get("targetPort", port["name"])
            )
            labels = {
                "__meta_kubernetes_namespace": namespace,
                "__meta_kubernetes_endpoints_name": service["metadata"]["name"],
                **_labels("__meta_kubernetes_endpoints", service["metadata"]["labels"]),
                "__meta_kubernetes_endpoint_hostname": "",
                "__meta_kubernetes_endpoint_node_name": pod.node,
                "__meta_kubernetes_endpoint_ready": "true",
                "__meta_kubernetes_endpoint_port_name": port["name"],
                "__meta_kubernetes_endpoint_port_protocol": port.get("protocol", "TCP"),
                "__meta_kubernetes_endpoint_address_target_kind": "Pod",
                "__meta_kubernetes_endpoint_address_target_name": pod.name,
                "__meta_kubernetes_service_name": service["metadata"]["name"],
                **_labels("__meta_kubernetes_service", service["metadata"]["labels"]),
                "__meta_kubernetes_service_type": "ClusterIP",
                "__meta_kubernetes_service_cluster_ip": service["spec"].get("clusterIP", ""),
                "__meta_kubernetes_pod_name": pod.name,
                "__meta_kubernetes_pod_ip": pod.ip,
                **_labels("__meta_kubernetes_pod", template["metadata"]["labels"]),
                "__meta_kubernetes_pod_node_name": pod.node,
                "__meta_kubernetes_pod_host_ip": pod.ip,
                "__meta_kubernetes_pod_ready": "true",
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_pod_uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, pod.name)),
                "__meta_kubernetes_pod_controller_kind": "DaemonSet",
                "__meta_kubernetes_pod_controller_name": daemonset["metadata"]["name"],
                "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_image": container["image"],
                "__meta_kubernetes_pod_container_init": "false",
                "__meta_kubernetes_pod_container_port_name": container_port["name"],
                "__meta_kubernetes_pod_container_port_number": str(container_port["containerPort"]),
                "__meta_kubernetes_pod_container_port_protocol": container_port.get(
                    "protocol", "TCP"
                ),
            }
            targets.append({"targets": [pod.address], "labels": labels})
    return targets


def write_targets(path: Path, pods: list[AgentPod]) -> None:
    """The Service's endpoints now (``pods``), as the file of a ``file_sd_configs``; written
    whole then renamed, so Prometheus never reads half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(endpoints_targets(pods), indent=1))
    partial.replace(path)


def _relabeling(config: dict[str, Any]) -> dict[str, Any]:
    """A ServiceMonitor RelabelConfig (camelCase) as Prometheus config (generateRelabelConfig)."""
    keys = (
        ("sourceLabels", "source_labels"),
        ("separator", "separator"),
        ("targetLabel", "target_label"),
        ("regex", "regex"),
        ("modulus", "modulus"),
        ("replacement", "replacement"),
        ("action", "action"),
    )
    out = {ours: config[theirs] for theirs, ours in keys if config.get(theirs) not in (None, "")}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def scrape_config(
    pods: list[AgentPod],
    *,
    endpoint: int = 0,
    interval: str | None = None,
    sd_file: Path | None = None,
) -> dict[str, Any]:
    """The Operator's scrape config for endpoint ``endpoint`` of the ServiceMonitor, its
    kubernetes_sd_configs replaced by ``endpoints_targets(pods)``: static, or in ``sd_file``
    (written now; ``write_targets`` changes it later). ``interval`` overrides the endpoint's
    scrape interval (and caps its timeout): test speed only."""
    monitor = manifest("ServiceMonitor")
    spec, meta = monitor["spec"], monitor["metadata"]
    ep = spec["endpoints"][endpoint]
    relabel: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}
    ]
    for key, value in sorted(spec["selector"].get("matchLabels", {}).items()):
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_service_label_{sanitize(key)}",
                    f"__meta_kubernetes_service_labelpresent_{sanitize(key)}",
                ],
                "regex": f"({value});true",
            }
        )
    if spec["selector"].get("matchExpressions"):
        raise NotImplementedError("matchExpressions: not used by moe-watch's ServiceMonitor")
    relabel.append(
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "regex": ep["port"],
        }
    )
    address_target = [
        "__meta_kubernetes_endpoint_address_target_kind",
        "__meta_kubernetes_endpoint_address_target_name",
    ]
    for kind, label in (("Node", "node"), ("Pod", "pod")):
        relabel.append(
            {
                "source_labels": address_target,
                "separator": ";",
                "regex": f"{kind};(.*)",
                "replacement": "${1}",
                "target_label": label,
            }
        )
    for source, label in (
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_service_name", "service"),
        ("__meta_kubernetes_pod_name", "pod"),
        ("__meta_kubernetes_pod_container_name", "container"),
    ):
        relabel.append({"source_labels": [source], "target_label": label})
    if ep.get("filterRunning", True):
        relabel.append(
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            }
        )
    for prefix, names in (
        ("__meta_kubernetes_service_label_", spec.get("targetLabels", [])),
        ("__meta_kubernetes_pod_label_", spec.get("podTargetLabels", [])),
    ):
        for name in names:
            relabel.append(
                {
                    "source_labels": [prefix + sanitize(name)],
                    "target_label": sanitize(name),
                    "regex": "(.+)",
                    "replacement": "${1}",
                }
            )
    relabel.append(
        {
            "source_labels": ["__meta_kubernetes_service_name"],
            "target_label": "job",
            "replacement": "${1}",
        }
    )
    if spec.get("jobLabel"):
        relabel.append(
            {
                "source_labels": [f"__meta_kubernetes_service_label_{sanitize(spec['jobLabel'])}"],
                "target_label": "job",
                "regex": "(.+)",
                "replacement": "${1}",
            }
        )
    relabel.append({"target_label": "endpoint", "replacement": ep["port"]})
    relabel.extend(_relabeling(r) for r in ep.get("relabelings", []))
    relabel.extend(
        [
            {
                "source_labels": ["__address__", "__tmp_hash"],
                "target_label": "__tmp_hash",
                "regex": "(.+);",
                "replacement": "$1",
                "action": "replace",
            },
            {
                "source_labels": ["__tmp_hash"],
                "target_label": "__tmp_hash",
                "modulus": 1,
                "action": "hashmod",
            },
            {
                "source_labels": ["__tmp_hash", "__tmp_disable_sharding"],
                "regex": f"{SHARD};|.+;.+",
                "action": "keep",
            },
        ]
    )
    config: dict[str, Any] = {
        "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{endpoint}",
        "honor_labels": bool(ep.get("honorLabels", False)),
    }
    # kubernetes_sd_configs: [{role: endpoints, namespaces: {names: [<its namespace>]}}]
    if sd_file is None:
        config["static_configs"] = endpoints_targets(pods)
    else:
        write_targets(sd_file, pods)
        config["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "5s"}]
    scrape_interval = interval or ep.get("interval")
    timeout = ep.get("scrapeTimeout")
    if interval is not None:
        timeout = interval if timeout is None else min(timeout, interval, key=_seconds)
    if scrape_interval:
        config["scrape_interval"] = scrape_interval
    if timeout:
        config["scrape_timeout"] = timeout
    if ep.get("path"):
        config["metrics_path"] = ep["path"]
    if ep.get("scheme"):
        config["scheme"] = ep["scheme"]
    config["relabel_configs"] = relabel
    if ep.get("metricRelabelings"):
        config["metric_relabel_configs"] = [_relabeling(r) for r in ep["metricRelabelings"]]
    return config


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]
