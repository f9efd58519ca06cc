"""A deterministic simulated MoE serving engine: the demo's vLLM, and a test double with scenarios.

Pure: time is passed in, randomness comes from a seeded ``random.Random``, nothing does I/O.
``advance(now)`` moves requests through queue -> prefill -> decode -> finished in fixed sub-steps
of ``STEP_SECONDS``; ``render()`` writes a Prometheus exposition with the names, labels, HELP
texts and bucket layouts of a real vLLM 0.32 (tests/fixtures/vllm/), of an older vLLM, or of
SGLang. The engine also routes every token to top-k experts per MoE layer, so expert-load skew
has data too, and it says how busy and how full each of its GPUs would be.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

Flavor = Literal["vllm", "vllm_legacy", "sglang"]
FLAVORS: tuple[Flavor, ...] = ("vllm", "vllm_legacy", "sglang")
GIB = 1024**3
STEP_SECONDS = 0.25
MAX_STEPS_PER_ADVANCE = 2400  # 10 simulated minutes; a longer gap is skipped, not replayed
MAX_ARRIVALS_PER_STEP = 200  # bounds one step's work whatever the arrival rate
LOAD_SMOOTHING_SECONDS = 5.0  # time constant of the load that GPU utilization follows
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM 0.32's label values

# vLLM 0.32 bucket layouts (tests/fixtures/vllm/*.prom).
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
QUEUE_BUCKETS = E2E_BUCKETS
# SGLang's defaults (python/sglang/srt/metrics/collector.py): other layouts, same quantities.
SGLANG_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0, 600.0, 1200.0, 1800.0, 2400.0)  # fmt: skip
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0)  # fmt: skip
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)  # fmt: skip
SGLANG_QUEUE_BUCKETS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1200.0, 1400.0, 1600.0, 1800.0, 2000.0, 2500.0, 3000.0)  # fmt: skip


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's request_{prompt,generation}_tokens layout: 1, 2, 5, 10, ... up to max_model_len."""
    bounds: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(bounds)
            bounds.append(float(value))
        exponent += 1


