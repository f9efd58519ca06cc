"""The batching curve: intervals binned by their batch, aged evidence, and the knee."""

from __future__ import annotations

import math

import pytest

from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.signals.batching import (
    BatchCurve,
    IntervalEvidence,
    add_interval,
    aged,
    batch_answer,
    bin_p95,
    interval_evidence,
    next_interval,
)

ITL_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5)
HOUR = 3600.0


def histogram(bounds: tuple[float, ...], per_bucket: list[float]) -> Histogram:
    """A cumulative histogram from per-bucket counts (one more than the bounds: +Inf)."""
    cumulative, running = [], 0.0
    for bound, count in zip((*bounds, math.inf), per_bucket, strict=True):
        running += count
        cumulative.append((bound, running))
    return Histogram(tuple(cumulative), running, 0.0)


def sample(
    tokens: float,
    steps: float | None,
    *,
    running: float | None = None,
    itl: list[float] | None = None,
) -> ModelSample:
    histograms = {}
    if steps is not None:
        histograms[s.HISTOGRAM_ITERATION_TOKENS] = Histogram(((math.inf, steps),), steps, tokens)
    if itl is not None:
        histograms[s.LATENCY_ITL] = histogram(ITL_BOUNDS, itl)
    gauges = {s.GAUGE_REQUESTS_RUNNING: running} if running is not None else {}
    return ModelSample(
        "m", gauges=gauges, counters={s.COUNTER_GENERATION_TOKENS: tokens}, histograms=histograms
    )


def test_an_intervals_batch_is_its_generated_tokens_per_engine_step() -> None:
    before = sample(1000, 200, running=1, itl=[0, 5, 0, 0, 0, 0, 0])
    after = sample(1800, 300, running=7, itl=[0, 5, 700, 90, 0, 0, 0])
    evidence = interval_evidence((10.0, before), (15.0, after), max_gap_seconds=30)
    assert evidence is not None
    assert (evidence.seconds, evidence.batch, evidence.generation_tokens) == (5.0, 8.0, 800.0)
    assert evidence.itl is not None
    assert [c for _, c in evidence.itl.buckets] == [0, 0, 700, 790, 790, 790, 790]
    # Without the engine's step counter: the running gauge at both ends.
    fallback = interval_evidence(
        (10.0, sample(1000, None, running=2)), (15.0, sample(1100, None, running=4)),
        max_gap_seconds=30,
    )  # fmt: skip
    assert fallback is not None
    assert fallback.batch == 3.0


@pytest.mark.parametrize(
    ("before", "after", "seconds"),
    [
        (sample(1000, 200), sample(1000, 210), 5.0),  # idle: no token generated
        (sample(1000, 200), sample(50, 10), 5.0),  # the engine restarted
        (sample(1000, 200), sample(1100, 150), 5.0),  # the step counter restarted
        (sample(1000, 200), sample(1100, 210), 31.0),  # the agent was away
        (sample(1000, 200), sample(1100, 210), 0.0),
        (ModelSample("m"), sample(1100, 210), 5.0),  # no generation counter
    ],
)
def test_what_is_not_evidence(before: ModelSample, after: ModelSample, seconds: float) -> None:
    assert interval_evidence((0.0, before), (seconds, after), max_gap_seconds=30) is None


def test_a_scrape_without_progress_is_carried_into_the_next_one_not_dropped() -> None:
    # The engine's counters move in lumps: 2 s with nothing, then 800 tokens in 100 steps. The
    # evidence is 3 s at batch 8 (not 1 s, which would make the rate three times too high).
    start = (10.0, sample(1000, 200))
    evidence, baseline = next_interval(start, (11.0, sample(1000, 200)), max_gap_seconds=30)
    assert (evidence, baseline) == (None, start)
    evidence, baseline = next_interval(baseline, (12.0, sample(1000, 200)), max_gap_seconds=30)
    assert baseline == start
    later = (13.0, sample(1800, 300))
    evidence, baseline = next_interval(baseline, later, max_gap_seconds=30)
    assert evidence is not None
    assert (evidence.seconds, evidence.batch, evidence.generation_tokens) == (3.0, 8.0, 800.0)
    assert baseline == later


@pytest.mark.parametrize(
    ("after", "seconds"),
    [
        (sample(1000, 200), 31.0),  # nothing for longer than the gap: idle; start over
        (sample(1100, 210), 31.0),  # progress, but after too long a gap
        (sample(50, 10), 5.0),  # the engine restarted
    ],
)
def test_a_long_gap_or_a_restart_starts_over(after: ModelSample, seconds: float) -> None:
    start = (0.0, sample(1000, 200))
    evidence, baseline = next_interval(start, (seconds, after), max_gap_seconds=30)
    assert evidence is None
    assert baseline == (seconds, after)
    assert next_interval(None, start, max_gap_seconds=30) == (None, start)


