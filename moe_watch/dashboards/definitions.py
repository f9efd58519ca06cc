"""The four dashboards an SRE opens first in an MoE incident.

Every threshold (panel steps and the numbers in descriptions) comes from moe_watch.thresholds;
none is spelled here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_watch.dashboards.build import (
    GREEN,
    RATE,
    RED,
    SEL,
    SEL_MODEL,
    SEL_NODE,
    YELLOW,
    Panel,
    Row,
    Target,
    by_name,
    dashboard,
    matrix,
    to_json,
)
from moe_watch.thresholds import DEFAULT as D

T = Target
MAX_LOAD_RANKS = 64  # expert_top_n's upper bound (moe_watch.config): grid columns put in order
MAX_EXPERTS = 256  # DeepSeek-V3 / Kimi K2 class: columns of the opt-in layer x expert grid
COLOUR_CELLS = {"cellOptions": {"type": "color-background"}}


def fleet() -> dict[str, Any]:
    rank = {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]}
    return dashboard("moe-watch-fleet", "MoE fleet", "Every MoE engine of the fleet, worst first.", [
        Panel("bargauge", "Engines by expert skew", f"Worst layer's skew per engine (max/mean - 1). Healthy within {D.expert_skew_healthy:g}; alert above {D.expert_skew:g}.",
              (T(f"sort_desc(moe_watch:expert_max_skew_ratio{{{SEL}}})", "{{engine}}", True),), "percentunit", ((D.expert_skew_healthy, YELLOW), (D.expert_skew, RED)), 8),
        Panel("bargauge", "Engines by VRAM used", f"Fullest GPU per engine. Healthy up to {D.vram_used_healthy:g}; alert above {D.vram_used:g}.",
              (T(f"sort_desc(max by (engine) (moe_watch_gpu_memory_used_ratio{{{SEL}}}))", "{{engine}}", True),), "percentunit", ((D.vram_used_healthy, YELLOW), (D.vram_used, RED)), 8, max_value=1),
        Panel("bargauge", "Engines by KV-cache usage", f"Above {D.kv_cache_usage:g} requests are preempted or rejected (critical).",
              (T(f"sort_desc(max by (engine) (moe_watch_kv_cache_usage_ratio{{{SEL}}}))", "{{engine}}", True),), "percentunit", ((D.kv_cache_usage, RED),), 8, max_value=1),
        Panel("timeseries", "Fleet end-to-end latency P95 / P99 by model", f"Percentiles of every request of the model on the selected engines and nodes: histogram_quantile over the engines' summed bucket rates (not a max of per-engine percentiles), over Grafana's rate interval. MoE bleeds in the tail while P50 looks fine. P95 above {D.e2e_p95_seconds:g} s warns.",
              tuple(T(quantile(q, "e2e_request_latency_seconds", SEL, "model"), f"{{{{model}}}} p{float(q) * 100:g}") for q in ("0.95", "0.99")), "s", ((D.e2e_p95_seconds, RED),), 12),
        Panel("timeseries", "Request rate by model", "Finished requests per second, all engines of the model (the e2e histogram's count: vLLM and SGLang).",
              (T(f"sum by (model) (rate(moe_watch_e2e_request_latency_seconds_count{{{SEL}}}[{RATE}]))", "{{model}}"),), "reqps", (), 12),
        Panel("timeseries", "Generated tokens/s per GPU", f"Per engine, over its live GPUs. Alert below {D.throughput_vs_baseline:g} x the engine's own daily baseline.",
              (T(f"sum by (engine) (moe_watch_generation_tokens_per_second{{{SEL}}}) / on(engine) count by (engine) (moe_watch_gpu_up{{{SEL}}} == 1)", "{{engine}}"),), "short", (), 12),
        Panel("table", "Configuration drift", "Settings that break the plan or an MoE rule (running vs expected). Empty is healthy.",
              (T(f"moe_watch_config_drift_info{{{SEL}}}", "", True),), "short", (), 12, options=rank),
        Panel("table", "MoE alerts", "moe-watch alerts pending or firing now, by name, state and severity (critical, warning, info).",
              (T('count by (alertname, alertstate, severity) (ALERTS{alertname=~"MoE.*"})', "", True),), "short", (), 12, options=rank),
        Panel("timeseries", "Errors and aborts by model", "Requests per second the engines finished with finished_reason error or abort (vLLM), against all finished requests. A rise in aborts is clients giving up (timeouts); errors are the engine's.",
              (T(f'sum by (model, finished_reason) (rate(moe_watch_requests_finished_total{{{SEL},finished_reason=~"error|abort"}}[{RATE}]))', "{{model}} {{finished_reason}}"),), "reqps", (), 12),
        *agent_health_panels(),
    ], ("fleet",))  # fmt: skip


def quantile(q: str, histogram: str, selector: str, by: str) -> str:
    """The q-quantile of an exported engine histogram per ``by``, from summed bucket rates."""
    return f"histogram_quantile({q}, sum by (le, {by}) (rate(moe_watch_{histogram}_bucket{{{selector}}}[{RATE}])))"


def agent_health_panels() -> tuple[Panel | Row, ...]:
    """The agents themselves: sources, errors, cycle time, parts left out of /metrics, and the
    GPUs' Xid errors (node-level series: no engine label, selected by cluster and node)."""
    return (
        Row("Agents and GPUs"),
        Panel("timeseries", "Sources up", "1 while a source's last collection succeeded, per node (nvml, engine:<id>, experts:<id>, ...). 0: its series are stale or missing; /status has the last error.",
              (T(f"min by (node, source) (moe_watch_source_up{{{SEL_NODE}}})", "{{node}} {{source}}"),), "short", (), 6, max_value=1),
        Panel("timeseries", "Collection errors per second", "By node, source and reason (docs/metrics.md, error reasons). A flat 0: no errors on any selected node.",
              (T(f"sum by (node, source, reason) (rate(moe_watch_collect_errors_total{{{SEL_NODE}}}[{RATE}])) or on() vector(0)", "{{node}} {{source}} {{reason}}"),), "short", (), 6),
        Panel("timeseries", "Agent cycle time", "Wall time of each agent's last collection cycle; the interval is 5 s by default, so a cycle near it falls behind.",
              (T(f"max by (node) (moe_watch_cycle_duration_seconds{{{SEL_NODE}}})", "{{node}}"),), "s", (), 6),
        Panel("timeseries", "Parts left out of /metrics", "1 while a part (gpu:<i>, engine:<id>, ...) of an agent's body could not be rendered and is missing; the log has why. A flat 0: every part rendered.",
              (T(f"max by (node, part) (moe_watch_render_failed{{{SEL_NODE}}}) or on() vector(0)", "{{node}} {{part}}"),), "short", ((1, RED),), 6),
        Panel("timeseries", "GPU Xid errors", "New Xid errors per GPU and code over the rate interval (NVML events; 79: fallen off the bus, 48: double-bit ECC, 94/95: contained/uncontained ECC). A flat 0: none on the selected nodes.",
              (T(f"sum by (node, gpu, xid) (increase(moe_watch_gpu_xid_errors_total{{{SEL_NODE}}}[{RATE}])) or on() vector(0)", "{{node}} GPU {{gpu}} Xid {{xid}}"),), "short", ((1, RED),), 24),
    )  # fmt: skip


