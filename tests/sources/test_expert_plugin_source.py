"""Combining the vLLM plugin's per-worker files: TP de-duplicated, DP summed, PP joined."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moe_watch.expert_file import CountsFile, read_counts_file, write_counts_file
from moe_watch.samples import matrix
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.expert_plugin import PluginExpertSource

NOW = 10_000.0


def worker(**overrides: object) -> CountsFile:
    base = CountsFile(
        pid=100,
        started=NOW - 600,
        updated=NOW - 1,
        model="mixtral",
        top_k=2,
        num_experts=4,
        layers=[0, 1],
        counts=[[4, 3, 2, 1], [1, 1, 1, 1]],
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


async def collect(directory: Path) -> tuple[object, Problems]:
    problems = Problems()
    source = PluginExpertSource("mixtral-0", directory, clock=lambda: NOW)
    return await source.collect(problems), problems


def test_round_trip_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "w.experts.json"
    write_counts_file(path, worker())
    assert read_counts_file(path) == worker()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    for bad, message in (
        (worker(counts=[[1, 2, 3]]), "count rows"),
        (worker(counts=[[1, 2, 3, -1], [0, 0, 0, 0]]), "non-negative"),
        (worker(top_k=5), "top_k 5"),
    ):
        write_counts_file(path, bad)
        with pytest.raises(ValueError, match=message):
            read_counts_file(path)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a moe-watch-expert-counts/1 file"):
        read_counts_file(path)


async def test_tp_ranks_count_once_dp_ranks_add_up_pp_stages_join(tmp_path: Path) -> None:
    write_counts_file(tmp_path / "dp0-tp0.experts.json", worker(pid=1))
    write_counts_file(tmp_path / "dp0-tp1.experts.json", worker(pid=2, tp_rank=1))  # same tokens
    write_counts_file(
        tmp_path / "dp1-tp0.experts.json",
        worker(pid=3, dp_rank=1, counts=[[1, 1, 1, 1], [2, 0, 0, 0]]),
    )
    write_counts_file(
        tmp_path / "pp1.experts.json",
        worker(pid=4, pp_rank=1, layers=[2], counts=[[0, 0, 5, 5]], started=NOW - 5),
    )
    counts, problems = await collect(tmp_path)
    assert counts.layers == (0, 1, 2)  # type: ignore[attr-defined]
    assert counts.counts == matrix([[5, 4, 3, 2], [3, 1, 1, 1], [0, 0, 5, 5]])  # type: ignore[attr-defined]
    assert counts.started == NOW - 5  # type: ignore[attr-defined]
    assert not problems.reasons


async def test_stale_and_malformed_files_are_skipped_and_counted(tmp_path: Path) -> None:
    write_counts_file(tmp_path / "alive.experts.json", worker())
    write_counts_file(
        tmp_path / "dead.experts.json", worker(updated=NOW - 3600, counts=[[100] * 4] * 2)
    )
    (tmp_path / "broken.experts.json").write_text("{not json")
    counts, problems = await collect(tmp_path)
    assert counts.counts == matrix([[4, 3, 2, 1], [1, 1, 1, 1]])  # type: ignore[attr-defined]
    assert problems.reasons == {"bad_file": 1}


async def test_no_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        await collect(tmp_path / "missing")
    assert err.value.reason == "no_data"
    assert "MOE_WATCH_EXPERTS_DIR" in err.value.message
