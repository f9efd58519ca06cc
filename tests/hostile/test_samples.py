"""The last line: expert counts that are not finite and non-negative cannot be built, so they
never reach the signals (the NaN that ended the agent in row.index(max(row)))."""

from __future__ import annotations

import math

import pytest

from moe_watch.samples import ExpertCounts, matrix


@pytest.mark.parametrize(
    "rows",
    [[[1.0, math.nan]], [[math.nan, 1.0]], [[math.inf, 0.0]], [[1.0, -1.0]], [[1e308, 1e308]]],
)
def test_counts_that_are_not_finite_and_non_negative_are_refused(rows: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="not finite and non-negative"):
        ExpertCounts("e", "m", 1, 2, (0,), matrix(rows))


def test_good_counts_are_built() -> None:
    assert ExpertCounts("e", "m", 1, 2, (0,), matrix([[1.0, 2.0]])).total == 3.0
