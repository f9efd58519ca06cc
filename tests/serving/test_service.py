"""serve(): what the long-running process does beyond the agent itself."""

from __future__ import annotations

import subprocess
import sys

FROZEN_AGENT = """
import asyncio, gc
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.serving.service import serve

async def main() -> None:
    stop = asyncio.Event()

    async def started(url, agent) -> None:
        print("frozen", gc.get_freeze_count(), flush=True)
        stop.set()

    settings = load_settings(None, listen="127.0.0.1:0")
    await serve(settings, stop=stop, nvml=FakeNvml.with_gpus(1), on_started=started)

asyncio.run(main())
"""


def test_serve_freezes_the_start_up_heap_before_collecting() -> None:
    # Without the freeze, every full GC pass walks all of pydantic, aiohttp and prometheus_client
    # (~22 ms: the node benchmark's p99 cycle). Own process: gc.freeze() is process-wide.
    done = subprocess.run(
        [sys.executable, "-c", FROZEN_AGENT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frozen = [line for line in done.stdout.splitlines() if line.startswith("frozen ")]
    assert frozen, done.stdout[-2000:]
    assert int(frozen[0].split()[1]) > 10_000  # the libraries' objects (~60,000), not a handful


async def test_shutdown_is_bounded_whatever_a_source_is_doing() -> None:
    """A scrape that hangs within a 60 s timeout (up to 120 s is allowed, 3 calls per target)
    must not hold SIGTERM past shutdown_timeout_seconds: Kubernetes kills at 30 s."""
    import asyncio
    import time

    from aiohttp import web

    from moe_watch.config import load_settings
    from moe_watch.serving.server import start_server
    from moe_watch.serving.service import serve

    arrived = asyncio.Event()
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        arrived.set()
        await never.wait()
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/metrics", hang)
    engine, url = await start_server(app, "127.0.0.1", 0)
    settings = load_settings(
        None,
        targets=[f"slow={url}"],
        nvml="off",
        listen="127.0.0.1:0",
        scrape_timeout_seconds=60,
        shutdown_timeout_seconds=1.0,
    )
    stop = asyncio.Event()

    async def started(agent_url: str, agent: object) -> None:
        await asyncio.wait_for(arrived.wait(), 10)  # the cycle is inside the hanging scrape
        stop.set()

    began = time.perf_counter()
    try:
        await asyncio.wait_for(serve(settings, stop=stop, on_started=started), 30)
        elapsed = time.perf_counter() - began
    finally:
        never.set()
        await engine.cleanup()
    assert arrived.is_set()
    assert elapsed < 1.0 + 2.0, elapsed  # the bound, plus slack for a loaded machine
