"""The one source of the alert and recording rules: expressions, texts and their promtool tests.

`moe-watch rules --out .` writes, from the specs below and a RulesConfig (defaults or a site's
overrides, docs/alerts.md):
- alerts/moe-watch.rules.yml            Prometheus rule groups (recording + alerting)
- alerts/tests/moe-watch.rules.test.yml promtool unit tests: every alert fires at its threshold
                                        after `for:` and stays silent just below it, plus one test
                                        per defect the rules once had
- charts/moe-watch/files/prometheusrule.yaml  the same groups as a Prometheus Operator PrometheusRule
A test regenerates them and fails when the committed files are stale. Every number comes from
moe_watch/thresholds.py; each alert's runbook is a section of docs/runbooks.md.

Series identity: alert expressions never read a label whose value moves (the hottest expert, a
replaced pod); such facts are read at notification time by `query` templates in annotations, so
an alert's `for:` timer survives two experts trading places.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_watch.generated import write_generated
from moe_watch.thresholds import DEFAULT, Thresholds

RULES_FILE = Path("alerts/moe-watch.rules.yml")
TESTS_FILE = Path("alerts/tests/moe-watch.rules.test.yml")
OPERATOR_FILE = Path("charts/moe-watch/files/prometheusrule.yaml")  # the Helm chart ships it
ENGINE = 'engine="mixtral-0"'
Severity = Literal["critical", "warning", "info"]
DURATION = r"^[0-9]+[smh]$"

# The hottest expert of the alert's layer, read when the notification is rendered.
HOTTEST_EXPERT = (
    '{{ with printf "moe_watch:expert_load_rank_expert_id{engine=%q,layer=%q,load_rank=\\"1\\"}"'
    ' $labels.engine $labels.layer | query }}{{ . | first | value | printf "%.0f" }}'
    "{{ else }}unknown{{ end }}"
)


def eplb_whatif_template(target: float) -> str:
    """Would vLLM's EPLB fix it? moe-watch's what-if on the window's load (docs/experts.md), read
    when the notification is rendered: the smallest redundant-expert count reaching ``target``,
    else how far the search went, else why there is no what-if."""

    def read(metric: str, fmt: str) -> str:
        return (
            f'{{{{ with printf "moe_watch_{metric}{{engine=%q}}" $labels.engine | query }}}}'
            f'{{{{ . | first | value | printf "{fmt}" }}}}{{{{ end }}}}'
        )

    today = read("expert_rank_balancedness_ratio", "%.2f")
    return (
        '{{ with printf "moe_watch_expert_eplb_redundant_needed{engine=%q}" $labels.engine | query }}'
        'EPLB with {{ . | first | value | printf "%.0f" }} redundant experts would lift EP-rank '
        f"balancedness from {today} to "
        + read("expert_eplb_redundant_needed_balancedness_ratio", "%.2f")
        + " (moe-watch what-if on the window's load; the placement is in /experts).{{ else }}"
        + read("expert_eplb_redundant_searched_max", "%.0f").replace(
            '{{ . | first | value | printf "%.0f" }}',
            'No EPLB redundancy up to {{ . | first | value | printf "%.0f" }} experts reaches '
            f"EP-rank balancedness {target:g} (today {today}): placement alone will not even "
            "the load.{{ else }}No EPLB what-if for this engine (no expert parallelism, or no "
            "expert counts in the window).",
        )
        + "{{ end }}"
    )


def _standard_severities() -> dict[Severity, str]:
    return {"critical": "critical", "warning": "warning", "info": "info"}


class AlertOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    for_: str | None = Field(default=None, alias="for", pattern=DURATION)
    severity: Severity | None = None


class RulesConfig(BaseModel):
    """What a site may change without editing code (`moe-watch rules --config/--set`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: dict[str, float] = Field(default_factory=dict)
    alerts: dict[str, AlertOverride] = Field(default_factory=dict)
    # Selects the agents' own scrape job (the ServiceMonitor's jobLabel makes it "moe-watch").
    job_selector: str = 'job="moe-watch"'
    # The label that tells clusters apart where rules run over several (Thanos/Mimir ruler).
    cluster_label: str = Field(default="cluster", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    runbook_base_url: str = "https://github.com/moe-watch/moe-watch/blob/main/docs/runbooks.md"
    # The `severity` label value for each of our levels (kube-prometheus-stack routes on these).
    severity_names: dict[Severity, str] = Field(default_factory=_standard_severities)
    additional_labels: dict[str, str] = Field(default_factory=dict)  # on every alert
    interval: str = Field(default="30s", pattern=DURATION)
    # Load ranks rebuilt per layer for engines that span nodes (the agents' expert_top_n).
    expert_group_load_ranks: int = Field(default=4, ge=1, le=64)

    @field_validator("alerts")
    @classmethod
    def _known_alerts(cls, value: dict[str, AlertOverride]) -> dict[str, AlertOverride]:
        unknown = set(value) - {a.name for a in ALERTS}
        if unknown:
            raise ValueError(f"unknown alert(s) {', '.join(sorted(unknown))}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        DEFAULT.replaced(value)  # raises ValueError naming the bad one
        return value

    @property
    def limits(self) -> Thresholds:
        return DEFAULT.replaced(self.thresholds)

    def severity(self, alert: Alert) -> str:
        level = self.alerts.get(alert.name, AlertOverride()).severity or alert.severity
        return self.severity_names.get(level, level)

    def for_(self, alert: Alert) -> str:
        return self.alerts.get(alert.name, AlertOverride()).for_ or alert.for_

    def enabled(self, alert: Alert) -> bool:
        return self.alerts.get(alert.name, AlertOverride()).enabled


@dataclass(frozen=True)
class Alert:
    name: str
    # PromQL. $t: the threshold; $job: the agents' job selector; $by: the cluster label and engine.
    expr: str
    threshold: str  # a field of Thresholds
    for_: str
    severity: Severity  # critical pages (PagerDuty); warning notifies; info is only visible
    summary: str
    description: str  # may use {{ $labels.x }}, {{ $value | printf "%.2f" }}, HOTTEST_EXPERT
    # promtool test: one series that fires and one just past the threshold that does not. A
    # value of None derives them from the threshold (op ">" or "<"); "$t" in a value is the
    # threshold.
    series: str
    fire: str | None = None
    quiet: str | None = None
    op: str = ">"
    eval_minutes: int = 0  # 0: for + 2 minutes
    value_at_eval: float | None = None  # the alert's value at eval time; default: fire's last
    absent: bool = False  # absent() makes its own labels: the job selector's equality matchers
    extra_series: tuple[tuple[str, str], ...] = ()  # (series, values) the alert also reads
    hottest: str = ""  # what HOTTEST_EXPERT renders to in the test
    annotations: tuple[tuple[str, str], ...] = ()  # extra annotations (the same in the test)
    # An `eplb_whatif` annotation (eplb_whatif_template) and what it renders to in the test.
    whatif: bool = False
    whatif_rendered: str = ""


def _v(value: float, minutes: int = 60) -> str:
    return f"{value:g}x{minutes}"


def _hot_layer(layer: str, expert: str) -> tuple[tuple[str, str], ...]:
    return (
        (
            f'moe_watch_expert_load_rank_expert_id{{{ENGINE},layer="{layer}",load_rank="1"}}',
            f"{expert}x60",
        ),
    )


def _whatif_found(needed: str, today: str, reached: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"moe_watch_expert_eplb_redundant_needed{{{ENGINE}}}", f"{needed}x60"),
        (f"moe_watch_expert_rank_balancedness_ratio{{{ENGINE}}}", f"{today}x60"),
        (f"moe_watch_expert_eplb_redundant_needed_balancedness_ratio{{{ENGINE}}}", f"{reached}x60"),
    )


def _whatif_none(searched: str, today: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"moe_watch_expert_eplb_redundant_searched_max{{{ENGINE}}}", f"{searched}x60"),
        (f"moe_watch_expert_rank_balancedness_ratio{{{ENGINE}}}", f"{today}x60"),
    )


NO_WHATIF = (
    "No EPLB what-if for this engine (no expert parallelism, or no expert counts in the window)."
)


def _annotations(alert: Alert, config: RulesConfig) -> dict[str, str]:
    """All of an alert's annotations as templates (the rule file)."""
    templates = {
        "summary": alert.summary,
        "description": alert.description,
        "runbook_url": _runbook(alert, config),
        **dict(alert.annotations),
    }
    if alert.whatif:
        templates["eplb_whatif"] = eplb_whatif_template(config.limits.eplb_whatif_target)
    return templates


def _expected_annotations(
    alert: Alert,
    config: RulesConfig,
    labels: dict[str, str],
    value: float,
    hottest: str,
    whatif: str,
) -> dict[str, str]:
    """All of an alert's annotations as promtool must see them rendered."""
    expected = {
        "summary": alert.summary,
        "description": expand(alert.description, labels, value, hottest),
        "runbook_url": _runbook(alert, config),
    }
    expected |= {k: expand(v, labels, value, hottest) for k, v in alert.annotations}
    if alert.whatif:
        expected["eplb_whatif"] = whatif
    return expected


ALERTS: tuple[Alert, ...] = (
    Alert(
        "MoEExpertSkewHigh",
        "moe_watch:expert_skew_ratio > $t",
        "expert_skew",
        "10m",
        "critical",
        "Expert load skewed > 50 % in one MoE layer",
        'Layer {{ $labels.layer }} of {{ $labels.engine }}: its hottest expert gets {{ $value | printf "%.2f" }} above the mean (max/mean - 1); now expert '
        + HOTTEST_EXPERT
        + ".",
        f'moe_watch_expert_skew_ratio{{{ENGINE},layer="3"}}',
        extra_series=_hot_layer("3", "5") + _whatif_found("32", "0.41", "0.92"),
        hottest="5",
        annotations=(("hottest_expert", HOTTEST_EXPERT),),
        whatif=True,
        whatif_rendered="EPLB with 32 redundant experts would lift EP-rank balancedness from 0.41 to 0.92 (moe-watch what-if on the window's load; the placement is in /experts).",
    ),
    Alert(
        "MoEExpertCollapse",
        "moe_watch:expert_max_token_share > $t",
        "expert_collapse_share",
        "5m",
        "critical",
        "Expert collapse: one expert takes > 40 % of a layer's tokens",
        'Layer {{ $labels.layer }} of {{ $labels.engine }}: {{ $value | printf "%.2f" }} of its tokens visit one expert, now expert '
        + HOTTEST_EXPERT
        + ".",
        f'moe_watch_expert_max_token_share{{{ENGINE},layer="17"}}',
        extra_series=_hot_layer("17", "2"),
        hottest="2",
        annotations=(("hottest_expert", HOTTEST_EXPERT),),
        whatif=True,
        whatif_rendered=NO_WHATIF,
    ),
    Alert(
        "MoEHotEPRank",
        "moe_watch:expert_rank_load_ratio > $t",
        "ep_rank_load",
        "10m",
        "warning",
        "One expert-parallel rank carries far more tokens than the others",
        'EP rank {{ $labels.rank }} of {{ $labels.engine }} carries {{ $value | printf "%.2f" }}x the mean rank load.',
        f'moe_watch_expert_rank_load_ratio{{{ENGINE},rank="1"}}',
        extra_series=_whatif_none("256", "0.41"),
        whatif=True,
        whatif_rendered="No EPLB redundancy up to 256 experts reaches EP-rank balancedness 0.9 (today 0.41): placement alone will not even the load.",
    ),
    Alert(
        "MoEExpertDataMissing",
        "moe_watch_expert_layers_observed == 0 and on($by) (sum by ($by) (moe_watch_generation_tokens_per_second) > 0)",
        "",
        "10m",
        "warning",
        "An MoE engine generates tokens but moe-watch sees no expert load",
        "{{ $labels.engine }} is serving, yet its expert counts show no routed token in the window: the plugin is not installed or not writing, or the counts directory is not mounted.",
        f"moe_watch_expert_layers_observed{{{ENGINE}}}",
        fire="0x60",
        quiet="32x60",
        extra_series=(
            (f'moe_watch_generation_tokens_per_second{{{ENGINE},model="mixtral"}}', "100x60"),
        ),
        value_at_eval=0,
    ),
    Alert(
        "MoEGPUUtilizationSpread",
        "moe_watch_engine_gpu_utilization_spread_ratio > $t",
        "gpu_utilization_spread",
        "10m",
        "warning",
        "GPUs of one engine are unevenly busy (hot expert signature)",
        '{{ $labels.engine }}: max - min GPU utilization is {{ $value | printf "%.2f" }} (e.g. 95 % vs 30 %).',
        f"moe_watch_engine_gpu_utilization_spread_ratio{{{ENGINE}}}",
    ),
    Alert(
        "MoEVRAMHigh",
        "moe_watch_gpu_memory_used_ratio > $t",
        "vram_used",
        "5m",
        "critical",
        "GPU memory above 95 %",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) uses {{ $value | printf "%.3f" }} of its memory: no room for KV-cache spikes.',
        f'moe_watch_gpu_memory_used_ratio{{{ENGINE},gpu="0"}}',
    ),
    Alert(
        "MoEKVCacheCritical",
        "moe_watch_kv_cache_usage_ratio > $t",
        "kv_cache_usage",
        "2m",
        "critical",
        "KV cache above 95 %: requests are preempted or rejected",
        '{{ $labels.engine }} ({{ $labels.model }}) KV cache at {{ $value | printf "%.3f" }}.',
        f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}',
    ),
    Alert(
        "MoEKVCacheHitRatioLow",
        "moe_watch_kv_cache_hit_ratio < $t",
        "kv_cache_hit_ratio_low",
        "30m",
        "warning",
        "Prefix-cache hit ratio below 20 %",
        '{{ $labels.engine }} ({{ $labels.model }}) prefix-cache hit ratio {{ $value | printf "%.2f" }} over the window.',
        f'moe_watch_kv_cache_hit_ratio{{{ENGINE},model="mixtral"}}',
        op="<",
    ),
    Alert(
        "MoEPreemptionsSustained",
        "moe_watch_preemptions_per_second > $t",
        "preemptions_per_second",
        "15m",
        "warning",
        "An engine keeps preempting requests (KV-cache pressure)",
        '{{ $labels.engine }} ({{ $labels.model }}) preempts {{ $value | printf "%.2f" }} requests/s, in every window for 15 minutes: running requests lose their KV cache and are recomputed.',
        f'moe_watch_preemptions_per_second{{{ENGINE},model="mixtral"}}',
        fire="0.5x60",
        quiet="0.5x5 0x55",
    ),
    Alert(
        "MoEGPUUtilizationLow",
        "moe_watch_gpu_utilization_ratio < $t",
        "gpu_utilization_low",
        "30m",
        "info",
        "GPU utilization below 60 % for 30 minutes",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.2f" }} utilization: over-provisioned or starved.',
        f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="1"}}',
        op="<",
    ),
    Alert(
        "MoEGPUUtilizationSaturated",
        "moe_watch_gpu_utilization_ratio > $t",
        "gpu_utilization_high",
        "15m",
        "warning",
        "GPU utilization above 98 % for 15 minutes",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.3f" }} utilization: no headroom left.',
        f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="0"}}',
    ),
    Alert(
        "MoEThroughputBelowBaseline",
        "moe_watch_generation_tokens_per_second < $t * avg_over_time(moe_watch_generation_tokens_per_second[1d])",
        "throughput_vs_baseline",
        "30m",
        "warning",
        "Generated tokens/s 20 % below the engine's own daily baseline",
        '{{ $labels.engine }} ({{ $labels.model }}) generates {{ $value | printf "%.0f" }} tokens/s, below 80 % of its 1-day average.',
        f'moe_watch_generation_tokens_per_second{{{ENGINE},model="mixtral"}}',
        fire="100x240 60x60",
        quiet="100x240 90x60",
        eval_minutes=290,
    ),
    Alert(
        "MoEP95LatencyHigh",
        'moe_watch_latency_seconds{kind="e2e",quantile="0.95"} > $t',
        "e2e_p95_seconds",
        "5m",
        "warning",
        "P95 end-to-end latency above 30 s",
        '{{ $labels.engine }} ({{ $labels.model }}) P95 e2e latency is {{ $value | printf "%.1f" }} s.',
        f'moe_watch_latency_seconds{{{ENGINE},model="mixtral",kind="e2e",quantile="0.95"}}',
    ),
    Alert(
        "MoETTFTP95High",
        'moe_watch_latency_seconds{kind="ttft",quantile="0.95"} > $t',
        "ttft_p95_seconds",
        "10m",
        "warning",
        "P95 time to first token above 10 s",
        '{{ $labels.engine }} ({{ $labels.model }}) P95 time to first token is {{ $value | printf "%.1f" }} s: prefill or the queue is slow.',
        f'moe_watch_latency_seconds{{{ENGINE},model="mixtral",kind="ttft",quantile="0.95"}}',
    ),
    Alert(
        "MoEITLP95High",
        'moe_watch_latency_seconds{kind="itl",quantile="0.95"} > $t',
        "itl_p95_seconds",
        "10m",
        "warning",
        "P95 inter-token latency above 200 ms",
        '{{ $labels.engine }} ({{ $labels.model }}) P95 inter-token latency is {{ $value | printf "%.3f" }} s: decode steps are slow (batch size, hot experts, preemption).',
        f'moe_watch_latency_seconds{{{ENGINE},model="mixtral",kind="itl",quantile="0.95"}}',
    ),
    Alert(
        "MoEQueueLong",
        "moe_watch_requests_waiting > $t",
        "requests_waiting",
        "5m",
        "warning",
        "More than 100 requests waiting: scale out",
        '{{ $labels.engine }} ({{ $labels.model }}) has {{ $value | printf "%.0f" }} requests waiting.',
        f'moe_watch_requests_waiting{{{ENGINE},model="mixtral"}}',
    ),
    Alert(
        "MoEConfigDrift",
        "moe_watch_config_drift == 1",
        "",
        "15m",
        "warning",
        "An engine runs with a setting that breaks its plan or an MoE rule",
        "{{ $labels.engine }} drifted on {{ $labels.setting }}: see moe_watch_config_drift_info and /status for running vs expected.",
        f'moe_watch_config_drift{{{ENGINE},setting="gpu_memory_utilization"}}',
        fire=_v(1),
        quiet=_v(0),
    ),
    Alert(
        "MoEAboveSizedBudget",
        "moe_watch_budget_used_ratio > $t",
        "budget_used",
        "10m",
        "warning",
        "GPU memory above the engine's sized per-GPU budget",
        'GPU {{ $labels.gpu }} of {{ $labels.engine }} uses {{ $value | printf "%.2f" }}x its plan\'s per-GPU budget (moe-watch size).',
        f'moe_watch_budget_used_ratio{{{ENGINE},gpu="0"}}',
    ),
    Alert(
        "MoETargetDown",
        "moe_watch_target_up == 0",
        "",
        "3m",
        "warning",
        "moe-watch cannot scrape a serving engine",
        "The agent's last scrapes of {{ $labels.engine }} failed: see moe_watch_collect_errors_total and /status.",
        f"moe_watch_target_up{{{ENGINE}}}",
        fire=_v(0),
        quiet=_v(1),
    ),
    Alert(
        "MoEWatchDown",
        "up{$job} == 0",
        "",
        "5m",
        "critical",
        "Prometheus cannot scrape a moe-watch agent: a GPU node is unwatched",
        "{{ $labels.instance }} (node {{ $labels.node }}) is down: hot experts, lost GPUs and full KV caches on this node will not page.",
        'up{$job,instance="10.0.0.5:9400",node="gpu-node-a"}',
        fire=_v(0),
        quiet=_v(1),
    ),
    Alert(
        "MoEWatchAbsent",
        "absent(up{$job}) == 1",
        "",
        "10m",
        "critical",
        "No moe-watch agent is scraped at all",
        "Prometheus has no up series for job {{ $labels.job }}: the DaemonSet is gone or its ServiceMonitor no longer matches.",
        'up{job="node-exporter",instance="10.0.0.5:9100"}',
        fire=_v(1),
        quiet="",
        absent=True,
    ),
    Alert(
        "MoEWatchStale",
        "time() - moe_watch_last_success_timestamp_seconds > $t",
        "source_stale_seconds",
        "5m",
        "warning",
        "A moe-watch source has not succeeded for over 2 minutes",
        'Source {{ $labels.source }} last succeeded {{ $value | printf "%.0f" }} s ago.',
        'moe_watch_last_success_timestamp_seconds{source="nvml"}',
        fire="0x60",
        quiet="0+60x60",
        eval_minutes=10,
        value_at_eval=600,
    ),
    Alert(
        "MoEGPULost",
        "moe_watch_gpu_up == 0",
        "",
        "1m",
        "critical",
        "A GPU fell off the bus",
        "NVML reports GPU {{ $labels.gpu }} ({{ $labels.engine }}) lost: the engine on it is degraded or down.",
        f'moe_watch_gpu_up{{{ENGINE},gpu="1"}}',
        fire=_v(0),
        quiet=_v(1),
    ),
    Alert(
        "MoEGPUXidErrors",
        # A new (gpu, xid) series starts at its first count: increase() sees nothing there, so a
        # series that did not exist 15 minutes ago and is above 0 fires too.
        "increase(moe_watch_gpu_xid_errors_total[15m]) > 0"
        " or (moe_watch_gpu_xid_errors_total unless moe_watch_gpu_xid_errors_total offset 15m) > 0",
        "",
        "0m",
        "warning",
        "GPU Xid errors",
        'GPU {{ $labels.gpu }} reported Xid {{ $labels.xid }} ({{ $value | printf "%.0f" }} in 15 minutes).',
        'moe_watch_gpu_xid_errors_total{gpu="0",xid="79"}',
        fire="0x5 1x55",
        quiet="3x60",  # an old count that does not grow
        eval_minutes=20,
    ),
    Alert(
        "MoEAll2AllSlow",
        'moe_watch_expert_all2all_seconds{quantile="0.95"} > $t',
        "all2all_seconds",
        "10m",
        "warning",
        "Expert-parallel all-to-all is slow: every MoE layer waits on the exchange",
        "P95 all-to-all (dispatch + combine) time per forward pass of {{ $labels.engine }} is "
        '{{ $value | printf "%.3f" }} s (healthy < 0.005 s): check the interconnect '
        "(moe_watch_engine_interconnect_info, NVLink links up), the EP size, a hot rank "
        "(moe_watch_expert_rank_load_ratio) and the all2all backend (moe_watch_expert_all2all_info).",
        f'moe_watch_expert_all2all_seconds{{{ENGINE},quantile="0.95"}}',
    ),
)

