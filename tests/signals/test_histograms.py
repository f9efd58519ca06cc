import math

import pytest

from moe_watch.samples import Histogram
from moe_watch.signals.histograms import quantile, window_delta

INF = math.inf


def hist(
    *cumulative: float, bounds: tuple[float, ...] = (1.0, 2.0, 4.0, INF), total_sum: float = 0.0
) -> Histogram:
    return Histogram(
        buckets=tuple(zip(bounds, cumulative, strict=True)), count=cumulative[-1], sum=total_sum
    )


def test_quantile_interpolates_linearly_inside_the_bucket() -> None:
    # 10 observations: 4 in (0,1], 4 in (1,2], 2 in (2,4]. P50 rank 5 -> bucket (1,2]:
    # 1 + (2-1) * (5-4)/4 = 1.25
    h = hist(4, 8, 10, 10)
    assert quantile(0.5, h) == pytest.approx(1.25)
    # P95 rank 9.5 -> bucket (2,4]: 2 + 2 * (9.5-8)/2 = 3.5
    assert quantile(0.95, h) == pytest.approx(3.5)


def test_quantile_first_bucket_starts_at_zero() -> None:
    # rank 2 of 4 in (0,1]: 0 + 1 * 2/4
    assert quantile(0.5, hist(4, 4, 4, 4)) == pytest.approx(0.5)


def test_quantile_in_the_inf_bucket_returns_the_highest_finite_bound() -> None:
    assert quantile(0.99, hist(1, 1, 1, 100)) == pytest.approx(4.0)


def test_quantile_of_an_empty_histogram_is_unknown() -> None:
    assert quantile(0.5, hist(0, 0, 0, 0)) is None


def test_quantile_rejects_out_of_range_q() -> None:
    with pytest.raises(ValueError, match="within"):
        quantile(1.5, hist(1, 1, 1, 1))


def test_window_delta_subtracts_the_oldest_snapshot() -> None:
    old, new = hist(10, 20, 30, 30, total_sum=40.0), hist(14, 28, 40, 40, total_sum=55.0)
    delta = window_delta([old, new])
    assert delta is not None
    assert [c for _, c in delta.buckets] == [4, 8, 10, 10]
    assert delta.count == 10
    assert delta.sum == pytest.approx(15.0)
    # Same numbers as the first test: the quantile is over the window only.
    assert quantile(0.5, delta) == pytest.approx(1.25)


def test_window_delta_survives_an_engine_restart() -> None:
    # 30 observations before the restart, then 0, then 5 (all in (0,1]): increase is 5 + 5 = 10
    before = hist(10, 20, 30, 30)
    restarted = hist(0, 0, 0, 0)
    after = hist(5, 5, 5, 5)
    delta = window_delta([hist(5, 15, 25, 25), before, restarted, after])
    assert delta is not None
    assert [c for _, c in delta.buckets] == [10, 10, 10, 10]
    assert all(c >= 0 for _, c in delta.buckets)


def test_window_delta_uses_only_snapshots_since_a_bucket_layout_change() -> None:
    old_layout = hist(1, 2, 3, 3)
    new_bounds = (0.5, 1.0, INF)
    a = hist(2, 4, 4, bounds=new_bounds)
    b = hist(3, 6, 7, bounds=new_bounds)
    delta = window_delta([old_layout, a, b])
    assert delta is not None
    assert [c for _, c in delta.buckets] == [1, 2, 3]


def test_window_delta_needs_two_snapshots() -> None:
    assert window_delta([]) is None
    assert window_delta([hist(1, 1, 1, 1)]) is None
