"""The rule files, by path relative to the repository root: what `moe-watch rules` writes
for a site, and `moe-watch generate` with the defaults."""

from __future__ import annotations

from pathlib import Path

from moe_watch.alerting.config import RulesConfig
from moe_watch.alerting.promtool_tests import promtool_tests
from moe_watch.alerting.rule_file import (
    OPERATOR_FILE,
    RULES_FILE,
    TESTS_FILE,
    operator_manifest,
    render,
    rule_groups,
)


def rule_files(config: RulesConfig | None = None) -> dict[Path, str]:
    """The rules, their promtool tests and the PrometheusRule: what `moe-watch rules` writes."""
    return {
        RULES_FILE: render(rule_groups(config), "moe-watch recording and alerting rules"),
        TESTS_FILE: render(
            promtool_tests(config),
            "promtool unit tests: `promtool test rules alerts/tests/moe-watch.rules.test.yml`",
        ),
        OPERATOR_FILE: render(
            operator_manifest(config), "moe-watch rules for the Prometheus Operator"
        ),
    }
