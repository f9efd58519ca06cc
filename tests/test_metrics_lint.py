"""`promtool check metrics` accepts what the agent serves: the exporter's snapshots, a running
`moe-watch demo`, and the node benchmark at DeepSeek-V3 scale (2 engines x 58 layers x 256
experts, 8 GPUs). It once rejected a `quantile` label on a gauge family."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

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


def test_the_node_benchmark_at_deepseek_v3_scale_passes_promtool_within_the_series_budget(
    tmp_path: Path,
) -> None:
    out = tmp_path / "node.prom"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "node.py"), "--cycles", "12", "--scrapes", "20",
         "--metrics-out", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    body = out.read_bytes()
    families = list(text_string_to_metric_families(body.decode()))
    series = sum(len(f.samples) for f in families)
    assert any(f.name == "moe_watch_expert_load_rank_token_share" for f in families)
    assert series <= 2100  # the per-node budget (docs/metrics.md)
    assert promtool_check_metrics(body) == ""
