"""The agent end to end over real HTTP: real captures, dead and hanging targets, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from structlog.testing import capture_logs

from moe_watch.agent import Agent
from moe_watch.config import load_settings
from moe_watch.serving.exporter import build_registry
from moe_watch.snapshot import Snapshot
from tests.conftest import EngineStub, free_port, read_capture


class Clock:
    """A wall clock the test moves by hand, so windowed rates have exact expected values."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def exposition(snapshot: Snapshot) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Render the snapshot exactly as /metrics would and index the samples by name and labels."""
    from prometheus_client import generate_latest

    registry: CollectorRegistry = build_registry(lambda: snapshot)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return metrics[(name, frozenset(labels.items()))]


async def test_a_dead_target_is_isolated_counted_and_exported_as_down(
    engine_stub: EngineStub,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = load_settings(None, targets=[f"live={engine_stub.url}", f"dead={dead}"], nvml="off")
    async with Agent(config) as agent:
        snap = await agent.run_cycle()
    assert dict(snap.targets_up) == {"live": True, "dead": False}
    assert [view.engine for record in snap.engines for view in record.views] == ["live"]
    metrics = exposition(snap)
    assert value(metrics, "moe_watch_target_up", engine="live") == 1.0
    assert value(metrics, "moe_watch_target_up", engine="dead") == 0.0
    assert (
        value(metrics, "moe_watch_collect_errors_total", source="engine:dead", reason="connect")
        == 1.0
    )
    assert value(metrics, "moe_watch_source_up", source="engine:dead") == 0.0
    assert value(metrics, "moe_watch_requests_running", engine="live", model="tiny-mixtral") == 0.0
    assert (
        value(metrics, "moe_watch_engine_max_model_len_tokens", engine="live", model="tiny-mixtral")
        == 1024.0
    )
    # a failed target exports no stale engine series, only target_up 0
    assert not any(
        dict(labels).get("engine") == "dead"
        for name, labels in metrics
        if name != "moe_watch_target_up"
    )


async def test_counter_reset_on_engine_restart_gives_the_traffic_after_it_not_a_negative_rate(
    engine_stub: EngineStub,
) -> None:
    clock = Clock()
    config = load_settings(None, targets=[f"e={engine_stub.url}"], nvml="off")
    async with Agent(config, clock=clock) as agent:
        for state in ("after-load", "fresh", "after-5-requests"):  # 19280 -> 0 -> 80 tokens
            engine_stub.serve(read_capture(state))
            snap = await agent.run_cycle()
            clock.now += 10.0
    signals = snap.engines[0].views[0].signals
    # increase = 0 (reset to 0) + 80 tokens over the 20 s window; 5 requests finished after it
    assert signals.generation_tokens_per_second == pytest.approx(80 / 20)
    assert signals.requests_per_second == pytest.approx(5 / 20)
    assert all(
        (getattr(signals, field) or 0.0) >= 0.0
        for field in ("preemptions_per_second", "prompt_tokens_per_second")
    )


async def test_quantiles_come_from_the_window_and_an_empty_window_exports_none(
    engine_stub: EngineStub,
) -> None:
    clock = Clock()
    config = load_settings(None, targets=[f"e={engine_stub.url}"], nvml="off", window_seconds=60)
    async with Agent(config, clock=clock) as agent:
        engine_stub.serve(read_capture("fresh"))
        first = await agent.run_cycle()
        clock.now += 5
        engine_stub.serve(read_capture("after-load"))
        loaded = await agent.run_cycle()
        clock.now += 120  # the load leaves the 60 s window; nothing new happened since
        idle = await agent.run_cycle()
    assert first.engines[0].views[0].signals.latency_seconds == {}
    e2e_p95 = loaded.engines[0].views[0].signals.latency_seconds[("e2e", 0.95)]
    assert 0.0 < e2e_p95 < 60.0
    assert idle.engines[0].views[0].signals.latency_seconds == {}
    metrics = exposition(idle)
    # The window saw nothing, but the re-published counters keep the engine's totals: a
    # Prometheus rate() over them is 0, and no quantile is made up.
    counts = [
        v for (n, _), v in metrics.items() if n == "moe_watch_e2e_request_latency_seconds_count"
    ]
    assert counts == [95]


async def test_a_hanging_target_times_out_without_holding_up_the_others(
    engine_stub: EngineStub,
) -> None:
    hanging = await EngineStub(read_capture("busy")).start()
    hanging.hang = True
    try:
        config = load_settings(
            None,
            targets=[f"ok={engine_stub.url}", f"stuck={hanging.url}"],
            nvml="off",
            scrape_timeout_seconds=0.3,
        )
        async with Agent(config) as agent:
            snap = await asyncio.wait_for(agent.run_cycle(), timeout=5)
    finally:
        await hanging.stop()
    assert dict(snap.targets_up) == {"ok": True, "stuck": False}
    stuck = next(s for s in snap.sources if s.name == "engine:stuck")
    assert stuck.errors_total == {"timeout": 1}
    assert "0.3s" in (stuck.last_error or "")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"vllm:num_requests_running{engine=0 garbage\n", "parse"),
        (b"\xff\xfe not utf-8 at all", "encoding"),
        (b"# HELP nothing here\n", "no_engine_metrics"),
    ],
)
async def test_bad_expositions_are_counted_by_reason_and_logged_once(
    engine_stub: EngineStub, body: bytes, reason: str
) -> None:
    config = load_settings(None, targets=[f"e={engine_stub.url}"], nvml="off")
    async with Agent(config) as agent:
        await agent.run_cycle()  # healthy first
        engine_stub.serve(body)
        with capture_logs() as logs:
            for _ in range(3):
                snap = await agent.run_cycle()
        engine_stub.serve(read_capture("after-load"))
        with capture_logs() as recovery:
            healthy = await agent.run_cycle()
    status = next(s for s in snap.sources if s.name == "engine:e")
    assert status.errors_total == {reason: 3}
    assert snap.targets_up["e"] is False
    assert [entry["event"] for entry in logs] == ["source down"]
    assert logs[0]["reason"] == reason
    assert [entry["event"] for entry in recovery] == ["source up"]
    assert healthy.targets_up["e"] is True


