import pytest

from moe_watch.signals.counters import increase, rate, ratio_of_increases


def test_increase_sums_consecutive_deltas() -> None:
    assert increase([10, 12, 15, 15]) == 5


def test_increase_treats_a_drop_as_a_reset_and_keeps_the_traffic_after_it() -> None:
    # 100 -> 130 (+30), restart, 0 -> 5 counts as +5, then 5 -> 9 (+4)
    assert increase([100, 130, 5, 9]) == 39


def test_increase_of_empty_or_single_sample_is_zero() -> None:
    assert increase([]) == 0
    assert increase([42]) == 0


def test_rate_is_increase_over_span() -> None:
    assert rate([(0.0, 0.0), (5.0, 20.0), (10.0, 50.0)]) == pytest.approx(5.0)


def test_rate_never_negative_across_a_counter_reset() -> None:
    # 1000 -> restart at 10 -> 40: increase = 10 + 30 = 40 over 20 s
    value = rate([(0.0, 1000.0), (10.0, 10.0), (20.0, 40.0)])
    assert value == pytest.approx(2.0)


@pytest.mark.parametrize("points", [[], [(1.0, 5.0)], [(3.0, 1.0), (3.0, 9.0)]])
def test_rate_is_unknown_without_two_distinct_times(points: list[tuple[float, float]]) -> None:
    assert rate(points) is None


def test_hit_ratio_over_window() -> None:
    # queries 100 -> 300 (+200), hits 20 -> 70 (+50): 0.25
    assert ratio_of_increases([20, 70], [100, 300]) == pytest.approx(0.25)


def test_hit_ratio_unknown_when_no_queries_in_window() -> None:
    assert ratio_of_increases([5, 5], [10, 10]) is None
