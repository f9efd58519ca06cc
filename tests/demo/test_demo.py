"""The simulated engine served over HTTP misbehaves on demand; `moe-watch demo` shows every family."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_watch.agent import Agent
from moe_watch.config import load_settings
from moe_watch.demo.exposition import render_exposition
from moe_watch.demo.run import DEMO_PLAN
from moe_watch.demo.scenarios import SCENARIOS
from moe_watch.demo.simulated_engine import EngineSim
from moe_watch.demo.simulated_engine_server import SimServer, start_engine_server
from moe_watch.drift import find_drift, running_from
from moe_watch.sizing.plan import PlanFile
from moe_watch.sources.exposition import parse_engine_exposition


async def scrape_once(server: SimServer, **settings: object) -> tuple[bool, dict[str, int]]:
    config = load_settings(None, targets=[f"sim={server.url}"], nvml="off", **settings)
    async with Agent(config) as agent:
        snap = await agent.run_cycle()
    status = next(s for s in snap.sources if s.name == "engine:sim")
    return snap.targets_up["sim"], dict(status.errors_total)


@pytest.mark.parametrize(
    ("knob", "value", "reason"),
    [
        ("fail_status", 503, "http_status"),
        ("garbage", b"\x00\x01 binary junk \xff", "encoding"),
        ("truncate_at", 700, "truncated"),
        ("huge_body_bytes", 4 * 1024 * 1024, "body_too_large"),
        ("delay_seconds", 30.0, "timeout"),
    ],
)
async def test_each_fault_knob_is_seen_by_the_agent_as_its_reason(
    knob: str, value: object, reason: str
) -> None:
    server = await start_engine_server(
        EngineSim(SCENARIOS["normal"], start_time=0.0), clock=lambda: 60.0
    )
    try:
        assert await scrape_once(server) == (True, {})
        setattr(server, knob, value)
        up, errors = await asyncio.wait_for(
            scrape_once(server, scrape_timeout_seconds=0.3, max_body_bytes=1024 * 1024), timeout=10
        )
    finally:
        await server.stop()
    assert up is False
    assert errors.get(reason) == 1


def test_the_demo_prints_its_url_and_every_agent_core_family() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_watch.cli",
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "moe-watch demo: serving http://127.0.0.1:" in result.stdout
    families = {
        line.split()[0] for line in result.stdout.splitlines() if line.startswith("  moe_watch_")
    }
    for family in (
        "moe_watch_gpu_utilization_ratio",
        "moe_watch_gpu_memory_used_ratio",
        "moe_watch_gpu_up",
        "moe_watch_kv_cache_usage_ratio",
        "moe_watch_kv_cache_hit_ratio",
        "moe_watch_kv_cache_free_tokens",
        "moe_watch_e2e_request_latency_seconds",
        "moe_watch_requests_finished",
        "moe_watch_requests_running",
        "moe_watch_requests_waiting",
        "moe_watch_target_up",
        "moe_watch_generation_tokens_per_second",
        "moe_watch_preemptions_per_second",
        "moe_watch_engine_gpu_utilization_spread_ratio",
        "moe_watch_expert_skew_ratio",
        "moe_watch_expert_max_token_share",
        "moe_watch_expert_load_rank_token_share",
        "moe_watch_expert_load_rank_expert_id",
        "moe_watch_expert_layers_observed",
        "moe_watch_expert_rank_balancedness_ratio",
        "moe_watch_expert_eplb_whatif_balancedness_ratio",
        "moe_watch_expert_all2all_seconds",
        "moe_watch_gpu_nvlink_links_up",
        "moe_watch_gpu_pcie_link_generation",
        "moe_watch_engine_interconnect_info",
        "moe_watch_sized_budget_bytes",
        "moe_watch_config_drift",
        "moe_watch_expert_rank_load_ratio",
    ):
        assert family in families, family


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_demo_plan_drifts_only_where_the_demo_means_it_to(name: str) -> None:
    """Every scenario runs with the plan's max_model_len and max_num_seqs; gpu_memory_utilization
    (0.9 running, 0.85 planned) is the one drift the demo shows on purpose."""
    sim = EngineSim(SCENARIOS[name], start_time=0.0)
    sim.advance(30.0)
    info = parse_engine_exposition(render_exposition(sim), "vllm").info
    (model,) = sim.models_json()["data"]  # type: ignore[misc]
    running = running_from(info, None, model["max_model_len"], SCENARIOS[name].gpu_count)
    plan = PlanFile.model_validate(yaml.safe_load(DEMO_PLAN))
    assert plan.vllm.max_model_len == running.max_model_len == SCENARIOS[name].max_model_len
    assert plan.vllm.max_num_seqs == SCENARIOS["normal"].max_num_seqs
    assert [d.setting for d in find_drift(running, plan)] == ["gpu_memory_utilization"]


def test_a_pod_that_is_not_namespace_slash_pod_is_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moe_watch.cli", "demo", "--pod", "just-a-pod", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid setting 'pod'" in result.stderr


@pytest.mark.parametrize(
    ("name", "link", "slow"), [("slow_link", "pcie", True), ("hot_expert", "nvlink", False)]
)
async def test_the_slow_link_scenario_shows_pcie_a_slow_all2all_and_the_drift(
    tmp_path: Path, name: str, link: str, slow: bool
) -> None:
    from moe_watch.demo.fake_nvml import FakeNvml
    from moe_watch.demo.run import All2AllSim, drive_gpus, write_expert_counts
    from moe_watch.thresholds import DEFAULT
    from tests.test_agent import exposition, value

    scenario = SCENARIOS[name]
    sim = EngineSim(scenario, start_time=0.0)
    sim.advance(120.0)
    server = await start_engine_server(sim)
    fake = FakeNvml.with_gpus(scenario.gpu_count)
    all2all = All2AllSim(scenario)
    config = load_settings(
        None,
        targets=[
            {
                "name": "demo",
                "url": server.url,
                "experts": {"source": "plugin", "directory": str(tmp_path)},
            }
        ],
    )
    try:
        async with Agent(config, nvml=fake) as agent:
            for step in range(2):
                sim.advance(120.0 + 5 * step)
                drive_gpus(fake, sim, 5.0 * step, 5.0)
                all2all.advance(5.0, busy=True)
                write_expert_counts(tmp_path, sim, all2all)
                snap = await agent.run_cycle()
    finally:
        await server.stop()
    m = exposition(snap)
    p95 = value(m, "moe_watch_expert_all2all_seconds", engine="demo", quantile="0.95")
    assert (p95 > DEFAULT.all2all_seconds) is slow, p95
    assert value(m, "moe_watch_engine_interconnect_info", engine="demo", interconnect=link) == 1
    assert value(m, "moe_watch_config_drift", engine="demo", setting="interconnect") == int(slow)
    links = value(m, "moe_watch_gpu_nvlink_links_up", engine="demo", gpu="0")
    assert (links == 0) is slow
    if not slow:
        assert value(m, "moe_watch_gpu_nvlink_transmit_bytes_total", engine="demo", gpu="0") > 0
