"""The world the adversary controls around one real agent process: a good engine and a hostile
one (aiohttp servers on a thread of the test process), each with a plugin directory, the hostile
one with an EPLB log, a process on its GPU whose command line lives in a /proc directory the
test writes, and SGLang's recorder answers with a dump directory (a third target, ``sglang``,
reads them); a Kubernetes API server whose pod list and watch discovery follows, with the
service-account token it sends. ``reset`` puts every hostile input back to a good one."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.expert_file import SUFFIX
from moe_watch.limits import TOKEN_BYTES
from moe_watch.serving.server import ServerLimits, start_server
from tests.adversary.boundaries import (
    AGENT_HEADER_SECONDS,
    AGENT_WRITE_SECONDS,
    AUTH,
    LOGIN,
    PASSWORD,
    SERVE,
    plugin_doc,
)
from tests.conftest import read_capture, read_models

ENDLESS_BYTES = 1 << 30  # an "endless" answer stops here, if the agent never hangs up
WATCH_POLLS = 15_000  # a watch of one generation lasts at most 300 s (the agent's own timeout)
NEIGHBOUR_PID = 4242  # the process on the hostile engine's GPU, in the fake /proc

Pods = Callable[[int], tuple[bytes, list[bytes]]]  # generation -> list body, watch lines
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Answers:
    """One engine's answers, replaceable from any thread between requests."""

    def __init__(self) -> None:
        self.metrics = read_capture("after-load").encode()
        self.models = json.dumps(read_models()).encode()
        self.version = b'{"version": "0.32.0"}'
        self.recorder_status = 200  # SGLang's start/dump answers
        self.recorder_body: bytes | None = b"ok\n"  # None: an endless body

    def app(self) -> web.Application:
        def answer(attribute: str, content_type: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=getattr(self, attribute), content_type=content_type)

            return handler

        async def recorder(request: web.Request) -> web.StreamResponse:
            status, body = self.recorder_status, self.recorder_body
            if body is not None:
                return web.Response(status=status, body=body)
            response = web.StreamResponse(status=status)
            await response.prepare(request)
            chunk = b"x" * 65536
            for _ in range(ENDLESS_BYTES // len(chunk)):  # until the agent hangs up
                try:
                    await response.write(chunk)
                except ConnectionError:
                    break
            return response

        app = web.Application()
        app.router.add_post("/start_expert_distribution_record", recorder)
        app.router.add_post("/dump_expert_distribution_record", recorder)
        app.router.add_get("/metrics", answer("metrics", "text/plain"))
        app.router.add_get("/v1/models", answer("models", "application/json"))
        app.router.add_get("/version", answer("version", "application/json"))
        return app


class KubeApi:
    """A Kubernetes API server for pods, as discovery reads it: a list whose resourceVersion is
    the generation, and a watch of that generation that streams its lines and ends when the
    generation changes (an older one answers 410 Gone, so the agent lists again)."""

    def __init__(self) -> None:
        self.generation = 0
        self.list_body = empty_list(0)
        self.chunked = False  # the list without Content-Length
        self.watch_lines: list[bytes] = []
        self.listed: dict[int, int] = {}  # generation -> lists served
        self.watched: set[int] = set()  # generations whose watch lines were all sent
        self.closing = False

    def publish(self, pods: Pods, *, chunked: bool) -> int:
        """A new generation (``pods`` builds its list body and watch lines from its number):
        the current watch ends and the agent lists again."""
        generation = self.generation + 1
        self.list_body, self.watch_lines = pods(generation)
        self.chunked = chunked
        self.generation = generation
        return generation

    def app(self) -> web.Application:
        async def pods(request: web.Request) -> web.StreamResponse:
            generation = self.generation
            if request.query.get("watch") != "1":
                body, chunked = self.list_body, self.chunked
                self.listed[generation] = self.listed.get(generation, 0) + 1
                if not chunked:
                    return web.Response(body=body, content_type="application/json")
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.enable_chunked_encoding()
                await response.prepare(request)
                for start in range(0, len(body), 1 << 20):
                    await response.write(body[start : start + (1 << 20)])
                await response.write_eof()
                return response
            if request.query.get("resourceVersion") != str(generation):
                return web.Response(status=410)
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for line in self.watch_lines:
                await response.write(line)
            self.watched.add(generation)
            for _ in range(WATCH_POLLS):  # until the next generation (bounded)
                if self.generation != generation or self.closing:
                    break
                await asyncio.sleep(0.02)
            return response

        app = web.Application()
        app.router.add_get("/api/v1/pods", pods)
        return app


def empty_list(generation: int) -> bytes:
    return json.dumps({"kind": "PodList", "metadata": {"resourceVersion": str(generation)},
                       "items": []}).encode()  # fmt: skip


class Engines:
    """The good and the hostile engine and the Kubernetes API, served from their own event
    loop on a thread."""

    def __init__(self) -> None:
        self.good, self.hostile = Answers(), Answers()
        self.kube = KubeApi()
        self.kube_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []
        self.urls: list[str] = []

    def start(self) -> Engines:
        self._thread.start()
        for answers in (self.good, self.hostile):
            runner, url = asyncio.run_coroutine_threadsafe(
                start_server(answers.app(), "127.0.0.1", 0), self._loop
            ).result(timeout=30)
            self._runners.append(runner)
            self.urls.append(url)
        # a bound token is ~1 KB; the adversary sends one of up to TOKEN_BYTES
        api = ServerLimits(max_header_bytes=2 * TOKEN_BYTES)
        runner, self.kube_url = asyncio.run_coroutine_threadsafe(
            start_server(self.kube.app(), "127.0.0.1", 0, limits=api), self._loop
        ).result(timeout=30)
        self._runners.append(runner)
        return self

    def stop(self) -> None:
        self.kube.closing = True
        for runner in self._runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


class World:
    """Everything the agent reads of the hostile engine (the ``Hostile`` of boundaries.py)."""

    def __init__(self, root: Path, engines: Engines) -> None:
        self.engines = engines
        self.sockets: list[socket.socket] = []  # the agent's hostile clients, closed by reset
        self.reset_generation = 0
        self.agent_url = ""  # the agent's own server, once it runs
        self.plugin_dir = root / "hostile-experts"
        self.good_dir = root / "good-experts"
        self.eplb_log = root / "hostile-vllm.log"
        self.proc_root = root / "proc"
        self.dump_dir = root / "sglang-dumps"
        self.service_account = root / "serviceaccount"
        self.web_config = root / "web.yaml"  # basic auth, cost 4: the adversary pays it once
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
        self.web_config.write_text(json.dumps({"basic_auth_users": {LOGIN: hashed}}))
        for directory in (self.plugin_dir, self.good_dir, self.proc_root / str(NEIGHBOUR_PID),
                          self.dump_dir, self.service_account):  # fmt: skip
            directory.mkdir(parents=True)
        self.eplb_log.write_text("")
        (self.proc_root / str(NEIGHBOUR_PID) / "stat").write_text(
            f"{NEIGHBOUR_PID} (python3) S 1 1 1"
        )
        (self.good_dir / f"w{SUFFIX}").write_text(json.dumps(plugin_doc(updated=time.time() + 1e6)))
        self.reset()

    def serve_metrics(self, body: bytes) -> None:
        self.engines.hostile.metrics = body

    def serve_models(self, body: bytes) -> None:
        self.engines.hostile.models = body

    def serve_version(self, body: bytes) -> None:
        self.engines.hostile.version = body

    def serve_recorder(self, status: int, body: bytes | None) -> None:
        self.engines.hostile.recorder_status = status
        self.engines.hostile.recorder_body = body

    def publish_pods(self, pods: Pods, *, chunked: bool = False) -> int:
        return self.engines.kube.publish(pods, chunked=chunked)

    def kube_listed(self, generation: int) -> bool:
        return self.engines.kube.listed.get(generation, 0) > 0

    def kube_watched(self, generation: int) -> bool:
        return generation in self.engines.kube.watched

    def set_token(self, token: bytes) -> None:
        (self.service_account / "token").write_bytes(token)

    def set_cmdline(self, args: list[bytes]) -> None:
        data = b"".join(a + b"\0" for a in args)
        (self.proc_root / str(NEIGHBOUR_PID) / "cmdline").write_bytes(data)

    def reset(self) -> None:
        good = Answers()
        self.serve_metrics(good.metrics)
        self.serve_models(good.models)
        self.serve_version(good.version)
        self.set_cmdline([*SERVE, b"--max-num-seqs", b"256"])
        for old in self.plugin_dir.iterdir():
            old.unlink()
        (self.plugin_dir / f"w{SUFFIX}").write_text(json.dumps(plugin_doc()))
        for old in self.dump_dir.iterdir():
            old.unlink()
        self.serve_recorder(200, b"ok\n")
        self.set_token(b"token")
        kube = self.engines.kube  # nothing on the node: discovery lists no pods
        self.reset_generation = kube.publish(lambda g: (empty_list(g), []), chunked=False)
        for client in self.sockets:
            client.close()
        self.sockets.clear()

    def settings(self) -> dict[str, Any]:
        good_url, hostile_url = self.engines.urls
        return {
            "nvml": "auto",  # the launcher's fake
            "interval_seconds": 0.1,
            "scrape_timeout_seconds": 5.0,
            "shutdown_timeout_seconds": 3.0,
            "targets": [
                {"name": "good", "url": good_url, "gpus": [0],
                 "experts": {"directory": str(self.good_dir)}},
                {"name": "hostile", "url": hostile_url, "gpus": [1],
                 "experts": {"directory": str(self.plugin_dir)}, "eplb_log": str(self.eplb_log)},
                {"name": "sglang", "url": hostile_url, "gpus": [],
                 "experts": {"source": "sglang", "directory": str(self.dump_dir), "top_k": 2}},
            ],
            "discovery": True,
            "node_name": "node-a",
            "kube_api": self.engines.kube_url,
            "web_config_file": str(self.web_config),
            "server_header_timeout_seconds": AGENT_HEADER_SECONDS,
            "server_write_timeout_seconds": AGENT_WRITE_SECONDS,
        }  # fmt: skip


@contextmanager
def engines() -> Iterator[Engines]:
    running = Engines().start()
    try:
        yield running
    finally:
        running.stop()


def get(url: str, timeout: float) -> tuple[bytes, float]:
    """The body of a GET and the seconds it took (fails past ``timeout``), with the adversary's
    credentials (the probes need none, and get none: the kubelet sends none)."""
    started = time.monotonic()
    probe = url.endswith(("/healthz", "/readyz"))
    name, _, value = AUTH.decode().strip().partition(": ")
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={} if probe else {name: value}), timeout=timeout
    ) as response:
        assert response.status == 200, (url, response.status)
        return response.read(), time.monotonic() - started


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
