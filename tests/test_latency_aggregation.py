"""Fleet latency percentiles are percentiles of every request: the dashboards' PromQL, evaluated
by the real promtool over two engines' re-published buckets, equals histogram_quantile over
their summed buckets, not the max of the engines' P95s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_watch.alerting.promtool_tests import histogram_series
from moe_watch.dashboards.build import substitute_all
from moe_watch.dashboards.definitions import DASHBOARDS
from tests.test_rules import promtool_test

BUCKET = "moe_watch_e2e_request_latency_seconds_bucket"
FLEET_P95 = "Fleet end-to-end latency P95 / P99 by model"
BOUNDS = (1.0, 10.0, 30.0)
# Per minute: engine "fast" (node n1) finishes 100 requests, all within 1 s; engine "slow"
# (node n2) 20, all between 10 and 30 s. Summed: 120, of which 100 below 1 s, so the P95
# (rank 114) lies in (10, 30]: 10 + 20 x (114 - 100) / 20 = 24 s. The slow engine's own P95 is
# 10 + 20 x 0.95 = 29 s, the fast one's 0.95 s: a max of P95s says 29.
FLEET = 24.0
MAX_OF_P95S = 29.0


def two_engines() -> list[dict[str, str]]:
    fast = BUCKET + '{cluster="c",node="n1",engine="fast",model="m"}'
    slow = BUCKET + '{cluster="c",node="n2",engine="slow",model="m"}'
    return histogram_series(fast, BOUNDS, (100, 100, 100, 100)) + histogram_series(
        slow, BOUNDS, (0, 0, 20, 20)
    )


def panel_target(board: dict[str, Any], title: str, index: int = 0) -> str:
    [panel] = [p for p in board["panels"] if p.get("title") == title]
    return str(panel["targets"][index]["expr"])


def evaluate(tmp_path: Path, expr: str, label: str, expected: dict[str, float]) -> str:
    """promtool's verdict on ``expr`` giving, per value of ``label``, the value in ``expected``
    (to 1e-9) at 10m, and no other series."""
    want = " or ".join(
        f'label_replace(vector({value!r}), "{label}", "{name}", "", "")'
        for name, value in expected.items()
    )
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": two_engines(),
                "promql_expr_test": [
                    {
                        "expr": f"abs(({expr}) - on({label}) ({want})) < bool 1e-9",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": f'{{{label}="{name}"}}', "value": 1} for name in expected
                        ],
                    }
                ],
            }
        ],
    }
    return promtool_test(tmp_path, {"groups": []}, tests)


def test_the_fleet_p95_panel_is_the_quantile_of_the_summed_buckets(tmp_path: Path) -> None:
    expr = panel_target(DASHBOARDS["fleet"](), FLEET_P95)
    assert "sum by (le, model)" in expr
    assert f"rate({BUCKET}{{" in expr
    output = evaluate(tmp_path, substitute_all(expr), "model", {"m": FLEET})
    assert output.startswith("SUCCESS"), output
    # A max of per-engine P95s (what the fleet panel drew before) says 29 s, not 24 s.
    per_engine = f"max by (model) (histogram_quantile(0.95, sum by (le, engine, model) (rate({BUCKET}[5m]))))"
    assert evaluate(tmp_path, per_engine, "model", {"m": MAX_OF_P95S}).startswith("SUCCESS")
    assert evaluate(tmp_path, per_engine, "model", {"m": FLEET}).startswith("FAILED")


def test_the_engine_panels_give_each_engine_its_own_percentile(tmp_path: Path) -> None:
    expr = panel_target(DASHBOARDS["engine"](), "End-to-end latency P50 / P95 / P99", 1)
    assert "histogram_quantile(0.95, sum by (le, engine)" in expr
    expected = {"fast": 0.95, "slow": MAX_OF_P95S}
    output = evaluate(tmp_path, substitute_all(expr), "engine", expected)
    assert output.startswith("SUCCESS"), output


def test_every_latency_panel_reads_bucket_rates_over_the_rate_interval() -> None:
    quantile_queries = [
        str(target["expr"])
        for make in DASHBOARDS.values()
        for panel in make()["panels"]
        for target in panel.get("targets", [])
        if "histogram_quantile" in str(target["expr"])
    ]
    assert len(quantile_queries) >= 10
    for expr in quantile_queries:
        assert "_bucket{" in expr, expr
        assert "[$__rate_interval]" in expr, expr
        assert "sum by (le" in expr, expr
    assert not any(
        "moe_watch_latency_seconds" in yaml.safe_dump(make()) for make in DASHBOARDS.values()
    )
