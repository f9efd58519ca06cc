"""The one home of every threshold moe-watch ships (kubernetes-mixin's `_config`, as data).

Signals, drift rules, alert rules, dashboards, help strings and docs read these numbers; nothing
else spells them. Each traces to the thresholds table in ../shared/design.md, except the few marked
"ours", which design.md leaves open and docs/runbooks.md justifies. Sites change them without
editing code through `moe-watch rules --set NAME=VALUE` or a rules config file (docs/alerts.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class Thresholds:
    # Expert load (per layer, over the window)
    expert_skew_healthy: float = 0.2  # within +/-20 % of uniform is healthy
    expert_skew: float = 0.5  # > 50 % skew (max/mean - 1) alerts
    expert_collapse_share: float = 0.40  # one expert takes > 40 % of a layer's tokens
    ep_rank_load: float = 1.5  # ours: an EP rank at 1.5x the mean rank's tokens
    eplb_whatif_target: float = 0.9  # ours: EP-rank balancedness (mean/max) a what-if must reach
    expert_dense_coverage: float = 0.90  # ours: a step reaching >= 90 % of a layer's experts reads it like a dense model (the dense point)
    # Expert-parallel communication (per forward pass, all MoE layers' dispatch + combine)
    all2all_healthy_seconds: float = 0.005  # < 5 ms healthy
    all2all_seconds: float = 0.020  # > 20 ms alerts
    # GPUs
    gpu_utilization_low: float = 0.60  # healthy 80-95 %; below 60 % over-provisioned or starved
    gpu_utilization_high: float = 0.98  # above 98 % no headroom left
    gpu_utilization_spread: float = 0.5  # 95 % vs 30 % inside one engine is 0.65
    vram_used_healthy: float = 0.92  # 85-92 % healthy
    vram_used: float = 0.95  # > 95 % VRAM: no room for KV-cache spikes
    budget_used: float = 1.0  # NVML used / the plan's per-GPU budget
    # Engine
    kv_cache_usage: float = 0.95  # requests get preempted or rejected above this
    kv_cache_hit_ratio_healthy: float = 0.40  # chat
    kv_cache_hit_ratio_low: float = 0.20  # chat: < 20 % alerts
    throughput_vs_baseline: float = 0.80  # 20 % below the engine's own baseline
    e2e_p95_seconds: float = 30.0
    ttft_p95_seconds: float = 10.0  # ours: a chat user gives up long before 10 s of silence
    itl_p95_seconds: float = 0.2  # ours: 5 tokens/s per stream is below reading speed
    preemptions_per_second: float = 0.0  # ours: any preemption, in every window for `for:`
    requests_waiting: float = 100.0  # scale out
    # Autoscale recording rules
    autoscale_up_waiting: float = 10.0  # queue depth > 10
    autoscale_up_p95_seconds: float = 2.0  # p95 > 2 s
    autoscale_up_gpu_utilization: float = 0.90  # for 5 minutes
    autoscale_down_gpu_utilization: float = 0.30  # for 15 minutes
    # The agent itself
    source_stale_seconds: float = 120.0  # ours: a source silent for 2 minutes
    # Drift rules (vLLM settings for MoE)
    gpu_memory_utilization_max: float = 0.95  # 0.95+ leaves no room for KV-cache spikes
    gpu_memory_utilization_large_moe: float = 0.80  # large MoE: 0.75-0.80
    max_num_seqs_large_moe: float = 8  # large MoE: start at 4-8 (a count)
    # Forecasts (docs/alerts.md, "Forecasts"): least-squares trends as recording rules. All ours:
    # design.md has no forecast thresholds; the runbooks justify them.
    kv_cache_full_seconds: float = 900.0  # KV cache full within 15 min at the trend: page
    kv_cache_forecast_window_seconds: float = 1800.0  # the trend is fitted over 30 min
    kv_cache_forecast_min_rise_per_hour: float = 0.1  # below +10 usage points per hour = flat
    budget_exhausted_seconds: float = 3600.0  # used memory crosses the sized budget within 1 h
    budget_forecast_window_seconds: float = 3600.0  # fitted over 1 h (memory moves slowly)
    budget_forecast_min_rise_per_hour: float = 0.02  # below +2 % of the budget per hour = flat

    def replaced(self, overrides: dict[str, float]) -> Thresholds:
        """A copy with ``overrides`` applied; an unknown name or a non-number is a ValueError."""
        known = {f.name for f in fields(self)}
        values: dict[str, float] = {}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"unknown threshold {name!r} (one of {', '.join(sorted(known))})")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"threshold {name!r} must be a number, got {value!r}") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"threshold {name!r} must be finite, got {value!r}")
            values[name] = number
        return replace(self, **values)


DEFAULT = Thresholds()
