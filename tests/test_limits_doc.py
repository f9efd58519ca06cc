"""docs/limits.md is generated from moe_watch/limits.py, and every declared limit is used."""

from __future__ import annotations

import re
from pathlib import Path

from moe_watch import limits

ROOT = Path(__file__).resolve().parent.parent


def test_the_limits_doc_is_current() -> None:
    written = (ROOT / "docs" / "limits.md").read_text(encoding="utf-8")
    assert written == limits.markdown(), "run: python -m moe_watch.limits > docs/limits.md"


def test_every_limit_is_checked_somewhere() -> None:
    # A limit declared but read by no module would be a promise nobody keeps.
    sources = "\n".join(
        path.read_text(encoding="utf-8")
        for path in (ROOT / "moe_watch").rglob("*.py")
        if path.name != "limits.py"
    )
    unused = [name for name in limits.LIMITS if not re.search(rf"\b{name}\b", sources)]
    assert unused == []


def test_every_limit_says_why_and_what_happens_past_it() -> None:
    for limit in limits.LIMITS.values():
        assert limit.what, limit.name
        assert limit.why, limit.name
        assert limit.past, limit.name
        assert limit.value > 0, limit.name
