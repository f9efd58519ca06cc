"""Typed samples: what sources return and what signals consume.

Everything here is immutable. A source builds these from one collection; the agent keeps a
small window of them; signals (pure functions) read them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

EMPTY: Mapping[str, float] = MappingProxyType({})
EMPTY_STR: Mapping[str, str] = MappingProxyType({})

# [layer][expert] counts as C doubles: a DeepSeek-V3 matrix (58 x 256) is 119 KB, where tuples
# of Python floats took 475 KB, and a 5-minute window holds ~60 of them per engine.
Matrix = tuple["array[float]", ...]


def matrix(rows: Iterable[Iterable[float]]) -> Matrix:
    return tuple(array("d", row) for row in rows)


@dataclass(frozen=True, slots=True)
class Histogram:
    """A cumulative Prometheus histogram at one instant.

    ``buckets`` are ``(upper_bound, cumulative_count)`` sorted by bound, ending with ``+Inf``.
    """

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float


# Canonical engine metric keys. Sources map engine-specific names (vllm:*, sglang:*) onto these so
# signals never need to know which engine produced a sample.
GAUGE_REQUESTS_RUNNING = "requests_running"
GAUGE_REQUESTS_WAITING = "requests_waiting"
GAUGE_KV_CACHE_USAGE = "kv_cache_usage"  # 0..1
GAUGE_KV_CACHE_CAPACITY_TOKENS = "kv_cache_capacity_tokens"  # total KV slots, in tokens
GAUGE_KV_CACHE_HIT_RATE = "kv_cache_hit_rate"  # engines that only publish a ratio (SGLang)

COUNTER_PROMPT_TOKENS = "prompt_tokens"
COUNTER_GENERATION_TOKENS = "generation_tokens"
COUNTER_PREEMPTIONS = "preemptions"
COUNTER_PREFIX_QUERIES = "prefix_cache_queries"
COUNTER_PREFIX_HITS = "prefix_cache_hits"
COUNTER_REQUESTS_FINISHED = "requests_finished"

LATENCY_E2E = "e2e"
LATENCY_TTFT = "ttft"
LATENCY_ITL = "itl"
LATENCY_QUEUE = "queue"
LATENCY_KINDS = (LATENCY_E2E, LATENCY_TTFT, LATENCY_ITL, LATENCY_QUEUE)
# Tokens per engine step (vLLM's iteration_tokens_total): its _count is the engine's steps.
HISTOGRAM_ITERATION_TOKENS = "iteration_tokens"
# Tokens per finished request, prompt and generated (vLLM's request_{prompt,generation}_tokens).
HISTOGRAM_PROMPT_TOKENS = "request_prompt_tokens"
HISTOGRAM_GENERATION_TOKENS = "request_generation_tokens"


@dataclass(frozen=True, slots=True)
class ModelSample:
    """What one engine reports about one served model at one instant.

    Values are already aggregated over the engine's internal data-parallel replicas (vLLM's
    ``engine`` label): counters and histograms summed, ``kv_cache_usage`` the maximum (pressure
    on the fullest replica is what rejects requests).
    """

    model: str
    gauges: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    counters: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    # Counters kept apart by one label as well as summed into ``counters`` (finished requests
    # by finished_reason): key -> label value -> value.
    labelled_counters: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineScrape:
    """One successful scrape of one serving engine (a target)."""

    engine: str  # stable id: the target name, or namespace/pod in a cluster
    kind: str  # "vllm" | "sglang"
    timestamp: float  # wall clock, seconds
    models: tuple[ModelSample, ...]
    # Settings the engine publishes about itself (vLLM cache_config_info labels, /v1/models).
    info: Mapping[str, str] = field(default_factory=lambda: EMPTY_STR)
    max_model_len: int | None = None
    # Samples the parser dropped (NaN/Inf where a finite number is required, ...).
    dropped_samples: int = 0


@dataclass(frozen=True, slots=True)
class GpuLink:
    """How one GPU is connected (NVML); None where the GPU or driver does not say.

    ``nvlink_links_up`` is 0 on a GPU without NVLink (NVML answers NOT_SUPPORTED for link 0).
    The NVLink byte counters are NVML's cumulative data throughput counters (KiB in NVML),
    summed over the active links; they exist only on GPUs and drivers that have them.
    """

    nvlink_links_up: int | None = None
    nvlink_transmit_bytes: float | None = None
    nvlink_receive_bytes: float | None = None
    pcie_generation: int | None = None
    pcie_max_generation: int | None = None
    pcie_width: int | None = None
    pcie_max_width: int | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. ``up`` False means NVML could not read it (lost, fallen off the bus)."""

    index: int
    uuid: str
    name: str
    up: bool
    utilization_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    pids: tuple[int, ...] = ()
    minor: int | None = None  # /dev/nvidia<minor>: how NVIDIA's DRA driver names it (gpu-<minor>)
    mig_uuids: tuple[str, ...] = ()  # its MIG devices' UUIDs (MIG mode), for the kubelet's MIG IDs
    link: GpuLink | None = None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """Everything the NVML source read in one collection."""

    timestamp: float
    driver_version: str
    gpus: tuple[GpuSample, ...]
    # Cumulative Xid events seen since the agent started, keyed by (gpu index, xid code).
    xid_totals: Mapping[tuple[int, int], int] = field(default_factory=dict)
    # NVLink peer-to-peer between two GPUs (index pairs, lower first): True = over NVLink,
    # False = not over NVLink (PCIe / the host); absent where NVML could not tell.
    nvlink_pairs: Mapping[tuple[int, int], bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepCoverageCounts:
    """Cumulative expert coverage per step of one engine: on the plugin's sampled steps, per
    power-of-two bin of tokens per step (signals/power_bins.py), the steps, their tokens and,
    per MoE layer, the experts that received at least one token, summed over the steps."""

    steps: tuple[float, ...]  # per bin
    tokens: tuple[float, ...]  # per bin
    distinct: Matrix  # [bin][layer of the ExpertCounts' layers]
    sample_every: int = 1
    # Sum of ``steps``, computed once here: reset detection compares it across the window.
    total_steps: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        rows = (self.steps, self.tokens, *self.distinct)  # C-level passes, as for the counts
        total = sum(map(sum, rows))
        if not (
            math.isfinite(total)
            and all(min(row, default=0.0) >= 0.0 for row in rows)
            and len(self.steps) == len(self.tokens) == len(self.distinct)
        ):
            raise ValueError("step coverage must be finite, non-negative and one row per bin")
        object.__setattr__(self, "total_steps", sum(self.steps))


@dataclass(frozen=True, slots=True)
class ExpertCounts:
    """Cumulative tokens routed to each (MoE layer, logical expert) of one engine.

    ``counts[i][e]`` counts token-to-expert assignments (a token routed top-k adds one to each of
    its k experts) in MoE layer ``layers[i]`` since ``started``. A different ``started`` (or a
    drop in the counts) means the counter set was reset: the engine or its plugin restarted.
    """

    engine: str
    model: str
    top_k: int
    num_experts: int
    layers: tuple[int, ...]
    counts: Matrix  # build with matrix()
    started: float = 0.0
    # Expert parallelism: the EP rank each logical expert lives on; empty = no placement known
    # (vLLM's default linear placement is assumed: moe_watch/signals/expert_placement.py).
    ep_size: int = 1
    placement: tuple[int, ...] = ()
    source: str = "plugin"  # plugin | sglang
    # Every count was 0 at ``started`` and ``started`` is this agent's own clock (SGLang: the
    # agent adds up the recorder's dumps from zero): the first sample of a counter set is then
    # an increase from zero, not an unknown baseline (the agent windows it after a zero sample).
    from_zero: bool = False
    # Expert-parallel exchange (dispatch + combine) time per forward pass, cumulative, summed
    # over the engine's workers (a forward pass of one rank); None when nothing timed it.
    all2all: Histogram | None = None
    all2all_backend: str = ""  # vLLM's all2all_backend, as the plugin saw it
    # Experts touched per sampled step, by tokens per step; None when no worker measured it.
    coverage: StepCoverageCounts | None = None
    # Sum of all counts, computed once here: reset detection compares it across every sample of
    # the window every cycle.
    total: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        total = sum(map(sum, self.counts))
        # NaN, infinite or negative counts never reach the signals (sources
        # refuse them with a reason first; this is the last line).
        if not (math.isfinite(total) and all(min(row, default=0.0) >= 0.0 for row in self.counts)):
            raise ValueError(f"expert counts of {self.engine} are not finite and non-negative")
        if self.coverage is not None and any(
            len(row) != len(self.layers) for row in self.coverage.distinct
        ):
            raise ValueError(f"step coverage of {self.engine} does not have one value per layer")
        object.__setattr__(self, "total", total)


@dataclass(frozen=True, slots=True)
class EplbBalance:
    """The latest vLLM EPLB balancedness (mean / max EP-rank load, summed over layers) per model."""

    engine: str
    balancedness: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What /proc says about one GPU process: its pod, and the vLLM server command line above it."""

    pod_uid: str | None = None
    server_cmdline: tuple[str, ...] | None = None
