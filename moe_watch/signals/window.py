"""A time-bounded history of samples (the only state signals read)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class SlidingWindow(Generic[T]):
    """Samples younger than ``duration`` seconds, oldest first.

    One sample older than the window is kept as the left edge so a rate over a window that
    contains a single fresh sample still has a starting point (as Prometheus' ``increase``
    would extrapolate from the previous scrape).
    """

    def __init__(self, duration: float, max_items: int = 10_000) -> None:
        if duration <= 0:
            raise ValueError(f"window duration must be positive, got {duration}")
        self.duration = duration
        self._items: deque[tuple[float, T]] = deque(maxlen=max_items)

    def append(self, timestamp: float, item: T) -> None:
        if self._items and timestamp < self._items[-1][0]:
            # The wall clock stepped back (NTP): start over rather than compute negative spans.
            self._items.clear()
        self._items.append((timestamp, item))
        horizon = timestamp - self.duration
        while len(self._items) > 2 and self._items[1][0] <= horizon:
            self._items.popleft()

    def expire(self, now: float) -> None:
        """Drop everything once even the newest sample is older than the window."""
        if self._items and self._items[-1][0] < now - self.duration:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[float, T]]:
        return iter(self._items)

    def latest(self) -> T | None:
        return self._items[-1][1] if self._items else None
