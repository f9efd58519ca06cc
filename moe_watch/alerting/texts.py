"""Annotation texts: the Prometheus template pieces they use, and a small interpreter of them.

Annotations are Go templates Prometheus renders when it sends a notification. The few pieces
used here (`$labels.x`, `$value | printf`, and `query` lookups of the hottest expert and the EPLB
what-if) are spelled once below; `expand` is what Prometheus makes of them, so the generated
promtool tests can say exactly what each notification reads.
"""

from __future__ import annotations

import re

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
