"""The PromQL of the recording rules (autoscale, forecasts, engines that span nodes), and the
substitution of a site's values into every expression."""

from __future__ import annotations

import re

from moe_watch.alerting.config import RulesConfig
from moe_watch.alerting.specs import WATCHER_LABELS, p95

# Autoscale signals (the design notes, docs/design.md) as recording rules KEDA/HPA can read: 1 = scale, 0 = hold. Each
# condition is its own labelled arm so `max` sees them all: `A > bool x or B > bool y` keeps A
# alone, because A has a 0/1 value for every engine.
RECORDING: tuple[tuple[str, str], ...] = (
    ("moe_watch:engine_gpu_utilization:avg", "avg by ($by) (moe_watch_gpu_utilization_ratio)"),
    ("moe_watch:autoscale_up:bool",
     "max by ($by) ("
     'label_replace(max by ($by) (moe_watch_requests_waiting) > bool $autoscale_up_waiting, "signal", "queue", "", "")'
     f' or label_replace({p95("e2e_request_latency_seconds", "$by")} > bool $autoscale_up_p95_seconds, "signal", "p95", "", "")'
     ' or label_replace(min_over_time(moe_watch:engine_gpu_utilization:avg[5m]) > bool $autoscale_up_gpu_utilization, "signal", "gpu", "", "")'
     ")"),
    # Down only when the GPUs idled for 15 minutes *and* nothing queued for 10: low
    # utilization with a queue is a stalled engine (a slow all-to-all, a full KV cache), not a
    # spare one.
    ("moe_watch:autoscale_down:bool",
     "(max_over_time(moe_watch:engine_gpu_utilization:avg[15m]) < bool $autoscale_down_gpu_utilization)"
     " * on ($by) (max by ($by) (max_over_time(moe_watch_requests_waiting[10m])) == bool 0)"),
)  # fmt: skip


def about_the_watched(expr: str) -> str:
    """An alert expression without the agent's own labels: the alert of a node's engine, layer
    or GPU is the same alert whichever agent pod reports it. Two pods of one node reporting at
    once (a surge rollout) are one alert; `max` keeps the value of either, both past the
    threshold, since the expression filtered them before."""
    return f"max without ({', '.join(WATCHER_LABELS)}) ({expr})"


def duration(seconds: float) -> str:
    """A PromQL duration for a number of seconds (whole milliseconds: what PromQL accepts)."""
    return f"{round(seconds * 1000)}ms" if seconds != int(seconds) else f"{int(seconds)}s"


def forecast_rules(config: RulesConfig | None = None) -> list[tuple[str, str]]:
    """Time until the KV cache is full and until a GPU's used memory crosses its sized budget.

    A least-squares line over the window (deriv() for the slope, predict_linear(x, 0) for where
    the line stands now, so one noisy last sample does not move the forecast), only where:
    - the trend rises faster than a minimum slope (a flat series with noise has a slope near 0,
      whose forecast is hours or days away, or none at all);
    - the series has at least half a window of history (`offset`): a fit over a few fresh
      samples of a new engine, or after a Prometheus restart, is noise;
    and clamped at 0 once the line is past the limit. The alerts add a `for:` on top.
    """
    t = (config or RulesConfig()).limits
    kv = "moe_watch_kv_cache_usage_ratio"
    kv_window = duration(t.kv_cache_forecast_window_seconds)
    kv_half = duration(t.kv_cache_forecast_window_seconds / 2)
    used = 'moe_watch_gpu_memory_used_bytes{engine!=""}'
    budget = "moe_watch_sized_budget_bytes"  # per engine; GPU series carry `engine`
    window = duration(t.budget_forecast_window_seconds)
    half = duration(t.budget_forecast_window_seconds / 2)
    slope = f"deriv({used}[{window}])"
    return [
        (
            "moe_watch:kv_cache_full:seconds",
            f"clamp_min((1 - predict_linear({kv}[{kv_window}], 0))"
            f" / (deriv({kv}[{kv_window}]) > {t.kv_cache_forecast_min_rise_per_hour:g} / 3600)"
            f" and {kv} offset {kv_half}, 0)",
        ),
        (
            "moe_watch:gpu_budget_exhausted:seconds",
            f"clamp_min(({budget} - ignoring(gpu) group_right() predict_linear({used}[{window}], 0))"
            f" / ({slope} and {slope} * 3600 / ignoring(gpu) group_left() {budget}"
            f" > {t.budget_forecast_min_rise_per_hour:g})"
            f" and {used} offset {half}, 0)",
        ),
    ]


# Keys that order a layer's experts by load, ties to the lower id: count * KEY_SCALE + (KEY_SCALE
# - 1 - id). Exact in float64 while a layer's window count per expert stays below 2^53 / 4096
# (2.2e12) and a layer has at most 4096 experts.
KEY_SCALE = 4096


