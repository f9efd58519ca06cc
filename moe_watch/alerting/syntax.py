"""The pieces of PromQL a site supplies (a duration, label matchers), parsed as what they are.

A value a site sets is spliced into rule expressions; parsing it here, rather than matching a
pattern somewhere inside it, means nothing but a duration or a list of matchers gets through.
"""

from __future__ import annotations

import re

# Prometheus' duration: units from largest to smallest, each at most once (model.ParseDuration).
_UNITS: tuple[tuple[str, float], ...] = (
    ("y", 365 * 86_400),
    ("w", 7 * 86_400),
    ("d", 86_400),
    ("h", 3_600),
    ("m", 60),
    ("s", 1),
    ("ms", 0.001),
)
_DURATION = re.compile("".join(rf"(?:(?P<{u}>[0-9]{{1,12}}){u})?" for u, _ in _UNITS))


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration ("90s", "1h30m"); ValueError when it is not one."""
    found = _DURATION.fullmatch(text) if text else None
    if found is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h30m)")
    return float(sum(int(n) * size for (u, size) in _UNITS if (n := found[u]) is not None))
