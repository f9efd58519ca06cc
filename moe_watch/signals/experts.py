"""Expert-load signals over a window of cumulative per-(layer, expert) routed-token counts.

Definitions (docs/experts.md), for one layer with window counts c_e over E experts, top-k routing:
- skew          = max(c) / mean(c) - 1      0 = perfectly even; 0.5 = "50 % skew"
- balancedness  = mean(c) / max(c)          what vLLM EPLB and SGLang report; = 1 / (1 + skew)
- token share_e = c_e * k / sum(c)          fraction of the layer's tokens that visited e
- collapse      = max token share > 0.40    one expert takes the layer (thresholds.py)
- EP-rank load_r = sum of c over the experts on rank r / mean over ranks (1 = even)
- load rank     = 1 for a layer's most loaded expert, 2 for the next ...: the per-layer top N are
                  published by rank, so series keep their identity when the hottest expert changes
All functions are pure; None means "no traffic in the window", never a fake 0. Counts are
finite and non-negative by construction (samples.ExpertCounts refuses anything else).
"""

from __future__ import annotations

import heapq
import operator
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from moe_watch.samples import ExpertCounts, Histogram, Matrix
from moe_watch.signals.expert_placement import expert_ranks
from moe_watch.signals.histograms import quantile, window_delta
from moe_watch.thresholds import DEFAULT

COLLAPSE_SHARE = DEFAULT.expert_collapse_share
ALL2ALL_QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class LayerLoad:
    layer: int
    tokens: float  # tokens through the layer in the window (assignments / top_k)
    skew: float
    balancedness: float
    max_share: float
    hottest_expert: int
    # The layer's top-N experts by load, most loaded first: (expert, token share).
    ranked: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class HotExpert:
    layer: int
    expert: int
    share: float


@dataclass(frozen=True, slots=True)
class ExpertSignals:
    layers: tuple[LayerLoad, ...] = ()
    rank_load: dict[int, float] = field(default_factory=dict)  # EP rank -> load ratio
    window_counts: Matrix = ()  # [layer][expert] assignments in the window (for /experts)
    # Expert-parallel exchange time per forward pass over the window: quantile -> seconds.
    all2all_seconds: dict[float, float] = field(default_factory=dict)
    all2all_passes: float = 0.0  # timed forward passes in the window

    @property
    def max_skew(self) -> float | None:
        return max((layer.skew for layer in self.layers), default=None)

    @property
    def collapsed_layers(self) -> tuple[int, ...]:
        return tuple(layer.layer for layer in self.layers if layer.max_share > COLLAPSE_SHARE)

    def hot(self, n: int = 10) -> tuple[HotExpert, ...]:
        """The engine's n hottest (layer, expert) pairs by token share (for /experts, humans)."""
        pairs = (
            HotExpert(layer.layer, expert, share)
            for layer in self.layers
            for expert, share in layer.ranked
        )
        return tuple(heapq.nsmallest(n, pairs, key=lambda h: (-h.share, h.layer, h.expert)))


def skew(counts: Sequence[float]) -> float | None:
    total = sum(counts)
    if not counts or total <= 0:
        return None
    return max(counts) / (total / len(counts)) - 1.0


def balancedness(counts: Sequence[float]) -> float | None:
    peak = max(counts, default=0.0)
    if peak <= 0:
        return None
    return (sum(counts) / len(counts)) / peak


def token_shares(counts: Sequence[float], top_k: int) -> list[float] | None:
    """c_e * k / sum(c): the fraction of the layer's tokens that visited each expert."""
    total = sum(counts)
    if total <= 0:
        return None
    return [c * top_k / total for c in counts]


def rank_loads(
    per_expert: Sequence[float], ep_size: int, placement: Sequence[int] = ()
) -> dict[int, float]:
    """Load of each EP rank relative to the mean rank (1.0 = even).

    ``placement`` is each expert's rank; without one, vLLM's default (linear) placement.
    """
    if ep_size < 1 or not per_expert:
        return {}
    if placement and len(placement) != len(per_expert):
        raise ValueError(f"placement names {len(placement)} experts, counts have {len(per_expert)}")
    ranks = placement or expert_ranks(len(per_expert), ep_size)
    per_rank = [0.0] * ep_size
    for rank, count in zip(ranks, per_expert, strict=True):
        per_rank[rank] += count
    mean = sum(per_rank) / ep_size
    if mean <= 0:
        return {}
    return {rank: load / mean for rank, load in enumerate(per_rank)}


def rank_tokens(
    window_counts: Matrix, num_experts: int, ep_size: int, placement: Sequence[int] = ()
) -> tuple[float, ...]:
    """Assignments over the window, all layers summed, to the experts each EP rank holds
    (``placement``, or vLLM's linear one); empty without expert parallelism or a window.

    Unlike ``rank_loads`` these are absolute: recording rules add them up across the nodes of
    an engine group before dividing."""
    if ep_size < 2 or not window_counts:
        return ()
    if placement and len(placement) != num_experts:
        raise ValueError(f"placement names {len(placement)} experts, counts have {num_experts}")
    ranks = placement or expert_ranks(num_experts, ep_size)
    per_rank = [0.0] * ep_size
    for row in window_counts:
        for expert, count in enumerate(row):
            per_rank[ranks[expert]] += count
    return tuple(per_rank)


