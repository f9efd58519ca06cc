"""`promtool check metrics` accepts what the agent serves: the exporter's snapshots, a running
`moe-watch demo`, and the node benchmark at both its shapes (2 DeepSeek-V3 engines on 8 GPUs,
8 Mixtral-shaped engines), each within the series budget. It once rejected a `quantile` label on
a gauge family."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.series_budget import engine_budget, node_budget
from moe_watch.serving.exporter import build_registry
from tests.conftest import free_port
from tests.serving.test_exporter_and_server import deepseek_v3_snapshot, snapshot
from tests.test_rules import tool

ROOT = Path(__file__).resolve().parents[1]


def promtool_check_metrics(body: bytes) -> str:
    """promtool's findings ('' when clean); its exit status is the verdict."""
    run = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=body, capture_output=True, check=False
    )
    findings = (run.stdout + run.stderr).decode()
    assert run.returncode == 0, findings
    return findings


def test_the_exporter_output_passes_promtool_with_and_without_full_expert_detail() -> None:
    for snap in (snapshot(), deepseek_v3_snapshot()):
        for full in (False, True):
            body = generate_latest(build_registry(lambda s=snap: s, expert_full_detail=full))
            assert promtool_check_metrics(body) == ""


def test_a_running_demo_passes_promtool() -> None:
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "moe_watch.cli", "demo", "--listen", f"127.0.0.1:{port}",
         "--interval", "1", "--duration", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # bounded: the demo stops by itself after --duration
            lines.append(line)
            if line.startswith("metric families:"):  # printed once cycle 2 has every family
                break
        else:
            raise AssertionError(f"the demo never served: {''.join(lines)[-2000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read()
    finally:
        demo.terminate()
        demo.wait(timeout=15)
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {
        "moe_watch_e2e_request_latency_seconds",
        "moe_watch_requests_finished",
        "moe_watch_expert_skew_ratio",
    } <= names
    assert promtool_check_metrics(body) == ""


@pytest.mark.parametrize(
    ("node", "engines", "layers", "ep", "gpus"),
    [("dsv3", 2, 58, 32, 4), ("mixtral8", 8, 32, 1, 1)],
)
def test_the_node_benchmark_passes_promtool_within_the_series_budget(
    tmp_path: Path, node: str, engines: int, layers: int, ep: int, gpus: int
) -> None:
    out = tmp_path / "node.prom"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "node.py"), "--node", node, "--cycles", "12",
         "--scrapes", "20", "--metrics-out", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    body = out.read_bytes()
    families = list(text_string_to_metric_families(body.decode()))
    per_engine = Counter(
        s.labels["engine"] for f in families for s in f.samples if "engine" in s.labels
    )
    assert any(f.name == "moe_watch_expert_load_rank_token_share" for f in families)
    assert len(per_engine) == engines
    budget = engine_budget(layers=layers, ep=ep, gpus=gpus)
    assert max(per_engine.values()) <= budget
    series = sum(len(f.samples) for f in families)
    assert series <= node_budget(engines, budget)
    assert promtool_check_metrics(body) == ""
