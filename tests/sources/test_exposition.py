import math

import pytest

from moe_watch import limits
from moe_watch import samples as s
from moe_watch.sources.exposition import ExpositionError, parse_engine_exposition
from tests.conftest import read_capture


def only_model(text: str, kind: str = "auto") -> s.ModelSample:
    parsed = parse_engine_exposition(text, kind)
    assert len(parsed.models) == 1
    return parsed.models[0]


def test_real_capture_after_load_gives_the_documented_totals() -> None:
    parsed = parse_engine_exposition(read_capture("after-load"))
    assert parsed.kind == "vllm"
    model = parsed.models[0]
    assert model.model == "tiny-mixtral"
    # The capture's README: 95 requests, 19,280 generated tokens.
    assert model.counters[s.COUNTER_REQUESTS_FINISHED] == 95
    assert model.counters[s.COUNTER_GENERATION_TOKENS] == 19280
    assert model.counters[s.COUNTER_PROMPT_TOKENS] == 3370
    e2e = model.histograms[s.LATENCY_E2E]
    assert e2e.count == 95
    assert e2e.buckets[-1] == (math.inf, 95)
    assert model.histograms[s.LATENCY_ITL].count == 19185
    # cache_config_info: 8192 blocks x 128 tokens
    assert model.gauges[s.GAUGE_KV_CACHE_CAPACITY_TOKENS] == 8192 * 128
    assert parsed.info["gpu_memory_utilization"] == "0.92"
    assert parsed.info["enable_prefix_caching"] == "True"
    assert "engine" not in parsed.info
    assert parsed.dropped_samples == 0


def test_real_busy_capture_shows_the_queue() -> None:
    model = only_model(read_capture("busy"))
    assert model.gauges[s.GAUGE_REQUESTS_RUNNING] == 8
    assert model.gauges[s.GAUGE_REQUESTS_WAITING] == 52
    assert 0 < model.gauges[s.GAUGE_KV_CACHE_USAGE] < 0.01


@pytest.mark.parametrize("state", ["fresh", "after-5-requests", "busy", "after-load"])
def test_every_real_capture_parses_with_all_latency_kinds(state: str) -> None:
    model = only_model(read_capture(state))
    # and the engine's tokens per step, whose count is its steps (the batching curve's batch)
    assert set(model.histograms) == {
        *s.LATENCY_KINDS,
        s.HISTOGRAM_ITERATION_TOKENS,
        s.HISTOGRAM_PROMPT_TOKENS,
        s.HISTOGRAM_GENERATION_TOKENS,
    }


def test_finished_requests_keep_their_reason_and_lengths_their_buckets() -> None:
    model = only_model(read_capture("after-load"))
    by_reason = model.labelled_counters[s.COUNTER_REQUESTS_FINISHED]
    assert dict(by_reason) == {"stop": 0, "length": 95, "abort": 0, "error": 0, "repetition": 0}
    assert sum(by_reason.values()) == model.counters[s.COUNTER_REQUESTS_FINISHED]
    prompt = model.histograms[s.HISTOGRAM_PROMPT_TOKENS]
    assert prompt.count == 95
    assert prompt.sum == 3370
    assert [b for b, _ in prompt.buckets][:3] == [1.0, 2.0, 5.0]
    assert model.histograms[s.HISTOGRAM_GENERATION_TOKENS].sum == 19280


def test_distinct_values_of_a_split_label_are_bounded_and_counted() -> None:
    lines = ["# TYPE vllm:request_success counter"]
    lines += [
        f'vllm:request_success_total{{finished_reason="r{i}",model_name="m"}} 1'
        for i in range(limits.LABEL_VALUES_PER_COUNTER + 3)
    ]
    parsed = parse_engine_exposition("\n".join(lines) + "\n")
    model = parsed.models[0]
    assert len(model.labelled_counters[s.COUNTER_REQUESTS_FINISHED]) == (
        limits.LABEL_VALUES_PER_COUNTER
    )
    assert model.counters[s.COUNTER_REQUESTS_FINISHED] == limits.LABEL_VALUES_PER_COUNTER + 3
    assert parsed.series_dropped == 3


def test_the_busy_capture_generates_about_one_token_per_running_request_and_step() -> None:
    model = only_model(read_capture("busy"))
    steps = model.histograms[s.HISTOGRAM_ITERATION_TOKENS].count
    assert steps == 594
    assert model.counters[s.COUNTER_GENERATION_TOKENS] / steps == pytest.approx(7.4, abs=0.05)


LEGACY = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.42
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 100
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 40
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.1",model_name="m"} 3
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 4
vllm:time_per_output_token_seconds_count{model_name="m"} 4
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.5
"""


def test_legacy_vllm_names_map_to_the_same_keys() -> None:
    model = only_model(LEGACY)
    assert model.gauges[s.GAUGE_KV_CACHE_USAGE] == 0.42
    assert model.counters[s.COUNTER_PREFIX_QUERIES] == 100
    assert model.counters[s.COUNTER_PREFIX_HITS] == 40
    assert model.histograms[s.LATENCY_ITL].count == 4


def test_current_name_wins_when_both_are_published() -> None:
    both = (
        LEGACY
        + '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.9\n'
    )
    assert only_model(both).gauges[s.GAUGE_KV_CACHE_USAGE] == 0.9


DATA_PARALLEL = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3
vllm:num_requests_running{engine="1",model_name="m"} 5
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.97
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 1
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 2
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 3
vllm:e2e_request_latency_seconds_bucket{engine="1",le="1.0",model_name="m"} 4
vllm:e2e_request_latency_seconds_bucket{engine="1",le="+Inf",model_name="m"} 4
vllm:e2e_request_latency_seconds_count{engine="1",model_name="m"} 4
vllm:e2e_request_latency_seconds_sum{engine="1",model_name="m"} 1
"""


