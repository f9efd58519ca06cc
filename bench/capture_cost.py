"""Per-call cost of the plugin's counting hook, measured directly (needs torch).

The end-to-end benchmark (plugin_overhead.py) cannot resolve 1 % on a noisy 2-core VM, so this
times the work the plugin adds to every MoE layer of every step: one ``index_add_`` of the
step's top-k ids into the device accumulator. Compare it with the step time of the server.

    <vllm venv>/bin/python bench/capture_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from moe_watch.vllm_plugin.counter import ExpertCounter

    torch.set_num_threads(1)
    print("| experts, top-k | tokens in the step | capture per layer (median) |")
    print("|---|---|---|")
    for experts, top_k in ((8, 2), (256, 8)):
        counter = SimpleNamespace(accumulator=torch.zeros((4, experts), dtype=torch.int64))
        capture = partial(ExpertCounter.capture, counter, 0, None)
        for tokens in (1, 8, 64, 512):
            ids = torch.randint(0, experts, (tokens, top_k), dtype=torch.int32)
            for _ in range(200):
                capture(ids)
            times = []
            for _ in range(2000):
                started = time.perf_counter()
                capture(ids)
                times.append(time.perf_counter() - started)
            print(
                f"| {experts}, top-{top_k} | {tokens} | {statistics.median(times) * 1e6:.1f} µs |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
