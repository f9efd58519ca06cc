"""The agent recovers the simulated engine's batching curve: its throughput peak, the bins of its
sweep, its coverage and dense point; the curve survives an agent restart through the state file."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.agent import Agent
from moe_watch.agent.curve_state import FILE_NAME
from moe_watch.config import Settings, load_settings
from moe_watch.demo.run import write_expert_counts
from moe_watch.demo.scenarios import SCENARIOS
from moe_watch.demo.simulated_engine import EngineSim
from moe_watch.demo.simulated_engine_server import SimServer, start_engine_server
from moe_watch.serving.exporter import build_registry
from moe_watch.serving.views import experts_document, status_document
from moe_watch.snapshot import Snapshot
from tests.records import batching_of, experts_of

ENGINE, MODEL = "sim", "mixtral-8x7b"
START = 1_700_000_000.0
INTERVAL = 5.0
PHASE = SCENARIOS["batch_peak"].sweep_phase_seconds


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def simulated(clock: Clock) -> AsyncIterator[tuple[EngineSim, SimServer]]:
    sim = EngineSim(SCENARIOS["batch_peak"], start_time=START)
    server = await start_engine_server(sim, clock=clock)
    try:
        yield sim, server
    finally:
        await server.stop()


def settings(server: SimServer, experts: Path, state: Path | None) -> Settings:
    return load_settings(
        None,
        targets=[
            {
                "name": ENGINE,
                "url": server.url,
                "experts": {"source": "plugin", "directory": str(experts)},
            }
        ],
        nvml="off",
        interval_seconds=INTERVAL,
        window_seconds=600.0,  # the whole sweep: the coverage compares with the sim's totals
        batching_min_bin_seconds=60.0,
        state_dir=state,
    )


async def run_for(
    agent: Agent, sim: EngineSim, clock: Clock, experts: Path, seconds: float
) -> Snapshot:
    """Cycle every INTERVAL simulated seconds, the plugin file written as the engine moves."""
    snapshot = None
    for _ in range(round(seconds / INTERVAL)):
        clock.now += INTERVAL
        sim.advance(clock.now)
        write_expert_counts(experts, sim, now=clock.now)
        snapshot = await agent.run_cycle()
        await agent.settle()  # the coverage prediction runs beside the cycle: let it land
    assert snapshot is not None
    return snapshot


async def test_the_agent_recovers_the_peak_bin_and_the_dense_point_of_the_sweep(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with simulated(clock) as (sim, server):
        write_expert_counts(tmp_path, sim, now=clock.now)
        async with Agent(settings(server, tmp_path, None), clock=clock) as agent:
            await agent.run_cycle()
            rates = {}
            for concurrency in sim.scenario.concurrency_sweep:
                before = (clock.now, sim.generation_tokens_total)
                snapshot = await run_for(agent, sim, clock, tmp_path, PHASE)
                rates[concurrency] = (sim.generation_tokens_total - before[1]) / PHASE
    answer = batching_of(snapshot, ENGINE)[MODEL]
    assert answer.knee == 8  # the scenario's peak
    assert answer.peak_reached
    assert answer.gpus == 1  # no NVML here: tokens/s per GPU = per engine
    points = {p.batch_bin: p for p in answer.points if p.evidenced}
    assert set(points) == {1, 2, 4, 8, 16, 32}  # each phase of the sweep in its own bin
    for concurrency, rate in rates.items():  # the engine's own counter, phase by phase
        assert points[concurrency].tokens_per_second_per_gpu == pytest.approx(rate, rel=0.15)
    assert points[32].within_slo is False  # ITL 0.44 s at batch 32
    assert all(points[b].within_slo for b in (1, 2, 4, 8, 16)), [
        (p.batch_bin, p.itl_p95_seconds, p.tokens_per_second_per_gpu) for p in points.values()
    ]

    coverage = experts_of(snapshot, ENGINE).coverage
    assert coverage is not None
    assert coverage.dense_point == 512  # the scenario's: prompts of 363+ tokens
    experts = sim.scenario.num_experts * sim.scenario.num_layers
    for index, steps in enumerate(sim.coverage_steps):
        if not steps:
            continue
        measured = coverage.bin(2**index)
        assert measured is not None
        assert measured.steps == steps
        truth = sum(sim.coverage_distinct[index]) / (steps * experts)
        assert measured.observed == pytest.approx(truth, abs=1e-3)
        assert measured.independent is not None
        if 2**index <= 32:  # decode: one token per request, independent of each other
            assert measured.independent == pytest.approx(measured.observed, abs=0.03)
        else:  # a prompt's tokens keep to its home experts: request locality
            assert measured.independent > measured.observed + 0.03

    # What Prometheus, /status and /experts see: formatted from the snapshot, nothing more.
    text = generate_latest(build_registry(lambda: snapshot)).decode()
    series = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    labels = (("engine", ENGINE), ("model", MODEL))
    assert series[("moe_watch_batch_knee_requests", labels)] == 8
    assert series[("moe_watch_batch_knee_peak_reached", labels)] == 1
    for point in answer.points:
        key = tuple(sorted((*labels, ("batch", str(point.batch_bin)))))
        assert series[("moe_watch_batch_generation_tokens_per_second_per_gpu", key)] == (
            point.tokens_per_second_per_gpu
        )
        assert series[("moe_watch_batch_itl_p95_seconds", key)] == point.itl_p95_seconds
        assert series[("moe_watch_batch_evidence_seconds", key)] == point.seconds
    assert series[("moe_watch_expert_dense_point_tokens", (("engine", ENGINE),))] == 512
    bins = {
        dict(key)["tokens"] for name, key in series if name == "moe_watch_expert_coverage_ratio"
    }
    assert bins == {"1", "2", "4", "8", "16", "32", "128", "256", "512"}
    assert len([n for n, _ in series if n.startswith("moe_watch_batch_")]) <= 4 * 12 + 2
    status = status_document(snapshot)
    model_status = status["batching"][ENGINE]["models"][MODEL]
    assert (model_status["knee"], model_status["peak_reached"]) == (8, True)
    assert status["batching"][ENGINE]["max_num_seqs_rule"] == "measured_knee"
    assert [b["batch"] for b in model_status["curve"]] == [1, 2, 4, 8, 16, 32]
    assert status["coverage"][ENGINE]["dense_point_tokens"] == 512
    [experts_view] = experts_document(snapshot)["engines"]
    assert len(experts_view["coverage"]["per_layer"]) == len(coverage.bins)
    assert len(experts_view["coverage"]["per_layer"][0]) == sim.scenario.num_layers


async def test_the_curve_survives_an_agent_restart_and_a_corrupt_state_file_is_counted(
    tmp_path: Path,
) -> None:
    clock = Clock()
    state = tmp_path / "state"
    experts = tmp_path / "experts"
    experts.mkdir()
    async with simulated(clock) as (sim, server):
        write_expert_counts(experts, sim, now=clock.now)
        async with Agent(settings(server, experts, state), clock=clock) as agent:
            await agent.run_cycle()
            await run_for(agent, sim, clock, experts, 4 * PHASE)  # batch 1 .. 8
            before = agent.batch_curves()
        assert (state / FILE_NAME).is_file()
        async with Agent(settings(server, experts, state), clock=clock) as agent:
            assert agent.batch_curves() == before  # restored before the first cycle
            snapshot = await run_for(agent, sim, clock, experts, 2 * PHASE)  # 16, 32
            [status] = [s for s in snapshot.sources if s.name == "state"]
            assert status.up
            assert status.errors_total == {}
        answer = batching_of(snapshot, ENGINE)[MODEL]
        assert (answer.knee, answer.peak_reached) == (8, True)  # 1 .. 8 came from the file

        document = json.loads((state / FILE_NAME).read_text())
        document["curves"][0]["bins"][0]["seconds"] = -5  # corrupt
        (state / FILE_NAME).write_text(json.dumps(document))
        async with Agent(settings(server, experts, state), clock=clock) as agent:
            assert agent.batch_curves() == {}  # refused as a whole: the agent starts empty
            snapshot = await run_for(agent, sim, clock, experts, 2 * INTERVAL)
        [status] = [s for s in snapshot.sources if s.name == "state"]
        assert status.errors_total == {"bad_state": 1}
        assert status.last_error is not None
        assert "not a finite non-negative number" in status.last_error
        assert snapshot.targets_up == {ENGINE: True}  # nothing else is lost
        assert experts_of(snapshot, ENGINE) is not None
