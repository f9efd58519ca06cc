"""What a site may change without editing code, and how `moe-watch rules --config/--set` reads it.

A RulesConfig holds the site's thresholds (over moe_watch/thresholds.py), per-alert switches,
the selector of the agents' scrape job, label names and texts (docs/alerts.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_watch.alerting.specs import ALERTS, Alert, Severity
from moe_watch.thresholds import DEFAULT, Thresholds

DURATION = r"^[0-9]+[smh]$"


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
