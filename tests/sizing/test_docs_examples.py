"""The `moe-watch size` examples in README.md and docs/sizing.md are what the command prints."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from moe_watch.cli import main

ROOT = Path(__file__).resolve().parents[2]


def examples() -> list[tuple[str, str, list[str]]]:
    """(file, command line, the lines shown after it) for every `$ moe-watch size` block."""
    found = []
    for name in ("README.md", "docs/sizing.md"):
        lines = (ROOT / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ moe-watch size "):
                shown = []
                for after in lines[i + 1 :]:
                    if after.startswith(("$ ", "```")):
                        break
                    shown.append(after)
                found.append((name, line[2:], shown))
    return found


def test_there_are_examples() -> None:
    assert {name for name, _, _ in examples()} == {"README.md", "docs/sizing.md"}


@pytest.mark.parametrize(("name", "command", "shown"), examples())
def test_an_example_is_the_commands_output(
    name: str, command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    position = 0
    for line in shown:
        if line.strip() in ("...", ""):
            continue
        assert line in printed[position:], f"{name}: {line!r} not printed (in order)"
        position = printed.index(line, position) + 1
    if not any(line.strip() == "..." for line in shown):
        assert [line for line in shown if line] == [line for line in printed if line]
