"""The engine bodies the agent holds at once share one budget; past it the largest body in
flight is dropped (its read ended from outside), and every smaller one reads on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from moe_watch.config import TargetConfig
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.body_budget import BodyBudget, BodyBudgetSpent
from moe_watch.sources.engine import EngineSource
from tests.conftest import FIXTURES
from tests.hostile.conftest import peak_memory

CAPTURE = "vllm-0.32-cpu-tiny-mixtral.after-load.prom"


def test_the_largest_body_is_dropped_and_the_others_read_on() -> None:
    budget = BodyBudget(100)
    aborted: list[str] = []
    with budget.reader() as big, budget.reader() as small:
        big.abort = lambda: aborted.append("big")
        small.abort = lambda: aborted.append("small")
        big.take(60)
        small.take(30)
        small.take(20)  # 110 > 100: the largest (big, 60) goes, though small asked
        assert (big.dropped, small.dropped, aborted) == (True, False, ["big"])
        assert budget.total == 50
        with pytest.raises(BodyBudgetSpent):
            big.take(1)  # its next chunk ends its read
        small.take(50)  # exactly the budget
        with pytest.raises(BodyBudgetSpent):
            small.take(1)  # now it is the largest
    assert (budget.total, budget.readers) == (0, {})


def test_a_body_parsed_leaves_the_budget() -> None:
    budget = BodyBudget(100)
    for _ in range(5):
        with budget.reader() as reader:
            reader.take(90)
    assert budget.total == 0


# Engines in a process of their own (their sending buffers are not the agent's memory): six
# answering 8 MiB each and one answering the real capture; the ports on stdout once listening.
SERVE = """
import asyncio, sys
from aiohttp import web

flood = b'vllm:num_requests_running{model_name="m"} 1\\n' + (
    b'vllm:num_requests_waiting{model_name="m"} 1\\n' * (8 * 1024 * 1024 // 44))
real = open(sys.argv[1], "rb").read()

async def main():
    ports = []
    for body in [flood] * 6 + [real]:
        app = web.Application()
        app.router.add_get("/metrics", lambda request, body=body: web.Response(body=body))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])
    print(*ports, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def engines() -> Iterator[list[str]]:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(FIXTURES / "vllm" / CAPTURE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        ports = server.stdout.readline().split()  # blocks until every engine listens
        assert len(ports) == 7, ports
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        server.kill()
        server.wait()


async def test_engines_answering_floods_together_stay_within_the_budget(
    engines: list[str],
) -> None:
    # Before: every engine's body was held whole at once: six 8 MiB bodies were ~100 MiB of
    # the agent's memory in one cycle (16 such engines pass the chart's 256 MiB limit).
    # Under one flood's size: every flood is dropped however the bodies interleave (which
    # of several is the largest is the first test's), and the real engine's never is.
    budget = BodyBudget(6 * 1024 * 1024)
    async with aiohttp.ClientSession() as session:
        sources = [
            EngineSource(
                TargetConfig(name=f"e{i}", url=url), session, timeout_seconds=30,
                max_body_bytes=16 * 1024 * 1024, bodies=budget,
            )
            for i, url in enumerate(engines)
        ]  # fmt: skip

        async def scrape(source: EngineSource) -> object:
            try:
                return await source.collect(Problems())
            except SourceError as exc:
                return exc

        with peak_memory(budget.limit + 2 * 8 * 1024 * 1024):  # + one body parsed, and its copy
            results = await asyncio.gather(*(scrape(source) for source in sources))
    *floods, real = results
    assert not isinstance(real, SourceError), real  # the real engine's 54 KB body read on
    assert [r.reason if isinstance(r, SourceError) else r for r in floods] == ["body_budget"] * 6
    assert "max_body_bytes_in_flight" in str(floods[0])
    assert budget.total == 0
