"""One budget for the engine bodies the agent holds at once.

Each engine's /metrics body is capped (``max_body_bytes``), but the agent scrapes every engine
at once: with discovery, 16 annotated pods answering 16 MiB each hold 256 MiB, the chart's
memory limit, and the kubelet kills the agent for all of them. So the bodies being read share
``max_body_bytes_in_flight``. Past it, the largest body in flight is dropped: the one that
costs the most, and the one an engine answering with a flood has. Its read ends at once
(the connection is closed) and the engine's scrape fails with ``body_budget``; every smaller
body, a real engine's 50 KB among them, reads on.
"""

from __future__ import annotations

from collections.abc import Callable


class BodyBudgetSpent(Exception):
    """This body was the largest in flight when the agent's budget ran out."""


class BodyReader:
    """One body from its first byte until it is parsed: what it holds, and how to end its read
    from outside (``abort``, set once its response exists)."""

    __slots__ = ("_budget", "abort", "dropped", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.abort: Callable[[], None] | None = None
        self.held = 0
        self.dropped = False

    def take(self, size: int) -> None:
        """Count ``size`` more bytes of this body; raises BodyBudgetSpent when this body is
        dropped to keep the budget (now, or earlier while it waited for its next chunk)."""
        if self.dropped:
            raise BodyBudgetSpent
        self.held += size
        self._budget.add(size)
        if self.dropped:
            raise BodyBudgetSpent

    def drop(self) -> None:
        self.dropped = True
        if self.abort is not None:
            self.abort()

    def __enter__(self) -> BodyReader:
        self._budget.readers[self] = None
        return self

    def __exit__(self, *_: object) -> None:
        self._budget.release(self)


class BodyBudget:
    """The bytes of engine bodies the agent may hold at once (``max_body_bytes_in_flight``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.readers: dict[BodyReader, None] = {}

    def reader(self) -> BodyReader:
        """A reader for one body, held (``with``) until the body is parsed."""
        return BodyReader(self)

    def add(self, size: int) -> None:
        self.total += size
        while self.total > self.limit and self.readers:
            largest = max(self.readers, key=lambda reader: reader.held)
            self.release(largest)
            largest.drop()

    def release(self, reader: BodyReader) -> None:
        """The reader's bytes leave the budget (its body is parsed or dropped)."""
        if reader in self.readers:
            del self.readers[reader]
            self.total -= reader.held
