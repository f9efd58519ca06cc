"""promtool unit tests of the rules (alerts/tests/moe-watch.rules.test.yml), from the fixtures.

Every alert fires at its threshold after `for:` and stays silent just short of it; one test per
way these rules once failed to page; the forecasts page on a steady rise and not on noise. The
tests follow a site's overrides, so `promtool test rules` on a site's output checks its numbers.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from typing import Any

from moe_watch.alerting.config import RulesConfig
from moe_watch.alerting.fixtures import ENGINE, FIXTURES, Fixture
from moe_watch.alerting.rule_file import RULES_FILE, alert_annotations, text_values
from moe_watch.alerting.specs import ALERTS, FORECAST_ALERTS, WATCHER_LABELS, Alert
from moe_watch.alerting.syntax import parse_matchers, unescape
from moe_watch.alerting.texts import NO_WHATIF, expand, fill
from moe_watch.drift import SETTINGS


def _expected_annotations(
    alert: Alert,
    config: RulesConfig,
    labels: dict[str, str],
    value: float,
    hottest: str,
    whatif: str,
) -> dict[str, str]:
    """All of an alert's annotations as promtool must see them rendered."""
    templates = alert_annotations(alert, config)
    expected = {k: expand(v, labels, value, hottest) for k, v in templates.items()}
    if alert.whatif:
        expected["eplb_whatif"] = fill(whatif, text_values(alert, config))
    return expected


def _v(value: float, minutes: int = 60) -> str:
    return f"{value:g}x{minutes}"


def _op(alert: Alert) -> str:
    """How the alert compares its value with the threshold: ">" or "<"."""
    found = re.search(r"([<>]) \$t\b", alert.expr)
    assert found, f"{alert.name}: no comparison with $t"
    return found[1]


def _fire_and_quiet(alert: Alert, fixture: Fixture, config: RulesConfig) -> tuple[str, str]:
    if fixture.fire is not None and fixture.quiet is not None:
        return fixture.fire, fixture.quiet
    t = getattr(config.limits, alert.threshold)
    step = max(abs(t) * 0.1, 0.01)
    above, below = _v(round(t + step, 6)), _v(round(t - step, 6))
    return (above, below) if _op(alert) == ">" else (below, above)


def _job_equalities(config: RulesConfig) -> list[tuple[str, str]]:
    """The job selector's equality matchers (name, value as written)."""
    return [(name, value) for name, op, value in parse_matchers(config.job_selector) if op == "="]


def _job_labels(config: RulesConfig) -> str:
    """A label set the job selector matches (its equality matchers; a regex gets 'moe-watch')."""
    return ",".join(f'{k}="{v}"' for k, v in _job_equalities(config)) or 'job="moe-watch"'


# What a cluster's scrape puts on the agent's series (the Prometheus Operator's target labels and
# the ServiceMonitor's node); the alerts must keep the node and drop the rest (WATCHER_LABELS).
AGENT_TARGET = {"instance": "10.0.0.5:9400", "node": "gpu-node-a", "pod": "moe-watch-4xk9p"}


def _scraped(series: str, target: dict[str, str] = AGENT_TARGET) -> str:
    """``series`` with the agent's target labels it lacks; another job's series as it is."""
    if 'job="' in series:  # the fixtures name a job only for another exporter's series
        return series
    for key, value in target.items():
        if not re.search(rf"[{{,]{key}=", series):
            series = _with_label(series, key, value)
    return series


def histogram_series(
    bucket: str, bounds: tuple[float, ...], per_minute: tuple[float, ...]
) -> list[dict[str, str]]:
    """promtool input series of one cumulative histogram: ``bucket`` is the _bucket series
    without `le`; each bound's counter rises by ``per_minute`` (the last: the +Inf bucket)."""
    les = [f"{b:g}" for b in bounds] + ["+Inf"]
    return [
        {"series": _with_label(bucket, "le", le), "values": f"0+{rise:g}x60"}
        for le, rise in zip(les, per_minute, strict=True)
    ]


