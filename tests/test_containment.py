"""Each stage of one engine fails alone, and so does rendering one engine or one GPU.

Two engines, each with its GPU, a plan, expert counts under expert parallelism (so every stage
runs: signals, expert signals, the EPLB what-if, drift, the GPU-derived values): a stage that
raises for the "bad" engine leaves the "good" engine's and the GPUs' series exactly as in a run
without the fault, leaves the bad engine's other stages' series in place, is counted under the
bad engine's source with the stage as reason, and is logged once when it starts and once when it
ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from moe_watch.agent import Agent, assemble, engine_target
from moe_watch.agent.stages import Stages
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import GIB, FakeNvml
from moe_watch.expert_file import CountsFile, write_counts_file
from moe_watch.samples import GpuSample
from moe_watch.serving.exporter import ENGINE_GAUGES, ENGINE_HISTOGRAMS, build_registry
from moe_watch.signals.engine import EngineSignals
from moe_watch.snapshot import EngineRecord, EngineView, GpuView, Snapshot
from moe_watch.sources.runner import SourceStatus
from tests.conftest import EngineStub, read_capture
from tests.test_agent import Clock

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PLAN = "model: mixtral-8x7b\ndtype: bf16\ngpu: h100-80\ngpus: 1\nvllm:\n  max_num_seqs: 8\n"
# Experts per layer: the what-if fault tells the engines apart by it.
EXPERTS = {"good": 8, "bad": 4}
CYCLES = 3


def samples(snapshot: Snapshot) -> Samples:
    text = generate_latest(build_registry(lambda: snapshot)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def is_gpus(key: tuple[str, frozenset[tuple[str, str]]]) -> bool:
    """A GPU's own series (gpu_up{gpu,engine}, ...): the GPU's part, not its engine's."""
    return "gpu" in dict(key[1]) and key[0] != "moe_watch_budget_used_ratio"


def of_engine(metrics: Samples, engine: str) -> Samples:
    return {
        k: v for k, v in metrics.items() if dict(k[1]).get("engine") == engine and not is_gpus(k)
    }


def of_gpus(metrics: Samples) -> Samples:
    return {k: v for k, v in metrics.items() if is_gpus(k)}


def names(metrics: Samples) -> set[str]:
    return {name for name, _ in metrics}


class Node:
    """Two engines on one node and the agent watching them, cycle by cycle."""

    def __init__(self, stubs: dict[str, EngineStub], tmp_path: Path) -> None:
        tmp_path.mkdir()
        self.clock = Clock()
        self.nvml = FakeNvml.with_gpus(2)
        for gpu in self.nvml.gpus:
            gpu.memory_used_bytes = (50 + gpu.index) * GIB
        self.dirs = {name: tmp_path / name for name in stubs}
        (tmp_path / "plan.yaml").write_text(PLAN)
        targets = []
        for index, (name, stub) in enumerate(stubs.items()):
            self.dirs[name].mkdir()
            targets.append(
                {
                    "name": name,
                    "url": stub.url,
                    "gpus": [index],
                    "plan": str(tmp_path / "plan.yaml"),
                    "experts": {"directory": str(self.dirs[name])},
                }
            )
        self.settings = load_settings(
            None, targets=targets, eplb_whatif_interval_seconds=0, eplb_whatif_redundant=[0, 2]
        )
        self.step = 0

    def write_counts(self) -> None:
        self.step += 1
        for name, directory in self.dirs.items():
            experts = EXPERTS[name]
            row = [self.step * (1 + e * e) for e in range(experts)]
            write_counts_file(
                directory / "w.experts.json",
                CountsFile(pid=1, started=1.0, updated=self.clock.now, model="m", top_k=1,
                           num_experts=experts, layers=[0, 1], counts=[row, row], ep_size=2),
            )  # fmt: skip

    async def cycles(self, agent: Agent, count: int) -> Snapshot:
        snapshot = None
        for _ in range(count):
            self.write_counts()
            self.clock.now += 5
            snapshot = await agent.run_cycle()
            await agent.settle()  # the what-if, between cycles
        assert snapshot is not None
        return snapshot


@pytest.fixture
async def stubs() -> AsyncIterator[dict[str, EngineStub]]:
    started = {name: await EngineStub(read_capture("after-load")).start() for name in EXPERTS}
    yield started
    for stub in started.values():
        await stub.stop()


