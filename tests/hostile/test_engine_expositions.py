"""Hostile engine /metrics answers: label floods, bombs, redirects, garbage. Each is refused or
trimmed with a counted reason, within a time and memory bound, and never raises out of the
source."""

from __future__ import annotations

import gzip
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch import limits
from moe_watch import samples as s
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


@pytest.mark.parametrize("line", ["#\n", "# x\n", "vllm:other 1\n", "# \u00e9\n"])
async def test_a_body_of_tiny_lines_costs_about_its_size_whatever_its_shape(
    target: tuple[Target, str], line: str
) -> None:
    # Before: 4M lines of "# x" in a 16 MiB body were split into a list of 4M strings, a
    # ~240 MiB peak from one engine (the chart's memory limit is 256 MiB); the agent's RSS
    # went from 84 to 390 MiB in one cycle.
    fake, url = target
    head = b'vllm:num_requests_running{model_name="m"} 1\n'
    size = limits.ENGINE_BODY_BYTES - 1024
    fake.body = head + line.encode() * ((size - len(head)) // len(line.encode()))
    with peak_memory(3 * len(fake.body)):  # the bytes read and the text decoded from them
        result, _ = await scrape(url)
    assert not isinstance(result, SourceError), result
    assert result.models[0].gauges[s.GAUGE_REQUESTS_RUNNING] == 1  # type: ignore[attr-defined]


def test_the_series_bound_keeps_a_real_exposition_whole() -> None:
    parsed = parse_engine_exposition(read_capture("after-load"), "vllm")
    assert parsed.series_dropped == 0
    assert parsed.dropped_samples == 0


POOL = limits.KV_ALLOCATION // 128  # blocks of the capture's block_size that fill the limit


@pytest.mark.parametrize(
    ("blocks", "block_size", "capacity"),
    [
        (str(POOL), "128", float(limits.KV_ALLOCATION)),  # at the limit: published
        ("8192", "128", 8192.0 * 128),
        (str(POOL + 1), "128", None),  # each number within the limit, their product past it
        ("1e400", "128", None),  # infinite
        ("8192", "nan", None),
        ("-8192", "-128", None),  # negative twice: a positive product
        (str(10**200), str(10**200), None),
    ],
    ids=["at_the_limit", "real", "product_past", "infinite", "nan", "negative", "huge"],
)
def test_the_kv_capacity_from_cache_config_info_is_held_to_the_allocation_limit(
    blocks: str, block_size: str, capacity: float | None
) -> None:
    # Before: num_gpu_blocks x block_size became the capacity gauge unchecked, so an engine
    # whose labels the KV plan refuses as past KV_ALLOCATION still published a capacity of
    # 1.4e17 or +Inf tokens (and free tokens derived from it).
    text = read_capture("after-load")
    text = re.sub(
        r'(cache_config_info\{.*?)num_gpu_blocks="[^"]*"', rf'\g<1>num_gpu_blocks="{blocks}"', text
    )
    text = re.sub(
        r'(cache_config_info\{.*?)block_size="[^"]*"', rf'\g<1>block_size="{block_size}"', text
    )
    parsed = parse_engine_exposition(text, "vllm")
    assert parsed.info["num_gpu_blocks"] == blocks  # the labels themselves are kept
    for model in parsed.models:
        assert model.gauges.get(s.GAUGE_KV_CACHE_CAPACITY_TOKENS) == capacity


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
