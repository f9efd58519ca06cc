"""A site's rules config (`moe-watch rules --config/--set`), validated like the agent's settings:
one line and exit 2 on anything out of range, values that go into PromQL parsed as what they
are, and nothing written that promtool rejects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_watch.alerting.config import load_config
from moe_watch.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        # label matchers: only a list of matchers, never a way out of the braces
        ('job_selector=job="x"} or vector(1) or up{job="y"', "job_selector: not label matchers"),
        ('job_selector=job="x",', "job_selector: not label matchers"),
        ("job_selector=job=x", "job_selector: not label matchers"),
        ("job_selector=", "job_selector: not label matchers"),
        ('job_selector=job=~"(unclosed"', "job_selector: not a regular expression"),
        ('job_selector=job="a\\qb"', "job_selector: not label matchers"),
        # durations: parsed and bounded
        ("alerts.MoEQueueLong.for=99999999999h", "alerts.MoEQueueLong.for: at most 1d"),
        ("alerts.MoEQueueLong.for=5 minutes", "alerts.MoEQueueLong.for: not a duration"),
        ("interval=0s", "interval: at least 1s"),
        ("interval=2h", "interval: at most 1h"),
        ("interval=30", "interval: not a duration"),
        # numbers: finite, of the right kind, in range
        ("thresholds.expert_skew=true", "threshold 'expert_skew' must be a number, got True"),
        ("thresholds.expert_skew=-0.5", "threshold 'expert_skew' must be within 0..10000"),
        ("thresholds.vram_used=1.5", "threshold 'vram_used' must be within 0..1"),
        ("thresholds.expert_skew=.nan", "threshold 'expert_skew' must be a finite number"),
        ("thresholds.expert_skew=1e400", "threshold 'expert_skew' must be a finite number"),
        ("thresholds.expert_skew=" + "9" * 5000, "must be a number"),
        ("thresholds.kv_cache_forecast_window_seconds=0", "must be within 0.001..604800"),
        ("expert_group_load_ranks=true", "expert_group_load_ranks: Input should be a valid integer"),
        ("expert_group_load_ranks=65", "expert_group_load_ranks: Input should be less than or equal to 64"),
        # texts and labels: no template actions, bounded, label names that are label names
        ("runbook_base_url=https://wiki/{{ .Foo }}", "runbook_base_url: an http(s) URL"),
        ("runbook_base_url=ftp://wiki", "runbook_base_url: an http(s) URL"),
        ("additional_labels.__name__=x", "additional_labels: '__name__' is not a label a site may add"),
        ("additional_labels.severity=x", "additional_labels: 'severity' is not a label a site may add"),
        ("additional_labels.team=" + "x" * 2000, "additional_labels: the value of 'team' is longer than 1024"),
        ("additional_labels.team={{ $value }}", "additional_labels: the value of 'team' has a template action"),
        ("severity_names.critical=", "severity_names: the name for 'critical' is empty"),
        ("cluster_label=__cluster", "cluster_label: String should match pattern"),
    ],
    ids=lambda value: value[:40],
)  # fmt: skip
def test_a_value_out_of_range_or_not_what_it_claims_is_one_clear_line(
    assignment: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [assignment])
    assert main(["rules", "--print", "rules", "--set", assignment]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1, captured.err
    assert len(captured.err) < 400


def test_matchers_and_durations_a_site_needs_still_work() -> None:
    config = load_config(
        None,
        [
            'job_selector=job=~"moe-watch|gpu-agents", namespace!="test" , env="a\\"b\\\\c"',
            "alerts.MoEQueueLong.for=1h30m",
            "alerts.MoEGPULost.for=0s",
            "interval=1m",
            "thresholds.expert_skew=1e-1",
        ],
    )
    assert config.job_selector == 'job=~"moe-watch|gpu-agents",namespace!="test",env="a\\"b\\\\c"'
    assert (
        config.for_(
            next(
                a
                for a in __import__("moe_watch.alerting.specs").alerting.specs.ALERTS
                if a.name == "MoEQueueLong"
            )
        )
        == "1h30m"
    )
    assert config.limits.expert_skew == 0.1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- b\n", "must be a mapping"),
        ("[" * 100_000 + "]" * 100_000, "cannot read rules config"),
        ("thresholds: {expert_skew: " + "9" * 5000 + "}\n", "cannot read rules config"),
        ("a: b: c\n", "cannot read rules config"),
        ("x" * (2 << 20), "larger than 1 MiB"),
    ],
    ids=["array", "deep", "digits", "yaml", "huge"],
)
def test_a_bad_config_file_is_one_line_and_exit_2(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site-rules.yaml"
    path.write_text(content)
    assert main(["rules", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_rules_refuses_to_write_what_promtool_rejects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule file promtool rejects (here an expression broken inside the generator, which no
    input can reach now) is neither written nor printed."""
    from moe_watch.alerting import rule_file

    broken = rule_file.ALERTS[0].__class__(
        name="MoEBroken", expr="sum(", for_="1m", severity="warning", summary="s", description="d"
    )
    monkeypatch.setattr(rule_file, "ALERTS", (*rule_file.ALERTS, broken))
    assert main(["rules", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "promtool rejects the rules" in err
    assert "MoEBroken" in err
    assert len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
    assert main(["rules", "--print", "rules"]) == 2
    assert capsys.readouterr().out == ""


def test_without_promtool_rules_are_written_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no promtool there
    assert main(["rules", "--print", "rules"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# moe-watch recording and alerting rules")
    assert captured.err == "moe-watch: promtool not on PATH: the rules were not checked\n"
