"""Engines that span nodes: each node's agent exports its own window counts
under `engine_group`, and the shipped recording rules rebuild the engine's expert signals.

The proof: two in-process Agents stand for two nodes, each reading half of one engine's worker
files (DP ranks 0-1 and 2-3), scraped by a real Prometheus with the shipped rules; the
group-level series must equal what one agent reading all four files computes.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.agent import Agent
from moe_watch.alerting.rule_file import render, rule_groups
from moe_watch.config import ExpertsConfig, Settings, TargetConfig
from moe_watch.expert_file import CountsFile, counts_file_name, write_counts_file
from moe_watch.serving.exporter import build_registry
from moe_watch.serving.server import make_app, start_server
from tests.alerting import binary
from tests.conftest import free_port
from tests.serving.test_exporter_and_server import deepseek_v3_snapshot
from tests.test_metrics_lint import promtool_check_metrics

GROUP = "dsv3-group"
LAYERS = [1, 2, 3, 5]
EXPERTS, TOP_K, DP = 32, 4, 4
PLACEMENT = [(e * 3 + e // 8) % DP for e in range(EXPERTS)]  # not vLLM's linear placement
DEADLINE_SECONDS = 45.0


def test_only_group_engines_export_window_counts_and_the_cost_at_deepseek_v3_scale() -> None:
    """Per node, a DeepSeek-V3 engine group adds 58 x 256 window counts, 32 EP-rank sums, 256
    expert ids, top-k and the group info: 15,138 series (docs/experts.md); none without a group."""

    def group_series(snapshot: Any) -> list[Any]:
        text = generate_latest(build_registry(lambda: snapshot)).decode()
        return [
            sample
            for family in text_string_to_metric_families(text)
            if family.name.startswith("moe_watch_expert_group")
            for sample in family.samples
        ]

    assert group_series(deepseek_v3_snapshot()) == []
    series = group_series(deepseek_v3_snapshot(engine_group=GROUP))
    names = [s.name for s in series]
    assert names.count("moe_watch_expert_group_window_tokens") == 58 * 256
    assert names.count("moe_watch_expert_group_rank_window_tokens") == 32
    assert names.count("moe_watch_expert_group_expert_id") == 256
    assert len(series) == 58 * 256 + 32 + 256 + 1 + 1 == 15_138
    assert all(s.labels.get("engine_group") == GROUP for s in series)
    body = generate_latest(build_registry(lambda: deepseek_v3_snapshot(engine_group=GROUP)))
    assert promtool_check_metrics(body) == ""


def write_worker_files(
    directories: dict[str, list[Path]], counts: dict[int, Any], now: float
) -> None:
    """Each DP rank's file into every directory that holds that rank."""
    for dp, rows in counts.items():
        data = CountsFile(
            pid=100 + dp, started=900.0, updated=now, model="dsv3-tiny", top_k=TOP_K,
            num_experts=EXPERTS, layers=LAYERS, counts=rows, dp_rank=dp, ep_rank=dp,
            ep_size=DP, placement=PLACEMENT,
        )  # fmt: skip
        for directory in directories[str(dp)]:
            write_counts_file(directory / counts_file_name("worker", 100 + dp), data)


def traffic(rng: random.Random, scale: int) -> dict[int, list[list[int]]]:
    """Per DP rank, [layer][expert] counts: skewed differently on each rank, with a tie for the
    hottest expert of layer 2 (experts 3 and 7 get the same on every rank)."""
    out = {}
    for dp in range(DP):
        rows = []
        for li, _ in enumerate(LAYERS):
            row = [rng.randrange(scale) * (1 + (e + dp) % (3 + li)) for e in range(EXPERTS)]
            if li == 1:
                row[3] = row[7] = 10 * scale
            rows.append(row)
        out[dp] = rows
    return out


@pytest.fixture
async def three_agents(tmp_path: Path) -> AsyncIterator[dict[str, Agent]]:
    """Two nodes of one engine group (DP ranks 0-1 and 2-3) and one agent reading all four
    files as a single-node engine, advanced through the same two cycles on one clock."""
    dirs = {name: tmp_path / name for name in ("node-a", "node-b", "whole")}
    for directory in dirs.values():
        directory.mkdir()
    holders = {"0": [dirs["node-a"], dirs["whole"]], "1": [dirs["node-a"], dirs["whole"]],
               "2": [dirs["node-b"], dirs["whole"]], "3": [dirs["node-b"], dirs["whole"]]}  # fmt: skip
    down = f"http://127.0.0.1:{free_port()}"  # no engine /metrics: only expert counts matter here

    def settings(name: str, directory: Path, group: str | None) -> Settings:
        experts = ExpertsConfig(directory=directory, engine_group=group)
        return Settings(targets=(TargetConfig(name=name, url=down, experts=experts),), nvml="off")

    now = [1000.0]
    agents = {
        "node-a": Agent(settings("dsv3", dirs["node-a"], GROUP), clock=lambda: now[0]),
        "node-b": Agent(settings("dsv3", dirs["node-b"], GROUP), clock=lambda: now[0]),
        "whole": Agent(settings("dsv3-whole", dirs["whole"], None), clock=lambda: now[0]),
    }
    rng = random.Random(7)
    before = traffic(rng, 50)
    after = {dp: [[c + d for c, d in zip(r0, r1, strict=True)] for r0, r1 in zip(before[dp], traffic(rng, 400)[dp], strict=True)] for dp in before}  # fmt: skip
    for agent in agents.values():
        await agent.__aenter__()
    try:
        for counts in (before, after):
            write_worker_files(holders, counts, now[0])
            for agent in agents.values():
                await agent.run_cycle()
            now[0] += 5.0
        yield agents
    finally:
        for agent in agents.values():
            await agent.__aexit__(None, None, None)


