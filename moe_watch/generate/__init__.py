"""Every file moe-watch generates from code, written and checked in one place.

`moe-watch generate [--out DIR] [--check]` writes them all with the shipped defaults:
- alerts/moe-watch.rules.yml, alerts/tests/moe-watch.rules.test.yml and the chart's
  files/prometheusrule.yaml (moe_watch/alerting/); docs/thresholds.md (moe_watch/thresholds.py)
- dashboards/*.json and the chart's files/dashboards/*.json (moe_watch/dashboards/)
- deploy/base: the chart rendered with its default values, with the files above in it
A test fails when any of them in the repository differs from what this writes.
"""

from __future__ import annotations

from pathlib import Path

from moe_watch.alerting.files import rule_files
from moe_watch.alerting.thresholds_doc import THRESHOLDS_DOC, thresholds_doc
from moe_watch.dashboards.definitions import generated_files as dashboard_files
from moe_watch.generate.chart import base_files


def generated_files() -> dict[Path, str]:
    """Every generated file (path relative to the repository root -> text)."""
    files = {THRESHOLDS_DOC: thresholds_doc(), **rule_files(), **dashboard_files()}
    return files | base_files(files)


def write(root: Path, files: dict[Path, str]) -> list[Path]:
    """Write ``files`` under ``root``; the paths written."""
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(root: Path, files: dict[Path, str]) -> list[Path]:
    """The files under ``root`` that are missing or differ from ``files``."""
    return [
        relative
        for relative, text in files.items()
        if not (root / relative).is_file() or (root / relative).read_text(encoding="utf-8") != text
    ]