def evidence(
    batch: float, seconds: float, tokens_per_second: float, itl_bucket: int
) -> IntervalEvidence:
    """``seconds`` at ``batch`` with every inter-token gap in one ITL bucket."""
    per_bucket = [0.0] * (len(ITL_BOUNDS) + 1)
    per_bucket[itl_bucket] = seconds * tokens_per_second
    return IntervalEvidence(
        seconds, batch, seconds * tokens_per_second, itl=histogram(ITL_BOUNDS, per_bucket)
    )


def test_intervals_add_up_per_bin_and_age_by_half_per_half_life() -> None:
    curve = BatchCurve(updated=0.0)
    curve = add_interval(curve, evidence(3.9, 5, 100, 1), 5.0, HOUR)  # bin 4
    curve = add_interval(curve, evidence(4.4, 5, 140, 1), 10.0, HOUR)
    four = curve.bins[2]
    assert four.seconds == pytest.approx(10, rel=1e-3)
    assert four.generation_tokens == pytest.approx(1200, rel=1e-3)
    assert curve.itl_bounds == ITL_BOUNDS
    assert sum(curve.bins[1].itl) == 0
    later = aged(curve, 10.0 + HOUR, HOUR)
    assert later.bins[2].seconds == pytest.approx(four.seconds / 2)
    assert sum(later.bins[2].itl) == pytest.approx(sum(four.itl) / 2)
    assert aged(later, 5.0, HOUR).bins == later.bins  # a clock that went back ages nothing


def test_a_new_histogram_layout_replaces_the_old_buckets() -> None:
    curve = add_interval(BatchCurve(updated=0.0), evidence(8, 5, 100, 2), 5.0, HOUR)
    other = IntervalEvidence(5, 2, 100, itl=histogram((0.1, 1.0), [100, 0, 0]))
    curve = add_interval(curve, other, 10.0, HOUR)
    assert curve.itl_bounds == (0.1, 1.0)
    assert curve.bins[3].itl == ()  # bin 8's old buckets are gone, its seconds stay
    assert curve.bins[3].seconds > 4
    assert curve.bins[1].itl == (100.0, 0.0, 0.0)


def curve_of(*points: tuple[float, float, float, int]) -> BatchCurve:
    """(batch, seconds, tokens/s, ITL bucket) per bin, all added at t=0."""
    curve = BatchCurve(updated=0.0)
    for point in points:
        curve = add_interval(curve, evidence(*point), 0.0, HOUR)
    return curve


def test_the_knee_is_the_most_tokens_per_gpu_within_the_itl_slo_and_a_real_peak() -> None:
    # Throughput rises to batch 8 and falls after it; batch 32 would be faster still but its
    # inter-token gaps are over the 0.2 s SLO (bucket 5: 0.2-0.5 s).
    curve = curve_of(
        (1, 600, 40, 1), (2, 600, 75, 1), (4, 600, 130, 2), (8, 600, 200, 3),
        (16, 600, 180, 4), (32, 600, 260, 5),
    )  # fmt: skip
    answer = batch_answer(curve, gpus=2, slo_seconds=0.2, min_seconds=300)
    assert answer.knee == 8
    assert answer.peak_reached
    assert [p.batch_bin for p in answer.points] == [1, 2, 4, 8, 16, 32]
    eight = answer.point(8)
    assert eight is not None
    assert eight.tokens_per_second_per_gpu == pytest.approx(100)  # 200 tokens/s on 2 GPUs
    assert eight.itl_p95_seconds is not None
    assert 0.05 < eight.itl_p95_seconds <= 0.1
    thirty_two = answer.point(32)
    assert thirty_two is not None
    assert thirty_two.within_slo is False
    assert "larger batches did worse" in answer.reason


def test_no_knee_on_thin_evidence_and_no_peak_without_a_larger_batch() -> None:
    thin = curve_of((4, 100, 130, 2), (8, 250, 200, 3))
    answer = batch_answer(thin, gpus=1, slo_seconds=0.2, min_seconds=300)
    assert answer.knee is None
    assert "thin evidence" in answer.reason
    assert [p.evidenced for p in answer.points] == [False, False]
    rising = curve_of((4, 600, 130, 2), (8, 600, 200, 3), (16, 100, 150, 3))
    answer = batch_answer(rising, gpus=1, slo_seconds=0.2, min_seconds=300)
    assert (answer.knee, answer.peak_reached) == (8, False)  # 16 is worse but not evidenced
    assert "no larger batch" in answer.reason
    too_slow = curve_of((4, 600, 130, 5))
    answer = batch_answer(too_slow, gpus=1, slo_seconds=0.2, min_seconds=300)
    assert answer.knee is None
    assert "ITL P95 within 0.2 s" in answer.reason


def test_bin_p95_interpolates_like_prometheus() -> None:
    assert bin_p95((0.0, 100.0, 0.0), (0.1, 1.0)) == pytest.approx(0.1 + 0.9 * 0.95)
    assert bin_p95((0.0, 0.0, 0.0), (0.1, 1.0)) is None
    assert bin_p95((1.0,), (0.1, 1.0)) is None  # the wrong number of buckets
