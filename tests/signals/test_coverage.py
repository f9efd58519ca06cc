"""Expert coverage per step: the window's sums, the dense point, the independent prediction."""

from __future__ import annotations

import itertools
import math
from array import array

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from moe_watch.samples import ExpertCounts, StepCoverageCounts, matrix
from moe_watch.signals.coverage import (
    coverage_increase,
    expected_distinct,
    independent_coverage,
    miss_probabilities,
    observed_coverage,
    with_independent,
)
from moe_watch.signals.power_bins import BINS

E, K = 4, 2
LAYERS = (0, 1)


def coverage(
    steps: dict[int, int], tokens: dict[int, int], distinct: dict[int, list[int]]
) -> StepCoverageCounts:
    """Sums by bin label (1, 2, 4 ...)."""
    return StepCoverageCounts(
        steps=tuple(float(steps.get(b, 0)) for b in BINS),
        tokens=tuple(float(tokens.get(b, 0)) for b in BINS),
        distinct=tuple(array("d", distinct.get(b, [0, 0])) for b in BINS),
        sample_every=4,
    )


def counts(total: int, cov: StepCoverageCounts | None, started: float = 1.0) -> ExpertCounts:
    return ExpertCounts(
        engine="e",
        model="m",
        top_k=K,
        num_experts=E,
        layers=LAYERS,
        counts=matrix([[total, total, 0, 0], [total, 0, total, 0]]),
        started=started,
        coverage=cov,
    )


def test_observed_coverage_is_the_mean_fraction_of_experts_and_the_dense_point_the_first_bin_over_90_percent() -> (
    None
):
    sums = coverage(
        steps={1: 10, 4: 5, 8: 4},
        tokens={1: 10, 4: 21, 8: 32},
        # one token reaches its 2 experts of 4 in every layer: 0.5; 4-5 tokens: 3.5 of 4 on
        # average; 8 tokens: all 4 in layer 0, 3.5 in layer 1
        distinct={1: [20, 20], 4: [18, 17], 8: [16, 14.5]},
    )
    curve = observed_coverage(sums, LAYERS, E)
    assert [b.tokens_bin for b in curve.bins] == [1, 4, 8]  # bins without steps are absent
    assert [b.observed for b in curve.bins] == [0.5, 35 / 40, 30.5 / 32]
    assert curve.bin(4) is not None
    assert curve.bin(4).mean_tokens == pytest.approx(4.2)  # type: ignore[union-attr]
    assert curve.dense_point == 8  # 4 tokens: 0.875 < 0.90; 8: 0.953
    assert list(curve.per_layer[2]) == [1.0, 14.5 / 16]
    assert observed_coverage(sums, LAYERS, E, dense=0.99).dense_point is None
    assert observed_coverage(sums, LAYERS, E, dense=0.85).dense_point == 4


def test_window_increase_of_coverage_survives_a_worker_restart() -> None:
    before = counts(10, coverage({1: 2}, {1: 2}, {1: [4, 4]}))
    later = counts(20, coverage({1: 5, 2: 1}, {1: 5, 2: 2}, {1: [10, 10], 2: [3, 3]}))
    restarted = counts(4, coverage({4: 1}, {4: 4}, {4: [4, 3]}), started=2.0)  # from zero
    grown = counts(8, coverage({4: 3}, {4: 12}, {4: [12, 10]}), started=2.0)
    increase = coverage_increase([before, later, restarted, grown])
    assert increase is not None
    # 3 + 1 steps before the restart, then 3 after it (the restarted sums count in full)
    assert increase.steps[:3] == (3.0, 1.0, 3.0)
    assert increase.tokens[:3] == (3.0, 2.0, 12.0)
    assert [list(row) for row in increase.distinct[:3]] == [[6, 6], [3, 3], [12, 10]]
    # A sample without coverage (an older plugin) cuts the window: only what follows counts.
    assert coverage_increase([before, counts(15, None), later]) is None
    assert coverage_increase([later]) is None


def test_independent_prediction_with_even_shares_is_one_minus_the_miss_probability_to_the_n() -> (
    None
):
    even = matrix([[25, 25, 25, 25]])  # token share 2/4 each: a token misses an expert with 1/2
    predicted = independent_coverage(even, K, E, [1, 2, 3.5])
    assert predicted == pytest.approx([0.5, 0.75, 1 - 0.5**3.5])
    skewed = matrix([[50, 50, 0, 0]])  # two experts take everything: coverage stops at 1/2
    assert independent_coverage(skewed, K, E, [1, 100]) == pytest.approx([0.5, 0.5])
    assert independent_coverage(matrix([[0, 0, 0, 0]]), K, E, [4]) == [None]
    assert miss_probabilities([0, 0], 1) is None


def exact_expected_distinct(pairs: dict[tuple[int, int], float], n: int) -> float:
    """Brute force: n independent tokens, each routed to one pair of distinct experts."""
    total = 0.0
    for choice in itertools.product(pairs, repeat=n):
        probability = math.prod(pairs[p] for p in choice)
        total += probability * len({e for p in choice for e in p})
    return total


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_prediction_is_exact_for_independent_top_k_routing_without_replacement(n: int) -> None:
    # Top-2 of 4 without replacement, with uneven pair probabilities: the window counts are
    # what these pairs route in expectation, and D(n) must equal the brute-force expectation.
    pairs = {(0, 1): 0.4, (0, 2): 0.25, (1, 3): 0.2, (2, 3): 0.15}
    window = [sum(p for pair, p in pairs.items() if e in pair) * 1000 for e in range(E)]
    misses = miss_probabilities(window, K)
    assert misses is not None
    assert expected_distinct(misses, n) == pytest.approx(exact_expected_distinct(pairs, n))


@example(q=0.01171875, low=106, mix=0.5625)
@given(
    q=st.floats(min_value=0.0, max_value=1.0),
    low=st.integers(min_value=1, max_value=2000),
    mix=st.floats(min_value=0.0, max_value=1.0),
)
def test_predicting_at_the_bins_mean_overstates_by_at_most_one_32nd(
    q: float, low: int, mix: float
) -> None:
    # Steps of one bin span at most a factor of 2: a share ``mix`` of them at ``low`` tokens,
    # the rest at 2 x low. The prediction at the mean against the mean of the predictions:
    misses = [1.0 - q]
    mean = mix * low + (1 - mix) * 2 * low
    at_mean = expected_distinct(misses, mean)
    mean_of = mix * expected_distinct(misses, low) + (1 - mix) * expected_distinct(misses, 2 * low)
    # The worst case hypothesis found (q=0.01171875, low=106, mix=0.5625) is 1/32 + 2e-6: the
    # bound is 1/32 to within 1e-5, not exactly.
    assert -1e-12 <= at_mean - mean_of <= 1 / 32 + 1e-5


def test_the_curve_carries_its_prediction_beside_the_observation() -> None:
    sums = coverage(steps={2: 4}, tokens={2: 8}, distinct={2: [12, 8]})
    curve = observed_coverage(sums, LAYERS, E)
    window = matrix([[25, 25, 25, 25], [50, 50, 0, 0]])
    predicted = independent_coverage(window, K, E, [b.mean_tokens for b in curve.bins])
    both = with_independent(curve, predicted)
    [two] = both.bins
    assert two.observed == 20 / 32
    assert two.independent == pytest.approx((0.75 + 0.5) / 2)
    assert (both.dense_point, both.per_layer) == (curve.dense_point, curve.per_layer)
