"""What a site may change without editing code, and how `moe-watch rules --config/--set` reads it.

A RulesConfig holds the site's thresholds (over moe_watch/thresholds.py), per-alert switches,
the selector of the agents' scrape job, label names and texts (docs/alerts.md). Everything a
site sets is checked like the agent's settings: a value that goes into PromQL is parsed as what
it is (matchers, durations, finite numbers within their range), a text that goes into a template
has no template action, and anything else is refused with one line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_watch.alerting.specs import ALERTS, Alert, Severity
from moe_watch.alerting.syntax import LABEL_NAME, parse_duration, parse_matchers, render_matchers
from moe_watch.thresholds import DEFAULT, Thresholds

MAX_CONFIG_BYTES = 1 << 20
MAX_TEXT = 1024  # a label value or a severity name
MAX_URL = 2048
# Labels an alert already has, or that Prometheus reserves: a site's label must not replace them.
RESERVED_LABELS = {"alertname", "severity"}
# How long an alert on the agent's series keeps firing after they vanish, in scrape intervals.
# A restarted or replaced agent leaves a gap from the old pod's last scrape to the new pod's
# first: termination, the new container's start and readiness (its probe runs every 5 s), the
# endpoints and service-discovery update, up to one scrape interval to the first scrape and one
# rule evaluation to see it. With the shipped 15 s scrape and 30 s evaluation that is about
# 75 s; 8 scrape intervals (2 minutes at 15 s) cover it with room for a slow start, and delay a
# real resolve by no more than that.
RESTART_GAP_SCRAPES = 8


def _duration(text: Any, low: str, high: str) -> str:
    """``text`` if it is a Prometheus duration within [low, high], else a ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"not a duration: {_line(repr(text), 40)} (e.g. 30s, 5m, 1h30m)")
    seconds = parse_duration(text)
    if seconds < parse_duration(low):
        raise ValueError(f"at least {low}, got {text}")
    if seconds > parse_duration(high):
        raise ValueError(f"at most {high}, got {text[:40]}")
    return text


def _plain_text(value: str, what: str, limit: int = MAX_TEXT) -> str:
    """A label value or name as Prometheus will template it: bounded, printable, and without
    `{{`/`}}`, which rule labels and annotations would run as template actions."""
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if "{{" in value or "}}" in value:
        raise ValueError(f"{what} has a template action ({{{{ or }}}})")
    if not value.isprintable():
        raise ValueError(f"{what} has a control character")
    return value


def _standard_severities() -> dict[Severity, str]:
    return {"critical": "critical", "warning": "warning", "info": "info"}


class AlertOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    for_: str | None = Field(default=None, alias="for")
    severity: Severity | None = None

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, value: Any) -> str | None:
        return None if value is None else _duration(value, "0s", "1d")


