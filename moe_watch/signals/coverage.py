"""Expert coverage against tokens per step: where a step starts reading every expert.

From the plugin's sampled steps (samples.StepCoverageCounts) over the window, per power-of-two
bin of tokens per step (signals/power_bins.py):

- observed coverage = sum of distinct experts reached / (steps x MoE layers x E): the mean, over
  the bin's steps and the engine's layers, of the fraction of a layer's experts a step reads;
- the dense point = the smallest bin whose observed coverage is at least
  ``expert_dense_coverage`` (0.90, thresholds.py): from this many tokens per step on, a step
  reads nearly all expert weights, as a dense model does;
- independent coverage = what the same steps would reach if their tokens were routed
  independently of each other with the window's per-expert shares (below). The gap between the
  two is request locality: tokens of one request (or one domain) keep to the same experts.

The independent prediction, per layer, with window counts c_e (token-to-expert assignments),
top-k routing and T = sum(c) / k tokens: q_e = c_e / T is the probability that a token includes
expert e among its k (the token share of docs/experts.md). That is already the marginal of
top-k routing *without replacement* (a token names k distinct experts), so no correction for
drawing k times is needed; the only assumption is that tokens are independent. n tokens then
miss expert e with probability (1 - q_e)^n, and the expected number of experts reached is

    D(n) = sum_e [1 - (1 - q_e)^n]

(q_e is clipped to [0, 1]; a layer without traffic in the window is left out). A bin holds steps
of different sizes, and D is concave in n, so D at the bin's mean tokens per step overstates the
mean of D over its steps (Jensen). The sizes within one bin span at most a factor of 2, and for
one expert with r = (1 - q_e)^a the worst case (half the steps at a, half at 2a) overstates by
r (1 - sqrt(r))^2 / 2 <= 1/32; so the prediction is at most 0.031 of coverage too high, and
exact for bins of one size (1 and 2 tokens, and decode steps at a steady batch). The engine's
value is the mean of its layers' D / E.

Pure functions: None (or absent bins) means "no sampled step in the window", never a fake 0.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from moe_watch.samples import ExpertCounts, Matrix, StepCoverageCounts
from moe_watch.signals.power_bins import BINS
from moe_watch.thresholds import DEFAULT


@dataclass(frozen=True, slots=True)
class CoverageBin:
    tokens_bin: int  # the bin's label: 1, 2, 4 ... 2048 tokens per step
    steps: float  # sampled steps in the window
    mean_tokens: float  # tokens per step, their mean
    observed: float  # 0..1, see the module's docstring
    independent: float | None = None  # 0..1, None until predicted (or no traffic to predict from)


@dataclass(frozen=True, slots=True)
class CoverageCurve:
    bins: tuple[CoverageBin, ...]  # bins with sampled steps in the window, smallest first
    dense_point: int | None  # the label of the smallest bin with observed >= the threshold
    sample_every: int = 1
    layers: tuple[int, ...] = ()
    # [bin of ``bins``][layer of ``layers``]: observed coverage per layer (for /experts)
    per_layer: Matrix = ()

    def bin(self, tokens_bin: int) -> CoverageBin | None:
        return next((b for b in self.bins if b.tokens_bin == tokens_bin), None)


def coverage_increase(window: Sequence[ExpertCounts]) -> StepCoverageCounts | None:
    """The coverage sums over the window, oldest first, reset-safe (as expert counts are: a
    new ``started``, or counts or sampled steps going down, starts a new segment whose first
    sample counts in full). Only the newest run of samples of one shape that all carry coverage
    counts; None with fewer than two such samples."""
    if not window or window[-1].coverage is None:
        return None
    shape = (window[-1].layers, window[-1].num_experts)
    start = len(window) - 1
    while (
        start > 0
        and window[start - 1].coverage is not None
        and (window[start - 1].layers, window[start - 1].num_experts) == shape
    ):
        start -= 1
    items = window[start:]
    if len(items) < 2:
        return None
    coverages = [item.coverage for item in items]
    ends = [i - 1 for i in range(1, len(items)) if _was_reset(items[i - 1], items[i])]
    ends.append(len(items) - 1)
    first = coverages[0]
    assert first is not None
    steps, tokens = [0.0] * len(first.steps), [0.0] * len(first.tokens)
    distinct = [array("d", bytes(8 * len(shape[0]))) for _ in first.distinct]
    begin: StepCoverageCounts | None = first
    for end in ends:
        last = coverages[end]
        assert last is not None
        base_steps = begin.steps if begin is not None else repeat(0.0)
        base_tokens = begin.tokens if begin is not None else repeat(0.0)
        steps = list(map(operator.add, steps, map(operator.sub, last.steps, base_steps)))
        tokens = list(map(operator.add, tokens, map(operator.sub, last.tokens, base_tokens)))
        for b, row in enumerate(last.distinct):
            base = begin.distinct[b] if begin is not None else repeat(0.0)
            distinct[b] = array("d", map(operator.add, distinct[b], map(operator.sub, row, base)))
        begin = None  # after a reset the sums started from 0: the segment's last is its increase
    return StepCoverageCounts(
        steps=tuple(steps),
        tokens=tuple(tokens),
        distinct=tuple(distinct),
        sample_every=coverages[-1].sample_every if coverages[-1] else 1,
    )


def observed_coverage(
    increase: StepCoverageCounts,
    layers: tuple[int, ...],
    num_experts: int,
    *,
    dense: float = DEFAULT.expert_dense_coverage,
) -> CoverageCurve:
    """The observed curve and the dense point from the window's coverage sums."""
    bins: list[CoverageBin] = []
    per_layer: list[array[float]] = []
    for index, steps in enumerate(increase.steps):
        if steps <= 0 or not layers:
            continue
        row = increase.distinct[index]
        per_layer.append(array("d", (min(1.0, v / (steps * num_experts)) for v in row)))
        observed = min(1.0, sum(row) / (steps * len(layers) * num_experts))
        bins.append(CoverageBin(BINS[index], steps, increase.tokens[index] / steps, observed))
    dense_point = next((b.tokens_bin for b in bins if b.observed >= dense), None)
    return CoverageCurve(
        bins=tuple(bins),
        dense_point=dense_point,
        sample_every=increase.sample_every,
        layers=layers,
        per_layer=tuple(per_layer),
    )


