"""The agent's HTTP endpoints: /metrics, /healthz, /readyz, /status.

A scrape only formats the latest Snapshot: it never triggers collection, and no failure of a
source can turn it into a 500 (a rendering bug serves the last good body instead).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Mapping

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from moe_watch.exporter import build_registry
from moe_watch.snapshot import Snapshot
from moe_watch.views import experts_document, status_document
from moe_watch.web_config import basic_auth_middleware

log = structlog.get_logger("moe_watch.server")


def make_app(
    get_snapshot: Callable[[], Snapshot | None],
    *,
    expert_full_detail: bool = False,
    basic_auth_users: Mapping[str, str] | None = None,
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
            body, content_type = last_good.get(content_type, (b"", content_type))
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
        app.middlewares.append(basic_auth_middleware(dict(basic_auth_users)))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/experts", experts)
    return app


async def start_server(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner (for cleanup) and the URL actually bound."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    addresses = runner.addresses  # the bound port, when port 0 asked for any free one
    bound_port = int(addresses[0][1]) if addresses else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{shown}:{bound_port}"
