"""Counter maths over a window of samples, robust to counter resets.

A counter that goes down was reset (the engine restarted); like Prometheus' ``increase()``, the
value after the reset counts as the increase since the reset, so a restart never yields a
negative rate and never drops the traffic that followed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise


def increase(values: Sequence[float]) -> float:
    """Total increase across consecutive samples of one counter, treating drops as resets."""
    total = 0.0
    for previous, current in pairwise(values):
        total += current - previous if current >= previous else current
    return total


def rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Per-second increase over ``(timestamp, value)`` points; None without two distinct times."""
    if len(points) < 2:
        return None
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return None
    return increase([value for _, value in points]) / span


def ratio_of_increases(numerator: Sequence[float], denominator: Sequence[float]) -> float | None:
    """increase(numerator) / increase(denominator); None when the denominator did not move.

    Used for windowed hit ratios (prefix-cache hits / queries). Absent beats a fake 0 or 1.
    """
    below = increase(denominator)
    if below <= 0:
        return None
    return min(1.0, max(0.0, increase(numerator) / below))
