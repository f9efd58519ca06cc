"""Files moe-watch generates from code (rules, dashboards): written and checked the same way."""

from __future__ import annotations

from pathlib import Path


def write_generated(root: Path, files: dict[Path, str]) -> list[Path]:
    """Write ``files`` (paths relative to the repository root) under ``root``."""
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