# Forecasts (issue #17): page before the fact. The trends are recording rules (forecast_rules);
# these alerts read them. Kept apart from ALERTS above so both lists merge cleanly.
FORECAST_ALERTS: tuple[Alert, ...] = (
    Alert(
        "MoEKVCacheFullSoon",
        "moe_watch:kv_cache_full:seconds < $t",
        "kv_cache_full_seconds",
        "5m",
        "critical",
        "KV cache full in < 15 min at its current trend",
        '{{ $labels.engine }} ({{ $labels.model }}) fills its KV cache in {{ $value | printf "%.0f" }} s at the trend of the last 30 minutes: requests will be preempted and queued.',
        f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}',
        op="<",
    ),
    Alert(
        "MoEGPUBudgetExhaustedSoon",
        "moe_watch:gpu_budget_exhausted:seconds < $t",
        "budget_exhausted_seconds",
        "15m",
        "warning",
        "GPU memory crosses the sized budget in < 1 h at its current trend",
        'GPU {{ $labels.gpu }} of {{ $labels.engine }} reaches its plan\'s per-GPU budget in {{ $value | printf "%.0f" }} s at the trend of the last hour.',
        f'moe_watch_gpu_memory_used_bytes{{{ENGINE},gpu="0"}}',
        op="<",
        extra_series=((f"moe_watch_sized_budget_bytes{{{ENGINE}}}", "8e+10x200"),),
    ),
)
ALERTS = ALERTS + FORECAST_ALERTS


