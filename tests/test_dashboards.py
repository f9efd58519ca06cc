"""Dashboards: generated from code, structurally sound, and every panel query returns data from a
real Prometheus scraping `moe-watch demo`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from moe_watch.dashboards.build import substitute_all
from moe_watch.dashboards.definitions import DASHBOARDS, generated_files
from moe_watch.rules import RECORDING, render, rule_groups
from tests.conftest import free_port
from tests.test_alerts_e2e import binary

ROOT = Path(__file__).resolve().parents[1]


def all_dashboards() -> list[dict[str, Any]]:
    return [make() for make in DASHBOARDS.values()]


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"]) for panel in board["panels"] for target in panel["targets"]
    ]


def test_committed_dashboards_are_what_the_code_generates() -> None:
    for relative, text in generated_files().items():
        assert (ROOT / relative).read_text() == text, (
            f"{relative} is stale: run `moe-watch dashboards --out .`"
        )


@pytest.mark.parametrize("board", all_dashboards(), ids=lambda b: b["uid"])
def test_structure(board: dict[str, Any]) -> None:
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert panel["description"], f"{panel['title']} has no description"
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[0] == "datasource"
    text = json.dumps(board["panels"]) + json.dumps(board["templating"])
    for name in names:
        assert f"${name}" in text or f"${{{name}}}" in text, f"variable {name} is never used"
    assert board["schemaVersion"] >= 39


def test_every_metric_a_panel_reads_is_exported_or_recorded() -> None:
    from prometheus_client import generate_latest

    from moe_watch.exporter import build_registry
    from tests.test_exporter_and_server import deepseek_v3_snapshot, snapshot

    exported: set[str] = set()
    for snap in (snapshot(), deepseek_v3_snapshot()):
        text = generate_latest(
            build_registry(lambda snap=snap: snap, expert_full_detail=True)
        ).decode()
        exported |= set(re.findall(r"^# TYPE (\w+)", text, re.MULTILINE))
    exported |= {n + "_total" for n in exported} | {r for r, _ in RECORDING} | {"ALERTS"}
    for board in all_dashboards():
        for title, expr in queries(board):
            for name in re.findall(r"\b(moe_watch[:_][a-z_:]+|ALERTS)\b", expr):
                assert name in exported, f"{board['uid']} / {title}: {name} is not exported"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[str]:
    """moe-watch demo (hot expert) scraped every second by a real Prometheus with the shipped rules."""
    demo_port, prom_port = free_port(), free_port()
    rules = tmp_path / "rules.yml"
    rules.write_text(render(rule_groups(interval="1s"), "test copy"))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "moe-watch", "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}]}],
    }))  # fmt: skip
    logs = [(tmp_path / n).open("wb") for n in ("demo.log", "prometheus.log")]
    procs = [
        subprocess.Popen([sys.executable, "-m", "moe_watch.cli", "demo", "--listen", f"127.0.0.1:{demo_port}", "--interval", "1"], stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen([binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=logs[1], stderr=subprocess.STDOUT),
    ]  # fmt: skip
    yield f"http://127.0.0.1:{prom_port}"
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


async def test_every_panel_query_returns_data_from_a_real_prometheus(stack: str) -> None:
    pending = {
        (b["uid"], title): substitute_all(expr)
        for b in all_dashboards()
        for title, expr in queries(b)
    }
    errors: dict[tuple[str, str], str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(90):  # bounded: about a minute and a half for scrapes, windows and rules
            for key, expr in list(pending.items()):
                try:
                    async with session.get(
                        stack + "/api/v1/query", params={"query": expr}
                    ) as response:
                        body = await response.json()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors[key] = str(exc)
                    continue
                if body.get("status") != "success":
                    errors[key] = body.get("error", "")
                    assert body.get("errorType") != "bad_data", (
                        f"{key}: PromQL does not parse: {errors[key]}"
                    )
                elif body["data"]["result"]:
                    del pending[key]
            if not pending:
                break
            await asyncio.sleep(1)
    assert not pending, f"panels without data: {sorted(pending)}; last errors: {errors}"
