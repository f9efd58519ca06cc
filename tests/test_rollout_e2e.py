"""A DaemonSet rollout while a node pages, through an HA Alertmanager pair: real binaries on 127.0.0.1.

The machinery of tests/test_paging_e2e.py: a `moe-watch demo` agent for gpu-node-a (scenario
hot_expert: layer 3 skewed), a real Prometheus with the Prometheus Operator's scrape config
(tests/operator_scrape.py) whose targets come from a service-discovery file, as the Operator's
kubernetes_sd_configs follow the Service's Endpoints, the rules of deploy/base (`for:` and
`keep_firing_for` shortened), and a PagerDuty Events v2 receiver. Here two Alertmanagers with
alerts/alertmanager.yml form a cluster (gossip on loopback), and Prometheus sends to both, as a
production HA pair; each posts to its own URL, so every event says which one sent it.

While MoEExpertSkewHigh fires for gpu-node-a, the agent pod is replaced as a rollout does it:
the Endpoints drop the old pod, the old agent gets SIGTERM, a new one starts with a new pod name
and a new address on the same node, and joins the Endpoints once ready. Proves: one PagerDuty
incident for the skewed layer (one trigger, one dedup_key, no resolve) through the swap and
through both Alertmanagers; the alert never stopped firing in Prometheus (one ALERTS_FOR_STATE
activation) and still fires from the new pod's series after keep_firing_for alone would have
let it go; Alertmanager kept one alert with its original start.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.alerting import (
    PagerDutyReceiver,
    Processes,
    alertmanager_config,
    get_json,
    prometheus_config,
    query,
    query_range,
    shortened_rules,
    start_alertmanager,
    start_prometheus,
    wait_until,
)
from tests.conftest import free_port
from tests.operator_scrape import AgentPod, scrape_config, write_targets
from tests.test_paging_e2e import is_alert, labels_of, summary, triggers

NODE = "gpu-node-a"
ENGINE = "llm/mixtral-a"
LAYER = "3"
SKEW = {"engine": ENGINE, "layer": LAYER, "node": NODE}
# One node here: while its only agent is replaced no `up` exists at all; MoEWatchAbsent (10m
# shipped) is about a DaemonSet that is gone, not one restarting. hot_expert's layer 3 has a
# top share near the collapse threshold (0.4), which a fresh agent's short window can cross:
# a collapse of layer 3 would inhibit its skew page, so collapse stays out of this test.
FOR = {"MoEExpertSkewHigh": "4s", "MoEWatchAbsent": "1m", "MoEExpertCollapse": "10m"}
DEFAULT_FOR = "2s"
# The restart gap in this test: a Python agent starting on 2 busy cores, its first cycle and
# window, the discovery file, one 1 s scrape and one 1 s evaluation: several seconds. The test
# measures the gap and requires it to be shorter.
KEEP_FIRING_SECONDS = 20
START_DEADLINE = 40
PAGE_DEADLINE = 30
SWAP_DEADLINE = 30


def _agent(processes: Processes, name: str, pod: AgentPod, demo_tmp: Path) -> None:
    processes.start(name, sys.executable, "-m", "moe_watch.cli", "demo", "--scenario", "hot_expert",
                    "--pod", f"{ENGINE}/vllm", "--listen", pod.address, "--interval", "1",
                    "--window", "6", "--log-level", "info",
                    env={**os.environ, "TMPDIR": str(demo_tmp)})  # fmt: skip


async def test_a_replaced_agent_pod_keeps_one_incident_through_an_ha_alertmanager_pair(
    tmp_path: Path,
    demo_tmp: Path,
    pagerduty: tuple[PagerDutyReceiver, str],
    processes: Processes,
) -> None:
    receiver, receiver_url = pagerduty
    old = AgentPod("moe-watch-4xk9p", NODE, f"127.0.0.1:{free_port()}")
    new = AgentPod("moe-watch-z8r5t", NODE, f"127.0.0.1:{free_port()}")
    web_ports, gossip_ports = [free_port(), free_port()], [free_port(), free_port()]
    prom_port = free_port()

    rules = tmp_path / "rules.yml"
    spec = shortened_rules(FOR, DEFAULT_FOR, f"{KEEP_FIRING_SECONDS}s")
    rules.write_text(yaml.safe_dump(spec, sort_keys=False))
    alertmanagers = []
    for i in (0, 1):
        config = tmp_path / f"alertmanager-{i}.yml"
        am = alertmanager_config(receiver_url, group_interval="2s", sender=f"am{i}")
        config.write_text(yaml.safe_dump(am))
        gossip = (gossip_ports[i], [gossip_ports[1 - i]])
        alertmanagers.append(
            start_alertmanager(processes, config, web_ports[i], name=f"am{i}", gossip=gossip)
        )
    endpoints = tmp_path / "endpoints.json"
    scrape = scrape_config([old], interval="1s", sd_file=endpoints)
    prom_config = tmp_path / "prometheus.yml"
    targets = [f"127.0.0.1:{p}" for p in web_ports]
    prom_config.write_text(yaml.safe_dump(prometheus_config(rules, targets, [scrape])))
    _agent(processes, "agent-old", old, demo_tmp)
    prometheus = start_prometheus(processes, prom_config, prom_port)

    async with aiohttp.ClientSession() as session:

        async def q(expr: str) -> list[dict[str, Any]]:
            return await query(session, prometheus, expr)

        async def clustered() -> bool:
            for am in alertmanagers:
                status = await get_json(session, f"{am}/api/v2/status")
                if status["cluster"]["status"] != "ready" or len(status["cluster"]["peers"]) != 2:
                    return False
            return True

        await wait_until(clustered, START_DEADLINE, "two Alertmanagers in one cluster", processes)

        async def skew_paged() -> list[dict[str, Any]] | None:
            return triggers(receiver, "MoEExpertSkewHigh", **SKEW) or None

        await wait_until(skew_paged, START_DEADLINE + PAGE_DEADLINE, "the skew page", processes,
                         woken_by=receiver.arrived, seen=lambda: summary(receiver))  # fmt: skip
        paged_at = time.time()

        async def skew_alerts(am: str) -> list[dict[str, Any]]:
            alerts = await get_json(session, f"{am}/api/v2/alerts")
            return [
                a
                for a in alerts
                if a["labels"]["alertname"] == "MoEExpertSkewHigh"
                and all(a["labels"].get(k) == v for k, v in SKEW.items())
            ]

        async def both_have_it() -> list[list[dict[str, Any]]] | None:
            seen = [await skew_alerts(am) for am in alertmanagers]
            return seen if all(len(s) == 1 for s in seen) else None

        before = await wait_until(both_have_it, PAGE_DEADLINE, "the alert in both", processes)
        (started_at,) = {s[0]["startsAt"] for s in before}

        # -- the rollout replaces the agent pod of gpu-node-a --------------------------------
        async def target_addresses() -> set[str]:
            body = await get_json(session, f"{prometheus}/api/v1/targets", state="active")
            return {t["labels"]["instance"] for t in body["data"]["activeTargets"]}

        write_targets(endpoints, [])  # the terminating pod leaves the Endpoints first

        async def old_dropped() -> bool:
            return await target_addresses() == set()

        await wait_until(old_dropped, SWAP_DEADLINE, "Prometheus dropping the old pod", processes)
        swapped, swapped_mono = time.time(), time.monotonic()
        processes.stop("agent-old")
        _agent(processes, "agent-new", new, demo_tmp)

        async def new_ready() -> bool:
            url = f"http://{new.address}/readyz"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200

        await wait_until(new_ready, SWAP_DEADLINE, "the new agent ready", processes)
        write_targets(endpoints, [new])  # ready: the Endpoints list the new pod

        async def new_skew() -> list[dict[str, Any]] | None:
            expr = f'moe_watch_expert_skew_ratio{{pod="{new.name}",layer="{LAYER}"}} > 0.5'
            return await q(expr) or None

        await wait_until(new_skew, SWAP_DEADLINE, "the new pod's skew series", processes)
        gap = time.time() - swapped
        assert gap < KEEP_FIRING_SECONDS, f"the swap took {gap:.1f} s: keep_firing_for too short"
        assert await target_addresses() == {new.address}
        (up,) = await q('up{job="moe-watch"}')
        assert (up["metric"]["pod"], up["metric"]["node"]) == (new.name, NODE)

        # Prometheus evaluates the alert as firing after keep_firing_for alone would have let
        # it go: the new pod's series carry it now.
        selector = f'alertname="MoEExpertSkewHigh",node="{NODE}",layer="{LAYER}"'

        async def firing_past_keep() -> list[dict[str, Any]] | None:
            firing = await query_range(session, prometheus, f'ALERTS{{{selector},alertstate="firing"}}',
                                       swapped, time.time())  # fmt: skip
            late = [
                t for s in firing for t, _ in s["values"] if t > swapped + KEEP_FIRING_SECONDS + 1
            ]
            return firing if late else None

        await wait_until(firing_past_keep, KEEP_FIRING_SECONDS + SWAP_DEADLINE,
                         "the alert firing past keep_firing_for", processes)  # fmt: skip
        (firing,) = await query_range(session, prometheus, f'ALERTS{{{selector},alertstate="firing"}}',
                                      paged_at, time.time())  # fmt: skip
        steps = [float(t) for t, _ in firing["values"]]
        assert all(round(b - a, 3) == 1 for a, b in itertools.pairwise(steps)), steps
        (for_state,) = await query_range(session, prometheus, f"ALERTS_FOR_STATE{{{selector}}}",
                                         paged_at, time.time())  # fmt: skip
        assert len({v for _, v in for_state["values"]}) == 1, for_state  # `for:` never restarted
        after = await both_have_it()
        assert after is not None
        assert {s[0]["startsAt"] for s in after} == {started_at}  # one alert, its first start
        assert all("pod" not in s[0]["labels"] and "instance" not in s[0]["labels"] for s in after)

    def timeline() -> list[str]:
        """The events, each with its seconds after the swap began."""
        return [
            f"{e['received'] - swapped_mono:+.1f}s {e['sender']} {line}"
            f" layer {e['payload']['custom_details'].get('layer', '')}"
            for e, line in zip(receiver.events, summary(receiver), strict=True)
        ]

    # One incident for the skewed layer, through the swap and through both Alertmanagers.
    events = [e for e in receiver.events if is_alert(e, "MoEExpertSkewHigh", **SKEW)]
    assert [e["event_action"] for e in events] == ["trigger"], timeline()
    # No page of the node resolved and reopened: each dedup key triggered once, never resolved.
    node_events = [e for e in receiver.events if f"node = {NODE}\n" in labels_of(e)]
    assert not [e for e in node_events if e["event_action"] == "resolve"], timeline()
    keys = [e["dedup_key"] for e in node_events if e["event_action"] == "trigger"]
    assert len(keys) == len(set(keys)), timeline()
    print(f"swap gap {gap:.1f} s;", "senders:", {e["sender"] for e in receiver.events})
    print(*timeline(), sep="\n")
