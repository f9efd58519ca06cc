"""The shipped rules: generated from moe_watch/rules.py, valid, unit-tested by promtool, documented."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import generate_latest

from moe_watch.rules import ALERTS, RECORDING, RULES_FILE, TESTS_FILE, generated_files
from tests.test_exporter_and_server import deepseek_v3_snapshot, snapshot

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, (
        f"{name} not found: install the Debian packages prometheus and prometheus-alertmanager (scripts/test.sh does)"
    )
    return found


def test_committed_rule_files_are_what_the_generator_writes() -> None:
    for relative, text in generated_files().items():
        committed = (ROOT / relative).read_text()
        assert committed == text, f"{relative} is stale: run `moe-watch rules --out .` and commit"


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
    tested = re.findall(r"alertname: (\w+)", (ROOT / TESTS_FILE).read_text())
    assert sorted(tested) == sorted(alert.name for alert in ALERTS)  # one test per alert


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
        assert alert.severity in {"page", "warning", "info"}
        assert "{{ $labels." in alert.description or "{{ $value" in alert.description


def test_every_metric_the_rules_read_is_one_the_agent_exports() -> None:
    from moe_watch.exporter import build_registry

    exported = set()
    for snap in (snapshot(), deepseek_v3_snapshot()):
        text = generate_latest(build_registry(lambda snap=snap: snap)).decode()
        exported |= set(re.findall(r"^# TYPE (\w+)", text, re.MULTILINE))
    exported |= {name + "_total" for name in exported}
    recorded = {name for name, _ in RECORDING}
    expressions = [alert.expr for alert in ALERTS] + [expr for _, expr in RECORDING]
    for expr in expressions:
        for name in re.findall(r"\b(moe_watch[:_][a-z_:]+)", expr):
            assert name in exported or name in recorded, f"{name} is not exported by the agent"