# Autoscale signals (design.md) as recording rules KEDA/HPA can read: 1 = scale, 0 = hold. Each
# condition is its own labelled arm so `max` sees them all: `A > bool x or B > bool y` keeps A
# alone, because A has a 0/1 value for every engine.
RECORDING: tuple[tuple[str, str], ...] = (
    ("moe_watch:engine_gpu_utilization:avg", "avg by ($by) (moe_watch_gpu_utilization_ratio)"),
    ("moe_watch:autoscale_up:bool",
     "max by ($by) ("
     'label_replace(max by ($by) (moe_watch_requests_waiting) > bool $autoscale_up_waiting, "signal", "queue", "", "")'
     ' or label_replace(max by ($by) (moe_watch_latency_seconds{kind="e2e",quantile="0.95"}) > bool $autoscale_up_p95_seconds, "signal", "p95", "", "")'
     ' or label_replace(min_over_time(moe_watch:engine_gpu_utilization:avg[5m]) > bool $autoscale_up_gpu_utilization, "signal", "gpu", "", "")'
     ")"),
    # Down only when the GPUs idled for 15 minutes *and* nothing queued for 10 (issue #19): low
    # utilization with a queue is a stalled engine (a slow all-to-all, a full KV cache), not a
    # spare one.
    ("moe_watch:autoscale_down:bool",
     "(max_over_time(moe_watch:engine_gpu_utilization:avg[15m]) < bool $autoscale_down_gpu_utilization)"
     " * on ($by) (max by ($by) (max_over_time(moe_watch_requests_waiting[10m])) == bool 0)"),
)  # fmt: skip


