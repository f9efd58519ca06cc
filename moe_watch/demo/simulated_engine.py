"""A deterministic simulated MoE serving engine: the demo's vLLM, and a test double with scenarios.

Pure: time is passed in, randomness comes from a seeded ``random.Random``, nothing does I/O.
``advance(now)`` moves requests through queue -> prefill -> decode -> finished in fixed sub-steps
of ``STEP_SECONDS``, counting what a real engine counts (histograms in both vLLM's and SGLang's
bucket layouts); ``demo/exposition.py`` renders that state as a vLLM or SGLang /metrics page.
The engine also routes every token to top-k experts per MoE layer, so expert-load skew has data
too, and it says how busy and how full each of its GPUs would be. Scenarios: ``demo/scenarios.py``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass

from moe_watch.demo.scenarios import GIB, Scenario
from moe_watch.signals.power_bins import BIN_COUNT, int_bin_index

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
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)  # fmt: skip
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
    home: int = 0  # the request's home group of experts (request locality)

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
        self._step_debt = 0.0  # engine decode steps not yet whole
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
        # Engine steps (vLLM's iteration_tokens_total) and what the plugin's coverage sampler
        # would add up on one step in coverage_sample_every: per bin of tokens per step, the
        # steps, their tokens and, per layer, the experts reached (here: its expectation).
        self.iteration_tokens = SimHistogram(ITERATION_BUCKETS)
        self.engine_steps = 0
        self.coverage_steps = [0] * BIN_COUNT
        self.coverage_tokens = [0] * BIN_COUNT
        self.coverage_distinct = [[0.0] * s.num_layers for _ in range(BIN_COUNT)]

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
        if s.concurrency_sweep:
            arrivals = max(0, self.concurrency - len(self._running) - len(self._waiting))
        else:
            arrivals = self._poisson(s.arrival_rate * dt)
        for _ in range(arrivals):
            if len(self._waiting) >= s.max_waiting:
                self.rejected_total += 1
                continue
            request = _Request(
                prompt=self._rng.randint(*s.prompt_tokens),
                target=self._rng.randint(*s.generation_tokens),
                finished_reason="stop" if self._rng.random() < s.stop_ratio else "length",
                arrived=self.now - self._rng.uniform(0.0, dt),
                itl_jitter=self._rng.uniform(0.85, 1.25),
            )
            if s.concurrency_sweep:  # closed loop: it replaces one that ended in the last step
                request.arrived = self.now - dt
            if s.locality_groups > 1:
                request.home = self._rng.randrange(s.locality_groups)
            self._waiting.append(request)

    @property
    def concurrency(self) -> int:
        """The sweep's concurrency now (requests held in the engine); 0 without a sweep."""
        sweep = self.scenario.concurrency_sweep
        if not sweep:
            return 0
        phase = int((self.now - self.started) / self.scenario.sweep_phase_seconds)
        return sweep[phase % len(sweep)]

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
        computed = request.prompt - hits
        if computed > 0:
            # Its prefill rides along the decode steps (chunked prefill: vLLM's step counter
            # does not see it apart), but the coverage sampler sees a step of its tokens.
            self._prefill_sample(computed, {request.home: computed})
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
        """One decode step: a fuller batch decodes each sequence slower."""
        s = self.scenario
        batch = len(self._running)
        growth = 1.0 + s.itl_per_seq * batch + s.itl_per_seq_squared * batch * batch
        return s.itl_seconds * s.latency_multiplier * growth

    def _decode(self, dt: float) -> int:
        """Run prefill and decode for ``dt``; finish requests; returns the tokens generated."""
        itl, made, still = self._itl(), 0, []
        decoding: list[_Request] = []
        decode_seconds = 0.0  # how long the engine ran decode steps in this sub-step
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
            decoding.append(request)
            decode_seconds = max(decode_seconds, budget)
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
        self._decode_steps(decode_seconds / itl, decoding)
        return made

    def _decode_steps(self, steps: float, decoding: list[_Request]) -> None:
        """The engine's decode steps of this sub-step: one token per decoding request each."""
        self._step_debt += steps
        whole = int(self._step_debt)
        self._step_debt -= whole
        if not decoding or whole <= 0:
            return
        self.iteration_tokens.observe(len(decoding), times=whole)
        homes: dict[int, int] = {}
        for request in decoding:
            homes[request.home] = homes.get(request.home, 0) + 1
        every = self.scenario.coverage_sample_every
        first = self.engine_steps
        self.engine_steps += whole
        sampled = (self.engine_steps + every - 1) // every - (first + every - 1) // every
        for _ in range(sampled):  # the steps k with k % every == 0 (the first one, then every)
            self._sample_coverage(len(decoding), homes)

    def _prefill_sample(self, tokens: int, homes: dict[int, int]) -> None:
        every = self.scenario.coverage_sample_every
        if self.engine_steps % every == 0:
            self._sample_coverage(tokens, homes)
        self.engine_steps += 1

    def _sample_coverage(self, tokens: int, homes: dict[int, int]) -> None:
        """One sampled step of ``tokens`` tokens (``homes``: tokens per home group)."""
        index = int_bin_index(tokens)
        self.coverage_steps[index] += 1
        self.coverage_tokens[index] += tokens
        row = self.coverage_distinct[index]
        cache: dict[tuple[float, ...], float] = {}
        for layer in range(self.scenario.num_layers):
            shares = tuple(self._shares(layer))
            if shares not in cache:
                cache[shares] = self.expected_distinct(shares, homes)
            row[layer] += cache[shares]

    def expected_distinct(self, shares: tuple[float, ...], homes: dict[int, int]) -> float:
        """Experts a layer with routing ``shares`` reaches, in expectation, with ``homes`` tokens
        per home group: sum_e 1 - prod_g (1 - q_ge)^tokens_g, where a token of group g includes
        expert e with probability q_ge = top_k x its routing to e (the plugin counts what
        happened; this is its mean, the scenario's known coverage)."""
        s = self.scenario
        size = s.num_experts // s.locality_groups
        local = s.routing_locality
        reached = 0.0
        for expert, share in enumerate(shares):
            miss = 1.0
            for home, count in homes.items():
                at_home = 1.0 / size if expert // size == home else 0.0
                q = s.top_k * ((1.0 - local) * share + local * at_home)
                miss *= max(0.0, 1.0 - q) ** count
            reached += 1.0 - miss
        return reached

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
        hot = s.hot_expert
        flip, every = s.hot_flip_expert, s.hot_flip_every_seconds
        if (
            hot is not None
            and flip is not None
            and every
            and int((self.now - self.started) / every) % 2
        ):
            hot = (hot[0], flip)  # odd periods: the alternate takes the hot share
        for special, share in ((hot, s.hot_share), (s.collapsed_expert, s.collapse_share)):
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
