"""Runs one source per cycle: times it, contains its failures, keeps its self-metrics.

Like node_exporter's collector framework: every source gets ``source_up``,
``collect_duration_seconds``, ``collect_errors_total{reason}`` and
``last_success_timestamp_seconds`` for free, and nothing a source raises escapes.
Logging happens on state changes only (down, up, a different reason), never per cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from moe_watch.sources.base import Problems, Source, SourceError

T = TypeVar("T")

log = structlog.get_logger("moe_watch.sources.runner")


@dataclass(frozen=True, slots=True)
class SourceStatus:
    name: str
    up: bool
    duration_seconds: float
    last_success_timestamp: float | None
    errors_total: Mapping[str, int]
    last_error: str | None


class SourceRunner(Generic[T]):
    def __init__(
        self,
        source: Source[T],
        *,
        timeout_seconds: float,
        clock: Callable[[], float] = time.time,
        log_fields: Mapping[str, str] | None = None,
    ) -> None:
        self.source = source
        self._timeout = timeout_seconds
        self._clock = clock
        self._log = log.bind(source=source.name, **(log_fields or {}))
        self._up: bool | None = None  # None until the first run, so the first failure logs
        self._reason: str | None = None
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._duration = 0.0
        self._errors: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return self.source.name

    async def run(self) -> T | None:
        """Collect once. Returns the result, or None when the source failed this cycle."""
        problems = Problems()
        started = time.perf_counter()
        result: T | None = None
        reason: str | None = None
        message = ""
        counted = True
        try:
            result = await asyncio.wait_for(self.source.collect(problems), self._timeout)
        except SourceError as exc:
            reason, message, counted = exc.reason, exc.message, exc.counted
        except asyncio.TimeoutError:
            reason, message = "timeout", f"no result within {self._timeout:g}s"
        except Exception as exc:  # a bug in a source must not take the agent down
            reason, message = "internal", f"{type(exc).__name__}: {exc}"
            self._log.exception("source raised unexpectedly")
        self._duration = time.perf_counter() - started
        self._errors.update(problems.reasons)
        if reason is None:
            self._last_success = self._clock()
            self._last_error = None
            self._transition(up=True, reason=None, message="")
        else:
            if counted:
                self._errors[reason] += 1
            self._last_error = f"{reason}: {message}"
            self._transition(up=False, reason=reason, message=message)
        return result

    def _transition(self, *, up: bool, reason: str | None, message: str) -> None:
        if up and self._up is False:
            self._log.info("source up", was=self._reason)
        elif not up and (self._up is not False or reason != self._reason):
            self._log.warning("source down", reason=reason, error=message)
        self._up, self._reason = up, reason

    def status(self) -> SourceStatus:
        return SourceStatus(
            name=self.name,
            up=bool(self._up),
            duration_seconds=self._duration,
            last_success_timestamp=self._last_success,
            errors_total=dict(self._errors),
            last_error=self._last_error,
        )
