"""Real Prometheus scrapes `moe-watch demo` (hot expert), evaluates the shipped rules, and a real
Alertmanager pages a PagerDuty Events v2 receiver on 127.0.0.1 that names engine, layer, expert.

The rules are the shipped ones with `for:` shortened to 0s and a 1 s evaluation interval (test
speed only); the Alertmanager config is the shipped example with the PagerDuty URL pointed here.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from moe_watch.rules import render, rule_groups
from moe_watch.server import start_server
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_SECONDS = 120


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        f"{names[0]} not found: install the Debian packages prometheus and prometheus-alertmanager (scripts/test.sh does)"
    )


class PagerDutyReceiver:
    """Accepts Events API v2 posts like events.pagerduty.com/v2/enqueue does (202)."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self.arrived = asyncio.Event()

    async def enqueue(self, request: web.Request) -> web.Response:
        self.events.append(await request.json())
        self.arrived.set()
        return web.json_response(
            {"status": "success", "message": "Event processed", "dedup_key": "x"}, status=202
        )


@pytest.fixture
async def pagerduty() -> AsyncIterator[tuple[PagerDutyReceiver, str]]:
    receiver = PagerDutyReceiver()
    app = web.Application()
    app.router.add_post("/v2/enqueue", receiver.enqueue)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield receiver, url
    await runner.cleanup()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def alertmanager_config(pagerduty_url: str) -> dict[str, object]:
    config = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    config["route"]["group_wait"] = "1s"
    config["route"]["routes"][0]["group_wait"] = "1s"
    (pd,) = next(r for r in config["receivers"] if r["name"] == "moe-watch-pagerduty")[
        "pagerduty_configs"
    ]
    pd.pop("routing_key_file")
    pd["routing_key"] = "test-routing-key"
    pd["url"] = pagerduty_url + "/v2/enqueue"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = pagerduty_url + "/warnings"  # nothing listens there; not under test
    return config


async def test_a_hot_expert_pages_pagerduty_with_engine_layer_expert_and_runbook(
    tmp_path: Path,
    pagerduty: tuple[PagerDutyReceiver, str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    receiver, receiver_url = pagerduty
    demo_port, prom_port, am_port = free_port(), free_port(), free_port()
    rules = tmp_path / "rules.yml"
    rules.write_text(render(rule_groups(for_override="0s", interval="1s"), "test copy"))
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump(alertmanager_config(receiver_url)))
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "evaluation_interval": "1s",
                    "external_labels": {"cluster": "test"},
                },
                "rule_files": [str(rules)],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": "moe-watch",
                        "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}],
                    }
                ],
            }
        )
    )
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *argv: str) -> None:
        log = (logs / f"{name}.log").open("wb")
        processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    start(
        "demo",
        sys.executable,
        "-m",
        "moe_watch.cli",
        "demo",
        "--scenario",
        "hot_expert",
        "--listen",
        f"127.0.0.1:{demo_port}",
        "--interval",
        "1",
    )
    start("alertmanager", binary("prometheus-alertmanager", "alertmanager"), f"--config.file={am_config}",
          f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=")  # fmt: skip
    start("prometheus", binary("prometheus"), f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
          f"--web.listen-address=127.0.0.1:{prom_port}")  # fmt: skip

    def expert_pages() -> list[dict[str, object]]:
        return [
            e
            for e in receiver.events
            if "expert" in str(e.get("payload", {}).get("summary", "")).lower()
        ]  # type: ignore[union-attr]

    async def wait_for_page() -> None:
        while not expert_pages():
            for proc in processes:
                assert proc.poll() is None, f"{proc.args[0]} exited: see {logs}"
            receiver.arrived.clear()
            await asyncio.wait_for(receiver.arrived.wait(), DEADLINE_SECONDS)

    try:
        await asyncio.wait_for(wait_for_page(), DEADLINE_SECONDS)
    except asyncio.TimeoutError:
        tails = {p.name: p.read_text()[-1500:] for p in logs.iterdir()}
        raise AssertionError(
            f"no expert page within {DEADLINE_SECONDS}s; got {receiver.events}; logs: {tails}"
        ) from None
    page = expert_pages()[0]
    assert page["routing_key"] == "test-routing-key"
    assert page["event_action"] == "trigger"
    details = page["payload"]["custom_details"]  # type: ignore[index]
    assert details["engine"] == "demo-mixtral"
    assert (details["layer"], details["expert"]) in {
        ("3", "5"),
        ("17", "2"),
    }  # the scenario's hot spots
    assert "#moeexpert" in details["runbook_url"]
    # The demo runs EP over its GPUs: the EPLB what-if answers, rendered by Prometheus' templates.
    assert details["eplb_whatif"].startswith(("EPLB with", "No EPLB redundancy up to"))
    assert any("runbooks.md#moeexpert" in link["href"] for link in page["links"])  # type: ignore[union-attr]
