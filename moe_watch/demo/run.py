"""``moe-watch demo``: the real agent against a simulated vLLM and simulated GPUs.

Everything but the engine and the GPUs is the production path: the agent scrapes the simulated
engine over HTTP, reads the fake NVML through the real NVML source, and serves /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch.agent import Agent
from moe_watch.config import ConfigError, Settings, load_settings
from moe_watch.demo.fake_kubelet import FakeKubelet, gpu_allocation
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.demo.scenarios import SCENARIOS, Scenario
from moe_watch.demo.simulated_engine import EngineSim
from moe_watch.demo.simulated_engine_server import start_engine_server
from moe_watch.expert_file import All2AllTimes, CountsFile, StepCoverage, write_counts_file
from moe_watch.logs import configure_logging
from moe_watch.serving.exporter import build_registry
from moe_watch.serving.service import ListenError, install_stop_signals, serve
from moe_watch.signals.power_bins import BINS
from moe_watch.vllm_plugin.all2all import BOUNDS as ALL2ALL_BOUNDS

ENGINE_ID = "demo-mixtral"
ENGINE_PID = os.getpid()  # a real process, so /status shows a PID (not a vLLM command line)
# What the demo engine was sized for: 2 x H100 for Mixtral 8x7B. max_num_seqs and max_model_len are
# the simulated engine's (scenarios.Scenario); it runs with gpu_memory_utilization 0.9 against a
# planned 0.85, so drift and the budget have something to show.
DEMO_PLAN = """\
model: mixtral-8x7b
dtype: bf16
gpu: h100-80
gpus: 2
vllm:
  gpu_memory_utilization: 0.85
  max_num_seqs: 16
  max_model_len: 32768
"""
WARM_UP_SECONDS = 120.0
POD_PATTERN = re.compile(r"^([a-z0-9][a-z0-9.-]*)/([a-z0-9][a-z0-9.-]*)(?:/([a-z0-9][a-z0-9-]*))?$")
DEFAULT_CONTAINER = "vllm"


def run_demo(args: argparse.Namespace) -> int:
    if args.list_scenarios:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:12} {scenario.description}")
        return 0
    if args.scenario not in SCENARIOS:
        raise ConfigError(
            f"invalid setting 'scenario': unknown scenario {args.scenario!r} (one of {', '.join(SCENARIOS)})"
        )
    scenario = SCENARIOS[args.scenario]
    if args.pod is not None and not POD_PATTERN.match(args.pod):
        raise ConfigError(
            f"invalid setting 'pod': {args.pod!r} is not NAMESPACE/POD[/CONTAINER] (Kubernetes names)"
        )
    configure_logging("auto", args.log_level)
    try:
        asyncio.run(_demo(args, scenario))
    except ListenError as exc:
        print(f"moe-watch: {exc}", file=sys.stderr)
        return 2
    return 0


def drive_gpus(
    fake: FakeNvml, sim: EngineSim, elapsed: float, step: float = 0.0, *, pulled: bool = False
) -> None:
    """Make the simulated GPUs follow the simulated engine's load (``step``: seconds since the
    last call, for the NVLink byte counters). GPU 1 is lost after the scenario's time, or once
    ``pulled`` (SIGUSR1)."""
    lost_after = sim.scenario.gpu_lost_after_seconds
    for gpu in fake.gpus:
        if not sim.scenario.nvlink and gpu.nvlinks:
            gpu.pcie_only()
        gpu.pcie_generation = gpu.pcie_max_generation = sim.scenario.pcie_generation
        if any(gpu.nvlinks):
            kib = sim.scenario.nvlink_bytes_per_second * sim.gpu_utilization(gpu.index) * step
            gpu.nvlink_tx_kib += int(kib / 1024)
            gpu.nvlink_rx_kib += int(kib / 1024)
        gpu.utilization_percent = round(100 * sim.gpu_utilization(gpu.index))
        gpu.memory_used_bytes = sim.gpu_memory_used_bytes(gpu.index)
        gpu.power_mw = 120_000 + gpu.utilization_percent * 5_800
        gpu.temperature_c = 38 + gpu.utilization_percent // 3
        gpu.pids = [ENGINE_PID]
        scheduled = lost_after is not None and elapsed >= lost_after
        gpu.lost = gpu.index == 1 and (pulled or scheduled)


class All2AllSim:
    """The per-forward-pass all-to-all histogram the plugin would write for the simulated engine:
    one forward pass per decode step while requests run, times spread around the scenario's
    ``all2all_seconds`` (deterministic)."""

    def __init__(self, scenario: Scenario) -> None:
        self.typical = scenario.all2all_seconds
        self.steps_per_second = 1.0 / (scenario.itl_seconds * scenario.latency_multiplier)
        self.buckets = [0] * (len(ALL2ALL_BOUNDS) + 1)
        self.sum = 0.0
        self.passes = 0
        self._debt = 0.0

    def advance(self, seconds: float, busy: bool) -> None:
        if not busy or seconds <= 0:
            return
        self._debt += seconds * self.steps_per_second
        spread = (0.6, 0.8, 0.9, 1.0, 1.0, 1.1, 1.2, 1.4, 1.7, 2.2)  # a long-ish tail
        while self._debt >= 1:
            self._debt -= 1
            seconds_ = self.typical * spread[self.passes % len(spread)]
            index = next(
                (i for i, bound in enumerate(ALL2ALL_BOUNDS) if seconds_ <= bound),
                len(ALL2ALL_BOUNDS),
            )
            self.buckets[index] += 1
            self.sum += seconds_
            self.passes += 1

    def times(self) -> All2AllTimes:
        return All2AllTimes(
            bounds=list(ALL2ALL_BOUNDS),
            buckets=list(self.buckets),
            count=self.passes,
            sum=self.sum,
            backend="allgather_reducescatter",
            method="cuda_events",
        )


def step_coverage(sim: EngineSim) -> StepCoverage:
    """The plugin's coverage sums for the simulated engine (its expectations, rounded)."""
    return StepCoverage(
        bins=list(BINS),
        steps=list(sim.coverage_steps),
        tokens=list(sim.coverage_tokens),
        distinct=[[round(v) for v in row] for row in sim.coverage_distinct],
        sample_every=sim.scenario.coverage_sample_every,
    )