def engine() -> dict[str, Any]:
    def quantiles(histogram: str) -> tuple[Target, ...]:
        return tuple(
            T(quantile(q, histogram, SEL_MODEL, "engine"), f"{{{{engine}}}} p{float(q) * 100:g}")
            for q in ("0.5", "0.95", "0.99")
        )

    lengths = tuple(
        T(
            quantile(q, f"request_{kind}_tokens", SEL_MODEL, "engine"),
            f"{{{{engine}}}} {kind} p{float(q) * 100:g}",
        )
        for kind in ("prompt", "generation")
        for q in ("0.5", "0.95")
    )

    return dashboard("moe-watch-engine", "MoE engine", "One serving engine: latency distribution, queue, KV cache, throughput.", [
        Panel("timeseries", "End-to-end latency P50 / P95 / P99", f"Side by side: a widening gap between P50 and P95/P99 is the MoE tail (hot experts, preemption). P95 above {D.e2e_p95_seconds:g} s warns.", quantiles("e2e_request_latency_seconds"), "s", ((D.e2e_p95_seconds, RED),), 12),
        Panel("timeseries", "Time to first token P50 / P95 / P99", f"Prefill time: grows with long prompts and queueing. P95 above {D.ttft_p95_seconds:g} s warns.", quantiles("time_to_first_token_seconds"), "s", ((D.ttft_p95_seconds, RED),), 12),
        Panel("timeseries", "Inter-token latency P50 / P95 / P99", f"Decode time per token: grows with batch size, hot experts and preemption. P95 above {D.itl_p95_seconds:g} s warns.", quantiles("inter_token_latency_seconds"), "s", ((D.itl_p95_seconds, RED),), 12),
        # Beside ITL, the expert-parallel exchange that every decode step waits on.
        Panel("timeseries", "All-to-all time per forward pass P50 / P95 / P99", f"Expert-parallel dispatch + combine of all MoE layers in one forward pass, measured inside vLLM by the moe-watch plugin. Healthy below {D.all2all_healthy_seconds:g} s; above {D.all2all_seconds:g} s warns (PCIe instead of NVLink, a degraded link, a hot rank). Empty without expert parallelism.",
              tuple(T(f'moe_watch_expert_all2all_seconds{{{SEL},quantile="{q}"}}', f"{{{{engine}}}} p{int(float(q) * 100)}") for q in ("0.5", "0.95", "0.99")),
              "s", ((D.all2all_healthy_seconds, YELLOW), (D.all2all_seconds, RED)), 12),
        Panel("timeseries", "Queue time P50 / P95 / P99", "Time requests waited for a slot before the engine scheduled them: grows with the waiting queue, KV-cache pressure and max_num_seqs too small for the traffic.", quantiles("request_queue_time_seconds"), "s", (), 12),
        Panel("timeseries", "Requests per second by finish reason", "Finished requests by vLLM's finished_reason: stop (EOS or a stop string), length (max_tokens or max_model_len), abort (the client went away or was cancelled), error, repetition. SGLang: not split (see the fleet request rate).",
              (T(f"sum by (engine, finished_reason) (rate(moe_watch_requests_finished_total{{{SEL_MODEL}}}[{RATE}]))", "{{engine}} {{finished_reason}}"),), "reqps", (), 12),
        Panel("timeseries", "Prompt and generation length P50 / P95", "Tokens per finished request (vLLM's request_prompt_tokens and request_generation_tokens; buckets 1, 2, 5, 10 ... up to max_model_len, so the interpolation is coarse). max_model_len near the prompt P95 is what the design notes recommend.",
              lengths, "short", (), 12),
        Panel("timeseries", "Running and waiting requests", f"Waiting above {D.autoscale_up_waiting:g} is an autoscale signal; above {D.requests_waiting:g} warns (scale out).",
              (T(f"moe_watch_requests_running{{{SEL_MODEL}}}", "{{engine}} running"), T(f"moe_watch_requests_waiting{{{SEL_MODEL}}}", "{{engine}} waiting")), "short", ((D.autoscale_up_waiting, YELLOW), (D.requests_waiting, RED)), 12),
        Panel("timeseries", "KV-cache usage and prefix hit ratio", f"Usage above {D.kv_cache_usage:g} is critical; a chat hit ratio is healthy above {D.kv_cache_hit_ratio_healthy:g}, alert below {D.kv_cache_hit_ratio_low:g}.",
              (T(f"moe_watch_kv_cache_usage_ratio{{{SEL_MODEL}}}", "{{engine}} usage"), T(f"moe_watch_kv_cache_hit_ratio{{{SEL_MODEL}}}", "{{engine}} hit ratio")), "percentunit", ((D.kv_cache_usage, RED),), 12, max_value=1),
        *engine_forecasts(),
        Panel("timeseries", "Preemptions per second", f"Above {D.preemptions_per_second:g}: KV pressure is evicting running requests.", (T(f"moe_watch_preemptions_per_second{{{SEL_MODEL}}}", "{{engine}}"),), "short", ((D.preemptions_per_second, RED),), 12),
        Panel("timeseries", "Throughput", "Generated and prompt tokens per second over the window.",
              (T(f"moe_watch_generation_tokens_per_second{{{SEL_MODEL}}}", "{{engine}} generated"), T(f"moe_watch_prompt_tokens_per_second{{{SEL_MODEL}}}", "{{engine}} prompt")), "short", (), 12),
        *batching_panels(),
    ], ("engine",), with_model=True)  # fmt: skip