def _duration(seconds: float) -> str:
    """A PromQL duration for a number of seconds (whole milliseconds: what PromQL accepts)."""
    return f"{round(seconds * 1000)}ms" if seconds != int(seconds) else f"{int(seconds)}s"


def forecast_rules(config: RulesConfig | None = None) -> list[tuple[str, str]]:
    """Time until the KV cache is full and until a GPU's used memory crosses its sized budget.

    A least-squares line over the window (deriv() for the slope, predict_linear(x, 0) for where
    the line stands now, so one noisy last sample does not move the forecast), only where:
    - the trend rises faster than a minimum slope (a flat series with noise has a slope near 0,
      whose forecast is hours or days away, or none at all);
    - the series has at least half a window of history (`offset`): a fit over a few fresh
      samples of a new engine, or after a Prometheus restart, is noise;
    and clamped at 0 once the line is past the limit. The alerts add a `for:` on top.
    """
    t = (config or RulesConfig()).limits
    kv = "moe_watch_kv_cache_usage_ratio"
    kv_window = _duration(t.kv_cache_forecast_window_seconds)
    kv_half = _duration(t.kv_cache_forecast_window_seconds / 2)
    used = 'moe_watch_gpu_memory_used_bytes{engine!=""}'
    budget = "moe_watch_sized_budget_bytes"  # per engine; GPU series carry `engine`
    window = _duration(t.budget_forecast_window_seconds)
    half = _duration(t.budget_forecast_window_seconds / 2)
    slope = f"deriv({used}[{window}])"
    return [
        (
            "moe_watch:kv_cache_full:seconds",
            f"clamp_min((1 - predict_linear({kv}[{kv_window}], 0))"
            f" / (deriv({kv}[{kv_window}]) > {t.kv_cache_forecast_min_rise_per_hour:g} / 3600)"
            f" and {kv} offset {kv_half}, 0)",
        ),
        (
            "moe_watch:gpu_budget_exhausted:seconds",
            f"clamp_min(({budget} - ignoring(gpu) group_right() predict_linear({used}[{window}], 0))"
            f" / ({slope} and {slope} * 3600 / ignoring(gpu) group_left() {budget}"
            f" > {t.budget_forecast_min_rise_per_hour:g})"
            f" and {used} offset {half}, 0)",
        ),
    ]


