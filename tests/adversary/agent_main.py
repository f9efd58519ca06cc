"""`moe-watch run` as the adversary drives it: the real command and agent, with three seams a
machine without GPUs needs. NVML is the fake (two GPUs; GPU 1 runs the pid in
``ADVERSARY_NEIGHBOUR_PID``), /proc is read from the directory in ``ADVERSARY_PROC_ROOT`` (the
test writes the neighbour's command line there), and engines' /v1/models and /version are read
every cycle instead of every minute, so each generated answer is read in the cycle after it."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from moe_watch import cli
from moe_watch.agent.cycle import Agent
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.serving import service
from moe_watch.sources import engine


def main() -> int:
    engine.METADATA_REFRESH_SECONDS = 0.0
    nvml = FakeNvml.with_gpus(2)
    nvml.gpus[1].pids = [int(os.environ["ADVERSARY_NEIGHBOUR_PID"])]
    service.Agent = functools.partial(Agent, proc_root=os.environ["ADVERSARY_PROC_ROOT"])  # type: ignore[misc]
    real_serve = service.serve

    async def serve(settings: Any, **options: Any) -> None:
        await real_serve(settings, nvml=nvml, **options)

    service.serve = serve  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
