"""Shared test fixtures: the real engine captures and a swappable engine endpoint."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from moe_watch.demo.replay_server import ReplayServer
from moe_watch.serving.server import start_server
from tests.alerting import PagerDutyReceiver, Processes

FIXTURES = Path(__file__).parent / "fixtures"


def read_capture(state: str) -> str:
    """A real vLLM 0.32 exposition (see tests/fixtures/vllm/README.md)."""
    return (FIXTURES / "vllm" / f"vllm-0.32-cpu-tiny-mixtral.{state}.prom").read_text()


@pytest.fixture
def vllm_capture() -> str:
    return read_capture("after-load")


def read_models() -> dict[str, Any]:
    """The /v1/models answer of the same server."""
    models: dict[str, Any] = json.loads((FIXTURES / "vllm" / "v1-models.json").read_text())
    return models


class EngineStub(ReplayServer):
    """The captured vLLM's /metrics body (swappable) and /v1/models, over real HTTP."""

    def __init__(self, body: str | bytes) -> None:
        super().__init__(body, models=read_models())


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


@pytest.fixture
async def pagerduty() -> AsyncIterator[tuple[PagerDutyReceiver, str]]:
    """A PagerDuty Events API v2 receiver on 127.0.0.1: (receiver, base URL)."""
    receiver = PagerDutyReceiver()
    app = web.Application()
    app.router.add_post("/v2/enqueue", receiver.enqueue)
    app.router.add_post("/v2/enqueue/{sender}", receiver.enqueue)
    app.router.add_post("/warnings", receiver.warning)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield receiver, url
    await runner.cleanup()


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """The demos' TMPDIR: what a SIGKILLed one leaves (its fake kubelet's socket) goes with it.
    Short, unlike tmp_path: a unix socket path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="moe-watch-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Processes the test starts, logging under tmp_path/logs; all stopped afterwards."""
    started = Processes(tmp_path / "logs")
    try:
        yield started
    finally:
        started.stop_all()
