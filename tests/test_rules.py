"""The shipped rules: generated from moe_watch/alerting/, valid, unit-tested by promtool, documented."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from moe_watch import thresholds as thresholds_module
from moe_watch.alerting.config import RulesConfig, load_config
from moe_watch.alerting.fixtures import FIXTURES, Fixture
from moe_watch.alerting.promql import RECORDING
from moe_watch.alerting.promtool_tests import promtool_tests
from moe_watch.alerting.rule_file import RULES_FILE, TESTS_FILE, render, rule_groups
from moe_watch.alerting.specs import ALERTS, Alert
from moe_watch.alerting.thresholds_doc import thresholds_doc
from moe_watch.cli import main
from moe_watch.thresholds import DEFAULT, NOTES, Thresholds
from tests.serving.test_exporter_and_server import deepseek_v3_snapshot, snapshot

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, (
        f"{name} not found: install the Debian packages prometheus and prometheus-alertmanager (scripts/test.sh does)"
    )
    return found


def test_promtool_accepts_the_rules_and_every_alert_fires_at_threshold_and_not_below() -> None:
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(ROOT / RULES_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [tool("promtool"), "test", "rules", TESTS_FILE.name],
        cwd=ROOT / TESTS_FILE.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / TESTS_FILE).read_text()))
    assert tested == {alert.name for alert in ALERTS}  # every alert has a test


def test_every_alert_has_exactly_one_fixture_and_the_specs_are_production_data() -> None:
    assert set(FIXTURES) == {alert.name for alert in ALERTS}
    assert len({alert.name for alert in ALERTS}) == len(ALERTS)
    spec_fields = {f.name for f in dataclasses.fields(Alert)}
    assert not spec_fields & {f.name for f in dataclasses.fields(Fixture)}


def test_amtool_accepts_the_alertmanager_example() -> None:
    check = subprocess.run(
        [tool("amtool"), "check-config", str(ROOT / "alerts" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_alert_has_a_runbook_section_and_a_complete_description() -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbooks.splitlines() if line.startswith("## ")}
    for alert in ALERTS:
        assert alert.name.lower() in anchors, f"docs/runbooks.md has no section '## {alert.name}'"
        section = runbooks.split(f"## {alert.name}\n", 1)[1].split("\n## ", 1)[0]
        for heading in ("Meaning", "Confirm", "Act"):
            assert f"**{heading}**" in section, f"{alert.name}: runbook section lacks **{heading}**"
        assert alert.severity in {"critical", "warning", "info"}  # kube-prometheus-stack's names
        assert "{{ $labels." in alert.description or "{{ $value" in alert.description


def test_every_metric_the_rules_read_is_one_the_agent_exports() -> None:
    from moe_watch.serving.exporter import build_registry

    exported = set()
    for snap in (snapshot(), deepseek_v3_snapshot(engine_group="dsv3-group")):
        text = generate_latest(build_registry(lambda snap=snap: snap)).decode()
        for name, kind in re.findall(r"^# TYPE (\w+) (\w+)", text, re.MULTILINE):
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("", "_total")
            exported |= {name + suffix for suffix in suffixes}
    rules = [rule for group in rule_groups()["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert {name for name, _ in RECORDING} <= recorded
    expressions = [alert.expr for alert in ALERTS] + [rule["expr"] for rule in rules]
    for expr in expressions:
        for name in re.findall(r"\b(moe_watch[:_][a-z0-9_:]+)", expr):
            assert name in exported or name in recorded, f"{name} is not exported by the agent"


def promtool_test(tmp_path: Path, groups: dict[str, object], tests: dict[str, object]) -> str:
    """Run `promtool test rules` on a rule file and tests; return its output (rc 0 or not)."""
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "moe-watch.rules.yml").write_text(render(groups, "test"))
    (tmp_path / "rules" / "t.yml").write_text(render(tests, "test"))
    run = subprocess.run(
        [tool("promtool"), "test", "rules", "t.yml"],
        cwd=tmp_path / "rules",
        capture_output=True,
        text=True,
        check=False,
    )
    return ("SUCCESS " if run.returncode == 0 else "FAILED ") + run.stdout + run.stderr


# The expressions these rules had before contract v1: each defect test must fail on them.
OLD_EXPRESSIONS = {
    "MoEGPUXidErrors": "increase(moe_watch_gpu_xid_errors_total[15m]) > 0",
    "moe_watch:autoscale_up:bool": '(max by (engine) (moe_watch_requests_waiting) > bool 10) or on(engine) (max by (engine) (moe_watch_latency_seconds{kind="e2e",quantile="0.95"}) > bool 2) or on(engine) (min_over_time(moe_watch:engine_gpu_utilization:avg[5m]) > bool 0.9)',
    "moe_watch:autoscale_down:bool": "max_over_time(moe_watch:engine_gpu_utilization:avg[15m]) < bool 0.3",
}


def test_the_defect_tests_fail_on_the_expressions_the_rules_used_to_have(tmp_path: Path) -> None:
    """First Xid from a missing sample, and autoscale on a short queue with a high P95: the
    promtool tests pass on the shipped rules and fail on the old ones, so they can fail."""
    defects = promtool_tests()
    defects["tests"] = [
        t
        for t in defects["tests"]
        if 'xid="48"' in str(t) or ("promql_expr_test" in t and "ALERTS" not in str(t))
    ]
    assert len(defects["tests"]) == 3
    assert promtool_test(tmp_path, rule_groups(), defects).startswith("SUCCESS")
    old = rule_groups()
    for group in old["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            rule["expr"] = OLD_EXPRESSIONS.get(name, rule["expr"])
    output = promtool_test(tmp_path, old, defects)
    assert output.startswith("FAILED"), output
    assert "MoEGPUXidErrors, time: 12m" in output  # the first Xid did not alert
    assert "moe_watch:autoscale_up:bool" in output  # high P95 with a short queue held at 0
    assert "moe_watch:autoscale_down:bool" in output  # idle GPUs with a queue scaled down


def test_a_site_generates_rules_for_its_stack_without_editing_code(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "thresholds.expert_skew=0.65",
            "alerts.MoEGPUUtilizationLow.enabled=false",
            "alerts.MoEQueueLong.for=15m",
            "alerts.MoEQueueLong.severity=critical",
            'job_selector=job="gpu-agents"',
            "cluster_label=k8s_cluster",
            "runbook_base_url=https://wiki.example.com/moe",
            "severity_names.critical=page",
            "additional_labels.team=ml-infra",
            "scrape_interval=30s",
        ],
    )
    rules = {
        r.get("alert") or r["record"]: r for g in rule_groups(config)["groups"] for r in g["rules"]
    }
    assert (
        rules["MoEExpertSkewHigh"]["expr"]
        == "max without (pod, instance) (moe_watch:expert_skew_ratio > 0.65)"
    )
    # 8 scrape intervals of 30 s: an agent restart's gap; none on the alerts about the agent
    assert rules["MoEExpertSkewHigh"]["keep_firing_for"] == "4m"
    assert "keep_firing_for" not in rules["MoEWatchDown"]
    assert rules["MoEExpertSkewHigh"]["labels"] == {"severity": "page", "team": "ml-infra"}
    assert (
        rules["MoEExpertSkewHigh"]["annotations"]["runbook_url"]
        == "https://wiki.example.com/moe#moeexpertskewhigh"
    )
    assert "MoEGPUUtilizationLow" not in rules
    assert (rules["MoEQueueLong"]["for"], rules["MoEQueueLong"]["labels"]["severity"]) == (
        "15m",
        "page",
    )
    assert (
        rules["MoEWatchDown"]["expr"] == 'max without (pod, instance) (up{job="gpu-agents"} == 0)'
    )
    assert "by (k8s_cluster, engine)" in rules["moe_watch:autoscale_up:bool"]["expr"]
    assert (
        "by (k8s_cluster, engine_group, layer)"
        in rules["moe_watch:expert_group_skew_ratio"]["expr"]
    )
    # the generated promtool tests follow the overrides and pass against the generated rules
    output = promtool_test(tmp_path, rule_groups(config), promtool_tests(config))
    assert output.startswith("SUCCESS"), output


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("thresholds.expert_skw=0.6", "unknown threshold 'expert_skw'"),
        ("thresholds.expert_skew=high", "thresholds: threshold 'expert_skew' must be a number"),
        ("alerts.MoENope.enabled=false", "unknown alert(s) MoENope"),
        ("alerts.MoEQueueLong.for=5 minutes", "alerts.MoEQueueLong.for: not a duration"),
        ("severity_names.fatal=p1", "severity_names.fatal: Input should be 'critical'"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_a_bad_override_is_one_clear_line(assignment: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [assignment])


def test_rules_cli_prints_a_prometheusrule_with_overrides_and_exits_2_on_a_bad_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["rules", "--print", "prometheusrule", "--set", "thresholds.vram_used=0.9"]) == 0
    out = capsys.readouterr().out
    assert "kind: PrometheusRule" in out
    assert "(moe_watch_gpu_memory_used_ratio > 0.9)\n" in out
    assert main(["rules", "--print", "rules", "--set", "thresholds.nope=1"]) == 2
    assert "unknown threshold 'nope'" in capsys.readouterr().err


def test_defaults_are_the_thresholds_module() -> None:
    assert RulesConfig().limits.expert_skew == 0.5


def test_every_threshold_has_a_meaning_one_source_and_a_default_in_its_range() -> None:
    assert set(NOTES) == {f.name for f in dataclasses.fields(Thresholds)}
    for name, note in NOTES.items():
        assert note.meaning, name
        assert bool(note.design) != bool(note.ours), name  # a design row or our reason
        low, high = note.range
        assert low <= getattr(DEFAULT, name) <= high, name
    with pytest.raises(ValueError, match="exactly one of design and ours"):

        @dataclasses.dataclass
        class Unsourced:
            x: float = thresholds_module._t(1.0, "ratio", "a number from nowhere")


def test_the_thresholds_doc_is_the_table_one_row_per_threshold() -> None:
    doc = thresholds_doc(DEFAULT.replaced({"expert_skew": 0.625}))
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    assert len(rows) == len(NOTES)
    for row, (name, note) in zip(rows, NOTES.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == f"`{name}`"
        assert cells[4] == note.meaning
        assert (note.design or note.ours) in cells[5]
        assert cells[5].startswith("[design](design.md#") == bool(note.design)
    assert "| `expert_skew` | 0.625 | 0 - 10000 | MoEExpertSkewHigh |" in doc
    assert "../" not in doc  # no path outside the repository


# Forecasts as one would first write them: the last sample over a 10-minute slope, any rise.
NAIVE_FORECASTS = {
    "moe_watch:kv_cache_full:seconds": "(1 - moe_watch_kv_cache_usage_ratio)"
    " / (deriv(moe_watch_kv_cache_usage_ratio[10m]) > 0)",
    "moe_watch:gpu_budget_exhausted:seconds": "(moe_watch_sized_budget_bytes - ignoring(gpu)"
    ' group_right() moe_watch_gpu_memory_used_bytes{engine!=""})'
    ' / (deriv(moe_watch_gpu_memory_used_bytes{engine!=""}[10m]) > 0)',
}


def test_forecasts_page_on_a_steady_rise_and_not_on_noise_and_a_naive_fit_would(
    tmp_path: Path,
) -> None:
    """The noisy-but-flat promtool tests pass on the shipped forecasts (long least-squares
    window, minimum slope, half a window of history, `for:`) and fail on a naive forecast, so
    they can fail; the steadily rising ones fire."""
    forecasts = promtool_tests()
    forecasts["tests"] = [t for t in forecasts["tests"] if "ALERTS{" in str(t)]
    assert len(forecasts["tests"]) == 4  # flat and rising, for the KV cache and the budget
    assert promtool_test(tmp_path, rule_groups(), forecasts).startswith("SUCCESS")
    naive = rule_groups()
    for group in naive["groups"]:
        for rule in group["rules"]:
            rule["expr"] = NAIVE_FORECASTS.get(rule.get("record", ""), rule["expr"])
    output = promtool_test(tmp_path, naive, forecasts)
    assert output.startswith("FAILED"), output
    for name in ("MoEKVCacheFullSoon", "MoEGPUBudgetExhaustedSoon"):  # noise paged
        assert f'count_over_time(ALERTS{{alertname=\\"{name}\\"' in output, output


def test_forecast_rules_read_the_thresholds() -> None:
    config = load_config(
        None,
        [
            "thresholds.kv_cache_forecast_window_seconds=2700",
            "thresholds.kv_cache_forecast_min_rise_per_hour=0.2",
            "thresholds.kv_cache_full_seconds=600",
            "thresholds.budget_forecast_window_seconds=5400.5",
        ],
    )
    rules = {
        r.get("alert") or r["record"]: r for g in rule_groups(config)["groups"] for r in g["rules"]
    }
    kv = rules["moe_watch:kv_cache_full:seconds"]["expr"]
    assert "deriv(moe_watch_kv_cache_usage_ratio[2700s]) > 0.2 / 3600" in kv
    assert "predict_linear(moe_watch_kv_cache_usage_ratio[2700s], 0)" in kv
    assert "offset 1350s" in kv
    assert "[5400500ms]" in rules["moe_watch:gpu_budget_exhausted:seconds"]["expr"]
    assert "(moe_watch:kv_cache_full:seconds < 600)" in rules["MoEKVCacheFullSoon"]["expr"]
    output = promtool_test_in_tmp(config)
    assert output.startswith("SUCCESS"), output


def promtool_test_in_tmp(config: RulesConfig) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        return promtool_test(Path(directory), rule_groups(config), promtool_tests(config))


# Every threshold and every alert's `for:` overridden to a value no default has: a number in an
# annotation that was written by hand, not generated from them, shows as one none of them makes.
UNUSUAL_THRESHOLDS = {
    name: round(getattr(DEFAULT, name) * 0.83 + 0.0011 * (i + 1), 4) for i, name in enumerate(NOTES)
}
UNUSUAL_FOR = {alert.name: f"{41 + i}m" for i, alert in enumerate(ALERTS)}
# Numbers that are definitions, not thresholds.
DEFINITIONS = ("max/mean - 1",)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def unusual_config() -> RulesConfig:
    assignments = [f"thresholds.{name}={value}" for name, value in UNUSUAL_THRESHOLDS.items()]
    assignments += [f"alerts.{name}.for={duration}" for name, duration in UNUSUAL_FOR.items()]
    return load_config(None, assignments)


def readable_numbers(text: str) -> list[float]:
    """The numbers a reader sees in an annotation: Go template actions (values read when the
    notification is sent) and definitions left out."""
    text = re.sub(r"\{\{.*?\}\}", " ", text)
    for phrase in DEFINITIONS:
        text = text.replace(phrase, " ")
    return [float(n) for n in NUMBER.findall(text)]


def allowed_numbers(config: RulesConfig, rule: dict[str, object]) -> list[float]:
    """Every way a text may spell a threshold (as is, in percent, 1 - x in percent, in ms, in
    minutes or hours), the alert's `for:` (seconds, minutes, hours) and its expression's numbers."""
    out: list[float] = []
    for name in NOTES:
        v = getattr(config.limits, name)
        out += [v, v * 100, (1 - v) * 100, v * 1000, v / 60, v / 3600]
    minutes = float(str(rule["for"]).removesuffix("m"))
    out += [minutes * 60, minutes, minutes / 60]
    return out + [float(n) for n in NUMBER.findall(str(rule["expr"]))]


def test_unusual_overrides_are_in_range_and_distinct() -> None:
    assert len(set(UNUSUAL_THRESHOLDS.values())) == len(UNUSUAL_THRESHOLDS)
    limits = unusual_config().limits
    for name, value in UNUSUAL_THRESHOLDS.items():
        assert getattr(limits, name) == value != getattr(DEFAULT, name)


def test_every_number_in_every_annotation_follows_the_overridden_thresholds() -> None:
    config = unusual_config()
    alerts = [r for g in rule_groups(config)["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) == len(ALERTS)
    wrong = []
    for rule in alerts:
        allowed = allowed_numbers(config, rule)
        for key, text in rule["annotations"].items():
            for number in readable_numbers(text):
                if not any(abs(number - a) <= 1e-5 * max(1.0, abs(a)) for a in allowed):
                    wrong.append(f"{rule['alert']} {key}: {number:g} in {text!r}")
    assert not wrong, "\n".join(wrong)


def test_prometheus_renders_the_overridden_annotations_as_the_generated_tests_expect(
    tmp_path: Path,
) -> None:
    """promtool renders each alert's annotations with Prometheus' own template engine and
    compares them with the generated expectations, under every threshold overridden."""
    config = load_config(None, [f"thresholds.{k}={v}" for k, v in UNUSUAL_THRESHOLDS.items()])
    output = promtool_test(tmp_path, rule_groups(config), promtool_tests(config))
    assert output.startswith("SUCCESS"), output


def test_rules_cli_says_the_overridden_number(capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [
        "thresholds.expert_skew=0.7",
        "thresholds.vram_used=0.9",
        "thresholds.e2e_p95_seconds=12",
    ]
    overrides += ["thresholds.requests_waiting=40", "alerts.MoEGPUUtilizationLow.for=45m"]
    assert main(["rules", "--print", "rules", *(f"--set={o}" for o in overrides)]) == 0
    out = capsys.readouterr().out
    assert "summary: Expert load skewed > 70 % in one MoE layer\n" in out
    assert "summary: GPU memory above 90 %\n" in out
    assert "summary: P95 end-to-end latency above 12 s\n" in out
    assert "More than 40 requests waiting: scale out" in out
    assert "for 45 minutes\n" in out
    assert "50 %" not in out
