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
from moe_watch.sources.runner import SourceStatus


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
    # Experts reached per step against tokens per step, over the window; None without samples.
    coverage: CoverageCurve | None = None


@dataclass(frozen=True, slots=True)
class GpuView:
    sample: GpuSample
    engine: str | None
    memory_used_ratio: float | None
    # Kubernetes owner of the GPU (kubelet pod-resources): namespace, pod, container.
    owner: tuple[str, str, str] | None = None
    # Every kubelet allocation on the GPU (whole, time-slice replica, MIG or DRA device):
    # (device id, resource or DRA driver, namespace, pod, container).
    allocations: tuple[tuple[str, str, str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    timestamp: float
    cycle: int
    cycle_duration_seconds: float
    sources: tuple[SourceStatus, ...]
    targets_up: Mapping[str, bool]
    engines: tuple[EngineView, ...] = ()
    gpus: tuple[GpuView, ...] = ()
    driver_version: str | None = None
    xid_totals: Mapping[tuple[int, int], int] = field(default_factory=dict)
    engine_gpu_spread: Mapping[str, float] = field(default_factory=dict)
    node_gpu_spread: float | None = None
    # Settings engines publish about themselves (vLLM cache_config_info, ...), by engine.
    engine_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    experts: tuple[EngineExperts, ...] = ()
    # Engines with an expert-count source configured (exported even while it yields nothing).
    expert_engines: tuple[str, ...] = ()
    # vLLM EPLB balancedness from its log, by (engine, model).
    eplb_balancedness: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # Per-GPU memory budget of each engine's plan, bytes; and drift findings by engine.
    budgets: Mapping[str, float] = field(default_factory=dict)
    drift: Mapping[str, tuple[Drift, ...]] = field(default_factory=dict)
    # Discovered engines: engine -> (namespace, pod).
    engine_pods: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # How each multi-GPU engine's GPUs reach each other: "nvlink" | "pcie" (NVML; issue #19).
    engine_interconnect: Mapping[str, str] = field(default_factory=dict)
    # The batching curve and its knee, by (engine, model); engines with any evidence.
    batching: Mapping[tuple[str, str], BatchAnswer] = field(default_factory=dict)