# Keys that order a layer's experts by load, ties to the lower id: count * KEY_SCALE + (KEY_SCALE
# - 1 - id). Exact in float64 while a layer's window count per expert stays below 2^53 / 4096
# (2.2e12) and a layer has at most 4096 experts.
KEY_SCALE = 4096


def expert_group_rules(
    config: RulesConfig | None = None,
) -> list[tuple[str, str, dict[str, str]]]:
    """Engine-level expert signals for engines whose workers span nodes, rebuilt exactly from
    every node's window counts (moe_watch_expert_group_window_tokens): the sums over nodes per
    (layer, expert), then max/mean per layer as the agent does (signals/experts.py).

    Load ranks without sorting: the n-th largest key of a layer is the largest key below the
    (n-1)-th; keys are unique (the id is in them), so each rule is one max and a comparison.
    """
    config = config or RulesConfig()
    g = f"{config.cluster_label}, engine_group"
    gl = f"{g}, layer"
    tokens = "moe_watch_expert_group_window_tokens"
    per_expert = f"sum by ({gl}, expert) ({tokens})"
    layer_tokens = "moe_watch:expert_group_layer_tokens:sum"
    top_k = f"on({g}) group_left() max by ({g}) (moe_watch_expert_group_top_k)"
    key = (
        f"({per_expert} * {KEY_SCALE} + on({g}, expert) group_left()"
        f" ({KEY_SCALE - 1} - max by ({g}, expert) (moe_watch_expert_group_expert_id)))"
    )
    ranks = f"sum by ({g}, rank) (moe_watch_expert_group_rank_window_tokens)"
    rules = [
        (layer_tokens, f"sum by ({gl}) ({tokens}) > 0"),  # layers with traffic only
        (
            "moe_watch:expert_group_skew_ratio",
            f"max by ({gl}) ({per_expert}) / ({layer_tokens} / count by ({gl}) ({per_expert})) - 1",
        ),
        (
            "moe_watch:expert_group_max_token_share",
            f"max by ({gl}) ({per_expert}) * {top_k} / {layer_tokens}",
        ),
        (
            "moe_watch:expert_group_max_skew_ratio",
            f"max by ({g}) (moe_watch:expert_group_skew_ratio)",
        ),
        (
            "moe_watch:expert_group_rank_load_ratio",
            f"{ranks} / on({g}) group_left() (avg by ({g}) ({ranks}) > 0)",
        ),
    ]
    keys: list[tuple[str, str, dict[str, str]]] = []
    for n in range(1, config.expert_group_load_ranks + 1):
        below = (
            f' < on({gl}) group_left() moe_watch:expert_group_load_rank:key{{load_rank="{n - 1}"}}'
            if n > 1
            else ""
        )
        keys.append(
            (
                "moe_watch:expert_group_load_rank:key",
                f"max by ({gl}) ({key}{below})",
                {"load_rank": str(n)},
            )
        )
    ranked = f"(moe_watch:expert_group_load_rank:key and on({gl}) {layer_tokens})"
    rules += [
        (
            "moe_watch:expert_group_load_rank_token_share",
            f"floor({ranked} / {KEY_SCALE}) * {top_k} / on({gl}) group_left() {layer_tokens}",
        ),
        ("moe_watch:expert_group_load_rank_expert_id", f"{KEY_SCALE - 1} - {ranked} % {KEY_SCALE}"),
    ]
    # The keys (one rule per load rank, labelled by it) before the share and id that read them.
    head, tail = rules[:-2], rules[-2:]
    return [(r, e, {}) for r, e in head] + keys + [(r, e, {}) for r, e in tail]


# The expert series alerts and dashboards read: the engine group's where its workers span nodes
# (`engine` set to the group id, `engine_group` kept), else the agent's own, unchanged.
UNIFIED_EXPERT_SERIES = (
    "expert_skew_ratio",
    "expert_max_token_share",
    "expert_max_skew_ratio",
    "expert_load_rank_token_share",
    "expert_load_rank_expert_id",
    "expert_rank_load_ratio",
)


def unified_expert_rules() -> list[tuple[str, str]]:
    return [
        (
            f"moe_watch:{name}",
            f"label_replace(moe_watch:expert_group_{name.removeprefix('expert_')},"
            ' "engine", "$1", "engine_group", "(.+)")'
            f" or (moe_watch_{name} unless ignoring(layer, load_rank, rank, engine_group)"
            " moe_watch_expert_group_info)",
        )
        for name in UNIFIED_EXPERT_SERIES
    ]


def _expr(template: str, config: RulesConfig, threshold: str = "") -> str:
    limits = config.limits
    expr = template.replace("$job", config.job_selector).replace(
        "$by", f"{config.cluster_label}, engine"
    )
    if threshold:
        expr = expr.replace("$t", f"{getattr(limits, threshold):g}")
    return re.sub(r"\$([a-z_0-9]+)", lambda m: f"{getattr(limits, m[1]):g}", expr)


def _runbook(alert: Alert, config: RulesConfig) -> str:
    return f"{config.runbook_base_url}#{alert.name.lower()}"


