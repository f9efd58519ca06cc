"""Following vLLM's EPLB balancedness log lines like tail -F."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.eplb_log import EplbLogSource, parse_eplb_lines

LINE = (
    "(EngineCore_DP0 pid=4242) INFO 11-25 02:10:00 [eplb_state.py:633] EPLB step: {step} for model "
    "{model}: avg_tokens={avg:.2f}, max_tokens={peak}, balancedness={b:.4f}, steps until the next "
    "rearrangement: 2880\n"
)


def eplb(step: int, model: str, avg: float, peak: int) -> str:
    return LINE.format(step=step, model=model, avg=avg, peak=peak, b=avg / peak)


def test_parses_the_last_balancedness_per_model() -> None:
    text = (
        eplb(10, "mixtral", 1000.0, 2000) + "INFO unrelated\n" + eplb(20, "mixtral", 1500.0, 2000)
    )
    text += eplb(20, "draft", 90.0, 100)
    assert parse_eplb_lines(text) == {"mixtral": pytest.approx(0.75), "draft": pytest.approx(0.9)}
    assert parse_eplb_lines("EPLB step: x for model m: garbage\n") == {}


async def test_follows_appends_partial_lines_truncation_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text(eplb(1, "m", 100.0, 1000))  # before the agent started: not read
    source = EplbLogSource("e", log)
    assert (await source.collect(Problems())).balancedness == {}
    with log.open("a") as stream:
        whole = eplb(2, "m", 500.0, 1000)
        stream.write(whole + whole[:40])  # the engine is mid-way through writing a line
    assert (await source.collect(Problems())).balancedness == {"m": pytest.approx(0.5)}
    with log.open("a") as stream:
        stream.write(eplb(3, "m", 900.0, 1000)[40:])  # the same 40-char head, then step 3's tail
    # the head kept from the previous read joins the tail: one whole step-3 line
    assert (await source.collect(Problems())).balancedness == {"m": pytest.approx(0.9)}
    log.write_text(eplb(4, "m", 250.0, 1000))  # truncated (copytruncate rotation)
    assert (await source.collect(Problems())).balancedness == {"m": pytest.approx(0.25)}
    log.rename(tmp_path / "vllm.log.1")
    log.write_text(eplb(5, "m", 800.0, 1000))  # a new file under the old name
    assert (await source.collect(Problems())).balancedness == {"m": pytest.approx(0.8)}


async def test_a_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    source = EplbLogSource("e", tmp_path / "absent.log")
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    assert err.value.reason == "no_log"
    assert "absent.log" in err.value.message