def window_increase(window: Sequence[ExpertCounts]) -> Matrix:
    """Assignments per (layer, expert) over the window, oldest first, reset-safe.

    A reset (``started`` changed, or the counts' total went down) starts a new segment; the first
    sample after a reset counts in full, like Prometheus' increase(). Only the newest model shape
    counts. Cost: one subtraction per segment, not per sample pair (a DeepSeek-V3 matrix is
    14,848 cells; a 5-minute window holds ~60 samples); each sample's total is computed once,
    when it is made.
    """
    if not window:
        return ()
    shape = (window[-1].layers, window[-1].num_experts)
    start = len(window) - 1
    while start > 0 and (window[start - 1].layers, window[start - 1].num_experts) == shape:
        start -= 1
    items = window[start:]
    if len(items) < 2:
        return ()
    # Segment ends: the sample before each reset, and the newest sample.
    ends = [i - 1 for i in range(1, len(items)) if _was_reset(items[i - 1], items[i])]
    ends.append(len(items) - 1)
    # array("d", list(...)): an array built from a list, not an iterator, costs half.
    delta = [
        array("d", list(map(operator.sub, last, first)))
        for last, first in zip(items[ends[0]].counts, items[0].counts, strict=True)
    ]
    for end in ends[1:]:  # after a reset the counter started from 0: its last value is the increase
        for i, add in enumerate(items[end].counts):
            delta[i] = array("d", list(map(operator.add, delta[i], add)))
    return tuple(delta)


def all2all_window(window: Sequence[ExpertCounts]) -> tuple[dict[float, float], float]:
    """Quantiles of the per-forward-pass exchange time over the window, and the passes timed.

    From the cumulative histograms' bucket deltas, like ``latency_seconds`` (reset-safe per
    bucket); nothing when fewer than two samples carry one or no pass was timed in the window.
    """
    histograms = [c.all2all for c in window if c.all2all is not None]
    delta: Histogram | None = window_delta(histograms)
    if delta is None or delta.count <= 0:
        return {}, 0.0
    values = {q: quantile(q, delta) for q in ALL2ALL_QUANTILES}
    return {q: v for q, v in values.items() if v is not None}, delta.count


def derive_expert_signals(window: Sequence[ExpertCounts], *, top_n: int = 4) -> ExpertSignals:
    """Per-layer load over the window; ``top_n`` experts of each layer are ranked by load."""
    if not window:
        return ExpertSignals()
    latest = window[-1]
    all2all, passes = all2all_window(window)
    delta = window_increase(window)
    if not delta:
        return ExpertSignals(all2all_seconds=all2all, all2all_passes=passes)
    layers: list[LayerLoad] = []
    # Summed over layers only where a rank load is published (expert parallelism).
    per_expert: list[float] | None = [0.0] * latest.num_experts if latest.ep_size > 1 else None
    experts = range(latest.num_experts)
    for layer, cells in zip(latest.layers, delta, strict=True):
        row = cells.tolist()  # a list's items are read without making a float object each
        total = sum(row)
        if not row or total <= 0:
            continue  # no traffic through this layer in the window
        # skew() and balancedness() of the row, with its sum and peak taken once.
        peak = max(row)
        mean = total / len(row)
        share = latest.top_k / total  # an expert's token share is its count times this
        # The layer's top N, most loaded first, ties to the lower expert id (stable): what
        # heapq.nlargest(n, experts, key) returns, by its definition, sorted in C.
        top = sorted(experts, key=row.__getitem__, reverse=True)[: max(1, top_n)]
        layers.append(
            LayerLoad(
                layer,
                total / latest.top_k,
                peak / mean - 1.0,
                mean / peak,
                row[top[0]] * share,
                top[0],
                tuple((e, row[e] * share) for e in top[:top_n]),
            )
        )
        if per_expert is not None:
            per_expert = list(map(operator.add, per_expert, row))
    return ExpertSignals(
        layers=tuple(layers),
        rank_load=rank_loads(per_expert, latest.ep_size, latest.placement)
        if per_expert is not None
        else {},
        window_counts=delta,
        all2all_seconds=all2all,
        all2all_passes=passes,
    )


def zero_baseline(counts: ExpertCounts) -> ExpertCounts:
    """The same counter set at its start: every count 0 (for counts that are ``from_zero``)."""
    zeros = bytes(8 * counts.num_experts)
    return replace(counts, counts=tuple(array("d", zeros) for _ in counts.counts))


def needs_zero_baseline(previous: ExpertCounts | None, current: ExpertCounts) -> bool:
    """True when ``current`` is the first sample the window sees of a counter set that started
    at zero: without a zero sample before it, its counts would be the window's baseline and the
    traffic in them lost (SGLang's first dump)."""
    if not current.from_zero:
        return False
    return previous is None or (
        previous.started != current.started
        or (previous.layers, previous.num_experts) != (current.layers, current.num_experts)
    )


def _was_reset(previous: ExpertCounts, current: ExpertCounts) -> bool:
    return current.started != previous.started or current.total < previous.total
