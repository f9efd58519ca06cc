"""A bounded soak with faults: engines flapping, returning garbage, hanging and restarting; a GPU
lost and back; the expert plugin restarting; a discovered target removed; hostile files next to
the plugin's (a FIFO, a symlink to /dev/zero, JSON nested 100,000 deep) and an EPLB log line
that never ends. The agent must not crash, must count every fault under its reason,
must never export a failed or vanished engine's series as fresh, and must not grow."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from moe_watch.agent import Agent
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.demo.scenarios import SCENARIOS
from moe_watch.demo.simulated_engine import EngineSim
from moe_watch.demo.simulated_engine_server import SimServer, start_engine_server
from moe_watch.expert_file import CountsFile, write_counts_file
from moe_watch.sources.discovery import PodTarget
from tests.test_agent import exposition

CYCLES = 240
HOSTILE_FROM = 30
ENDLESS_FROM = 60


def rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plugin_file(directory: Path, started: float, step: int, now: float) -> None:
    counts = [[step * (e + 1) for e in range(8)] for _ in range(4)]
    write_counts_file(
        directory / "w.experts.json",
        CountsFile(
            pid=1,
            started=started,
            updated=now,
            model="m",
            top_k=2,
            num_experts=8,
            layers=[0, 1, 2, 3],
            counts=counts,
        ),
    )


async def test_soak_with_faults(tmp_path: Path) -> None:
    clock = [time.time()]
    servers: dict[str, SimServer] = {}
    for name in ("steady", "flappy", "restarts", "pod"):
        servers[name] = await start_engine_server(
            EngineSim(SCENARIOS["normal"], start_time=clock[0] - 120), clock=lambda: clock[0]
        )
    experts = tmp_path / "experts"
    experts.mkdir()
    eplb_log = tmp_path / "vllm.log"
    eplb_log.write_text("")
    nvml = FakeNvml.with_gpus(4)
    targets = [
        {
            "name": "steady",
            "url": servers["steady"].url,
            "gpus": [0, 1],
            "experts": {"directory": str(experts)},
            "eplb_log": str(eplb_log),
        },
        {"name": "flappy", "url": servers["flappy"].url, "gpus": [2]},
        {"name": "restarts", "url": servers["restarts"].url, "gpus": [3]},
    ]
    config = load_settings(None, targets=targets, scrape_timeout_seconds=1.0, window_seconds=120)
    injected: dict[str, int] = {"http_status": 0, "encoding": 0, "timeout": 0, "truncated": 0}
    started = 1.0
    rss_mid = 0.0
    try:
        async with Agent(config, nvml=nvml, clock=lambda: clock[0]) as agent:
            agent.set_discovered(
                {"uid-1": PodTarget("llm", "pod-0", "uid-1", servers["pod"].url, "/metrics")}
            )
            for cycle in range(CYCLES):
                clock[0] += 5.0
                flappy = servers["flappy"]
                flappy.fail_status = flappy.garbage = flappy.truncate_at = None
                flappy.delay_seconds = 0.0
                fault = None
                if cycle % 10 == 3:
                    flappy.fail_status, fault = 503, "http_status"
                elif cycle % 10 == 6:
                    flappy.garbage, fault = b"\xff\xfe\x00 not an exposition", "encoding"
                elif cycle % 40 == 9:
                    flappy.delay_seconds, fault = 5.0, "timeout"
                elif cycle % 10 == 8:
                    flappy.truncate_at, fault = 900, "truncated"
                if fault:
                    injected[fault] += 1
                if cycle % 50 == 25:
                    servers["restarts"].reset_counters()
                nvml.gpus[2].lost = 100 <= cycle < 150
                if 120 <= cycle < 130:  # the vLLM worker restarts: its file is gone, then a new one
                    (experts / "w.experts.json").unlink(missing_ok=True)
                else:
                    started = started if cycle < 130 else 2.0
                    plugin_file(experts, started, cycle, clock[0])
                if cycle == 200:
                    agent.set_discovered({})  # the pod went away
                if cycle == HOSTILE_FROM:  # they stay: counted every cycle, never read
                    os.mkfifo(experts / "fifo.experts.json")
                    (experts / "zero.experts.json").symlink_to("/dev/zero")
                    (experts / "deep.experts.json").write_text("[" * 100_000 + "]" * 100_000)
                with eplb_log.open("a") as stream:
                    if ENDLESS_FROM <= cycle < ENDLESS_FROM + 10:  # 10 x 16 KiB, no newline
                        stream.write("x" * 16 * 1024)
                    else:
                        stream.write(
                            f"EPLB step: {cycle} for model m: avg_tokens=500.00, "
                            f"max_tokens=1000, balancedness=0.5000, steps until the next "
                            "rearrangement: 2880\n"
                        )

                snap = await agent.run_cycle()
                metrics = exposition(snap)
                engines_exported = {
                    dict(labels).get("engine")
                    for name, labels in metrics
                    if name == "moe_watch_engine_info"
                }

                assert snap.targets_up["flappy"] is (fault is None), (cycle, fault)
                assert ("flappy" in engines_exported) is (fault is None), (
                    cycle
                )  # nothing stale as fresh
                assert snap.targets_up["steady"] is True
                gpu2 = next(v.sample for v in snap.gpus if v.sample.index == 2)
                assert gpu2.up is not (100 <= cycle < 150)
                restarts = next(r for r in snap.engines if r.name == "restarts").views[0].signals
                assert all(
                    (getattr(restarts, f) or 0.0) >= 0.0
                    for f in (
                        "generation_tokens_per_second",
                        "prompt_tokens_per_second",
                        "requests_per_second",
                    )
                )
                if cycle >= 200:  # removed before this cycle's collection
                    assert "llm/pod-0" not in snap.targets_up
                    assert not any(
                        dict(labels).get("engine") == "llm/pod-0" for _, labels in metrics
                    )
                else:
                    assert snap.targets_up.get("llm/pod-0") is True
                if cycle == 100:
                    gc.collect()
                    rss_mid = rss_mb()
            gc.collect()
            rss_end = rss_mb()
            flappy_errors = next(s for s in snap.sources if s.name == "engine:flappy").errors_total
            nvml_errors = next(s for s in snap.sources if s.name == "nvml").errors_total
            expert_status = next(s for s in snap.sources if s.name == "experts:steady")
            eplb_status = next(s for s in snap.sources if s.name == "eplb:steady")
            balancedness = {
                (r.name, model): value
                for r in snap.engines
                for model, value in r.eplb_balancedness.items()
            }
    finally:
        for server in servers.values():
            await server.stop()
    assert {reason: flappy_errors.get(reason, 0) for reason in injected} == injected
    assert nvml_errors.get("gpu_lost") == 50
    hostile_cycles = CYCLES - HOSTILE_FROM
    assert dict(expert_status.errors_total) == {
        "no_data": 10,  # the ten cycles without a plugin file
        "not_regular": hostile_cycles,  # the FIFO: refused, never blocking a thread
        "symlink": hostile_cycles,  # /dev/zero: not followed
        "bad_file": hostile_cycles,  # the deep JSON: not a RecursionError
    }
    assert expert_status.up
    assert dict(eplb_status.errors_total) == {"line_too_long": 1}
    assert eplb_status.up
    assert balancedness == {("steady", "m"): 0.5}  # following resumed after the endless line
    assert rss_end - rss_mid < 20, f"RSS grew {rss_end - rss_mid:.1f} MB over {CYCLES - 100} cycles"
