"""The Agent: owns the targets, the node sources and the latest Snapshot; runs the cycle on a
fixed schedule. Use as an async context manager."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from moe_watch.agent.assemble import assemble_snapshot, engine_record, gpu_views
from moe_watch.agent.curve_state import CurveStore
from moe_watch.agent.engine_target import EngineTarget, TargetReading, nothing
from moe_watch.agent.stages import Stages
from moe_watch.config import Settings, TargetConfig
from moe_watch.limits import TARGETS_PER_AGENT
from moe_watch.samples import GpuReading, ProcessInfo
from moe_watch.signals.batching import BatchCurve
from moe_watch.snapshot import ASSEMBLE, EngineRecord, GpuView, Snapshot
from moe_watch.sources.body_budget import BodyBudget
from moe_watch.sources.discovery import PodTarget, PodWatcher
from moe_watch.sources.podresources import Allocation, PodResourcesSource
from moe_watch.sources.proc import ProcSource
from moe_watch.sources.runner import SourceRunner, SourceStatus

log = structlog.get_logger("moe_watch.agent")

POD_RESOURCES_TIMEOUT_SECONDS = 5.0
PROC_TIMEOUT_SECONDS = 2.0
STATE_SAVE_SECONDS = 60.0  # how often the batching curves are written to the state file


class Agent:
    def __init__(
        self,
        settings: Settings,
        *,
        nvml: Any | None = None,
        clock: Callable[[], float] = time.time,
        proc_root: str = "/proc",  # hostPID in Kubernetes: the engines' processes are visible here
    ) -> None:
        self.settings = settings
        self._nvml_module = nvml
        self._clock = clock
        self._proc_root = proc_root
        self._session: aiohttp.ClientSession | None = None
        self._targets: dict[str, EngineTarget] = {}
        # every engine's /metrics body counts against one budget while it is held
        self._bodies = BodyBudget(settings.max_body_bytes_in_flight)
        self._static: set[str] = {t.name for t in settings.targets}
        self._nvml_runner: SourceRunner[GpuReading] | None = None
        self._proc_runner: SourceRunner[dict[int, ProcessInfo]] | None = None
        self._pod_resources_runner: SourceRunner[tuple[Allocation, ...]] | None = None
        self._pids: tuple[int, ...] = ()  # on the GPUs in the latest NVML reading
        # The node's part of the cycle (GPU ownership); its failures count under nvml.
        self._node_stages = Stages({"source": "nvml"})
        self._kubelet: tuple[Allocation, ...] = ()  # the node's GPU allocations (pod-resources)
        self.discovery: PodWatcher | None = None
        self._discovery_runner: SourceRunner[int] | None = None  # discovery in /status
        self._discovery_task: asyncio.Task[None] | None = None
        self._discovery_stop = asyncio.Event()
        self._pending_pods: dict[str, PodTarget] | None = None
        self._pod_engines: dict[str, str] = {}  # pod uid -> engine (discovery)
        self._engine_pods: dict[str, tuple[str, str]] = {}  # engine -> (namespace, pod)
        self._snapshot: Snapshot | None = None
        self._cycle = 0
        self.first_cycle_done = asyncio.Event()
        self._cycle_done = asyncio.Event()  # replaced every cycle: waiters wake once per cycle
        self._state = CurveStore(settings.state_dir, clock) if settings.state_dir else None
        self._state_saved_at: float | None = None
        self._state_saving: asyncio.Task[None] | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def __aenter__(self) -> Agent:
        s = self.settings
        if self._state is not None:  # before the targets: they start from what it kept
            await asyncio.to_thread(self._state.load)
            self._state_saved_at = self._clock()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(4, len(s.targets) * 2)),
            auto_decompress=True,
        )
        for target in s.targets:
            self._add_target(target)
        if s.discovery:
            self._start_discovery()
        if s.pod_resources_socket is not None:
            self._pod_resources_runner = SourceRunner(
                PodResourcesSource(s.pod_resources_socket),
                timeout_seconds=POD_RESOURCES_TIMEOUT_SECONDS,
                clock=self._clock,
            )
        if s.nvml != "off":
            from moe_watch.sources.nvml import NvmlSource  # pynvml only where GPUs are read

            nvml_source = NvmlSource(self._nvml_module, call_timeout=s.nvml_timeout_seconds)
            self._nvml_runner = SourceRunner(
                nvml_source, timeout_seconds=s.nvml_timeout_seconds + 1, clock=self._clock
            )
            self._proc_runner = SourceRunner(
                ProcSource(lambda: self._pids, self._proc_root),
                timeout_seconds=PROC_TIMEOUT_SECONDS,
                clock=self._clock,
            )
        log.info(
            "agent configured",
            targets=[f"{t.name}={t.url}" for t in s.targets],
            nvml=s.nvml,
            interval_seconds=s.interval_seconds,
            window_seconds=s.window_seconds,
        )
        return self

    async def settle(self) -> None:
        """Wait for every target's background work (the EPLB what-if) to finish."""
        await asyncio.gather(*(target.settle() for target in self._targets.values()))

    async def __aexit__(self, *exc: object) -> None:
        for target in self._targets.values():
            target.abandon()  # a what-if in flight is cancelled, never waited for
        if self._state_saving is not None:
            await self._state_saving
        if self._state is not None and self._snapshot is not None:  # what this run learnt
            await asyncio.to_thread(self._state.save, self.batch_curves())
        if self._discovery_task is not None:
            self._discovery_stop.set()
            self._discovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery_task
        for runner in self._runners():
            await runner.source.close()
        if self._session is not None:
            await self._session.close()

    # -- targets

    def _add_target(self, config: TargetConfig) -> None:
        assert self._session is not None
        target = EngineTarget(config, self.settings, self._session, self._clock, self._bodies)
        if self._state is not None:
            target.restore(
                {
                    model: c
                    for (engine, model), c in self._state.restored.items()
                    if engine == config.name
                }
            )
        self._targets[config.name] = target

    def batch_curves(self) -> dict[tuple[str, str], BatchCurve]:
        """Every target's batching curves, by (engine, model)."""
        return {
            (name, model): curve
            for name, target in self._targets.items()
            for model, curve in target.batch_curves.items()
        }

    def _save_state_now_and_then(self, now: float) -> None:
        """Write the curves every STATE_SAVE_SECONDS, beside the cycle (a thread, one at a time)."""
        if self._state is None or (self._state_saving and not self._state_saving.done()):
            return
        last = self._state_saved_at
        if last is not None and 0 <= now - last < STATE_SAVE_SECONDS:
            return
        self._state_saved_at = now
        self._state_saving = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._state.save, self.batch_curves())
        )

    def _start_discovery(self) -> None:
        from moe_watch.sources.discovery import DiscoverySource
        from moe_watch.sources.kube_client import ca_context, token_headers

        assert self._session is not None
        assert self.settings.node_name is not None
        watcher = PodWatcher(
            self._session,
            self.settings.kube_api,
            self.settings.node_name,
            credentials=token_headers,  # bound tokens rotate: re-read on every connect
            ssl=ca_context(),
            on_change=self.set_discovered,
            # the configured targets count against the same limit
            max_targets=max(0, TARGETS_PER_AGENT - len(self._static)),
        )
        self.discovery = watcher
        # Discovery runs on its own task; its runner reports what it saw, like any source.
        self._discovery_runner = SourceRunner(
            DiscoverySource(watcher), timeout_seconds=1.0, clock=self._clock
        )
        self._discovery_stop = asyncio.Event()
        self._discovery_task = asyncio.get_running_loop().create_task(
            watcher.run(self._discovery_stop)
        )

    def set_discovered(self, pods: Mapping[str, PodTarget]) -> None:
        """Discovery's current targets (pod uid -> target); applied at the next cycle's start."""
        self._pending_pods = dict(pods)

    def _apply_discovered(self) -> None:
        pods, self._pending_pods = self._pending_pods, None
        if pods is None:
            return
        wanted = {p.engine: p for p in pods.values()}
        for name in self._targets.keys() - wanted.keys() - self._static:
            log.info("target removed", engine=name)
            del self._targets[name]
        for name in wanted.keys() - self._targets.keys():
            pod = wanted[name]
            log.info("target discovered", engine=name, url=pod.url + pod.metrics_path)
            self._add_target(TargetConfig(name=name, url=pod.url, metrics_path=pod.metrics_path))
        self._pod_engines = {uid: p.engine for uid, p in pods.items()}
        self._engine_pods = {p.engine: (p.namespace, p.pod) for p in pods.values()}

    # -- the cycle and its schedule

    async def run_cycle(self) -> Snapshot:
        """Collect all sources once (concurrently) and publish a new Snapshot."""
        started = time.perf_counter()
        self._apply_discovered()  # between cycles: the target list is fixed within one
        if self._discovery_runner is not None:  # reads the watcher's state only, no I/O
            await self._discovery_runner.run()
        targets = list(self._targets.values())
        readings, reading, _ = await asyncio.gather(
            asyncio.gather(*(target.collect() for target in targets)),
            self._nvml_runner.run() if self._nvml_runner else nothing(),
            self._refresh_kubelet(),
        )
        # /proc after NVML: it reads the processes NVML saw on the GPUs.
        self._pids = tuple(pid for gpu in reading.gpus for pid in gpu.pids) if reading else ()
        processes = (await self._proc_runner.run() if self._proc_runner else None) or {}
        now = self._clock()
        self._cycle += 1
        gpus = self._node_stages.run(
            ASSEMBLE,
            lambda: gpu_views(
                reading,
                targets,
                kubelet=self._kubelet,
                pod_engines=self._pod_engines,
                processes=processes,
            ),
            tuple(GpuView(gpu, None, None) for gpu in reading.gpus) if reading else (),
        )
        records = [
            self._record(target, target_reading, now, gpus, reading, processes)
            for target, target_reading in zip(targets, readings, strict=True)
        ]
        snapshot = assemble_snapshot(
            timestamp=now,
            cycle=self._cycle,
            duration_seconds=time.perf_counter() - started,
            sources=self._statuses(),
            engines=records,
            reading=reading,
            gpus=gpus,
        )
        self._snapshot = snapshot
        self._save_state_now_and_then(now)
        self.first_cycle_done.set()
        self._cycle_done.set()
        self._cycle_done = asyncio.Event()
        return snapshot

    def _record(
        self,
        target: EngineTarget,
        target_reading: TargetReading,
        now: float,
        gpus: tuple[GpuView, ...],
        reading: GpuReading | None,
        processes: Mapping[int, ProcessInfo],
    ) -> EngineRecord:
        """One engine's record: its signals, then everything derived from them. The stages
        inside contain their own failures; whatever else fails leaves only the engine's up
        state (counted as ``assemble`` under the engine's source)."""

        def build() -> EngineRecord:
            part = target.advance(target_reading, now)
            return engine_record(
                target,
                part,
                gpus=gpus,
                nvlink_pairs=reading.nvlink_pairs if reading else {},
                processes=processes,
                pod=self._engine_pods.get(target.name),
            )

        up = target_reading.scrape is not None
        record = target.stages.run(ASSEMBLE, build, EngineRecord(name=target.name, up=up))
        return replace(record, failing=frozenset(target.stages.failing))

    async def wait_for_cycle(self, cycle: int) -> Snapshot:
        """Wait until the snapshot of cycle number ``cycle`` (1 = the first) is published."""
        while self._snapshot is None or self._snapshot.cycle < cycle:
            await self._cycle_done.wait()
        return self._snapshot

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Cycle every ``interval_seconds`` on a fixed schedule until ``stop`` is set."""
        interval = self.settings.interval_seconds
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            await self.run_cycle()
            next_at += interval
            if next_at < loop.time():  # a slow cycle: skip the missed ticks, don't burst
                skipped = int((loop.time() - next_at) // interval) + 1
                next_at += skipped * interval
                log.warning("cycle overran its interval", skipped_cycles=skipped)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))

    async def _refresh_kubelet(self) -> None:
        if self._pod_resources_runner is not None:
            owners = await self._pod_resources_runner.run()
            if owners is not None:  # on failure keep the last known allocation
                self._kubelet = owners

    def _statuses(self) -> list[SourceStatus]:
        """Every runner's status; an engine's and the node's count their stages' failures."""
        scrapes = {target.scrape_runner: target for target in self._targets.values()}
        statuses = []
        for runner in self._runners():
            if runner in scrapes:
                statuses.append(scrapes[runner].scrape_status())
            elif runner is self._nvml_runner:
                statuses.append(self._node_stages.merged(runner.status()))
            else:
                statuses.append(runner.status())
        if self._state is not None:
            statuses.append(self._state.status())
        return statuses

    def _runners(self) -> list[SourceRunner[Any]]:
        """Every runner, in the order their self-metrics are exported."""
        targets = list(self._targets.values())
        runners: list[SourceRunner[Any]] = [self._nvml_runner] if self._nvml_runner else []
        runners += [target.scrape_runner for target in targets]
        runners += [t.experts_runner for t in targets if t.experts_runner is not None]
        runners += [t.eplb_runner for t in targets if t.eplb_runner is not None]
        if self._pod_resources_runner is not None:
            runners.append(self._pod_resources_runner)
        if self._proc_runner is not None:
            runners.append(self._proc_runner)
        if self._discovery_runner is not None:
            runners.append(self._discovery_runner)
        return runners
