"""EngineSource against real HTTP servers on 127.0.0.1 that misbehave the way targets do."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from moe_watch import limits
from moe_watch import samples as s
from moe_watch.config import TargetConfig
from moe_watch.serving.server import start_server
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.engine import EngineSource, max_model_len
from tests.conftest import FIXTURES, read_capture

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def serve(routes: dict[str, Handler]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    return await start_server(app, "127.0.0.1", 0)


def source(url: str, session: aiohttp.ClientSession, **kw: float | int) -> EngineSource:
    return EngineSource(
        TargetConfig(name="e0", url=url),
        session,
        timeout_seconds=float(kw.get("timeout", 2.0)),
        max_body_bytes=int(kw.get("max_body", 1024 * 1024)),
    )


def text(body: str | bytes) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        data = body.encode() if isinstance(body, str) else body
        return web.Response(body=data, content_type="text/plain")

    return handler


async def scrape(
    routes: dict[str, Handler], session: aiohttp.ClientSession, **kw: float | int
) -> tuple[s.EngineScrape, Problems]:
    runner, url = await serve(routes)
    try:
        problems = Problems()
        return await source(url, session, **kw).collect(problems), problems
    finally:
        await runner.cleanup()


async def scrape_error(
    routes: dict[str, Handler], session: aiohttp.ClientSession, **kw: float | int
) -> SourceError:
    with pytest.raises(SourceError) as err:
        await scrape(routes, session, **kw)
    return err.value


async def test_scrapes_a_real_capture_and_reads_max_model_len_and_version(
    session: aiohttp.ClientSession,
) -> None:
    models = (FIXTURES / "vllm" / "v1-models.json").read_text()
    result, problems = await scrape(
        {
            "/metrics": text(read_capture("busy")),
            "/v1/models": text(models),
            "/version": text(json.dumps({"version": "0.32.0"})),
        },
        session,
    )
    assert result.kind == "vllm"
    assert result.engine == "e0"
    assert result.models[0].gauges[s.GAUGE_REQUESTS_WAITING] == 52
    assert result.max_model_len == 1024
    assert result.info["version"] == "0.32.0"
    assert not problems.reasons


async def test_missing_metadata_endpoints_are_counted_but_do_not_fail_the_scrape(
    session: aiohttp.ClientSession,
) -> None:
    result, problems = await scrape({"/metrics": text(read_capture("fresh"))}, session)
    assert result.max_model_len is None
    assert problems.reasons["metadata"] == 2


@pytest.mark.parametrize(
    ("stated", "read"),
    [(1024, 1024), (10_000_000, 10_000_000), (10**309, None), (0, None), (-5, None),
     (True, None), (1024.0, None), (limits.MODEL_LEN + 1, None)],
)  # fmt: skip
async def test_max_model_len_must_be_a_whole_number_in_range(
    session: aiohttp.ClientSession, stated: object, read: int | None
) -> None:
    # Before: a 1 followed by 309 zeros went into the snapshot and the exporter's float() blanked
    # /metrics for every engine; True was exported as 1.
    assert max_model_len(stated) == read  # type: ignore[arg-type]
    models = {"data": [{"id": "m", "max_model_len": stated}]}
    result, problems = await scrape(
        {"/metrics": text(read_capture("fresh")), "/v1/models": text(json.dumps(models))},
        session,
    )
    assert result.max_model_len == read
    assert problems.reasons.get("bad_value", 0) == (0 if read else 1)


async def test_a_hanging_target_times_out_within_the_bound(session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    runner, url = await serve({"/metrics": hang})
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(SourceError) as err:
            await source(url, session, timeout=0.3).collect(Problems())
        elapsed = loop.time() - started
    finally:
        release.set()  # let the handler finish so the server shuts down at once
        await runner.cleanup()
    assert err.value.reason == "timeout"
    assert elapsed < 2.0


async def test_a_50_mb_body_is_refused_at_the_cap_without_reading_it_all(
    session: aiohttp.ClientSession,
) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await response.prepare(request)
        chunk = b"# " + b"x" * (1024 * 1024 - 3) + b"\n"
        try:
            for _ in range(50):
                await response.write(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the agent hung up at its cap: exactly what we want
        return response

    err = await scrape_error({"/metrics": huge}, session, max_body=4 * 1024 * 1024, timeout=10)
    assert err.reason == "body_too_large"


async def test_a_declared_oversize_body_is_refused_from_its_content_length(
    session: aiohttp.ClientSession,
) -> None:
    err = await scrape_error({"/metrics": text(b"#" * 5000)}, session, max_body=4096)
    assert err.reason == "body_too_large"
    assert "4096" in err.message


async def test_non_utf8_body_is_an_encoding_error(session: aiohttp.ClientSession) -> None:
    err = await scrape_error(
        {"/metrics": text(b'vllm:num_requests_running{model_name="\xff\xfe"} 1\n')}, session
    )
    assert err.reason == "encoding"


async def test_http_500_is_reported_with_its_status(session: aiohttp.ClientSession) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    err = await scrape_error({"/metrics": broken}, session)
    assert err.reason == "http_status"
    assert "500" in err.message


async def test_garbage_body_is_a_no_engine_metrics_error(session: aiohttp.ClientSession) -> None:
    err = await scrape_error({"/metrics": text("<html>502 Bad Gateway</html>")}, session)
    assert err.reason == "no_engine_metrics"


async def test_refused_connection_is_a_connect_error(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError) as err:
        await source(f"http://127.0.0.1:{port}", session).collect(Problems())
    assert err.value.reason == "connect"


async def test_a_kind_once_detected_stays_fixed(session: aiohttp.ClientSession) -> None:
    bodies = [
        read_capture("fresh"),
        '# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name="m"} 1\n',
    ]

    async def changing(request: web.Request) -> web.Response:
        return web.Response(text=bodies.pop(0))

    runner, url = await serve({"/metrics": changing})
    try:
        engine = source(url, session)
        assert (await engine.collect(Problems())).kind == "vllm"
        with pytest.raises(SourceError) as err:
            await engine.collect(Problems())
        assert err.value.reason == "no_engine_metrics"
    finally:
        await runner.cleanup()