class RulesConfig(BaseModel):
    """What a site may change without editing code (`moe-watch rules --config/--set`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: dict[str, float] = Field(default_factory=dict)
    alerts: dict[str, AlertOverride] = Field(default_factory=dict)
    # Selects the agents' own scrape job (the ServiceMonitor's jobLabel makes it "moe-watch").
    job_selector: str = 'job="moe-watch"'
    # The label that tells clusters apart where rules run over several (Thanos/Mimir ruler).
    # (a label name, not one Prometheus reserves: no leading "__")
    cluster_label: str = Field(
        default="cluster", max_length=128, pattern=r"^([a-zA-Z]|_[a-zA-Z0-9])[a-zA-Z0-9_]*$"
    )
    runbook_base_url: str = "https://github.com/moe-watch/moe-watch/blob/main/docs/runbooks.md"
    # The `severity` label value for each of our levels (kube-prometheus-stack routes on these).
    severity_names: dict[Severity, str] = Field(default_factory=_standard_severities)
    additional_labels: dict[str, str] = Field(default_factory=dict)  # on every alert
    interval: str = "30s"
    # The agents' scrape interval (the ServiceMonitor's endpoint interval): sizes keep_firing_for.
    scrape_interval: str = "15s"
    # Load ranks rebuilt per layer for engines that span nodes (the agents' expert_top_n).
    expert_group_load_ranks: int = Field(default=4, ge=1, le=64, strict=True)

    @field_validator("job_selector")
    @classmethod
    def _matchers(cls, value: str) -> str:
        return render_matchers(parse_matchers(value))

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> str:
        return _duration(value, "1s", "1h")

    @field_validator("scrape_interval", mode="before")
    @classmethod
    def _scrape_interval(cls, value: Any) -> str:
        return _duration(value, "1s", "10m")

    @field_validator("runbook_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if (
            not re.fullmatch(rf"https?://[^\s{{}}]{{1,{MAX_URL}}}", value)
            or not value.isprintable()
        ):
            raise ValueError(f"an http(s) URL without spaces or braces, up to {MAX_URL} characters")
        return value

    @field_validator("severity_names")
    @classmethod
    def _severity_names(cls, value: dict[Severity, str]) -> dict[Severity, str]:
        for level, name in value.items():
            _plain_text(name, f"the name for {level!r}", 128)
        return value

    @field_validator("additional_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 32:
            raise ValueError("at most 32 labels")
        for name, text in value.items():
            if (
                not re.fullmatch(LABEL_NAME, name)
                or name.startswith("__")
                or name in RESERVED_LABELS
            ):
                raise ValueError(
                    f"{name[:40]!r} is not a label a site may add (a label name; not "
                    f"{', '.join(sorted(RESERVED_LABELS))} or __*)"
                )
            _plain_text(text, f"the value of {name!r}")
        return value

    @field_validator("alerts")
    @classmethod
    def _known_alerts(cls, value: dict[str, AlertOverride]) -> dict[str, AlertOverride]:
        unknown = set(value) - {a.name for a in ALERTS}
        if unknown:
            raise ValueError(f"unknown alert(s) {', '.join(sorted(unknown))}")
        return value

    @field_validator("thresholds", mode="before")
    @classmethod
    def _known_thresholds(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic says it is not a mapping
        limits = DEFAULT.replaced(value)  # raises ValueError naming the bad one
        return {name: getattr(limits, name) for name in value}

    @property
    def limits(self) -> Thresholds:
        return DEFAULT.replaced(self.thresholds)

    def severity(self, alert: Alert) -> str:
        level = self.alerts.get(alert.name, AlertOverride()).severity or alert.severity
        return self.severity_names.get(level, level)

    def for_(self, alert: Alert) -> str:
        return self.alerts.get(alert.name, AlertOverride()).for_ or alert.for_

    def keep_firing_for(self, alert: Alert) -> str | None:
        """The alert's `keep_firing_for`: RESTART_GAP_SCRAPES scrape intervals for an alert on
        the agent's series, None for the alerts about the agent itself."""
        if not alert.through_agent_restart:
            return None
        seconds = round(RESTART_GAP_SCRAPES * parse_duration(self.scrape_interval))
        return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"

    def enabled(self, alert: Alert) -> bool:
        return self.alerts.get(alert.name, AlertOverride()).enabled


def load_config(path: Path | None, assignments: list[str]) -> RulesConfig:
    """A RulesConfig from a YAML file and `KEY.SUB=VALUE` assignments (later ones win).

    Raises ValueError with one line naming the bad key or value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = _read(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"rules config {path} must be a mapping")
        data = loaded or {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set {_line(assignment)}: expected KEY=VALUE (e.g. thresholds.expert_skew=0.6)"
            )
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {_line(key)}: {_line(part)} is not a mapping")
        node[leaf] = _value(raw)
    try:
        return RulesConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ValueError(f"invalid rules config: {_line(where)}: {_line(message)}") from None


def _read(path: Path) -> Any:
    """The YAML in ``path``, read whole only when it is at most MAX_CONFIG_BYTES."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"rules config {path} is larger than 1 MiB")
        return yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"cannot read rules config {path}: {_line(str(exc))}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        if "larger than" in str(exc):
            raise
        raise ValueError(f"cannot read rules config {path}: {_line(str(exc))}") from None


def _value(raw: str) -> Any:
    """An assignment's value as YAML (a number, a bool, ...), or the text itself where it is not
    YAML: the field it goes to judges it."""
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError):
        return raw


def _line(text: str, limit: int = 200) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
