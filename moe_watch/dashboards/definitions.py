"""The four dashboards an SRE opens first in an MoE incident. Thresholds trace to design.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_watch.dashboards.build import (
    RED,
    SEL,
    SEL_MODEL,
    YELLOW,
    Panel,
    Target,
    dashboard,
    to_json,
)
from moe_watch.generated import write_generated

T = Target


def fleet() -> dict[str, Any]:
    rank = {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]}
    return dashboard("moe-watch-fleet", "MoE fleet", "Every MoE engine of the fleet, worst first.", [
        Panel("bargauge", "Engines by expert skew", "Worst layer's skew per engine (max/mean - 1). Healthy within 0.2; alert above 0.5.",
              (T(f"sort_desc(moe_watch_expert_max_skew_ratio{{{SEL}}})", "{{engine}}", True),), "percentunit", ((0.2, YELLOW), (0.5, RED)), 8),
        Panel("bargauge", "Engines by VRAM used", "Fullest GPU per engine. Healthy 0.85-0.92; alert above 0.95.",
              (T(f"sort_desc(max by (engine) (moe_watch_gpu_memory_used_ratio{{{SEL}}}))", "{{engine}}", True),), "percentunit", ((0.92, YELLOW), (0.95, RED)), 8, max_value=1),
        Panel("bargauge", "Engines by KV-cache usage", "Above 0.95 requests are preempted or rejected (critical).",
              (T(f"sort_desc(max by (engine) (moe_watch_kv_cache_usage_ratio{{{SEL}}}))", "{{engine}}", True),), "percentunit", ((0.8, YELLOW), (0.95, RED)), 8, max_value=1),
        Panel("timeseries", "P95 / P99 end-to-end latency", "MoE bleeds in the tail while P50 looks fine. P95 above 30 s warns.",
              (T(f'max by (engine) (moe_watch_latency_seconds{{{SEL},kind="e2e",quantile="0.95"}})', "{{engine}} p95"),
               T(f'max by (engine) (moe_watch_latency_seconds{{{SEL},kind="e2e",quantile="0.99"}})', "{{engine}} p99")), "s", ((30, RED),), 12),
        Panel("timeseries", "Generated tokens/s per GPU", "Per engine, over its live GPUs. Alert 20 % below the engine's own daily baseline.",
              (T(f"sum by (engine) (moe_watch_generation_tokens_per_second{{{SEL}}}) / on(engine) count by (engine) (moe_watch_gpu_up{{{SEL}}} == 1)", "{{engine}}"),), "short", (), 12),
        Panel("table", "Configuration drift", "Settings that break the plan or an MoE rule (running vs expected). Empty is healthy.",
              (T(f"moe_watch_config_drift_info{{{SEL}}}", "", True),), "short", (), 12, options=rank),
        Panel("table", "MoE alerts", "moe-watch alerts pending or firing now, by name and state.",
              (T('count by (alertname, alertstate, severity) (ALERTS{alertname=~"MoE.*"})', "", True),), "short", (), 12, options=rank),
    ], ("fleet",))  # fmt: skip


def engine() -> dict[str, Any]:
    def quantiles(kind: str) -> tuple[Target, ...]:
        return tuple(
            T(
                f'moe_watch_latency_seconds{{{SEL_MODEL},kind="{kind}",quantile="{q}"}}',
                f"{{{{engine}}}} p{int(float(q) * 100)}",
            )
            for q in ("0.5", "0.95", "0.99")
        )

    return dashboard("moe-watch-engine", "MoE engine", "One serving engine: latency distribution, queue, KV cache, throughput.", [
        Panel("timeseries", "End-to-end latency P50 / P95 / P99", "Side by side: a widening gap between P50 and P95/P99 is the MoE tail (hot experts, preemption). P95 above 30 s warns.", quantiles("e2e"), "s", ((30, RED),), 12),
        Panel("timeseries", "Time to first token P50 / P95 / P99", "Prefill time: grows with long prompts and queueing.", quantiles("ttft"), "s", (), 12),
        Panel("timeseries", "Inter-token latency P50 / P95 / P99", "Decode time per token: grows with batch size, hot experts and preemption.", quantiles("itl"), "s", (), 12),
        Panel("timeseries", "Running and waiting requests", "Waiting above 10 is an autoscale signal; above 100 warns (scale out).",
              (T(f"moe_watch_requests_running{{{SEL_MODEL}}}", "{{engine}} running"), T(f"moe_watch_requests_waiting{{{SEL_MODEL}}}", "{{engine}} waiting")), "short", ((10, YELLOW), (100, RED)), 12),
        Panel("timeseries", "KV-cache usage and prefix hit ratio", "Usage above 0.95 is critical; a chat hit ratio is healthy above 0.40, alert below 0.20.",
              (T(f"moe_watch_kv_cache_usage_ratio{{{SEL_MODEL}}}", "{{engine}} usage"), T(f"moe_watch_kv_cache_hit_ratio{{{SEL_MODEL}}}", "{{engine}} hit ratio")), "percentunit", ((0.95, RED),), 12, max_value=1),
        Panel("timeseries", "Preemptions per second", "Above 0: KV pressure is evicting running requests.", (T(f"moe_watch_preemptions_per_second{{{SEL_MODEL}}}", "{{engine}}"),), "short", ((0.01, RED),), 12),
        Panel("timeseries", "Throughput", "Generated and prompt tokens per second over the window.",
              (T(f"moe_watch_generation_tokens_per_second{{{SEL_MODEL}}}", "{{engine}} generated"), T(f"moe_watch_prompt_tokens_per_second{{{SEL_MODEL}}}", "{{engine}} prompt")), "short", (), 12),
    ], ("engine",), with_model=True)  # fmt: skip


def experts() -> dict[str, Any]:
    assignments = f"sum by (layer, expert) (rate(moe_watch_expert_tokens_total{{{SEL}}}[2m]))"
    share = f"{assignments} / on(layer) group_left() sum by (layer) (rate(moe_watch_expert_tokens_total{{{SEL}}}[2m]))"
    return dashboard("moe-watch-experts", "MoE experts", "Expert load: which expert of which layer is hot.", [
        Panel("timeseries", "Skew per layer", "max/mean - 1 of tokens per expert, per layer. Healthy within 0.2; alert above 0.5 for 10 minutes.",
              (T(f"moe_watch_expert_skew_ratio{{{SEL}}}", "layer {{layer}} (expert {{expert}})"),), "percentunit", ((0.2, YELLOW), (0.5, RED)), 12),
        Panel("timeseries", "Max token share per layer", "Share of a layer's tokens through its hottest expert. Collapse above 0.40.",
              (T(f"moe_watch_expert_max_token_share{{{SEL}}}", "layer {{layer}} (expert {{expert}})"),), "percentunit", ((0.4, RED),), 12, max_value=1),
        Panel("heatmap", "Token share, layer x expert", "Share of each layer's routed assignments per expert (needs expert_full_detail: true). Even is 1/E; one bright cell is a hot expert.",
              (T(share, "{{layer}}/{{expert}}", True),), "percentunit", (), 24, 10),
        Panel("table", "Hottest experts", "The top-N (layer, expert) pairs by token share over the window.",
              (T(f"sort_desc(moe_watch_expert_hot_token_share{{{SEL}}})", "", True),), "percentunit", ((0.4, RED),), 12),
        Panel("bargauge", "EP-rank load", "Tokens to the experts on each expert-parallel rank / the mean rank (1 = even).",
              (T(f"moe_watch_expert_rank_load_ratio{{{SEL}}}", "rank {{rank}}", True),), "short", ((1.2, YELLOW), (1.5, RED)), 12),
    ], ("experts",))  # fmt: skip


def gpus() -> dict[str, Any]:
    return dashboard("moe-watch-gpus", "MoE GPUs", "The node's GPUs: utilization spread, memory, temperature, power, headroom.", [
        Panel("timeseries", "GPU utilization", "Healthy 0.80-0.95; alert below 0.60 or above 0.98. One GPU hot and the others idle is a hot expert.",
              (T(f"moe_watch_gpu_utilization_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((0.6, YELLOW), (0.98, RED)), 12, max_value=1),
        Panel("timeseries", "Utilization spread per engine", "max - min utilization across the engine's GPUs (95 % vs 30 % = 0.65). Alert above 0.5.",
              (T(f"moe_watch_engine_gpu_utilization_spread_ratio{{{SEL}}}", "{{engine}}"),), "percentunit", ((0.5, RED),), 12, max_value=1),
        Panel("timeseries", "VRAM used", "Healthy 0.85-0.92; above 0.95 leaves no room for KV-cache spikes.",
              (T(f"moe_watch_gpu_memory_used_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((0.92, YELLOW), (0.95, RED)), 12, max_value=1),
        Panel("timeseries", "Memory vs the sized budget", "NVML used / the plan's per-GPU budget (moe-watch size). Above 1: beyond the plan.",
              (T(f"moe_watch_budget_used_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((1, RED),), 12),
        Panel("timeseries", "Temperature", "GPU temperature.", (T(f"moe_watch_gpu_temperature_celsius{{{SEL}}}", "GPU {{gpu}}"),), "celsius", ((85, RED),), 12),
        Panel("timeseries", "Power", "GPU power draw.", (T(f"moe_watch_gpu_power_watts{{{SEL}}}", "GPU {{gpu}}"),), "watt", (), 12),
    ], ("gpus",))  # fmt: skip


DASHBOARDS = {"fleet": fleet, "engine": engine, "experts": experts, "gpus": gpus}


def configmaps_yaml() -> str:
    """The dashboards as ConfigMaps the Grafana sidecar (kube-prometheus-stack) picks up."""
    import yaml

    documents = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"moe-watch-dashboard-{name}",
                "labels": {"grafana_dashboard": "1"},
            },
            "data": {f"moe-watch-{name}.json": to_json(make())},
        }
        for name, make in DASHBOARDS.items()
    ]
    header = "# Generated by `moe-watch dashboards` from moe_watch/dashboards/definitions.py.\n"
    return header + yaml.safe_dump_all(documents, sort_keys=False, width=1000)


def generated_files() -> dict[Path, str]:
    return {Path("deploy/base/dashboards.yaml"): configmaps_yaml()} | {
        Path("dashboards") / f"moe-watch-{name}.json": to_json(make())
        for name, make in DASHBOARDS.items()
    }


def write_all(root: Path) -> list[Path]:
    return write_generated(root, generated_files())