@dataclass(frozen=True)
class Scenario:
    """What the simulated engine serves and how it is built. Add knobs here, with defaults."""

    name: str
    description: str
    # Traffic: Poisson arrivals; token counts uniform in [low, high].
    arrival_rate: float = 2.0  # requests/s
    prompt_tokens: tuple[int, int] = (400, 2000)
    generation_tokens: tuple[int, int] = (50, 300)
    stop_ratio: float = 0.8  # requests that end on a stop token; the rest hit max_tokens
    prefix_hit_ratio: float = 0.5  # share of prompt tokens found in the prefix cache
    # Scheduler and KV cache (vLLM: max_num_seqs, num_gpu_blocks x block_size tokens).
    max_num_seqs: int = 16
    max_model_len: int = 32768  # Mixtral's context; the demo's plan (demo/run.py) says the same
    max_waiting: int = 2000  # past this the engine rejects arrivals (max_num_queued_reqs)
    num_gpu_blocks: int = 2048  # 32768 tokens: vLLM refuses to start below one max_model_len
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    admit_below_kv_usage: float = 0.9  # the scheduler stops admitting above this
    preempt_above_kv_usage: float = 0.97  # out of blocks: the newest running request is evicted
    # Latency: prefill of a short prompt on an idle engine, and one decode step.
    ttft_seconds: float = 0.12
    itl_seconds: float = 0.02
    latency_multiplier: float = 1.0  # slow engine: everything takes this much longer
    restart_every_seconds: float | None = None  # the engine restarts: counters back to 0
    # GPUs of the engine (expert parallel, experts split evenly across them).
    gpu_count: int = 2
    gpu_memory_total_bytes: int = 80 * GIB  # H100 80 GB
    weights_bytes_per_gpu: int = 50 * GIB  # Mixtral 8x7B BF16 (~47 GiB each at EP=2) + graphs
    kv_bytes_per_gpu: int = 22 * GIB  # the KV pool at full usage
    gpu_lost_after_seconds: float | None = None  # the demo marks GPU 1 lost after this
    # Model shape and routing: a hot (layer, expert) gets `hot_share` of that layer's tokens, a
    # collapsed one `collapse_share` (> 0.40 = expert collapse); with a hot expert its GPU runs
    # at `hot_gpu_factor` x the batch-driven utilization and the others at `cold_gpu_factor` x.
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    hot_expert: tuple[int, int] | None = None
    hot_share: float = 0.39  # skew = 0.39 / 2 * 8 - 1 = 0.56 for top-2 of 8, below collapse
    collapsed_expert: tuple[int, int] | None = None
    collapse_share: float = 0.55
    hot_gpu_factor: float = 1.12
    cold_gpu_factor: float = 0.36

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be > 0"
            for name in ("arrival_rate", "ttft_seconds", "itl_seconds", "latency_multiplier")
            if not getattr(self, name) > 0
        ]
        for name in ("max_num_seqs", "num_gpu_blocks", "block_size", "gpu_count", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("prompt_tokens", "generation_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                problems.append(f"{name} must be 1 <= low <= high")
        if self.num_gpu_blocks * self.block_size < self.max_model_len:
            problems.append("the KV cache must hold max_model_len tokens (vLLM checks at start)")
        if self.prompt_tokens[1] + self.generation_tokens[1] > self.max_model_len:
            problems.append("the longest prompt + generation must fit in max_model_len")
        if self.top_k > self.num_experts or self.num_experts % max(1, self.gpu_count):
            problems.append("need top_k <= num_experts and num_experts divisible by gpu_count")
        for name in ("hot_expert", "collapsed_expert"):
            spot = getattr(self, name)
            if spot is not None and not (
                0 <= spot[0] < self.num_layers and 0 <= spot[1] < self.num_experts
            ):
                problems.append(f"{name} {spot} is outside the model's layers x experts")
        if problems:
            raise ValueError(f"scenario {self.name!r}: " + "; ".join(problems))


_NORMAL = Scenario(
    "normal", "healthy: KV 30-60 %, prefix hit ~50 %, P95 e2e of a few seconds, even routing"
)
SCENARIOS: dict[str, Scenario] = {
    "normal": _NORMAL,
    "hot_expert": replace(
        _NORMAL,
        name="hot_expert",
        description="layer 3 skewed > 50 %, expert 2 of layer 17 collapsed (> 40 % share); the GPU hosting the hot expert runs at ~90 %, the other at ~30 %",
        hot_expert=(3, 5),
        collapsed_expert=(17, 2),
    ),
    "kv_pressure": replace(
        _NORMAL,
        name="kv_pressure",
        description="KV cache fills past 97 %: preemptions, > 100 waiting requests, VRAM > 95 %",
        arrival_rate=3.0,
        generation_tokens=(800, 1600),
        max_num_seqs=64,
        admit_below_kv_usage=0.985,
        preempt_above_kv_usage=0.995,
        kv_bytes_per_gpu=29 * GIB,
    ),
    "slow_engine": replace(
        _NORMAL,
        name="slow_engine",
        description="everything 10x slower: P95 e2e > 30 s, TTFT in seconds",
        latency_multiplier=10.0,
        arrival_rate=0.15,
        generation_tokens=(150, 400),
    ),
    "gpu_lost": replace(
        _NORMAL,
        name="gpu_lost",
        description="healthy, then GPU 1 falls off the bus after 10 s",
        gpu_lost_after_seconds=10.0,
    ),
    "restart": replace(
        _NORMAL,
        name="restart",
        description="the engine restarts every 60 s: counters and histograms reset to 0",
        restart_every_seconds=60.0,
    ),
}


@dataclass(slots=True)
class _Request:
    prompt: int
    target: int  # tokens to generate
    finished_reason: str
    arrived: float
    itl_jitter: float  # this request's decode speed relative to the batch's
    admitted: float = -1.0  # first scheduled: the end of its queue time
    resumed: float = 0.0  # when it last entered the batch (after a preemption too)
    prefill_left: float = 0.0  # seconds of prefill still to run
    first_token: float = -1.0
    generated: float = 0.0

    @property
    def kv_tokens(self) -> int:
        return self.prompt + int(self.generated)


class SimHistogram:
    """Observations counted into one or more bucket layouts (vLLM's and SGLang's differ)."""

    __slots__ = ("count", "counts", "layouts", "sum")

    def __init__(self, *layouts: tuple[float, ...]) -> None:
        self.layouts = layouts
        self.counts = [[0] * len(bounds) for bounds in layouts]
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """``times`` observations of ``value`` (a request's tokens share one mean gap)."""
        self.count += times
        self.sum += value * times
        for bounds, counts in zip(self.layouts, self.counts, strict=True):
            index = bisect.bisect_left(bounds, value)  # first bound >= value: Prometheus' `le`
            if index < len(bounds):
                counts[index] += times

    def cumulative(self, layout: int = 0) -> list[tuple[str, float]]:
        """``(le, count)`` pairs ending with ``+Inf`` == count, as the exposition wants them."""
        running, out = 0, []
        for bound, count in zip(self.layouts[layout], self.counts[layout], strict=True):
            running += count
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


class EngineSim:
    """One simulated engine (one data-parallel replica) serving one model."""

    version = "0.32.0"

    def __init__(
        self,
        scenario: Scenario,
        *,
        model_name: str = "mixtral-8x7b",
        seed: int = 0,
        start_time: float,
    ) -> None:
        self.scenario = scenario
        self.model_name = model_name
        self.started = start_time
        self.now = start_time
        self._rng = random.Random(seed)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._last_restart = start_time
        self._last_step_tokens = 0
        self._load = 0.0  # smoothed batch load, 0..1: what GPU utilization follows
        self._reset_state()

    def _reset_state(self) -> None:
        s = self.scenario
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total = dict.fromkeys(FINISHED_REASONS, 0)
        self.preemptions_total = 0
        self.rejected_total = 0
        self.prefix_queries_total = 0
        self.prefix_hits_total = 0
        self.e2e = SimHistogram(E2E_BUCKETS, SGLANG_E2E_BUCKETS)
        self.ttft = SimHistogram(TTFT_BUCKETS, SGLANG_TTFT_BUCKETS)
        self.itl = SimHistogram(ITL_BUCKETS, SGLANG_ITL_BUCKETS)
        self.queue = SimHistogram(QUEUE_BUCKETS, SGLANG_QUEUE_BUCKETS)
        self.request_prompt_tokens = SimHistogram(token_buckets(s.max_model_len))
        self.request_generation_tokens = SimHistogram(token_buckets(s.max_model_len))
        # Tokens routed to each (layer, expert) since the engine (re)started.
        self.expert_counts = [[0] * s.num_experts for _ in range(s.num_layers)]
        self.counters_started = self.now

    # -- state ----------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.scenario.num_gpu_blocks * self.scenario.block_size

    @property
    def kv_tokens(self) -> int:
        return sum(r.kv_tokens for r in self._running)

    @property
    def kv_usage(self) -> float:
        """0..1, like vllm:kv_cache_usage_perc."""
        return min(1.0, self.kv_tokens / self.capacity_tokens)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def requests_finished_total(self) -> int:
        return sum(self.finished_total.values())

    @property
    def generation_tokens_per_second(self) -> float:
        """Over the last step, as SGLang's gen_throughput gauge reports it."""
        return self._last_step_tokens / STEP_SECONDS

    @property
    def prefix_hit_ratio(self) -> float:
        """Hits / queries since the (re)start; 0 before the first query."""
        return (
            self.prefix_hits_total / self.prefix_queries_total if self.prefix_queries_total else 0.0
        )

    def reset_counters(self) -> None:
        """What an engine restart looks like from outside: in-flight work lost, counters at 0."""
        self._waiting.clear()
        self._running.clear()
        self._last_step_tokens = 0
        self._reset_state()

    # -- simulation -----------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Simulate up to ``now`` in whole steps; an earlier ``now`` changes nothing."""
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
        routed = self._admit(dt)
        made = self._decode(dt)
        self._preempt()
        self._last_step_tokens = made
        self._route(routed + made)
        # NVML reports utilization averaged over a sample period: follow the load smoothly.
        load = min(1.0, max(len(self._running) / s.max_num_seqs, self.kv_usage))
        self._load += (load - self._load) * (1.0 - math.exp(-dt / LOAD_SMOOTHING_SECONDS))

    def _arrive(self, dt: float) -> None:
        s = self.scenario
        for _ in range(self._poisson(s.arrival_rate * dt)):
            if len(self._waiting) >= s.max_waiting:
                self.rejected_total += 1
                continue
            self._waiting.append(
                _Request(
                    prompt=self._rng.randint(*s.prompt_tokens),
                    target=self._rng.randint(*s.generation_tokens),
                    finished_reason="stop" if self._rng.random() < s.stop_ratio else "length",
                    arrived=self.now - self._rng.uniform(0.0, dt),
                    itl_jitter=self._rng.uniform(0.85, 1.25),
                )
            )

    def _poisson(self, mean: float) -> int:
        """Knuth's method: cheap for the small per-step means used here, and capped."""
        limit, product, count = math.exp(-mean), self._rng.random(), 0
        while product > limit and count < MAX_ARRIVALS_PER_STEP:
            count += 1
            product *= self._rng.random()
        return count

    def _admit(self, dt: float) -> int:
        """Move waiting requests into the batch while seats and KV blocks allow; returns the
        prompt tokens prefilled for the first time."""
        s = self.scenario
        used, prefilled = self.kv_tokens, 0
        while self._waiting and len(self._running) < s.max_num_seqs:
            request = self._waiting[0]
            if (
                self._running
                and (used + request.kv_tokens) / self.capacity_tokens > s.admit_below_kv_usage
            ):
                break
            self._waiting.popleft()
            used += request.kv_tokens
            # Seats free up at the start of a step; a request that arrived later starts then.
            request.resumed = max(request.arrived, self.now - dt)
            if request.admitted < 0:
                prefilled += self._first_admission(request)
            # A preempted request is recomputed: its prefill (prompt + output so far) runs again.
            request.prefill_left = self._prefill_seconds(request.kv_tokens)
            self._running.append(request)
        return prefilled

    def _first_admission(self, request: _Request) -> int:
        s = self.scenario
        request.admitted = request.resumed
        self.queue.observe(request.admitted - request.arrived)
        hits = min(
            request.prompt, round(request.prompt * s.prefix_hit_ratio * self._rng.uniform(0.8, 1.2))
        )
        self.prefix_queries_total += request.prompt
        self.prefix_hits_total += hits
        self.prompt_tokens_total += request.prompt
        self.request_prompt_tokens.observe(request.prompt)
        return request.prompt

    def _prefill_seconds(self, tokens: int) -> float:
        s = self.scenario
        return (
            s.ttft_seconds
            * s.latency_multiplier
            * (1 + tokens / 2000)
            * self._rng.uniform(0.8, 1.3)
        )

    def _itl(self) -> float:
        """One decode step: a fuller batch decodes each sequence a little slower."""
        s = self.scenario
        return s.itl_seconds * s.latency_multiplier * (1.0 + 0.02 * len(self._running))

    def _decode(self, dt: float) -> int:
        """Run prefill and decode for ``dt``; finish requests; returns the tokens generated."""
        itl, made, still = self._itl(), 0, []
        for request in self._running:
            budget = min(dt, self.now - request.resumed)  # seconds this request runs in the step
            if request.prefill_left > 0:
                done = min(budget, request.prefill_left)
                request.prefill_left -= done
                budget -= done
                if request.prefill_left > 0:
                    still.append(request)
                    continue
                if request.first_token < 0:
                    request.first_token = self.now - budget
                    self.ttft.observe(request.first_token - request.arrived)
            rate = 1.0 / (itl * request.itl_jitter)  # tokens per second for this request
            before, wanted = int(request.generated), request.generated + budget * rate
            request.generated = min(float(request.target), wanted)
            made += int(request.generated) - before
            if wanted >= request.target:
                self._finish(request, finished_at=self.now - (wanted - request.target) / rate)
            else:
                still.append(request)
        self._running = still
        self.generation_tokens_total += made
        return made

    def _finish(self, request: _Request, *, finished_at: float) -> None:
        self.finished_total[request.finished_reason] += 1
        self.e2e.observe(finished_at - request.arrived)
        # vLLM observes every gap between two output tokens: target - 1 per request, so _count
        # is generated tokens - requests and _sum the decode time. They share the request's mean
        # gap here, observed when it finishes (O(1) per request, not per token).
        gaps = request.target - 1
        if gaps > 0:
            self.itl.observe((finished_at - request.first_token) / gaps, times=gaps)
        self.request_generation_tokens.observe(request.target)

    def _preempt(self) -> None:
        """Out of KV blocks: evict the newest requests back to the head of the queue."""
        limit = self.scenario.preempt_above_kv_usage * self.capacity_tokens
        used = self.kv_tokens
        while used > limit and len(self._running) > 1:
            victim = self._running.pop()
            used -= victim.kv_tokens
            self._waiting.appendleft(victim)
            self.preemptions_total += 1

    def _route(self, tokens: int) -> None:
        """Assign ``tokens`` x top_k to experts, per layer, by the scenario's routing shares."""
        if tokens <= 0:
            return
        s = self.scenario
        assignments = tokens * s.top_k
        for layer, row in enumerate(self.expert_counts):
            shares = self._shares(layer)
            given = 0
            for expert in range(s.num_experts - 1):
                n = min(
                    assignments - given,
                    round(assignments * shares[expert] * self._rng.uniform(0.9, 1.1)),
                )
                row[expert] += n
                given += n
            row[-1] += assignments - given

    def _shares(self, layer: int) -> list[float]:
        s = self.scenario
        shares = [1.0 / s.num_experts] * s.num_experts
        for special, share in ((s.hot_expert, s.hot_share), (s.collapsed_expert, s.collapse_share)):
            if special is not None and special[0] == layer:
                # token share = c_e * k / sum(c): the expert gets share / k of the assignments
                target = share / s.top_k
                shares = [(1.0 - target) / (s.num_experts - 1)] * s.num_experts
                shares[special[1]] = target
        return shares

    # -- GPUs -----------------------------------------------------------------------------
    def gpu_of_expert(self, expert: int) -> int:
        """Expert parallel: experts split into contiguous, equal groups, one per GPU."""
        return expert // (self.scenario.num_experts // self.scenario.gpu_count)

    def gpu_utilization(self, gpu_index: int) -> float:
        """Busy fraction (0..1) of one of the engine's GPUs."""
        s = self.scenario
        if not 0 <= gpu_index < s.gpu_count:
            raise IndexError(f"the engine has {s.gpu_count} GPUs, not GPU {gpu_index}")
        if self._load < 0.01:
            return 0.0
        # Decode is memory-bound: a half-full batch (or a full KV cache) keeps the GPU busy.
        busy = 0.35 + 0.6 * math.sqrt(self._load)
        if s.hot_expert is not None:  # EP: the hot expert's GPU does the work, the others wait
            hot = self.gpu_of_expert(s.hot_expert[1]) == gpu_index
            busy *= s.hot_gpu_factor if hot else s.cold_gpu_factor
        return round(min(0.99, busy), 3)

    def gpu_memory_used_bytes(self, gpu_index: int) -> int:
        """Weights + CUDA context and activations + the part of the KV pool in use."""
        s = self.scenario
        if not 0 <= gpu_index < s.gpu_count:
            raise IndexError(f"the engine has {s.gpu_count} GPUs, not GPU {gpu_index}")
        # The pool is allocated up front; pages touched so far grow with use (never below ~55 %).
        kv = s.kv_bytes_per_gpu * min(1.0, self.kv_usage + 0.55)
        used = s.weights_bytes_per_gpu + 2.5 * GIB + kv
        return int(min(used, 0.99 * s.gpu_memory_total_bytes))

    # -- what the engine's HTTP server answers ----------------------------------------------
    def models_json(self) -> dict[str, object]:
        """GET /v1/models, shaped like vLLM's (tests/fixtures/vllm/v1-models.json)."""
        created = int(self.started)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": f"/models/{self.model_name}",
                    "parent": None,
                    "max_model_len": self.scenario.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-sim{created:x}",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }

    def render(self, flavor: Flavor = "vllm") -> str:
        """The Prometheus text exposition (format 0.0.4) of the current state."""
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r} (one of {', '.join(FLAVORS)})")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            _SglangCollector(self)
            if flavor == "sglang"
            else _VllmCollector(self, legacy=flavor == "vllm_legacy")
        )
        return generate_latest(registry).decode()


class _VllmCollector(Collector):
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


class _SglangCollector(Collector):
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
