"""Quantiles over a window from cumulative histogram bucket deltas.

Averages hide the MoE tail (one hot expert, one hot GPU): the agent publishes P50/P95/P99 of
what happened *inside the window*, computed like Prometheus'
``histogram_quantile(q, increase(x_bucket[window]))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter

from moe_watch.samples import Histogram
from moe_watch.signals.counters import increase

_BOUND, _COUNT = itemgetter(0), itemgetter(1)


def window_delta(snapshots: Sequence[Histogram]) -> Histogram | None:
    """Per-bucket increase across consecutive snapshots of one histogram.

    Resets are handled per bucket, as for counters. If the bucket layout changes (an engine
    upgrade), only the snapshots since the last change are used. None for fewer than two.
    """
    if len(snapshots) < 2:
        return None
    start = len(snapshots) - 1
    bounds = _bounds(snapshots[-1])
    while start > 0 and _bounds(snapshots[start - 1]) == bounds:
        start -= 1
    usable = snapshots[start:]
    if len(usable) < 2:
        return None
    # One column per bucket: that bucket's (bound, count) in every usable snapshot.
    columns = zip(*(h.buckets for h in usable), strict=True)
    buckets = tuple(
        (bound, increase(list(map(_COUNT, column))))
        for bound, column in zip(bounds, columns, strict=True)
    )
    return Histogram(
        buckets=buckets,
        count=increase([h.count for h in usable]),
        sum=increase([h.sum for h in usable]),
    )


def quantile(q: float, histogram: Histogram) -> float | None:
    """The q-quantile of a (delta) histogram with Prometheus' linear interpolation.

    Returns None when the histogram saw no observations. When the rank falls in the +Inf
    bucket the result is the highest finite bound (what Prometheus returns too).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    buckets = histogram.buckets
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return None  # without a finite bound there is nothing to interpolate
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank and cumulative > lower_count:
            if math.isinf(bound):
                return lower_bound
            if bound <= 0:
                return bound
            fraction = (rank - lower_count) / (cumulative - lower_count)
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def _bounds(histogram: Histogram) -> list[float]:
    return list(map(_BOUND, histogram.buckets))  # C-level: called per snapshot per cycle
