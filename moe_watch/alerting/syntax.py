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


LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# One matcher: a label name, an operator and a double-quoted string whose only escapes are \\,
# \", \n and \t (a subset of PromQL's; enough for any label value or regex a site needs).
_MATCHER = re.compile(rf'\s*({LABEL_NAME})\s*(=~|!~|!=|=)\s*"((?:[^"\\\n]|\\[\\"nt])*)"\s*')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n", "\\t": "\t"}
MAX_MATCHERS_LENGTH = 1024


def parse_matchers(text: str) -> list[tuple[str, str, str]]:
    """The (name, operator, value as written) of each matcher in ``text``, e.g.
    ``job="moe-watch", namespace=~"gpu-.*"``: the inside of a PromQL selector's braces and
    nothing else. ValueError when it is not that, or a regex does not compile."""
    if not text or len(text) > MAX_MATCHERS_LENGTH:
        raise ValueError(f"not label matchers: 1 to {MAX_MATCHERS_LENGTH} characters")
    matchers, position = [], 0
    while True:
        found = _MATCHER.match(text, position)
        if found is None:
            raise ValueError(
                f'not label matchers at character {position + 1} (expected NAME="VALUE", '
                'NAME!="VALUE", NAME=~"REGEX" or NAME!~"REGEX", separated by commas)'
            )
        name, op, value = found.groups()
        if op in ("=~", "!~"):
            try:
                re.compile(unescape(value))
            except re.error as exc:
                raise ValueError(f"not a regular expression in {name}{op}: {exc}") from None
        matchers.append((name, op, value))
        position = found.end()
        if position == len(text):
            return matchers
        if text[position] != ",":
            raise ValueError(f"not label matchers at character {position + 1} (expected a comma)")
        position += 1


def unescape(value: str) -> str:
    """A matcher's value as written, with its escapes undone."""
    return re.sub(r"\\[\\\"nt]", lambda m: _UNESCAPE[m[0]], value)


def render_matchers(matchers: list[tuple[str, str, str]]) -> str:
    return ",".join(f'{name}{op}"{value}"' for name, op, value in matchers)
