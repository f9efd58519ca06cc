"""Serve an EngineSim over HTTP like a vLLM (or SGLang) server, with knobs to misbehave.

Every /metrics request first advances the simulation to ``clock()``, so counters and histograms
move between scrapes the way a real engine's do. The fault knobs, settable at any time, act on
/metrics only (the metadata endpoints stay healthy, so a test sees exactly one failure reason):
slow or hanging, an HTTP error status, garbage bytes, a truncated body, or an endless one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from moe_watch.demo.exposition import Flavor, render_exposition
from moe_watch.demo.simulated_engine import EngineSim
from moe_watch.serving.server import start_server

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_HUGE_LINE = b"# " + b"x" * 1021 + b"\n"  # a valid comment line: only a byte cap stops the body


@dataclass
class SimServer:
    """A running simulated engine. Set the knobs between (or during) scrapes."""

    sim: EngineSim
    url: str
    flavor: Flavor
    runner: web.AppRunner
    delay_seconds: float = 0.0  # wait this long before answering /metrics (stop() cuts it short)
    fail_status: int | None = None  # answer /metrics with this HTTP status
    garbage: bytes | None = None  # serve these bytes instead of the exposition
    truncate_at: int | None = None  # cut the exposition after this many bytes
    huge_body_bytes: int | None = None  # stream this many bytes, chunked, no Content-Length
    scrapes: int = 0  # /metrics requests received
    clock: Callable[[], float] = time.time  # the simulation's "now" at each scrape
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def reset_counters(self) -> None:
        """An engine restart as a scraper sees it: counters and histograms back to 0."""
        self.sim.reset_counters()

    async def stop(self) -> None:
        """Stop serving; a /metrics answer held back by ``delay_seconds`` is released first."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.scrapes += 1
        if self.delay_seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.delay_seconds)
        self.sim.advance(self.clock())
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="simulated failure\n")
        if self.huge_body_bytes is not None:
            return await _stream_huge(request, self.huge_body_bytes)
        if self.garbage is not None:
            return web.Response(body=self.garbage, headers={"Content-Type": CONTENT_TYPE})
        body = render_exposition(self.sim, self.flavor).encode()
        if self.truncate_at is not None:
            body = body[: self.truncate_at]
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def start_engine_server(
    sim: EngineSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    flavor: Flavor = "vllm",
    clock: Callable[[], float] = time.time,
) -> SimServer:
    """Serve ``sim`` on host:port (0: any free port): /metrics, /v1/models, /version, /health."""
    server: SimServer  # bound below, before the first request can arrive

    async def metrics(request: web.Request) -> web.StreamResponse:
        return await server._metrics(request)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(sim.models_json())

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": sim.version})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    runner, url = await start_server(app, host, port)
    server = SimServer(sim=sim, url=url, flavor=flavor, runner=runner, clock=clock)
    return server


async def _stream_huge(request: web.Request, size: int) -> web.StreamResponse:
    """Valid-looking comment lines, chunked, no Content-Length: only a byte cap stops it."""
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    await response.prepare(request)  # no length set: HTTP/1.1 chunked transfer encoding
    sent = 0
    try:
        while sent < size:
            line = _HUGE_LINE[: size - sent]
            await response.write(line)
            sent += len(line)
    except (ConnectionResetError, RuntimeError):
        pass  # the client hung up at its cap: what the test wanted to see
    return response
