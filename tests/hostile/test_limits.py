"""Values past a declared limit (moe_watch/limits.py) are refused where they enter, with a
counted reason, and the good inputs next to them are still read: fields of a plugin file that
had no bound, an engine's files that together exceed what one file may hold, an SGLang refusal
with an endless body, a pod list of 50,000 pods, strings that become label values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from moe_watch import limits
from moe_watch.expert_file import SUFFIX
from moe_watch.serving.server import start_server
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.discovery import PodWatcher
from moe_watch.sources.eplb_log import EplbLogSource
from moe_watch.sources.expert_plugin import PluginExpertSource
from moe_watch.sources.expert_sglang import SGLangExpertSource
from moe_watch.sources.exposition import parse_engine_exposition
from moe_watch.sources.proc import ProcSource
from tests.hostile.conftest import peak_memory, sglang_recorder
from tests.hostile.test_plugin_files import NOW, collect, good, raw
from tests.sources.test_discovery import pod


def write(directory: Path, name: str, data: dict[str, Any]) -> None:
    (directory / f"{name}{SUFFIX}").write_text(json.dumps(data))


# -- plugin files: fields without a bound before -------------------------------------------------

FIELD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("ep_size_2_to_62", {"ep_size": 2**62}, "too_large"),
    ("ep_size_2_to_62_with_placement", {"ep_size": 2**62, "placement": [0, 1, 2, 2**61]}, "too_large"),
    ("ep_size_200000_on_4_experts", {"ep_size": 200_000}, "too_large"),
    ("ep_size_just_past", {"ep_size": limits.EP_RANKS + 1}, "too_large"),
    ("tp_rank_past_the_ranks", {"tp_rank": limits.EP_RANKS}, "bad_file"),
    ("ep_rank_2_to_62", {"ep_rank": 2**62}, "bad_file"),
    ("pid_2_to_62", {"pid": 2**62}, "bad_file"),
    ("layer_index_2_to_62", {"layers": [2**62]}, "bad_file"),
    ("experts_past_the_limit", {"num_experts": limits.EXPERTS_PER_LAYER + 1,
                                "counts": [[1] * (limits.EXPERTS_PER_LAYER + 1)]}, "too_large"),
    ("count_past_2_to_53", {"counts": [[2**53 + 1, 1, 1, 1]]}, "bad_file"),
    ("model_name_of_10k_chars", {"model": "m" * 10_000}, "bad_file"),
    ("vllm_version_of_10k_chars", {"vllm_version": "v" * 10_000}, "bad_file"),
    ("json_100_deep_in_an_extra_field", {"extra": json.loads("[" * 100 + "]" * 100)}, "bad_file"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "reason"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
async def test_a_field_past_its_limit_is_refused(
    tmp_path: Path, name: str, change: dict[str, Any], reason: str
) -> None:
    good(tmp_path)
    write(tmp_path, name, raw(**change))
    with peak_memory():
        total, problems = await collect(tmp_path)
    assert total == 20  # the good file, untouched
    assert problems.reasons == {reason: 1}


def stage(layers: range, experts: int, *, dp_rank: int = 0, pp_rank: int = 0) -> dict[str, Any]:
    return raw(
        num_experts=experts,
        layers=list(layers),
        counts=[[1] * experts] * len(layers),
        dp_rank=dp_rank,
        pp_rank=pp_rank,
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # two pipeline stages, each at the per-file cell limit: twice the limit joined
        (stage(range(0, 8), 16_384), stage(range(8, 16), 16_384, pp_rank=1)),
        # 600 + 600 layers, each file small
        (stage(range(0, 600), 2), stage(range(600, 1200), 2, pp_rank=1)),
    ],
    ids=["cells", "layers"],
)
async def test_an_engines_files_together_are_bounded(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    # Before: limits held per file only; 64 files at the per-file limit made 8M cells per engine.
    write(tmp_path, "stage-0", first)
    write(tmp_path, "stage-1", second)
    source = PluginExpertSource("e", tmp_path, clock=lambda: NOW)
    with pytest.raises(SourceError) as caught:
        await source.collect(Problems())
    assert caught.value.reason == "too_large"


async def test_stages_within_the_engine_limits_are_joined(tmp_path: Path) -> None:
    write(tmp_path, "stage-0", stage(range(0, 4), 8))
    write(tmp_path, "stage-1", stage(range(4, 8), 8, pp_rank=1))
    counts = await PluginExpertSource("e", tmp_path, clock=lambda: NOW).collect(Problems())
    assert counts.layers == tuple(range(8))


# -- SGLang: a refusal with an endless body --------------------------------------------------------


@pytest.fixture
async def endless_refusal() -> AsyncIterator[str]:
    async def refuse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(200_000):  # 13 GB: far more than the test waits for
                await response.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    async with sglang_recorder(refuse) as url:
        yield url


async def test_an_sglang_refusal_with_an_endless_body_is_read_to_a_bound(
    endless_refusal: str, tmp_path: Path
) -> None:
    # Before: response.text() read the whole body: RSS 2 -> 4 GB in 16 s.
    async with aiohttp.ClientSession() as session:
        source = SGLangExpertSource(
            "e", endless_refusal, tmp_path, session, top_k=2, timeout_seconds=10
        )
        with peak_memory(8 * 1024 * 1024), pytest.raises(SourceError) as caught:
            await asyncio.wait_for(source.collect(Problems()), 20)
    assert caught.value.reason == "recorder"
    assert "HTTP 500" in caught.value.message
    assert len(caught.value.message) < 600


# -- Kubernetes: a pod list of 50,000 annotated pods ------------------------------------------------


@pytest.fixture
async def flood_api() -> AsyncIterator[str]:
    items = [pod(f"p-{i:05d}", f"u-{i}", rv="90") for i in range(50_000)]
    body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": items})
    never = asyncio.Event()

    async def pods(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "1":
            response = web.StreamResponse()
            await response.prepare(request)
            await never.wait()
            return response
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/pods", pods)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield url
    never.set()
    await runner.cleanup()


async def test_a_pod_list_of_50k_pods_is_capped_counted_and_logged(
    flood_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: 50,001 targets, ~1 GB RSS and 20-49 s cycles.
    changes: list[int] = []
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(
            session, flood_api, "gpu-node-1", on_change=lambda t: changes.append(len(t))
        )
        await asyncio.wait_for(watcher.list(), 60)
    assert len(watcher.targets) == limits.TARGETS_PER_AGENT
    assert changes == [limits.TARGETS_PER_AGENT]
    assert watcher.errors["too_many_targets"] == 1
    kept = sorted(t.engine for t in watcher.targets.values())
    assert kept[0] == "llm/p-00000"  # first by namespace/pod: the same on every list
    assert kept[-1] == f"llm/p-{limits.TARGETS_PER_AGENT - 1:05d}"
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert "too_many_targets" in logged
    assert "49744" in logged  # how many were dropped


async def test_watch_events_past_the_target_cap_are_counted() -> None:
    watcher = PodWatcher(None, "http://127.0.0.1:1", "n", max_targets=2)  # type: ignore[arg-type]
    for i in range(4):
        watcher._apply({"type": "ADDED", "object": pod(f"p-{i}", f"u-{i}", rv=str(i + 1))})
    assert len(watcher.targets) == 2
    assert watcher.errors["too_many_targets"] == 2
    watcher._apply({"type": "DELETED", "object": pod("p-0", "u-0", rv="9")})
    watcher._apply({"type": "ADDED", "object": pod("p-5", "u-5", rv="10")})
    assert {t.pod for t in watcher.targets.values()} == {"p-1", "p-5"}


# -- strings that become label values; numbers that must be in range -------------------------------

VLLM_LINE = 'vllm:num_requests_running{{model_name="{model}"}} 1\n'
INFO_LINE = 'vllm:cache_config_info{{block_size="16",{extra}}} 1\n'


def test_a_model_name_past_the_label_limit_is_dropped_and_counted() -> None:
    text = VLLM_LINE.format(model="good") + VLLM_LINE.format(model="m" * 10_000)
    parsed = parse_engine_exposition(text, "vllm")
    assert [m.model for m in parsed.models] == ["good"]
    assert parsed.labels_dropped == 1


def test_info_labels_past_their_limits_are_dropped() -> None:
    many = ",".join(f'l{i}="v"' for i in range(200))
    text = VLLM_LINE.format(model="good") + INFO_LINE.format(extra=f'long="{"x" * 10_000}",' + many)
    parsed = parse_engine_exposition(text, "vllm")
    assert "long" not in parsed.info
    assert len(parsed.info) <= limits.INFO_LABELS
    assert parsed.info["block_size"] == "16"
    assert parsed.labels_dropped > 0


async def test_eplb_log_models_are_bounded(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("")
    source = EplbLogSource("e", log)
    await source.collect(Problems())  # starts at the end of the file
    line = (
        "EPLB step: 1 for model {model}: avg_tokens=1.0, max_tokens=2, balancedness=0.5, "
        "steps until the next rearrangement: 9\n"
    )
    with log.open("a") as stream:
        stream.write(line.format(model="m" * 10_000))
        for i in range(100):
            stream.write(line.format(model=f"model-{i}"))
    problems = Problems()
    balance = await source.collect(problems)
    assert len(balance.balancedness) == limits.MODELS_PER_ENGINE
    assert problems.reasons["label_too_long"] == 1
    assert problems.reasons["series_limit"] == 100 - limits.MODELS_PER_ENGINE


async def test_a_command_line_past_its_limit_is_not_used(tmp_path: Path) -> None:
    def process(pid: int, args: list[str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args))
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python) S 1 1 1")

    process(10, ["vllm", "serve", "m", "--max-num-seqs", "8"])
    process(11, ["vllm", "serve", "m", "--x", "y" * (limits.CMDLINE_BYTES + 1)])
    process(12, ["vllm", "serve", "m", *(["--x"] * (limits.CMDLINE_ARGS + 1))])
    problems = Problems()
    found = await ProcSource(lambda: [10, 11, 12], str(tmp_path)).collect(problems)
    assert found[10].server_cmdline is not None
    assert found[11].server_cmdline is None
    assert found[12].server_cmdline is None
    assert problems.reasons == {"too_large": 2}


def test_the_real_agent_refuses_unbounded_ranks_and_keeps_the_good_engine(
    tmp_path: Path,
) -> None:
    # Before: ep_size 2**62 pinned the event loop (healthz timed out, SIGTERM ignored), with a
    # placement it raised MemoryError out of the cycle; ep_size 200000 on an 8-expert model
    # exported 200,000 rank series.
    import time
    import urllib.request

    from tests.hostile.conftest import running_agent

    engines: dict[str, dict[str, Any]] = {
        "good": {"ep_size": 2},
        "huge": {"ep_size": 2**62, "placement": [0, 1, 2, 2**61]},
        "wide": {"ep_size": 200_000},
    }
    started = time.time() - 10

    def traffic(step: int) -> None:
        for name, change in engines.items():
            counts = [[step * (1 + e) for e in range(4)]]
            data = raw(started=started, updated=time.time() + 3600, counts=counts, **change)
            write(tmp_path / name, "w", data)

    targets = []
    for name in engines:
        directory = tmp_path / name
        directory.mkdir()
        targets.append(
            {"name": name, "url": "http://127.0.0.1:1", "experts": {"directory": str(directory)}}
        )
    traffic(1)
    settings = {"targets": targets, "interval_seconds": 0.5, "shutdown_timeout_seconds": 2.0}
    with running_agent(tmp_path, settings) as agent:
        agent.wait_for("source down")
        metrics = ""
        for step in range(2, 42):  # bounded: until the good engine's ranks are exported
            traffic(step)
            with urllib.request.urlopen(agent.url + "/healthz", timeout=2) as response:
                assert response.status == 200
            with urllib.request.urlopen(agent.url + "/metrics", timeout=2) as response:
                metrics = response.read().decode()
            if "moe_watch_expert_rank_load_ratio{" in metrics:
                break
            time.sleep(0.25)  # the next cycle
        ranks = [line for line in metrics.splitlines() if line.startswith("moe_watch_expert_rank")]
        assert ranks  # the good engine's two ranks
        assert all('engine="good"' in line for line in ranks)
        assert len(ranks) <= 4
        for source in ("experts:huge", "experts:wide"):
            assert any(
                line.startswith("moe_watch_collect_errors_total")
                and f'source="{source}"' in line
                and 'reason="too_large"' in line
                for line in metrics.splitlines()
            ), source
        assert agent.stop(2.0) < 3.5