def boom(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("a bug in this stage")


def inject(stage: str, agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``stage`` raise for the bad engine only."""
    bad = agent._targets["bad"]
    if stage == "signals":
        monkeypatch.setattr(bad, "_engine_views", boom)
    elif stage == "experts":
        monkeypatch.setattr(bad, "_experts", boom)
    elif stage == "drift":
        monkeypatch.setattr(bad, "_drift", boom)
    elif stage == "kv_plan":
        monkeypatch.setattr(bad, "kv_plan", boom)
    elif stage == "assemble":
        monkeypatch.setattr(bad, "advance", boom)
    elif stage == "whatif":
        real = engine_target.eplb_whatif

        def whatif(rows: Any, *args: Any, **kwargs: Any) -> Any:
            if len(rows[0]) == EXPERTS["bad"]:
                raise RuntimeError("a bug in the what-if")
            return real(rows, *args, **kwargs)

        monkeypatch.setattr(engine_target, "eplb_whatif", whatif)
    elif stage == "gpu_signals":
        real_gpu = assemble._gpu_signals

        def gpu_signals(mine: list[GpuSample], *args: Any) -> Any:
            if any(gpu.index == 1 for gpu in mine):
                raise RuntimeError("a bug in the GPU signals")
            return real_gpu(mine, *args)

        monkeypatch.setattr(assemble, "_gpu_signals", gpu_signals)
    else:
        raise AssertionError(stage)


ENGINE_VIEWS = {"moe_watch_engine_info", "moe_watch_engine_max_model_len_tokens",
                "moe_watch_requests_finished_total",
                *("moe_watch_" + name for name, _, _ in ENGINE_GAUGES),
                *(f"moe_watch_{name}{suffix}" for name, _, _ in ENGINE_HISTOGRAMS
                  for suffix in ("_bucket", "_count", "_sum"))}  # fmt: skip
WHATIF = {"moe_watch_expert_rank_balancedness_ratio", "moe_watch_expert_eplb_whatif_balancedness_ratio",
          "moe_watch_expert_eplb_redundant_needed", "moe_watch_expert_eplb_redundant_searched_max",
          "moe_watch_expert_eplb_redundant_needed_balancedness_ratio"}  # fmt: skip
GPU_DERIVED = {"moe_watch_budget_used_ratio", "moe_watch_engine_interconnect_info",
               "moe_watch_engine_gpu_utilization_spread_ratio"}  # fmt: skip
DRIFT = {"moe_watch_config_drift", "moe_watch_config_drift_info"}
KV_PLAN = {"moe_watch_kv_cache_planned_tokens", "moe_watch_kv_cache_allocated_tokens",
           "moe_watch_kv_cache_max_concurrency", "moe_watch_kv_cache_plan_coverage_ratio"}  # fmt: skip
STAGES = ("signals", "experts", "whatif", "drift", "kv_plan", "gpu_signals", "assemble")


def lost(stage: str, families: set[str]) -> set[str]:
    """The bad engine's families a failure of ``stage`` takes away: its own, nothing more."""
    experts = {name for name in families if name.startswith("moe_watch_expert_")}
    return (
        families
        & {
            "signals": ENGINE_VIEWS,
            "experts": experts,
            "whatif": WHATIF,
            "drift": DRIFT,
            "kv_plan": KV_PLAN,
            "gpu_signals": GPU_DERIVED,
            "assemble": families - {"moe_watch_target_up"},  # only its up state is left
        }[stage]
    )


@pytest.mark.parametrize("stage", STAGES)
async def test_a_failing_stage_of_one_engine_takes_only_its_own_series(
    stubs: dict[str, EngineStub],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    clean = Node(stubs, tmp_path / "clean")
    async with Agent(clean.settings, nvml=clean.nvml, clock=clean.clock) as agent:
        expected = samples(await clean.cycles(agent, CYCLES))
    node = Node(stubs, tmp_path / "faulty")
    with monkeypatch.context() as patch:
        async with Agent(node.settings, nvml=node.nvml, clock=node.clock) as agent:
            await node.cycles(agent, 1)  # healthy first
            inject(stage, agent, patch)
            with capture_logs() as failing:
                faulty = await node.cycles(agent, CYCLES - 1)
            patch.undo()
            with capture_logs() as recovering:
                recovered = await node.cycles(agent, 2)
    got = samples(faulty)
    # The good engine and the GPUs: exactly as without the fault.
    assert of_engine(got, "good") == of_engine(expected, "good")
    assert of_gpus(got) == of_gpus(expected)
    # The bad engine: everything but the failing stage's series, with the same values.
    clean_bad = of_engine(expected, "bad")
    gone = lost(stage, names(clean_bad))
    assert gone
    assert names(clean_bad) >= WHATIF | {"moe_watch_config_drift"}
    assert of_engine(got, "bad") == {k: v for k, v in clean_bad.items() if k[0] not in gone}
    errors = got[
        (
            "moe_watch_collect_errors_total",
            frozenset({("source", "engine:bad"), ("reason", stage)}),
        )
    ]
    assert errors >= 1 if stage == "whatif" else errors == CYCLES - 1
    assert not any(
        dict(labels).get("source") == "engine:good" and name == "moe_watch_collect_errors_total"
        for name, labels in got
    )
    status = next(source for source in faulty.sources if source.name == "engine:bad")
    assert status.up  # the scrape itself is fine: /status names the failing stage
    assert (status.last_error or "").startswith(f"{stage}: RuntimeError")
    assert [e["stage"] for e in failing if e["event"].startswith("stage failed")] == [stage]
    assert [e["stage"] for e in recovering if e["event"] == "stage works again"] == [stage]
    assert names(of_engine(samples(recovered), "bad")) == names(clean_bad)


async def test_the_node_part_of_the_cycle_fails_alone_and_keeps_the_gpus(
    stubs: dict[str, EngineStub], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU ownership failing leaves every GPU exported (without an owner) and every engine."""
    node = Node(stubs, tmp_path / "node")
    monkeypatch.setattr("moe_watch.agent.cycle.gpu_views", boom)
    async with Agent(node.settings, nvml=node.nvml, clock=node.clock) as agent:
        got = samples(await node.cycles(agent, 2))
    assert len([name for name, _ in got if name == "moe_watch_gpu_up"]) == 2
    assert {dict(k[1])["engine"] for k in got if k[0] == "moe_watch_engine_info"} == set(EXPERTS)
    reason = frozenset({("source", "nvml"), ("reason", "assemble")})
    assert got[("moe_watch_collect_errors_total", reason)] == 2


def test_refused_values_are_counted_per_read_and_logged_when_the_set_changes() -> None:
    stages = Stages({"engine": "e"})
    status = SourceStatus("engine:e", True, 0.1, 1.0, {"metadata": 1}, None)
    with capture_logs() as logs:
        for _ in range(3):
            stages.refuse("running", ("max_num_seqs=nan",))
        stages.refuse("running", ("max_num_seqs=nan", "max_model_len=1e400"))
        stages.refuse("running", ())
        stages.refuse("running", ())
    assert [e["event"] for e in logs] == [
        "values refused",
        "values refused",
        "values accepted again",
    ]
    merged = stages.merged(status)
    assert merged.errors_total == {"metadata": 1, "bad_value": 5}
    assert merged.last_error is None  # nothing refused any more


# -- rendering


def record(name: str, max_model_len: int | None = 1024) -> EngineRecord:
    view = EngineView(name, "m", "vllm", "0.32.0", EngineSignals(requests_running=3), max_model_len)
    return EngineRecord(name, up=True, views=(view,), gpu_spread=0.5)


def gpu(index: int, used: float = 40 * GIB) -> GpuView:
    return GpuView(GpuSample(index, f"GPU-{index}", "H100", True, 0.5, used, 80 * GIB), None, 0.5)


def render_snapshot(engines: tuple[EngineRecord, ...], gpus: tuple[GpuView, ...]) -> Snapshot:
    return Snapshot(0.0, 1, 0.0, (), engines=engines, gpus=gpus)


def test_an_unrenderable_engine_or_gpu_is_left_out_alone_and_is_itself_a_series() -> None:
    # Before: one int past float's range raised in the text encoder and the body was empty.
    broken = render_snapshot(
        (record("good"), record("bad", 10**309)), (gpu(0), gpu(1, used=10**400))
    )
    collector = build_registry(lambda: current[0])
    current = [broken]
    with capture_logs() as logs:
        for _ in range(2):  # logged once, not per render
            text = generate_latest(collector).decode()
            assert openmetrics(collector).decode().rstrip().endswith("# EOF")
    got = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert {dict(k[1])["engine"] for k in got if k[0] == "moe_watch_engine_info"} == {"good"}
    assert {dict(k[1])["gpu"] for k in got if k[0] == "moe_watch_gpu_up"} == {"0"}
    assert got[("moe_watch_target_up", frozenset({("engine", "bad")}))] == 1.0  # the agent's part
    failed = {dict(k[1])["part"]: v for k, v in got.items() if k[0] == "moe_watch_render_failed"}
    assert failed == {"engine:bad": 1.0, "gpu:1": 1.0}
    assert sorted(e["part"] for e in logs) == ["engine:bad", "gpu:1"]
    assert all(e["log_level"] == "error" for e in logs)

    current[0] = render_snapshot((record("good"), record("bad")), (gpu(0), gpu(1)))
    with capture_logs() as recovery:
        text = generate_latest(collector).decode()
    assert sorted(e["part"] for e in recovery) == ["engine:bad", "gpu:1"]
    assert 'moe_watch_render_failed{part="engine:bad"} 0.0' in text
    assert 'moe_watch_engine_info{engine="bad"' in text

    current[0] = render_snapshot((record("good"),), (gpu(0),))  # the bad engine and GPU are gone
    assert "moe_watch_render_failed{" not in generate_latest(collector).decode()


def test_every_part_renders_with_the_same_families_and_values_as_one() -> None:
    """Rendering part by part changes no family, label or value (only adds render_failed)."""
    good = render_snapshot((record("a"), record("b")), (gpu(0), gpu(1)))
    text = generate_latest(build_registry(lambda: good)).decode()
    families = [f.name for f in text_string_to_metric_families(text)]
    assert families[-1] == "moe_watch_render_failed"
    assert "moe_watch_render_failed{" not in text  # nothing failed: an empty family
