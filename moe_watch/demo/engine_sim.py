"""A deterministic simulated MoE serving engine: the demo's vLLM, and a test double with scenarios.

Pure: time is passed in, randomness comes from a seeded ``random.Random``, nothing does I/O.
``advance(now)`` moves requests through queue -> running batch -> finished in fixed sub-steps;
``render()`` writes a Prometheus exposition with the names, labels and bucket layouts of a real
vLLM 0.32 (see tests/fixtures/vllm/), or the older vLLM names, or SGLang's. The simulated engine
also routes every token to top-k experts per MoE layer, so expert-load skew has data too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

Flavor = Literal["vllm", "vllm_legacy", "sglang"]
GIB = 1024**3
STEP_SECONDS = 0.25
MAX_STEPS_PER_ADVANCE = 2400  # 10 simulated minutes; a longer gap is skipped, not simulated

# vLLM 0.32 bucket layouts (tests/fixtures/vllm/*.prom).
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
QUEUE_BUCKETS = E2E_BUCKETS


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    arrival_rate: float = 3.0  # requests/s
    prompt_tokens: tuple[int, int] = (200, 1200)  # uniform range
    generation_tokens: tuple[int, int] = (50, 300)
    max_num_seqs: int = 16
    num_gpu_blocks: int = 1536
    block_size: int = 16
    ttft_seconds: float = 0.12
    itl_seconds: float = 0.02
    admit_below_kv_usage: float = 0.9  # the scheduler stops admitting above this
    preempt_above_kv_usage: float = 0.97  # out of blocks: the newest running request is evicted
    latency_multiplier: float = 1.0  # slow engine: everything takes longer
    prefix_hit_ratio: float = 0.5
    restart_every_seconds: float | None = None
    # GPUs of the engine (expert parallel): utilization follows the load of the experts on each.
    gpu_count: int = 2
    gpu_memory_total_bytes: int = 80 * GIB
    weights_bytes_per_gpu: int = 50 * GIB  # Mixtral 8x7B BF16 (47 GiB each, EP=2) + CUDA graphs
    kv_bytes_per_gpu: int = 22 * GIB  # the KV pool at full usage
    gpu_lost_after_seconds: float | None = None  # the demo marks GPU 1 lost after this
    # Model shape and routing: a hot (layer, expert) gets `hot_share` of that layer's tokens;
    # a collapsed (layer, expert) gets `collapse_share` (> 0.40 = expert collapse).
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    hot_expert: tuple[int, int] | None = None
    hot_share: float = 0.39  # skew = 0.39 / 2 * 8 - 1 = 0.56 for top-2 of 8, below collapse
    collapsed_expert: tuple[int, int] | None = None
    collapse_share: float = 0.55


_BASE = Scenario(
    "normal", "healthy: KV 30-60 %, prefix hit ~50 %, P95 e2e of a few seconds, even routing"
)
SCENARIOS: dict[str, Scenario] = {
    "normal": _BASE,
    "hot_expert": replace(
        _BASE,
        name="hot_expert",
        description="layer 3 skewed > 50 %, expert 2 of layer 17 collapsed (> 40 % share); the GPU hosting the hot expert runs hot",
        hot_expert=(3, 5),
        collapsed_expert=(17, 2),
    ),
    "kv_pressure": replace(
        _BASE,
        name="kv_pressure",
        description="KV cache fills past 95 %: preemptions, > 100 waiting requests, VRAM > 95 %",
        arrival_rate=12.0,
        generation_tokens=(800, 1600),
        max_num_seqs=64,
        num_gpu_blocks=1024,
        admit_below_kv_usage=0.985,
        preempt_above_kv_usage=0.995,
        kv_bytes_per_gpu=29 * GIB,
    ),
    "slow_engine": replace(
        _BASE,
        name="slow_engine",
        description="everything 15x slower: P95 e2e > 30 s, TTFT in seconds",
        latency_multiplier=15.0,
        arrival_rate=1.0,
    ),
    "gpu_lost": replace(
        _BASE,
        name="gpu_lost",
        description="GPU 1 falls off the bus after 10 s",
        gpu_lost_after_seconds=10.0,
    ),
    "restart": replace(
        _BASE,
        name="restart",
        description="the engine restarts every 60 s: counters reset",
        restart_every_seconds=60.0,
    ),
}


@dataclass
class _Request:
    prompt: int
    target: int
    arrived: float
    started: float = -1.0
    generated: float = 0.0


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[float] = field(default_factory=list)
    total: float = 0.0
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0.0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0.0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", self.total))
        return out


class EngineSim:
    """One simulated engine serving one model."""

    version = "0.32.0"

    def __init__(
        self,
        scenario: Scenario,
        *,
        model_name: str = "mixtral-8x7b",
        seed: int = 0,
        start_time: float = 0.0,
    ) -> None:
        self.scenario = scenario
        self.model_name = model_name
        self.started = start_time
        self.now = start_time
        self._rng = random.Random(seed)
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._arrival_debt = 0.0
        self._last_restart = start_time
        self._reset_state()

    def _reset_state(self) -> None:
        self.prompt_tokens_total = 0.0
        self.generation_tokens_total = 0.0
        self.requests_finished_total = 0.0
        self.preemptions_total = 0.0
        self.prefix_queries_total = 0.0
        self.prefix_hits_total = 0.0
        self.e2e = _Histogram(E2E_BUCKETS)
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.queue = _Histogram(QUEUE_BUCKETS)
        s = self.scenario
        self.expert_counts = [[0] * s.num_experts for _ in range(s.num_layers)]
        self.counters_started = self.now

    # -- state ----------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.scenario.num_gpu_blocks * self.scenario.block_size

    @property
    def kv_usage(self) -> float:
        used = sum(r.prompt + r.generated for r in self._running)
        return min(1.0, used / self.capacity_tokens)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reset_counters(self) -> None:
        """What an engine restart looks like from outside: every counter back to 0."""
        self._waiting.clear()
        self._running.clear()
        self._reset_state()

    def advance(self, now: float) -> None:
        steps = int((now - self.now) / STEP_SECONDS)
        if steps <= 0:
            return
        if steps > MAX_STEPS_PER_ADVANCE:  # a long pause: jump, don't replay hours of traffic
            self.now += (steps - MAX_STEPS_PER_ADVANCE) * STEP_SECONDS
            steps = MAX_STEPS_PER_ADVANCE
        for _ in range(steps):
            self.now += STEP_SECONDS
            self._step(STEP_SECONDS)

    def _step(self, dt: float) -> None:
        s = self.scenario
        if s.restart_every_seconds and self.now - self._last_restart >= s.restart_every_seconds:
            self._last_restart = self.now
            self.reset_counters()
        self._arrive(dt)
        self._admit()
        itl = s.itl_seconds * s.latency_multiplier * (1.0 + 0.02 * len(self._running))
        finished: list[_Request] = []
        made = 0.0
        for request in self._running:
            before = request.generated
            request.generated = min(request.target, request.generated + dt / itl)
            made += request.generated - before
            if request.generated >= request.target:
                finished.append(request)
        self.generation_tokens_total += made
        self._route(made)
        for request in finished:
            self._running.remove(request)
            self._finish(request, itl)
        while (
            self.kv_usage > s.preempt_above_kv_usage and len(self._running) > 1
        ):  # out of KV blocks: preempt
            victim = self._running.pop()
            victim.generated = 0.0
            self._waiting.insert(0, victim)
            self.preemptions_total += 1

    def _arrive(self, dt: float) -> None:
        s = self.scenario
        self._arrival_debt += s.arrival_rate * dt * self._rng.uniform(0.5, 1.5)
        while self._arrival_debt >= 1.0:
            self._arrival_debt -= 1.0
            prompt = self._rng.randint(*s.prompt_tokens)
            self._waiting.append(
                _Request(prompt, self._rng.randint(*s.generation_tokens), self.now)
            )

    def _admit(self) -> None:
        s = self.scenario
        while (
            self._waiting
            and len(self._running) < s.max_num_seqs
            and self.kv_usage < s.admit_below_kv_usage
        ):
            request = self._waiting.pop(0)
            request.started = self.now
            self._running.append(request)
            self.queue.observe(self.now - request.arrived)
            hits = math.floor(request.prompt * s.prefix_hit_ratio * self._rng.uniform(0.8, 1.2))
            self.prefix_queries_total += request.prompt
            self.prefix_hits_total += min(hits, request.prompt)
            self.prompt_tokens_total += request.prompt
            self._route(request.prompt)

    def _finish(self, request: _Request, itl: float) -> None:
        s = self.scenario
        ttft = (
            s.ttft_seconds
            * s.latency_multiplier
            * (1 + request.prompt / 2000)
            * self._rng.uniform(0.7, 1.5)
        )
        self.requests_finished_total += 1
        self.ttft.observe(ttft)
        self.itl.observe(itl * self._rng.uniform(0.8, 1.3))
        self.e2e.observe((self.now - request.arrived) + ttft)

    def _route(self, tokens: float) -> None:
        """Assign ``tokens`` x top_k to experts, per layer, by the scenario's routing shares."""
        whole = int(tokens)
        if whole <= 0:
            return
        s = self.scenario
        for layer, row in enumerate(self.expert_counts):
            shares = self._shares(layer)
            assignments = whole * s.top_k
            given = 0
            for expert in range(s.num_experts - 1):
                n = round(assignments * shares[expert] * self._rng.uniform(0.9, 1.1))
                n = min(n, assignments - given)
                row[expert] += n
                given += n
            row[-1] += assignments - given

    def _shares(self, layer: int) -> list[float]:
        s = self.scenario
        even = [1.0 / s.num_experts] * s.num_experts
        for special, share in ((s.hot_expert, s.hot_share), (s.collapsed_expert, s.collapse_share)):
            if special is not None and special[0] == layer:
                # token share = c_e * k / sum(c): the expert gets share / k of the assignments
                target = share / s.top_k
                rest = (1.0 - target) / (s.num_experts - 1)
                even = [rest] * s.num_experts
                even[special[1]] = target
        return even

    # -- GPUs -----------------------------------------------------------------------------
    def gpu_utilization(self, gpu: int) -> float:
        """Busy fraction of one GPU: batch occupancy, weighted by the experts it hosts."""
        s = self.scenario
        occupancy = min(1.0, 0.3 + 0.6 * len(self._running) / s.max_num_seqs)
        per_gpu = s.num_experts // s.gpu_count or 1
        experts = range(gpu * per_gpu, (gpu + 1) * per_gpu)
        totals = [sum(row[e] for row in self.expert_counts) for e in range(s.num_experts)]
        everything = sum(totals)
        if everything <= 0:
            return round(occupancy * 0.5, 3)
        load = sum(totals[e] for e in experts) / everything * s.gpu_count  # 1.0 = fair share
        if s.hot_expert is not None:
            load = (
                1.6 if s.hot_expert[1] in experts else 0.45
            )  # EP: the hot expert's GPU does it all
        return round(max(0.0, min(0.99, occupancy * load)), 3)

    def gpu_memory_used_bytes(self, gpu: int) -> int:
        s = self.scenario
        # weights + CUDA context/activations + the KV pool (allocated up front, touched with use)
        used = (
            s.weights_bytes_per_gpu
            + 2.5 * GIB
            + s.kv_bytes_per_gpu * min(1.0, self.kv_usage + 0.45)
        )
        return int(min(used, 0.99 * s.gpu_memory_total_bytes))

    # -- what the engine's HTTP server answers ----------------------------------------------
    def models_json(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "owned_by": "vllm",
                    "root": self.model_name,
                    "max_model_len": 32768,
                }
            ],
        }

    def render(self, flavor: Flavor = "vllm") -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SimCollector(self, flavor))
        return generate_latest(registry).decode()


