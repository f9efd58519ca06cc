"""Hostile EPLB log paths and contents: a FIFO or a device never blocks or floods memory, a line
that never ends is dropped at the line bound, and the source keeps following the log."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_watch import limits
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.eplb_log import EplbLogSource
from tests.hostile.conftest import peak_memory

LINE = (
    "INFO [eplb_state.py:633] EPLB step: {step} for model m: avg_tokens=500.00, "
    "max_tokens=1000, balancedness={b:.4f}, steps until the next rearrangement: 2880\n"
)


async def test_a_fifo_log_path_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "vllm.log"
    os.mkfifo(fifo)
    source = EplbLogSource("e", fifo)
    with pytest.raises(SourceError) as raised:
        await asyncio.wait_for(source.collect(Problems()), 5)
    assert raised.value.reason == "not_regular"


async def test_a_log_path_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "vllm.log"
    link.symlink_to("/dev/zero")
    source = EplbLogSource("e", link)
    with peak_memory(), pytest.raises(SourceError) as raised:
        await asyncio.wait_for(source.collect(Problems()), 5)
    assert raised.value.reason == "not_regular"


async def test_a_container_log_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "pods" / "0.log"
    real.parent.mkdir()
    real.write_text("")
    link = tmp_path / "vllm.log"  # /var/log/containers/*.log are symlinks like this
    link.symlink_to(real)
    source = EplbLogSource("e", link)
    await source.collect(Problems())
    with real.open("a") as stream:
        stream.write(LINE.format(step=1, b=0.5))
    assert (await source.collect(Problems())).balancedness == {"m": pytest.approx(0.5)}


async def test_a_line_without_newline_is_dropped_at_the_line_bound(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    source = EplbLogSource("e", log, max_bytes_per_cycle=64 * 1024, max_line_bytes=4096)
    await source.collect(Problems())
    problems = Problems()
    with peak_memory(8 * 1024 * 1024):
        for _ in range(40):  # 2.5 MiB without a newline, 64 KiB a cycle
            with log.open("a") as stream:
                stream.write("x" * 64 * 1024)
            await source.collect(problems)
        with log.open("a") as stream:
            stream.write("tail of the endless line\n" + LINE.format(step=2, b=0.25))
        result = await source.collect(problems)
    assert result.balancedness == {"m": pytest.approx(0.25)}  # following resumes after it
    assert problems.reasons == {"line_too_long": 1}  # one endless line, counted once
    assert len(source._partial) <= 4096


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunks=st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_appended_never_escape(tmp_path: Path, chunks: list[bytes]) -> None:
    log = tmp_path / "h.log"
    log.write_bytes(b"")
    source = EplbLogSource("e", log, max_line_bytes=256)

    async def run() -> None:
        await source.collect(Problems())
        for chunk in chunks:
            with log.open("ab") as stream:
                stream.write(chunk)
            result = await source.collect(Problems())
            assert all(0.0 <= v <= 1.0 for v in result.balancedness.values())
        assert len(source._partial) <= 256

    asyncio.run(run())


async def test_a_complete_line_past_the_line_limit_is_dropped_and_counted(tmp_path: Path) -> None:
    # Found by the adversary: only a partial line was held to LOG_LINE_BYTES; a line past it that
    # arrived whole with its newline was parsed and its model kept.
    log = tmp_path / "vllm.log"
    log.write_text("")
    source = EplbLogSource("e", log)
    await source.collect(Problems())  # starts at the end of the file
    line = (
        "EPLB step: 1 for model {model}: avg_tokens=1.0, max_tokens=2, balancedness=0.5, "
        "steps until the next rearrangement: 9"
    )
    long = line.format(model="long") + " " * limits.LOG_LINE_BYTES
    with log.open("a") as stream:
        stream.write(long + "\n" + line.format(model="good") + "\n")
    problems = Problems()
    balance = await source.collect(problems)
    assert set(balance.balancedness) == {"good"}
    assert problems.reasons == {"line_too_long": 1}
