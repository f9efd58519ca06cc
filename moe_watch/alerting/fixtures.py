"""The promtool fixtures of each alert (promtool_tests.py), keyed by the alert's name.

Each alert gets one series that fires and one just past the threshold that does not. ``fire`` or
``quiet`` None derives them from the threshold and the comparison in the alert's expression.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_watch.alerting.texts import NO_WHATIF

ENGINE = 'engine="mixtral-0"'


@dataclass(frozen=True, kw_only=True)
class Fixture:
    series: str  # the series the alert reads; "$job" is a label set the job selector matches
    fire: str | None = None  # promtool values that fire; None: just past the threshold
    quiet: str | None = None  # values that stay silent; None: just short of it; "": no series
    eval_minutes: int = 0  # when to expect the alert; 0: `for:` + 2 minutes
    value_at_eval: float | None = None  # the alert's value then; None: fire's last value
    extra_series: tuple[tuple[str, str], ...] = ()  # (series, values) the alert also reads
    hottest: str = ""  # what texts.HOTTEST_EXPERT renders to
    whatif_rendered: str = ""  # what the `eplb_whatif` annotation renders to (texts.fill'ed)
    # ``series`` is a histogram's _bucket series (without `le`): buckets that put the P95 above
    # and below the threshold are made from it (promtool_tests.histogram_series)
    histogram: bool = False


def _v(value: float, minutes: int = 60) -> str:
    return f"{value:g}x{minutes}"


def _hot_layer(layer: str, expert: str) -> tuple[tuple[str, str], ...]:
    return (
        (
            f'moe_watch_expert_load_rank_expert_id{{{ENGINE},layer="{layer}",load_rank="1"}}',
            f"{expert}x60",
        ),
    )


def _whatif_found(needed: str, today: str, reached: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"moe_watch_expert_eplb_redundant_needed{{{ENGINE}}}", f"{needed}x60"),
        (f"moe_watch_expert_rank_balancedness_ratio{{{ENGINE}}}", f"{today}x60"),
        (f"moe_watch_expert_eplb_redundant_needed_balancedness_ratio{{{ENGINE}}}", f"{reached}x60"),
    )


def _whatif_none(searched: str, today: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"moe_watch_expert_eplb_redundant_searched_max{{{ENGINE}}}", f"{searched}x60"),
        (f"moe_watch_expert_rank_balancedness_ratio{{{ENGINE}}}", f"{today}x60"),
    )


FIXTURES: dict[str, Fixture] = {
    "MoEExpertSkewHigh": Fixture(
        series=f'moe_watch_expert_skew_ratio{{{ENGINE},layer="3"}}',
        extra_series=_hot_layer("3", "5") + _whatif_found("32", "0.41", "0.92"),
        hottest="5",
        whatif_rendered="EPLB with 32 redundant experts would lift EP-rank balancedness from 0.41 to 0.92 (moe-watch what-if on the window's load; the placement is in /experts).",
    ),
    "MoEExpertCollapse": Fixture(
        series=f'moe_watch_expert_max_token_share{{{ENGINE},layer="17"}}',
        extra_series=_hot_layer("17", "2"),
        hottest="2",
        whatif_rendered=NO_WHATIF,
    ),
    "MoEHotEPRank": Fixture(
        series=f'moe_watch_expert_rank_load_ratio{{{ENGINE},rank="1"}}',
        extra_series=_whatif_none("256", "0.41"),
        whatif_rendered="No EPLB redundancy up to 256 experts reaches EP-rank balancedness ${eplb_whatif_target:g} (today 0.41): placement alone will not even the load.",
    ),
    "MoEExpertDataMissing": Fixture(
        series=f"moe_watch_expert_layers_observed{{{ENGINE}}}",
        fire="0x60",
        quiet="32x60",
        extra_series=(
            (f'moe_watch_generation_tokens_per_second{{{ENGINE},model="mixtral"}}', "100x60"),
        ),
        value_at_eval=0,
    ),
    "MoEGPUUtilizationSpread": Fixture(
        series=f"moe_watch_engine_gpu_utilization_spread_ratio{{{ENGINE}}}",
    ),
    "MoEVRAMHigh": Fixture(
        series=f'moe_watch_gpu_memory_used_ratio{{{ENGINE},gpu="0"}}',
    ),
    "MoEKVCacheCritical": Fixture(
        series=f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}',
    ),
    "MoEKVCacheHitRatioLow": Fixture(
        series=f'moe_watch_kv_cache_hit_ratio{{{ENGINE},model="mixtral"}}',
    ),
    "MoEPreemptionsSustained": Fixture(
        series=f'moe_watch_preemptions_per_second{{{ENGINE},model="mixtral"}}',
        fire="0.5x60",
        quiet="0.5x5 0x55",
    ),
    "MoEGPUUtilizationLow": Fixture(
        series=f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="1"}}',
    ),
    "MoEGPUUtilizationSaturated": Fixture(
        series=f'moe_watch_gpu_utilization_ratio{{{ENGINE},gpu="0"}}',
    ),
    "MoEThroughputBelowBaseline": Fixture(
        series=f'moe_watch_generation_tokens_per_second{{{ENGINE},model="mixtral"}}',
        fire="100x240 60x60",
        quiet="100x240 90x60",
        eval_minutes=290,
    ),
    "MoEP95LatencyHigh": Fixture(
        series=f'moe_watch_e2e_request_latency_seconds_bucket{{{ENGINE},model="mixtral"}}',
        histogram=True,
    ),
    "MoETTFTP95High": Fixture(
        series=f'moe_watch_time_to_first_token_seconds_bucket{{{ENGINE},model="mixtral"}}',
        histogram=True,
    ),
    "MoEITLP95High": Fixture(
        series=f'moe_watch_inter_token_latency_seconds_bucket{{{ENGINE},model="mixtral"}}',
        histogram=True,
    ),
    "MoEQueueLong": Fixture(
        series=f'moe_watch_requests_waiting{{{ENGINE},model="mixtral"}}',
    ),
    "MoEConfigDrift": Fixture(
        series=f'moe_watch_config_drift{{{ENGINE},setting="gpu_memory_utilization"}}',
        fire=_v(1),
        quiet=_v(0),
    ),
    "MoEAboveSizedBudget": Fixture(
        series=f'moe_watch_budget_used_ratio{{{ENGINE},gpu="0"}}',
    ),
    "MoETargetDown": Fixture(
        series=f"moe_watch_target_up{{{ENGINE}}}",
        fire=_v(0),
        quiet=_v(1),
    ),
    "MoEWatchDown": Fixture(
        series='up{$job,instance="10.0.0.5:9400",node="gpu-node-a"}',
        fire=_v(0),
        quiet=_v(1),
    ),
    "MoEWatchAbsent": Fixture(
        series='up{job="node-exporter",instance="10.0.0.5:9100"}',
        fire=_v(1),
        quiet="",
    ),
    "MoEWatchRenderFailed": Fixture(
        series='moe_watch_render_failed{part="engine:mixtral-0"}',
        fire=_v(1),
        quiet=_v(0),  # rendered again
    ),
    "MoEWatchStale": Fixture(
        series='moe_watch_last_success_timestamp_seconds{source="nvml"}',
        fire="0x60",
        quiet="0+60x60",
        eval_minutes=10,
        value_at_eval=600,
    ),
    "MoEGPULost": Fixture(
        series=f'moe_watch_gpu_up{{{ENGINE},gpu="1"}}',
        fire=_v(0),
        quiet=_v(1),
    ),
    "MoEGPUXidErrors": Fixture(
        series='moe_watch_gpu_xid_errors_total{gpu="0",xid="79"}',
        fire="0x5 1x55",
        quiet="3x60",  # an old count that does not grow
        eval_minutes=20,
    ),
    "MoEAll2AllSlow": Fixture(
        series=f'moe_watch_expert_all2all_seconds{{{ENGINE},quantile="0.95"}}',
    ),
    # The forecasts' fire and quiet values and timing follow their thresholds
    # (promtool_tests.forecast_fixture): only the series is fixed here.
    "MoEKVCacheFullSoon": Fixture(
        series=f'moe_watch_kv_cache_usage_ratio{{{ENGINE},model="mixtral"}}',
    ),
    "MoEGPUBudgetExhaustedSoon": Fixture(
        series=f'moe_watch_gpu_memory_used_bytes{{{ENGINE},gpu="0"}}',
    ),
}
