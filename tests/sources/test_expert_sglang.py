"""SGLang's expert-distribution recorder: real torch.save dumps, the old CSV form, the HTTP dance."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench.vllm_env import torch_python
from moe_watch.samples import matrix
from moe_watch.serving.server import start_server
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.expert_sglang import SGLangExpertSource, read_recorder_file
from moe_watch.sources.torch_file import TorchFileError, load_torch_file

# Written with real torch, exactly as SGLang's _StatAccumulator.dump does:
# torch.save(dict(rank=0, logical_count=<int32 [passes, layers, experts]>, average_utilization_rate_over_window=None))
WRITE_DUMPS = r"""
import json, sys, torch
out = sys.argv[1]
torch.manual_seed(0)
expected = {}
for name, dtype, passes in (("a", torch.int32, 3), ("b", torch.int32, 5), ("wide", torch.int64, 2)):
    count = torch.randint(0, 50, (passes, 4, 8), dtype=dtype)
    path = f"{out}/expert_distribution_recorder_{name}.pt"
    torch.save(dict(rank=0, logical_count=count, average_utilization_rate_over_window=None), path)
    expected[name] = count.sum(0).tolist()
# a non-contiguous view (what a transpose/slice would save)
view = torch.arange(2 * 8 * 4, dtype=torch.int32).reshape(2, 8, 4).transpose(1, 2)
torch.save(dict(rank=0, logical_count=view), f"{out}/expert_distribution_recorder_view.pt")
expected["view"] = view.sum(0).tolist()
json.dump(expected, open(f"{out}/expected.json", "w"))
"""


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[list[float]]]]:
    out = tmp_path_factory.mktemp("sglang-dumps")
    subprocess.run([str(torch_python()), "-c", WRITE_DUMPS, str(out)], check=True, timeout=600)
    return out, json.loads((out / "expected.json").read_text())


@pytest.mark.torch
def test_reads_real_torch_dumps_summed_over_passes(
    dumps: tuple[Path, dict[str, list[list[float]]]],
) -> None:
    directory, expected = dumps
    for name in ("a", "b", "wide", "view"):
        matrix = read_recorder_file(directory / f"expert_distribution_recorder_{name}.pt")
        assert matrix == expected[name], name
    meta = load_torch_file(directory / "expert_distribution_recorder_a.pt")
    assert meta["rank"] == 0
    assert meta["average_utilization_rate_over_window"] is None


def test_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("owned",))

    payload = io.BytesIO()
    pickle.dump({"logical_count": Evil()}, payload)
    path = tmp_path / "expert_distribution_recorder_evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload.getvalue())
    with pytest.raises(TorchFileError, match=r"refusing to load builtins\.print"):
        load_torch_file(path)
    not_zip = tmp_path / "expert_distribution_recorder_text.pt"
    not_zip.write_text("hello")
    with pytest.raises(TorchFileError, match=r"not a torch\.save zip file"):
        load_torch_file(not_zip)


def test_reads_the_old_per_rank_csv_form(tmp_path: Path) -> None:
    path = tmp_path / "expert_distribution_rank0_timestamp1744347750.3721356.csv"
    path.write_text("layer_id,expert_id,count\n3,0,24990\n3,18,39249\n1,2,7\n3,0,10\n")
    matrix = read_recorder_file(path, num_experts=32)
    assert len(matrix) == 4
    assert len(matrix[0]) == 32
    assert matrix[3][0] == 25000
    assert matrix[3][18] == 39249
    assert matrix[1][2] == 7
    assert sum(matrix[0]) == 0
    bad = tmp_path / "expert_distribution_rank1_timestamp1.csv"
    bad.write_text("layer,expert,n\n1,2,3\n")
    with pytest.raises(ValueError, match="expected the header"):
        read_recorder_file(bad)


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ("1,2,nan\n", "not a layer_id,expert_id,count row"),
        ("1,2,-5\n", "not a layer_id,expert_id,count row"),
        ("1,-2,5\n", "not a layer_id,expert_id,count row"),
        ("1,2,5,9\n", "not a layer_id,expert_id,count row"),  # an extra column
        ("1,2,5\x00\n", "not a layer_id,expert_id,count row"),
        ("1,40,5\n", "expert id is out of range"),
        ("90000000,2,5\n", "is not a real model"),  # corrupt id: no 90M-row matrix
    ],
)
def test_a_bad_csv_row_is_refused_with_its_reason(tmp_path: Path, rows: str, reason: str) -> None:
    path = tmp_path / "expert_distribution_rank0_timestamp1.csv"
    path.write_text("layer_id,expert_id,count\n0,0,1\n" + rows)
    with pytest.raises(ValueError, match=reason):
        read_recorder_file(path, num_experts=32)


class FakeSGLang:
    """The recorder endpoints of an SGLang server. Dumps copy real torch.save files into the
    recorder directory (SGLang writes them there itself); a dump before start fails like a
    server started without --expert-distribution-recorder-mode."""

    def __init__(self, directory: Path, dumps: list[Path]) -> None:
        self.directory = directory
        self.dumps = dumps
        self.recording = False
        self.starts = 0

    async def start(self, request: web.Request) -> web.Response:
        self.recording = True
        self.starts += 1
        return web.Response(text="Start recording the expert distribution successfully\n")

    async def dump(self, request: web.Request) -> web.Response:
        if not self.recording:
            return web.Response(
                status=400, text="Please set ServerArgs.expert_distribution_recorder_mode"
            )
        if self.dumps:
            source = self.dumps.pop(0)
            shutil.copy(source, self.directory / source.name)
        return web.Response(text="Dump expert distribution record successfully\n")


@pytest.fixture
async def fake_sglang(tmp_path: Path) -> AsyncIterator[tuple[FakeSGLang, str]]:
    fake = FakeSGLang(tmp_path / "recorder", [])
    fake.directory.mkdir()
    app = web.Application()
    app.router.add_post("/start_expert_distribution_record", fake.start)
    app.router.add_post("/dump_expert_distribution_record", fake.dump)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield fake, url
    await runner.cleanup()


@pytest.mark.torch
async def test_source_starts_recording_and_accumulates_dumps(
    fake_sglang: tuple[FakeSGLang, str], dumps: tuple[Path, dict[str, list[list[float]]]]
) -> None:
    fake, url = fake_sglang
    directory, expected = dumps
    fake.dumps = [
        directory / "expert_distribution_recorder_a.pt",
        directory / "expert_distribution_recorder_b.pt",
    ]
    async with aiohttp.ClientSession() as session:
        source = SGLangExpertSource(
            "qwen3", url, fake.directory, session, top_k=2, clock=lambda: 100.0
        )
        first = await source.collect(Problems())
        second = await source.collect(Problems())
    assert fake.starts == 1
    assert first.counts == matrix(expected["a"])
    summed = [
        [x + y for x, y in zip(ra, rb, strict=True)]
        for ra, rb in zip(expected["a"], expected["b"], strict=True)
    ]
    assert second.counts == matrix(summed)
    assert (second.top_k, second.num_experts, second.layers, second.source) == (
        2,
        8,
        (0, 1, 2, 3),
        "sglang",
    )
    assert list(fake.directory.iterdir()) == []  # dumps are consumed
    assert first.from_zero  # the recorder starts at zero: the first dump is traffic


async def test_a_server_that_lost_its_recording_is_restarted_and_bad_files_are_counted(
    fake_sglang: tuple[FakeSGLang, str],
) -> None:
    fake, url = fake_sglang
    async with aiohttp.ClientSession() as session:
        source = SGLangExpertSource("qwen3", url, fake.directory, session, top_k=8)
        with pytest.raises(SourceError) as empty:
            await source.collect(Problems())
        assert empty.value.reason == "no_data"
        fake.recording = False  # the SGLang server restarted
        with pytest.raises(SourceError) as lost:
            await source.collect(Problems())
        assert lost.value.reason == "dump"
        assert "--expert-distribution-recorder-mode" in lost.value.message
        (fake.directory / "expert_distribution_recorder_9.pt").write_bytes(b"\x00garbage")
        problems = Problems()
        with pytest.raises(SourceError):
            await source.collect(problems)  # recording restarted; the only dump is unreadable
    assert fake.starts == 2
    assert problems.reasons == {"bad_file": 1}
    assert not (fake.directory / "expert_distribution_recorder_9.pt").exists()
