"""The rule file: recording and alerting rule groups, as Prometheus reads them and as the
Prometheus Operator's PrometheusRule carries them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_watch.alerting.config import RulesConfig
from moe_watch.alerting.promql import (
    RECORDING,
    about_the_watched,
    expert_group_rules,
    expression,
    forecast_rules,
    unified_expert_rules,
)
from moe_watch.alerting.specs import ALERTS, XID_WINDOW, Alert
from moe_watch.alerting.syntax import parse_duration
from moe_watch.alerting.texts import eplb_whatif_template, fill

RULES_FILE = Path("alerts/moe-watch.rules.yml")
TESTS_FILE = Path("alerts/tests/moe-watch.rules.test.yml")
OPERATOR_FILE = Path("charts/moe-watch/files/prometheusrule.yaml")  # the Helm chart ships it


def runbook(alert: Alert, config: RulesConfig) -> str:
    return f"{config.runbook_base_url}#{alert.name.lower()}"


def text_values(alert: Alert, config: RulesConfig) -> dict[str, float]:
    """What an alert's texts may quote (texts.fill): every threshold as the site set it, the
    alert's own as ``t``, its `for:` in seconds as ``for``."""
    limits = config.limits
    values = {name: getattr(limits, name) for name in type(limits).__dataclass_fields__}
    values |= {"for": parse_duration(config.for_(alert)), "xid_window": parse_duration(XID_WINDOW)}
    return values | ({"t": values[alert.threshold]} if alert.threshold else {})


def alert_annotations(alert: Alert, config: RulesConfig) -> dict[str, str]:
    """All of an alert's annotations as templates (the rule file), their numbers filled in from
    the values the expression reads."""
    values = text_values(alert, config)
    templates = {
        "summary": fill(alert.summary, values),
        "description": fill(alert.description, values),
        "runbook_url": runbook(alert, config),
        **{key: fill(text, values) for key, text in alert.annotations},
    }
    if alert.whatif:
        templates["eplb_whatif"] = eplb_whatif_template(config.limits.eplb_whatif_target)
    return templates


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
            "expr": about_the_watched(expression(alert.expr, config, alert.threshold)),
            "for": for_override or config.for_(alert),
            **({"keep_firing_for": k} if (k := config.keep_firing_for(alert)) else {}),
            "labels": {"severity": config.severity(alert), **config.additional_labels},
            "annotations": alert_annotations(alert, config),
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
                "rules": [{"record": r, "expr": expression(e, config)} for r, e in RECORDING],
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
    return f"# {header}\n# Generated from moe_watch/alerting/ by `moe-watch generate` (a site's overrides: `moe-watch rules`): edit that, not this file.\n{body}"
