"""SGLang's /metrics for the simulated engine."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from moe_watch.demo.simulated_engine import EngineSim


class SglangCollector(Collector):
    """SGLang names, HELP texts and bucket layouts; label model_name. SGLang runs prometheus_client
    in multiprocess mode, which writes no ``_created`` series."""

    def __init__(self, sim: EngineSim) -> None:
        self.sim = sim
        self.key = [sim.model_name]

    def collect(self) -> Iterator[Metric]:
        sim = self.sim
        for name, doc, value in (
            ("sglang:num_running_reqs", "The number of running requests.", sim.running),
            ("sglang:num_used_tokens", "The number of used tokens.", sim.kv_tokens),
            ("sglang:token_usage", "The token usage.", sim.kv_usage),
            (
                "sglang:gen_throughput",
                "The generation throughput (token/s).",
                sim.generation_tokens_per_second,
            ),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", sim.waiting),
            ("sglang:cache_hit_rate", "The prefix cache hit rate.", sim.prefix_hit_ratio),
            (
                "sglang:max_total_num_tokens",
                "Maximum total number of tokens in the KV cache pool.",
                sim.capacity_tokens,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(self.key, value)
            yield gauge
        for name, doc, value in (
            (
                "sglang:prompt_tokens",
                "Number of prefill tokens processed.",
                sim.prompt_tokens_total,
            ),
            (
                "sglang:generation_tokens",
                "Number of generation tokens processed.",
                sim.generation_tokens_total,
            ),
            ("sglang:cached_tokens", "Number of cached prompt tokens.", sim.prefix_hits_total),
            ("sglang:num_requests", "Number of requests processed.", sim.requests_finished_total),
            (
                "sglang:num_retracted_requests",
                "Total number of retracted requests.",
                sim.preemptions_total,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(self.key, value)
            yield counter
        for name, doc, histogram in (
            (
                "sglang:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                sim.ttft,
            ),
            (
                "sglang:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                sim.itl,
            ),
            (
                "sglang:e2e_request_latency_seconds",
                "Histogram of End-to-end request latency in seconds",
                sim.e2e,
            ),
            ("sglang:queue_time_seconds", "Histogram of queueing time in seconds.", sim.queue),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(self.key, histogram.cumulative(1), histogram.sum)
            yield family
