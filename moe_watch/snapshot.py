"""The immutable result of one agent cycle: what /metrics and /status render.

The agent swaps in a new Snapshot at the end of each cycle; readers (the exporter, the HTTP
handlers) only ever see a complete one, so a scrape never waits for or triggers collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_watch.drift import Drift
from moe_watch.runner import SourceStatus
from moe_watch.samples import ExpertCounts, GpuSample
from moe_watch.signals.engine import EngineSignals
from moe_watch.signals.experts import ExpertSignals


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
class EngineExperts:
    """One engine's expert load: the latest cumulative counts and the windowed signals."""

    engine: str
    latest: ExpertCounts
    signals: ExpertSignals


@dataclass(frozen=True, slots=True)
class GpuView:
    sample: GpuSample
    engine: str | None
    memory_used_ratio: float | None
    # Kubernetes owner of the GPU (kubelet pod-resources): namespace, pod, container.
    owner: tuple[str, str, str] | None = None


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

    def to_status(self) -> dict[str, Any]:
        """JSON-friendly summary for /status: what a human at 3 a.m. wants first."""
        return {
            "timestamp": self.timestamp,
            "cycle": self.cycle,
            "cycle_duration_seconds": round(self.cycle_duration_seconds, 6),
            "sources": [
                {
                    "source": status.name,
                    "up": status.up,
                    "last_success_timestamp": status.last_success_timestamp,
                    "last_error": status.last_error,
                    "errors_total": dict(status.errors_total),
                }
                for status in self.sources
            ],
            "targets_up": dict(self.targets_up),
            "engines": [
                {
                    "engine": view.engine,
                    "model": view.model,
                    "kind": view.kind,
                    "version": view.version,
                    "max_model_len": view.max_model_len,
                    "settings": dict(self.engine_settings.get(view.engine, {})),
                }
                for view in self.engines
            ],
            "drift": {
                engine: [
                    {
                        "setting": d.setting,
                        "running": d.running,
                        "expected": d.expected,
                        "rule": d.rule,
                    }
                    for d in findings
                ]
                for engine, findings in self.drift.items()
            },
            "sized_budget_bytes": dict(self.budgets),
            "gpus": [
                {
                    "gpu": view.sample.index,
                    "uuid": view.sample.uuid,
                    "name": view.sample.name,
                    "up": view.sample.up,
                    "engine": view.engine,
                    "utilization_ratio": view.sample.utilization_ratio,
                    "memory_used_ratio": view.memory_used_ratio,
                    "pids": list(view.sample.pids),
                }
                for view in self.gpus
            ],
        }


def experts_document(snapshot: Snapshot | None) -> dict[str, Any]:
    """The full expert matrix for /experts: every (layer, expert), for heatmaps and humans."""
    if snapshot is None:
        return {"ready": False, "engines": []}
    engines = []
    for view in snapshot.experts:
        counts, signals = view.latest, view.signals
        engines.append(
            {
                "engine": view.engine,
                "model": counts.model,
                "source": counts.source,
                "top_k": counts.top_k,
                "num_experts": counts.num_experts,
                "ep_size": counts.ep_size,
                "layers": list(counts.layers),
                "counts_total": [list(row) for row in counts.counts],
                "counts_window": [list(row) for row in signals.window_counts],
                "layer_stats": [
                    {
                        "layer": layer.layer,
                        "tokens": layer.tokens,
                        "skew": layer.skew,
                        "balancedness": layer.balancedness,
                        "max_token_share": layer.max_share,
                        "hottest_expert": layer.hottest_expert,
                        "load_ranks": [
                            {"expert": expert, "token_share": share}
                            for expert, share in layer.ranked
                        ],
                    }
                    for layer in signals.layers
                ],
                "hot": [
                    {"layer": h.layer, "expert": h.expert, "token_share": h.share}
                    for h in signals.hot()
                ],
                "rank_load": {str(rank): load for rank, load in signals.rank_load.items()},
            }
        )
    return {"timestamp": snapshot.timestamp, "engines": engines}
