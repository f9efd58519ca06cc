"""Serve an EngineSim over HTTP like a vLLM (or SGLang) server, with knobs to misbehave.

Every /metrics request first advances the simulation to the current time, so counters and
histograms move between scrapes the way a real engine's do. The fault knobs make the same
endpoint slow, failing, garbled, truncated or huge for bad-input tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from moe_watch.demo.engine_sim import EngineSim, Flavor


@dataclass
class SimServer:
    sim: EngineSim
    url: str
    flavor: Flavor
    runner: web.AppRunner
    delay_seconds: float = 0.0
    fail_status: int | None = None
    garbage: bytes | None = None
    truncate_at: int | None = None
    huge_body_bytes: int | None = None
    scrapes: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def reset_counters(self) -> None:
        self.sim.reset_counters()

    async def stop(self) -> None:
        self._release.set()  # a delayed answer must not hold up shutdown
        await self.runner.cleanup()


async def start_engine_server(
    sim: EngineSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    flavor: Flavor = "vllm",
    clock: Callable[[], float] = time.time,
) -> SimServer:
    app = web.Application()
    server: SimServer

    async def metrics(request: web.Request) -> web.StreamResponse:
        server.scrapes += 1
        if server.delay_seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server._release.wait(), server.delay_seconds)
        if server.fail_status is not None:
            return web.Response(status=server.fail_status, text="simulated failure\n")
        if server.huge_body_bytes is not None:
            return await _stream_huge(request, server.huge_body_bytes)
        if server.garbage is not None:
            return web.Response(body=server.garbage, content_type="text/plain")
        sim.advance(clock())
        body = sim.render(server.flavor).encode()
        if server.truncate_at is not None:
            body = body[: server.truncate_at]
        return web.Response(
            body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response(sim.models_json())

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": sim.version})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server = SimServer(sim=sim, url=f"http://{host}:{bound}", flavor=flavor, runner=runner)
    return server


async def _stream_huge(request: web.Request, size: int) -> web.StreamResponse:
    """Valid-looking comment lines, chunked, no Content-Length: only a byte cap stops it."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    line = b"# " + b"x" * 1021 + b"\n"
    sent = 0
    try:
        while sent < size:
            await response.write(line)
            sent += len(line)
    except (ConnectionResetError, RuntimeError):
        pass  # the client hung up at its cap: what we wanted to see
    return response
