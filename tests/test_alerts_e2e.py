"""Real Prometheus scrapes `moe-watch demo` (hot expert), evaluates the shipped rules, and a real
Alertmanager pages a PagerDuty Events v2 receiver on 127.0.0.1 that names engine, layer, expert.

The rules are the shipped ones with `for:` shortened to 0s and a 1 s evaluation interval (test
speed only); the Alertmanager config is the shipped example with the PagerDuty URL pointed here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from moe_watch.alerting.rule_file import render, rule_groups
from tests.alerting import (
    PagerDutyReceiver,
    Processes,
    alertmanager_config,
    prometheus_config,
    start_alertmanager,
    start_prometheus,
    wait_until,
)
from tests.conftest import free_port

DEADLINE_SECONDS = 120


async def test_a_hot_expert_pages_pagerduty_with_engine_layer_expert_and_runbook(
    tmp_path: Path,
    pagerduty: tuple[PagerDutyReceiver, str],
    processes: Processes,
) -> None:
    receiver, receiver_url = pagerduty
    demo_port, prom_port, am_port = free_port(), free_port(), free_port()
    rules = tmp_path / "rules.yml"
    rules.write_text(render(rule_groups(for_override="0s", interval="1s"), "test copy"))
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump(alertmanager_config(receiver_url)))
    prom_config = tmp_path / "prometheus.yml"
    scrape = {"job_name": "moe-watch", "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}]}
    prom_config.write_text(
        yaml.safe_dump(prometheus_config(rules, f"127.0.0.1:{am_port}", [scrape]))
    )
    processes.start("demo", sys.executable, "-m", "moe_watch.cli", "demo", "--scenario",
                    "hot_expert", "--listen", f"127.0.0.1:{demo_port}", "--interval", "1")  # fmt: skip
    start_alertmanager(processes, am_config, am_port)
    start_prometheus(processes, prom_config, prom_port)

    def expert_pages() -> list[dict[str, Any]]:
        return [
            e
            for e in receiver.events
            if "expert" in str(e.get("payload", {}).get("summary", "")).lower()
        ]

    async def paged() -> bool:
        return bool(expert_pages())

    await wait_until(paged, DEADLINE_SECONDS, "an expert page", processes,
                     woken_by=receiver.arrived, seen=lambda: receiver.events)  # fmt: skip
    page = expert_pages()[0]
    assert page["routing_key"] == "test-routing-key"
    assert page["event_action"] == "trigger"
    details = page["payload"]["custom_details"]
    assert details["engine"] == "demo-mixtral"
    assert (details["layer"], details["expert"]) in {
        ("3", "5"),
        ("17", "2"),
    }  # the scenario's hot spots
    assert "#moeexpert" in details["runbook_url"]
    # The demo runs EP over its GPUs: the EPLB what-if answers, rendered by Prometheus' templates.
    assert details["eplb_whatif"].startswith(("EPLB with", "No EPLB redundancy up to"))
    assert any("runbooks.md#moeexpert" in link["href"] for link in page["links"])
