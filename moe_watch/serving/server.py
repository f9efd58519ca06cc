"""The agent's HTTP endpoints: /metrics, /healthz, /readyz, /status.

A scrape only formats the latest Snapshot: it never triggers collection, and no failure of a
source can turn it into a 500 (a rendering bug serves the last good body instead).

The server is bounded (``ServerLimits``, docs/configuration.md "Bounds"): at most
``max_connections`` open connections and ``probe_connections`` more for probes (past them an
older connection is closed to make room, see ``_Guard``, so descriptors never run out),
request headers complete within ``header_timeout_seconds`` (a connection that sends nothing, or
trickles its headers, is closed; the TLS handshake has the same bound), a kept-alive connection
idle for ``idle_timeout_seconds`` is closed, and a header line or field is at most
``max_header_bytes``. Only GET is served, so a request's bytes after its headers start the next
request.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import resource
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from moe_watch.limits import (
    HEADER_BYTES,
    HEADER_SECONDS,
    PROBE_CONNECTIONS,
    SERVER_CONNECTIONS,
    WRITE_SECONDS,
)
from moe_watch.serving.exporter import build_registry, fallback_body
from moe_watch.serving.views import experts_document, status_document
from moe_watch.serving.web_config import basic_auth_middleware
from moe_watch.snapshot import Snapshot

log = structlog.get_logger("moe_watch.serving.server")


CHUNK_BYTES = 64 * 1024  # written per step: a client that does not read holds at most this


def make_app(
    get_snapshot: Callable[[], Snapshot | None],
    *,
    expert_full_detail: bool = False,
    basic_auth_users: Mapping[str, str] | None = None,
    auth_workers: int = 2,
    auth_max_pending: int = 16,
    write_timeout_seconds: float = WRITE_SECONDS,
) -> web.Application:
    registry = build_registry(get_snapshot, expert_full_detail=expert_full_detail)
    rendered = _Rendered()

    async def metrics(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        name = f"metrics {content_type}"
        body = rendered.get(name, get_snapshot, lambda _: encoder(registry))
        if body is None:  # nothing rendered yet: never empty, the failure is itself a series
            return await send(request, fallback_body(encoder), content_type, write_timeout_seconds)
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            # compressed once per snapshot too; Prometheus asks for gzip on every scrape
            plain = body
            gzipped = rendered.get(name + " gzip", get_snapshot, lambda _: compress(plain))
            if gzipped is not None:
                return await send(
                    request, gzipped, content_type, write_timeout_seconds, encoding="gzip"
                )
        return await send(request, body, content_type, write_timeout_seconds)

    async def healthz(request: web.Request) -> web.StreamResponse:
        return await send(request, b"ok\n", TEXT, write_timeout_seconds)

    async def readyz(request: web.Request) -> web.StreamResponse:
        if get_snapshot() is None:
            waiting = b"waiting for the first collection cycle\n"
            return await send(request, waiting, TEXT, write_timeout_seconds, status=503)
        return await send(request, b"ready\n", TEXT, write_timeout_seconds)

    def json_view(
        name: str, document: Callable[[Snapshot | None], Any], indent: int | None
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def view(request: web.Request) -> web.StreamResponse:
            body = rendered.get(
                name,
                get_snapshot,
                lambda snapshot: json.dumps(document(snapshot), indent=indent).encode(),
            )
            if body is None:
                return await send(request, b'{"error": "rendering failed"}', JSON,
                                  write_timeout_seconds, status=503)  # fmt: skip
            return await send(request, body, JSON, write_timeout_seconds)

        return view

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
    app.router.add_get("/status", json_view("status", _status, 2))
    app.router.add_get("/experts", json_view("experts", experts_document, None))
    return app


TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


def _status(snapshot: Snapshot | None) -> dict[str, Any]:
    return status_document(snapshot) if snapshot else {"ready": False}


def accepts_gzip(accept_encoding: str) -> bool:
    """True when an Accept-Encoding header allows gzip (RFC 9110: `gzip;q=0` refuses it)."""
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip"):
            try:
                return float(params.strip().removeprefix("q=").strip() or 1) > 0
            except ValueError:  # another parameter, or a garbled weight: not a refusal
                return True
    return False


def compress(body: bytes) -> bytes:
    """gzip at level 1: a DeepSeek-V3 or 8-engine node's ~200-500 KiB body shrinks ~10x in ~1 ms
    (level 9 gains another 20 % for 10x the CPU, once a cycle)."""
    return gzip.compress(body, compresslevel=1, mtime=0)


class _Rendered:
    """Each body rendered once per snapshot (the snapshot changes once a cycle) and served to
    every request of that cycle; a rendering that fails serves the last good body."""

    def __init__(self) -> None:
        self._bodies: dict[str, tuple[object, bytes]] = {}

    def get(
        self,
        name: str,
        get_snapshot: Callable[[], Snapshot | None],
        render: Callable[[Snapshot | None], bytes],
    ) -> bytes | None:
        cached = self._bodies.get(name)
        try:
            snapshot = get_snapshot()
            if cached is not None and snapshot is not None and cached[0] is snapshot:
                return cached[1]
            body = render(snapshot)
        except Exception:  # never a 500 because of one snapshot: the last good body instead
            log.exception("rendering failed; serving the last good body", view=name)
            return cached[1] if cached is not None else None
        self._bodies[name] = (snapshot, body)
        return body


async def send(
    request: web.Request,
    body: bytes,
    content_type: str,
    deadline_seconds: float,
    *,
    status: int = 200,
    encoding: str | None = None,
) -> web.StreamResponse:
    """Write ``body`` in CHUNK_BYTES steps, each waiting for the client to take the previous
    ones, within ``deadline_seconds`` for the whole answer; past it the connection is closed.
    A client that does not read thus holds at most a chunk of the agent's memory, for a
    bounded time, whatever the size of the answer, and however many it asked for at once."""
    headers = {"Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(body)

    async def write() -> None:
        await response.prepare(request)
        view = memoryview(body)
        last = max(len(body) - 1, 0) // CHUNK_BYTES * CHUNK_BYTES
        for start in range(0, last, CHUNK_BYTES):
            await response.write(view[start : start + CHUNK_BYTES])
        # the last step goes with the end of the answer: only then does aiohttp wait for the
        # client (write() waits past 64 KiB only), so pipelined small answers that are not
        # read wait here, under the deadline, instead of piling up in the transport's buffer
        await response.write_eof(bytes(view[last:]))

    try:
        await asyncio.wait_for(write(), deadline_seconds)
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        pass  # the client went away
    return response


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int = SERVER_CONNECTIONS
    probe_connections: int = PROBE_CONNECTIONS
    idle_timeout_seconds: float = 15.0
    header_timeout_seconds: float = HEADER_SECONDS
    write_timeout_seconds: float = WRITE_SECONDS
    max_header_bytes: int = HEADER_BYTES


_PROBE_REQUEST = re.compile(rb"(GET|HEAD) /(healthz|readyz)[ ?]")
_PROBE_HEADER_SECONDS = 2.0  # the kubelet sends its request at once


class _Guard:
    """Counts the server's connections and wraps each protocol in a header deadline.

    Probes never starve: when every connection is taken, the oldest connection still sending
    its request headers is closed to make room (a client that trickles its headers is the one
    an attacker holds, and the cheapest to drop); when none is, up to ``probe_connections``
    more are accepted for /healthz and /readyz only. When those are taken too, the oldest of
    them is closed to make room: a reserved connection carries only probes, answered at once,
    so one still open is sending nothing, trickling, or idle after its answer, and otherwise
    a few of them would hold the reserve against the kubelet.
    """

    def __init__(self, factory: Callable[[], Any], limits: ServerLimits) -> None:
        self.factory = factory
        self.limits = limits
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = limits.max_connections
        if soft != resource.RLIM_INFINITY:  # leave descriptors for scrapes, files and discovery
            cap = max(1, min(cap, soft // 2))
        self.max_connections = cap
        self.connections: dict[_GuardedProtocol, None] = {}  # oldest first
        self.probes: dict[_GuardedProtocol, None] = {}
        self.evicted = 0

    @property
    def open(self) -> int:
        return len(self.connections) + len(self.probes)

    def protocol(self) -> asyncio.Protocol:
        return _GuardedProtocol(self)

    def admit(self, protocol: _GuardedProtocol) -> bool:
        """True: a connection for anything; False: for a probe only."""
        if len(self.connections) >= self.max_connections:
            oldest = next((c for c in self.connections if c.sending_headers), None)
            if oldest is not None:
                self.evicted += 1
                del self.connections[oldest]
                oldest.abort()
        if len(self.connections) < self.max_connections:
            self.connections[protocol] = None
            return True
        if len(self.probes) >= self.limits.probe_connections:
            oldest = next(iter(self.probes))
            self.evicted += 1
            del self.probes[oldest]
            oldest.abort()
        self.probes[protocol] = None
        return False

    def release(self, protocol: _GuardedProtocol) -> None:
        self.connections.pop(protocol, None)
        self.probes.pop(protocol, None)


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: _Guard) -> None:
        self._guard = guard
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = True  # waiting for the end of a request's headers
        self._tail = b""
        self._probe_only = False
        self._probe_seen = False
        self._held = b""  # a probe-only connection's first bytes, until they name a probe

    @property
    def sending_headers(self) -> bool:
        return self._awaiting and self._inner is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._probe_only = not self._guard.admit(self)
        self._inner = self._guard.factory()
        self._arm()
        self._inner.connection_made(transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        seconds = self._guard.limits.header_timeout_seconds
        if self._probe_only:
            seconds = min(seconds, _PROBE_HEADER_SECONDS)
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        if self._awaiting and self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._awaiting:  # the next request on a kept-alive connection begins
            self._awaiting, self._tail, self._probe_seen = True, b"", False
            self._arm()
        if self._probe_only and not self._probe_seen:
            # a reserved connection serves probes only: hold its bytes until the request line
            # says which path it asks for
            self._held += data
            if _PROBE_REQUEST.match(self._held):
                self._probe_seen = True
                data, self._held = self._held, b""
            elif len(self._held) >= 16 or b"\n" in self._held:
                self.abort()
                return
            else:
                return
        window = self._tail + data
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
        self._guard.release(self)
        if self._inner is not None:
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
