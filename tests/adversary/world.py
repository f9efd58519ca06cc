"""The world the adversary controls around one real agent process: a good engine and a hostile
one (aiohttp servers on a thread of the test process), each with a plugin directory, the hostile
one with an EPLB log and a process on its GPU whose command line lives in a /proc directory the
test writes. ``reset`` puts every hostile input back to a good one."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.expert_file import SUFFIX
from moe_watch.serving.server import start_server
from tests.adversary.boundaries import SERVE, plugin_doc
from tests.conftest import read_capture, read_models

NEIGHBOUR_PID = 4242  # the process on the hostile engine's GPU, in the fake /proc

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Answers:
    """One engine's answers, replaceable from any thread between requests."""

    def __init__(self) -> None:
        self.metrics = read_capture("after-load").encode()
        self.models = json.dumps(read_models()).encode()
        self.version = b'{"version": "0.32.0"}'

    def app(self) -> web.Application:
        def answer(attribute: str, content_type: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=getattr(self, attribute), content_type=content_type)

            return handler

        app = web.Application()
        app.router.add_get("/metrics", answer("metrics", "text/plain"))
        app.router.add_get("/v1/models", answer("models", "application/json"))
        app.router.add_get("/version", answer("version", "application/json"))
        return app


class Engines:
    """The good and the hostile engine, served from their own event loop on a thread."""

    def __init__(self) -> None:
        self.good, self.hostile = Answers(), Answers()
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
        return self

    def stop(self) -> None:
        for runner in self._runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


class World:
    """Everything the agent reads of the hostile engine (the ``Hostile`` of boundaries.py)."""

    def __init__(self, root: Path, engines: Engines) -> None:
        self.engines = engines
        self.plugin_dir = root / "hostile-experts"
        self.good_dir = root / "good-experts"
        self.eplb_log = root / "hostile-vllm.log"
        self.proc_root = root / "proc"
        for directory in (self.plugin_dir, self.good_dir, self.proc_root / str(NEIGHBOUR_PID)):
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
            ],
        }  # fmt: skip


@contextmanager
def engines() -> Iterator[Engines]:
    running = Engines().start()
    try:
        yield running
    finally:
        running.stop()


def get(url: str, timeout: float) -> tuple[bytes, float]:
    """The body of a GET and the seconds it took (fails past ``timeout``)."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200, (url, response.status)
        return response.read(), time.monotonic() - started


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
