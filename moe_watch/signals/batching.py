"""The batching curve: generation throughput and latency against the running batch, measured on
the engine's own traffic, and the batch size where tokens/s per GPU peaks within the ITL SLO.

Every pair of consecutive scrapes of one (engine, model) is one *interval*. Its batch size is
the mean number of requests generating per engine step, ``increase(generation tokens) /
increase(engine steps)`` (vLLM's ``iteration_tokens_total`` counts the steps); where the engine
has no step counter (SGLang, old vLLM) it is the mean of ``requests_running`` at both ends. The
interval goes into the power-of-two bin of that batch (signals/power_bins.py) with its seconds,
its generation tokens and the increase of the ITL and TTFT histograms. An interval with no
generated token is carried into the next one (the engine's counters move in lumps; see
``next_interval``); a counter that went down (a restart) or a gap longer than
``max_gap_seconds`` (the engine idle, or the agent away) is not evidence.

Evidence ages out: before anything is added, everything held is multiplied by
``0.5 ** (elapsed / half_life)``, so evidence from one half-life ago weighs half and a bin the
traffic stopped visiting fades away; the curve stays the size of its 12 bins.

Per bin: generation tokens/s per GPU = tokens / seconds / the engine's GPUs; ITL P95 and TTFT
P95 from the bin's merged histograms (Prometheus' interpolation). The answer (``knee``): among
the bins with at least ``min_seconds`` of (aged) evidence whose ITL P95 is within the SLO, the
one with the most tokens/s per GPU; none when no such bin exists. ``peak_reached`` says whether
the traffic also went past it: some evidenced bin of a larger batch does worse (less
throughput, or ITL P95 over the SLO). Without that the knee is only "the best batch seen so
far", and drift does not compare max_num_seqs with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.signals.histograms import quantile, window_delta
from moe_watch.signals.power_bins import BIN_COUNT, BINS, bin_index

MAX_HISTOGRAM_BOUNDS = 64  # per latency kind: vLLM has 19 (ITL) and 22 (TTFT)
P95 = 0.95


@dataclass(frozen=True, slots=True)
class IntervalEvidence:
    """What one interval between two scrapes says about one batch size."""

    seconds: float
    batch: float  # mean requests generating per engine step
    generation_tokens: float
    itl: Histogram | None = None  # the interval's increase (cumulative buckets, +Inf last)
    ttft: Histogram | None = None


@dataclass(frozen=True, slots=True)
class BinEvidence:
    """One batch bin's aged sums. Histogram buckets are per bucket (not cumulative), one more
    than the curve's bounds (the last is above the last bound)."""

    seconds: float = 0.0
    generation_tokens: float = 0.0
    itl: tuple[float, ...] = ()
    ttft: tuple[float, ...] = ()


EMPTY_BINS = tuple(BinEvidence() for _ in range(BIN_COUNT))


@dataclass(frozen=True, slots=True)
class BatchCurve:
    """The aged evidence of one (engine, model), per batch bin (``BINS``)."""

    updated: float  # the time everything was last aged to
    bins: tuple[BinEvidence, ...] = EMPTY_BINS
    itl_bounds: tuple[float, ...] = ()  # finite upper bounds, increasing
    ttft_bounds: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchPoint:
    """One bin of the answer."""

    batch_bin: int  # the bin's label: 1, 2, 4 ... 2048 requests
    seconds: float  # aged seconds of evidence
    tokens_per_second_per_gpu: float
    itl_p95_seconds: float | None
    ttft_p95_seconds: float | None
    evidenced: bool  # seconds >= min_seconds
    within_slo: bool | None  # ITL P95 <= SLO; None without ITL observations


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    points: tuple[BatchPoint, ...]  # bins with any evidence, smallest batch first
    knee: int | None  # the label of the best bin, or None
    peak_reached: bool  # a larger evidenced batch does worse: the knee is a real peak
    reason: str  # why there is no knee, or what decided it (for /status)
    gpus: int
    slo_seconds: float
    min_seconds: float

    def point(self, batch_bin: int) -> BatchPoint | None:
        return next((p for p in self.points if p.batch_bin == batch_bin), None)


