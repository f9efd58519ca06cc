"""The boundary around each stage of one engine's (or the node's) part of a cycle.

A source's failures are contained by its runner; what the agent derives from the samples
(signals, expert signals, the EPLB what-if, drift, the engine's record) is contained here, per
engine and per stage: a stage that raises yields its fallback, so only that stage's series are
missing from that engine this cycle and every other engine and GPU is published as usual. Each
failure is counted under the engine's source (``collect_errors_total{source="engine:<id>",
reason=<stage>}``) and logged once when it starts and once when the stage works again, never
per cycle, like the runners' "source down" and "source up".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TypeVar

import structlog

from moe_watch.snapshot import BAD_VALUE
from moe_watch.sources.runner import SourceStatus

T = TypeVar("T")

log = structlog.get_logger("moe_watch.agent")

MESSAGE_CHARS = 500  # an error text is kept for /status; a hostile value never makes it long


class Stages:
    """Runs the stages of one engine (or of the node) and keeps their failure counts."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._log = log.bind(**fields)
        self.errors: Counter[str] = Counter()
        self._failing: dict[str, str] = {}  # stage or condition -> its current problem

    def run(self, stage: str, work: Callable[[], T], fallback: T) -> T:
        """``work()``, or ``fallback`` when it raises (counted and logged as ``stage``)."""
        try:
            result = work()
        except Exception as exc:  # contain any failure: this stage of this engine only
            self.fail(stage, exc)
            return fallback
        self.ok(stage)
        return result

    def fail(self, stage: str, exc: BaseException) -> None:
        """Count a failure of ``stage``; log it if the stage was not failing already."""
        self.errors[stage] += 1
        if stage not in self._failing:
            self._log.error(
                "stage failed; its series are left out until it works again",
                stage=stage,
                exc_info=exc,
            )
        self._failing[stage] = f"{type(exc).__name__}: {exc}"[:MESSAGE_CHARS]

    def ok(self, stage: str) -> None:
        if self._failing.pop(stage, None) is not None:
            self._log.info("stage works again", stage=stage)

    def refuse(self, what: str, refused: tuple[str, ...]) -> None:
        """Count each refused value (``bad_value``); log when the refused set of ``what``
        changes and when nothing is refused any more."""
        key = f"{what} values"
        if not refused:
            if self._failing.pop(key, None) is not None:
                self._log.info("values accepted again", what=what)
            return
        self.errors[BAD_VALUE] += len(refused)
        problem = ("refused " + ", ".join(refused))[:MESSAGE_CHARS]
        if self._failing.get(key) != problem:
            self._log.warning("values refused", what=what, refused=list(refused))
        self._failing[key] = problem

    @property
    def failing(self) -> Mapping[str, str]:
        return dict(self._failing)

    def merged(self, status: SourceStatus) -> SourceStatus:
        """``status`` of the source these stages belong to, with their failures counted in;
        its last error names a failing stage when the source itself succeeded."""
        if not self.errors:
            return status
        errors = Counter(status.errors_total)
        errors.update(self.errors)
        last_error = status.last_error
        if last_error is None and self._failing:
            stage, problem = next(iter(self._failing.items()))
            last_error = f"{stage}: {problem}"
        return replace(status, errors_total=dict(errors), last_error=last_error)
