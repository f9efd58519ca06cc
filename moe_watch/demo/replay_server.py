"""A real HTTP server that answers /metrics with whatever body it is given (a recorded
exposition, usually): the engine for tests and benchmarks that replay captures.

The body can be swapped between scrapes; ``hang`` makes /metrics wait until ``release`` is set
(a target that accepts and never answers). It also plays SGLang's expert-distribution recorder:
each dump writes the next queued CSV into ``recorder_dir``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from moe_watch.serving.server import start_server


class ReplayServer:
    def __init__(self, body: str | bytes, *, models: Mapping[str, Any] | None = None) -> None:
        self.body: bytes = body.encode() if isinstance(body, str) else body
        self.models: Mapping[str, Any] = models or {"object": "list", "data": []}
        self.hang = False
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.recorder_dir: Path | None = None
        self.expert_dumps: list[str] = []

    def serve(self, body: str | bytes) -> None:
        self.body = body.encode() if isinstance(body, str) else body

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.release.wait()
        return web.Response(body=self.body, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.models))

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _start_record(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _dump_record(self, request: web.Request) -> web.Response:
        if self.recorder_dir is not None and self.expert_dumps:
            name = f"expert_distribution_rank0_timestamp{len(self.expert_dumps)}.csv"
            (self.recorder_dir / name).write_text(self.expert_dumps.pop(0))
        return web.Response(text="ok\n")

    async def start(self) -> ReplayServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        app.router.add_post("/start_expert_distribution_record", self._start_record)
        app.router.add_post("/dump_expert_distribution_record", self._dump_record)
        self._runner, self.url = await start_server(app, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
