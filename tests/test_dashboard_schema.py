"""The shipped dashboards satisfy Grafana's published schema (npm @grafana/schema, via tsc), and
the check rejects a broken dashboard, so it can fail."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moe_watch.dashboards.definitions import DASHBOARDS
from tests.grafana_schema import SCHEMA_VERSION, ensure_toolchain, typecheck

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toolchain() -> Path:
    """npm installs @grafana/schema and typescript (pinned) into the cache on first use."""
    return ensure_toolchain()


def test_the_schema_is_the_pinned_grafana_release(toolchain: Path) -> None:
    package = toolchain.parents[2] / "@grafana" / "schema" / "package.json"
    assert json.loads(package.read_text())["version"] == SCHEMA_VERSION


def test_shipped_dashboards_satisfy_grafanas_schema(toolchain: Path, tmp_path: Path) -> None:
    boards = {
        path.stem: json.loads(path.read_text()) for path in ROOT.glob("dashboards/moe-watch-*.json")
    }
    assert sorted(boards) == sorted(f"moe-watch-{name}" for name in DASHBOARDS)
    result = typecheck(boards, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    [panel] = [p for p in board["panels"] if p.get("title") == title]
    return panel


def _grid(board: dict[str, Any]) -> dict[str, Any]:
    return _panel(board, "Token share, layer x load rank")


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # (how to break the experts dashboard, what tsc must say)
    "gridPos x not a number": (
        lambda b: _panel(b, "Skew per layer")["gridPos"].update(x="a"),
        "Type 'string' is not assignable to type 'number'",
    ),
    "unknown panel field": (
        lambda b: _panel(b, "Skew per layer").update(gridpos={}),
        "'\"gridpos\"' does not exist",
    ),
    "misspelt table cell type": (
        lambda b: _grid(b)["fieldConfig"]["defaults"]["custom"].update(
            cellOptions={"type": "colour-background"}
        ),
        "colour-background",
    ),
    "table option of the wrong type": (
        lambda b: _grid(b)["options"].update(showHeader="yes"),
        "not assignable to type 'boolean",
    ),
    "timeseries legend mode that does not exist": (
        lambda b: _panel(b, "Skew per layer")["options"].update(legend={"displayMode": "sideways"}),
        "sideways",
    ),
    "thresholds mode that does not exist": (
        lambda b: _grid(b)["fieldConfig"]["defaults"]["thresholds"].update(mode="abs"),
        "abs",
    ),
    "row repeat not a variable name": (
        lambda b: next(p for p in b["panels"] if p["type"] == "row").update(repeat=3),
        "Type 'number' is not assignable to type 'string'",
    ),
    "groupingToMatrix option misspelt": (
        lambda b: _grid(b)["transformations"][2]["options"].update(rowfield="layer"),
        "is not assignable to type 'never'",  # no transformation's options have `rowfield`
    ),
    "dashboard refresh not a string": (
        lambda b: b.update(refresh=30),
        "Type 'number' is not assignable to type 'string'",
    ),
}


def _slug(name: str) -> str:
    return name.replace(" ", "_")


@pytest.fixture(scope="module")
def broken(toolchain: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tsc's report on one broken copy of the experts dashboard per breakage (one run: fast)."""
    boards = {}
    for name, (breaks, _) in BREAKAGES.items():
        board = copy.deepcopy(DASHBOARDS["experts"]())
        breaks(board)
        boards[_slug(name)] = board
    result = typecheck(boards, tmp_path_factory.mktemp("broken"))
    assert result.returncode != 0
    return result.stdout


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_check_rejects_a_broken_dashboard(broken: str, breakage: str) -> None:
    """Each copy differs from the passing dashboard by one breakage: tsc names it in that file."""
    errors = [line for line in broken.splitlines() if line.startswith(f"{_slug(breakage)}.ts(")]
    assert errors, f"{breakage}: accepted"
    assert all("error TS" in line for line in errors)
    assert any(BREAKAGES[breakage][1] in line for line in errors), errors