def bin_table(label: str, columns: dict[str, str]) -> tuple[dict[str, Any], ...]:
    """One row per bin (``label``, numeric order) from instant table queries A, B, ...: merged,
    the bin made a number and sorted, the value columns named (``columns``: ref -> name)."""
    return (
        {"id": "merge", "options": {}},
        {"id": "convertFieldType", "options": {"conversions": [{"targetField": label, "destinationType": "number"}]}},
        {"id": "sortBy", "options": {"sort": [{"field": label, "desc": False}]}},
        {"id": "organize", "options": {
            "excludeByName": {"Time": True},
            "renameByName": {f"Value #{ref}": name for ref, name in columns.items()},
        }},
    )  # fmt: skip


def batching_panels() -> tuple[Panel, ...]:
    """The batching curve (docs/experts.md): where tokens/s per GPU peaks on the engine's own
    traffic, and how many experts a step reads against its tokens."""

    def by_bin(metric: str, label: str, selector: str) -> str:
        return f"max by (engine, {label}) ({metric}{{{selector}}})"

    curve = {"A": "tokens/s per GPU", "B": "ITL P95", "C": "TTFT P95", "D": "evidence"}
    coverage = {"A": "observed", "B": "independent", "C": "sampled steps"}
    cells = {"custom.cellOptions": {"type": "color-background"}}
    table = {"showHeader": True}
    return (
        Panel("table", "Batching curve: tokens/s per GPU and ITL P95 by running batch", f"Measured on the engine's own traffic, no load test: each scrape interval goes to the bin of its mean running batch (1, 2, 4 ... requests), evidence halving every batching_half_life_seconds. The knee is the batch with the most tokens/s per GPU whose ITL P95 stays within {D.itl_p95_seconds:g} s (red: over); evidence is the aged seconds seen at that batch.",
              tuple(T(by_bin(f"moe_watch_batch_{metric}", "batch", SEL_MODEL), "", True) for metric in ("generation_tokens_per_second_per_gpu", "itl_p95_seconds", "ttft_p95_seconds", "evidence_seconds")),
              "short", ((D.itl_p95_seconds, RED),), 12, options=table,
              overrides=(by_name("ITL P95", unit="s", **cells), by_name("TTFT P95", unit="s"), by_name("evidence", unit="s"), by_name("batch", unit="none")),
              transformations=bin_table("batch", curve)),
        Panel("table", "Expert coverage by tokens per step", f"The mean fraction of a layer's experts one step reads, by tokens per step (the plugin samples one step in 4). At {D.expert_dense_coverage:g} (yellow) a step reads nearly every expert's weights, like a dense model: the smallest such bin is the dense point. 'independent' is what tokens routed independently with the window's expert shares would reach; observed below it is request locality.",
              tuple(T(by_bin(f"moe_watch_expert_coverage_{metric}", "tokens", SEL), "", True) for metric in ("ratio", "independent_ratio", "steps")),
              "percentunit", ((D.expert_dense_coverage, YELLOW),), 12, options=table,
              overrides=(by_name("observed", **cells), by_name("sampled steps", unit="none"), by_name("tokens", unit="none")),
              transformations=bin_table("tokens", coverage)),
        Panel("stat", "Batch knee and dense point", "The running batch where tokens/s per GPU peaks within the ITL SLO (absent until a batch has batching_min_bin_seconds of evidence), and the smallest tokens per step whose steps read most experts. Drift compares max_num_seqs with the knee once a larger batch did worse.",
              (T(f"moe_watch_batch_knee_requests{{{SEL_MODEL}}}", "{{engine}} knee (requests)"), T(f"moe_watch_expert_dense_point_tokens{{{SEL}}}", "{{engine}} dense point (tokens/step)")),
              "none", (), 24, 4),
    )  # fmt: skip