def _histogram_test(fixture: Fixture, t: float) -> tuple[list[dict[str, str]], float]:
    """Buckets at t and 2t: every request of the firing engine between them (P95 = 1.95 t),
    every request of a quiet one (another model) below t (P95 = 0.95 t)."""
    firing = _scraped(fixture.series)
    quiet = firing.replace('model="mixtral"', 'model="quiet"')
    series = histogram_series(firing, (t, 2 * t), (0, 60, 60))
    series += histogram_series(quiet, (t, 2 * t), (60, 60, 60))
    return series, t + t * 0.95


def _alert_test(alert: Alert, fixture: Fixture, config: RulesConfig) -> dict[str, Any]:
    if fixture.histogram:
        return _alert_histogram_test(alert, fixture, config)
    fire, quiet = _fire_and_quiet(alert, fixture, config)
    series = _scraped(fixture.series).replace("$job", _job_labels(config))
    minutes = fixture.eval_minutes or _minutes(config.for_(alert)) + 2
    # absent() makes its own labels: the job selector's equality matchers
    exp = (
        {name: unescape(value) for name, value in _job_equalities(config)}
        if alert.expr.startswith("absent(")
        else _labels(series)
    )
    exp["severity"] = config.severity(alert)
    exp |= config.additional_labels
    for label in ("__name__", *WATCHER_LABELS):
        exp.pop(label, None)
    value = fixture.value_at_eval
    if value is None:
        value = float(fire.split()[-1].split("x")[0].split("+")[0])
    annotations = _expected_annotations(
        alert, config, exp, value, fixture.hottest, fixture.whatif_rendered
    )
    return {
        "interval": "1m",
        "input_series": [
            {"series": series, "values": fire},
            *([{"series": _with_label(series, "case", "quiet"), "values": quiet}] if quiet else []),
            *({"series": _scraped(s), "values": v} for s, v in fixture.extra_series),
        ],
        "alert_rule_test": [
            {
                "eval_time": f"{minutes}m",
                "alertname": alert.name,
                "exp_alerts": [{"exp_labels": exp, "exp_annotations": annotations}],
            },
        ],
    }


