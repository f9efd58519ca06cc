"""Dashboards: generated from code, structurally sound, and every panel query returns data from a
real Prometheus scraping `moe-watch demo`."""

from __future__ import annotations

import ast
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

from moe_watch.alerting.config import RulesConfig
from moe_watch.alerting.promql import RECORDING
from moe_watch.alerting.rule_file import render, rule_groups
from moe_watch.dashboards.build import substitute_all
from moe_watch.dashboards.definitions import DASHBOARDS
from moe_watch.thresholds import DEFAULT
from tests.alerting import binary
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def all_dashboards() -> list[dict[str, Any]]:
    return [make() for make in DASHBOARDS.values()]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that draw data (row headers left out)."""
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"]) for panel in panels(board) for target in panel["targets"]
    ]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, selector, label) of each `label_values(selector, label)` variable."""
    out = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
            assert found, f"{variable['name']}: not a label_values() query"
            out.append((variable["name"], found.group(1), found.group(2)))
    return out


@pytest.mark.parametrize("board", all_dashboards(), ids=lambda b: b["uid"])
def test_structure(board: dict[str, Any]) -> None:
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        if panel["type"] == "row":  # an open row: full width, its panels follow it
            assert (grid["x"], grid["w"], grid["h"], panel["panels"]) == (0, 24, 1, [])
            assert panel.get("repeat", "engine") in [v["name"] for v in board["templating"]["list"]]
            cells |= {(x, grid["y"]) for x in range(24)}
            continue
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


def test_selectors_pick_the_node_by_its_node_label_and_rates_use_rate_interval() -> None:
    for board in all_dashboards():
        selectors = [(v, sel) for v, sel, _ in variable_queries(board)] + [
            (title, sel)
            for title, expr in queries(board)
            for sel in re.findall(r"moe_watch_\w+\{[^}]*\}", expr)
        ]
        assert selectors
        for where, selector in selectors:
            assert "instance" not in selector, f"{board['uid']} / {where}: {selector}"
            if where not in ("cluster", "node"):  # the variables that choose the node
                assert 'node=~"$node"' in selector, f"{board['uid']} / {where}: {selector}"
        assert ("node", 'moe_watch_build_info{cluster=~"$cluster"}', "node") in variable_queries(
            board
        )
        for title, expr in queries(board):
            windows = re.findall(r"\b(?:rate|increase|irate)\([^()]*\[([^\]]+)\]", expr)
            assert all(w == "$__rate_interval" for w in windows), f"{title}: {windows}"
            assert not re.search(r"\[\d+[smhd]\]", expr), f"{title}: a fixed range in {expr}"


def test_no_panel_keys_a_series_by_a_moving_expert_label() -> None:
    """Contract v1: skew and max share have no `expert` label; hot experts come from load ranks."""
    for board in all_dashboards():
        for panel in panels(board):
            for target in panel["targets"]:
                if re.search(r"expert_(skew|max_token_share|load_rank)", target["expr"]):
                    assert "expert" not in re.findall(r"\{\{(\w+)\}\}", target["legendFormat"])


def test_every_threshold_comes_from_thresholds_py() -> None:
    tree = ast.parse((ROOT / "moe_watch/dashboards/definitions.py").read_text())
    floats = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is float
    ]
    assert not floats, f"threshold literals in definitions.py: {floats} (use moe_watch.thresholds)"
    known = {float(getattr(DEFAULT, name)) for name in DEFAULT.__dataclass_fields__}
    known |= {1 + DEFAULT.expert_skew_healthy}  # EP-rank load: 20 % above the mean rank
    steps = [
        (board["uid"], panel["title"], step["value"])
        for board in all_dashboards()
        for panel in panels(board)
        for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        if step["value"] is not None
    ]
    assert steps
    assert [s for s in steps if s[2] not in known] == []


def test_the_layer_grid_is_a_coloured_layer_x_load_rank_table_per_engine() -> None:
    """Grafana's heatmap puts time on x: the layer x expert view is a table pivoted by
    groupingToMatrix with colour-background cells, one per engine (a repeated row)."""
    board = DASHBOARDS["experts"]()
    by_title = {panel["title"]: panel for panel in board["panels"]}
    grid = by_title["Token share, layer x load rank"]
    assert grid["type"] == "table"
    [target] = grid["targets"]  # groupingToMatrix takes exactly one frame
    assert target["instant"]
    assert target["format"] == "table"
    assert "moe_watch:expert_load_rank_token_share" in target["expr"]
    assert "by (layer, load_rank)" in target["expr"]  # one value per cell
    ids = [t["id"] for t in grid["transformations"]]
    matrix = grid["transformations"][ids.index("groupingToMatrix")]["options"]
    assert matrix == {"rowField": "layer", "columnField": "load_rank", "valueField": "Value"}
    assert ids.index("sortBy") < ids.index("groupingToMatrix") < ids.index("organize")
    defaults = grid["fieldConfig"]["defaults"]
    assert defaults["custom"]["cellOptions"] == {"type": "color-background"}
    assert {"color": "red", "value": DEFAULT.expert_collapse_share} in defaults["thresholds"][
        "steps"
    ]
    row = board["panels"][board["panels"].index(grid) - 1]
    assert (row["type"], row["repeat"]) == ("row", "engine")
    beside = board["panels"][board["panels"].index(grid) + 1]
    assert "moe_watch:expert_load_rank_expert_id" in beside["targets"][0]["expr"]
    assert beside["gridPos"]["y"] == grid["gridPos"]["y"]