def experts() -> dict[str, Any]:
    cells = ("engine", "node", "layer", "load_rank")
    by = f"max by ({', '.join(cells)})"
    top = f"topk(10, {by} (moe_watch:expert_load_rank_token_share{{{SEL}}}))"
    hottest_ids = f"{by} (moe_watch:expert_load_rank_expert_id{{{SEL}}}) and on(engine, layer, load_rank) {top}"
    hottest = (
        {"id": "merge", "options": {}},  # one row per (engine, layer, load_rank): share and id
        {"id": "organize", "options": {
            "excludeByName": {"Time": True},
            "indexByName": {"engine": 0, "node": 1, "layer": 2, "load_rank": 3, "Value #B": 4, "Value #A": 5},
            "renameByName": {"load_rank": "load rank", "Value #A": "token share", "Value #B": "expert"},
        }},
    )  # fmt: skip
    tokens = f"sum by (layer, expert) (rate(moe_watch_expert_tokens_total{{{SEL}}}[{RATE}]))"
    full_share = f"{tokens} / on(layer) group_left() sum by (layer) (rate(moe_watch_expert_tokens_total{{{SEL}}}[{RATE}]))"
    corner = "layer\\load_rank"
    plain_corner = by_name(
        corner, **{"custom.cellOptions": {"type": "auto"}, "displayName": "layer"}
    )
    grid = {"showHeader": True, "cellHeight": "sm"}
    return dashboard("moe-watch-experts", "MoE experts", "Expert load: which expert of which layer is hot.", [
        Panel("timeseries", "Skew per layer", f"max/mean - 1 of tokens per expert, per layer. Healthy within {D.expert_skew_healthy:g}; alert above {D.expert_skew:g}.",
              (T(f"moe_watch:expert_skew_ratio{{{SEL}}}", "{{engine}} layer {{layer}}"),), "percentunit", ((D.expert_skew_healthy, YELLOW), (D.expert_skew, RED)), 12),
        Panel("timeseries", "Max token share per layer", f"Share of a layer's tokens through its hottest expert (which one: the grids below). Collapse above {D.expert_collapse_share:g}.",
              (T(f"moe_watch:expert_max_token_share{{{SEL}}}", "{{engine}} layer {{layer}}"),), "percentunit", ((D.expert_collapse_share, RED),), 12, max_value=1),
        Panel("table", "Hottest experts", f"The 10 hottest (layer, load rank) cells by token share over the window, with the logical expert id in that cell. Collapse above {D.expert_collapse_share:g}.",
              (T(top, "", True), T(hottest_ids, "", True)), "percentunit", ((D.expert_collapse_share, RED),), 12,
              options={"showHeader": True, "sortBy": [{"displayName": "token share", "desc": True}]},
              overrides=(by_name("token share", **{"custom.cellOptions": {"type": "color-background"}}),
                         by_name("expert", unit="none", decimals=0)),
              transformations=hottest),
        Panel("bargauge", "EP-rank load", f"Tokens to the experts on each expert-parallel rank / the mean rank (1 = even). Alert above {D.ep_rank_load:g}.",
              (T(f"moe_watch:expert_rank_load_ratio{{{SEL}}}", "{{engine}} rank {{rank}}", True),), "short", ((1 + D.expert_skew_healthy, YELLOW), (D.ep_rank_load, RED)), 12),
        *eplb_whatif_panels(),
        Row("Layer x load rank: $engine", repeat="engine"),
        Panel("table", "Token share, layer x load rank", f"One row per MoE layer; column N is the share of the layer's tokens through its N-th most loaded expert (1 = hottest). Even is top-k / experts; a red cell (above {D.expert_collapse_share:g}) is a collapsing expert. Stable series for any model size: the full layer x expert id grid is opt-in (below).",
              (T(f"max by (layer, load_rank) (moe_watch:expert_load_rank_token_share{{{SEL}}})", "", True),), "percentunit", ((D.expert_collapse_share, RED),), 12, 12,
              options=grid, custom=COLOUR_CELLS, overrides=(plain_corner,), transformations=matrix("layer", "load_rank", MAX_LOAD_RANKS)),
        Panel("table", "Expert id, layer x load rank", "Which logical expert sits in each cell of the token-share grid beside it (same layer, same load rank).",
              (T(f"max by (layer, load_rank) (moe_watch:expert_load_rank_expert_id{{{SEL}}})", "", True),), "none", (), 12, 12, decimals=0,
              options=grid, overrides=(by_name(corner, displayName="layer"),), transformations=matrix("layer", "load_rank", MAX_LOAD_RANKS)),
        Panel("table", "Token share, layer x expert id (opt-in: expert_full_detail)", "Share of each layer's routed assignments per logical expert; even is 1/experts. Empty unless the agent runs with expert_full_detail: true (14,848 series per DeepSeek-V3 replica).",
              (T(full_share, "", True),), "percentunit", ((D.expert_collapse_share, RED),), 24, 12,
              options=grid, custom=COLOUR_CELLS, overrides=(by_name("layer\\expert", **{"custom.cellOptions": {"type": "auto"}, "displayName": "layer"}),),
              transformations=matrix("layer", "expert", MAX_EXPERTS)),
    ], ("experts",))  # fmt: skip


