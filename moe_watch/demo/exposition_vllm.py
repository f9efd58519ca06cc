"""vLLM's /metrics for the simulated engine: names, labels, HELP texts and bucket layouts of a
real vLLM 0.32 (tests/fixtures/vllm/), or of an older vLLM (``legacy``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from moe_watch.demo.simulated_engine import EngineSim


class VllmCollector(Collector):
    """vLLM 0.32 names (or, ``legacy``, the pre-0.10 names), labels engine and model_name."""

    def __init__(self, sim: EngineSim, *, legacy: bool) -> None:
        self.sim = sim
        self.legacy = legacy
        self.labels = ["engine", "model_name"]
        self.key = ["0", sim.model_name]

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield from self._counters()
        yield from self._histograms()
        yield self._cache_config()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=self.labels)
        family.add_metric(self.key, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=self.labels)
        family.add_metric(self.key, value, created=self.sim.counters_started)
        return family

    def _gauges(self) -> Iterator[Metric]:
        sim = self.sim
        yield self._gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            sim.running,
        )
        yield self._gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", sim.waiting
        )
        if not self.legacy:
            by_reason = GaugeMetricFamily(
                "vllm:num_requests_waiting_by_reason",
                "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
                labels=[*self.labels, "reason"],
            )
            by_reason.add_metric([*self.key, "capacity"], sim.waiting)
            by_reason.add_metric([*self.key, "deferred"], 0.0)
            yield by_reason
        usage = "vllm:gpu_cache_usage_perc" if self.legacy else "vllm:kv_cache_usage_perc"
        yield self._gauge(usage, "KV-cache usage. 1 means 100 percent usage.", sim.kv_usage)

    def _counters(self) -> Iterator[Metric]:
        sim = self.sim
        prefix = "vllm:gpu_prefix_cache" if self.legacy else "vllm:prefix_cache"
        yield self._counter(
            f"{prefix}_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            sim.prefix_queries_total,
        )
        yield self._counter(
            f"{prefix}_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            sim.prefix_hits_total,
        )
        yield self._counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            sim.preemptions_total,
        )
        yield self._counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", sim.prompt_tokens_total
        )
        yield self._counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            sim.generation_tokens_total,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["engine", "finished_reason", "model_name"],
        )
        for reason, count in sim.finished_total.items():
            success.add_metric(["0", reason, sim.model_name], count, created=sim.counters_started)
        yield success
        if not self.legacy:
            # vLLM 0.32 labels this family with model_name and reason only (no engine).
            rejections = CounterMetricFamily(
                "vllm:admission_rejections",
                "Number of admission attempts rejected by a queue limit, by reason.",
                labels=["model_name", "reason"],
            )
            for reason, count in (
                ("max_num_queued_reqs", sim.rejected_total),
                ("max_num_queued_tokens", 0),
            ):
                rejections.add_metric([sim.model_name, reason], count, created=sim.counters_started)
            yield rejections

    def _histograms(self) -> Iterator[Metric]:
        sim = self.sim
        itl = (
            "vllm:time_per_output_token_seconds"
            if self.legacy
            else "vllm:inter_token_latency_seconds"
        )
        itl_doc = (
            "Histogram of time per output token in seconds."
            if self.legacy
            else "Histogram of inter-token latency in seconds."
        )
        for name, doc, histogram in (
            (
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                sim.request_prompt_tokens,
            ),
            (
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                sim.request_generation_tokens,
            ),
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                sim.ttft,
            ),
            (itl, itl_doc, sim.itl),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                sim.e2e,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                sim.queue,
            ),
            (
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                sim.iteration_tokens,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=self.labels)
            family.add_metric(self.key, histogram.cumulative(0), histogram.sum)
            # prometheus_client renders `<name>_created` as its own gauge family, as vLLM's does.
            family.samples.append(
                Sample(
                    f"{name}_created",
                    dict(zip(self.labels, self.key, strict=True)),
                    sim.counters_started,
                )
            )
            yield family

    def _cache_config(self) -> GaugeMetricFamily:
        """vllm:cache_config_info with vLLM 0.32's full label set (values the sim's settings)."""
        s = self.sim.scenario
        tokens = s.num_gpu_blocks * s.block_size
        labels = {
            "_block_size_resolved": "True",
            "block_size": str(s.block_size),
            "cache_dtype": "auto",
            "cache_hit_alignment_tokens": "None",
            "effective_attention_block_size": str(s.block_size),
            "enable_mamba_shared_prefix_checkpoint": "False",
            "enable_prefix_caching": "True",
            "engine": "0",
            "gpu_memory_utilization": str(s.gpu_memory_utilization),
            "hash_block_size": "None",
            "is_attention_free": "False",
            "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "None",
            "kv_cache_max_concurrency": str(tokens / s.max_model_len),
            "kv_cache_memory_bytes": str(s.kv_bytes_per_gpu),
            "kv_cache_size_tokens": str(tokens),
            "kv_offloading_backend": "native",
            "kv_offloading_size": "None",
            "kv_sharing_fast_prefill": "False",
            "mamba_block_size": "None",
            "mamba_cache_dtype": "auto",
            "mamba_cache_mode": "none",
            "mamba_page_size_padded": "None",
            "mamba_ssm_cache_dtype": "float32",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(s.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_cache_retention_interval": "0",
            "prefix_caching_hash_algo": "sha256",
            "prefix_match_unit": "None",
            "replayssm_buffer_len": "16",
            "skip_page_size_padded": "None",
            "sliding_window": "None",
            "swa_bounded_replay": "True",
            "use_kda_recoverssm": "False",
            "use_replayssm": "False",
            "user_specified_block_size": "False",
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=list(labels),
        )
        info.add_metric(list(labels.values()), 1.0)
        return info
