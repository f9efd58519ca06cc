"""The plugin's per-worker counts file: atomic round trip, and rejection of anything else."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from moe_watch.expert_file import (
    FORMAT,
    SUFFIX,
    All2AllTimes,
    CountsFile,
    StepCoverage,
    counts_file_name,
    read_counts_file,
    write_counts_file,
)


def sample(**overrides: object) -> CountsFile:
    base = CountsFile(
        pid=4242,
        started=1_700_000_000.5,
        updated=1_700_000_060.25,
        model="mixtral",
        top_k=2,
        num_experts=4,
        layers=[0, 1, 3],
        counts=[[4, 3, 2, 1], [0, 0, 0, 0], [10, 0, 0, 10]],
        vllm_version="0.32.0",
        dp_rank=1,
        tp_rank=0,
        pp_rank=1,
        ep_rank=3,
        ep_size=4,
        sequence_parallel=True,
        placement=[0, 1, 2, 3],
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / counts_file_name("node-a", 4242)
    assert path.name == "node-a-4242" + SUFFIX
    write_counts_file(path, sample())
    assert read_counts_file(path) == sample()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (
        stat.S_IMODE(path.stat().st_mode) == 0o644
    )  # readable by an agent running as another user
    # Rewriting replaces the file as a whole.
    write_counts_file(path, sample(counts=[[5, 3, 2, 1], [0, 0, 0, 0], [10, 0, 0, 10]]))
    assert read_counts_file(path).counts[0] == [5, 3, 2, 1]


def test_a_failed_write_keeps_the_previous_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    write_counts_file(path, sample())
    with pytest.raises(TypeError):  # not JSON-serialisable: fails half-way through json.dump
        write_counts_file(path, sample(model=object()))  # type: ignore[arg-type]
    assert read_counts_file(path) == sample()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_defaults_are_one_process_with_no_parallelism(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    minimal = {
        "format": FORMAT,
        "pid": 1,
        "started": 1.0,
        "updated": 2,
        "model": "m",
        "top_k": 1,
        "num_experts": 2,
        "layers": [5],
        "counts": [[1, 0]],
    }
    path.write_text(json.dumps(minimal))
    data = read_counts_file(path)
    assert (data.dp_rank, data.tp_rank, data.pp_rank, data.ep_rank, data.ep_size) == (0, 0, 0, 0, 1)
    assert (data.sequence_parallel, data.placement, data.vllm_version) == (False, [], "")


def test_fields_a_newer_plugin_adds_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    path.write_text(json.dumps({**asdict(sample()), "something_new": {"x": 1}}))
    assert read_counts_file(path) == sample()


def mutated(**changes: object) -> str:
    raw = asdict(sample())
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "unreadable"),
        ('{"format": "moe-watch-expert-counts/1", "pid": 1, "coun', "unreadable"),  # partial
        ("\xff\xfe", "unreadable"),
        ("[1, 2, 3]", "not a moe-watch-expert-counts/1 file"),
        ('{"format": "something-else"}', "not a moe-watch-expert-counts/1 file"),
        (mutated(format="moe-watch-expert-counts/2"), "not a moe-watch-expert-counts/1 file"),
        (mutated(counts=KeyError, layers=KeyError), "missing layers, counts"),
        (mutated(counts=[[1, 2, 3, 4]]), "one row per layer"),
        (mutated(counts=[[1, 2, 3]] * 3), "not 4 non-negative integers"),
        (mutated(counts=[[1, 2, 3, -1]] * 3), "not 4 non-negative integers"),
        (mutated(counts=[[1, 2, 3, 1.5]] * 3), "not 4 non-negative integers"),
        (mutated(counts=[[1, 2, 3, True]] * 3), "not 4 non-negative integers"),
        (mutated(counts="1,2,3"), "one row per layer"),
        (mutated(top_k=5), "top_k 5 does not fit 4 experts"),
        (mutated(top_k=0), "top_k 0 does not fit"),
        (mutated(top_k="2"), "top_k is not a non-negative integer"),
        (mutated(pid=-1), "pid is not a non-negative integer"),
        (mutated(ep_size=0), "ep_size is not a positive integer"),
        (mutated(updated="now"), "updated is not a number"),
        (mutated(started=None), "started is not a number"),
        (mutated(model=3), "must be strings"),
        (mutated(layers=[0, 1, 1]), "listed twice"),
        (mutated(layers=[0, -1, 2]), "not a list of layer indices"),
        (mutated(sequence_parallel="yes"), "not a boolean"),
        (mutated(placement=[0, 1, 2]), "placement must give each of the 4 experts"),
        (mutated(placement=[0, 1, 2, 4]), "an EP rank below 4"),
        (mutated(placement={"0": 1}), "placement is not a list"),
    ],
)
def test_rejects_malformed_partial_and_alien_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / ("w" + SUFFIX)
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ValueError, match=message):
        read_counts_file(path)


def test_a_vanished_file_is_not_a_malformed_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_counts_file(tmp_path / ("gone" + SUFFIX))


def test_a_directory_or_unreadable_path_is_malformed(tmp_path: Path) -> None:
    directory = tmp_path / ("dir" + SUFFIX)
    directory.mkdir()
    with pytest.raises(ValueError, match="unreadable"):
        read_counts_file(directory)
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / ("w" + SUFFIX)
        write_counts_file(path, sample())
        path.chmod(0)
        with pytest.raises(ValueError, match="unreadable"):
            read_counts_file(path)


# --- the optional all2all histogram -----------------------------------------------------

A2A = All2AllTimes(
    bounds=[0.005, 0.02],
    buckets=[3, 1, 1],
    count=5,
    sum=0.071,
    backend="allgather_reducescatter",
    method="perf_counter",
    sample_every=1,
    exchanges=20,
)


def test_all2all_times_round_trip_and_are_absent_by_default(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    write_counts_file(path, sample(all2all=A2A))
    assert read_counts_file(path).all2all == A2A
    write_counts_file(path, sample())
    assert read_counts_file(path).all2all is None
    # A file of a plugin from before the all2all key (no key at all) reads the same.
    raw = asdict(sample())
    del raw["all2all"]
    path.write_text(json.dumps(raw))
    assert read_counts_file(path) == sample()


def test_unknown_all2all_fields_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    path.write_text(mutated(all2all={**asdict(A2A), "per_layer": [1, 2]}))
    assert read_counts_file(path).all2all == A2A


def a2a(**changes: object) -> dict[str, object]:
    raw = asdict(A2A)
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "all2all is not an object"),
        (a2a(sum=KeyError), "all2all misses sum"),
        (a2a(bounds=[]), "bounds are not increasing"),
        (a2a(bounds=[0.02, 0.005]), "bounds are not increasing"),
        (a2a(bounds=[0.005, 0.005]), "bounds are not increasing"),
        (a2a(bounds=[0, 0.02]), "bounds are not increasing"),
        (a2a(bounds=[0.005, "inf"]), "bounds are not increasing"),
        (a2a(buckets=[3, 1]), "buckets are not 3 non-negative integers"),
        (a2a(buckets=[3, 1, -1], count=3), "buckets are not 3"),
        (a2a(buckets=[3, 1, 1.0]), "buckets are not 3"),
        (a2a(count=4), "count is not the sum of its buckets"),
        (a2a(count=True), "count is not the sum"),
        (a2a(sum=-0.1), "sum is not a non-negative number"),
        (a2a(sum="0.07"), "sum is not a non-negative number"),
        (a2a(backend=None), "backend and method must be strings"),
        (a2a(sample_every=0), "sample_every is not a valid integer"),
        (a2a(exchanges=-1), "exchanges is not a valid integer"),
    ],
)
def test_a_malformed_all2all_histogram_makes_the_file_invalid(
    tmp_path: Path, value: object, message: str
) -> None:
    path = tmp_path / ("w" + SUFFIX)
    path.write_text(mutated(all2all=value))
    with pytest.raises(ValueError, match=message):
        read_counts_file(path)


# --- the optional coverage per step ------------------------------------------------------------

BINS = [2**b for b in range(12)]


def coverage(**changes: object) -> StepCoverage:
    """3 layers: a 1-token step reaching 2 experts everywhere; two 5-token steps (bin 4)."""
    steps, tokens = [0] * 12, [0] * 12
    steps[0], tokens[0], steps[2], tokens[2] = 1, 1, 2, 9
    distinct = [[0, 0, 0] for _ in BINS]
    distinct[0], distinct[2] = [2, 2, 2], [7, 4, 8]
    base = StepCoverage(bins=BINS, steps=steps, tokens=tokens, distinct=distinct, sample_every=4)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_coverage_round_trips_and_files_without_it_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / ("w" + SUFFIX)
    write_counts_file(path, sample(coverage=coverage()))
    assert read_counts_file(path).coverage == coverage()
    raw = asdict(sample())
    del raw["coverage"]  # a plugin from before coverage: no key at all
    path.write_text(json.dumps(raw))
    assert read_counts_file(path) == sample()
    path.write_text(mutated(coverage={**asdict(coverage()), "per_expert": [1]}))
    assert read_counts_file(path).coverage == coverage()  # unknown fields ignored


def bad_rows(bin_index: int, row: list[int]) -> list[list[int]]:
    rows = [list(r) for r in coverage().distinct]
    rows[bin_index] = row
    return rows


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1], "coverage is not an object"),
        ({**asdict(coverage()), "steps": KeyError}, "coverage misses steps"),
        (asdict(coverage(bins=BINS[:-1])), "not the 12 power-of-two bins"),
        (asdict(coverage(bins=[float(b) for b in BINS])), "not the 12 power-of-two bins"),
        (asdict(coverage(sample_every=0)), "sample_every is not a positive integer"),
        (asdict(coverage(steps=[1] * 11)), "steps is not one integer per bin"),
        (asdict(coverage(steps=[-1] + [0] * 11)), "steps is not one integer per bin"),
        (asdict(coverage(tokens="many")), "tokens is not one integer per bin"),
        (asdict(coverage(distinct=[[0, 0, 0]] * 11)), "one row per bin"),
        (asdict(coverage(distinct=bad_rows(0, [2, 2]))), "not 3 integers"),
        (asdict(coverage(distinct=bad_rows(0, [2, 2, 1.5]))), "not 3 integers"),
        (asdict(coverage(tokens=[1] + [0] * 11)), "tokens of bin 4 do not fit its steps"),
        (asdict(coverage(tokens=[2] + [0, 9] + [0] * 9)), "tokens of bin 1 do not fit"),
        (asdict(coverage(distinct=bad_rows(0, [2, 3, 2]))), "above what its steps allow"),
        (asdict(coverage(distinct=bad_rows(2, [9, 4, 8]))), "above what its steps allow"),
        (asdict(coverage(distinct=bad_rows(5, [1, 0, 0]))), "above what its steps allow"),
    ],
)
def test_a_malformed_coverage_drops_only_the_coverage_and_says_why(
    tmp_path: Path, value: object, message: str
) -> None:
    path = tmp_path / ("w" + SUFFIX)
    raw = json.loads(mutated())
    raw["coverage"] = value
    if isinstance(value, dict) and value.get("steps") is KeyError:
        raw["coverage"] = {k: v for k, v in value.items() if k != "steps"}
    path.write_text(json.dumps(raw))
    dropped: list[str] = []
    data = read_counts_file(path, dropped=dropped)
    assert data == sample()  # the counts and everything else are read
    assert len(dropped) == 1
    assert message in dropped[0]
    assert path.name in dropped[0]
    assert read_counts_file(path) == sample()  # without a list to report into: still read