async def test_a_50_mb_body_is_refused_at_the_cap_and_the_agent_keeps_serving(
    engine_stub: EngineStub,
) -> None:
    engine_stub.serve(b"# " + b"x" * (50 * 1024 * 1024) + b"\n")
    config = load_settings(
        None, targets=[f"e={engine_stub.url}"], nvml="off", max_body_bytes=1024 * 1024
    )
    async with Agent(config) as agent:
        snap = await agent.run_cycle()
    status = next(s for s in snap.sources if s.name == "engine:e")
    assert status.errors_total == {"body_too_large": 1}
    assert exposition(snap)[("moe_watch_target_up", frozenset({("engine", "e")}))] == 0.0


async def test_run_forever_cycles_on_schedule_until_stopped(engine_stub: EngineStub) -> None:
    config = load_settings(
        None, targets=[f"e={engine_stub.url}"], nvml="off", interval_seconds=0.05
    )
    stop = asyncio.Event()
    async with Agent(config) as agent:
        task = asyncio.create_task(agent.run_forever(stop))
        await asyncio.wait_for(agent.first_cycle_done.wait(), timeout=5)
        for _ in range(200):  # bounded: wait for a few more cycles on the schedule
            if agent.snapshot is not None and agent.snapshot.cycle >= 3:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert agent.snapshot is not None
    assert agent.snapshot.cycle >= 3


async def test_a_gpu_lost_mid_run_exports_gpu_up_0_and_the_rest_keeps_reporting(
    engine_stub: EngineStub,
) -> None:
    from moe_watch.demo.fake_nvml import FakeNvml

    fake = FakeNvml.with_gpus(2)
    fake.gpus[0].utilization_percent, fake.gpus[1].utilization_percent = 95, 30
    config = load_settings(None, targets=[f"e={engine_stub.url}"], nvml="auto")
    async with Agent(config, nvml=fake) as agent:
        healthy = await agent.run_cycle()
        fake.gpus[1].lost = True
        lost = await agent.run_cycle()
    assert healthy.engines[0].gpu_spread == pytest.approx(0.65)
    metrics = exposition(lost)
    gpu1 = frozenset({("gpu", "1"), ("engine", "e")})
    assert metrics[("moe_watch_gpu_up", gpu1)] == 0.0
    assert ("moe_watch_gpu_utilization_ratio", gpu1) not in metrics
    assert (
        metrics[("moe_watch_gpu_utilization_ratio", frozenset({("gpu", "0"), ("engine", "e")}))]
        == 0.95
    )
    assert value(metrics, "moe_watch_collect_errors_total", source="nvml", reason="gpu_lost") == 1.0
    assert value(metrics, "moe_watch_source_up", source="nvml") == 1.0
    assert lost.engines[0].gpu_spread is None  # one GPU left: no spread to speak of
    assert value(metrics, "moe_watch_target_up", engine="e") == 1.0


