"""A small Grafana dashboard builder: panels in rows, variables, thresholds; JSON out.

Dashboards are code (moe_watch/dashboards/definitions.py); `moe-watch generate` writes
dashboards/*.json and a test fails when the committed JSON is stale. Every query uses the same
selector built from the template variables, so a dashboard is one cluster/node/engine view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# `node` is the ServiceMonitor's relabeling of __meta_kubernetes_pod_node_name (charts/moe-watch);
# `instance` is the agent pod's address, which changes when the pod is replaced.
SEL = 'cluster=~"$cluster",node=~"$node",engine=~"$engine"'
SEL_MODEL = SEL + ',model=~"$model"'  # engine-level series carry the served model
SEL_NODE = 'cluster=~"$cluster",node=~"$node"'  # node-level series (agent, Xid): no engine label
# Firing moe-watch alerts as annotations on every time series (the Prometheus datasource's
# annotation: the query in `target`, the event fields beside it). `engine=~` also matches alerts without an engine label while "All".
ALERT_ANNOTATION: dict[str, Any] = {
    "name": "MoE alerts firing",
    "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "enable": True,
    "hide": False,
    "iconColor": "red",
    "target": {
        "refId": "Anno",
        "expr": 'ALERTS{alertstate="firing",alertname=~"MoE.*",cluster=~"$cluster",engine=~"$engine"}',
    },
    "titleFormat": "{{alertname}}",
    "textFormat": "{{severity}} {{engine}} {{gpu}} {{layer}}",
    "tagKeys": "severity,engine",
    "useValueForTime": False,
}
RATE = "$__rate_interval"  # every rate()/increase() window: Grafana's scrape-aware interval
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
    kind: str  # timeseries | stat | table | bargauge
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    thresholds: tuple[tuple[float, str], ...] = ()  # (from value, colour); base is green
    width: int = 12
    height: int = 8
    max_value: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)  # fieldConfig.defaults.custom
    overrides: tuple[dict[str, Any], ...] = ()  # fieldConfig.overrides
    transformations: tuple[dict[str, Any], ...] = ()
    decimals: int | None = None
    base_colour: str = GREEN  # below the first threshold (red for "less is worse")


@dataclass(frozen=True)
class Row:
    """A row header; its panels follow it. ``repeat`` names a variable: one row per value."""

    title: str
    repeat: str | None = None


def matrix(row_field: str, column_field: str, columns: int) -> tuple[dict[str, Any], ...]:
    """Transformations that turn one instant table query into a row_field x column_field grid.

    groupingToMatrix (Grafana's transformer; options as in @grafana/data) pivots the single frame:
    one row per row_field value in the order they come, one column per column_field value, cells
    from the "Value" field; its first column is named `row_field\\column_field`. Before it, the row
    field becomes a number and the frame is sorted by it (layer 2 before layer 10); after it,
    organize puts the numbered columns in order (``columns`` of them: 0..columns-1 for expert
    ids, 1..columns for load ranks).
    """
    corner = f"{row_field}\\{column_field}"
    first = 0 if column_field == "expert" else 1
    order = {corner: 0} | {str(n): 1 + n - first for n in range(first, first + columns)}
    return (
        {
            "id": "convertFieldType",
            "options": {"conversions": [{"targetField": row_field, "destinationType": "number"}]},
        },
        {"id": "sortBy", "options": {"sort": [{"field": row_field, "desc": False}]}},
        {
            "id": "groupingToMatrix",
            "options": {"rowField": row_field, "columnField": column_field, "valueField": "Value"},
        },
        {"id": "organize", "options": {"indexByName": order}},
    )


def by_name(name: str, **properties: Any) -> dict[str, Any]:
    """A field override: the named field (column) gets ``properties`` (id -> value)."""
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def variables(with_model: bool = False) -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": expr, "refId": f"{name}-var"},
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
        },
        query("cluster", "cluster", "label_values(moe_watch_build_info, cluster)"),
        query("node", "node", 'label_values(moe_watch_build_info{cluster=~"$cluster"}, node)'),
        query(
            "engine",
            "engine",
            'label_values(moe_watch_target_up{cluster=~"$cluster",node=~"$node"}, engine)',
        ),
        *(
            [
                query(
                    "model",
                    "model",
                    f"label_values(moe_watch_engine_info{{{SEL}}}, model)",
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
    panels: list[Panel | Row],
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
        "annotations": {"list": [ALERT_ANNOTATION]},
        "panels": _layout(panels),
    }


def _layout(panels: list[Panel | Row]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    x, y, row_height = 0, 0, 0
    for number, panel in enumerate(panels, start=1):
        if isinstance(panel, Row):
            y, x, row_height = y + row_height, 0, 0
            row: dict[str, Any] = {
                "id": number,
                "type": "row",
                "title": panel.title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],  # an open row's panels follow it in the dashboard's list
            }
            if panel.repeat:
                row["repeat"] = panel.repeat
            out.append(row)
            y += 1
            continue
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        out.append(
            _panel_json(number, panel, {"x": x, "y": y, "w": panel.width, "h": panel.height})
        )
        x += panel.width
        row_height = max(row_height, panel.height)
    return out


def _panel_json(number: int, panel: Panel, grid: dict[str, int]) -> dict[str, Any]:
    steps = [{"color": panel.base_colour, "value": None}] + [
        {"color": colour, "value": value} for value, colour in panel.thresholds
    ]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
        defaults["min"] = 0
    custom = dict(panel.custom)
    if panel.kind == "timeseries" and panel.thresholds:
        custom = {"thresholdsStyle": {"mode": "line+area"}} | custom
    if custom:
        defaults["custom"] = custom
    out: dict[str, Any] = {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": list(panel.overrides)},
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
            }
            for i, target in enumerate(panel.targets)
        ],
    }
    if panel.transformations:
        out["transformations"] = list(panel.transformations)
    return out


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