def write_expert_counts(
    directory: Path,
    sim: EngineSim,
    all2all: All2AllSim | None = None,
    *,
    now: float | None = None,
) -> None:
    """What the moe-watch vLLM plugin in the simulated engine's worker would write."""
    s = sim.scenario
    write_counts_file(
        directory / f"demo-{ENGINE_PID}.experts.json",
        CountsFile(
            pid=ENGINE_PID,
            started=sim.counters_started,
            updated=time.time() if now is None else now,
            model=sim.model_name,
            top_k=s.top_k,
            num_experts=s.num_experts,
            layers=list(range(s.num_layers)),
            counts=[list(row) for row in sim.expert_counts],
            vllm_version=sim.version,
            ep_size=s.gpu_count,
            all2all=all2all.times() if all2all is not None and s.gpu_count > 1 else None,
            coverage=step_coverage(sim),
        ),
    )


def family_summary(agent: Agent) -> list[str]:
    text = generate_latest(build_registry(lambda: agent.snapshot)).decode()
    series: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        series[family.name] += len(family.samples)
    return [f"  {name:50} {count:4d} series" for name, count in sorted(series.items()) if count]


async def _demo(args: argparse.Namespace, scenario: Scenario) -> None:
    started = time.time()
    # Start the engine two minutes in the past: the first scrapes already see a busy engine.
    sim = EngineSim(scenario, start_time=started - WARM_UP_SECONDS)
    sim.advance(started)
    engine = await start_engine_server(sim)
    fake = FakeNvml.with_gpus(scenario.gpu_count)
    drive_gpus(fake, sim, 0.0)
    experts_dir = Path(tempfile.mkdtemp(prefix="moe-watch-demo-experts-"))
    all2all = All2AllSim(scenario)
    write_expert_counts(experts_dir, sim, all2all)
    plan = experts_dir / "plan.yaml"
    plan.write_text(DEMO_PLAN)
    kubelet, engine_id = None, ENGINE_ID
    if args.pod is not None:  # the simulated GPUs belong to that pod, as the kubelet says
        match = POD_PATTERN.match(args.pod)
        assert match is not None  # checked in run_demo
        namespace, pod, container = match.group(1), match.group(2), match.group(3)
        engine_id = f"{namespace}/{pod}"  # what discovery names a pod's engine
        kubelet = await FakeKubelet(
            experts_dir / "kubelet.sock",
            gpu_allocation(
                namespace, pod, container or DEFAULT_CONTAINER, [g.uuid for g in fake.gpus]
            ),
        ).start()
    settings: Settings = load_settings(
        None,
        targets=[
            {
                "name": engine_id,
                "url": engine.url,
                "experts": {"source": "plugin", "directory": str(experts_dir)},
                "plan": str(plan),
            }
        ],
        expert_full_detail=True,  # 32 layers x 8 experts: small enough, and the heatmap needs it
        # The batching curve's knee needs this much evidence per batch: 10 s so that the demo
        # shows one within a minute (a real engine's default is 300 s).
        batching_min_bin_seconds=10.0,
        listen=args.listen,
        interval_seconds=args.interval_seconds,
        window_seconds=args.window_seconds,
        pod_resources_socket=kubelet.socket if kubelet is not None else None,
        log_level=args.log_level,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    pulled = asyncio.Event()  # SIGUSR1: GPU 1 falls off the bus now (fault injection)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, pulled.set)

    async def gpus_follow_engine() -> None:
        last = time.time()
        while not stop.is_set():
            now = time.time()
            sim.advance(now)
            drive_gpus(fake, sim, now - started, now - last, pulled=pulled.is_set())
            all2all.advance(now - last, sim.running > 0)
            write_expert_counts(experts_dir, sim, all2all)
            last = now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.interval_seconds / 2)

    async def on_started(url: str, agent: Agent) -> None:
        print(
            f"moe-watch demo: serving {url}/metrics  (scenario {scenario.name}: {scenario.description})"
        )
        print(
            f"  simulated vLLM at {engine.url}/metrics, {scenario.gpu_count} simulated GPUs; also {url}/status and {url}/experts"
        )
        print(f"  kill -USR1 {os.getpid()}: GPU 1 falls off the bus", flush=True)
        if args.duration is not None:
            asyncio.get_running_loop().call_later(args.duration, stop.set)

        async def summary() -> None:
            # Rates and quantiles need two scrapes in the window, so the second cycle has them;
            # the EPLB what-if it starts runs beside the cycles, and the next cycle publishes it.
            await agent.wait_for_cycle(2)
            await agent.settle()
            await agent.wait_for_cycle(3)
            print("metric families:", *family_summary(agent), sep="\n", flush=True)

        asyncio.get_running_loop().create_task(summary())

    follower = asyncio.get_running_loop().create_task(gpus_follow_engine())
    try:
        await serve(settings, stop=stop, nvml=fake, on_started=on_started)
    finally:
        stop.set()
        await follower
        await engine.stop()
        if kubelet is not None:
            await kubelet.stop()
        shutil.rmtree(experts_dir, ignore_errors=True)
