"""Which engine metric feeds which canonical sample key: data, not code.

Each entry maps an engine's *sample* name to ``(kind of value, canonical key, priority)``.
When an engine exposes two names for one key (vLLM renamed several families and some
releases publish both during the deprecation), the higher priority wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_watch import samples as s

ValueKind = Literal["gauge", "counter", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one engine sample name goes: its kind of value, its canonical key, its priority."""

    value_kind: ValueKind
    key: str
    priority: int = 1
    # A counter's label whose values are also kept apart (summed into ``key`` as well).
    split_by: str = ""


# vLLM V1 engine (0.3x). Older names (pre-0.10) carry priority 0.
VLLM: dict[str, Route] = {
    "vllm:num_requests_running": Route("gauge", s.GAUGE_REQUESTS_RUNNING),
    "vllm:num_requests_waiting": Route("gauge", s.GAUGE_REQUESTS_WAITING),
    "vllm:kv_cache_usage_perc": Route("gauge", s.GAUGE_KV_CACHE_USAGE),
    "vllm:gpu_cache_usage_perc": Route("gauge", s.GAUGE_KV_CACHE_USAGE, 0),
    "vllm:prompt_tokens_total": Route("counter", s.COUNTER_PROMPT_TOKENS),
    "vllm:generation_tokens_total": Route("counter", s.COUNTER_GENERATION_TOKENS),
    "vllm:num_preemptions_total": Route("counter", s.COUNTER_PREEMPTIONS),
    "vllm:prefix_cache_queries_total": Route("counter", s.COUNTER_PREFIX_QUERIES),
    "vllm:prefix_cache_hits_total": Route("counter", s.COUNTER_PREFIX_HITS),
    "vllm:gpu_prefix_cache_queries_total": Route("counter", s.COUNTER_PREFIX_QUERIES, 0),
    "vllm:gpu_prefix_cache_hits_total": Route("counter", s.COUNTER_PREFIX_HITS, 0),
    "vllm:request_success_total": Route(
        "counter", s.COUNTER_REQUESTS_FINISHED, split_by="finished_reason"
    ),
    "vllm:e2e_request_latency_seconds": Route("histogram", s.LATENCY_E2E),
    "vllm:time_to_first_token_seconds": Route("histogram", s.LATENCY_TTFT),
    "vllm:inter_token_latency_seconds": Route("histogram", s.LATENCY_ITL),
    "vllm:time_per_output_token_seconds": Route("histogram", s.LATENCY_ITL, 0),
    "vllm:request_queue_time_seconds": Route("histogram", s.LATENCY_QUEUE),
    "vllm:iteration_tokens_total": Route("histogram", s.HISTOGRAM_ITERATION_TOKENS),
    "vllm:request_prompt_tokens": Route("histogram", s.HISTOGRAM_PROMPT_TOKENS),
    "vllm:request_generation_tokens": Route("histogram", s.HISTOGRAM_GENERATION_TOKENS),
    "vllm:cache_config_info": Route("info", "cache_config"),
}

# SGLang (names checked against python/sglang/srt/metrics/collector.py). It reports the prefix-cache hit rate only
# as a ratio gauge, and its KV capacity as max_total_num_tokens.
SGLANG: dict[str, Route] = {
    "sglang:num_running_reqs": Route("gauge", s.GAUGE_REQUESTS_RUNNING),
    "sglang:num_queue_reqs": Route("gauge", s.GAUGE_REQUESTS_WAITING),
    "sglang:token_usage": Route("gauge", s.GAUGE_KV_CACHE_USAGE),
    "sglang:cache_hit_rate": Route("gauge", s.GAUGE_KV_CACHE_HIT_RATE),
    "sglang:max_total_num_tokens": Route("gauge", s.GAUGE_KV_CACHE_CAPACITY_TOKENS),
    "sglang:prompt_tokens_total": Route("counter", s.COUNTER_PROMPT_TOKENS),
    "sglang:generation_tokens_total": Route("counter", s.COUNTER_GENERATION_TOKENS),
    "sglang:num_requests_total": Route("counter", s.COUNTER_REQUESTS_FINISHED),
    "sglang:num_retracted_requests_total": Route("counter", s.COUNTER_PREEMPTIONS),
    "sglang:e2e_request_latency_seconds": Route("histogram", s.LATENCY_E2E),
    "sglang:time_to_first_token_seconds": Route("histogram", s.LATENCY_TTFT),
    "sglang:inter_token_latency_seconds": Route("histogram", s.LATENCY_ITL),
    "sglang:time_per_output_token_seconds": Route("histogram", s.LATENCY_ITL, 0),
    "sglang:queue_time_seconds": Route("histogram", s.LATENCY_QUEUE),
}

BY_KIND: dict[str, dict[str, Route]] = {"vllm": VLLM, "sglang": SGLANG}
PREFIXES: dict[str, str] = {"vllm": "vllm:", "sglang": "sglang:"}

# Labels that identify a model. vLLM and SGLang both use model_name.
MODEL_LABEL = "model_name"
