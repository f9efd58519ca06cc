"""`moe-watch run` as the adversary drives it: the real command and agent, with three seams a
machine without GPUs needs. NVML is the fake (two GPUs; GPU 1 runs the pid in
``ADVERSARY_NEIGHBOUR_PID``), /proc is read from the directory in ``ADVERSARY_PROC_ROOT`` (the
test writes the neighbour's command line there), and engines' /v1/models and /version are read
every cycle instead of every minute, so each generated answer is read in the cycle after it.
Discovery paces itself for the adversary's tempo (lists 50 ms apart, back-offs of at most
0.2 s, a watch that ends at once is no failure: the API server ends it to publish the next
example) and reads its token from ``ADVERSARY_SERVICE_ACCOUNT``."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

from moe_watch import cli
from moe_watch.agent import cycle
from moe_watch.agent.cycle import Agent
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.serving import service
from moe_watch.sources import engine, kube_client
from moe_watch.sources.discovery import PodWatcher


def main() -> int:
    engine.METADATA_REFRESH_SECONDS = 0.0
    nvml = FakeNvml.with_gpus(2)
    nvml.gpus[1].pids = [int(os.environ["ADVERSARY_NEIGHBOUR_PID"])]
    service.Agent = functools.partial(Agent, proc_root=os.environ["ADVERSARY_PROC_ROOT"])  # type: ignore[misc]
    cycle.PodWatcher = functools.partial(  # type: ignore[misc]
        PodWatcher, min_relist_seconds=0.05, max_backoff_seconds=0.2, min_watch_seconds=0.0
    )
    account = Path(os.environ["ADVERSARY_SERVICE_ACCOUNT"])
    kube_client.token_headers = functools.partial(kube_client.token_headers, account)
    real_serve = service.serve

    async def serve(settings: Any, **options: Any) -> None:
        await real_serve(settings, nvml=nvml, **options)

    service.serve = serve  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
