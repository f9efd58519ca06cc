"""Per-call cost of the plugin's counting hook, measured directly (needs torch).

The end-to-end benchmark (plugin_overhead.py) cannot resolve 1 % on a noisy 2-core VM, so this
times the work the plugin adds to every MoE layer of every step: the capture callback the
router calls (one ``index_add_`` of the step's top-k ids, weighted, into the accumulator), and
the per-step weight update when the batch size changes. Compare with the server's step time.
It also times what the all-to-all timer adds to each timed dispatch/combine call:
the wrapper around the all2all manager's method, CPU path (``perf_counter``), against the bare
call, and the per-step bookkeeping (``step_begins``/``step_ends``). And what the coverage
sampler adds per step: a sampled step (snapshot of the accumulator before, distinct experts per
layer after) and an unsampled one, for 4 MoE layers x 8 experts (the tiny Mixtral) and 58 x 256
(DeepSeek-V3), and the mean per step at the default 1-in-4 sampling.

    <vllm venv>/bin/python bench/capture_cost.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Router:
    def __init__(self) -> None:
        self.capture_fn: Callable[[Any], None] | None = None

    def set_capture_fn(self, fn: Callable[[Any], None] | None) -> None:
        self.capture_fn = fn


def median_us(fn: Callable[[], None], repeat: int = 3000) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> int:
    import torch

    from moe_watch.vllm_plugin.config_readers import Layout
    from moe_watch.vllm_plugin.counter import ExpertCounter
    from moe_watch.vllm_plugin.hooks import Hook

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU tensors")
    print()
    print("| experts, top-k | tokens in the step | capture per layer (median) | weight update |")
    print("|---|---|---|---|")
    for experts, top_k in ((8, 2), (256, 8)):
        router = Router()
        counter = ExpertCounter(
            [Hook(0, router, "router", clamp=False)],
            device="cpu",
            top_k=top_k,
            num_experts=experts,
            cap_tokens=4096,
            layout=Layout(),
            path=Path(tempfile.mkdtemp()) / "bench.experts.json",
        )
        counter.bind()
        capture = router.capture_fn
        assert capture is not None
        for tokens in (1, 8, 64, 512):
            ids = torch.randint(0, experts, (tokens, top_k), dtype=torch.int32)
            counter.set_limit(tokens)
            per_layer = median_us(lambda ids=ids, capture=capture: capture(ids))

            def resize(tokens: int = tokens, counter: ExpertCounter = counter) -> None:
                counter.set_limit(tokens + 1)  # the batch size changes every step
                counter.set_limit(tokens)

            update = median_us(resize) / 2
            print(f"| {experts}, top-{top_k} | {tokens} | {per_layer:.1f} µs | {update:.1f} µs |")
    all2all_cost(torch)
    coverage_cost(torch)
    return 0


def coverage_cost(torch: Any) -> None:
    from moe_watch.vllm_plugin.coverage import CoverageSampler

    print()
    print(
        "| coverage sampler, layers x experts | sampled step | unsampled step | mean per step, 1 in 4 |"
    )
    print("|---|---|---|---|")
    for layers, experts in ((4, 8), (58, 256)):
        accumulator = torch.zeros((layers, experts + 1), dtype=torch.int64)
        sampled = CoverageSampler(accumulator, experts, every=1)
        skipped = CoverageSampler(accumulator, experts, every=10**9)
        skipped.step_begins(8)  # its first step is sampled: every later one is not

        routed = accumulator[:, 3]  # what a step routes (not part of the sampler's cost)

        def step(sampler: CoverageSampler, routed: Any = routed) -> None:
            sampler.step_begins(8)
            routed.add_(1)
            sampler.step_ends(True)

        bare = median_us(lambda routed=routed: routed.add_(1))
        on = median_us(lambda sampled=sampled: step(sampled)) - bare
        off = median_us(lambda skipped=skipped: step(skipped)) - bare
        print(
            f"| {layers} x {experts} | {on:.1f} µs | {off:.1f} µs | {(on + 3 * off) / 4:.1f} µs |"
        )


def all2all_cost(torch: Any) -> None:
    from moe_watch.vllm_plugin.all2all import All2AllTimer

    class Manager:
        def combine(self, hidden: Any) -> Any:
            return hidden

    bare = Manager()
    timed = Manager()
    timer = All2AllTimer("cpu", backend="bench")
    timer.wrap_manager(timed)
    x = torch.zeros(4, 8)
    timer.step_begins()  # inside a real step: the timed path
    plain = median_us(lambda: bare.combine(x))
    wrapped = median_us(lambda: timed.combine(x))
    timer.step_ends()
    idle = median_us(lambda: timed.combine(x))  # outside a step (warm-up): the pass-through path

    def step() -> None:
        timer.step_begins()
        timed.combine(x)
        timer.step_ends()

    per_step = median_us(step) - wrapped
    print()
    print("| all-to-all timer (CPU, perf_counter) | median |")
    print("|---|---|")
    print(f"| per timed dispatch/combine call | {wrapped - plain:.1f} µs |")
    print(f"| per call outside a step (warm-up) | {idle - plain:.1f} µs |")
    print(f"| per step (begin + end, histogram) | {per_step:.1f} µs |")


if __name__ == "__main__":
    raise SystemExit(main())