class _SimCollector(Collector):
    def __init__(self, sim: EngineSim, flavor: Flavor) -> None:
        self.sim = sim
        self.flavor = flavor

    def collect(self) -> Iterator[Metric]:
        if self.flavor == "sglang":
            yield from self._sglang()
        else:
            yield from self._vllm(legacy=self.flavor == "vllm_legacy")

    def _vllm(self, *, legacy: bool) -> Iterator[Metric]:
        sim, s = self.sim, self.sim.scenario
        labels, key = ["engine", "model_name"], ["0", sim.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(key, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(key, value)
            return family

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            sim.running,
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", sim.waiting
        )
        usage = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
        yield gauge(usage, "KV-cache usage. 1 means 100 percent usage.", sim.kv_usage)
        prefix = "vllm:gpu_prefix_cache" if legacy else "vllm:prefix_cache"
        yield counter(
            f"{prefix}_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            sim.prefix_queries_total,
        )
        yield counter(
            f"{prefix}_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            sim.prefix_hits_total,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            sim.preemptions_total,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", sim.prompt_tokens_total
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            sim.generation_tokens_total,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["engine", "finished_reason", "model_name"],
        )
        for reason in ("stop", "length", "abort", "error", "repetition"):
            success.add_metric(
                ["0", reason, sim.model_name],
                sim.requests_finished_total if reason == "length" else 0.0,
            )
        yield success
        itl = "vllm:time_per_output_token_seconds" if legacy else "vllm:inter_token_latency_seconds"
        for name, doc, histogram in (
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                sim.e2e,
            ),
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                sim.ttft,
            ),
            (itl, "Histogram of inter-token latency in seconds.", sim.itl),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                sim.queue,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=labels)
            family.add_metric(key, histogram.cumulative(), histogram.sum)
            yield family
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "gpu_memory_utilization",
                "num_gpu_blocks",
            ],
        )
        info.add_metric([str(s.block_size), "auto", "True", "0", "0.9", str(s.num_gpu_blocks)], 1.0)
        yield info

    def _sglang(self) -> Iterator[Metric]:
        sim = self.sim
        labels, key = ["model_name"], [sim.model_name]
        for name, doc, value in (
            ("sglang:num_running_reqs", "The number of running requests", sim.running),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue", sim.waiting),
            ("sglang:token_usage", "The token usage", sim.kv_usage),
            ("sglang:cache_hit_rate", "The cache hit rate", sim.scenario.prefix_hit_ratio),
            (
                "sglang:max_total_num_tokens",
                "Maximum total number of tokens in the KV cache pool.",
                sim.capacity_tokens,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(key, value)
            yield family
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
            ("sglang:num_requests", "Number of requests processed.", sim.requests_finished_total),
            (
                "sglang:num_retracted_requests",
                "The number of retracted requests.",
                sim.preemptions_total,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(key, value)
            yield counter
        for name, histogram in (
            ("sglang:e2e_request_latency_seconds", sim.e2e),
            ("sglang:time_to_first_token_seconds", sim.ttft),
            ("sglang:inter_token_latency_seconds", sim.itl),
            ("sglang:queue_time_seconds", sim.queue),
        ):
            hist = HistogramMetricFamily(name, f"Histogram of {name[7:]}.", labels=labels)
            hist.add_metric(key, histogram.cumulative(), histogram.sum)
            yield hist


def _le(bound: float) -> str:
    return repr(float(bound))
