"""Hostile files in a vLLM plugin directory: each is refused with a reason, the good files of the
same directory are still read, and no file costs more than a bounded amount of memory or blocks
a worker thread."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_watch.expert_file import SUFFIX, CountsFile, read_counts_file, write_counts_file
from moe_watch.sources.base import Problems
from moe_watch.sources.expert_plugin import PluginExpertSource
from moe_watch.sources.safe_io import FileRejected
from tests.hostile.conftest import peak_memory

NOW = 1_000.0


def good(directory: Path, pid: int = 1, dp_rank: int = 0) -> None:
    write_counts_file(
        directory / f"good-{pid}{SUFFIX}",
        CountsFile(
            pid=pid,
            started=NOW - 10,
            updated=NOW,
            model="m",
            top_k=2,
            num_experts=4,
            layers=[0, 1],
            counts=[[1, 2, 3, 4], [4, 3, 2, 1]],
            dp_rank=dp_rank,
        ),
    )


def raw(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": "moe-watch-expert-counts/1",
        "pid": 9,
        "started": NOW - 10,
        "updated": NOW,
        "model": "m",
        "top_k": 2,
        "num_experts": 4,
        "layers": [0],
        "counts": [[1, 1, 1, 1]],
        "dp_rank": 5,
    }
    base.update(changes)
    return base


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES: list[tuple[str, str, str]] = [
    ("deep_json", nested(100_000), "bad_file"),
    (
        "deep_json_in_a_field",
        json.dumps(raw())[:-1] + ', "extra": ' + nested(50_000) + "}",
        "bad_file",
    ),
    (
        "one_layer_of_2m_experts",
        json.dumps(raw(num_experts=2_000_000, counts=[[0] * 2_000_000])),
        "too_large",
    ),
    ("nan_started", json.dumps(raw(started=float("nan"))), "bad_file"),
    ("infinite_updated", json.dumps(raw(updated=float("inf"))), "bad_file"),
    ("huge_count", json.dumps(raw(counts=[[2**70, 1, 1, 1]])), "bad_file"),
    ("float_counts", json.dumps(raw(counts=[[1e308, 1, 1, 1]])), "bad_file"),
    ("top_level_array", "[]", "bad_file"),
    ("null", "null", "bad_file"),
    ("not_utf8", "\udcff", "bad_file"),
    (
        "many_layers",
        json.dumps(raw(num_experts=64, layers=list(range(3000)), counts=[[1] * 64] * 3000)),
        "too_large",
    ),
]


def write_case(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


async def collect(directory: Path, **kwargs: Any) -> tuple[float, Problems]:
    problems = Problems()
    source = PluginExpertSource("e", directory, clock=lambda: NOW, **kwargs)
    counts = await asyncio.wait_for(source.collect(problems), 10)
    return counts.total, problems


@pytest.mark.parametrize(("name", "text", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_a_hostile_plugin_file_is_refused_and_good_files_are_read(
    tmp_path: Path, name: str, text: str, reason: str
) -> None:
    good(tmp_path)
    write_case(tmp_path / f"{name}{SUFFIX}", text)
    with peak_memory():
        total, problems = await collect(tmp_path)
    assert total == 20  # the good file, untouched
    assert problems.reasons == {reason: 1}


def coverage(**changes: Any) -> dict[str, Any]:
    bins = [2**b for b in range(12)]
    base: dict[str, Any] = {
        "bins": bins,
        "steps": [1] + [0] * 11,
        "tokens": [1] + [0] * 11,
        "distinct": [[2]] + [[0]] * 11,
        "sample_every": 4,
    }
    base.update(changes)
    return base


COVERAGE_CASES: list[tuple[str, str]] = [
    ("many_rows", json.dumps(raw(coverage=coverage(distinct=[[0]] * 20_000)))),
    ("a_million_bins", json.dumps(raw(coverage=coverage(bins=list(range(1_000_000)))))),
    ("nan_steps", json.dumps(raw(coverage=coverage(steps=[float("nan")] + [0] * 11)))),
    ("huge_tokens", json.dumps(raw(coverage=coverage(tokens=[2**70] + [0] * 11)))),
    ("more_experts_than_exist", json.dumps(raw(coverage=coverage(distinct=[[99]] + [[0]] * 11)))),
    ("a_string", json.dumps(raw(coverage="all of them"))),
]


@pytest.mark.parametrize(("name", "text"), COVERAGE_CASES, ids=[c[0] for c in COVERAGE_CASES])
async def test_a_hostile_coverage_costs_only_the_coverage(
    tmp_path: Path, name: str, text: str
) -> None:
    good(tmp_path)
    write_case(tmp_path / f"{name}{SUFFIX}", text)
    with peak_memory():
        total, problems = await collect(tmp_path)
    assert total == 24  # the good file and the hostile file's counts (DP rank 5), both read
    assert problems.reasons == {"bad_coverage": 1}


async def test_a_coverage_nested_past_the_depth_limit_costs_the_file(tmp_path: Path) -> None:
    # Nesting is bounded for the whole document before any field is read (limits.JSON_DEPTH):
    # a coverage nested past it costs the file, like any other field would.
    good(tmp_path)
    deep = coverage(distinct=json.loads(nested(500)))
    write_case(tmp_path / f"deep{SUFFIX}", json.dumps(raw(coverage=deep)))
    with peak_memory():
        total, problems = await collect(tmp_path)
    assert total == 20  # the good file, untouched
    assert problems.reasons == {"bad_file": 1}


async def test_special_files_never_block_a_worker_thread(tmp_path: Path) -> None:
    good(tmp_path)
    os.mkfifo(tmp_path / f"fifo{SUFFIX}")  # open() without O_NONBLOCK would block for ever
    (tmp_path / f"zero{SUFFIX}").symlink_to("/dev/zero")  # 2.3 GB RSS before
    (tmp_path / f"dir{SUFFIX}").mkdir()
    with peak_memory():
        total, problems = await collect(tmp_path)
    assert total == 20
    assert problems.reasons == {"not_regular": 2, "symlink": 1}


async def test_a_file_over_the_byte_bound_is_not_read(tmp_path: Path) -> None:
    good(tmp_path)
    write_case(tmp_path / f"big{SUFFIX}", " " * 2048 + json.dumps(raw()))
    total, problems = await collect(tmp_path, max_file_bytes=1024)
    assert total == 20
    assert problems.reasons == {"too_large": 1}


async def test_a_directory_flooded_with_files_reads_a_bounded_number(tmp_path: Path) -> None:
    good(tmp_path)
    for i in range(30):  # stale junk: the live worker's file is the most recently written
        junk = tmp_path / f"junk-{i:02d}{SUFFIX}"
        junk.write_text("{}")
        os.utime(junk, (NOW - 100, NOW - 100))
    total, problems = await collect(tmp_path, max_files=8)
    assert total == 20
    assert problems.reasons == {"too_many_files": 1, "bad_file": 7}  # 8 files read in all


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    field=st.sampled_from(
        [
            "pid",
            "started",
            "updated",
            "model",
            "top_k",
            "num_experts",
            "layers",
            "counts",
            "placement",
            "ep_size",
            "dp_rank",
            "sequence_parallel",
            "format",
            "coverage",
        ]
    ),
)
def test_any_json_value_in_any_field_is_refused_or_sane(
    tmp_path: Path, value: Any, field: str
) -> None:
    path = tmp_path / f"h{SUFFIX}"
    path.write_text(json.dumps(raw(**{field: value})))
    reason = None
    try:
        data = read_counts_file(path)
    except FileRejected as exc:
        reason = exc.reason
    else:
        assert all(len(row) == data.num_experts for row in data.counts)
        assert all(0 <= c < 2**63 for row in data.counts for c in row)
        if data.coverage is not None:  # only a consistent one is kept
            assert all(len(row) == len(data.layers) for row in data.coverage.distinct)
    assert reason in {None, "bad_file", "too_large"}
