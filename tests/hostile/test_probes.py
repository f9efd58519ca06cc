"""The kubelet's probes keep being answered by the real agent process whatever its other clients
do: 140 connections trickling their headers, 100 connections that never read a 10 MB /experts
answer, 50 concurrent /experts reads. A probe that times out three times restarts a healthy
agent; a server that buffers every unread answer grows by gigabytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from moe_watch.expert_file import CountsFile, write_counts_file
from tests.hostile.conftest import AgentProcess, running_agent

ENGINES = 16  # DeepSeek-V3 class: 58 MoE layers x 256 experts each
WRITE_SECONDS = 2.0
PROBE_LATENCY = 1.0  # the kubelet's default probe timeout is 1 s


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("probes")
    targets = []
    now = time.time()
    for engine in range(ENGINES):
        directory = root / f"e{engine}"
        directory.mkdir()
        write_counts_file(
            directory / "w.experts.json",
            CountsFile(
                pid=1, started=now - 60, updated=now + 3600, model="deepseek-ai/DeepSeek-V3",
                top_k=8, num_experts=256, layers=list(range(3, 61)),
                counts=[[2**52 + (layer * 7919 + e * 104729) % 2**40 for e in range(256)]
                        for layer in range(58)],  # long numbers: a ~4.5 MB document
            ),
        )  # fmt: skip
        targets.append(
            {
                "name": f"e{engine}",
                "url": "http://127.0.0.1:1",
                "experts": {"directory": str(directory)},
            }
        )
    settings = {
        "targets": targets,
        "interval_seconds": 2.0,
        "server_write_timeout_seconds": WRITE_SECONDS,
        "shutdown_timeout_seconds": 2.0,
    }
    with running_agent(root, settings) as process:
        process.wait_for("source down")  # the first cycle has run
        yield process
        process.stop(2.0)


async def probe(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as client,
            client.get(url + "/healthz") as response,
        ):
            await response.read()
            return response.status, time.perf_counter() - started
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, time.perf_counter() - started


async def experts_size(url: str) -> int:
    async with aiohttp.ClientSession() as client:
        for _ in range(50):  # bounded: the first cycle may still be publishing its snapshot
            async with client.get(url + "/experts") as response:
                body = await response.read()
            if b'"counts_total"' in body:
                return len(body)
            await asyncio.sleep(0.2)
    raise AssertionError("no expert matrix in /experts")


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_probes_answer_through_140_trickling_connections(agent: AgentProcess) -> None:
    # Before: the 128-connection cap was shared; 140 tricklers made /healthz answer 11 of 60.
    host, port = address(agent.url)
    stop = asyncio.Event()

    async def trickler() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for i in range(1000):  # bounded; the server cuts it at its header timeout
                    if stop.is_set() or reader.at_eof():
                        break
                    writer.write(b"X-%d: y\r\n" % i)
                    await writer.drain()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(reader.read(1), 0.3)
            except OSError:
                pass
            finally:
                writer.close()

    tricklers = [asyncio.create_task(trickler()) for _ in range(140)]
    try:
        await asyncio.sleep(1.0)  # let them take every connection the server has
        results = [await probe(agent.url) for _ in range(20)]
    finally:
        stop.set()
        await asyncio.gather(*tricklers)
    assert [status for status, _ in results] == [200] * 20
    assert max(latency for _, latency in results) < PROBE_LATENCY, results


async def test_connections_that_never_read_are_dropped_and_cost_bounded_memory(
    agent: AgentProcess,
) -> None:
    # Before: every unread answer was buffered whole; 100 such connections held 2 GB.
    size = await experts_size(agent.url)
    assert size > 4_000_000  # ~4.5 MB: far larger than what the sockets buffer
    before = agent.rss_bytes()
    sockets = []
    for _ in range(100):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set first
        sock.connect(address(agent.url))
        sock.sendall(b"GET /experts HTTP/1.1\r\nHost: x\r\n\r\n")
        sockets.append(sock)
    try:
        await asyncio.sleep(WRITE_SECONDS / 2)
        during = agent.rss_bytes()
        status, latency = await probe(agent.url)
        assert status == 200
        assert latency < PROBE_LATENCY
        # after the write deadline every one of them is closed by the agent
        received = await asyncio.to_thread(drain_all, sockets, WRITE_SECONDS + 5)
    finally:
        for sock in sockets:
            sock.close()
    assert during - before < 64 * 2**20, (before, during)  # 11 MB measured here
    assert all(0 < got < size for got in received), received  # cut, not completed


def drain_all(sockets: list[socket.socket], seconds: float) -> list[int]:
    """Bytes each socket gets until the peer closes it (reads only after the deadline has
    passed, so what came is what the agent buffered before dropping the connection)."""
    time.sleep(seconds)
    got = []
    for sock in sockets:
        sock.settimeout(2.0)
        total = 0
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(1 << 20):
                total += len(chunk)
        got.append(total)
    return got


async def test_probes_answer_during_50_concurrent_experts_reads(agent: AgentProcess) -> None:
    # Before: /experts was rebuilt per request (9.8 MB of JSON); 50 concurrent GETs pushed
    # /healthz to 12 s.
    await experts_size(agent.url)

    async def read_experts(client: aiohttp.ClientSession) -> int:
        async with client.get(agent.url + "/experts") as response:
            total = 0
            async for chunk in response.content.iter_chunked(1 << 20):
                total += len(chunk)
            return total

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as client:
        readers = asyncio.gather(*(read_experts(client) for _ in range(50)))
        results = [await probe(agent.url) for _ in range(10)]
        sizes = await readers
    assert len(set(sizes)) == 1  # every reader got the whole (same) document
    assert [status for status, _ in results] == [200] * 10
    assert max(latency for _, latency in results) < PROBE_LATENCY, results