async def test_no_nvml_library_reports_the_source_down_and_engines_still_flow(
    engine_stub: EngineStub,
) -> None:
    from moe_watch.demo.fake_nvml import FakeNvml

    config = load_settings(None, targets=[f"e={engine_stub.url}"], nvml="auto")
    async with Agent(config, nvml=FakeNvml.with_gpus(1, library_missing=True)) as agent:
        snap = await agent.run_cycle()
    metrics = exposition(snap)
    assert value(metrics, "moe_watch_source_up", source="nvml") == 0.0
    assert (
        value(metrics, "moe_watch_collect_errors_total", source="nvml", reason="library_missing")
        == 1.0
    )
    assert value(metrics, "moe_watch_target_up", engine="e") == 1.0
    assert snap.gpus == ()


def recorder_csv(rows: list[list[int]]) -> str:
    lines = ["layer_id,expert_id,count"]
    lines += [
        f"{layer},{expert},{n}"
        for layer, row in enumerate(rows)
        for expert, n in enumerate(row)
        if n
    ]
    return "\n".join(lines) + "\n"


async def test_expert_counts_become_skew_hot_experts_and_the_experts_document(
    engine_stub: EngineStub, tmp_path: Path
) -> None:
    from moe_watch.serving.views import experts_document

    engine_stub.recorder_dir = tmp_path
    even = [[10] * 8, [10] * 8]
    hot = [[40, 10, 10, 10, 10, 10, 5, 5], [10] * 8]
    # Both dumps count (the recorder starts at zero): layer 0 = [50, 20 x 5, 15, 15], skew
    # 50 / 22.5 - 1 = 1.222, expert 0's share 100 / 180 = 0.556.
    engine_stub.expert_dumps = [recorder_csv(even), recorder_csv(hot)]
    target = {
        "name": "qwen3",
        "url": engine_stub.url,
        "experts": {"source": "sglang", "directory": str(tmp_path), "top_k": 2},
    }
    clock = Clock()
    config = load_settings(None, targets=[target], nvml="off", expert_top_n=3)
    async with Agent(config, clock=clock) as agent:
        await agent.run_cycle()
        clock.now += 5
        snap = await agent.run_cycle()
    metrics = exposition(snap)
    assert value(
        metrics, "moe_watch_expert_skew_ratio", engine="qwen3", layer="0"
    ) == pytest.approx(50 / 22.5 - 1)
    assert value(
        metrics, "moe_watch_expert_skew_ratio", engine="qwen3", layer="1"
    ) == pytest.approx(0.0)
    assert value(
        metrics, "moe_watch_expert_max_token_share", engine="qwen3", layer="0"
    ) == pytest.approx(100 / 180)
    assert value(metrics, "moe_watch_expert_max_skew_ratio", engine="qwen3") == pytest.approx(
        50 / 22.5 - 1
    )
    assert value(metrics, "moe_watch_expert_collapsed_layers", engine="qwen3") == 1
    cell = {"engine": "qwen3", "layer": "0", "load_rank": "1"}
    assert value(metrics, "moe_watch_expert_load_rank_token_share", **cell) == pytest.approx(
        100 / 180
    )
    assert value(metrics, "moe_watch_expert_load_rank_expert_id", **cell) == 0
    assert value(metrics, "moe_watch_source_up", source="experts:qwen3") == 1
    ranked = [
        labels for name, labels in metrics if name == "moe_watch_expert_load_rank_token_share"
    ]
    assert len(ranked) == 3 * 2  # expert_top_n load ranks x 2 layers
    document = experts_document(snap)
    assert document["engines"][0]["counts_window"][0] == [50, 20, 20, 20, 20, 20, 15, 15]


async def test_sglangs_first_dump_counts_because_its_recorder_starts_at_zero(
    engine_stub: EngineStub, tmp_path: Path
) -> None:
    """Defect: the first dump after the agent starts recording was the window's
    baseline and its traffic was lost. SGLang's recorder starts at zero when recording starts,
    so the first dump is an increase like any other."""
    from moe_watch.serving.views import experts_document

    engine_stub.recorder_dir = tmp_path
    hot = [[40, 10, 10, 10, 10, 10, 5, 5], [10] * 8]
    engine_stub.expert_dumps = [recorder_csv(hot)]
    target = {
        "name": "qwen3",
        "url": engine_stub.url,
        "experts": {"source": "sglang", "directory": str(tmp_path), "top_k": 2},
    }
    clock = Clock()
    config = load_settings(None, targets=[target], nvml="off")
    async with Agent(config, clock=clock) as agent:
        first = await agent.run_cycle()
        clock.now += 5
        second = await agent.run_cycle()  # no new dump: the window still holds the first one
    for snap in (first, second):
        metrics = exposition(snap)
        assert value(
            metrics, "moe_watch_expert_skew_ratio", engine="qwen3", layer="0"
        ) == pytest.approx(2.2)
        assert experts_document(snap)["engines"][0]["counts_window"] == hot


