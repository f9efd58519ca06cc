"""The fixed power-of-two bins of the batching curve: running batch sizes and tokens per step.

Stdlib only: the vLLM plugin bins each sampled step's token count with it, the agent its
intervals' batch sizes, and both must agree. Bin ``b`` is labelled ``2**b`` and holds the values
nearest to it on a log scale, ``[2**b / sqrt(2), 2**b * sqrt(2))``: a steady concurrency of 4
lands in bin 4 even when the measured mean is 3.9 or 4.2 (with ``[2**b, 2**(b+1))`` bins it would
straddle two). For integers: 1 | 2 | 3-5 | 6-11 | 12-22 | 23-45 | 46-90 | 91-181 | ... The last
bin (2048) is open above. Twelve bins keep every curve at 12 series per engine at most.
"""

from __future__ import annotations

import math

BIN_COUNT = 12
BINS: tuple[int, ...] = tuple(2**b for b in range(BIN_COUNT))  # the labels: 1, 2, 4 ... 2048
_LOWEST = 2**-0.5  # below this (0, or a fraction of a request) a value is in no bin


def bin_index(value: float) -> int | None:
    """The bin of ``value`` (a mean batch size, a step's token count); None below bin 1."""
    if not math.isfinite(value) or value < _LOWEST:
        return None
    return min(BIN_COUNT - 1, max(0, math.floor(math.log2(value) + 0.5)))


def int_bin_index(count: int) -> int:
    """``bin_index`` for a positive integer, exactly and without floating point (the plugin
    calls it once per sampled step): ``b`` such that ``2**b / sqrt(2) <= count < 2**b * sqrt(2)``."""
    b = count.bit_length() - 1
    if count * count >= 1 << (2 * b + 1):  # count >= 2**b * sqrt(2)
        b += 1
    return min(BIN_COUNT - 1, b)


def bin_edges(index: int) -> tuple[float, float]:
    """``[low, high)`` of bin ``index`` (the last bin's high is infinite)."""
    low = BINS[index] * _LOWEST
    high = math.inf if index == BIN_COUNT - 1 else BINS[index] * 2**0.5
    return low, high
