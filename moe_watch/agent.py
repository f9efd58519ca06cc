"""The agent loop: collect every source concurrently, derive signals, publish a Snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from moe_watch.config import Settings, TargetConfig
from moe_watch.drift import Drift, cmdline_from_proc, find_drift, running_from
from moe_watch.k8s.cgroup import pod_of_pid
from moe_watch.k8s.discovery import PodTarget, PodWatcher
from moe_watch.k8s.podresources import DeviceOwner
from moe_watch.runner import SourceRunner
from moe_watch.samples import (
    EngineScrape,
    EplbBalance,
    ExpertCounts,
    GpuReading,
    GpuSample,
    ModelSample,
)
from moe_watch.signals.engine import derive_engine_signals
from moe_watch.signals.experts import derive_expert_signals
from moe_watch.signals.gpu import memory_used_ratio, utilization_spread
from moe_watch.signals.window import SlidingWindow
from moe_watch.sizing.plan import PlanFile, load_plan
from moe_watch.snapshot import EngineExperts, EngineView, GpuView, Snapshot
from moe_watch.sources.base import Source
from moe_watch.sources.engine import EngineSource
from moe_watch.sources.eplb_log import EplbLogSource

log = structlog.get_logger("moe_watch.agent")


class Agent:
    """Owns the sources, the windows and the latest Snapshot. Use as an async context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        nvml: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._nvml_module = nvml
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._engine_runners: list[tuple[TargetConfig, SourceRunner[EngineScrape]]] = []
        self._nvml_runner: SourceRunner[GpuReading] | None = None
        self._expert_runners: list[SourceRunner[ExpertCounts]] = []
        self._eplb_runners: list[SourceRunner[EplbBalance]] = []
        self._windows: dict[tuple[str, str], SlidingWindow[ModelSample]] = {}
        self._expert_windows: dict[str, SlidingWindow[ExpertCounts]] = {}
        self._plans: dict[str, PlanFile] = {}
        self._static: set[str] = {t.name for t in settings.targets}
        self._pending_pods: dict[str, PodTarget] | None = None
        self._pod_engines: dict[str, str] = {}  # pod uid -> engine (discovery)
        self._engine_pods: dict[str, tuple[str, str]] = {}  # engine -> (namespace, pod)
        self.discovery: PodWatcher | None = None
        self._pod_resources_runner: SourceRunner[dict[str, DeviceOwner]] | None = None
        self._gpu_pods: dict[str, DeviceOwner] = {}
        self._discovery_task: asyncio.Task[None] | None = None
        self._discovery_runner: SourceRunner[int] | None = None  # hardening(#15)
        self._discovery_stop = asyncio.Event()
        self._budgets: dict[str, float] = {}
        self.proc_root = "/proc"  # hostPID in Kubernetes: the engines' processes are visible here
        self._snapshot: Snapshot | None = None
        self._cycle = 0
        self.first_cycle_done = asyncio.Event()
        self._cycle_done = asyncio.Event()  # replaced every cycle: waiters wake once per cycle

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def __aenter__(self) -> Agent:
        s = self.settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(4, len(s.targets) * 2)),
            auto_decompress=True,
        )
        for target in s.targets:
            self._add_target(target)
        if s.discovery:
            self._start_discovery()
        if s.pod_resources_socket is not None:
            from moe_watch.k8s.podresources import PodResourcesSource

            self._pod_resources_runner = SourceRunner(
                PodResourcesSource(s.pod_resources_socket), timeout_seconds=5.0, clock=self._clock
            )
        if s.nvml != "off":
            from moe_watch.sources.nvml import NvmlSource  # pynvml only where GPUs are read

            nvml_source = NvmlSource(self._nvml_module, call_timeout=s.nvml_timeout_seconds)
            self._nvml_runner = SourceRunner(
                nvml_source, timeout_seconds=s.nvml_timeout_seconds + 1, clock=self._clock
            )
        log.info(
            "agent configured",
            targets=[f"{t.name}={t.url}" for t in s.targets],
            nvml=s.nvml,
            interval_seconds=s.interval_seconds,
            window_seconds=s.window_seconds,
        )
        return self

    def _add_target(self, target: TargetConfig) -> None:
        """Runners for one engine: its /metrics, and its expert counts and EPLB log if configured."""
        session = self._session
        assert session is not None
        source = EngineSource(
            target,
            session,
            timeout_seconds=self.settings.scrape_timeout_seconds,
            max_body_bytes=self.settings.max_body_bytes,
            clock=self._clock,
        )
        runner = SourceRunner(
            source,
            timeout_seconds=self.settings.scrape_timeout_seconds * 3,  # metrics + metadata calls
            clock=self._clock,
            log_fields={"engine": target.name},
        )
        self._engine_runners.append((target, runner))
        fields = {"engine": target.name}
        if target.plan is not None:
            plan = load_plan(target.plan)
            self._plans[target.name] = plan
            self._budgets[target.name] = plan.sized(target.plan.parent).itemised.total_gb * 1e9
        if target.experts is not None:
            experts = self._expert_source(target, session)
            self._expert_runners.append(
                SourceRunner(
                    experts,
                    timeout_seconds=self.settings.scrape_timeout_seconds * 3,
                    clock=self._clock,
                    log_fields=fields,
                )
            )
        if target.eplb_log is not None:
            eplb = EplbLogSource(target.name, target.eplb_log)
            self._eplb_runners.append(
                SourceRunner(
                    eplb,
                    timeout_seconds=self.settings.scrape_timeout_seconds,
                    clock=self._clock,
                    log_fields=fields,
                )
            )

    def _start_discovery(self) -> None:
        from moe_watch.k8s.client import ca_context, token_headers  # hardening(#15)
        from moe_watch.k8s.discovery import DiscoverySource, PodWatcher  # hardening(#15)

        assert self._session is not None
        assert self.settings.node_name is not None
        watcher = PodWatcher(
            self._session,
            self.settings.kube_api,
            self.settings.node_name,
            credentials=token_headers,  # hardening(#15): the token is re-read on every connect
            ssl=ca_context(),  # hardening(#15)
            on_change=self.set_discovered,
        )
        self._discovery_runner = SourceRunner(  # hardening(#15): discovery in /status
            DiscoverySource(watcher), timeout_seconds=1.0, clock=self._clock
        )
        self.discovery = watcher
        self._discovery_stop = asyncio.Event()
        self._discovery_task = asyncio.get_running_loop().create_task(
            watcher.run(self._discovery_stop)
        )

    def _remove_target(self, name: str) -> None:
        self._engine_runners = [(t, r) for t, r in self._engine_runners if t.name != name]
        self._expert_runners = [r for r in self._expert_runners if r.name != f"experts:{name}"]
        self._eplb_runners = [r for r in self._eplb_runners if r.name != f"eplb:{name}"]
        self._windows = {k: w for k, w in self._windows.items() if k[0] != name}
        self._expert_windows.pop(name, None)
        self._plans.pop(name, None)
        self._budgets.pop(name, None)

    def set_discovered(self, pods: Mapping[str, PodTarget]) -> None:
        """Discovery's current targets (pod uid -> target); applied at the next cycle's start."""
        self._pending_pods = dict(pods)

    def _apply_discovered(self) -> None:
        pods, self._pending_pods = self._pending_pods, None
        if pods is None:
            return
        wanted = {p.engine: p for p in pods.values()}
        current = {t.name for t, _ in self._engine_runners}
        for name in current - wanted.keys() - self._static:
            log.info("target removed", engine=name)
            self._remove_target(name)
        for name in wanted.keys() - current:
            pod = wanted[name]
            log.info("target discovered", engine=name, url=pod.url + pod.metrics_path)
            self._add_target(TargetConfig(name=name, url=pod.url, metrics_path=pod.metrics_path))
        self._pod_engines = {uid: p.engine for uid, p in pods.items()}
        self._engine_pods = {p.engine: (p.namespace, p.pod) for p in pods.values()}

    def _expert_source(
        self, target: TargetConfig, session: aiohttp.ClientSession
    ) -> Source[ExpertCounts]:
        config = target.experts
        assert config is not None
        if config.source == "sglang":
            from moe_watch.sources.expert_sglang import SGLangExpertSource

            return SGLangExpertSource(
                target.name,
                target.url,
                config.directory,
                session,
                top_k=config.top_k or 1,
                num_experts=config.num_experts,
                ep_size=config.ep_size,
                timeout_seconds=self.settings.scrape_timeout_seconds,
                clock=self._clock,
            )
        from moe_watch.sources.expert_plugin import PluginExpertSource

        return PluginExpertSource(target.name, config.directory, clock=self._clock)

    async def __aexit__(self, *exc: object) -> None:
        if self._discovery_task is not None:
            self._discovery_stop.set()
            self._discovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery_task
        for runner in self._runners():
            await runner.source.close()
        if self._session is not None:
            await self._session.close()

    async def run_cycle(self) -> Snapshot:
        """Collect all sources once (concurrently) and publish a new Snapshot."""
        started = time.perf_counter()
        self._apply_discovered()  # between cycles: the runner list is fixed within one
        if self._discovery_runner is not None:  # hardening(#15): reads state only, no I/O
            await self._discovery_runner.run()
        scrapes, reading, counts, balances, _ = await asyncio.gather(
            asyncio.gather(*(runner.run() for _, runner in self._engine_runners)),
            self._nvml_runner.run() if self._nvml_runner else _none(),
            asyncio.gather(*(runner.run() for runner in self._expert_runners)),
            asyncio.gather(*(runner.run() for runner in self._eplb_runners)),
            self._refresh_gpu_pods(),
        )
        now = self._clock()
        snapshot = self._build_snapshot(now, list(scrapes), reading, started)
        snapshot = replace(
            snapshot,
            budgets=self._budgets,
            engine_pods=dict(self._engine_pods),
            drift=self._drift(list(scrapes), snapshot),
            experts=self._expert_views(now, counts),
            eplb_balancedness={
                (balance.engine, model): value
                for balance in balances
                if balance is not None
                for model, value in balance.balancedness.items()
            },
        )
        self._snapshot = snapshot
        self.first_cycle_done.set()
        self._cycle_done.set()
        self._cycle_done = asyncio.Event()
        return snapshot

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

    def _build_snapshot(
        self,
        now: float,
        scrapes: list[EngineScrape | None],
        reading: GpuReading | None,
        started: float,
    ) -> Snapshot:
        self._cycle += 1
        engines: list[EngineView] = []
        targets_up: dict[str, bool] = {}
        engine_settings: dict[str, dict[str, str]] = {}
        for (target, _), scrape in zip(self._engine_runners, scrapes, strict=True):
            targets_up[target.name] = scrape is not None
            if scrape is None:
                continue  # like Prometheus staleness: a failed target exports only target_up 0
            engine_settings[target.name] = dict(scrape.info)
            engines.extend(self._engine_views(scrape))
        for window in self._windows.values():
            window.expire(now)
        gpus = self._gpu_views(reading)
        engine_spread: dict[str, float] = {}
        for target, _ in self._engine_runners:
            spread = utilization_spread(v.sample for v in gpus if v.engine == target.name)
            if spread is not None:
                engine_spread[target.name] = spread
        return Snapshot(
            timestamp=now,
            cycle=self._cycle,
            cycle_duration_seconds=time.perf_counter() - started,
            sources=tuple(r.status() for r in self._runners()),
            targets_up=targets_up,
            engines=tuple(engines),
            gpus=tuple(gpus),
            driver_version=reading.driver_version if reading else None,
            xid_totals=dict(reading.xid_totals) if reading else {},
            engine_gpu_spread=engine_spread,
            node_gpu_spread=utilization_spread(v.sample for v in gpus),
            engine_settings=engine_settings,
        )

    def _engine_views(self, scrape: EngineScrape) -> Iterable[EngineView]:
        for model in scrape.models:
            window = self._windows.get((scrape.engine, model.model))
            if window is None:
                window = SlidingWindow[ModelSample](self.settings.window_seconds)
                self._windows[(scrape.engine, model.model)] = window
            window.append(scrape.timestamp, model)
            yield EngineView(
                engine=scrape.engine,
                model=model.model,
                kind=scrape.kind,
                version=scrape.info.get("version", ""),
                signals=derive_engine_signals(list(window)),
                max_model_len=scrape.max_model_len,
            )

    def _drift(
        self, scrapes: list[EngineScrape | None], snapshot: Snapshot
    ) -> dict[str, tuple[Drift, ...]]:
        """The rules (and the plan, where there is one) against what each engine runs with."""
        result: dict[str, tuple[Drift, ...]] = {}
        for (target, _), scrape in zip(self._engine_runners, scrapes, strict=True):
            if scrape is None or scrape.kind != "vllm":
                continue
            gpus = [v.sample for v in snapshot.gpus if v.engine == target.name]
            pids = sorted({pid for g in gpus for pid in g.pids})
            cmdline = cmdline_from_proc(pids, self.proc_root) if pids else None
            running = running_from(scrape.info, cmdline, scrape.max_model_len, len(gpus) or None)
            result[target.name] = tuple(find_drift(running, self._plans.get(target.name)))
        return result

    def _expert_views(
        self, now: float, counts: list[ExpertCounts | None]
    ) -> tuple[EngineExperts, ...]:
        for item in counts:
            if item is None:
                continue  # the window keeps what it had; it expires like the engine windows
            window = self._expert_windows.setdefault(
                item.engine, SlidingWindow(self.settings.window_seconds)
            )
            window.append(now, item)
        views = []
        for engine, window in self._expert_windows.items():
            window.expire(now)
            latest = window.latest()
            if latest is None:
                continue
            signals = derive_expert_signals(
                [c for _, c in window], top_n=self.settings.expert_top_n
            )
            views.append(EngineExperts(engine=engine, latest=latest, signals=signals))
        return tuple(views)

    def _gpu_views(self, reading: GpuReading | None) -> list[GpuView]:
        if reading is None:
            return []
        owners = self._gpu_owners(reading.gpus)
        return [
            GpuView(
                sample=g,
                engine=owners.get(g.index),
                memory_used_ratio=memory_used_ratio(g),
                owner=_owner_labels(self._gpu_pods.get(g.uuid)),
            )
            for g in reading.gpus
        ]

    async def _refresh_gpu_pods(self) -> None:
        if self._pod_resources_runner is not None:
            owners = await self._pod_resources_runner.run()
            if owners is not None:  # on failure keep the last known allocation
                self._gpu_pods = owners

    def _gpu_owners(self, gpus: Iterable[GpuSample]) -> dict[int, str]:
        """GPU index -> engine: declared ``gpus``; a lone target owns every GPU; discovered pods
        own the GPUs their processes run on (NVML PIDs -> /proc/<pid>/cgroup -> pod uid)."""
        gpus = list(gpus)
        indices = [g.index for g in gpus]
        owners: dict[int, str] = {}
        for gpu in gpus:  # the kubelet's allocation, by GPU UUID, is the most direct
            if gpu.uuid in self._gpu_pods:
                owners[gpu.index] = self._gpu_pods[gpu.uuid].engine
        if self._pod_engines:
            for gpu in gpus:
                for pid in gpu.pids if gpu.index not in owners else ():
                    ref = pod_of_pid(pid, self.proc_root)
                    if ref is not None and ref.pod_uid in self._pod_engines:
                        owners[gpu.index] = self._pod_engines[ref.pod_uid]
                        break
        for target, _ in self._engine_runners:
            for index in target.gpus or ():
                owners[index] = target.name
        if (
            not self._pod_engines
            and len(self._engine_runners) == 1
            and self._engine_runners[0][0].gpus is None
        ):
            only = self._engine_runners[0][0].name
            owners = {index: only for index in indices}
        return owners

    def _runners(self) -> list[SourceRunner[Any]]:
        runners: list[SourceRunner[Any]] = [r for _, r in self._engine_runners]
        runners += self._expert_runners
        runners += self._eplb_runners
        if self._pod_resources_runner is not None:
            runners.append(self._pod_resources_runner)
        if self._discovery_runner is not None:  # hardening(#15)
            runners.append(self._discovery_runner)
        if self._nvml_runner is not None:
            runners.insert(0, self._nvml_runner)
        return runners


def _owner_labels(owner: DeviceOwner | None) -> tuple[str, str, str] | None:
    return (owner.namespace, owner.pod, owner.container) if owner is not None else None


async def _none() -> None:
    return None
