"""What one agent cycle costs on the CPU, against peers where one exists.

- Parsing a real vLLM 0.32 exposition: moe-watch's pre-filtered parse vs prometheus_client's
  full ``text_string_to_metric_families`` over the same text (the peer).
- Expert signals for a DeepSeek-V3-sized engine (58 MoE layers x 256 experts, top-8) over a
  5-minute window of 5-second samples (61 samples).
- Rendering /metrics for that engine (default export) with prometheus_client.

    python bench/agent_costs.py [--repeat 200]

Each figure is the median of --repeat runs, measured back to back in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moe_watch.samples import ExpertCounts  # noqa: E402
from moe_watch.serving.exporter import build_registry  # noqa: E402
from moe_watch.signals.experts import derive_expert_signals  # noqa: E402
from moe_watch.snapshot import EngineExperts, Snapshot  # noqa: E402
from moe_watch.sources.exposition import parse_engine_exposition  # noqa: E402

CAPTURE = ROOT / "tests" / "fixtures" / "vllm" / "vllm-0.32-cpu-tiny-mixtral.after-load.prom"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def deepseek_window() -> list[ExpertCounts]:
    layers = tuple(range(3, 61))
    window = []
    for step in range(61):
        rows = tuple(
            tuple(float(step * (100 + (e * 31 + layer * 7) % 97)) for e in range(256))
            for layer in layers
        )
        window.append(ExpertCounts("dsv3", "deepseek-v3", 8, 256, layers, rows, ep_size=32))
    return window


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    text = CAPTURE.read_text()
    ours = median_ms(lambda: parse_engine_exposition(text, "vllm"), args.repeat)
    peer = median_ms(
        lambda: [list(f.samples) for f in text_string_to_metric_families(text)], args.repeat
    )
    window = deepseek_window()
    signals_ms = median_ms(
        lambda: derive_expert_signals(window, top_n=10), max(10, args.repeat // 10)
    )
    signals = derive_expert_signals(window, top_n=10)
    snapshot = Snapshot(0.0, 1, 0.0, (), {}, experts=(EngineExperts("dsv3", window[-1], signals),))
    registry = build_registry(lambda: snapshot)
    render_ms = median_ms(lambda: generate_latest(registry), args.repeat)
    print("| measurement | median |\n|---|---|")
    print(f"| parse a real vLLM exposition ({len(text) // 1024} KiB): moe-watch | {ours:.2f} ms |")
    print(f"| same text, prometheus_client full parse (peer) | {peer:.2f} ms |")
    print(f"| ratio moe-watch / peer | {ours / peer:.2f} |")
    print(f"| expert signals, 58 x 256, top-8, 61-sample window | {signals_ms:.1f} ms |")
    print(f"| render /metrics for that engine (default export) | {render_ms:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
