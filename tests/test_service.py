"""serve(): what the long-running process does beyond the agent itself."""

from __future__ import annotations

import subprocess
import sys

FROZEN_AGENT = """
import asyncio, gc
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.service import serve

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