def eplb_whatif_panels() -> tuple[Panel, ...]:
    """Would vLLM's EPLB fix the skew? Balancedness today vs the what-if (docs/experts.md)."""
    return (
        Panel("timeseries", "EP-rank balancedness: today vs vLLM EPLB what-if",
              f"mean/max of tokens per EP rank, over all layers (vLLM EPLB's balancedness; 1 = even). Today: the static placement. What-if: vLLM's own EPLB placement of the window's load with N redundant experts (recomputed every eplb_whatif_interval_seconds). The flat line is the what-if target, {D.eplb_whatif_target:g}.",
              (T(f"moe_watch_expert_rank_balancedness_ratio{{{SEL}}}", "{{engine}} today"),
               T(f"moe_watch_expert_eplb_whatif_balancedness_ratio{{{SEL}}}", "{{engine}} EPLB, {{redundant_experts}} redundant"),
               T(f"vector({D.eplb_whatif_target:g})", "target")),
              "percentunit", (), 12, max_value=1),
        Panel("stat", "Redundant experts EPLB needs",
              f"The smallest redundant-expert count with which vLLM's EPLB reaches balancedness {D.eplb_whatif_target:g} on the window's load. No value: none up to the searched maximum (the alert annotation and /status say so); the proposed placement is in /experts.",
              (T(f"moe_watch_expert_eplb_redundant_needed{{{SEL}}}", "{{engine}}", True),), "none", (), 12, decimals=0),
    )  # fmt: skip


