"""The agent's HTTP endpoints: /metrics, /healthz, /readyz, /status.

A scrape only formats the latest Snapshot: it never triggers collection, and no failure of a
source can turn it into a 500 (a rendering bug serves the last good body instead).

The server is bounded (``ServerLimits``, docs/configuration.md "Bounds"): at most
``max_connections`` open connections (more are closed at once, so descriptors never run out),
request headers complete within ``header_timeout_seconds`` (a connection that sends nothing, or
trickles its headers, is closed; the TLS handshake has the same bound), a kept-alive connection
idle for ``idle_timeout_seconds`` is closed, and a header line or field is at most
``max_header_bytes``. Only GET is served, so a request's bytes after its headers start the next
request.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from moe_watch.serving.exporter import build_registry, fallback_body
from moe_watch.serving.views import experts_document, status_document
from moe_watch.serving.web_config import basic_auth_middleware
from moe_watch.snapshot import Snapshot

log = structlog.get_logger("moe_watch.serving.server")


def make_app(
    get_snapshot: Callable[[], Snapshot | None],
    *,
    expert_full_detail: bool = False,
    basic_auth_users: Mapping[str, str] | None = None,
    auth_workers: int = 2,
    auth_max_pending: int = 16,
) -> web.Application:
    registry = build_registry(get_snapshot, expert_full_detail=expert_full_detail)
    last_good: dict[str, tuple[bytes, str]] = {}

    rendered: dict[str, tuple[object, bytes]] = {}  # content type -> (snapshot, body)

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        try:
            snapshot = get_snapshot()
            cached = rendered.get(content_type)
            if cached is not None and snapshot is not None and cached[0] is snapshot:
                body = cached[1]  # the snapshot changes once a cycle: render once, serve many
            else:
                body = encoder(registry)
                rendered[content_type] = (snapshot, body)
            last_good[content_type] = (body, content_type)
        except Exception:  # never answer a scrape with 500: serve what we last rendered
            log.exception("rendering /metrics failed; serving the last good body")
            body, content_type = last_good.get(content_type) or (
                fallback_body(encoder),  # never empty: the failure is a series
                content_type,
            )
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if get_snapshot() is None:
            return web.Response(status=503, text="waiting for the first collection cycle\n")
        return web.Response(text="ready\n")

    async def status(request: web.Request) -> web.Response:
        snapshot = get_snapshot()
        payload = status_document(snapshot) if snapshot else {"ready": False}
        return web.json_response(payload, dumps=lambda obj: json.dumps(obj, indent=2))

    async def experts(request: web.Request) -> web.Response:
        return web.json_response(experts_document(get_snapshot()))

    app = web.Application()
    if basic_auth_users:
        app.middlewares.append(
            basic_auth_middleware(
                dict(basic_auth_users), app, workers=auth_workers, max_pending=auth_max_pending
            )
        )
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/experts", experts)
    return app


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int = 128
    idle_timeout_seconds: float = 15.0
    header_timeout_seconds: float = 10.0
    max_header_bytes: int = 8190


class _Guard:
    """Counts the server's connections and wraps each protocol in a header deadline."""

    def __init__(self, factory: Callable[[], Any], limits: ServerLimits) -> None:
        self.factory = factory
        self.limits = limits
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = limits.max_connections
        if soft != resource.RLIM_INFINITY:  # leave descriptors for scrapes, files and discovery
            cap = max(1, min(cap, soft // 2))
        self.max_connections = cap
        self.open = 0
        self.refused = 0

    def protocol(self) -> asyncio.Protocol:
        return _GuardedProtocol(self)


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: _Guard) -> None:
        self._guard = guard
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = True  # waiting for the end of a request's headers
        self._tail = b""
        self._seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused += 1
            cast(
                asyncio.Transport, transport
            ).abort()  # over the limit: closed at once, nothing logged per connection
            return
        guard.open += 1
        self._transport = cast(asyncio.Transport, transport)
        self._inner = guard.factory()
        self._arm()
        self._inner.connection_made(transport)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.header_timeout_seconds, self._expire)

    def _expire(self) -> None:
        if self._awaiting and self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._awaiting:  # the next request on a kept-alive connection begins
            self._awaiting, self._tail, self._seen = True, b"", 0
            self._arm()
        window = self._tail + data
        self._seen += len(data)
        if b"\r\n\r\n" in window or b"\n\n" in window:
            self._awaiting = False
            if self._timer is not None:
                self._timer.cancel()
        self._tail = window[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            self._guard.open -= 1
            self._inner.connection_lost(exc)
            self._inner = None


class _GuardedSite(web.TCPSite):
    """TCPSite whose connections pass through a _Guard (aiohttp has no connection limit or
    header timeout of its own)."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        limits: ServerLimits,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._limits = limits
        self.guard: _Guard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner (cleanup closes it)
        server = self._runner.server
        assert server is not None
        self.guard = _Guard(server, self._limits)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            ssl_handshake_timeout=(
                self._limits.header_timeout_seconds if self._ssl_context is not None else None
            ),
        )


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    limits: ServerLimits | None = None,
) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner (for cleanup) and the URL actually bound."""
    limits = limits or ServerLimits()
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=limits.idle_timeout_seconds,
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
    )
    await runner.setup()
    site = _GuardedSite(runner, host, port, ssl_context, limits)
    await site.start()
    addresses = runner.addresses  # the bound port, when port 0 asked for any free one
    bound_port = int(addresses[0][1]) if addresses else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{shown}:{bound_port}"
