"""One engine target and everything the agent keeps for it.

Its runners (/metrics, expert counts, EPLB log), its sliding windows, its plan and budget live
here, so discovering or losing an engine adds or drops one object. So does the boundary around
the stages derived from them (``stages``): one engine's failure stays in that engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from moe_watch.agent.stages import Stages
from moe_watch.background import in_daemon_thread
from moe_watch.config import Settings, TargetConfig
from moe_watch.drift import Drift, find_drift, running_from
from moe_watch.samples import (
    EngineScrape,
    EplbBalance,
    ExpertCounts,
    GpuSample,
    Matrix,
    ModelSample,
    ProcessInfo,
)
from moe_watch.signals.batching import (
    BatchAnswer,
    BatchCurve,
    add_interval,
    batch_answer,
    next_interval,
)
from moe_watch.signals.coverage import (
    CoverageCurve,
    coverage_increase,
    independent_coverage,
    observed_coverage,
    with_independent,
)
from moe_watch.signals.engine import derive_engine_signals
from moe_watch.signals.eplb_whatif import EplbWhatIf, eplb_whatif
from moe_watch.signals.experts import (
    ExpertSignals,
    derive_expert_signals,
    needs_zero_baseline,
    rank_tokens,
    zero_baseline,
)
from moe_watch.signals.window import SlidingWindow
from moe_watch.sizing.allocated import KvCoverage, KvPlan, PlannedKv, allocated_from_labels
from moe_watch.sizing.plan import PlanFile
from moe_watch.snapshot import (
    COVERAGE,
    DRIFT,
    EXPERTS,
    SIGNALS,
    WHATIF,
    EngineExperts,
    EngineView,
    WhatIfView,
)
from moe_watch.sources.base import Source
from moe_watch.sources.body_budget import BodyBudget
from moe_watch.sources.engine import EngineSource
from moe_watch.sources.eplb_log import EplbLogSource
from moe_watch.sources.runner import SourceRunner, SourceStatus

log = structlog.get_logger("moe_watch.agent")

# The independent-routing prediction of the coverage curve (CoveragePrediction): at most this often.
COVERAGE_PREDICTION_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class TargetReading:
    """What one target's sources returned this cycle (None: that source failed)."""

    scrape: EngineScrape | None
    counts: ExpertCounts | None
    balance: EplbBalance | None


@dataclass(frozen=True, slots=True)
class TargetCycle:
    """One target's part of a Snapshot."""

    name: str
    scrape: EngineScrape | None  # None: the target is down (it exports only target_up 0)
    engines: tuple[EngineView, ...] = ()
    experts: EngineExperts | None = None
    eplb: Mapping[str, float] = field(default_factory=dict)  # model -> balancedness