def gpus() -> dict[str, Any]:
    return dashboard("moe-watch-gpus", "MoE GPUs", "The node's GPUs: utilization spread, memory, temperature, power, headroom.", [
        Panel("timeseries", "GPU utilization", f"Alert below {D.gpu_utilization_low:g} or above {D.gpu_utilization_high:g}. One GPU hot and the others idle is a hot expert.",
              (T(f"moe_watch_gpu_utilization_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((D.gpu_utilization_low, YELLOW), (D.gpu_utilization_high, RED)), 12, max_value=1),
        Panel("timeseries", "Utilization spread per engine", f"max - min utilization across the engine's GPUs (95 % vs 30 % = 0.65). Alert above {D.gpu_utilization_spread:g}.",
              (T(f"moe_watch_engine_gpu_utilization_spread_ratio{{{SEL}}}", "{{engine}}"),), "percentunit", ((D.gpu_utilization_spread, RED),), 12, max_value=1),
        Panel("timeseries", "VRAM used", f"Healthy up to {D.vram_used_healthy:g}; above {D.vram_used:g} leaves no room for KV-cache spikes.",
              (T(f"moe_watch_gpu_memory_used_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((D.vram_used_healthy, YELLOW), (D.vram_used, RED)), 12, max_value=1),
        Panel("timeseries", "Memory vs the sized budget", f"NVML used / the plan's per-GPU budget (moe-watch size). Above {D.budget_used:g}: beyond the plan.",
              (T(f"moe_watch_budget_used_ratio{{{SEL}}}", "GPU {{gpu}}"),), "percentunit", ((D.budget_used, RED),), 12),
        *gpu_forecasts(),
        Panel("timeseries", "Temperature", "GPU temperature (no moe-watch threshold: compare with the GPU's slowdown temperature).", (T(f"moe_watch_gpu_temperature_celsius{{{SEL}}}", "GPU {{gpu}}"),), "celsius", (), 12),
        Panel("timeseries", "Power", "GPU power draw.", (T(f"moe_watch_gpu_power_watts{{{SEL}}}", "GPU {{gpu}}"),), "watt", (), 12),
        Panel("timeseries", "Xid errors", "New Xid errors per GPU and code over the rate interval (NVML events: 79 fallen off the bus, 48 double-bit ECC, 94/95 contained/uncontained ECC, 13/31/43 usually the application). A flat 0: none.",
              (T(f"sum by (gpu, xid) (increase(moe_watch_gpu_xid_errors_total{{{SEL_NODE}}}[{RATE}])) or on() vector(0)", "GPU {{gpu}} Xid {{xid}}"),), "short", ((1, RED),), 24),
        # Per-rank load beside per-GPU link traffic, and the links themselves.
        Panel("bargauge", "EP-rank load", f"Tokens to the experts on each expert-parallel rank / the mean rank (1 = even). A hot rank makes every other rank wait in each all-to-all. Alert above {D.ep_rank_load:g}.",
              (T(f"moe_watch_expert_rank_load_ratio{{{SEL}}}", "{{engine}} rank {{rank}}", True),), "short", ((1 + D.expert_skew_healthy, YELLOW), (D.ep_rank_load, RED)), 12),
        Panel("timeseries", "NVLink traffic per GPU", "Bytes per second over all of a GPU's NVLink links (NVML data counters), sent and received. Flat at 0 or empty on PCIe-only GPUs: there the all-to-all crosses PCIe.",
              (T(f"rate(moe_watch_gpu_nvlink_transmit_bytes_total{{{SEL}}}[{RATE}])", "GPU {{gpu}} sent"),
               T(f"rate(moe_watch_gpu_nvlink_receive_bytes_total{{{SEL}}}[{RATE}])", "GPU {{gpu}} received")), "Bps", (), 12),
        Panel("bargauge", "NVLink links up and PCIe width per GPU", "Active NVLink links (an H100 SXM has 18; fewer than its peers is a degraded link) and the PCIe link width (lanes; below its maximum: a slot that trained down).",
              (T(f"moe_watch_gpu_nvlink_links_up{{{SEL}}}", "GPU {{gpu}} NVLink links", True),
               T(f"moe_watch_gpu_pcie_link_width{{{SEL}}}", "GPU {{gpu}} PCIe lanes", True)), "short", (), 12),
        Panel("table", "Engine interconnect", "How each engine's GPUs reach each other (NVML NVLink P2P): nvlink, or pcie. Expert parallelism on pcie is configuration drift.",
              (T(f"moe_watch_engine_interconnect_info{{{SEL}}}", "", True),), "short", (), 12,
              options={"showHeader": True}),
    ], ("gpus",))  # fmt: skip


def engine_forecasts() -> tuple[Panel, ...]:
    """Time until the KV cache is full (moe_watch:kv_cache_full:seconds, alerting/promql.py)."""
    window, rise = D.kv_cache_forecast_window_seconds / 60, D.kv_cache_forecast_min_rise_per_hour
    return (
        Panel("timeseries", "Time until the KV cache is full", f"At the least-squares trend of the last {window:g} minutes; only while usage rises faster than {rise:g} per hour (no line: not filling). Below {D.kv_cache_full_seconds:g} s for 5 minutes pages (MoEKVCacheFullSoon).",
              (T(f"moe_watch:kv_cache_full:seconds{{{SEL_MODEL}}}", "{{engine}}"),), "s", ((D.kv_cache_full_seconds, GREEN),), 12, base_colour=RED),
    )  # fmt: skip


def gpu_forecasts() -> tuple[Panel, ...]:
    """Time until a GPU's used memory crosses its sized budget (alerting/promql.py)."""
    window, rise = D.budget_forecast_window_seconds / 60, D.budget_forecast_min_rise_per_hour
    return (
        Panel("timeseries", "Time until the sized budget", f"When a GPU's used memory crosses the engine's per-GPU budget at the least-squares trend of the last {window:g} minutes; only while it rises faster than {rise:g} of the budget per hour (no line: not growing). Below {D.budget_exhausted_seconds:g} s warns (MoEGPUBudgetExhaustedSoon).",
              (T(f"moe_watch:gpu_budget_exhausted:seconds{{{SEL}}}", "GPU {{gpu}}"),), "s", ((D.budget_exhausted_seconds, GREEN),), 12, base_colour=RED),
    )  # fmt: skip


DASHBOARDS = {"fleet": fleet, "engine": engine, "experts": experts, "gpus": gpus}


def generated_files() -> dict[Path, str]:
    # dashboards/ for Grafana import; the Helm chart's copies become sidecar ConfigMaps
    return {
        Path(folder) / f"moe-watch-{name}.json": to_json(make())
        for folder in ("dashboards", "charts/moe-watch/files/dashboards")
        for name, make in DASHBOARDS.items()
    }
