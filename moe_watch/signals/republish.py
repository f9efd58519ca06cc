"""Which buckets of an engine histogram the agent re-publishes. Pure.

The agent re-publishes the engine's own cumulative bucket counters (counter semantics: they
reset when the engine restarts) so that Prometheus can ``rate`` them and ``sum by (le)`` across
engines and nodes. That sum is only a histogram when every engine publishes the same ``le``
set, so each latency kind has a fixed set: vLLM 0.3x's default bounds. An engine whose bounds
contain the fixed set publishes exactly the fixed set (a subset of cumulative buckets is exact).
Any other layout (SGLang, older vLLM, a patched engine) publishes its own bounds, thinned to
``limits.HISTOGRAM_BOUNDS``: still exact per engine, but summing it with the fixed set mixes
``le`` values and histogram_quantile over the mix is approximate (docs/metrics.md).

Request lengths have no fixed set: vLLM sizes them 1, 2, 5, 10 ... up to max_model_len.
"""

from __future__ import annotations

import math

from moe_watch import limits
from moe_watch import samples as s
from moe_watch.samples import Histogram

_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FIXED_BOUNDS: dict[str, tuple[float, ...]] = {
    s.LATENCY_E2E: _E2E,
    s.LATENCY_QUEUE: _E2E,
    s.LATENCY_TTFT: (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
    s.LATENCY_ITL: (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
}  # fmt: skip
# Histograms re-published, in the order of their families.
REPUBLISHED = (*s.LATENCY_KINDS, s.HISTOGRAM_PROMPT_TOKENS, s.HISTOGRAM_GENERATION_TOKENS)


def republished(
    key: str, histogram: Histogram, *, max_bounds: int = limits.HISTOGRAM_BOUNDS
) -> Histogram:
    """The buckets of ``histogram`` (an engine's, for canonical ``key``) to publish."""
    finite = [(bound, count) for bound, count in histogram.buckets if not math.isinf(bound)]
    inf = histogram.buckets[-1]
    fixed = FIXED_BOUNDS.get(key)
    if fixed is not None:
        counts = dict(finite)
        if all(bound in counts for bound in fixed):
            return _with(histogram, [(bound, counts[bound]) for bound in fixed], inf)
    if len(finite) > max_bounds:
        # evenly spaced, the highest finite bound kept: it ends the interpolation range
        step = len(finite) / max_bounds
        picked = sorted(
            {min(len(finite) - 1, math.ceil((i + 1) * step) - 1) for i in range(max_bounds)}
        )
        finite = [finite[i] for i in picked]
    return _with(histogram, finite, inf)


def _with(
    histogram: Histogram, finite: list[tuple[float, float]], inf: tuple[float, float]
) -> Histogram:
    return Histogram(buckets=(*finite, inf), count=histogram.count, sum=histogram.sum)