def expert_group_rules(
    config: RulesConfig | None = None,
) -> list[tuple[str, str, dict[str, str]]]:
    """Engine-level expert signals for engines whose workers span nodes, rebuilt exactly from
    every node's window counts (moe_watch_expert_group_window_tokens): the sums over nodes per
    (layer, expert), then max/mean per layer as the agent does (signals/experts.py).

    Load ranks without sorting: the n-th largest key of a layer is the largest key below the
    (n-1)-th; keys are unique (the id is in them), so each rule is one max and a comparison.
    """
    config = config or RulesConfig()
    g = f"{config.cluster_label}, engine_group"
    gl = f"{g}, layer"
    tokens = "moe_watch_expert_group_window_tokens"
    per_expert = f"sum by ({gl}, expert) ({tokens})"
    layer_tokens = "moe_watch:expert_group_layer_tokens:sum"
    top_k = f"on({g}) group_left() max by ({g}) (moe_watch_expert_group_top_k)"
    key = (
        f"({per_expert} * {KEY_SCALE} + on({g}, expert) group_left()"
        f" ({KEY_SCALE - 1} - max by ({g}, expert) (moe_watch_expert_group_expert_id)))"
    )
    ranks = f"sum by ({g}, rank) (moe_watch_expert_group_rank_window_tokens)"
    rules = [
        (layer_tokens, f"sum by ({gl}) ({tokens}) > 0"),  # layers with traffic only
        (
            "moe_watch:expert_group_skew_ratio",
            f"max by ({gl}) ({per_expert}) / ({layer_tokens} / count by ({gl}) ({per_expert})) - 1",
        ),
        (
            "moe_watch:expert_group_max_token_share",
            f"max by ({gl}) ({per_expert}) * {top_k} / {layer_tokens}",
        ),
        (
            "moe_watch:expert_group_max_skew_ratio",
            f"max by ({g}) (moe_watch:expert_group_skew_ratio)",
        ),
        (
            "moe_watch:expert_group_rank_load_ratio",
            f"{ranks} / on({g}) group_left() (avg by ({g}) ({ranks}) > 0)",
        ),
    ]
    keys: list[tuple[str, str, dict[str, str]]] = []
    for n in range(1, config.expert_group_load_ranks + 1):
        below = (
            f' < on({gl}) group_left() moe_watch:expert_group_load_rank:key{{load_rank="{n - 1}"}}'
            if n > 1
            else ""
        )
        keys.append(
            (
                "moe_watch:expert_group_load_rank:key",
                f"max by ({gl}) ({key}{below})",
                {"load_rank": str(n)},
            )
        )
    ranked = f"(moe_watch:expert_group_load_rank:key and on({gl}) {layer_tokens})"
    rules += [
        (
            "moe_watch:expert_group_load_rank_token_share",
            f"floor({ranked} / {KEY_SCALE}) * {top_k} / on({gl}) group_left() {layer_tokens}",
        ),
        ("moe_watch:expert_group_load_rank_expert_id", f"{KEY_SCALE - 1} - {ranked} % {KEY_SCALE}"),
    ]
    # The keys (one rule per load rank, labelled by it) before the share and id that read them.
    head, tail = rules[:-2], rules[-2:]
    return [(r, e, {}) for r, e in head] + keys + [(r, e, {}) for r, e in tail]


# The expert series alerts and dashboards read: the engine group's where its workers span nodes
# (`engine` set to the group id, `engine_group` kept), else the agent's own, unchanged.
UNIFIED_EXPERT_SERIES = (
    "expert_skew_ratio",
    "expert_max_token_share",
    "expert_max_skew_ratio",
    "expert_load_rank_token_share",
    "expert_load_rank_expert_id",
    "expert_rank_load_ratio",
)


def unified_expert_rules() -> list[tuple[str, str]]:
    return [
        (
            f"moe_watch:{name}",
            f"label_replace(moe_watch:expert_group_{name.removeprefix('expert_')},"
            ' "engine", "$1", "engine_group", "(.+)")'
            f" or (moe_watch_{name} unless ignoring(layer, load_rank, rank, engine_group)"
            " moe_watch_expert_group_info)",
        )
        for name in UNIFIED_EXPERT_SERIES
    ]


def expression(template: str, config: RulesConfig, threshold: str = "") -> str:
    """``template`` with the site's values: $job, $by, $t (``threshold``'s value) and any
    $<threshold name>."""
    limits = config.limits
    expr = template.replace("$job", config.job_selector).replace(
        "$by", f"{config.cluster_label}, engine"
    )
    if threshold:
        expr = expr.replace("$t", f"{getattr(limits, threshold):g}")
    return re.sub(r"\$([a-z_0-9]+)", lambda m: f"{getattr(limits, m[1]):g}", expr)
