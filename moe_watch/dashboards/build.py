"""A small Grafana dashboard builder: panels in rows, variables, thresholds; JSON out.

Dashboards are code (moe_watch/dashboards/definitions.py); `moe-watch dashboards --out .` writes
dashboards/*.json and a test fails when the committed JSON is stale. Every query uses the same
selector built from the template variables, so a dashboard is one cluster/node/engine view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'cluster=~"$cluster",instance=~"$node",engine=~"$engine"'
SEL_MODEL = SEL + ',model=~"$model"'  # engine-level series carry the served model
GREEN, YELLOW, RED = "green", "#EAB839", "red"
# What Grafana puts in place of the variables when "All" is selected (tests and pictures use it).
ALL_VALUES = {
    "$model": ".*",
    "$cluster": ".*",
    "$node": ".*",
    "$engine": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
}


def substitute_all(expr: str) -> str:
    for name, value in ALL_VALUES.items():
        expr = expr.replace(name, value)
    return expr


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    kind: str  # timeseries | stat | table | heatmap | bargauge
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    thresholds: tuple[tuple[float, str], ...] = ()  # (from value, colour); base is green
    width: int = 12
    height: int = 8
    max_value: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


def variables(with_model: bool = False) -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": expr, "refId": f"{name}-var"},
            "definition": expr,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": "All", "value": "$__all"},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        query("cluster", "cluster", "label_values(moe_watch_build_info, cluster)"),
        query("node", "node", 'label_values(moe_watch_build_info{cluster=~"$cluster"}, instance)'),
        query(
            "engine",
            "engine",
            'label_values(moe_watch_target_up{cluster=~"$cluster",instance=~"$node"}, engine)',
        ),
        *(
            [
                query(
                    "model",
                    "model",
                    'label_values(moe_watch_engine_info{engine=~"$engine"}, model)',
                )
            ]
            if with_model
            else []
        ),
    ]


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Panel],
    tags: tuple[str, ...] = (),
    *,
    with_model: bool = False,
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["moe-watch", *tags],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables(with_model)},
        "annotations": {"list": []},
        "panels": _layout(panels),
    }


def _layout(panels: list[Panel]) -> list[dict[str, Any]]:
    out, x, y, row_height = [], 0, 0, 0
    for number, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        out.append(
            _panel_json(number, panel, {"x": x, "y": y, "w": panel.width, "h": panel.height})
        )
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def _panel_json(number: int, panel: Panel, grid: dict[str, int]) -> dict[str, Any]:
    steps = [{"color": GREEN, "value": None}] + [
        {"color": colour, "value": value} for value, colour in panel.thresholds
    ]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
        defaults["min"] = 0
    if panel.kind == "timeseries" and panel.thresholds:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    return {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": panel.options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
                "instant": target.instant,
                "range": not target.instant,
                **({"format": "table"} if panel.kind in ("table", "bargauge") else {}),
                **({"format": "heatmap"} if panel.kind == "heatmap" else {}),
            }
            for i, target in enumerate(panel.targets)
        ],
    }


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
