"""The simulated engine's scenarios: what it serves and how it is built (data, not behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1024**3


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
    # The hot layer's hottest expert alternates: every `hot_flip_every_seconds` the hot share
    # moves between hot_expert's expert and `hot_flip_expert` (the series must keep identity).
    hot_flip_expert: int | None = None
    hot_flip_every_seconds: float | None = None
    hot_gpu_factor: float = 1.12
    cold_gpu_factor: float = 0.36
    # Expert-parallel communication: NVLink (H100 SXM: 18 links) or PCIe-only GPUs,
    # the typical all-to-all time per forward pass the plugin files report, and the NVLink
    # bytes each GPU moves per second at full load.
    nvlink: bool = True
    pcie_generation: int = 5
    all2all_seconds: float = 0.003
    nvlink_bytes_per_second: float = 40e9
    # Batching (the batching curve): one decode step of a batch of B takes
    # itl_seconds x (1 + itl_per_seq x B + itl_per_seq_squared x B^2); with the squared term
    # the engine's tokens/s, B / ITL, peaks at B = 1 / sqrt(itl_per_seq_squared).
    itl_per_seq: float = 0.02
    itl_per_seq_squared: float = 0.0
    # A closed-loop load sweep instead of Poisson arrivals: the requests in the engine are held
    # at each of these concurrencies for sweep_phase_seconds in turn, then from the first again.
    concurrency_sweep: tuple[int, ...] = ()
    sweep_phase_seconds: float = 90.0
    # Request locality: a request sends routing_locality of its routing to its home group of
    # experts (one of locality_groups equal groups, drawn per request) and the rest by the
    # layer's shares. The window's shares stay the layer's; what a step reaches does not.
    routing_locality: float = 0.0
    locality_groups: int = 1
    coverage_sample_every: int = 4  # the plugin's MOE_WATCH_COVERAGE_SAMPLE_EVERY

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
        if not self.all2all_seconds > 0:
            problems.append("all2all_seconds must be > 0")
        if self.top_k > self.num_experts or self.num_experts % max(1, self.gpu_count):
            problems.append("need top_k <= num_experts and num_experts divisible by gpu_count")
        for name in ("hot_expert", "collapsed_expert"):
            spot = getattr(self, name)
            if spot is not None and not (
                0 <= spot[0] < self.num_layers and 0 <= spot[1] < self.num_experts
            ):
                problems.append(f"{name} {spot} is outside the model's layers x experts")
        if (self.hot_flip_expert is None) != (self.hot_flip_every_seconds is None) or (
            self.hot_flip_expert is not None
            and (
                self.hot_expert is None
                or not 0 <= self.hot_flip_expert < self.num_experts
                or not (self.hot_flip_every_seconds or 0) > 0
            )
        ):
            problems.append(
                "hot_flip_expert (an expert of the model) and hot_flip_every_seconds (> 0) go "
                "together, with a hot_expert"
            )
        if any(c < 1 for c in self.concurrency_sweep) or not self.sweep_phase_seconds > 0:
            problems.append("concurrency_sweep needs concurrencies >= 1 and a phase > 0 s")
        if self.concurrency_sweep and max(self.concurrency_sweep) > self.max_num_seqs:
            problems.append("a sweep's concurrencies must fit max_num_seqs")
        groups, locality = self.locality_groups, self.routing_locality
        if groups < 1 or self.num_experts % groups or not 0 <= locality <= 1:
            problems.append("locality_groups must divide num_experts; routing_locality in [0, 1]")
        elif self.top_k * (locality * groups + (1 - locality)) / self.num_experts > 1:
            problems.append("routing_locality too high: an expert would take more than every token")
        if self.itl_per_seq < 0 or self.itl_per_seq_squared < 0 or self.coverage_sample_every < 1:
            problems.append("itl_per_seq(_squared) must be >= 0, coverage_sample_every >= 1")
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
    "hot_expert_flip": replace(
        _NORMAL,
        name="hot_expert_flip",
        description="layer 3's hottest expert alternates between 5 and 2 every 12 s (skew > 50 % throughout, no collapse); 16 experts per layer, top-2",
        # 16 experts: > 50 % skew is a token share > 0.1875, collapse > 0.40. With Mixtral's 8,
        # skew > 0.5 is a share in (0.375, 0.40], too narrow to stay in while a window straddles
        # a flip (it holds both experts at about half the hot share).
        num_experts=16,
        hot_expert=(3, 5),
        hot_share=0.32,  # skew 1.56; a window straddling a flip: ~0.7
        hot_flip_expert=2,
        hot_flip_every_seconds=12.0,
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
    "slow_link": replace(
        _NORMAL,
        name="slow_link",
        description="expert parallelism on PCIe-only GPUs (no NVLink): ~35 ms of all-to-all per forward pass, ITL up, interconnect drift",
        nvlink=False,
        pcie_generation=4,
        all2all_seconds=0.035,
        itl_seconds=0.06,
    ),
    "batch_peak": replace(
        _NORMAL,
        name="batch_peak",
        description="a closed-loop sweep of 1, 2, 4, 8, 16, 32 concurrent requests (90 s each): tokens/s per GPU peaks at batch 8, batch 32 breaks the ITL SLO; 64 experts top-2 with request locality, dense point at 512 tokens per step",
        concurrency_sweep=(1, 2, 4, 8, 16, 32),
        sweep_phase_seconds=90.0,
        max_num_seqs=64,
        prompt_tokens=(100, 600),
        generation_tokens=(20, 60),
        prefix_hit_ratio=0.0,
        itl_seconds=0.025,
        itl_per_seq_squared=1 / 64,  # tokens/s peaks at batch 8; ITL at 16: 0.13 s, at 32: 0.44 s
        num_layers=8,
        num_experts=64,
        routing_locality=0.8,
        locality_groups=4,
    ),
    "restart": replace(
        _NORMAL,
        name="restart",
        description="the engine restarts every 60 s: counters and histograms reset to 0",
        restart_every_seconds=60.0,
    ),
}
