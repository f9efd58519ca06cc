"""The alerts moe-watch ships: what each watches, how long, how loud, and what it says.

Production data only; the promtool fixtures that exercise each alert are in fixtures.py, keyed by
the alert's name. In ``expr``: ``$t`` is the alert's threshold (a field of Thresholds), ``$job``
the agents' job selector, ``$by`` the cluster label and engine. Every alert's runbook is the
section of docs/runbooks.md named after it.

Series identity: alert expressions never read a label whose value moves (the hottest expert, a
replaced pod); such facts are read at notification time by `query` templates in annotations, so
an alert's `for:` timer survives two experts trading places. An alert is about the thing
watched (cluster, node, engine, layer, GPU, rank), never about the agent that watches it: the
rule file drops the agent's `pod` and `instance` from every alert (promql.about_the_watched), so
a replaced agent pod continues its node's alerts instead of resolving them and opening new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_watch.alerting.texts import HOTTEST_EXPERT

Severity = Literal["critical", "warning", "info"]
XID_WINDOW = "15m"  # how far back MoEGPUXidErrors looks for new Xid errors
LATENCY_RATE = "5m"  # the range latency percentiles are computed over (histogram rate)


# The labels that name the agent rather than what it watches: the Prometheus Operator sets them
# from the agent's pod, so they change whenever the DaemonSet replaces it (a rollout, an evicted
# or rescheduled pod). The ServiceMonitor's `node` label stays.
WATCHER_LABELS = ("pod", "instance")


def p95(histogram: str, by: str | None = None) -> str:
    """The P95 of an exported engine histogram over LATENCY_RATE, from summed bucket rates, so
    it is a percentile of every request of the group (not a max of percentiles). Summed ``by``
    those labels, or by default over the agent's own labels only: an alert keeps every label of
    the engine it is about (node included) and none of the pod that reported it. Two pods of a
    node reporting at once (a surge rollout) add the same counts to every bucket: the same P95."""
    group = f"by ({by}, le)" if by else f"without ({', '.join(WATCHER_LABELS)})"
    return f"histogram_quantile(0.95, sum {group} (rate(moe_watch_{histogram}_bucket[{LATENCY_RATE}])))"


@dataclass(frozen=True, kw_only=True)
class Alert:
    name: str
    expr: str  # PromQL with $t, $job and $by (above)
    threshold: str = ""  # the field of Thresholds that $t reads; "" for none
    for_: str
    severity: Severity  # critical pages (PagerDuty); warning notifies; info is only visible
    summary: str
    # summary and description: numbers only as ${threshold:format} (texts.fill), never spelled;
    # the description may use {{ $labels.x }}, {{ $value | printf "%.2f" }} and HOTTEST_EXPERT
    description: str
    annotations: tuple[tuple[str, str], ...] = ()  # extra annotations
    whatif: bool = False  # adds an `eplb_whatif` annotation (texts.eplb_whatif_template)
    # The alert reads the agent's own series, which a restarted or replaced agent leaves missing
    # for a few scrapes: it keeps firing through that gap (RulesConfig.keep_firing_for). False
    # for the alerts about the agent itself, whose series are Prometheus' own `up`.
    through_agent_restart: bool = True


ALERTS: tuple[Alert, ...] = (
    Alert(
        name="MoEExpertSkewHigh",
        expr="moe_watch:expert_skew_ratio > $t",
        threshold="expert_skew",
        for_="10m",
        severity="critical",
        summary="Expert load skewed > ${t:%} in one MoE layer",
        description='Layer {{ $labels.layer }} of {{ $labels.engine }}: its hottest expert gets {{ $value | printf "%.2f" }} above the mean (max/mean - 1); now expert '
        + HOTTEST_EXPERT
        + ".",
        annotations=(("hottest_expert", HOTTEST_EXPERT),),
        whatif=True,
    ),
    Alert(
        name="MoEExpertCollapse",
        expr="moe_watch:expert_max_token_share > $t",
        threshold="expert_collapse_share",
        for_="5m",
        severity="critical",
        summary="Expert collapse: one expert takes > ${t:%} of a layer's tokens",
        description='Layer {{ $labels.layer }} of {{ $labels.engine }}: {{ $value | printf "%.2f" }} of its tokens visit one expert, now expert '
        + HOTTEST_EXPERT
        + ".",
        annotations=(("hottest_expert", HOTTEST_EXPERT),),
        whatif=True,
    ),
    Alert(
        name="MoEHotEPRank",
        expr="moe_watch:expert_rank_load_ratio > $t",
        threshold="ep_rank_load",
        for_="10m",
        severity="warning",
        summary="One expert-parallel rank carries far more tokens than the others",
        description='EP rank {{ $labels.rank }} of {{ $labels.engine }} carries {{ $value | printf "%.2f" }}x the mean rank load.',
        whatif=True,
    ),
    Alert(
        name="MoEExpertDataMissing",
        expr="moe_watch_expert_layers_observed == 0 and on($by) (sum by ($by) (moe_watch_generation_tokens_per_second) > 0)",
        for_="10m",
        severity="warning",
        summary="An MoE engine generates tokens but moe-watch sees no expert load",
        description="{{ $labels.engine }} is serving, yet its expert counts show no routed token in the window: the plugin is not installed or not writing, or the counts directory is not mounted.",
    ),
    Alert(
        name="MoEGPUUtilizationSpread",
        expr="moe_watch_engine_gpu_utilization_spread_ratio > $t",
        threshold="gpu_utilization_spread",
        for_="10m",
        severity="warning",
        summary="GPUs of one engine are unevenly busy (hot expert signature)",
        description='{{ $labels.engine }}: max - min GPU utilization is {{ $value | printf "%.2f" }}, above ${t:g}: one GPU busy while the others idle.',
    ),
    Alert(
        name="MoEVRAMHigh",
        expr="moe_watch_gpu_memory_used_ratio > $t",
        threshold="vram_used",
        for_="5m",
        severity="critical",
        summary="GPU memory above ${t:%}",
        description='GPU {{ $labels.gpu }} ({{ $labels.engine }}) uses {{ $value | printf "%.3f" }} of its memory: no room for KV-cache spikes.',
    ),
    Alert(
        name="MoEKVCacheCritical",
        expr="moe_watch_kv_cache_usage_ratio > $t",
        threshold="kv_cache_usage",
        for_="2m",
        severity="critical",
        summary="KV cache above ${t:%}: requests are preempted or rejected",
        description='{{ $labels.engine }} ({{ $labels.model }}) KV cache at {{ $value | printf "%.3f" }}.',
    ),
    Alert(
        name="MoEKVCacheHitRatioLow",
        expr="moe_watch_kv_cache_hit_ratio < $t",
        threshold="kv_cache_hit_ratio_low",
        for_="30m",
        severity="warning",
        summary="Prefix-cache hit ratio below ${t:%}",
        description='{{ $labels.engine }} ({{ $labels.model }}) prefix-cache hit ratio {{ $value | printf "%.2f" }} over the window.',
    ),
    Alert(
        name="MoEPreemptionsSustained",
        expr="moe_watch_preemptions_per_second > $t",
        threshold="preemptions_per_second",
        for_="15m",
        severity="warning",
        summary="An engine keeps preempting requests (KV-cache pressure)",
        description='{{ $labels.engine }} ({{ $labels.model }}) preempts {{ $value | printf "%.2f" }} requests/s, in every window for ${for:words}: running requests lose their KV cache and are recomputed.',
    ),
    Alert(
        name="MoEGPUUtilizationLow",
        expr="moe_watch_gpu_utilization_ratio < $t",
        threshold="gpu_utilization_low",
        for_="30m",
        severity="info",
        summary="GPU utilization below ${t:%} for ${for:words}",
        description='GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.2f" }} utilization: over-provisioned or starved.',
    ),
    Alert(
        name="MoEGPUUtilizationSaturated",
        expr="moe_watch_gpu_utilization_ratio > $t",
        threshold="gpu_utilization_high",
        for_="15m",
        severity="warning",
        summary="GPU utilization above ${t:%} for ${for:words}",
        description='GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.3f" }} utilization: no headroom left.',
    ),
    Alert(
        name="MoEThroughputBelowBaseline",
        expr="moe_watch_generation_tokens_per_second < $t * avg_over_time(moe_watch_generation_tokens_per_second[1d])",
        threshold="throughput_vs_baseline",
        for_="30m",
        severity="warning",
        summary="Generated tokens/s ${t:1-%} below the engine's own daily baseline",
        description='{{ $labels.engine }} ({{ $labels.model }}) generates {{ $value | printf "%.0f" }} tokens/s, below ${t:%} of its 1-day average.',
    ),
    Alert(
        name="MoEP95LatencyHigh",
        expr=p95("e2e_request_latency_seconds") + " > $t",
        threshold="e2e_p95_seconds",
        for_="5m",
        severity="warning",
        summary="P95 end-to-end latency above ${t:s}",
        description='{{ $labels.engine }} ({{ $labels.model }}) P95 e2e latency is {{ $value | printf "%.1f" }} s.',
    ),
    Alert(
        name="MoETTFTP95High",
        expr=p95("time_to_first_token_seconds") + " > $t",
        threshold="ttft_p95_seconds",
        for_="10m",
        severity="warning",
        summary="P95 time to first token above ${t:s}",
        description='{{ $labels.engine }} ({{ $labels.model }}) P95 time to first token is {{ $value | printf "%.1f" }} s: prefill or the queue is slow.',
    ),
    Alert(
        name="MoEITLP95High",
        expr=p95("inter_token_latency_seconds") + " > $t",
        threshold="itl_p95_seconds",
        for_="10m",
        severity="warning",
        summary="P95 inter-token latency above ${t:ms}",
        description='{{ $labels.engine }} ({{ $labels.model }}) P95 inter-token latency is {{ $value | printf "%.3f" }} s: decode steps are slow (batch size, hot experts, preemption).',
    ),
    Alert(
        name="MoEQueueLong",
        expr="moe_watch_requests_waiting > $t",
        threshold="requests_waiting",
        for_="5m",
        severity="warning",
        summary="More than ${t:g} requests waiting: scale out",
        description='{{ $labels.engine }} ({{ $labels.model }}) has {{ $value | printf "%.0f" }} requests waiting.',
    ),
    Alert(
        name="MoEConfigDrift",
        expr="moe_watch_config_drift == 1",
        for_="15m",
        severity="warning",
        summary="An engine runs with a setting that breaks its plan or an MoE rule",
        description="{{ $labels.engine }} drifted on {{ $labels.setting }}: see moe_watch_config_drift_info and /status for running vs expected.",
    ),
    Alert(
        name="MoEAboveSizedBudget",
        expr="moe_watch_budget_used_ratio > $t",
        threshold="budget_used",
        for_="10m",
        severity="warning",
        summary="GPU memory above ${t:x} the engine's sized per-GPU budget",
        description='GPU {{ $labels.gpu }} of {{ $labels.engine }} uses {{ $value | printf "%.2f" }}x its plan\'s per-GPU budget (moe-watch size).',
    ),
    Alert(
        name="MoETargetDown",
        expr="moe_watch_target_up == 0",
        for_="3m",
        severity="warning",
        summary="moe-watch cannot scrape a serving engine",
        description="The agent's last scrapes of {{ $labels.engine }} failed: see moe_watch_collect_errors_total and /status.",
    ),
    Alert(
        name="MoEWatchDown",
        expr="up{$job} == 0",
        for_="5m",
        severity="critical",
        summary="Prometheus cannot scrape a moe-watch agent: a GPU node is unwatched",
        description="The moe-watch agent of node {{ $labels.node }} is down: hot experts, lost GPUs and full KV caches on this node will not page.",
        through_agent_restart=False,
    ),
    Alert(
        name="MoEWatchAbsent",
        expr="absent(up{$job}) == 1",
        for_="10m",
        severity="critical",
        summary="No moe-watch agent is scraped at all",
        description="Prometheus has no up series for job {{ $labels.job }}: the DaemonSet is gone or its ServiceMonitor no longer matches.",
        through_agent_restart=False,
    ),
    Alert(
        name="MoEWatchRenderFailed",
        expr="moe_watch_render_failed == 1",
        for_="5m",
        severity="warning",
        summary="A moe-watch agent leaves part of its metrics out: it cannot render them",
        description="The agent on node {{ $labels.node }} has not rendered part {{ $labels.part }} of /metrics for ${for:words}: that part's series (an engine's, a GPU's, the node's) are missing, so its alerts cannot fire. The agent's log says why.",
    ),
    Alert(
        name="MoEWatchStale",
        expr="time() - moe_watch_last_success_timestamp_seconds > $t",
        threshold="source_stale_seconds",
        for_="5m",
        severity="warning",
        summary="A moe-watch source has not succeeded for over ${t:words}",
        description='Source {{ $labels.source }} last succeeded {{ $value | printf "%.0f" }} s ago.',
    ),
    Alert(
        name="MoEGPULost",
        expr="moe_watch_gpu_up == 0",
        for_="1m",
        severity="critical",
        summary="A GPU fell off the bus",
        description="NVML reports GPU {{ $labels.gpu }} ({{ $labels.engine }}) lost: the engine on it is degraded or down.",
    ),
    Alert(
        name="MoEGPUXidErrors",
        # A new (gpu, xid) series starts at its first count: increase() sees nothing there, so a
        # series that did not exist one window ago and is above 0 fires too.
        expr=f"increase(moe_watch_gpu_xid_errors_total[{XID_WINDOW}]) > 0"
        f" or (moe_watch_gpu_xid_errors_total unless moe_watch_gpu_xid_errors_total offset {XID_WINDOW}) > 0",
        for_="0m",
        severity="warning",
        summary="GPU Xid errors",
        description='GPU {{ $labels.gpu }} reported Xid {{ $labels.xid }} ({{ $value | printf "%.0f" }} in ${xid_window:words}).',
    ),
    Alert(
        name="MoEAll2AllSlow",
        expr='moe_watch_expert_all2all_seconds{quantile="0.95"} > $t',
        threshold="all2all_seconds",
        for_="10m",
        severity="warning",
        summary="Expert-parallel all-to-all is slow: every MoE layer waits on the exchange",
        description="P95 all-to-all (dispatch + combine) time per forward pass of {{ $labels.engine }} is "
        '{{ $value | printf "%.3f" }} s (healthy < ${all2all_healthy_seconds:s}): check the interconnect '
        "(moe_watch_engine_interconnect_info, NVLink links up), the EP size, a hot rank "
        "(moe_watch_expert_rank_load_ratio) and the all2all backend (moe_watch_expert_all2all_info).",
    ),
)

# Forecasts: page before the fact. The trends are recording rules (promql.forecast_rules);
# these alerts read them.
FORECAST_ALERTS: tuple[Alert, ...] = (
    Alert(
        name="MoEKVCacheFullSoon",
        expr="moe_watch:kv_cache_full:seconds < $t",
        threshold="kv_cache_full_seconds",
        for_="5m",
        severity="critical",
        summary="KV cache full in < ${t:short} at its current trend",
        description='{{ $labels.engine }} ({{ $labels.model }}) fills its KV cache in {{ $value | printf "%.0f" }} s at the trend of the last ${kv_cache_forecast_window_seconds:span}: requests will be preempted and queued.',
    ),
    Alert(
        name="MoEGPUBudgetExhaustedSoon",
        expr="moe_watch:gpu_budget_exhausted:seconds < $t",
        threshold="budget_exhausted_seconds",
        for_="15m",
        severity="warning",
        summary="GPU memory crosses the sized budget in < ${t:short} at its current trend",
        description='GPU {{ $labels.gpu }} of {{ $labels.engine }} reaches its plan\'s per-GPU budget in {{ $value | printf "%.0f" }} s at the trend of the last ${budget_forecast_window_seconds:span}.',
    ),
)
ALERTS = ALERTS + FORECAST_ALERTS