def rule_groups(
    config: RulesConfig | None = None,
    *,
    for_override: str | None = None,
    interval: str | None = None,
) -> dict[str, Any]:
    """The rule file as a dict. ``for_override`` and ``interval`` shorten every `for:` and the
    evaluation interval (end-to-end tests only)."""
    config = config or RulesConfig()
    if interval is not None:
        config = config.model_copy(update={"interval": interval})
    alerts = [
        {
            "alert": alert.name,
            "expr": _expr(alert.expr, config, alert.threshold),
            "for": for_override or config.for_(alert),
            "labels": {"severity": config.severity(alert), **config.additional_labels},
            "annotations": _annotations(alert, config),
        }
        for alert in ALERTS
        if config.enabled(alert)
    ]
    forecasts: list[dict[str, Any]] = [
        {"record": r, "expr": e} for r, e in forecast_rules(config) + unified_expert_rules()
    ]
    return {
        "groups": [
            {
                "name": "moe-watch.recording",
                "interval": config.interval,
                "rules": [{"record": r, "expr": _expr(e, config)} for r, e in RECORDING],
            },
            # The forecasts open the alerts group: rules of one group run in order, so the
            # forecast alerts read this evaluation's forecast (groups run independently).
            {
                "name": "moe-watch.expert-groups",
                "interval": config.interval,
                "rules": [
                    {"record": r, "expr": e, **({"labels": labels} if labels else {})}
                    for r, e, labels in expert_group_rules(config)
                ],
            },
            # The unified expert series, like the forecasts, come before the alerts that read them.
            {"name": "moe-watch.alerts", "interval": config.interval, "rules": forecasts + alerts},
        ]
    }


def _fire_and_quiet(alert: Alert, config: RulesConfig) -> tuple[str, str]:
    if alert.fire is not None and alert.quiet is not None:
        return alert.fire, alert.quiet
    t = getattr(config.limits, alert.threshold)
    step = max(abs(t) * 0.1, 0.01)
    above, below = _v(round(t + step, 6)), _v(round(t - step, 6))
    return (above, below) if alert.op == ">" else (below, above)


def _job_labels(config: RulesConfig) -> str:
    """A label set the job selector matches (its equality matchers; a regex gets 'moe-watch')."""
    matchers = re.findall(r'(\w+)="([^"]*)"', config.job_selector)
    return ",".join(f'{k}="{v}"' for k, v in matchers) or 'job="moe-watch"'


def _alert_test(alert: Alert, config: RulesConfig) -> dict[str, Any]:
    fire, quiet = _fire_and_quiet(alert, config)
    alert = replace(alert, series=alert.series.replace("$job", _job_labels(config)))
    fire_labels = _labels(alert.series)
    minutes = alert.eval_minutes or _minutes(config.for_(alert)) + 2
    exp = (
        dict(re.findall(r'(\w+)="([^"]*)"', config.job_selector))
        if alert.absent
        else dict(fire_labels)
    )
    exp["severity"] = config.severity(alert)
    exp |= config.additional_labels
    exp.pop("__name__", None)
    value = alert.value_at_eval
    if value is None:
        value = float(fire.split()[-1].split("x")[0].split("+")[0])
    annotations = _expected_annotations(
        alert, config, exp, value, alert.hottest, alert.whatif_rendered
    )
    return {
        "interval": "1m",
        "input_series": [
            {"series": alert.series, "values": fire},
            *(
                [{"series": _with_label(alert.series, "case", "quiet"), "values": quiet}]
                if quiet
                else []
            ),
            *({"series": s, "values": v} for s, v in alert.extra_series),
        ],
        "alert_rule_test": [
            {
                "eval_time": f"{minutes}m",
                "alertname": alert.name,
                "exp_alerts": [{"exp_labels": exp, "exp_annotations": annotations}],
            },
        ],
    }


