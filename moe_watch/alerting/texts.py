"""Annotation texts: the numbers they quote, the Prometheus template pieces they use, and a
small interpreter of those.

Two kinds of placeholder, filled at two times:
- ``${name:format}`` at generation, by `fill`, from the same values the expressions read (the
  site's overrides included): ``name`` is a threshold, ``t`` the alert's own threshold or
  ``for`` its `for:` in seconds; ``format`` is one of FORMATS. A text never spells a threshold.
- Go templates, when Prometheus sends a notification. The few pieces used here (`$labels.x`,
  `$value | printf`, and `query` lookups of the hottest expert and the EPLB what-if) are spelled
  once below; `expand` is what Prometheus makes of them, so the generated promtool tests can say
  exactly what each notification reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping


def _g(value: float) -> str:
    return f"{round(value, 9):g}"  # 0.57 * 100 is 56.99999999999999: show 57


def _time(seconds: float, units: tuple[str, str, str], *, plural: bool, one: bool = True) -> str:
    """``seconds`` in the largest of hours, minutes or seconds it is a whole number of."""
    for size, unit in zip((3600, 60, 1), units, strict=True):
        if seconds % size == 0 or size == 1:
            n = seconds / size
            name = unit + ("s" if plural and n != 1 else "")
            return name if n == 1 and not one else f"{_g(n)} {name}"
    raise AssertionError("unreachable")


FORMATS: dict[str, Callable[[float], str]] = {
    "g": _g,  # as the expression has it: 0.95
    "%": lambda v: f"{_g(v * 100)} %",  # 95 %
    "1-%": lambda v: f"{_g((1 - v) * 100)} %",  # 0.8 of the baseline: 20 % below it
    "x": lambda v: f"{_g(v)}x",  # 1.5x
    "s": lambda v: f"{_g(v)} s",
    "ms": lambda v: f"{_g(v * 1000)} ms",
    "short": lambda v: _time(v, ("h", "min", "s"), plural=False),  # 15 min
    "words": lambda v: _time(v, ("hour", "minute", "second"), plural=True),  # 15 minutes
    "span": lambda v: _time(v, ("hour", "minute", "second"), plural=True, one=False),  # hour
}
PLACEHOLDER = re.compile(r"\$\{(\w+)(?::([^}]+))?\}")


def fill(text: str, values: Mapping[str, float]) -> str:
    """``text`` with each ``${name:format}`` replaced; KeyError on an unknown name or format."""
    return PLACEHOLDER.sub(lambda m: FORMATS[m[2] or "g"](values[m[1]]), text)


# The hottest expert of the alert's layer, read when the notification is rendered.
HOTTEST_EXPERT = (
    '{{ with printf "moe_watch:expert_load_rank_expert_id{engine=%q,layer=%q,load_rank=\\"1\\"}"'
    ' $labels.engine $labels.layer | query }}{{ . | first | value | printf "%.0f" }}'
    "{{ else }}unknown{{ end }}"
)

NO_WHATIF = (
    "No EPLB what-if for this engine (no expert parallelism, or no expert counts in the window)."
)


def eplb_whatif_template(target: float) -> str:
    """Would vLLM's EPLB fix it? moe-watch's what-if on the window's load (docs/experts.md), read
    when the notification is rendered: the smallest redundant-expert count reaching ``target``,
    else how far the search went, else why there is no what-if."""

    def read(metric: str, fmt: str) -> str:
        return (
            f'{{{{ with printf "moe_watch_{metric}{{engine=%q}}" $labels.engine | query }}}}'
            f'{{{{ . | first | value | printf "{fmt}" }}}}{{{{ end }}}}'
        )

    today = read("expert_rank_balancedness_ratio", "%.2f")
    return (
        '{{ with printf "moe_watch_expert_eplb_redundant_needed{engine=%q}" $labels.engine | query }}'
        'EPLB with {{ . | first | value | printf "%.0f" }} redundant experts would lift EP-rank '
        f"balancedness from {today} to "
        + read("expert_eplb_redundant_needed_balancedness_ratio", "%.2f")
        + " (moe-watch what-if on the window's load; the placement is in /experts).{{ else }}"
        + read("expert_eplb_redundant_searched_max", "%.0f").replace(
            '{{ . | first | value | printf "%.0f" }}',
            'No EPLB redundancy up to {{ . | first | value | printf "%.0f" }} experts reaches '
            f"EP-rank balancedness {target:g} (today {today}): placement alone will not even "
            "the load.{{ else }}" + NO_WHATIF,
        )
        + "{{ end }}"
    )


def expand(template: str, labels: dict[str, str], value: float, hottest: str = "") -> str:
    """What Prometheus' template engine makes of our (small) annotation language."""
    text = template.replace(HOTTEST_EXPERT, hottest or "unknown")
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
    return re.sub(r'\{\{ \$value \| printf "(%[.0-9]*f)" \}\}', lambda m: m[1] % value, text)
