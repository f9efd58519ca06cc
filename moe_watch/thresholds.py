"""The one home of every threshold moe-watch ships (kubernetes-mixin's `_config`, as data).

Signals, drift rules, alert rules, dashboards, help strings and docs read these numbers; nothing
else spells them. Each field carries what it means, where it comes from (a row of the thresholds
table in the design notes, docs/design.md, or "ours" with the reason, which docs/runbooks.md
expands) and the unit that bounds a site's override. docs/thresholds.md is generated from this
table. Sites change the numbers without editing code through `moe-watch rules --set NAME=VALUE`
or a rules config file (docs/alerts.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Unit = Literal["ratio", "factor", "seconds", "count", "per_second", "per_hour"]

# What a site may set each kind of threshold to (inclusive): a ratio is a share of 1; a factor
# a multiple (skew is max/mean - 1, at most the expert count); seconds up to a week, the longest
# window a forecast or `for:` could reasonably read.
RANGES: dict[Unit, tuple[float, float]] = {
    "ratio": (0.0, 1.0),
    "factor": (0.0, 10_000.0),
    "seconds": (0.001, 7 * 86_400.0),
    "count": (0.0, 1_000_000.0),
    "per_second": (0.0, 1_000_000.0),
    "per_hour": (0.0, 1_000.0),
}


@dataclass(frozen=True, slots=True)
class Note:
    meaning: str
    unit: Unit
    design: str = ""  # the design notes' row this number comes from ...
    ours: str = ""  # ... or why we chose it where they leave it open

    @property
    def range(self) -> tuple[float, float]:
        return RANGES[self.unit]


def _t(default: float, unit: Unit, meaning: str, *, design: str = "", ours: str = "") -> Any:
    if bool(design) == bool(ours):
        raise ValueError(f"{meaning!r}: give exactly one of design and ours")
    note = Note(meaning=meaning, unit=unit, design=design, ours=ours)
    return field(default=default, metadata={"note": note})


@dataclass(frozen=True, slots=True)
class Thresholds:
    # fmt: off
    # Expert load (per layer, over the window)
    expert_skew_healthy: float = _t(0.2, "factor", "a layer's expert skew (max/mean - 1) up to which it is healthy", design="expert load balance, healthy: within +/-20 % of uniform")
    expert_skew: float = _t(0.5, "factor", "a layer's expert skew (max/mean - 1) above which it alerts", design="expert load balance, alert: > 50 % skew")
    expert_collapse_share: float = _t(0.40, "ratio", "the share of a layer's tokens one expert takes above which the layer has collapsed", design="expert collapse: one expert > 40 % of a layer's tokens")
    ep_rank_load: float = _t(1.5, "factor", "an EP rank's tokens over the mean rank's above which the rank is hot", ours="the skew alert's max/mean (1.5x) applied to ranks: the hot rank's GPU gates every step")
    eplb_whatif_target: float = _t(0.9, "ratio", "the EP-rank balancedness (mean/max) an EPLB what-if must reach", ours="the design notes set no EPLB target")
    expert_dense_coverage: float = _t(0.90, "ratio", "the share of a layer's experts a step reaches at or above which it reads memory like a dense model (the dense point)", ours="the design notes name no dense point; 90 % of the experts read is within 10 % of a dense model's weight traffic")
    # Expert-parallel communication (per forward pass, all MoE layers' dispatch + combine)
    all2all_healthy_seconds: float = _t(0.005, "seconds", "all-to-all time per forward pass up to which it is healthy", design="all-to-all latency (EP), healthy: < 5 ms")
    all2all_seconds: float = _t(0.020, "seconds", "all-to-all time per forward pass above which it alerts", design="all-to-all latency (EP), alert: > 20 ms")
    # GPUs
    gpu_utilization_low: float = _t(0.60, "ratio", "a GPU's utilization below which it is over-provisioned or starved", design="GPU utilization per GPU: healthy 80-95 %, alert < 60 %")
    gpu_utilization_high: float = _t(0.98, "ratio", "a GPU's utilization above which no headroom is left", design="GPU utilization per GPU: alert > 98 %")
    gpu_utilization_spread: float = _t(0.5, "ratio", "max - min GPU utilization inside one engine above which it alerts (a hot expert's signature)", design="GPU utilization spread inside one engine: e.g. 95 % vs 30 % (0.65)")
    vram_used_healthy: float = _t(0.92, "ratio", "the share of VRAM used up to which a GPU is healthy", design="VRAM used, healthy: 85-92 %")
    vram_used: float = _t(0.95, "ratio", "the share of VRAM used above which KV-cache spikes have no room", design="VRAM used, alert: > 95 %")
    budget_used: float = _t(1.0, "factor", "NVML used memory over the plan's per-GPU budget above which it alerts", ours="the plan is the budget (the design notes define the ratio, not a threshold)")
    # Engine
    kv_cache_usage: float = _t(0.95, "ratio", "KV-cache usage above which requests get preempted or rejected", design="KV-cache utilization: > 95 % critical")
    kv_cache_hit_ratio_healthy: float = _t(0.40, "ratio", "the prefix-cache hit ratio above which a chat workload is healthy", design="KV-cache (prefix) hit rate, chat: healthy > 40 %")
    kv_cache_hit_ratio_low: float = _t(0.20, "ratio", "the prefix-cache hit ratio below which a chat workload alerts", design="KV-cache (prefix) hit rate, chat: alert < 20 %")
    throughput_vs_baseline: float = _t(0.80, "ratio", "generated tokens/s over the engine's own daily baseline below which it alerts", design="tokens/s per GPU: 20 % below baseline")
    e2e_p95_seconds: float = _t(30.0, "seconds", "P95 end-to-end latency above which it warns", design="P95 response latency: > 30 s warning")
    ttft_p95_seconds: float = _t(10.0, "seconds", "P95 time to first token above which it warns", ours="a chat user gives up long before 10 s of silence")
    itl_p95_seconds: float = _t(0.2, "seconds", "P95 inter-token latency above which it warns", ours="5 tokens/s per stream is below reading speed")
    preemptions_per_second: float = _t(0.0, "per_second", "preemptions per second above which, in every window for `for:`, it warns", ours="any preemption, in every window for `for:`: running requests lose their KV cache")
    requests_waiting: float = _t(100.0, "count", "waiting requests above which it warns (scale out)", design="waiting requests: > 100 warning (scale out)")
    # Autoscale recording rules
    autoscale_up_waiting: float = _t(10.0, "count", "queue depth above which autoscale says up", design="autoscale up: queue depth > 10")
    autoscale_up_p95_seconds: float = _t(2.0, "seconds", "P95 end-to-end latency above which autoscale says up", design="autoscale up: p95 > 2 s")
    autoscale_up_gpu_utilization: float = _t(0.90, "ratio", "GPU utilization, held 5 minutes, above which autoscale says up", design="autoscale up: GPU util > 90 % for 5 min")
    autoscale_down_gpu_utilization: float = _t(0.30, "ratio", "GPU utilization, held 15 minutes, below which autoscale says down", design="autoscale down: GPU util < 30 % for 15 min")
    # The agent itself
    source_stale_seconds: float = _t(120.0, "seconds", "how long a source may go without success before it is stale", ours="a source silent for 2 minutes (24 cycles at the default 5 s interval)")
    # Drift rules (vLLM settings for MoE)
    gpu_memory_utilization_max: float = _t(0.95, "ratio", "vLLM gpu_memory_utilization at or above which any engine drifts", design="vLLM knobs: 0.95+ leaves no room")
    gpu_memory_utilization_large_moe: float = _t(0.80, "ratio", "vLLM gpu_memory_utilization above which a large MoE drifts", design="vLLM knobs: 0.75-0.80 for large MoE")
    max_num_seqs_large_moe: float = _t(8, "count", "vLLM max_num_seqs above which a large MoE drifts", design="vLLM knobs: max_num_seqs 4-8 to start for large MoE")
    kv_cache_plan_coverage: float = _t(0.9, "ratio", "KV tokens an engine core allocated / the tokens its plan needs (max_num_seqs per DP rank x max_model_len) below which it drifts (kv_cache_tokens)", ours="below 90 % of the plan the engine preempts well before its planned concurrency; vLLM's memory profiling moves the allocation by a few percent between restarts, which must not flap")
    # Forecasts (docs/alerts.md, "Forecasts"): least-squares trends as recording rules. All ours:
    # the design notes have no forecast thresholds; the runbooks justify them.
    kv_cache_full_seconds: float = _t(900.0, "seconds", "time until the KV cache is full, at the trend, below which it pages", ours="another replica of a large MoE takes minutes to load: page 15 minutes ahead")
    kv_cache_forecast_window_seconds: float = _t(1800.0, "seconds", "the window the KV-cache trend is fitted over", ours="a least-squares slope over 30 minutes averages load waves out")
    kv_cache_forecast_min_rise_per_hour: float = _t(0.1, "per_hour", "KV-cache usage rise per hour below which the cache is flat (no forecast)", ours="below +10 usage points per hour a noisy series counts as flat")
    budget_exhausted_seconds: float = _t(3600.0, "seconds", "time until used memory crosses the sized budget, at the trend, below which it warns", ours="an hour ahead of crossing the budget (itself a warning)")
    budget_forecast_window_seconds: float = _t(3600.0, "seconds", "the window the memory trend is fitted over", ours="memory moves slowly: a fit over 1 h")
    budget_forecast_min_rise_per_hour: float = _t(0.02, "per_hour", "memory rise per hour, as a share of the budget, below which it is flat", ours="below +2 % of the budget per hour a noisy series counts as flat")
    # fmt: on

    def replaced(self, overrides: dict[str, Any]) -> Thresholds:
        """A copy with ``overrides`` applied. An unknown name, a value that is not a finite
        number (a bool is not one) or one outside its unit's range is a ValueError naming it."""
        known = {f.name for f in fields(self)}
        values: dict[str, float] = {}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"unknown threshold {name!r} (one of {', '.join(sorted(known))})")
            values[name] = _number(name, value)
        return replace(self, **values)


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float within ``name``'s range, or a ValueError saying why not."""
    short = (
        len(value) <= 40
        if isinstance(value, str)
        else not isinstance(value, int) or abs(value) < 10**40
    )
    shown = repr(value) if short else "a value of over 40 characters or digits"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not short:
        raise ValueError(f"threshold {name!r} must be a number, got {shown}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"threshold {name!r} must be a number, got {shown}") from None
    if not math.isfinite(number):
        raise ValueError(f"threshold {name!r} must be a finite number, got {shown}")
    low, high = NOTES[name].range
    if not low <= number <= high:
        raise ValueError(f"threshold {name!r} must be within {low:g}..{high:g}, got {number:g}")
    return number


NOTES: dict[str, Note] = {f.name: f.metadata["note"] for f in fields(Thresholds)}
DEFAULT = Thresholds()