def _defect_tests(config: RulesConfig) -> list[dict[str, Any]]:
    """One test for each way these rules once failed to page (docs/alerts.md, "Defects")."""
    by_name = {a.name: a for a in ALERTS}
    skew_alert, xid_alert = by_name["MoEExpertSkewHigh"], by_name["MoEGPUXidErrors"]
    skew = {"engine": "mixtral-0", "layer": "3", "severity": config.severity(skew_alert)}
    skew |= config.additional_labels
    xid = {"gpu": "2", "xid": "48", "severity": config.severity(xid_alert)}
    xid |= config.additional_labels

    def expected(
        alert: Alert, labels: dict[str, str], value: float, hottest: str = ""
    ) -> dict[str, Any]:
        annotations = _expected_annotations(alert, config, labels, value, hottest, NO_WHATIF)
        return {"exp_labels": labels, "exp_annotations": annotations}

    flipping = " ".join(["5x3", "2x3"] * 6)  # the hottest expert alternates every 4 minutes
    tests: list[dict[str, Any]] = [
        {  # The hottest expert alternates while the layer stays skewed: one alert, `for:` intact.
            "interval": "1m",
            "input_series": [
                {"series": 'moe_watch_expert_skew_ratio{engine="mixtral-0",layer="3"}', "values": "0.8x48"},
                {"series": 'moe_watch_expert_load_rank_expert_id{engine="mixtral-0",layer="3",load_rank="1"}', "values": flipping},
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "MoEExpertSkewHigh", "exp_alerts": [expected(skew_alert, skew, 0.8, "2")]},
                {"eval_time": "40m", "alertname": "MoEExpertSkewHigh", "exp_alerts": [expected(skew_alert, skew, 0.8, "5")]},
            ],
        },
        {  # A GPU's first Xid: a new series that starts at 1 (no sample before it).
            "interval": "1m",
            "input_series": [
                {"series": 'moe_watch_gpu_xid_errors_total{gpu="2",xid="48"}', "values": "_x10 1x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "MoEGPUXidErrors", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "MoEGPUXidErrors", "exp_alerts": [expected(xid_alert, xid, 1)]},
                {"eval_time": "30m", "alertname": "MoEGPUXidErrors", "exp_alerts": []},
            ],
        },
        {  # Autoscale up on a short queue but a high P95, and on hot GPUs; hold when all is calm.
            "interval": "1m",
            "input_series": [
                {"series": 'moe_watch_requests_waiting{engine="slow",model="m"}', "values": "2x20"},
                {"series": 'moe_watch_latency_seconds{engine="slow",model="m",kind="e2e",quantile="0.95"}', "values": "5x20"},
                {"series": 'moe_watch_gpu_utilization_ratio{engine="slow",gpu="0"}', "values": "0.5x20"},
                {"series": 'moe_watch_requests_waiting{engine="hot",model="m"}', "values": "0x20"},
                {"series": 'moe_watch_latency_seconds{engine="hot",model="m",kind="e2e",quantile="0.95"}', "values": "1x20"},
                {"series": 'moe_watch_gpu_utilization_ratio{engine="hot",gpu="0"}', "values": "0.95x20"},
                {"series": 'moe_watch_requests_waiting{engine="calm",model="m"}', "values": "1x20"},
                {"series": 'moe_watch_latency_seconds{engine="calm",model="m",kind="e2e",quantile="0.95"}', "values": "1x20"},
                {"series": 'moe_watch_gpu_utilization_ratio{engine="calm",gpu="0"}', "values": "0.5x20"},
            ],
            "promql_expr_test": [
                {"expr": "moe_watch:autoscale_up:bool", "eval_time": "10m", "exp_samples": [
                    {"labels": 'moe_watch:autoscale_up:bool{engine="calm"}', "value": 0},
                    {"labels": 'moe_watch:autoscale_up:bool{engine="hot"}', "value": 1},
                    {"labels": 'moe_watch:autoscale_up:bool{engine="slow"}', "value": 1},
                ]},
            ],
        },
        {  # Autoscale down: idle GPUs alone are not enough while requests queued in the last 10m.
            "interval": "1m",
            "input_series": [
                {"series": 'moe_watch_gpu_utilization_ratio{engine="idle",gpu="0"}', "values": "0.1x30"},
                {"series": 'moe_watch_requests_waiting{engine="idle",model="m"}', "values": "0x30"},
                {"series": 'moe_watch_gpu_utilization_ratio{engine="stalled",gpu="0"}', "values": "0.1x30"},
                {"series": 'moe_watch_requests_waiting{engine="stalled",model="m"}', "values": "0x14 4 0x15"},
                {"series": 'moe_watch_gpu_utilization_ratio{engine="busy",gpu="0"}', "values": "0.6x30"},
                {"series": 'moe_watch_requests_waiting{engine="busy",model="m"}', "values": "0x30"},
            ],
            "promql_expr_test": [
                {"expr": "moe_watch:autoscale_down:bool", "eval_time": "20m", "exp_samples": [
                    {"labels": 'moe_watch:autoscale_down:bool{engine="busy"}', "value": 0},
                    {"labels": 'moe_watch:autoscale_down:bool{engine="idle"}', "value": 1},
                    {"labels": 'moe_watch:autoscale_down:bool{engine="stalled"}', "value": 0},
                ]},
                {"expr": "moe_watch:autoscale_down:bool", "eval_time": "27m", "exp_samples": [
                    {"labels": 'moe_watch:autoscale_down:bool{engine="busy"}', "value": 0},
                    {"labels": 'moe_watch:autoscale_down:bool{engine="idle"}', "value": 1},
                    {"labels": 'moe_watch:autoscale_down:bool{engine="stalled"}', "value": 1},
                ]},
            ],
        },
    ]  # fmt: skip
    return tests


def _number(value: float) -> str:
    return f"{value:.15g}"


def _forecast_fixture(alert: Alert, config: RulesConfig) -> Alert:
    """A forecast alert's standard test from the thresholds: a straight line that reaches the
    limit at minute F, evaluated one minute before (forecast: 60 s), after half a window of
    history and `for:`; the quiet case is flat. Other alerts pass through unchanged."""
    t = config.limits
    if alert.name not in {a.name for a in FORECAST_ALERTS}:
        return alert
    kv = alert.name == "MoEKVCacheFullSoon"
    window = t.kv_cache_forecast_window_seconds if kv else t.budget_forecast_window_seconds
    limit = t.kv_cache_full_seconds if kv else t.budget_exhausted_seconds
    full = math.ceil(window / 120 + limit / 60) + _minutes(config.for_(alert)) + 2
    if kv:
        per_minute = max(0.01, 2 * t.kv_cache_forecast_min_rise_per_hour / 60)
        start, top, quiet = 1 - per_minute * full, 1.0, "0.9"
    else:
        top = BUDGET_BYTES
        per_minute = top * max(0.3, 2 * t.budget_forecast_min_rise_per_hour) / 60
        start, quiet = top - per_minute * full, _number(top * 0.5)
    return replace(
        alert,
        fire=f"{_number(start)}+{_number(per_minute)}x{full} {_number(top)}x20",
        quiet=f"{quiet}x{full + 20}",
        eval_minutes=full - 1,
        value_at_eval=60,
        extra_series=(
            ()
            if kv
            else ((f"moe_watch_sized_budget_bytes{{{ENGINE}}}", f"{_number(top)}x{full + 20}"),)
        ),
    )


BUDGET_BYTES = 80e9  # the tests' per-GPU budget (an H100's 80 GB)


def _noisy(
    center: float,
    amplitude: float,
    minutes: int,
    *,
    rise: float = 0.0,
    period: int = 20,
    seed: int,
) -> str:
    """Deterministic noisy values, one a minute: center + rise * minute, plus load waves
    (``period`` minutes, amplitude ``amplitude``: bursts of traffic come and go) and jitter
    (uniform, half the amplitude). The waves are what fools a short fit: each rising half looks
    like a trend that reaches the limit within minutes."""
    rng = random.Random(seed)
    values = (
        center
        + rise * m
        + amplitude * math.sin(2 * math.pi * m / period)
        + rng.uniform(-amplitude / 2, amplitude / 2)
        for m in range(minutes + 1)
    )
    return " ".join(_number(round(v, 4)) for v in values)