def interval_evidence(
    before: tuple[float, ModelSample],
    after: tuple[float, ModelSample],
    *,
    max_gap_seconds: float,
) -> IntervalEvidence | None:
    """The evidence of one interval, or None when it is not evidence (see the module)."""
    (start, first), (end, last) = before, after
    seconds = end - start
    if not 0 < seconds <= max_gap_seconds:
        return None
    key = s.COUNTER_GENERATION_TOKENS
    if key not in first.counters or key not in last.counters:
        return None
    tokens = last.counters[key] - first.counters[key]
    if tokens <= 0:  # idle, or a restart (a counter that went down)
        return None
    batch = _mean_batch(first, last, tokens)
    if batch is None:
        return None
    return IntervalEvidence(
        seconds=seconds,
        batch=batch,
        generation_tokens=tokens,
        itl=_increase(first, last, s.LATENCY_ITL),
        ttft=_increase(first, last, s.LATENCY_TTFT),
    )


def next_interval(
    baseline: tuple[float, ModelSample] | None,
    current: tuple[float, ModelSample],
    *,
    max_gap_seconds: float,
) -> tuple[IntervalEvidence | None, tuple[float, ModelSample]]:
    """The evidence from ``baseline`` (the last scrape that saw the engine make progress) to
    ``current``, and the next baseline.

    An engine's counters do not move with every step: vLLM 0.32 ships a step's statistics to
    its /metrics with the step's outputs, so under non-streamed requests (output only when a
    request finishes) or a starved API server they move in lumps. A scrape that saw no progress
    is therefore not dropped as idle (that would leave the busy seconds out and overstate the
    rate) but carried: the next interval that does progress spans from the baseline, up to
    ``max_gap_seconds``; past that the baseline moves on (the gap was idle, or the agent away).
    A counter that went down (a restart) starts over.
    """
    if baseline is None:
        return None, current
    (start, first), (end, last) = baseline, current
    key = s.COUNTER_GENERATION_TOKENS
    if key not in first.counters or key not in last.counters:
        return None, current
    tokens = last.counters[key] - first.counters[key]
    if tokens < 0 or not 0 < end - start <= max_gap_seconds:
        return None, current  # a restart, a clock that went back, or too long a gap
    if tokens == 0:
        return None, baseline  # no progress seen (yet): carry the start
    return interval_evidence(baseline, current, max_gap_seconds=max_gap_seconds), current


def _mean_batch(first: ModelSample, last: ModelSample, tokens: float) -> float | None:
    steps_key = s.HISTOGRAM_ITERATION_TOKENS
    if steps_key in first.histograms and steps_key in last.histograms:
        steps = last.histograms[steps_key].count - first.histograms[steps_key].count
        if steps > 0:
            return tokens / steps
        if steps < 0:
            return None  # a restart
    running = [
        sample.gauges.get(s.GAUGE_REQUESTS_RUNNING) for sample in (first, last)
    ]  # the fallback: the gauge at both ends
    values = [v for v in running if v is not None and math.isfinite(v) and v >= 0]
    return sum(values) / len(values) if values else None


def _increase(first: ModelSample, last: ModelSample, kind: str) -> Histogram | None:
    if kind not in first.histograms or kind not in last.histograms:
        return None
    before, after = first.histograms[kind], last.histograms[kind]
    if after.count < before.count:
        return None  # a restart: not this interval's observations
    return window_delta([before, after])


def aged(curve: BatchCurve, now: float, half_life_seconds: float) -> BatchCurve:
    """The curve with its evidence aged to ``now`` (a clock that went back ages nothing)."""
    elapsed = now - curve.updated
    if elapsed <= 0:
        return curve if elapsed == 0 else replace(curve, updated=now)
    factor = 0.5 ** (elapsed / half_life_seconds)
    return replace(
        curve,
        updated=now,
        bins=tuple(
            BinEvidence(
                b.seconds * factor,
                b.generation_tokens * factor,
                tuple(v * factor for v in b.itl),
                tuple(v * factor for v in b.ttft),
            )
            for b in curve.bins
        ),
    )


def add_interval(
    curve: BatchCurve, evidence: IntervalEvidence, now: float, half_life_seconds: float
) -> BatchCurve:
    """Age the curve to ``now`` and add one interval to the bin of its batch."""
    curve = aged(curve, now, half_life_seconds)
    index = bin_index(evidence.batch)
    if index is None:
        return curve
    curve, itl = _fit(curve, "itl", evidence.itl)
    curve, ttft = _fit(curve, "ttft", evidence.ttft)
    old = curve.bins[index]
    new = BinEvidence(
        old.seconds + evidence.seconds,
        old.generation_tokens + evidence.generation_tokens,
        _add(old.itl, itl, len(curve.itl_bounds)),
        _add(old.ttft, ttft, len(curve.ttft_bounds)),
    )
    return replace(curve, bins=(*curve.bins[:index], new, *curve.bins[index + 1 :]))


