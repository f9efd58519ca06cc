"""The one small protocol every source implements, and the error it raises.

A source does I/O only and returns typed samples. It signals a whole-source failure by raising
``SourceError`` with a short machine-readable ``reason`` (it becomes the ``reason`` label of
``moe_watch_collect_errors_total``). Partial failures (one GPU of eight lost) are not source
failures: the source reports them through ``Problems`` and still returns what it could read.
The agent's runner times every source, contains every exception and keeps the self-metrics.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)


class SourceError(Exception):
    """A source could not produce a result this cycle."""

    def __init__(self, reason: str, message: str, *, counted: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # False: the failure was already counted as it happened (through Problems), so the
        # runner marks the source down without counting it again every cycle (discovery).
        self.counted = counted

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class Problems:
    """Collects partial failures inside one collection (counted, not fatal)."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1


class Source(Protocol[T_co]):
    """Anything the agent can collect from."""

    @property
    def name(self) -> str:
        """Stable name, the ``source`` label of the self-metrics (e.g. ``nvml``, ``engine:vllm-0``)."""
        ...

    async def collect(self, problems: Problems) -> T_co:
        """Read once. Raise ``SourceError`` when nothing usable could be read."""
        ...

    async def close(self) -> None:
        """Release resources (sessions, threads, library handles)."""
        ...
