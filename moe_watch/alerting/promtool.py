"""Prometheus' own check of a rule file (`promtool check rules`), run before anything is written.

The inputs a site sets are parsed before they reach an expression (config.py); promtool is the
check of the whole file, so that a file Prometheus would refuse to load is never written.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_SECONDS = 60


class RulesRejected(ValueError):
    """promtool refuses the rules; the message is its first complaint, on one line."""


def check_rules(text: str, name: str = "moe-watch.rules.yml") -> bool:
    """Run `promtool check rules` on ``text``: True when promtool accepts it, False when there
    is no promtool on PATH; RulesRejected when promtool refuses it (or does not answer)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return False
    with tempfile.TemporaryDirectory(prefix="moe-watch-rules-") as directory:
        path = Path(directory) / name
        path.write_text(text, encoding="utf-8")
        try:
            run = subprocess.run(
                [promtool, "check", "rules", str(path)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RulesRejected(
                f"promtool check rules did not answer in {TIMEOUT_SECONDS} s"
            ) from None
        if run.returncode == 0:
            return True
        output = (run.stdout + run.stderr).replace(str(path), name)
    raise RulesRejected(f"promtool rejects the rules: {_first_complaint(output)}")


def _first_complaint(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    complaints = [line for line in lines if not line.startswith(("Checking ", "FAILED"))]
    line = complaints[0] if complaints else "(no reason given)"
    return line if len(line) <= 300 else line[:297] + "..."