def expected_distinct(misses: Sequence[float], tokens: float) -> float:
    """D(n) for one layer, from its experts' ``1 - q_e`` (see the module's docstring)."""
    return len(misses) - sum(map(math.pow, misses, repeat(tokens)))


def miss_probabilities(window_counts: Sequence[float], top_k: int) -> list[float] | None:
    """``1 - q_e`` per expert of one layer, from its window counts; None without traffic."""
    total = sum(window_counts)
    if total <= 0:
        return None
    tokens = total / top_k
    return [max(0.0, 1.0 - c / tokens) for c in window_counts]


def independent_coverage(
    window_counts: Matrix, top_k: int, num_experts: int, mean_tokens: Sequence[float]
) -> list[float | None]:
    """For each of ``mean_tokens``: the mean over the layers with traffic of D(n) / E."""
    layers = [m for row in window_counts if (m := miss_probabilities(row, top_k)) is not None]
    if not layers or num_experts <= 0:
        return [None] * len(mean_tokens)
    return [
        math.fsum(expected_distinct(misses, n) for misses in layers) / (len(layers) * num_experts)
        for n in mean_tokens
    ]


def with_independent(curve: CoverageCurve, predicted: Sequence[float | None]) -> CoverageCurve:
    """The curve with its bins' independent predictions (in the order of ``curve.bins``)."""
    bins = tuple(
        CoverageBin(b.tokens_bin, b.steps, b.mean_tokens, b.observed, p)
        for b, p in zip(curve.bins, predicted, strict=True)
    )
    return CoverageCurve(bins, curve.dense_point, curve.sample_every, curve.layers, curve.per_layer)


def _was_reset(previous: ExpertCounts, current: ExpertCounts) -> bool:
    if current.started != previous.started or current.total < previous.total:
        return True
    before, after = previous.coverage, current.coverage
    return before is not None and after is not None and after.total_steps < before.total_steps