def _fit(
    curve: BatchCurve, kind: Literal["itl", "ttft"], increase: Histogram | None
) -> tuple[BatchCurve, tuple[float, ...] | None]:
    """The interval's per-bucket increase in the curve's layout of ``kind``. A new layout (the
    first one, or an engine upgrade) replaces the old one and drops that kind's old buckets."""
    if increase is None or len(increase.buckets) < 2:
        return curve, None
    bounds = tuple(bound for bound, _ in increase.buckets[:-1])
    if len(bounds) > MAX_HISTOGRAM_BOUNDS or not math.isinf(increase.buckets[-1][0]):
        return curve, None
    per_bucket = tuple(
        max(0.0, count - below)
        for (_, count), below in zip(
            increase.buckets, (0.0, *(c for _, c in increase.buckets[:-1])), strict=True
        )
    )
    # A new layout: old buckets cannot be mixed with new ones.
    if kind == "itl" and curve.itl_bounds != bounds:
        bins = tuple(replace(b, itl=()) for b in curve.bins)
        curve = replace(curve, bins=bins, itl_bounds=bounds)
    elif kind == "ttft" and curve.ttft_bounds != bounds:
        bins = tuple(replace(b, ttft=()) for b in curve.bins)
        curve = replace(curve, bins=bins, ttft_bounds=bounds)
    return curve, per_bucket


def _add(held: tuple[float, ...], more: tuple[float, ...] | None, bounds: int) -> tuple[float, ...]:
    if more is None:
        return held
    if len(held) != bounds + 1:
        return more
    return tuple(a + b for a, b in zip(held, more, strict=True))


def bin_p95(buckets: tuple[float, ...], bounds: tuple[float, ...]) -> float | None:
    """P95 of one bin's merged histogram; None without observations."""
    if len(buckets) != len(bounds) + 1 or sum(buckets) <= 0:
        return None
    cumulative, running = [], 0.0
    for bound, count in zip((*bounds, math.inf), buckets, strict=True):
        running += count
        cumulative.append((bound, running))
    return quantile(P95, Histogram(tuple(cumulative), running, 0.0))


def batch_answer(
    curve: BatchCurve,
    *,
    gpus: int,
    slo_seconds: float,
    min_seconds: float,
) -> BatchAnswer:
    """The curve per bin and the batch size that maximises tokens/s per GPU within the SLO."""
    gpus = max(1, gpus)
    points = tuple(
        BatchPoint(
            batch_bin=BINS[index],
            seconds=b.seconds,
            tokens_per_second_per_gpu=b.generation_tokens / b.seconds / gpus,
            itl_p95_seconds=(itl := bin_p95(b.itl, curve.itl_bounds)),
            ttft_p95_seconds=bin_p95(b.ttft, curve.ttft_bounds),
            evidenced=b.seconds >= min_seconds,
            within_slo=None if itl is None else itl <= slo_seconds,
        )
        for index, b in enumerate(curve.bins)
        if b.seconds > 0
    )
    answer = BatchAnswer(points, None, False, "", gpus, slo_seconds, min_seconds)
    evidenced = [p for p in points if p.evidenced]
    if not evidenced:
        return replace(
            answer, reason=f"no batch size has {min_seconds:g} s of evidence yet (thin evidence)"
        )
    eligible = [p for p in evidenced if p.within_slo]
    if not eligible:
        return replace(
            answer,
            reason=f"no batch size with evidence keeps ITL P95 within {slo_seconds:g} s",
        )
    best = max(eligible, key=lambda p: (p.tokens_per_second_per_gpu, -p.batch_bin))
    beyond = [p for p in evidenced if p.batch_bin > best.batch_bin]
    reached = any(
        not p.within_slo or p.tokens_per_second_per_gpu < best.tokens_per_second_per_gpu
        for p in beyond
    )
    reason = (
        f"batch {best.batch_bin}: the most tokens/s per GPU within ITL P95 {slo_seconds:g} s, "
        + (
            "and larger batches did worse"
            if reached
            else "but no larger batch has been seen long enough to tell whether it is the peak"
        )
    )
    return replace(answer, knee=best.batch_bin, peak_reached=reached, reason=reason)


def engine_knee(answers: Iterable[BatchAnswer]) -> BatchAnswer | None:
    """The answer that speaks for an engine (drift is per engine): the model with the most
    seconds of evidence (an engine normally serves one)."""
    return max(answers, key=lambda a: sum(p.seconds for p in a.points), default=None)
