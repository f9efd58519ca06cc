"""Shared test fixtures: the real engine captures and a swappable engine endpoint."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp import web

from moe_watch.server import start_server

FIXTURES = Path(__file__).parent / "fixtures"


def read_capture(state: str) -> str:
    """A real vLLM 0.32 exposition (see tests/fixtures/vllm/README.md)."""
    return (FIXTURES / "vllm" / f"vllm-0.32-cpu-tiny-mixtral.{state}.prom").read_text()


@pytest.fixture
def vllm_capture() -> str:
    return read_capture("after-load")


class EngineStub:
    """A real HTTP server on 127.0.0.1 whose /metrics body the test swaps between scrapes.

    ``hang`` makes /metrics wait until ``release`` is set (a target that accepts and never answers).
    """

    def __init__(self, body: str | bytes) -> None:
        self.body: bytes = body.encode() if isinstance(body, str) else body
        self.hang = False
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None
        # SGLang's expert-distribution recorder: each dump writes the next CSV into recorder_dir.
        self.recorder_dir: Path | None = None
        self.expert_dumps: list[str] = []

    def serve(self, body: str | bytes) -> None:
        self.body = body.encode() if isinstance(body, str) else body

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.release.wait()
        return web.Response(body=self.body, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(
            text=(FIXTURES / "vllm" / "v1-models.json").read_text(),
            content_type="application/json",
        )

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _start_record(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _dump_record(self, request: web.Request) -> web.Response:
        if self.recorder_dir is not None and self.expert_dumps:
            name = f"expert_distribution_rank0_timestamp{len(self.expert_dumps)}.csv"
            (self.recorder_dir / name).write_text(self.expert_dumps.pop(0))
        return web.Response(text="ok\n")

    async def start(self) -> EngineStub:
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


@pytest.fixture
async def engine_stub() -> AsyncIterator[EngineStub]:
    stub = await EngineStub(read_capture("after-5-requests")).start()
    yield stub
    await stub.stop()


def free_port() -> int:
    """A port nothing listens on (bound then closed): connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """`moe-watch run` configures structlog to print to the stderr of its moment; under pytest
    that stream is a capture that gets closed, so undo the configuration after every test."""
    yield
    structlog.reset_defaults()
