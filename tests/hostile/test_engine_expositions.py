"""Hostile engine /metrics answers: label floods, bombs, redirects, garbage. Each is refused or
trimmed with a counted reason, within a time and memory bound, and never raises out of the
source."""

from __future__ import annotations

import gzip
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.config import TargetConfig
from moe_watch.serving.server import start_server
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.engine import EngineSource
from moe_watch.sources.exposition import (
    MAX_MODELS,
    MAX_SERIES,
    ExpositionError,
    parse_engine_exposition,
)
from tests.conftest import read_capture
from tests.hostile.conftest import peak_memory


def flood(models: int) -> str:
    lines = ["# TYPE vllm:num_requests_running gauge"]
    lines += [f'vllm:num_requests_running{{model_name="m{i}",engine="0"}} 1' for i in range(models)]
    return "\n".join(lines) + "\n"


class Target:
    def __init__(self) -> None:
        self.body = b""
        self.headers: dict[str, str] = {}
        self.status = 200

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.body, status=self.status, headers=self.headers)


@pytest.fixture
async def target() -> AsyncIterator[tuple[Target, str]]:
    fake = Target()
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield fake, url
    await runner.cleanup()


async def scrape(url: str, max_body: int = 16 * 1024 * 1024) -> tuple[object, Problems]:
    problems = Problems()
    async with aiohttp.ClientSession() as session:
        source = EngineSource(
            TargetConfig(name="e", url=url, kind="vllm"),
            session,
            timeout_seconds=10.0,
            max_body_bytes=max_body,
        )
        try:
            return await source.collect(problems), problems
        except SourceError as exc:
            return exc, problems


async def test_a_flood_of_label_values_is_trimmed_and_counted(
    target: tuple[Target, str],
) -> None:
    fake, url = target
    fake.body = flood(100_000).encode()  # 400k series and a 12.9 s /metrics before
    started = time.perf_counter()
    with peak_memory(128 * 1024 * 1024):
        result, problems = await scrape(url)
    elapsed = time.perf_counter() - started
    assert not isinstance(result, SourceError)
    assert len(result.models) == MAX_MODELS  # type: ignore[attr-defined]
    assert problems.reasons["series_limit"] == 1  # (and "metadata": no /v1/models here)
    assert result.dropped_samples >= 100_000 - MAX_SERIES  # type: ignore[attr-defined]
    assert elapsed < 10


def test_the_series_bound_keeps_a_real_exposition_whole() -> None:
    parsed = parse_engine_exposition(read_capture("after-load"), "vllm")
    assert parsed.series_dropped == 0
    assert parsed.dropped_samples == 0


async def test_a_gzip_bomb_stops_at_the_body_bound(target: tuple[Target, str]) -> None:
    fake, url = target
    fake.body = gzip.compress(b"#" * (64 * 1024 * 1024), 9)  # 64 MiB behind ~64 KiB
    fake.headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    with peak_memory():
        result, _ = await scrape(url, max_body=1024 * 1024)
    assert isinstance(result, SourceError)
    assert result.reason == "body_too_large"


async def test_a_redirect_to_another_host_is_not_followed(target: tuple[Target, str]) -> None:
    fake, url = target
    fake.status = 302
    fake.headers = {"Location": "http://169.254.169.254/latest/meta-data/"}
    result, _ = await scrape(url)
    assert isinstance(result, SourceError)
    assert result.reason == "http_status"
    assert "302" in result.message


@settings(max_examples=60, deadline=None)
@given(
    body=st.text(
        alphabet=st.sampled_from(list('vllm:num_requests_running{}="_ \n#TYPEgauge01.eNaInf+-,\\')),
        max_size=300,
    )
)
def test_arbitrary_text_is_parsed_or_refused_with_a_reason(body: str) -> None:
    reason, models = None, 0
    try:
        models = len(parse_engine_exposition(body, "vllm").models)
    except ExpositionError as exc:
        reason = exc.reason
    assert reason in {None, "no_engine_metrics", "truncated", "parse"}
    assert models <= MAX_MODELS
