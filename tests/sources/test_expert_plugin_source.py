"""Combining the vLLM plugin's per-worker files: TP de-duplicated, DP summed, PP joined."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moe_watch.expert_file import SUFFIX, CountsFile, StepCoverage, write_counts_file
from moe_watch.samples import ExpertCounts, matrix
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


def put(directory: Path, name: str, data: CountsFile) -> None:
    write_counts_file(directory / (name + SUFFIX), data)


async def collect(directory: Path, **kwargs: float) -> tuple[ExpertCounts, Problems]:
    problems = Problems()
    source = PluginExpertSource("mixtral-0", directory, clock=lambda: NOW, **kwargs)
    assert source.name == "experts:mixtral-0"
    counts = await source.collect(problems)
    await source.close()
    return counts, problems


async def test_one_worker_is_read_as_written(tmp_path: Path) -> None:
    put(tmp_path, "w", worker(ep_size=2, placement=[0, 1, 1, 0]))
    counts, problems = await collect(tmp_path)
    assert counts == ExpertCounts(
        engine="mixtral-0",
        model="mixtral",
        top_k=2,
        num_experts=4,
        layers=(0, 1),
        counts=matrix([[4, 3, 2, 1], [1, 1, 1, 1]]),
        started=NOW - 600,
        ep_size=2,
        placement=(0, 1, 1, 0),
        source="plugin",
    )
    assert not problems.reasons


async def test_tp_ranks_count_once_dp_ranks_add_up_pp_stages_join(tmp_path: Path) -> None:
    # DP rank 0: TP ranks 0 and 1 route the same tokens (only rank 0 counts).
    put(tmp_path, "dp0-tp0", worker(pid=1))
    put(tmp_path, "dp0-tp1", worker(pid=2, tp_rank=1, counts=[[9, 9, 9, 9], [9, 9, 9, 9]]))
    # DP rank 1 routes other tokens: added.
    put(tmp_path, "dp1-tp0", worker(pid=3, dp_rank=1, counts=[[1, 1, 1, 1], [2, 0, 0, 0]]))
    # A second pipeline stage holds layer 2: joined; it restarted more recently.
    put(
        tmp_path,
        "pp1",
        worker(pid=4, pp_rank=1, layers=[2], counts=[[0, 0, 5, 5]], started=NOW - 5),
    )
    counts, problems = await collect(tmp_path)
    assert counts.layers == (0, 1, 2)
    assert counts.counts == matrix([[5, 4, 3, 2], [3, 1, 1, 1], [0, 0, 5, 5]])
    assert counts.started == NOW - 5  # one worker restarting resets the set
    assert not problems.reasons


async def test_sequence_parallel_tp_shards_add_up(tmp_path: Path) -> None:
    # DP + EP + TP with sequence-parallel MoE: each TP rank routes its own shard.
    for tp_rank, row in enumerate(([1, 0, 0, 1], [0, 2, 0, 0])):
        put(
            tmp_path,
            f"tp{tp_rank}",
            worker(
                pid=10 + tp_rank, tp_rank=tp_rank, sequence_parallel=True, layers=[0], counts=[row]
            ),
        )
    counts, _ = await collect(tmp_path)
    assert counts.counts == matrix([[1, 2, 0, 1]])


async def test_a_restarted_workers_leftover_file_is_not_added(tmp_path: Path) -> None:
    # Killed (no clean-up) 20 s ago, still inside the stale window, and its successor.
    put(tmp_path, "old", worker(pid=1, started=NOW - 900, updated=NOW - 20, counts=[[50] * 4] * 2))
    put(tmp_path, "new", worker(pid=2, started=NOW - 10))
    counts, _ = await collect(tmp_path)
    assert counts.counts == matrix([[4, 3, 2, 1], [1, 1, 1, 1]])
    assert counts.started == NOW - 10


async def test_stale_and_malformed_files_are_skipped_and_counted(tmp_path: Path) -> None:
    put(tmp_path, "alive", worker(pid=1))
    put(tmp_path, "dead", worker(pid=2, dp_rank=1, updated=NOW - 3600, counts=[[100] * 4] * 2))
    (tmp_path / ("broken" + SUFFIX)).write_text("{not json")
    (tmp_path / ("alien" + SUFFIX)).write_text('{"format": "other/1"}')
    (tmp_path / (".tmp-abc" + SUFFIX)).write_text("{half")  # a write in progress: not read
    (tmp_path / "notes.txt").write_text("not ours")
    counts, problems = await collect(tmp_path)
    assert counts.counts == matrix([[4, 3, 2, 1], [1, 1, 1, 1]])
    assert problems.reasons == {"bad_file": 2}


async def test_the_stale_limit_is_configurable(tmp_path: Path) -> None:
    put(tmp_path, "w", worker(updated=NOW - 30))
    counts, _ = await collect(tmp_path, stale_after_seconds=60.0)
    assert list(counts.counts[0]) == [4, 3, 2, 1]
    with pytest.raises(SourceError):
        await collect(tmp_path, stale_after_seconds=10.0)


async def test_files_of_another_model_are_left_out_and_reported(tmp_path: Path) -> None:
    put(tmp_path, "mixtral", worker(pid=1, updated=NOW - 1))
    put(
        tmp_path,
        "other",
        worker(
            pid=2, dp_rank=1, model="qwen", num_experts=8, counts=[[1] * 8] * 2, updated=NOW - 2
        ),
    )
    counts, problems = await collect(tmp_path)
    assert (counts.model, counts.num_experts) == ("mixtral", 4)
    assert counts.counts == matrix([[4, 3, 2, 1], [1, 1, 1, 1]])
    assert problems.reasons == {"mixed_models": 1}


@pytest.mark.parametrize("layout", ["missing", "empty", "only-stale", "only-bad", "only-tp1"])
async def test_no_usable_file_is_a_clear_error(tmp_path: Path, layout: str) -> None:
    directory = tmp_path / "experts"
    if layout != "missing":
        directory.mkdir()
    if layout == "only-stale":
        put(directory, "w", worker(updated=NOW - 3600))
    elif layout == "only-bad":
        (directory / ("w" + SUFFIX)).write_text("[]")
    elif layout == "only-tp1":
        put(directory, "w", worker(tp_rank=1))
    problems = Problems()
    with pytest.raises(SourceError) as err:
        await PluginExpertSource("m", directory, clock=lambda: NOW).collect(problems)
    assert err.value.reason == "no_data"
    assert str(directory) in err.value.message
    assert "MOE_WATCH_EXPERTS_DIR" in err.value.message
    assert problems.reasons == ({"bad_file": 1} if layout == "only-bad" else {})


# --- expert coverage per step -------------------------------------------------------------------


def step_coverage(
    layers: int, distinct: dict[int, list[int]], steps: dict[int, int]
) -> StepCoverage:
    bins = [2**b for b in range(12)]
    tokens = {b: n * (1 if b == 0 else b) for b, n in steps.items()}  # steps of exactly b tokens
    return StepCoverage(
        bins=bins,
        steps=[steps.get(b, 0) for b in bins],
        tokens=[tokens.get(b, 0) for b in bins],
        distinct=[distinct.get(b, [0] * layers) for b in bins],
        sample_every=4,
    )


async def test_coverage_adds_up_over_dp_ranks_and_joins_pipeline_stages(tmp_path: Path) -> None:
    # DP rank 0 and 1 of stage 0 (layers 0, 1) count their own steps; stage 1 (layer 2) runs
    # DP rank 0's steps again.
    put(tmp_path, "dp0", worker(coverage=step_coverage(2, {4: [6, 4]}, {4: 2})))
    put(tmp_path, "dp1", worker(pid=101, dp_rank=1, coverage=step_coverage(2, {4: [3, 4]}, {4: 1})))
    put(
        tmp_path,
        "pp1",
        worker(
            pid=102,
            pp_rank=1,
            layers=[2],
            counts=[[1, 1, 1, 1]],
            coverage=step_coverage(1, {4: [8]}, {4: 3}),
        ),
    )
    counts, problems = await collect(tmp_path)
    assert counts.coverage is not None
    assert counts.layers == (0, 1, 2)
    assert (counts.coverage.steps[2], counts.coverage.tokens[2]) == (3.0, 12.0)
    assert list(counts.coverage.distinct[2]) == [9.0, 8.0, 8.0]
    assert counts.coverage.sample_every == 4
    assert not problems.reasons


async def test_no_engine_coverage_while_one_worker_does_not_measure_it(tmp_path: Path) -> None:
    put(tmp_path, "dp0", worker(coverage=step_coverage(2, {4: [6, 4]}, {4: 2})))
    put(tmp_path, "dp1", worker(pid=101, dp_rank=1))  # an older plugin, mid-rollout
    counts, _ = await collect(tmp_path)
    assert counts.coverage is None
    assert counts.counts == matrix([[8, 6, 4, 2], [2, 2, 2, 2]])


async def test_a_malformed_coverage_is_counted_and_costs_nothing_else(tmp_path: Path) -> None:
    put(tmp_path, "w", worker(coverage=step_coverage(2, {4: [6, 4]}, {4: 2})))
    path = tmp_path / ("w" + SUFFIX)
    raw = json.loads(path.read_text())
    raw["coverage"]["distinct"][2] = [999, 4]  # more experts than 2 steps of 4 can reach
    path.write_text(json.dumps(raw))
    counts, problems = await collect(tmp_path)
    assert problems.reasons == {"bad_coverage": 1}
    assert counts.coverage is None
    assert counts.counts == matrix([[4, 3, 2, 1], [1, 1, 1, 1]])