def test_every_metric_a_panel_reads_is_exported_or_recorded() -> None:
    from prometheus_client import generate_latest

    from moe_watch.serving.exporter import build_registry
    from tests.serving.test_exporter_and_server import deepseek_v3_snapshot, snapshot

    exported: set[str] = set()
    for snap in (snapshot(), deepseek_v3_snapshot(engine_group="dsv3-group")):
        text = generate_latest(
            build_registry(lambda snap=snap: snap, expert_full_detail=True)
        ).decode()
        for name, kind in re.findall(r"^# TYPE (\w+) (\w+)", text, re.MULTILINE):
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            exported |= {name + suffix for suffix in suffixes}
    recorded = {r["record"] for g in rule_groups()["groups"] for r in g["rules"] if "record" in r}
    assert {r for r, _ in RECORDING} <= recorded
    exported |= {n + "_total" for n in exported} | recorded | {"ALERTS"}
    for board in all_dashboards():
        for title, expr in queries(board):
            for name in re.findall(r"\b(moe_watch[:_][a-z0-9_:]+|ALERTS)\b", expr):
                assert name in exported, f"{board['uid']} / {title}: {name} is not exported"


# The forecasts fit 30-60 minutes and want half of that as history; at test speed they fit 20 s
# of the demo filling up from empty (the shipped windows are checked by promtool, test_rules.py).
FAST_FORECASTS = RulesConfig(
    thresholds={
        "kv_cache_forecast_window_seconds": 20,
        "kv_cache_forecast_min_rise_per_hour": 0,
        "budget_forecast_window_seconds": 20,
        "budget_forecast_min_rise_per_hour": 0,
    }
)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[str]:
    """moe-watch demo (hot expert) scraped every second by a real Prometheus with the shipped rules."""
    demo_port, prom_port = free_port(), free_port()
    rules = tmp_path / "rules.yml"
    rules.write_text(render(rule_groups(FAST_FORECASTS, interval="1s"), "test copy"))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        # `node` as the ServiceMonitor's relabeling from __meta_kubernetes_pod_node_name sets it
        "scrape_configs": [{"job_name": "moe-watch", "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"], "labels": {"node": "gpu-node-1"}}]}],
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
    pending: dict[tuple[str, str], tuple[str, str | None]] = {
        (b["uid"], title): (substitute_all(expr), None)
        for b in all_dashboards()
        for title, expr in queries(b)
    } | {  # each variable has values: its selector returns series that carry its label
        (b["uid"], f"${name}"): (substitute_all(sel), label)
        for b in all_dashboards()
        for name, sel, label in variable_queries(b)
        if label != "cluster"  # an external label of a multi-cluster setup; absent here
    }
    errors: dict[tuple[str, str], str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(90):  # bounded: about a minute and a half for scrapes, windows and rules
            for key, (expr, label) in list(pending.items()):
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
                elif any(label is None or r["metric"].get(label) for r in body["data"]["result"]):
                    del pending[key]
            if not pending:
                break
            await asyncio.sleep(1)
    assert not pending, f"panels without data: {sorted(pending)}; last errors: {errors}"


def test_every_dashboard_marks_firing_moe_alerts_on_its_time_series() -> None:
    for board in all_dashboards():
        [annotation] = board["annotations"]["list"]
        assert annotation["enable"] is True
        assert annotation["datasource"]["uid"] == "${datasource}"
        expr = annotation["target"]["expr"]
        assert expr.startswith("ALERTS{")
        assert 'alertstate="firing"' in expr
        assert 'alertname=~"MoE.*"' in expr
        assert annotation["titleFormat"] == "{{alertname}}"


def test_the_panels_sres_look_for_are_there() -> None:
    titles = {board["uid"]: {p["title"] for p in panels(board)} for board in all_dashboards()}
    exprs = {board["uid"]: " ".join(e for _, e in queries(board)) for board in all_dashboards()}
    assert {
        "Queue time P50 / P95 / P99",
        "Requests per second by finish reason",
        "Prompt and generation length P50 / P95",
    } <= titles["moe-watch-engine"]
    assert {
        "Request rate by model",
        "Errors and aborts by model",
        "Sources up",
        "Collection errors per second",
        "Agent cycle time",
        "Parts left out of /metrics",
        "GPU Xid errors",
    } <= titles["moe-watch-fleet"]
    assert "Xid errors" in titles["moe-watch-gpus"]
    for name in ("request_queue_time_seconds_bucket", "requests_finished_total",
                 "request_prompt_tokens_bucket", "request_generation_tokens_bucket"):  # fmt: skip
        assert f"moe_watch_{name}" in exprs["moe-watch-engine"], name
    for name in ("source_up", "collect_errors_total", "cycle_duration_seconds", "render_failed",
                 "gpu_xid_errors_total"):  # fmt: skip
        assert f"moe_watch_{name}" in exprs["moe-watch-fleet"], name
