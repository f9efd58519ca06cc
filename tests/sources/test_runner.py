"""SourceRunner: every failure contained and counted, logged once per state change."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.runner import SourceRunner


class ScriptedSource:
    """Plays back a script of outcomes: a value, an exception, or 'hang'."""

    name = "engine:test"

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.release = asyncio.Event()

    async def collect(self, problems: Problems) -> object:
        step = self.script.pop(0)
        if step == "hang":
            await self.release.wait()
        if step == "partial":
            problems.add("gpu_lost")
            return "partial result"
        if isinstance(step, BaseException):
            raise step
        return step

    async def close(self) -> None:
        self.release.set()


def clock() -> float:
    return 1000.0


async def test_success_marks_up_and_records_last_success() -> None:
    runner = SourceRunner(ScriptedSource("ok"), timeout_seconds=1, clock=clock)
    assert await runner.run() == "ok"
    status = runner.status()
    assert status.up
    assert status.last_success_timestamp == 1000.0
    assert status.errors_total == {}
    assert status.last_error is None


async def test_source_error_is_counted_by_reason_and_returns_none() -> None:
    runner = SourceRunner(ScriptedSource(SourceError("connect", "refused")), timeout_seconds=1)
    assert await runner.run() is None
    status = runner.status()
    assert not status.up
    assert status.errors_total == {"connect": 1}
    assert status.last_error == "connect: refused"


async def test_a_bug_in_a_source_is_contained_as_internal() -> None:
    runner = SourceRunner(ScriptedSource(KeyError("oops")), timeout_seconds=1)
    with capture_logs() as logs:
        assert await runner.run() is None
    assert runner.status().errors_total == {"internal": 1}
    assert any(entry["event"] == "source raised unexpectedly" for entry in logs)


async def test_a_hanging_source_is_cut_at_the_timeout() -> None:
    source = ScriptedSource("hang")
    runner = SourceRunner(source, timeout_seconds=0.05)
    assert await runner.run() is None
    assert runner.status().errors_total == {"timeout": 1}


async def test_partial_problems_are_counted_without_marking_the_source_down() -> None:
    runner = SourceRunner(ScriptedSource("partial"), timeout_seconds=1)
    assert await runner.run() == "partial result"
    status = runner.status()
    assert status.up
    assert status.errors_total == {"gpu_lost": 1}


async def test_logs_only_on_state_changes() -> None:
    refused = SourceError("connect", "refused")
    source = ScriptedSource(
        "ok", refused, refused, refused, SourceError("timeout", "slow"), "ok", "ok"
    )
    runner = SourceRunner(source, timeout_seconds=1, log_fields={"engine": "e0"})
    with capture_logs() as logs:
        for _ in range(7):
            await runner.run()
    events = [(e["event"], e.get("reason")) for e in logs]
    # down once for connect, once more when the reason changed, up once: never per cycle
    assert events == [("source down", "connect"), ("source down", "timeout"), ("source up", None)]
    assert runner.status().errors_total == {"connect": 3, "timeout": 1}
