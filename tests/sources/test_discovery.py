"""Pod discovery against a fake API server speaking the real list/watch JSON: events, a dropped
watch, 410 Gone, a failing list, a rotated token, and back-off when the API server misbehaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from moe_watch.serving.server import start_server
from moe_watch.sources.discovery import PodWatcher, target_of
from moe_watch.sources.kube_client import token_headers


def pod(
    name: str,
    uid: str,
    *,
    rv: str,
    scrape: bool = True,
    phase: str = "Running",
    ip: str = "10.1.2.3",
) -> dict[str, Any]:
    annotations = {"moe-watch.io/scrape": "true", "moe-watch.io/port": "8001"} if scrape else {}
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "uid": uid,
            "resourceVersion": rv,
            "annotations": annotations,
        },
        "spec": {"nodeName": "gpu-node-1"},
        "status": {"phase": phase, "podIP": ip},
    }


class FakeApiServer:
    def __init__(self) -> None:
        self.items = [pod("mixtral-0", "u1", rv="90"), pod("sidecar", "u2", rv="91", scrape=False)]
        self.list_status = 200
        self.list_calls = 0
        self.watch_versions: list[str] = []
        self.field_selectors: set[str] = set()
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None drops the stream
        self.token: str | None = None  # when set, only "Bearer <token>" is let in (else 401)
        self.authorizations: list[str] = []
        self.watch_mode = "stream"  # "end": every watch ends at once; "gone": answers 410
        self.requests = 0
        self.refused: asyncio.Queue[str] = asyncio.Queue()  # one entry per 401 answered

    async def pods(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.field_selectors.add(request.query.get("fieldSelector", ""))
        self.authorizations.append(request.headers.get("Authorization", ""))
        if self.token is not None and self.authorizations[-1] != f"Bearer {self.token}":
            self.refused.put_nowait(self.authorizations[-1])
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if request.query.get("watch") == "1" and self.watch_mode == "gone":
            return web.json_response({"kind": "Status", "code": 410}, status=410)
        if request.query.get("watch") == "1" and self.watch_mode == "end":
            return web.Response(text="", content_type="application/json")
        if request.query.get("watch") == "1":
            return await self.watch(request)
        self.list_calls += 1
        if self.list_status != 200:
            return web.json_response(
                {"kind": "Status", "code": self.list_status}, status=self.list_status
            )
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "100"},
                "items": self.items,
            }
        )

    async def watch(self, request: web.Request) -> web.StreamResponse:
        self.watch_versions.append(request.query["resourceVersion"])
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while (event := await self.events.get()) is not None:
            await response.write(json.dumps(event).encode() + b"\n")
        return response  # the connection ends: a dropped watch


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_get("/api/v1/pods", fake.pods)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield fake, url
    fake.events.put_nowait(None)
    await runner.cleanup()


def test_only_annotated_running_pods_with_an_ip_are_targets() -> None:
    target = target_of(pod("m", "u", rv="1"))
    assert target is not None
    assert (target.engine, target.url, target.metrics_path) == (
        "llm/m",
        "http://10.1.2.3:8001",
        "/metrics",
    )
    assert target_of(pod("m", "u", rv="1", scrape=False)) is None
    assert target_of(pod("m", "u", rv="1", phase="Pending")) is None
    assert target_of(pod("m", "u", rv="1", ip="")) is None
    ipv6 = target_of(pod("m", "u", rv="1", ip="fd00::5"))
    assert ipv6 is not None
    assert ipv6.url == "http://[fd00::5]:8001"


async def test_list_watch_dropped_watch_and_410_gone(api: tuple[FakeApiServer, str]) -> None:
    fake, url = api
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(
            session,
            url,
            "gpu-node-1",
            on_change=lambda t: changes.put_nowait({x.engine for x in t.values()}),
            max_backoff_seconds=0.2,
            min_relist_seconds=0.05,
        )
        task = asyncio.create_task(watcher.run(stop))

        async def next_change() -> set[str]:
            return await asyncio.wait_for(changes.get(), 5)

        assert await next_change() == {"llm/mixtral-0"}  # the list: the sidecar is not annotated
        fake.events.put_nowait({"type": "ADDED", "object": pod("deepseek-0", "u3", rv="101")})
        assert await next_change() == {"llm/mixtral-0", "llm/deepseek-0"}
        fake.events.put_nowait(
            {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "105"}}}
        )
        fake.events.put_nowait(
            {"type": "MODIFIED", "object": pod("mixtral-0", "u1", rv="106", phase="Succeeded")}
        )
        assert await next_change() == {"llm/deepseek-0"}
        fake.events.put_nowait(None)  # the API server drops the watch
        fake.events.put_nowait({"type": "DELETED", "object": pod("deepseek-0", "u3", rv="110")})
        assert await next_change() == set()
        assert fake.watch_versions[:2] == ["100", "106"]  # resumed from the last version seen
        assert fake.list_calls == 1  # a dropped watch is not a reason to list again
        fake.events.put_nowait(
            {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                },
            }
        )
        assert await next_change() == {"llm/mixtral-0"}  # listed again after 410 Gone
        assert fake.list_calls == 2
        stop.set()
        fake.events.put_nowait(None)
        await asyncio.wait_for(task, 5)
    assert fake.field_selectors == {"spec.nodeName=gpu-node-1"}


async def test_a_failing_list_backs_off_and_recovers(api: tuple[FakeApiServer, str]) -> None:
    fake, url = api
    fake.list_status = 503
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(
            session, url, "gpu-node-1", max_backoff_seconds=0.05, min_relist_seconds=0.01
        )
        task = asyncio.create_task(watcher.run(stop))
        for _ in range(200):  # bounded: a few failed lists, then the API server recovers
            if fake.list_calls >= 3:
                fake.list_status = 200
            if watcher.synced.is_set():
                break
            await asyncio.sleep(0.01)
        stop.set()
        fake.events.put_nowait(None)
        await asyncio.wait_for(task, 5)
    assert watcher.synced.is_set()
    assert fake.list_calls >= 4
    assert set(watcher.targets) == {"u1"}


async def test_a_rotated_token_file_is_read_again_after_a_401(
    api: tuple[FakeApiServer, str], tmp_path: Path
) -> None:
    fake, url = api
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1\n")
    fake.token = "token-1"
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(
            session,
            url,
            "gpu-node-1",
            credentials=lambda: token_headers(account),
            on_change=lambda t: changes.put_nowait({x.engine for x in t.values()}),
            max_backoff_seconds=0.05,
            min_relist_seconds=0.01,
        )
        task = asyncio.create_task(watcher.run(stop))
        assert await asyncio.wait_for(changes.get(), 5) == {"llm/mixtral-0"}
        fake.token = "token-2"  # the API server now wants the rotated token ...
        fake.events.put_nowait(None)  # ... and drops the watch
        for _ in range(2):  # reconnects with the old token are refused, with back-off
            assert await asyncio.wait_for(fake.refused.get(), 5) == "Bearer token-1"
        replacement = account / "token.new"  # the kubelet's atomic rewrite
        replacement.write_text("token-2\n")
        replacement.replace(account / "token")
        fake.events.put_nowait({"type": "ADDED", "object": pod("deepseek-0", "u3", rv="120")})
        change = await asyncio.wait_for(changes.get(), 5)
        while "llm/deepseek-0" not in change:  # a relist may report first
            change = await asyncio.wait_for(changes.get(), 5)
        stop.set()
        fake.events.put_nowait(None)
        await asyncio.wait_for(task, 5)
    assert fake.authorizations[0] == "Bearer token-1"
    assert fake.authorizations[-1] == "Bearer token-2"
    assert watcher.failing is None
    assert watcher.errors["unauthorized"] >= 2


@pytest.mark.parametrize("mode", ["end", "gone"])
async def test_a_misbehaving_watch_backs_off_instead_of_hammering(
    api: tuple[FakeApiServer, str], mode: str
) -> None:
    # Before: a watch that ended at once, or 410 on every watch, made ~2,000-2,700 requests a
    # second from one agent. Now: exponential back-off with jitter, and a floor between lists.
    fake, url = api
    fake.watch_mode = mode
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(session, url, "gpu-node-1")  # the shipped defaults
        task = asyncio.create_task(watcher.run(stop))
        with contextlib.suppress(asyncio.TimeoutError):  # measure one second of behaviour
            await asyncio.wait_for(asyncio.shield(task), 1.0)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert 2 <= fake.requests <= 6, fake.requests
    assert fake.list_calls == 1  # the 5 s floor between lists holds
    assert watcher.errors[{"end": "watch_ended", "gone": "gone"}[mode]] >= 1


async def test_the_agent_scrapes_discovered_pods_and_attributes_gpus_by_cgroup(
    api: tuple[FakeApiServer, str], tmp_path: Path
) -> None:
    from moe_watch.agent import Agent
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import FakeNvml
    from tests.conftest import EngineStub, read_capture
    from tests.test_agent import exposition

    stub = await EngineStub(read_capture("after-load")).start()
    fake, url = api
    port = stub.url.rsplit(":", 1)[1]
    served = pod("mixtral-0", "3f2a1b7c-1234-4d5e-8f90-abcdef012345", rv="90", ip="127.0.0.1")
    served["metadata"]["annotations"]["moe-watch.io/port"] = port
    fake.items = [served]
    (tmp_path / "777").mkdir()  # the vLLM worker on GPU 1, in the pod's cgroup
    (tmp_path / "777" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2a1b7c_1234_4d5e_8f90_abcdef012345.slice/cri-containerd-"
        + "a" * 64 + ".scope\n"
    )  # fmt: skip
    nvml = FakeNvml.with_gpus(2)
    nvml.gpus[1].pids = [777]
    try:
        config = load_settings(None, discovery=True, node_name="gpu-node-1", kube_api=url)
        async with Agent(config, nvml=nvml, proc_root=str(tmp_path)) as agent:
            assert agent.discovery is not None
            await asyncio.wait_for(agent.discovery.synced.wait(), 5)
            snap = await agent.run_cycle()
            fake.events.put_nowait({"type": "DELETED", "object": served})
            for _ in range(100):  # bounded: the deletion arrives over the watch
                if not agent.discovery.targets:
                    break
                await asyncio.sleep(0.01)
            after = await agent.run_cycle()
    finally:
        fake.events.put_nowait(None)
        await stub.stop()
    assert dict(snap.targets_up) == {"llm/mixtral-0": True}
    owners = {view.sample.index: view.engine for view in snap.gpus}
    assert owners == {0: None, 1: "llm/mixtral-0"}
    assert dict(after.targets_up) == {}
    discovery = next(status for status in snap.sources if status.name == "discovery")
    assert discovery.up  # discovery is a source like the others: in /status and self-metrics
    up = [dict(labels) for name, labels in exposition(snap) if name == "moe_watch_source_up"]
    assert {"source": "discovery"} in up
    info = [dict(labels) for name, labels in exposition(snap) if name == "moe_watch_engine_info"]
    assert (info[0]["k8s_namespace_name"], info[0]["k8s_pod_name"]) == ("llm", "mixtral-0")