def expected(agent: Agent) -> dict[str, dict[tuple[str, ...], float]]:
    """The unified series' values, keyed like the Prometheus answers, from one agent's snapshot."""
    assert agent.snapshot is not None
    (view,) = [r.experts for r in agent.snapshot.engines if r.experts is not None]
    signals = view.signals
    assert len(signals.layers) == len(LAYERS)
    out: dict[str, dict[tuple[str, ...], float]] = {
        "expert_skew_ratio": {(str(x.layer),): x.skew for x in signals.layers},
        "expert_max_token_share": {(str(x.layer),): x.max_share for x in signals.layers},
        "expert_load_rank_token_share": {},
        "expert_load_rank_expert_id": {},
        "expert_rank_load_ratio": {(str(r),): v for r, v in signals.rank_load.items()},
        "expert_max_skew_ratio": {(): signals.max_skew or 0.0},
    }
    for x in signals.layers:
        for rank, (expert, share) in enumerate(x.ranked, start=1):
            out["expert_load_rank_token_share"][(str(x.layer), str(rank))] = share
            out["expert_load_rank_expert_id"][(str(x.layer), str(rank))] = expert
    return out


KEYS = {
    "expert_skew_ratio": ("layer",),
    "expert_max_token_share": ("layer",),
    "expert_load_rank_token_share": ("layer", "load_rank"),
    "expert_load_rank_expert_id": ("layer", "load_rank"),
    "expert_rank_load_ratio": ("rank",),
    "expert_max_skew_ratio": (),
}


async def query(session: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    async with session.get(url + "/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def differences(got: dict[tuple[str, ...], float], want: dict[tuple[str, ...], float]) -> list[str]:
    if got.keys() != want.keys():
        return [f"keys {sorted(got)} != {sorted(want)}"]
    return [
        f"{k}: {got[k]} != {want[k]}" for k in want if got[k] != pytest.approx(want[k], rel=1e-9)
    ]


def start_prometheus(
    tmp_path: Path, targets: list[dict[str, Any]]
) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus on 127.0.0.1 scraping ``targets`` every second with the shipped rules."""
    rules = tmp_path / "rules.yml"
    rules.write_text(render(rule_groups(interval="1s"), "test copy"))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "moe-watch", "static_configs": targets}],
    }))  # fmt: skip
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return prometheus, f"http://127.0.0.1:{port}"


async def test_two_nodes_of_one_engine_give_prometheus_the_engine_level_expert_signals(
    tmp_path: Path, three_agents: dict[str, Agent]
) -> None:
    want = expected(three_agents["whole"])
    node_a = expected(three_agents["node-a"])
    assert node_a["expert_skew_ratio"] != want["expert_skew_ratio"]  # per node is not the engine
    assert want["expert_load_rank_expert_id"][("2", "1")] == 3  # the tie goes to the lower id
    assert want["expert_load_rank_expert_id"][("2", "2")] == 7

    runners, targets = [], []
    for name, agent in three_agents.items():
        runner, url = await start_server(make_app(lambda a=agent: a.snapshot), "127.0.0.1", 0)
        runners.append(runner)
        targets.append({"targets": [url.removeprefix("http://")], "labels": {"node": name}})
    prometheus, prom_url = start_prometheus(tmp_path, targets)
    problems: dict[str, list[str]] = {}
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                problems = {}
                try:
                    for name, labels in KEYS.items():
                        for engine, selector, reference in (
                            (GROUP, f'engine_group="{GROUP}"', want),  # rebuilt from 2 nodes
                            ("dsv3-whole", 'engine="dsv3-whole"', want),  # single node, as today
                        ):
                            result = await query(
                                session, prom_url, f"moe_watch:{name}{{{selector}}}"
                            )
                            assert all(r["metric"]["engine"] == engine for r in result)
                            got = {
                                tuple(r["metric"][k] for k in labels): float(r["value"][1])
                                for r in result
                            }
                            if diff := differences(got, reference[name]):
                                problems[f"{name} {engine}"] = diff[:3]
                        # a node's partial view of the group never reaches the alerts
                        if await query(session, prom_url, f'moe_watch:{name}{{engine="dsv3"}}'):
                            problems[f"{name} dsv3"] = ["per-node series of a group engine"]
                except aiohttp.ClientError as exc:  # Prometheus still starting
                    problems = {"connect": [str(exc)]}
                if not problems:
                    break
                await asyncio.sleep(0.5)  # poll interval; the deadline bounds the loop
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)
        for runner in runners:
            await runner.cleanup()
    assert not problems, problems


def test_engine_group_is_a_stable_id_and_unset_by_default(tmp_path: Path) -> None:
    from pydantic import ValidationError

    assert ExpertsConfig(directory=tmp_path).engine_group is None
    assert ExpertsConfig(directory=tmp_path, engine_group="lws/dsv3-0").engine_group == "lws/dsv3-0"
    with pytest.raises(ValidationError, match="engine_group"):
        ExpertsConfig(directory=tmp_path, engine_group="two words")
