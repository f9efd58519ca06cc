"""The one source of the alert and recording rules: thresholds, `for:` durations, texts, tests.

`moe-watch rules --out .` writes, from the specs below:
- alerts/moe-watch.rules.yml            Prometheus rule groups (recording + alerting)
- alerts/tests/moe-watch.rules.test.yml promtool unit tests: every alert fires at its threshold
                                        after `for:` and stays silent just below it
- deploy/base/prometheusrule.yaml the same groups as a Prometheus Operator PrometheusRule
A test regenerates them and fails when the committed files are stale. Thresholds trace to
../shared/design.md; each alert's runbook is a section of docs/runbooks.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from moe_watch.generated import write_generated

RUNBOOK_BASE = "https://github.com/moe-watch/moe-watch/blob/main/docs/runbooks.md"
RULES_FILE = Path("alerts/moe-watch.rules.yml")
TESTS_FILE = Path("alerts/tests/moe-watch.rules.test.yml")
OPERATOR_FILE = Path("deploy/base/prometheusrule.yaml")
ENGINE = 'engine="mixtral-0"'


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str  # PromQL; {t} is replaced by the threshold
    threshold: float
    for_: str
    severity: str  # page (PagerDuty) | warning | info
    summary: str
    description: str  # may use {{ $labels.x }} and {{ $value | printf "%.2f" }}
    # promtool test: one series that must fire, one just below that must not
    series: str
    fire: str
    quiet: str
    eval_minutes: int = 0  # 0: for + 2 minutes
    # The alert's value at eval_time (for the expected description); default: the fire series' last.
    value_at_eval: float | None = None
    # The alert's labels when they are not the fire series' own (absent() makes its own).
    alert_labels: tuple[tuple[str, str], ...] | None = None
    # quiet may be "" where the alert has no "just below" (absent()).

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}#{self.name.lower()}"


def _v(value: float, minutes: int = 60) -> str:
    return f"{value:g}x{minutes}"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "MoEExpertSkewHigh",
        "moe_watch_expert_skew_ratio > {t}",
        0.5,
        "10m",
        "page",
        "Expert load skewed > 50 % in one layer",
        'Layer {{ $labels.layer }} of {{ $labels.engine }} routes {{ $value | printf "%.2f" }} above the mean to expert {{ $labels.expert }} (max/mean - 1).',
        f'moe_watch_expert_skew_ratio{{{ENGINE},layer="3",expert="5"}}',
        _v(0.55),
        _v(0.45),
    ),
    Alert(
        "MoEExpertCollapse",
        "moe_watch_expert_max_token_share > {t}",
        0.4,
        "5m",
        "page",
        "Expert collapse: one expert takes > 40 % of a layer's tokens",
        'Expert {{ $labels.expert }} of layer {{ $labels.layer }} on {{ $labels.engine }} sees {{ $value | printf "%.2f" }} of the layer\'s tokens.',
        f'moe_watch_expert_max_token_share{{{ENGINE},layer="17",expert="2"}}',
        _v(0.45),
        _v(0.38),
    ),
    Alert(
        "MoEHotEPRank",
        "moe_watch_expert_rank_load_ratio > {t}",
        1.5,
        "10m",
        "warning",
        "One expert-parallel rank carries far more tokens than the others",
        'EP rank {{ $labels.rank }} of {{ $labels.engine }} carries {{ $value | printf "%.2f" }}x the mean rank load.',
        f'moe_watch_expert_rank_load_ratio{{{ENGINE},rank="1"}}',
        _v(1.6),
        _v(1.4),
    ),
    Alert(
        "MoEGPUUtilizationSpread",
        "moe_watch_engine_gpu_utilization_spread_ratio > {t}",
        0.5,
        "10m",
        "warning",
        "GPUs of one engine are unevenly busy (hot expert signature)",
        '{{ $labels.engine }}: max - min GPU utilization is {{ $value | printf "%.2f" }} (e.g. 95 % vs 30 %).',
        f"moe_watch_engine_gpu_utilization_spread_ratio{{{ENGINE}}}",
        _v(0.6),
        _v(0.45),
    ),
    Alert(
        "MoEVRAMHigh",
        "moe_watch_gpu_memory_used_ratio > {t}",
        0.95,
        "5m",
        "page",
        "GPU memory above 95 %",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) uses {{ $value | printf "%.3f" }} of its memory: no room for KV-cache spikes.',
        f'moe_watch_gpu_memory_used_ratio{{{ENGINE},gpu="0"}}',
        _v(0.96),
        _v(0.94),
    ),
    Alert(
        "MoEKVCacheCritical",
        "moe_watch_kv_cache_usage_ratio > {t}",
        0.95,
        "2m",
        "page",
        "KV cache above 95 %: requests are preempted or rejected",
        '{{ $labels.engine }} ({{ $labels.model }}) KV cache at {{ $value | printf "%.3f" }}.',
        f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}',
        _v(0.97),
        _v(0.94),
    ),
    Alert(
        "MoEKVCacheHitRatioLow",
        "moe_watch_kv_cache_hit_ratio < {t}",
        0.2,
        "30m",
        "warning",
        "Prefix-cache hit ratio below 20 %",
        '{{ $labels.engine }} ({{ $labels.model }}) prefix-cache hit ratio {{ $value | printf "%.2f" }} over the window.',
        f'moe_watch_kv_cache_hit_ratio{{{ENGINE},model="mixtral"}}',
        _v(0.15),
        _v(0.25),
    ),
    Alert(
        "MoEGPUUtilizationLow",
        "moe_watch_gpu_utilization_ratio < {t}",
        0.6,
        "30m",
        "info",
        "GPU utilization below 60 % for 30 minutes",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.2f" }} utilization: over-provisioned or starved.',
        f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="1"}}',
        _v(0.5),
        _v(0.65),
    ),
    Alert(
        "MoEGPUUtilizationSaturated",
        "moe_watch_gpu_utilization_ratio > {t}",
        0.98,
        "15m",
        "warning",
        "GPU utilization above 98 % for 15 minutes",
        'GPU {{ $labels.gpu }} ({{ $labels.engine }}) at {{ $value | printf "%.3f" }} utilization: no headroom left.',
        f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="0"}}',
        _v(0.99),
        _v(0.97),
    ),
    Alert(
        "MoEThroughputBelowBaseline",
        "moe_watch_generation_tokens_per_second < {t} * avg_over_time(moe_watch_generation_tokens_per_second[1d])",
        0.8,
        "30m",
        "warning",
        "Generated tokens/s 20 % below the engine's own daily baseline",
        '{{ $labels.engine }} ({{ $labels.model }}) generates {{ $value | printf "%.0f" }} tokens/s, below 80 % of its 1-day average.',
        f'moe_watch_generation_tokens_per_second{{{ENGINE},model="mixtral"}}',
        "100x240 60x60",
        "100x240 90x60",
        eval_minutes=290,
    ),
    Alert(
        "MoEP95LatencyHigh",
        'moe_watch_latency_seconds{{kind="e2e",quantile="0.95"}} > {t}',
        30,
        "5m",
        "warning",
        "P95 end-to-end latency above 30 s",
        '{{ $labels.engine }} ({{ $labels.model }}) P95 e2e latency is {{ $value | printf "%.1f" }} s.',
        f'moe_watch_latency_seconds{{{ENGINE},model="mixtral",kind="e2e",quantile="0.95"}}',
        _v(35),
        _v(28),
    ),
    Alert(
        "MoEQueueLong",
        "moe_watch_requests_waiting > {t}",
        100,
        "5m",
        "warning",
        "More than 100 requests waiting: scale out",
        '{{ $labels.engine }} ({{ $labels.model }}) has {{ $value | printf "%.0f" }} requests waiting.',
        f'moe_watch_requests_waiting{{{ENGINE},model="mixtral"}}',
        _v(150),
        _v(90),
    ),
    Alert(
        "MoEConfigDrift",
        "moe_watch_config_drift == {t}",
        1,
        "15m",
        "warning",
        "An engine runs with a setting that breaks its plan or an MoE rule",
        "{{ $labels.engine }} drifted on {{ $labels.setting }}: see moe_watch_config_drift_info and /status for running vs expected.",
        f'moe_watch_config_drift{{{ENGINE},setting="gpu_memory_utilization"}}',
        _v(1),
        _v(0),
    ),
    Alert(
        "MoEAboveSizedBudget",
        "moe_watch_budget_used_ratio > {t}",
        1,
        "10m",
        "warning",
        "GPU memory above the engine's sized per-GPU budget",
        'GPU {{ $labels.gpu }} of {{ $labels.engine }} uses {{ $value | printf "%.2f" }}x its plan\'s per-GPU budget (moe-watch size).',
        f'moe_watch_budget_used_ratio{{{ENGINE},gpu="0"}}',
        _v(1.05),
        _v(0.98),
    ),
    Alert(
        "MoETargetDown",
        "moe_watch_target_up == {t}",
        0,
        "3m",
        "warning",
        "moe-watch cannot scrape a serving engine",
        "The agent's last scrapes of {{ $labels.engine }} failed: see moe_watch_collect_errors_total and /status.",
        f"moe_watch_target_up{{{ENGINE}}}",
        _v(0),
        _v(1),
    ),
    Alert(
        "MoEWatchDown",
        'up{{job=~".*moe-watch.*"}} == {t}',
        0,
        "5m",
        "warning",
        "Prometheus cannot scrape a moe-watch agent",
        "{{ $labels.instance }} is down: this node's GPUs and engines are unwatched.",
        'up{job="moe-watch",instance="10.0.0.5:9400"}',
        _v(0),
        _v(1),
    ),
    Alert(
        "MoEWatchAbsent",
        'absent(up{{job="moe-watch"}}) == {t}',
        1,
        "10m",
        "warning",
        "No moe-watch agent is scraped at all",
        "Prometheus has no up series for job {{ $labels.job }}: the DaemonSet is gone or its ServiceMonitor no longer matches.",
        'up{job="node-exporter",instance="10.0.0.5:9100"}',
        _v(1),
        "",
        alert_labels=(("job", "moe-watch"),),
    ),
    Alert(
        "MoEWatchStale",
        "time() - moe_watch_last_success_timestamp_seconds > {t}",
        120,
        "5m",
        "warning",
        "A moe-watch source has not succeeded for over 2 minutes",
        'Source {{ $labels.source }} last succeeded {{ $value | printf "%.0f" }} s ago.',
        'moe_watch_last_success_timestamp_seconds{source="nvml"}',
        "0x60",
        "0+60x60",
        eval_minutes=10,
        value_at_eval=600,
    ),
    Alert(
        "MoEGPULost",
        "moe_watch_gpu_up == {t}",
        0,
        "1m",
        "page",
        "A GPU fell off the bus",
        "NVML reports GPU {{ $labels.gpu }} ({{ $labels.engine }}) lost: the engine on it is degraded or down.",
        f'moe_watch_gpu_up{{{ENGINE},gpu="1"}}',
        _v(0),
        _v(1),
    ),
    Alert(
        "MoEGPUXidErrors",
        "increase(moe_watch_gpu_xid_errors_total[15m]) > {t}",
        0,
        "0m",
        "warning",
        "GPU Xid errors",
        'GPU {{ $labels.gpu }} reported Xid {{ $labels.xid }} ({{ $value | printf "%.0f" }} in 15 minutes).',
        'moe_watch_gpu_xid_errors_total{gpu="0",xid="79"}',
        "0x5 1x55",
        "0x60",
        eval_minutes=8,
    ),
)

# Autoscale signals (design.md) as recording rules KEDA/HPA can read: 1 = scale, 0 = hold.
RECORDING: tuple[tuple[str, str], ...] = (
    ("moe_watch:engine_gpu_utilization:avg", "avg by (engine) (moe_watch_gpu_utilization_ratio)"),
    ("moe_watch:autoscale_up:bool",
     '(max by (engine) (moe_watch_requests_waiting) > bool 10)'
     ' or on(engine) (max by (engine) (moe_watch_latency_seconds{kind="e2e",quantile="0.95"}) > bool 2)'
     " or on(engine) (min_over_time(moe_watch:engine_gpu_utilization:avg[5m]) > bool 0.9)"),
    ("moe_watch:autoscale_down:bool", "max_over_time(moe_watch:engine_gpu_utilization:avg[15m]) < bool 0.3"),
)  # fmt: skip


def rule_groups(for_override: str | None = None, interval: str = "30s") -> dict[str, Any]:
    """The rule file as a dict. ``for_override`` shortens every `for:` (end-to-end tests only)."""
    alerts = []
    for alert in ALERTS:
        alerts.append(
            {
                "alert": alert.name,
                "expr": alert.expr.format(t=f"{alert.threshold:g}"),
                "for": for_override or alert.for_,
                "labels": {"severity": alert.severity},
                "annotations": {
                    "summary": alert.summary,
                    "description": alert.description,
                    "runbook_url": alert.runbook_url,
                },
            }
        )
    return {
        "groups": [
            {
                "name": "moe-watch.recording",
                "interval": interval,
                "rules": [{"record": r, "expr": e} for r, e in RECORDING],
            },
            {"name": "moe-watch.alerts", "interval": interval, "rules": alerts},
        ]
    }


def promtool_tests() -> dict[str, Any]:
    tests = []
    for alert in ALERTS:
        fire_labels = _labels(alert.series)
        quiet_series = _with_label(alert.series, "case", "quiet")
        minutes = alert.eval_minutes or _minutes(alert.for_) + 2
        exp = dict(alert.alert_labels) if alert.alert_labels is not None else dict(fire_labels)
        exp["severity"] = alert.severity
        exp.pop("__name__", None)
        value = alert.value_at_eval
        if value is None:
            value = float(alert.fire.split()[-1].split("x")[0].split("+")[0])
        annotations = {
            "summary": alert.summary,
            "description": expand(alert.description, exp, value),
            "runbook_url": alert.runbook_url,
        }
        tests.append(
            {
                "interval": "1m",
                "input_series": [
                    {"series": alert.series, "values": alert.fire},
                    *([{"series": quiet_series, "values": alert.quiet}] if alert.quiet else []),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{minutes}m",
                        "alertname": alert.name,
                        "exp_alerts": [{"exp_labels": exp, "exp_annotations": annotations}],
                    },
                ],
            }
        )
    return {"rule_files": ["../moe-watch.rules.yml"], "evaluation_interval": "1m", "tests": tests}


def operator_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "moe-watch",
            "namespace": "monitoring",
            "labels": {"app.kubernetes.io/name": "moe-watch", "release": "prometheus"},
        },
        "spec": rule_groups(),
    }


def render(data: dict[str, Any], header: str) -> str:
    body = yaml.safe_dump(data, sort_keys=False, width=1000, allow_unicode=True)
    return f"# {header}\n# Generated by `moe-watch rules` from moe_watch/rules.py: edit that, not this file.\n{body}"


def generated_files() -> dict[Path, str]:
    return {
        RULES_FILE: render(rule_groups(), "moe-watch recording and alerting rules"),
        TESTS_FILE: render(
            promtool_tests(),
            "promtool unit tests: `promtool test rules alerts/tests/moe-watch.rules.test.yml`",
        ),
        OPERATOR_FILE: render(operator_manifest(), "moe-watch rules for the Prometheus Operator"),
    }


def write_all(root: Path) -> list[Path]:
    return write_generated(root, generated_files())


def expand(template: str, labels: dict[str, str], value: float) -> str:
    """What Prometheus' template engine makes of our (small) annotation language."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), template)
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
    return number * {"m": 1, "h": 60}[unit]


def with_thresholds(**thresholds: float) -> tuple[Alert, ...]:
    """ALERTS with some thresholds replaced (for site-specific generation)."""
    return tuple(replace(a, threshold=thresholds.get(a.name, a.threshold)) for a in ALERTS)
