"""A source's blocking read that outlives its cycle (a wedged network volume, a hostile dump that
takes a minute to refuse) stays that source's problem: the next cycles do not start it again
beside the first, what it read is not lost, and the other engines keep reading.

Before: every cycle handed a new read to the agent's shared pool of 8 threads while the last
one still ran. One slow engine filled the pool in 8 cycles and every other engine's expert
counts, EPLB log and /proc reads queued behind it; the reads it had finished were thrown away
with their timed-out cycle (an SGLang dump is deleted once read: its counts were gone).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from moe_watch.background import DaemonThreadExecutor
from moe_watch.expert_file import SUFFIX, CountsFile, write_counts_file
from moe_watch.samples import ExpertCounts
from moe_watch.sources.eplb_log import EplbLogSource
from moe_watch.sources.expert_plugin import PluginExpertSource
from moe_watch.sources.expert_sglang import SGLangExpertSource
from moe_watch.sources.proc import ProcSource
from moe_watch.sources.runner import SourceRunner

CYCLE_TIMEOUT = 0.3  # the runner's bound: a wedged read always outlives it
RELEASE_WAIT = 30.0  # how long a released read may take to be seen finished (a bound, not a sleep)


class Wedge:
    """A source's blocking read that hangs until released, counting how often it was started."""

    def __init__(self, read: Callable[..., Any]) -> None:
        self._read = read
        self.release = threading.Event()
        self.started = 0

    def __call__(self, *args: Any) -> Any:
        self.started += 1
        self.release.wait(RELEASE_WAIT)
        return self._read(*args)


def plugin_files(directory: Path) -> None:
    now = time.time()
    counts = CountsFile(
        pid=1, started=now - 60, updated=now, model="m", top_k=2, num_experts=4,
        layers=[0], counts=[[4, 3, 2, 1]],
    )  # fmt: skip
    write_counts_file(directory / ("w0" + SUFFIX), counts)


async def wedged(
    kind: str, tmp_path: Path, session: aiohttp.ClientSession, sglang: str
) -> tuple[Any, Wedge]:
    """A source of ``kind`` with something to read, its blocking read wedged."""
    source: Any
    if kind == "plugin":
        plugin_files(tmp_path)
        source, method = PluginExpertSource("e", tmp_path), "_read"
    elif kind == "sglang":
        (tmp_path / "expert_distribution_rank0_timestamp1.csv").write_text(
            "layer_id,expert_id,count\n0,1,7\n"
        )
        source = SGLangExpertSource("e", sglang, tmp_path, session, top_k=2, num_experts=4)
        method = "_drain"
    elif kind == "eplb":
        source, method = EplbLogSource("e", tmp_path / "vllm.log"), "_read_new"
        (tmp_path / "vllm.log").write_text("")
    else:
        source, method = ProcSource(lambda: [os.getpid()]), "_read"
    wedge = Wedge(getattr(source, method))
    setattr(source, method, wedge)
    return source, wedge


@pytest.mark.parametrize("kind", ["plugin", "sglang", "eplb", "proc"])
async def test_a_read_that_outlives_its_cycle_is_not_started_again(
    kind: str, tmp_path: Path, sglang_url: str
) -> None:
    async with aiohttp.ClientSession() as session:
        source, wedge = await wedged(kind, tmp_path, session, sglang_url)
        runner = SourceRunner(source, timeout_seconds=CYCLE_TIMEOUT)
        try:
            for _ in range(3):
                assert await runner.run() is None
                assert runner.status().last_error == f"timeout: no result within {CYCLE_TIMEOUT:g}s"
            assert wedge.started == 1  # still the first read: no second one beside it
        finally:
            wedge.release.set()
        runner = SourceRunner(source, timeout_seconds=RELEASE_WAIT)
        result = await runner.run()  # the first read's answer, not a new read
        assert wedge.started == 1
        assert runner.status().up, runner.status().last_error
    if kind in ("plugin", "sglang"):  # what the wedged read found is not lost
        assert isinstance(result, ExpertCounts)
        assert sum(map(sum, result.counts)) == (10 if kind == "plugin" else 7)
    assert result is not None


async def test_reads_of_wedged_engines_leave_the_other_engines_reading(tmp_path: Path) -> None:
    # The agent's own thread pool (serving/service.py installs it), 8 threads.
    asyncio.get_running_loop().set_default_executor(DaemonThreadExecutor(name="test-io"))
    wedges = []
    try:
        for n in range(8):
            directory = tmp_path / f"wedged-{n}"
            directory.mkdir()
            plugin_files(directory)
            source = PluginExpertSource(f"wedged-{n}", directory)
            wedge = Wedge(source._read)
            source._read = wedge  # type: ignore[method-assign]
            wedges.append(wedge)
            assert await SourceRunner(source, timeout_seconds=CYCLE_TIMEOUT).run() is None
        good = tmp_path / "good"
        good.mkdir()
        plugin_files(good)
        runner = SourceRunner(PluginExpertSource("good", good), timeout_seconds=5.0)
        counts = await runner.run()
        assert runner.status().up, runner.status().last_error
        assert isinstance(counts, ExpertCounts)
    finally:
        for wedge in wedges:
            wedge.release.set()
