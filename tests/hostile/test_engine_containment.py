"""One engine's hostile values stay in that engine: a neighbour's command line on its GPU, an
absurd max_model_len from its /v1/models. The agent keeps running, the other engines' and the
GPUs' series stay in /metrics, and the refusal is counted under the engine's source."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.agent import Agent
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.serving.service import serve
from tests.conftest import EngineStub, read_capture, read_models

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def engines_with(samples: Samples, name: str) -> set[str]:
    return {dict(labels)["engine"] for metric, labels in samples if metric == name}


@pytest.fixture
def neighbour() -> Iterator[Any]:
    """Start a real process whose command line reads like a vLLM server's, with ``args``."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> int:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()", "vllm", "serve", "m", *args],
            stdin=subprocess.PIPE,
        )
        started.append(process)
        return process.pid

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
async def two_engines() -> AsyncIterator[tuple[EngineStub, EngineStub]]:
    good = await EngineStub(read_capture("after-load")).start()
    bad = await EngineStub(read_capture("after-load")).start()
    yield good, bad
    await good.stop()
    await bad.stop()


async def serve_and_scrape(
    settings: Any, nvml: FakeNvml, cycles: int = 3
) -> tuple[str, dict[str, Any]]:
    """Run the real service (agent + HTTP server) for ``cycles`` cycles; /metrics and /status."""
    stop = asyncio.Event()
    seen: dict[str, Any] = {}

    async def started(url: str, agent: Agent) -> None:
        await asyncio.wait_for(agent.wait_for_cycle(cycles), timeout=30)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/metrics") as response:
                seen["status"] = response.status
                seen["metrics"] = await response.text()
            async with client.get(url + "/status") as response:
                seen["doc"] = await response.json()
        stop.set()

    await asyncio.wait_for(serve(settings, stop=stop, nvml=nvml, on_started=started), timeout=60)
    assert seen.get("status") == 200
    return seen["metrics"], seen["doc"]


@pytest.mark.parametrize("value", ["nan", "1e400", "inf", "0", "8.5", "99999999999999999999"])
async def test_a_neighbours_max_num_seqs_does_not_stop_the_agent(
    two_engines: tuple[EngineStub, EngineStub], neighbour: Any, value: str
) -> None:
    # Before: drift's int(float(value)) raised inside the cycle; serve() ended with the
    # exception and `moe-watch run` exited 1.
    good, bad = two_engines
    pid = neighbour("--max-num-seqs", value, "--gpu-memory-utilization", value)
    nvml = FakeNvml.with_gpus(2)
    nvml.gpus[1].pids = [pid]
    settings = load_settings(
        None,
        targets=[
            {"name": "good", "url": good.url, "gpus": [0]},
            {"name": "bad", "url": bad.url, "gpus": [1]},
        ],
        listen="127.0.0.1:0",
        interval_seconds=0.05,
    )
    text, doc = await serve_and_scrape(settings, nvml)
    samples = parse(text)
    assert engines_with(samples, "moe_watch_engine_info") == {"good", "bad"}
    assert {dict(labels)["gpu"] for name, labels in samples if name == "moe_watch_gpu_up"} == {
        "0",
        "1",
    }
    # Drift is still checked for the engine, without the refused values.
    drift = {
        dict(labels)["setting"]: v
        for (name, labels), v in samples.items()
        if name == "moe_watch_config_drift" and dict(labels)["engine"] == "bad"
    }
    assert drift["max_num_seqs"] == 0.0
    errors = next(s for s in doc["sources"] if s["source"] == "engine:bad")["errors_total"]
    assert errors.get("bad_value", 0) >= 1
    good_errors = next(s for s in doc["sources"] if s["source"] == "engine:good")["errors_total"]
    assert good_errors == {}


async def test_a_310_digit_max_model_len_blanks_no_engine_and_no_gpu(
    two_engines: tuple[EngineStub, EngineStub],
) -> None:
    # Before: /v1/models' 1 followed by 309 zeros went into the snapshot as an int, the text
    # encoder's float() overflowed, and /metrics answered 200 with an empty body for everyone.
    good, bad = two_engines
    models = read_models()
    models["data"][0]["max_model_len"] = 10**309
    bad.models = models
    settings = load_settings(
        None,
        targets=[
            {"name": "good", "url": good.url, "gpus": [0]},
            {"name": "bad", "url": bad.url, "gpus": [1]},
        ],
        listen="127.0.0.1:0",
        interval_seconds=0.05,
    )
    text, doc = await serve_and_scrape(settings, FakeNvml.with_gpus(2))
    samples = parse(text)
    assert engines_with(samples, "moe_watch_engine_info") == {"good", "bad"}
    assert engines_with(samples, "moe_watch_engine_max_model_len_tokens") == {"good"}
    assert len([name for name, _ in samples if name == "moe_watch_gpu_up"]) == 2
    errors = next(s for s in doc["sources"] if s["source"] == "engine:bad")["errors_total"]
    assert errors == {"bad_value": 1}  # refused once, at the one metadata read
    assert next(e for e in doc["engines"] if e["engine"] == "bad")["max_model_len"] is None
