"""An alert is about the thing watched (cluster, node, engine, layer, GPU ...), never about the
agent that watches it: no alert carries the agent's `pod` or `instance`, which change on every
DaemonSet rollout and would make a replaced agent's alert a new one (a resolve, then a new page).

Every alert's promtool fixture is run again with the labels a cluster's scrape puts on the agent's
series (the Prometheus Operator's target labels plus the ServiceMonitor's `node`), and the firing
ALERTS series must carry exactly the fixture's labels plus the agent's stable ones: `node` and the
Operator's job/namespace/service/container/endpoint, not `pod` and not `instance`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from moe_watch.alerting.promtool_tests import promtool_tests
from moe_watch.alerting.rule_file import rule_groups
from tests.test_rules import promtool_test

# What the Operator's relabeling (tests/operator_scrape.py) puts on every series of one agent.
AGENT_TARGET = {
    "container": "moe-watch",
    "endpoint": "metrics",
    "instance": "10.0.0.5:9400",
    "job": "moe-watch",
    "namespace": "monitoring",
    "node": "gpu-node-a",
    "pod": "moe-watch-4xk9p",
    "service": "moe-watch",
}
THE_WATCHER = ("pod", "instance")
# absent() builds its labels from its selector: there is no agent series to inherit from.
OWN_LABELS = {"MoEWatchAbsent"}


def _parse(series: str) -> tuple[str, dict[str, str]]:
    name, _, rest = series.partition("{")
    return name, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _scraped(series: str) -> str:
    """``series`` as one agent's scrape labels it; another job's series stays as it is."""
    name, labels = _parse(series)
    if labels.get("job", "moe-watch") != "moe-watch":
        return series
    return _series(name, AGENT_TARGET | labels)


def _as_alerts_query(rule_test: dict[str, Any]) -> dict[str, Any]:
    """An alert_rule_test as a query of the firing ALERTS series: the labels, all of them,
    nothing of the annotations (which may quote any label)."""
    name = rule_test["alertname"]
    samples = []
    for alert in rule_test["exp_alerts"]:
        labels = dict(alert["exp_labels"])
        if name not in OWN_LABELS:
            stable = {k: v for k, v in AGENT_TARGET.items() if k not in THE_WATCHER}
            labels = stable | labels
            for label in THE_WATCHER:
                labels.pop(label, None)
        labels |= {"alertname": name, "alertstate": "firing"}
        samples.append({"labels": _series("ALERTS", labels), "value": 1})
    return {
        "expr": f'ALERTS{{alertname="{name}",alertstate="firing"}}',
        "eval_time": rule_test["eval_time"],
        "exp_samples": samples,
    }


def scraped_fixture_tests() -> dict[str, Any]:
    """The generated promtool tests of every alert, their input series scraped from one agent."""
    tests = copy.deepcopy(promtool_tests())
    tests["tests"] = [
        {
            "interval": test["interval"],
            "input_series": [{**s, "series": _scraped(s["series"])} for s in test["input_series"]],
            "promql_expr_test": [_as_alerts_query(t) for t in test["alert_rule_test"]],
        }
        for test in tests["tests"]
        if "alert_rule_test" in test
    ]
    return tests


def test_no_alert_carries_the_agents_pod_or_instance(tmp_path: Path) -> None:
    tests = scraped_fixture_tests()
    assert len(tests["tests"]) >= 29  # every alert's own test, and the defect tests
    output = promtool_test(tmp_path, rule_groups(), tests)
    assert output.startswith("SUCCESS"), output[:6000]
