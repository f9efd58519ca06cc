"""Hostile SGLang recorder dumps (.pt and CSV): each is refused with a reason, removed from the
queue, and never costs the counts of the good dumps around it or more than a bounded amount of
memory. The queue never jams: a bad file is consumed like a good one."""

from __future__ import annotations

import asyncio
import math
import os
import struct
import zipfile
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_watch import limits
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.expert_sglang import SGLangExpertSource, read_recorder_file
from moe_watch.sources.safe_io import FileRejected
from tests.hostile.conftest import (
    _global,
    _str,
    _tuple,
    floats,
    peak_memory,
    tensor_opcodes,
    write_pt,
)


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def entries(directory: Path) -> list[Path]:
    return [directory / name for name in names(directory)]


def assert_refused_or_sane(path: Path) -> None:
    """A dump is either refused with a known reason or gives finite, non-negative counts."""
    from moe_watch.sources.expert_sglang import read_recorder_file

    reason = None
    matrix: list[list[float]] = []
    try:
        matrix = read_recorder_file(path)
    except FileRejected as exc:
        reason = exc.reason
    assert reason in {None, "bad_file", "bad_value", "too_large"}
    assert all(math.isfinite(x) and x >= 0 for row in matrix for x in row)


def good_pt(directory: Path, name: str = "good", value: float = 1.0) -> Path:
    """[1 pass, 2 layers, 4 experts] all ``value``."""
    return write_pt(
        directory / f"expert_distribution_recorder_{name}.pt",
        tensor_opcodes((1, 2, 4)),
        {"0": floats([value] * 8)},
    )


async def collect(
    url: str, directory: Path, **kwargs: int
) -> tuple[list[list[float]] | None, Problems, SourceError | None]:
    problems = Problems()
    async with aiohttp.ClientSession() as session:
        source = SGLangExpertSource("sg", url, directory, session, top_k=2, **kwargs)
        try:
            counts = await source.collect(problems)
        except SourceError as exc:
            return None, problems, exc
    return [list(row) for row in counts.counts], problems, None


def _bomb(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "archive/data.pkl",
            b"\x80\x02}" + _str("logical_count") + tensor_opcodes((1, 2, 4)) + b"s.",
        )
        archive.writestr("archive/data/0", b"\x00" * size)  # 16 MiB of zeros: ~16 KiB stored
    return path


# (name, writer, reason): every hostile .pt form the security review found, and neighbours.
PT_CASES: list[tuple[str, object, str]] = [
    (
        "nan",
        lambda p: write_pt(p, tensor_opcodes((1, 2, 4)), {"0": floats([math.nan] * 8)}),
        "bad_value",
    ),
    (
        "inf",
        lambda p: write_pt(p, tensor_opcodes((1, 2, 4)), {"0": floats([math.inf] + [1.0] * 7)}),
        "bad_value",
    ),
    (
        "negative",
        lambda p: write_pt(p, tensor_opcodes((1, 2, 4)), {"0": floats([-1.0] * 8)}),
        "bad_value",
    ),
    ("not_a_tensor", lambda p: write_pt(p, _str("hello")), "bad_file"),
    ("none", lambda p: write_pt(p, b"N"), "bad_file"),
    ("a_list", lambda p: write_pt(p, b"]"), "bad_file"),
    ("two_d", lambda p: write_pt(p, tensor_opcodes((2, 4)), {"0": floats([1.0] * 8)}), "bad_file"),
    (
        "string_storage_type",
        lambda p: write_pt(
            p,
            _global("torch._utils", "_rebuild_tensor_v2")
            + _tuple(
                [
                    _tuple(
                        [_str("storage"), _str("FloatStorage"), _str("0"), _str("cpu"), b"K\x08"]
                    )
                    + b"Q",
                    b"K\x00",
                    _tuple([b"K\x01", b"K\x02", b"K\x04"]),
                    _tuple([b"K\x08", b"K\x04", b"K\x01"]),
                    b"\x89",
                    b"N",
                ]
            )
            + b"R",
            {"0": floats([1.0] * 8)},
        ),
        "bad_file",
    ),
    (
        "stride_past_storage",
        lambda p: write_pt(
            p, tensor_opcodes((1, 2, 4), stride=(8, 4, 100)), {"0": floats([1.0] * 8)}
        ),
        "bad_file",
    ),
    (
        "offset_past_storage",
        lambda p: write_pt(p, tensor_opcodes((1, 2, 4), offset=5), {"0": floats([1.0] * 8)}),
        "bad_file",
    ),
    (
        "negative_stride",
        lambda p: write_pt(
            p, tensor_opcodes((1, 2, 4), stride=(8, -4, 1)), {"0": floats([1.0] * 8)}
        ),
        "bad_file",
    ),
    (
        "declares_30000x30000",
        lambda p: write_pt(p, tensor_opcodes((1, 30000, 30000)), {"0": floats([1.0] * 8)}),
        "too_large",  # past TENSOR_CELLS
    ),
    (
        "huge_matrix_real_storage",
        lambda p: write_pt(p, tensor_opcodes((1, 1, 300_000)), {"0": b"\x00" * 1_200_000}),
        "too_large",
    ),
    ("missing_storage", lambda p: write_pt(p, tensor_opcodes((1, 2, 4))), "bad_file"),
    (
        "odd_storage_bytes",
        lambda p: write_pt(p, tensor_opcodes((1, 2, 4)), {"0": b"\x00" * 7}),
        "bad_file",
    ),
    ("zip_bomb", lambda p: _bomb(p, 16 * 1024 * 1024), "too_large"),
    ("not_a_zip", lambda p: p.write_bytes(b"\x00garbage") and p, "bad_file"),
    ("empty", lambda p: p.write_bytes(b"") or p, "bad_file"),
]


