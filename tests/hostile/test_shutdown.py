"""SIGTERM ends the real agent process within ``shutdown_timeout_seconds`` whatever it is doing:
an EPLB what-if that would run for an hour, a discovery flood, an NVML call hung in the driver.
Kubernetes sends SIGKILL after its grace period; a process that needs it loses its last
scrape and its logs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from moe_watch.expert_file import CountsFile, write_counts_file
from moe_watch.serving.server import start_server
from tests.hostile.conftest import AgentProcess, running_agent
from tests.sources.test_discovery import pod

BOUND = 2.0  # shutdown_timeout_seconds of these agents
SLACK = 1.5  # interpreter exit and a loaded machine


def counts_file(directory: Path, step: int, *, layers: int, experts: int, ep_size: int) -> None:
    now = time.time()
    write_counts_file(
        directory / "w.experts.json",
        CountsFile(
            pid=1,
            started=now - 3600,
            updated=now,
            model="m",
            top_k=2,
            num_experts=experts,
            layers=list(range(layers)),
            counts=[[step * (1 + (e * 7919 + layer) % 97) for e in range(experts)]
                    for layer in range(layers)],
            ep_size=ep_size,
        ),
    )  # fmt: skip


def wait_with_traffic(agent: AgentProcess, directory: Path, event: str, **shape: int) -> None:
    """Rewrite the counts file with more traffic until the agent logs ``event``."""
    for step in range(2, 200):
        counts_file(directory, step, **shape)
        try:
            agent.wait_for(event, timeout=0.5)
            return
        except AssertionError:
            continue
    raise AssertionError(f"no {event!r}")


# 8 layers x 16,384 experts on 2 EP ranks with target 1.0: the search tries thousands of
# redundancies, an hour of CPU.
LONG_WHATIF = {"layers": 8, "experts": 16_384, "ep_size": 2}


def long_whatif(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """An engine's count files and the settings that start a what-if of LONG_WHATIF at once."""
    experts = tmp_path / "experts"
    experts.mkdir()
    counts_file(experts, 1, **LONG_WHATIF)
    settings = {
        "targets": [
            {"name": "e", "url": "http://127.0.0.1:1", "experts": {"directory": str(experts)}}
        ],
        "interval_seconds": 0.5,
        "eplb_whatif_target": 1.0,
        "eplb_whatif_interval_seconds": 0,
        "shutdown_timeout_seconds": BOUND,
    }
    return experts, settings


def test_sigterm_during_a_long_eplb_whatif(tmp_path: Path) -> None:
    # Before: SIGTERM waited for the worker thread (SIGKILL needed).
    experts, settings = long_whatif(tmp_path)
    with running_agent(tmp_path, settings) as agent:
        wait_with_traffic(agent, experts, "eplb what-if started", **LONG_WHATIF)
        assert agent.stop(BOUND) < BOUND + SLACK


@pytest.fixture
async def flooding_api() -> AsyncIterator[str]:
    """A pod list of 50,000 annotated pods, then a watch that adds a new pod per event."""
    items = [pod(f"p-{i:05d}", f"u-{i}", rv="90") for i in range(50_000)]
    body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": items})

    async def pods(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            return web.Response(text=body, content_type="application/json")
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for i in range(1_000_000):  # bounded: ends long after the test
                event = {"type": "ADDED", "object": pod(f"w-{i}", f"w-{i}", rv=str(101 + i))}
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_get("/api/v1/pods", pods)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield url
    await runner.cleanup()


async def test_sigterm_during_a_discovery_flood(tmp_path: Path, flooding_api: str) -> None:
    # Before: 50,001 targets, cycles of 20-49 s spent mostly in synchronous work.
    settings: dict[str, Any] = {
        "discovery": True,
        "node_name": "gpu-node-1",
        "kube_api": flooding_api,
        "interval_seconds": 0.5,
        "scrape_timeout_seconds": 0.5,
        "shutdown_timeout_seconds": BOUND,
    }

    def run() -> tuple[float, list[dict[str, Any]]]:
        with running_agent(tmp_path, settings) as agent:
            dropped = agent.wait_for("pod discovery dropped targets over the limit")
            agent.wait_for("target discovered")
            assert dropped["dropped"] == 50_000 - 256
            return agent.stop(BOUND), agent.lines

    elapsed, lines = await asyncio.to_thread(run)
    assert elapsed < BOUND + SLACK
    discovered = [line for line in lines if line.get("event") == "target discovered"]
    assert len(discovered) <= 256


HUNG_NVML = """
import pynvml  # the real module, for its constants and errors
from moe_watch.demo.fake_nvml import FakeNvml

_fake = FakeNvml.with_gpus(2)
_fake.hang(3600.0)  # every device call blocks: a wedged driver
import sys
sys.modules["pynvml"] = _fake
"""


def test_sigterm_with_nvml_hung_in_the_driver(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HUNG_NVML)
    settings = {
        "nvml": "auto",
        "interval_seconds": 0.5,
        "nvml_timeout_seconds": 0.5,
        "shutdown_timeout_seconds": BOUND,
    }
    with running_agent(tmp_path, settings, env={"PYTHONPATH": str(shim)}) as agent:
        down = agent.wait_for("source down")
        assert down["source"] == "nvml"
        assert down["reason"] == "timeout"
        assert agent.stop(BOUND) < BOUND + SLACK


async def test_the_agent_answers_while_a_whatif_runs(tmp_path: Path) -> None:
    # The what-if runs beside the cycle: /healthz and /metrics keep answering meanwhile.
    experts, settings = long_whatif(tmp_path)
    with running_agent(tmp_path, settings) as agent:
        await asyncio.to_thread(
            wait_with_traffic, agent, experts, "eplb what-if started", **LONG_WHATIF
        )
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                started = time.perf_counter()
                async with client.get(agent.url + "/healthz") as response:
                    assert response.status == 200
                assert time.perf_counter() - started < 1.0
        assert agent.stop(BOUND) < BOUND + SLACK


def test_a_whatif_stops_at_its_next_check_once_cancelled() -> None:
    import threading

    from moe_watch.signals.eplb_whatif import WhatIfCancelled, eplb_whatif

    cancel = threading.Event()
    rows = [[float(1 + (e * 31) % 17) for e in range(64)] for _ in range(4)]
    assert eplb_whatif(rows, [0, 1, 2, 3], 4, cancel=cancel) is not None
    cancel.set()
    with pytest.raises(WhatIfCancelled):
        eplb_whatif(rows, [0, 1, 2, 3], 4, cancel=cancel)


async def test_a_daemon_executor_never_waits_for_a_stuck_call() -> None:
    import threading

    from moe_watch.background import DaemonThreadExecutor

    executor = DaemonThreadExecutor(max_workers=2)
    stuck = threading.Event()
    loop = asyncio.get_running_loop()
    hung = loop.run_in_executor(executor, stuck.wait)
    assert await loop.run_in_executor(executor, sum, [1, 2]) == 3
    started = time.perf_counter()
    executor.shutdown(wait=True)  # asyncio.run calls this at exit
    assert time.perf_counter() - started < 0.5
    stuck.set()
    assert await hung is True