class EngineTarget:
    def __init__(
        self,
        config: TargetConfig,
        settings: Settings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
        bodies: BodyBudget | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._window_seconds = settings.window_seconds
        self._top_n = settings.expert_top_n
        timeout = settings.scrape_timeout_seconds
        fields = {"engine": config.name}
        source = EngineSource(
            config,
            session,
            timeout_seconds=timeout,
            max_body_bytes=settings.max_body_bytes,
            bodies=bodies,
            clock=clock,
        )
        # Three timeouts: /metrics plus the metadata calls.
        self.scrape_runner = SourceRunner(
            source, timeout_seconds=timeout * 3, clock=clock, log_fields=fields
        )
        self.experts_runner: SourceRunner[ExpertCounts] | None = None
        if config.experts is not None:
            experts = _expert_source(config, session, timeout, clock)
            self.experts_runner = SourceRunner(
                experts, timeout_seconds=timeout * 3, clock=clock, log_fields=fields
            )
        self.eplb_runner: SourceRunner[EplbBalance] | None = None
        if config.eplb_log is not None:
            eplb = EplbLogSource(config.name, config.eplb_log)
            self.eplb_runner = SourceRunner(
                eplb, timeout_seconds=timeout, clock=clock, log_fields=fields
            )
        self.plan: PlanFile | None = config.plan_file
        self.budget_bytes: float | None = None
        # The plan's max_num_seqs per DP rank (vLLM's flag) and its KV tokens per engine core,
        # where the plan states them (sizing's defaults are no target the engine was given).
        self.seqs_per_rank: int | None = None
        self.planned_kv: PlannedKv | None = None
        if self.plan is not None and config.plan is not None:
            sized = self.plan.sized(config.plan.parent)
            self.budget_bytes = sized.itemised.total_gb * 1e9
            if self.plan.vllm.max_num_seqs is not None:
                self.seqs_per_rank = sized.chosen.seqs_per_rank
                if self.plan.vllm.max_model_len is not None:
                    self.planned_kv = PlannedKv(sized.chosen.seqs_per_rank, sized.max_model_len)
        self._model_windows: dict[str, SlidingWindow[ModelSample]] = {}
        self._expert_window = SlidingWindow[ExpertCounts](settings.window_seconds)
        self.stages = Stages(fields)
        self._whatif = WhatIfCache(settings, config, self.stages)
        self._coverage = CoveragePrediction()
        # The batching curve per model, and what it takes to be evidence (signals/batching.py).
        self.batch_curves: dict[str, BatchCurve] = {}
        self._baselines: dict[str, tuple[float, ModelSample]] = {}  # the last progress seen
        self._half_life = settings.batching_half_life_seconds
        self._max_gap = 4 * settings.interval_seconds + settings.scrape_timeout_seconds
        self.batch_slo_seconds = settings.batching_itl_p95_slo_seconds
        self.batch_min_seconds = settings.batching_min_bin_seconds

    def restore(self, curves: Mapping[str, BatchCurve]) -> None:
        """Batching curves kept across an agent restart (model -> curve)."""
        for model, curve in curves.items():
            self.batch_curves.setdefault(model, curve)

    def batch_answers(self, gpus: int) -> dict[str, BatchAnswer]:
        """Each model's curve and knee, with tokens/s per each of ``gpus`` GPUs."""
        return {
            model: batch_answer(
                curve,
                gpus=gpus,
                slo_seconds=self.batch_slo_seconds,
                min_seconds=self.batch_min_seconds,
            )
            for model, curve in self.batch_curves.items()
        }

    async def collect(self) -> TargetReading:
        scrape, counts, balance = await asyncio.gather(
            self.scrape_runner.run(),
            self.experts_runner.run() if self.experts_runner else nothing(),
            self.eplb_runner.run() if self.eplb_runner else nothing(),
        )
        return TargetReading(scrape, counts, balance)

    def advance(self, reading: TargetReading, now: float) -> TargetCycle:
        """Add this cycle's samples to the windows, expire old ones, derive the signals.

        The engine's signals and its expert signals are separate stages: one failing leaves
        the other's series (and every other engine's) in place."""
        scrape = reading.scrape
        engines: tuple[EngineView, ...] = ()
        if scrape is not None:
            engines = self.stages.run(SIGNALS, lambda: tuple(self._engine_views(scrape)), ())
        for window in self._model_windows.values():
            window.expire(now)
        experts = self.stages.run(EXPERTS, lambda: self._experts(reading.counts, now), None)
        balance = reading.balance
        return TargetCycle(
            name=self.name,
            scrape=scrape,
            engines=engines,
            experts=experts,
            eplb=dict(balance.balancedness) if balance is not None else {},
        )

    def _experts(self, counts: ExpertCounts | None, now: float) -> EngineExperts | None:
        if counts is not None:  # on failure the window keeps what it had, and expires
            self._append_counts(counts, now)
        self._expert_window.expire(now)
        latest = self._expert_window.latest()
        if latest is None:
            return None
        window = [c for _, c in self._expert_window]
        signals = derive_expert_signals(window, top_n=self._top_n)
        group = self.config.experts.engine_group if self.config.experts else None
        coverage = self.stages.run(
            COVERAGE, lambda: self._coverage.curve(window, signals.window_counts, now), None
        )
        return EngineExperts(
            engine=latest.engine,
            latest=latest,
            signals=signals,
            whatif=self._whatif.get(latest, signals, now),  # computed beside the cycle
            engine_group=group,
            group_rank_tokens=rank_tokens(
                signals.window_counts, latest.num_experts, latest.ep_size, latest.placement
            )
            if group is not None
            else (),
            coverage=coverage,
        )

    async def settle(self) -> None:
        """Wait for background work (the what-if, the coverage prediction) to finish."""
        await self._whatif.settle()
        await self._coverage.settle()

    def abandon(self) -> None:
        """Stop background work (the what-if) without waiting for it: shutdown; the coverage
        prediction (milliseconds, a daemon thread) is simply not waited for."""
        self._whatif.abandon()

    def _append_counts(self, counts: ExpertCounts, now: float) -> None:
        window = self._expert_window
        if needs_zero_baseline(window.latest(), counts):
            # The counter set was 0 at `started` (SGLang's recorder): window that zero, so the
            # first sample's traffic is an increase, not the baseline.
            last = max((timestamp for timestamp, _ in window), default=counts.started)
            window.append(min(now, max(counts.started, last)), zero_baseline(counts))
        window.append(now, counts)

    def _engine_views(self, scrape: EngineScrape) -> list[EngineView]:
        views = []
        for model in scrape.models:
            window = self._model_windows.get(model.model)
            if window is None:
                window = SlidingWindow[ModelSample](self._window_seconds)
                self._model_windows[model.model] = window
            window.append(scrape.timestamp, model)
            self._add_evidence(model.model, (scrape.timestamp, model))
            views.append(
                EngineView(
                    engine=scrape.engine,
                    model=model.model,
                    kind=scrape.kind,
                    version=scrape.info.get("version", ""),
                    signals=derive_engine_signals(list(window)),
                    max_model_len=scrape.max_model_len,
                )
            )
        return views

    def _add_evidence(self, model: str, current: tuple[float, ModelSample]) -> None:
        """The interval since the model's last progress, into its batching curve."""
        evidence, self._baselines[model] = next_interval(
            self._baselines.get(model), current, max_gap_seconds=self._max_gap
        )
        if evidence is None:
            return
        curve = self.batch_curves.get(model) or BatchCurve(updated=current[0])
        self.batch_curves[model] = add_interval(curve, evidence, current[0], self._half_life)

    def kv_plan(self, scrape: EngineScrape) -> KvPlan:
        """The plan's KV tokens per engine core against the allocation its ``cache_config_info``
        states; a label out of range is refused and counted (``bad_value``)."""
        refused: list[str] = []
        allocated = allocated_from_labels(scrape.info, refused)
        self.stages.refuse("cache_config", tuple(refused))
        return KvPlan(self.planned_kv, allocated)

    def drift(
        self,
        scrape: EngineScrape,
        mine: Sequence[GpuSample],
        processes: Mapping[int, ProcessInfo],
        *,
        interconnect: str | None = None,
        ep_size: int | None = None,
        knee: BatchAnswer | None = None,
        kv: KvCoverage | None = None,
    ) -> tuple[Drift, ...] | None:
        """The rules (and the plan, where there is one) against what the engine runs with, on
        its GPUs ``mine``; None when the check failed (counted, logged once). A running value
        that is not a number in its range is left out and counted as ``bad_value``.

        ``interconnect`` and ``ep_size``: see drift.running_from; ``knee`` and ``kv``:
        drift.find_drift."""
        return self.stages.run(
            DRIFT,
            lambda: self._drift(scrape, mine, processes, interconnect, ep_size, knee, kv),
            None,
        )

    def _drift(
        self,
        scrape: EngineScrape,
        mine: Sequence[GpuSample],
        processes: Mapping[int, ProcessInfo],
        interconnect: str | None,
        ep_size: int | None,
        knee: BatchAnswer | None,
        kv: KvCoverage | None,
    ) -> tuple[Drift, ...]:
        cmdline = next(
            (
                info.server_cmdline
                for pid in sorted({pid for gpu in mine for pid in gpu.pids})
                if (info := processes.get(pid)) is not None and info.server_cmdline is not None
            ),
            None,
        )
        running = running_from(
            scrape.info,
            cmdline,
            scrape.max_model_len,
            len(mine) or None,
            ep_size=ep_size,
            interconnect=interconnect,
        )
        self.stages.refuse("running", running.refused)
        return tuple(
            find_drift(running, self.plan, knee=knee, kv=kv, seqs_per_rank=self.seqs_per_rank)
        )

    def scrape_status(self) -> SourceStatus:
        """The /metrics runner's status, with the failures of the engine's stages counted in."""
        return self.stages.merged(self.scrape_runner.status())

    def runners(self) -> list[SourceRunner[Any]]:
        optional = (self.experts_runner, self.eplb_runner)
        return [self.scrape_runner, *(runner for runner in optional if runner is not None)]


class WhatIfCache:
    """The engine's EPLB what-if, computed in the background at most every
    ``eplb_whatif_interval_seconds``.

    At DeepSeek-V3 scale one computation costs more CPU than a whole node cycle's budget
    (bench/node.py, docs/experts.md), so no cycle waits for it: a cycle that finds the answer
    stale starts a computation in a worker thread and publishes the last finished answer
    (``computed_at`` says from when); a later cycle picks the new one up. A new model shape, EP
    size, placement or counter set drops the old answer at once. A failure of the computation
    is counted and logged once (``stages``, stage ``whatif``) and leaves the previous answer;
    it never reaches the cycle.
    """

    def __init__(self, settings: Settings, config: TargetConfig, stages: Stages) -> None:
        self._stages = stages
        self._engine = config.name
        self._interval = settings.eplb_whatif_interval_seconds
        self._redundant = settings.eplb_whatif_redundant
        self._target = settings.eplb_whatif_target
        experts = config.experts
        self._ep_size = experts.ep_size if experts is not None else 1
        self._groups = experts.num_expert_groups if experts is not None else 1
        self._nodes = experts.num_nodes if experts is not None else 1
        self._key: tuple[object, ...] | None = None  # what the cached answer was computed for
        self._started_at = float("-inf")  # when the cached (or running) computation started
        self._result: WhatIfView | None = None
        self._running: asyncio.Future[tuple[EplbWhatIf | None, float]] | None = None
        self._running_for: tuple[tuple[object, ...], float] | None = None
        self._cancel = threading.Event()  # set once: the agent is stopping
        self.computations = 0

    def get(self, latest: ExpertCounts, signals: ExpertSignals, now: float) -> WhatIfView | None:
        """The newest finished answer for this counter set; starts a computation if stale."""
        try:
            return self._get(latest, signals, now)
        except Exception as exc:  # the what-if's failure is the what-if's, not the experts'
            self._stages.fail(WHATIF, exc)
            return None

    def _get(self, latest: ExpertCounts, signals: ExpertSignals, now: float) -> WhatIfView | None:
        self._harvest()
        ep_size = latest.ep_size if latest.ep_size > 1 else self._ep_size
        key = (latest.layers, latest.num_experts, ep_size, latest.placement, latest.started)
        if key != self._key:
            self._result = None  # an answer for another shape or counter set is no answer
        fresh = key == self._key and 0 <= now - self._started_at < self._interval
        if fresh or self._running is not None:
            return self._result
        if ep_size < 2 or not signals.window_counts:
            self._key, self._result = None, None  # nothing to compute yet: try next cycle
            return None
        self._running_for = (key, now)
        log.debug("eplb what-if started", engine=self._engine, layers=len(latest.layers))
        # A daemon thread, and a cancel checked inside the computation: a what-if that would run
        # for an hour (131,072 cells, target 1.0) never holds SIGTERM.
        self._running = in_daemon_thread(
            _timed_whatif,
            signals.window_counts,
            latest.layers,
            ep_size,
            redundant=self._redundant,
            target=self._target,
            num_groups=self._groups,
            num_nodes=self._nodes,
            placement=latest.placement,
            cancel=self._cancel,
        )
        return self._result

    async def settle(self) -> None:
        """Wait for a running computation and take its answer (tests; shutdown abandons it)."""
        if self._running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._running)
        self._harvest()

    def abandon(self) -> None:
        """Cancel a running computation and forget it (it ends at its next check)."""
        self._cancel.set()
        task, self._running = self._running, None
        if task is not None:
            task.add_done_callback(_retrieve)

    def _harvest(self) -> None:
        task, self._running = self._running, None
        if task is None:
            return
        if not task.done():
            self._running = task
            return
        assert self._running_for is not None
        key, started_at = self._running_for
        self.computations += 1
        if task.cancelled() or task.exception() is not None:
            self._stages.fail(WHATIF, task.exception() or asyncio.CancelledError())
            self._key, self._started_at = key, started_at  # retry after the interval
            return
        self._stages.ok(WHATIF)
        result, seconds = task.result()
        if result is None:  # no traffic in the window: nothing to cache
            self._key, self._result = None, None
            return
        self._key, self._started_at = key, started_at
        self._result = WhatIfView(result, started_at, seconds)