async def test_an_engine_with_an_expert_source_but_no_counts_exports_zero_layers_observed(
    engine_stub: EngineStub, tmp_path: Path
) -> None:
    """The series MoEExpertDataMissing reads: 0 while the plugin writes nothing, then the layers."""
    from moe_watch.expert_file import CountsFile, write_counts_file

    target = {"name": "mixtral", "url": engine_stub.url, "experts": {"directory": str(tmp_path)}}
    clock = Clock()
    config = load_settings(None, targets=[target], nvml="off")
    async with Agent(config, clock=clock) as agent:
        first = await agent.run_cycle()
        assert value(exposition(first), "moe_watch_expert_layers_observed", engine="mixtral") == 0

        def write(count: int) -> None:
            write_counts_file(
                tmp_path / "rank-0.experts.json",
                CountsFile(pid=1, started=1.0, updated=clock.now, model="m", top_k=1, num_experts=2,
                           layers=[0, 1], counts=[[count, count], [count, 0]]),
            )  # fmt: skip

        write(1)
        clock.now += 5
        await agent.run_cycle()
        write(5)
        clock.now += 5
        later = await agent.run_cycle()
    assert value(exposition(later), "moe_watch_expert_layers_observed", engine="mixtral") == 2


async def test_the_eplb_whatif_is_exported_shown_and_cached_between_recomputations(
    engine_stub: EngineStub, tmp_path: Path
) -> None:
    """Issue 17: balancedness today vs vLLM's EPLB on the window's load, per engine (no series
    per expert), the placement in /experts, the answer in /status; recomputed at most every
    eplb_whatif_interval_seconds."""
    from moe_watch.expert_file import CountsFile, write_counts_file
    from moe_watch.serving.views import experts_document, status_document

    target = {"name": "ds", "url": engine_stub.url, "experts": {"directory": str(tmp_path)}}
    clock = Clock()
    config = load_settings(
        None, targets=[target], nvml="off", eplb_whatif_redundant=[0, 2], eplb_whatif_target=0.9
    )

    def write(scale: int) -> None:
        # 4 experts on 2 EP ranks (linear: 0, 1 on rank 0). Layer 0 increases by [6, 2, 1, 1]
        # per step, layer 1 by [1, 1, 1, 1] (the hand-computed case of test_eplb_whatif.py).
        write_counts_file(
            tmp_path / "rank-0.experts.json",
            CountsFile(pid=1, started=1.0, updated=clock.now, model="m", top_k=1, num_experts=4,
                       layers=[0, 1], counts=[[6 * scale, 2 * scale, scale, scale], [scale] * 4],
                       ep_size=2),
        )  # fmt: skip

    async with Agent(config, clock=clock) as agent:
        write(1)
        await agent.run_cycle()
        write(2)
        clock.now += 5
        started = await agent.run_cycle()  # a window: the what-if starts in the background
        computed_at = clock.now
        await agent.settle()
        write(3)
        clock.now += 5
        first = await agent.run_cycle()  # ... and this cycle publishes it
        write(4)
        clock.now += 5
        cached = await agent.run_cycle()  # within the interval: the same what-if
        clock.now += 60
        await agent.run_cycle()  # stale: recomputed in the background ...
        await agent.settle()
        later = await agent.run_cycle()  # ... and published by the next cycle
    assert started.engines[0].experts.whatif is None  # no cycle waits for the what-if
    metrics = exposition(first)
    # Today: layer 0 ranks (8, 2), layer 1 (2, 2): (5 + 2) / (8 + 2).
    assert value(metrics, "moe_watch_expert_rank_balancedness_ratio", engine="ds") == pytest.approx(
        0.7
    )
    assert value(
        metrics,
        "moe_watch_expert_eplb_whatif_balancedness_ratio",
        engine="ds",
        redundant_experts="0",
    ) == pytest.approx(7 / 9)
    assert value(
        metrics,
        "moe_watch_expert_eplb_whatif_balancedness_ratio",
        engine="ds",
        redundant_experts="2",
    ) == pytest.approx(1.0)
    assert value(metrics, "moe_watch_expert_eplb_redundant_needed", engine="ds") == 2
    assert value(
        metrics, "moe_watch_expert_eplb_redundant_needed_balancedness_ratio", engine="ds"
    ) == pytest.approx(1.0)
    assert value(metrics, "moe_watch_expert_eplb_redundant_searched_max", engine="ds") == 2
    whatif_series = [name for name, _ in metrics if "eplb" in name or "rank_balancedness" in name]
    assert len(whatif_series) == 6  # a handful per engine, none per expert
    status = status_document(first)["eplb_whatif"]["ds"]
    assert status["answer"] == (
        "vLLM's EPLB with 2 redundant experts would lift EP-rank balancedness from 0.70 to 1.00 "
        "(target 0.9)."
    )
    assert "layers" not in status  # /status stays small; /experts has the placement
    detail = experts_document(first)["engines"][0]["eplb_whatif"]
    assert detail["layers"][0]["rank_loads_today"] == [8.0, 2.0]
    two = detail["cases"][1]
    assert two["redundant_experts"] == 2
    assert two["layers"][0]["rank_experts"] == [[0, 0, 2], [1, 0, 3]]
    assert two["layers"][0]["rank_loads"] == [5.0, 5.0]
    assert first.engines[0].experts.whatif is not None
    assert first.engines[0].experts.whatif.computed_at == computed_at
    assert cached.engines[0].experts.whatif is first.engines[0].experts.whatif
    assert later.engines[0].experts.whatif is not None
    assert later.engines[0].experts.whatif.computed_at == clock.now  # the stale cycle's time


