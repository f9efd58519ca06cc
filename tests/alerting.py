"""The real alerting path on 127.0.0.1 for the end-to-end tests: Prometheus, Alertmanager, a
PagerDuty Events API v2 receiver, the processes' logs, and bounded waits that say what they saw."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        f"{names[0]} not found: install the Debian packages prometheus and prometheus-alertmanager (scripts/test.sh does)"
    )


class PagerDutyReceiver:
    """Accepts Events API v2 posts like events.pagerduty.com/v2/enqueue does (202), and the
    warnings route's webhook posts (counted only: not under test, but no 404s in the logs)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.warnings = 0

    async def warning(self, request: web.Request) -> web.Response:
        await request.read()
        self.warnings += 1
        return web.Response(status=200)

    async def enqueue(self, request: web.Request) -> web.Response:
        event = await request.json()
        event["received"] = time.monotonic()
        event["sender"] = request.match_info.get("sender", "")  # which Alertmanager posted it
        self.events.append(event)
        self.arrived.set()
        return web.json_response(
            {"status": "success", "message": "Event processed", "dedup_key": "x"}, status=202
        )


class Processes:
    """Started processes, each logging to ``logs/<name>.log``; all stopped by ``stop_all``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()  # stopped on purpose: not a failure

    def start(
        self, name: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started[name] = proc
        return proc

    def tails(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {path.name} (last {chars} chars) ---\n{path.read_text(errors='replace')[-chars:]}"
            for path in sorted(self.logs.iterdir())
        )

    def check_alive(self) -> None:
        for name, proc in self.started.items():
            if name not in self.killed and proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.tails()}")

    def stop(self, name: str) -> None:
        """SIGTERM and wait, as the kubelet stops a pod's container: the process shuts down."""
        self.killed.add(name)
        self.started[name].terminate()
        self.started[name].wait(timeout=15)

    def kill(self, name: str) -> None:
        """SIGKILL, as when a node dies: no clean shutdown."""
        self.killed.add(name)
        self.started[name].kill()
        self.started[name].wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def alertmanager_config(
    pagerduty_url: str, *, group_interval: str | None = None, sender: str = ""
) -> dict[str, Any]:
    """alerts/alertmanager.yml with PagerDuty at ``pagerduty_url``, group_wait 1 s (test speed),
    and ``group_interval`` when given (so a resolved-then-refired alert would show in the test).
    ``sender`` names this Alertmanager in the URL it posts to (the receiver records it)."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    routes = [config["route"], *config["route"]["routes"]]
    for route in routes:
        route["group_wait"] = "1s"
        if group_interval is not None:
            route["group_interval"] = group_interval
    (pd,) = next(r for r in config["receivers"] if r["name"] == "moe-watch-pagerduty")[
        "pagerduty_configs"
    ]
    pd.pop("routing_key_file")
    pd["routing_key"] = "test-routing-key"
    pd["url"] = pagerduty_url + "/v2/enqueue" + (f"/{sender}" if sender else "")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = pagerduty_url + "/warnings"
    return config


def shortened_rules(
    for_: dict[str, str], default_for: str, keep_firing_for: str | None = None
) -> dict[str, Any]:
    """deploy/base's PrometheusRule groups (the chart's rendering), evaluated every second, with
    `for:` shortened (``for_`` per alert, else ``default_for``) and, when given, every
    `keep_firing_for` replaced: test speed only, the expressions and labels as shipped."""
    from tests.operator_scrape import manifest

    spec: dict[str, Any] = manifest("PrometheusRule")["spec"]
    for group in spec["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = for_.get(rule["alert"], default_for)
                if keep_firing_for is not None and "keep_firing_for" in rule:
                    rule["keep_firing_for"] = keep_firing_for
    return spec


def prometheus_config(
    rules: Path, alertmanager: str | list[str], scrape_configs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Prometheus sending to ``alertmanager`` (host:port; several: each gets every alert, as
    with an HA pair)."""
    targets = [alertmanager] if isinstance(alertmanager, str) else alertmanager
    return {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"cluster": "test"},
        },
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": targets}]}]},
        "scrape_configs": scrape_configs,
    }


def start_alertmanager(
    processes: Processes,
    config: Path,
    port: int,
    *,
    name: str = "alertmanager",
    gossip: tuple[int, list[int]] | None = None,
) -> str:
    """An Alertmanager on 127.0.0.1:``port``; alone, or with ``gossip`` = (its cluster port, its
    peers' cluster ports) one of an HA cluster, gossiping on loopback. Peer timeout and gossip
    are shortened (test speed): the second of a pair waits that long for the first's
    notification log before it would send the same notification itself."""
    cluster = ["--cluster.listen-address="]
    if gossip is not None:
        own, peers = gossip
        cluster = [f"--cluster.listen-address=127.0.0.1:{own}",
                   f"--cluster.advertise-address=127.0.0.1:{own}",
                   *(f"--cluster.peer=127.0.0.1:{p}" for p in peers),
                   "--cluster.peer-timeout=3s", "--cluster.gossip-interval=100ms",
                   "--cluster.pushpull-interval=2s", "--cluster.settle-timeout=10s"]  # fmt: skip
    processes.start(name, binary("prometheus-alertmanager", "alertmanager"),
                    f"--config.file={config}", f"--storage.path={config.parent / name}",
                    f"--web.listen-address=127.0.0.1:{port}", *cluster)  # fmt: skip
    return f"http://127.0.0.1:{port}"


def start_prometheus(processes: Processes, config: Path, port: int) -> str:
    processes.start("prometheus", binary("prometheus"), f"--config.file={config}",
                    f"--storage.tsdb.path={config.parent / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}")  # fmt: skip
    return f"http://127.0.0.1:{port}"


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=5)) as r:
        r.raise_for_status()
        return await r.json()


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector (labels under "metric", [time, value] under "value")."""
    body = await get_json(session, f"{prometheus}/api/v1/query", query=expr)
    return list(body["data"]["result"])


async def query_range(
    session: aiohttp.ClientSession, prometheus: str, expr: str, start: float, end: float
) -> list[dict[str, Any]]:
    body = await get_json(
        session,
        f"{prometheus}/api/v1/query_range",
        query=expr,
        start=f"{start:.3f}",
        end=f"{end:.3f}",
        step="1",
    )
    return list(body["data"]["result"])


async def wait_until(
    check: Callable[[], Awaitable[T | None]],
    timeout: float,
    what: str,
    processes: Processes,
    *,
    woken_by: asyncio.Event | None = None,
    poll_seconds: float = 0.5,
    seen: Callable[[], object] = lambda: None,
) -> T:
    """Run ``check`` until it returns something other than None (or False), at most ``timeout``
    seconds: again whenever ``woken_by`` is set, else every ``poll_seconds``. A process that dies
    or the deadline fails the test with ``what``, what ``seen`` reports and the logs' tails."""
    deadline = time.monotonic() + timeout
    while True:
        processes.check_alive()
        if woken_by is not None:
            woken_by.clear()  # before the check: what arrives during it wakes the wait below
        try:
            result = await check()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            result = None  # not up yet: the deadline decides
        if result is not None and result is not False:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"not within {timeout:.0f}s: {what}\nseen: {seen()}\n{processes.tails()}"
            )
        if woken_by is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken_by.wait(), min(left, 2.0))
        else:
            await asyncio.sleep(min(left, poll_seconds))