def _alert_histogram_test(alert: Alert, fixture: Fixture, config: RulesConfig) -> dict[str, Any]:
    series, value = _histogram_test(fixture, getattr(config.limits, alert.threshold))
    exp = _labels(_scraped(fixture.series))
    for label in ("__name__", *WATCHER_LABELS):
        exp.pop(label)
    exp["severity"] = config.severity(alert)
    exp |= config.additional_labels
    annotations = _expected_annotations(
        alert, config, exp, value, fixture.hottest, fixture.whatif_rendered
    )
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {
                "eval_time": f"{_minutes(config.for_(alert)) + 7}m",  # the 5m rate, then for:
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

    p95_bounds = (
        config.limits.autoscale_up_p95_seconds,
        5 * config.limits.autoscale_up_p95_seconds,
    )
    flipping = " ".join(["5x3", "2x3"] * 6)  # the hottest expert alternates every 4 minutes
    old_pod = _scraped('moe_watch_expert_skew_ratio{engine="mixtral-0",layer="3"}')
    new_pod = _scraped(
        'moe_watch_expert_skew_ratio{engine="mixtral-0",layer="3"}',
        {"instance": "10.0.0.9:9400", "node": "gpu-node-a", "pod": "moe-watch-7dq2n"},
    )
    rolled = skew | {"node": "gpu-node-a"}
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
        {  # The agent pod of the skewed node is replaced (new name and address) while the alert
           # fires, its series missing for one evaluation: the same alert, still firing, `for:`
           # not restarted (it would be pending until minute 32).
            "interval": "1m",
            "input_series": [
                {"series": old_pod, "values": "0.8x20 stale"},
                {"series": new_pod, "values": "_x22 0.8x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "MoEExpertSkewHigh", "exp_alerts": [expected(skew_alert, rolled, 0.8)]},
                {"eval_time": "21m", "alertname": "MoEExpertSkewHigh", "exp_alerts": [expected(skew_alert, rolled, 0.8)]},
                {"eval_time": "25m", "alertname": "MoEExpertSkewHigh", "exp_alerts": [expected(skew_alert, rolled, 0.8)]},
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
        {  # Autoscale up on a short queue but a high P95 (4.8 x the threshold), and on hot GPUs;
           # hold when all is calm (P95 0.95 x the threshold).
            "interval": "1m",
            "input_series": [
                {"series": 'moe_watch_requests_waiting{engine="slow",model="m"}', "values": "2x20"},
                *histogram_series('moe_watch_e2e_request_latency_seconds_bucket{engine="slow",model="m"}', p95_bounds, (0, 60, 60)),
                {"series": 'moe_watch_gpu_utilization_ratio{engine="slow",gpu="0"}', "values": "0.5x20"},
                {"series": 'moe_watch_requests_waiting{engine="hot",model="m"}', "values": "0x20"},
                *histogram_series('moe_watch_e2e_request_latency_seconds_bucket{engine="hot",model="m"}', p95_bounds, (60, 60, 60)),
                {"series": 'moe_watch_gpu_utilization_ratio{engine="hot",gpu="0"}', "values": "0.95x20"},
                {"series": 'moe_watch_requests_waiting{engine="calm",model="m"}', "values": "1x20"},
                *histogram_series('moe_watch_e2e_request_latency_seconds_bucket{engine="calm",model="m"}', p95_bounds, (60, 60, 60)),
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


def _drift_tests(config: RulesConfig) -> list[dict[str, Any]]:
    """MoEConfigDrift is every drift rule's alert: it fires for each setting drift.py checks
    (the KV cache holding less than its plan needs among them) and not for one checked and fine."""
    alert = next(a for a in ALERTS if a.name == "MoEConfigDrift")
    minutes = _minutes(config.for_(alert)) + 2
    fired = []
    for setting in SETTINGS:
        labels = {"engine": "mixtral-0", "setting": setting, "severity": config.severity(alert)}
        labels |= config.additional_labels
        annotations = _expected_annotations(alert, config, labels, 1.0, "", NO_WHATIF)
        fired.append({"exp_labels": labels, "exp_annotations": annotations})
    return [
        {
            "interval": "1m",
            "input_series": [
                *(
                    {"series": f'moe_watch_config_drift{{{ENGINE},setting="{setting}"}}', "values": "1x60"}
                    for setting in SETTINGS
                ),
                {"series": 'moe_watch_config_drift{engine="fine",setting="kv_cache_tokens"}', "values": "0x60"},
            ],
            "alert_rule_test": [
                {"eval_time": f"{minutes}m", "alertname": alert.name, "exp_alerts": fired},
            ],
        }
    ]  # fmt: skip


def _number(value: float) -> str:
    return f"{value:.15g}"


def forecast_fixture(alert: Alert, fixture: Fixture, config: RulesConfig) -> Fixture:
    """A forecast alert's standard test from the thresholds: a straight line that reaches the
    limit at minute F, evaluated one minute before (forecast: 60 s), after half a window of
    history and `for:`; the quiet case is flat. Other alerts' fixtures pass through unchanged."""
    t = config.limits
    if alert not in FORECAST_ALERTS:
        return fixture
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
        fixture,
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
        _alert_test(alert, forecast_fixture(alert, FIXTURES[alert.name], config), config)
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
    tests += (
        _drift_tests(config)
        if any(a.name == "MoEConfigDrift" for a in ALERTS if config.enabled(a))
        else []
    )
    return {"rule_files": [f"../{RULES_FILE.name}"], "evaluation_interval": "1m", "tests": tests}


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