async def test_no_whatif_without_expert_parallelism(
    engine_stub: EngineStub, tmp_path: Path
) -> None:
    from moe_watch.expert_file import CountsFile, write_counts_file

    target = {"name": "mx", "url": engine_stub.url, "experts": {"directory": str(tmp_path)}}
    clock = Clock()
    config = load_settings(None, targets=[target], nvml="off")
    async with Agent(config, clock=clock) as agent:
        for scale in (1, 2):
            write_counts_file(
                tmp_path / "rank-0.experts.json",
                CountsFile(pid=1, started=1.0, updated=clock.now, model="m", top_k=1,
                           num_experts=2, layers=[0], counts=[[3 * scale, scale]]),
            )  # fmt: skip
            clock.now += 5
            snap = await agent.run_cycle()
    assert snap.engines[0].experts.signals.layers  # the skew signals are there ...
    assert snap.engines[0].experts.whatif is None  # ... but one rank has nothing to rebalance
    assert not [name for name, _ in exposition(snap) if "eplb_whatif" in name]


async def test_a_cycle_never_waits_for_the_eplb_whatif_and_its_failure_stays_contained(
    engine_stub: EngineStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At DeepSeek-V3 scale one what-if costs more than a cycle's CPU budget: cycles go on while
    it runs (publishing the last answer), and a what-if that raises is logged, not raised."""
    import threading

    from moe_watch.agent import engine_target
    from moe_watch.expert_file import CountsFile, write_counts_file

    release, entered = threading.Event(), threading.Event()
    calls: list[int] = []

    def blocking_whatif(*args: object, **kwargs: object) -> object:
        calls.append(1)
        entered.set()
        assert release.wait(10), "never released"
        raise RuntimeError("what-if bug")

    monkeypatch.setattr(engine_target, "eplb_whatif", blocking_whatif)
    target = {"name": "ds", "url": engine_stub.url, "experts": {"directory": str(tmp_path)}}
    clock = Clock()
    config = load_settings(None, targets=[target], nvml="off")

    def write(scale: int) -> None:
        write_counts_file(
            tmp_path / "rank-0.experts.json",
            CountsFile(pid=1, started=1.0, updated=clock.now, model="m", top_k=1, num_experts=4,
                       layers=[0], counts=[[6 * scale, 2 * scale, scale, scale]], ep_size=2),
        )  # fmt: skip

    async with Agent(config, clock=clock) as agent:
        for scale in (1, 2, 3, 4):  # the what-if is blocked from the second cycle on
            write(scale)
            clock.now += 5
            snap = await agent.run_cycle()
            experts = snap.engines[0].experts
            assert experts is None or experts.whatif is None
        assert entered.is_set()
        assert snap.engines[0].experts.signals.layers  # the expert signals flow meanwhile
        release.set()
        await agent.settle()
        after = await agent.run_cycle()
    assert calls == [1]  # one computation in flight at a time, not one per cycle
    assert after.engines[0].experts.whatif is None  # the failure left no answer and raised nothing
    assert value(exposition(after), "moe_watch_expert_skew_ratio", engine="ds", layer="0") > 0
