"""The immutable result of one agent cycle: what /metrics (exporter.py) and the JSON views
(views.py) render.

The agent swaps in a new Snapshot at the end of each cycle; readers (the exporter, the HTTP
handlers) only ever see a complete one, so a scrape never waits for or triggers collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from moe_watch.drift import Drift
from moe_watch.samples import ExpertCounts, GpuSample
from moe_watch.signals.batching import BatchAnswer
from moe_watch.signals.coverage import CoverageCurve
from moe_watch.signals.engine import EngineSignals
from moe_watch.signals.eplb_whatif import EplbWhatIf
from moe_watch.signals.experts import ExpertSignals
from moe_watch.sizing.allocated import KvPlan
from moe_watch.sources.runner import SourceStatus

# The stages of one engine's part of a cycle (agent/stages.py): the names EngineRecord.failing
# holds, and the `reason` of collect_errors_total under the engine's source (docs/metrics.md).
SIGNALS = "signals"  # the engine's windowed signals from its scrapes
EXPERTS = "experts"  # the expert-load window and its signals
WHATIF = "whatif"  # the EPLB what-if
COVERAGE = "coverage"  # the coverage curve of the expert window
BATCHING = "batching"  # the batching curve and its knee
DRIFT = "drift"  # the running settings against the plan and the rules
KV_PLAN = "kv_plan"  # the plan's KV tokens against what the engine allocated
GPU_SIGNALS = "gpu_signals"  # the engine's GPU spread, interconnect and budget ratios
ASSEMBLE = "assemble"  # anything else of the engine's (or the node's) part of the cycle
BAD_VALUE = "bad_value"  # a value a stage refused: not a finite number in its range


@dataclass(frozen=True, slots=True)
class EngineView:
    """One (engine, model) as of the last successful scrape in this cycle."""

    engine: str
    model: str
    kind: str
    version: str
    signals: EngineSignals
    max_model_len: int | None = None


@dataclass(frozen=True, slots=True)
class WhatIfView:
    """An engine's EPLB what-if (signals/eplb_whatif.py), when it was computed and its cost."""

    result: EplbWhatIf
    computed_at: float
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class EngineExperts:
    """One engine's expert load: the latest cumulative counts and the windowed signals."""

    engine: str
    latest: ExpertCounts
    signals: ExpertSignals
    # vLLM's EPLB on the window's load; None without expert parallelism or traffic.
    whatif: WhatIfView | None = None
    # Set for an engine whose workers span nodes (experts.engine_group): the exporter then also
    # publishes this node's window counts for the group-level recording rules.
    engine_group: str | None = None
    # For an engine group under expert parallelism: this node's window assignments per EP rank.
    group_rank_tokens: tuple[float, ...] = ()
    # Experts reached per step against tokens per step, over the window; None without samples.
    coverage: CoverageCurve | None = None


@dataclass(frozen=True, slots=True)
class GpuView:
    sample: GpuSample
    engine: str | None
    memory_used_ratio: float | None
    memory_headroom_ratio: float | None = None
    # Kubernetes owner of the GPU (kubelet pod-resources): namespace, pod, container.
    owner: tuple[str, str, str] | None = None
    # Every kubelet allocation on the GPU (whole, time-slice replica, MIG or DRA device):
    # (device id, resource or DRA driver, namespace, pod, container).
    allocations: tuple[tuple[str, str, str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """Everything one cycle knows about one engine target, built in one pass
    (agent/assemble.py) and rendered as one unit (exporter, views).

    It is also the unit that fails alone: a stage of the engine that raised (its signals,
    expert signals, what-if, drift, GPU-derived values or assembly) is named in ``failing`` and
    leaves only its own fields empty; the other engines' records are untouched.
    """

    name: str
    up: bool  # its last /metrics scrape succeeded; a down engine exports target_up 0 only
    views: tuple[EngineView, ...] = ()  # one per served model, while up
    # Settings the engine publishes about itself (vLLM cache_config_info, ...), while up.
    settings: Mapping[str, str] = field(default_factory=dict)
    pod: tuple[str, str] | None = None  # (namespace, pod) of a discovered engine
    # An expert-count source is configured: expert_layers_observed is exported (0 while empty).
    expert_source: bool = False
    experts: EngineExperts | None = None
    eplb_balancedness: Mapping[str, float] = field(default_factory=dict)  # model -> its log's
    budget_bytes: float | None = None  # per-GPU memory budget of its plan
    budget_used: tuple[tuple[int, float], ...] = ()  # (GPU index, memory used / budget)
    # The plan's KV tokens per engine core against what the engine allocated, each where known;
    # None when the engine is down or the stage failed.
    kv_plan: KvPlan | None = None
    # Drift findings; None when not checked (down, not vLLM, or the check failed).
    drift: tuple[Drift, ...] | None = None
    # Every setting drift checks, in name order, and whether it drifted (drift.setting_flags).
    drift_flags: tuple[tuple[str, bool], ...] = ()
    interconnect: str | None = None  # "nvlink" | "pcie": how its GPUs reach each other
    gpu_spread: float | None = None  # max - min utilization of its GPUs
    # The batching curve and its knee, by model; models with any evidence.
    batching: Mapping[str, BatchAnswer] = field(default_factory=dict)
    # Its stages failing as of this cycle (agent/stages.py): their series are left out, and
    # none is stood in for (no "0 layers observed" while the expert stage is what failed).
    failing: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Snapshot:
    timestamp: float
    cycle: int
    cycle_duration_seconds: float
    sources: tuple[SourceStatus, ...]
    engines: tuple[EngineRecord, ...] = ()  # one per target, in target order
    gpus: tuple[GpuView, ...] = ()
    driver_version: str | None = None
    xid_totals: Mapping[tuple[int, int], int] = field(default_factory=dict)
    node_gpu_spread: float | None = None

    @property
    def targets_up(self) -> Mapping[str, bool]:
        return {record.name: record.up for record in self.engines}

    def engine(self, name: str) -> EngineRecord | None:
        return next((record for record in self.engines if record.name == name), None)