def test_data_parallel_replicas_sum_counts_and_keep_the_fullest_kv_cache() -> None:
    model = only_model(DATA_PARALLEL)
    assert model.gauges[s.GAUGE_REQUESTS_RUNNING] == 8
    assert model.gauges[s.GAUGE_KV_CACHE_USAGE] == 0.97
    e2e = model.histograms[s.LATENCY_E2E]
    assert e2e.buckets == ((1.0, 5), (math.inf, 6))
    assert e2e.count == 6
    assert e2e.sum == 4


def test_two_models_on_one_engine_stay_apart() -> None:
    text = '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="a"} 1\nvllm:num_requests_waiting{model_name="b"} 7\n'
    parsed = parse_engine_exposition(text)
    assert {m.model: m.gauges[s.GAUGE_REQUESTS_WAITING] for m in parsed.models} == {"a": 1, "b": 7}


def test_nan_and_inf_values_are_dropped_and_counted() -> None:
    text = '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} NaN\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} +Inf\n# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
    parsed = parse_engine_exposition(text)
    model = parsed.models[0]
    assert s.GAUGE_REQUESTS_RUNNING not in model.gauges
    assert s.GAUGE_REQUESTS_WAITING not in model.gauges
    assert model.gauges[s.GAUGE_KV_CACHE_USAGE] == 0.5
    assert parsed.dropped_samples == 2


def test_histogram_cut_before_its_inf_bucket_is_dropped_not_trusted() -> None:
    text = '# TYPE vllm:e2e_request_latency_seconds histogram\nvllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 1\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 2\n'
    parsed = parse_engine_exposition(text)
    assert s.LATENCY_E2E not in parsed.models[0].histograms
    assert parsed.dropped_samples == 1


def test_non_cumulative_buckets_are_rejected() -> None:
    text = (
        "# TYPE vllm:e2e_request_latency_seconds histogram\n"
        'vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 5\n'
        'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 3\n'
        'vllm:e2e_request_latency_seconds_count{model_name="m"} 3\n'
        'vllm:e2e_request_latency_seconds_sum{model_name="m"} 1\n'
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 0\n'
    )
    parsed = parse_engine_exposition(text)
    assert parsed.models[0].histograms == {}
    assert parsed.dropped_samples == 1


@pytest.mark.parametrize(
    "marker", ["vllm:e2e_request_latency_seconds_bucket", "# HELP vllm:prompt_tokens_total"]
)
def test_a_body_cut_mid_line_is_truncated_even_where_the_rest_would_parse(marker: str) -> None:
    text = read_capture("after-load")
    cut = text[: text.index(marker) + 20]  # mid-sample, or mid-comment (which would parse)
    with pytest.raises(ExpositionError) as err:
        parse_engine_exposition(cut)
    assert err.value.reason == "truncated"


@pytest.mark.parametrize(
    "garbage",
    ["", "<html><body>502 Bad Gateway</body></html>", '{"detail": "Not Found"}', "\x00\x01\x02"],
)
def test_garbage_is_a_clear_error(garbage: str) -> None:
    with pytest.raises(ExpositionError) as err:
        parse_engine_exposition(garbage)
    assert err.value.reason == "no_engine_metrics"
    assert "vllm" in str(err.value)


def test_malformed_line_in_an_ignored_family_does_not_fail_the_scrape() -> None:
    text = read_capture("busy") + "python_gc_objects_collected_total{generation=oops} 1\n"
    assert only_model(text).gauges[s.GAUGE_REQUESTS_WAITING] == 52


def test_garbage_inside_a_used_family_is_a_parse_error() -> None:
    text = (
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} twelve\n'
    )
    with pytest.raises(ExpositionError) as err:
        parse_engine_exposition(text)
    assert err.value.reason == "parse"


SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen3-moe"} 12
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen3-moe"} 130
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen3-moe"} 0.96
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="qwen3-moe"} 0.35
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="qwen3-moe"} 500000
"""


def test_sglang_names_map_to_the_same_keys() -> None:
    parsed = parse_engine_exposition(SGLANG)
    assert parsed.kind == "sglang"
    model = parsed.models[0]
    assert model.gauges[s.GAUGE_REQUESTS_RUNNING] == 12
    assert model.gauges[s.GAUGE_REQUESTS_WAITING] == 130
    assert model.gauges[s.GAUGE_KV_CACHE_USAGE] == 0.96
    assert model.gauges[s.GAUGE_KV_CACHE_HIT_RATE] == 0.35
    assert model.gauges[s.GAUGE_KV_CACHE_CAPACITY_TOKENS] == 500000