@pytest.mark.parametrize(("name", "writer", "reason"), PT_CASES, ids=[c[0] for c in PT_CASES])
async def test_a_hostile_pt_dump_is_refused_counted_and_consumed(
    sglang_url: str, tmp_path: Path, name: str, writer: object, reason: str
) -> None:
    assert callable(writer)
    bad = writer(tmp_path / f"expert_distribution_recorder_0_{name}.pt")
    os.utime(bad, (1, 1))  # the oldest: read first, before the good dump
    good_pt(tmp_path)
    with peak_memory():
        counts, problems, error = await collect(sglang_url, tmp_path, max_member_bytes=1 << 20)
    assert error is None
    assert counts == [[1.0] * 4, [1.0] * 4]  # the good dump's counts survive the bad one
    assert problems.reasons == {reason: 1}
    assert names(tmp_path) == []  # both consumed: the queue does not jam


async def test_csv_rows_whose_sum_overflows_are_refused(sglang_url: str, tmp_path: Path) -> None:
    path = tmp_path / "expert_distribution_rank0_timestamp1.csv"
    path.write_text("layer_id,expert_id,count\n" + "0,0,1e308\n" * 3)
    os.utime(path, (1, 1))
    good_pt(tmp_path)
    counts, problems, error = await collect(sglang_url, tmp_path)
    assert error is None
    assert counts == [[1.0] * 4, [1.0] * 4]
    assert problems.reasons == {"bad_value": 1}


async def test_totals_never_overflow_across_dumps(sglang_url: str, tmp_path: Path) -> None:
    # each dump is finite, but a count beyond 2**53 is no count: refused before it is added
    for i in range(3):
        good_pt(tmp_path, f"big{i}", 3e38)
    counts, problems, error = await collect(sglang_url, tmp_path)
    assert error is not None
    assert error.reason == "no_data"
    assert problems.reasons == {"bad_value": 3}
    assert counts is None


async def test_special_files_never_block_and_are_refused(sglang_url: str, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "expert_distribution_recorder_fifo.pt")
    (tmp_path / "expert_distribution_recorder_zero.pt").symlink_to("/dev/zero")
    (tmp_path / "expert_distribution_rank0_timestamp9.csv").symlink_to("/dev/zero")
    (tmp_path / "expert_distribution_recorder_dir.pt").mkdir()
    for path in entries(tmp_path):
        os.utime(path, (1, 1), follow_symlinks=False)
    good_pt(tmp_path)
    with peak_memory():
        counts, problems, error = await asyncio.wait_for(collect(sglang_url, tmp_path), 10)
    assert error is None
    assert counts == [[1.0] * 4, [1.0] * 4]
    assert problems.reasons == {"not_regular": 2, "symlink": 2}
    # a directory cannot be consumed: it stays, and is not counted again next cycle
    assert names(tmp_path) == ["expert_distribution_recorder_dir.pt"]


async def test_a_flood_of_dumps_is_drained_a_bounded_batch_per_cycle(
    sglang_url: str, tmp_path: Path
) -> None:
    for i in range(25):
        good_pt(tmp_path, f"{i:03d}")
    problems = Problems()
    async with aiohttp.ClientSession() as session:
        source = SGLangExpertSource(
            "sg", sglang_url, tmp_path, session, top_k=2, max_files_per_cycle=10
        )
        first = await source.collect(problems)
        assert len(names(tmp_path)) == 15
        await source.collect(problems)
        last = await source.collect(problems)
    assert first.total == 10 * 8
    assert last.total == 25 * 8  # nothing lost, only deferred
    assert names(tmp_path) == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2048), deflate=st.booleans())
def test_arbitrary_bytes_in_a_dump_never_escape(tmp_path: Path, data: bytes, deflate: bool) -> None:

    path = tmp_path / "expert_distribution_recorder_x.pt"
    with zipfile.ZipFile(
        path, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    ) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}" + _str("logical_count") + data + b"s.")
        archive.writestr("archive/data/0", struct.pack("<8f", *([1.0] * 8)))
    assert_refused_or_sane(path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=400))
def test_arbitrary_csv_text_never_escapes(tmp_path: Path, text: str) -> None:

    path = tmp_path / "expert_distribution_rank0_timestamp1.csv"
    path.write_bytes(("layer_id,expert_id,count\n" + text).encode("utf-8", "surrogatepass"))
    assert_refused_or_sane(path)


