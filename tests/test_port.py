"""The agent's default port: one value, used everywhere, and not a GPU node's exporter port."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Exporters commonly found on EKS GPU nodes, and Kubernetes' own node ports. The Prometheus
# "Default port allocations" wiki has 9100-9999 fully allocated; these are the ones a GPU node runs.
GPU_NODE_PORTS = {
    9100: "node_exporter",
    9400: "NVIDIA dcgm-exporter",
    9401: "nvidia_exporter",
    9445: "nvidia_smi_exporter",
    9464: "OpenTelemetry Prometheus exporter",
    9500: "dc-exporter",
    9808: "EBS CSI node liveness",
    9809: "EFS CSI node liveness",
    9835: "nvidia_gpu_exporter",
    10248: "kubelet healthz",
    10249: "kube-proxy metrics",
    10250: "kubelet",
    10256: "kube-proxy healthz",
    61678: "aws-node (VPC CNI) metrics",
    61679: "aws-node introspection",
}


def test_the_default_port_is_not_a_gpu_node_exporter_port() -> None:
    from moe_watch.config import DEFAULT_PORT, Settings

    assert DEFAULT_PORT not in GPU_NODE_PORTS, GPU_NODE_PORTS.get(DEFAULT_PORT)
    assert Settings().listen == f"0.0.0.0:{DEFAULT_PORT}"


def test_no_file_still_uses_dcgm_exporter_s_port_for_the_agent() -> None:
    """9400 may appear only where it names dcgm-exporter (or in the rule tests' sample data)."""
    offenders = []
    for path in [
        ROOT / "Dockerfile",
        ROOT / "README.md",
        ROOT / "moe_watch/cli.py",
        *ROOT.glob("deploy/**/*.yaml"),
        *ROOT.glob("charts/**/*.yaml"),
        *ROOT.glob("docs/*.md"),
    ]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b9400\b", line) and "dcgm" not in line.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_dockerfile_exposes_the_default_port() -> None:
    from moe_watch.config import DEFAULT_PORT

    assert f"EXPOSE {DEFAULT_PORT}" in (ROOT / "Dockerfile").read_text()