class CoveragePrediction:
    """The coverage curve of an engine's expert window, with the independent-routing prediction
    computed beside the cycle (like the what-if): ~10-20 ms of CPU per DeepSeek-V3 engine
    (58 layers x 256 experts x the bins), so a cycle never waits for it. A cycle that finds the
    prediction older than COVERAGE_PREDICTION_SECONDS, or made for other bins or another
    counter set, starts one in a worker thread; until it is done the curve carries the last
    prediction of the same bins (or none)."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None  # what the prediction was made for
        self._at = float("-inf")
        self._predicted: list[float | None] = []
        self._running: asyncio.Future[list[float | None]] | None = None
        self._running_for: tuple[tuple[object, ...], float] | None = None

    def curve(
        self, window: Sequence[ExpertCounts], window_counts: Matrix, now: float
    ) -> CoverageCurve | None:
        self._harvest()
        latest = window[-1] if window else None
        increase = coverage_increase(window)
        if latest is None or increase is None:
            return None
        observed = observed_coverage(increase, latest.layers, latest.num_experts)
        bins = tuple(b.tokens_bin for b in observed.bins)
        key = (latest.started, latest.layers, latest.num_experts, bins)
        stale = key != self._key or not 0 <= now - self._at < COVERAGE_PREDICTION_SECONDS
        if stale and self._running is None and window_counts:
            self._running_for = (key, now)
            self._running = in_daemon_thread(  # never holds shutdown, like the what-if
                independent_coverage,
                window_counts,
                latest.top_k,
                latest.num_experts,
                [b.mean_tokens for b in observed.bins],
            )
        if key != self._key:
            return observed
        return with_independent(observed, self._predicted)

    async def settle(self) -> None:
        """Wait for a prediction in flight (tests, shutdown) and take it."""
        if self._running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._running)
        self._harvest()

    def _harvest(self) -> None:
        task = self._running
        if task is None or not task.done():
            return
        self._running = None
        assert self._running_for is not None
        key, at = self._running_for
        if task.cancelled() or task.exception() is not None:
            log.error("coverage prediction failed", error=repr(task.exception()))
            return
        self._key, self._at, self._predicted = key, at, task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Take an abandoned computation's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _timed_whatif(*args: Any, **kwargs: Any) -> tuple[EplbWhatIf | None, float]:
    """eplb_whatif and the CPU seconds its thread spent on it (honest under a busy node)."""
    started = time.thread_time()
    result = eplb_whatif(*args, **kwargs)
    return result, time.thread_time() - started


def _expert_source(
    config: TargetConfig,
    session: aiohttp.ClientSession,
    timeout: float,
    clock: Callable[[], float],
) -> Source[ExpertCounts]:
    experts = config.experts
    assert experts is not None
    if experts.source == "sglang":
        from moe_watch.sources.expert_sglang import SGLangExpertSource

        return SGLangExpertSource(
            config.name,
            config.url,
            experts.directory,
            session,
            top_k=experts.top_k or 1,
            num_experts=experts.num_experts,
            ep_size=experts.ep_size,
            timeout_seconds=timeout,
            clock=clock,
        )
    from moe_watch.sources.expert_plugin import PluginExpertSource

    return PluginExpertSource(config.name, experts.directory, clock=clock)


async def nothing() -> None:
    return None