def _cells_dump(
    path: Path,
    shape: tuple[int, int, int],
    stride: tuple[int, int, int] | None = None,
) -> Path:
    cells = shape[0] * shape[1] * shape[2]
    storage = b"\x00" if stride is not None and stride[0] == 0 else b"\x00" * cells
    return write_pt(
        path,
        tensor_opcodes(shape, storage="ByteStorage", stride=stride),
        {"0": storage},
        compression=zipfile.ZIP_DEFLATED,
    )


def test_a_tensor_past_its_cell_limit_is_refused_as_too_large(tmp_path: Path) -> None:
    from moe_watch.limits import TENSOR_CELLS
    from moe_watch.sources.expert_sglang import read_recorder_file

    # docs/limits.md names `too_large` for TENSOR_CELLS, like every other size bound of a dump
    path = _cells_dump(tmp_path / "expert_distribution_recorder_x.pt", (TENSOR_CELLS + 1, 1, 1))
    with pytest.raises(FileRejected) as refused:
        read_recorder_file(path)
    assert refused.value.reason == "too_large"


STRIDED_SECONDS = 3.0  # a whole tensor at the limit reads in ~0.6 s here


@pytest.mark.parametrize(
    ("shape", "stride"),
    [((1 << 24, 1, 1), (0, 1, 1)), ((1 << 14, 1 << 10, 1), (1, 1 << 14, 1))],
    ids=["every-pass-one-byte", "a-transposed-view"],
)
def test_a_strided_tensor_at_the_cell_limit_reads_in_bounded_time(
    tmp_path: Path, shape: tuple[int, int, int], stride: tuple[int, int, int]
) -> None:
    import time

    from moe_watch.limits import TENSOR_CELLS
    from moe_watch.sources.expert_sglang import read_recorder_file

    # A few hundred bytes declaring 2^24 cells through a stride: rebuilt one cell at a time it
    # took 14 s of the drain thread, and the cycle of every engine waits for that thread.
    assert shape[0] * shape[1] * shape[2] == TENSOR_CELLS
    path = _cells_dump(tmp_path / "expert_distribution_recorder_x.pt", shape, stride)
    started = time.monotonic()
    rows = read_recorder_file(path)
    took = time.monotonic() - started
    assert rows == [[0.0]] * shape[1]
    assert took < STRIDED_SECONDS, took


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_a_strided_view_is_rebuilt_cell_for_cell(shape: list[int], data: st.DataObject) -> None:
    from array import array

    from moe_watch.sources.torch_file import _rebuild_tensor

    stride = data.draw(st.lists(st.integers(0, 7), min_size=len(shape), max_size=len(shape)))
    offset = data.draw(st.integers(0, 3))
    reach = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    storage = array("f", [float(i) for i in range(reach + 1)])
    expected = []
    for index in range(math.prod(shape)):  # the definition, one cell at a time
        position, rest = offset, index
        for dim, step in zip(reversed(shape), reversed(stride), strict=True):
            rest, coordinate = divmod(rest, dim)
            position += coordinate * step
        expected.append(storage[position])
    tensor = _rebuild_tensor(storage, offset, tuple(shape), tuple(stride))
    assert list(tensor.values) == expected


def test_a_dump_at_the_file_limit_is_read_without_holding_the_file(tmp_path: Path) -> None:
    # Found by the adversary once its memory bound became the chart's (256 MiB): a 64 MiB
    # dump at DUMP_FILE_BYTES took the agent to 299 MiB, the file read whole and joined.
    path = tmp_path / "expert_distribution_recorder_big.pt"
    write_pt(path, tensor_opcodes((1, 2, 4)), {"0": floats([1.0] * 8)})
    pad = limits.DUMP_FILE_BYTES - path.stat().st_size - 200
    write_pt(path, tensor_opcodes((1, 2, 4)), {"0": floats([1.0] * 8), "pad": b"\0" * pad})
    assert limits.DUMP_FILE_BYTES - 1024 < path.stat().st_size <= limits.DUMP_FILE_BYTES
    with peak_memory(4 * 1024 * 1024):  # what it reads: data.pkl and one 32-byte storage
        rows = read_recorder_file(path)
    assert rows == [[1.0] * 4, [1.0] * 4]


def test_a_storage_at_the_member_limit_is_held_once(tmp_path: Path) -> None:
    # The storage's bytes, then an array made from them, then the tensor's slice: three copies
    # of a 64 MiB member. Now it is read into its array a MiB at a time.
    cells = limits.DUMP_MEMBER_BYTES // 4
    path = write_pt(
        tmp_path / "expert_distribution_recorder_wide.pt",
        tensor_opcodes((cells // 4096, 2, 2048)),
        {"0": b"\0" * (cells * 4)},
        compression=zipfile.ZIP_DEFLATED,
    )
    with peak_memory(limits.DUMP_MEMBER_BYTES * 5 // 4):
        rows = read_recorder_file(path)
    assert len(rows) == 2
    assert len(rows[0]) == 2048
    assert sum(rows[0]) == 0