def _forecast_tests(config: RulesConfig) -> list[dict[str, Any]]:
    """Noise must not page; a steady rise under the same noise must, before it reaches the
    limit. Each reads the ALERTS series over the whole test: never firing for the flat series,
    firing at least once before the limit for the rising ones."""
    kv = f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}'
    used = f'moe_watch_gpu_memory_used_bytes{{{ENGINE},gpu="0"}}'
    budget = {
        "series": f"moe_watch_sized_budget_bytes{{{ENGINE}}}",
        "values": f"{_number(BUDGET_BYTES)}x240",
    }
    gib = 2**30

    def never(alertname: str, minutes: int) -> dict[str, Any]:
        selector = f'ALERTS{{alertname="{alertname}",alertstate="firing"}}'
        return {
            "expr": f"count_over_time({selector}[{minutes}m])",
            "eval_time": f"{minutes}m",
            "exp_samples": [],
        }

    def fired(alertname: str, minute: int, labels: str) -> dict[str, Any]:
        """It fired at some evaluation before ``minute`` (the minute before the limit)."""
        alert = next(a for a in FORECAST_ALERTS if a.name == alertname)
        extra = "".join(f',{k}="{v}"' for k, v in config.additional_labels.items())
        selector = f'ALERTS{{alertname="{alertname}",alertstate="firing"}}'
        labels = f'{{alertname="{alertname}",alertstate="firing",{labels},severity="{config.severity(alert)}"{extra}}}'
        return {
            "expr": f"count_over_time({selector}[{minute}m]) > bool 0",
            "eval_time": f"{minute}m",
            "exp_samples": [{"labels": labels, "value": 1}],
        }

    return [
        {  # KV usage swings 0.85 +/- 0.06 in 20-minute waves, jittered, for two hours, no trend.
            "interval": "1m",
            "input_series": [{"series": kv, "values": _noisy(0.85, 0.06, 120, seed=17)}],
            "promql_expr_test": [never("MoEKVCacheFullSoon", 120)],
        },
        {  # The same waves on a steady +0.01/minute rise: full at minute 70, paged before it.
            "interval": "1m",
            "input_series": [{"series": kv, "values": _noisy(0.30, 0.06, 69, rise=0.01, seed=18) + " 1x20"}],
            "promql_expr_test": [fired("MoEKVCacheFullSoon", 69, f'{ENGINE},model="mixtral"')],
        },
        {  # Used memory swings around 85 % of the budget +/- 4 GiB in hourly waves for 4 h: no warning.
            "interval": "1m",
            "input_series": [{"series": used, "values": _noisy(0.85 * BUDGET_BYTES, 4 * gib, 240, period=60, seed=19)}, budget],
            "promql_expr_test": [never("MoEGPUBudgetExhaustedSoon", 240)],
        },
        {  # The same noise on a steady rise of 10 GB/hour from 40 GB: the budget at minute 240.
            "interval": "1m",
            "input_series": [{"series": used, "values": _noisy(40e9, 4 * gib, 240, rise=10e9 / 60, period=60, seed=20)}, budget],
            "promql_expr_test": [fired("MoEGPUBudgetExhaustedSoon", 239, f'{ENGINE},gpu="0"')],
        },
    ]  # fmt: skip


def promtool_tests(config: RulesConfig | None = None) -> dict[str, Any]:
    config = config or RulesConfig()
    tests = [
        _alert_test(_forecast_fixture(alert, config), config)
        for alert in ALERTS
        if config.enabled(alert)
    ]
    tests += (
        _defect_tests(config)
        if all(
            config.enabled(a) for a in ALERTS if a.name in ("MoEExpertSkewHigh", "MoEGPUXidErrors")
        )
        else []
    )
    tests += _forecast_tests(config) if all(config.enabled(a) for a in FORECAST_ALERTS) else []
    return {"rule_files": ["../moe-watch.rules.yml"], "evaluation_interval": "1m", "tests": tests}


def operator_manifest(config: RulesConfig | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "moe-watch",
            "labels": {"app.kubernetes.io/name": "moe-watch"},  # the chart adds release labels
        },
        "spec": rule_groups(config),
    }


def render(data: dict[str, Any], header: str) -> str:
    body = yaml.safe_dump(data, sort_keys=False, width=1000, allow_unicode=True)
    return f"# {header}\n# Generated by `moe-watch rules` from moe_watch/rules.py: edit that, not this file.\n{body}"


THRESHOLDS_DOC = Path("docs/thresholds.md")


def thresholds_doc(limits: Thresholds = DEFAULT) -> str:
    """docs/thresholds.md: every number moe-watch ships, its value and where it comes from, read
    from moe_watch/thresholds.py (the values and the comment on each field)."""
    import inspect

    from moe_watch import thresholds

    notes = dict(
        re.findall(r"^\s+(\w+): \w+ = [^#\n]+#\s*(.+)$", inspect.getsource(thresholds), re.M)
    )
    users = {
        f: [a.name for a in ALERTS if a.threshold == f] for f in Thresholds.__dataclass_fields__
    }
    rows = [
        f"| `{name}` | {getattr(limits, name):g} | {', '.join(users.get(name, [])) or '-'} | {notes.get(name, '')} |"
        for name in (f for f in Thresholds.__dataclass_fields__)
    ]
    return (
        "# Thresholds\n\n"
        "Generated by `moe-watch rules` from `moe_watch/thresholds.py`, the one home of every number\n"
        "moe-watch ships: the signals, drift rules, alert rules, dashboards and help strings read it.\n"
        "Override any of them for your rules with `moe-watch rules --set thresholds.<name>=<value>`\n"
        '([alerts.md](alerts.md)). "ours" marks the few that ../shared/design.md leaves open.\n\n'
        "| threshold | value | alerts | meaning and source |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def generated_files(config: RulesConfig | None = None) -> dict[Path, str]:
    return {
        THRESHOLDS_DOC: thresholds_doc(config.limits if config else DEFAULT),
        RULES_FILE: render(rule_groups(config), "moe-watch recording and alerting rules"),
        TESTS_FILE: render(
            promtool_tests(config),
            "promtool unit tests: `promtool test rules alerts/tests/moe-watch.rules.test.yml`",
        ),
        OPERATOR_FILE: render(
            operator_manifest(config), "moe-watch rules for the Prometheus Operator"
        ),
    }


def write_all(root: Path, config: RulesConfig | None = None) -> list[Path]:
    return write_generated(root, generated_files(config))


def load_config(path: Path | None, assignments: list[str]) -> RulesConfig:
    """A RulesConfig from a YAML file and `KEY.SUB=VALUE` assignments (later ones win).

    Raises ValueError with one line naming the bad key or value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read rules config {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"rules config {path} must be a mapping")
        data = loaded or {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set {assignment!r}: expected KEY=VALUE (e.g. thresholds.expert_skew=0.6)"
            )
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {assignment!r}: {part} is not a mapping")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    try:
        return RulesConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ValueError(f"invalid rules config: {where}: {message}") from None


def expand(template: str, labels: dict[str, str], value: float, hottest: str = "") -> str:
    """What Prometheus' template engine makes of our (small) annotation language."""
    text = template.replace(HOTTEST_EXPERT, hottest or "unknown")
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
    return re.sub(r'\{\{ \$value \| printf "(%[.0-9]*f)" \}\}', lambda m: m[1] % value, text)


def _labels(series: str) -> dict[str, str]:
    name, _, rest = series.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return {"__name__": name} | labels


def _with_label(series: str, key: str, value: str) -> str:
    name, _, rest = series.partition("{")
    inner = rest.rstrip("}")
    return f'{name}{{{inner + "," if inner else ""}{key}="{value}"}}'


def _minutes(duration: str) -> int:
    number, unit = int(duration[:-1]), duration[-1]
    return number * {"s": 0, "m": 1, "h": 60}[unit] + (1 if unit == "s" and number else 0)
