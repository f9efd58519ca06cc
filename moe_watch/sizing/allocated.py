"""The plan held against what a running vLLM engine allocated for its KV cache (pure functions).

vLLM 0.32 publishes, in the labels of ``vllm:cache_config_info`` (one series per engine core, i.e.
per DP rank, label ``engine``), what it allocated once it profiled memory:

- ``num_gpu_blocks`` x ``block_size``: the shared block pool, in token slots;
- ``kv_cache_size_tokens``: the group-aware capacity, ``int(max_concurrency x max_model_len)``
  (``vllm/v1/core/kv_cache_utils.py: get_kv_cache_capacity``); for a model with one full-attention
  KV group it is ``num_gpu_blocks x block_size``;
- ``kv_cache_max_concurrency``: requests of the engine's own ``max_model_len`` that fit at once
  (``num_gpu_blocks`` / blocks one such request needs, summed over KV groups);
- ``kv_cache_memory_bytes``: set by the user (``--kv-cache-memory-bytes``) or, on CPU, by
  ``VLLM_CPU_KVCACHE_SPACE``; ``None`` on a GPU that sized the cache from
  ``gpu_memory_utilization``.

A plan needs ``max_num_seqs x max_model_len`` tokens per DP rank (vLLM's ``max_num_seqs`` is per
rank): ``planned_kv_tokens``. ``kv_coverage`` compares the two; below 1 the engine preempts
before it reaches its planned concurrency, and below ``thresholds.kv_cache_plan_coverage`` it
drifts (``kv_cache_tokens``).

The labels come from the engine: a number that is not finite or past
``limits.KV_ALLOCATION`` is refused (named in ``refused``), and the allocation is then unknown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from moe_watch import limits
from moe_watch.sizing.budget import Plan
from moe_watch.thresholds import DEFAULT

ALLOCATION_LABELS = (
    "num_gpu_blocks",
    "block_size",
    "kv_cache_size_tokens",
    "kv_cache_max_concurrency",
    "kv_cache_memory_bytes",
)


@dataclass(frozen=True)
class AllocatedKv:
    """What one vLLM engine core allocated for its KV cache."""

    num_gpu_blocks: int
    block_size: int
    kv_cache_size_tokens: int | None = None
    kv_cache_max_concurrency: float | None = None
    kv_cache_memory_bytes: int | None = None

    @property
    def tokens(self) -> int:
        """Token slots the engine can hold for requests (the group-aware figure if published)."""
        if self.kv_cache_size_tokens is not None:
            return self.kv_cache_size_tokens
        return self.num_gpu_blocks * self.block_size


def allocated_from_labels(
    labels: Mapping[str, str], refused: list[str] | None = None
) -> AllocatedKv | None:
    """``vllm:cache_config_info``'s labels -> AllocatedKv; None before the engine allocated
    (``num_gpu_blocks`` absent or ``None``), when a value is not a number, or when one is refused
    (not finite, negative or past ``limits.KV_ALLOCATION``: appended to ``refused`` as
    "label=value")."""
    bad = [
        f"{key}={labels[key][:32]}"
        for key in ALLOCATION_LABELS
        if key in labels and _out_of_range(labels[key])
    ]
    blocks = _int(labels.get("num_gpu_blocks"))
    block_size = _int(labels.get("block_size"))
    slots = blocks * block_size if blocks is not None and block_size is not None else 0
    if not bad and slots > limits.KV_ALLOCATION:
        bad.append(f"num_gpu_blocks={blocks} x block_size={block_size}")
    if bad:
        if refused is not None:
            refused.extend(bad)
        return None
    if blocks is None or block_size is None or block_size < 1:
        return None
    return AllocatedKv(
        num_gpu_blocks=blocks,
        block_size=block_size,
        kv_cache_size_tokens=_int(labels.get("kv_cache_size_tokens")),
        kv_cache_max_concurrency=_float(labels.get("kv_cache_max_concurrency")),
        kv_cache_memory_bytes=_int(labels.get("kv_cache_memory_bytes")),
    )


def _out_of_range(text: str) -> bool:
    """A label that reads as a number, but not a finite one within [0, KV_ALLOCATION]."""
    if text in ("", "None"):
        return False
    try:
        value = float(text)
    except ValueError:
        return False  # not a number at all: unknown, as vLLM's "None"
    return not (math.isfinite(value) and 0 <= value <= limits.KV_ALLOCATION)


def planned_kv_tokens(max_num_seqs: int, max_model_len: int) -> int:
    """Tokens one engine core must hold to run ``max_num_seqs`` sequences of ``max_model_len``."""
    return max_num_seqs * max_model_len


def planned_kv_tokens_for(plan: Plan) -> int:
    """The plan's tokens per engine core: its sequences per DP rank x max_model_len."""
    return planned_kv_tokens(plan.chosen.seqs_per_rank, plan.max_model_len)


@dataclass(frozen=True)
class KvCoverage:
    planned_tokens: int  # max_num_seqs x max_model_len of the plan, per engine core
    planned_seqs: int
    planned_max_model_len: int
    allocated_tokens: int  # what the engine holds (kv_cache_size_tokens, else blocks x size)
    engine_max_concurrency: float | None  # vLLM's own figure, at the engine's max_model_len
    sequences_at_planned_len: int  # sequences of the plan's length the allocation holds

    @property
    def ratio(self) -> float:
        """Allocated / planned tokens: 1 = exactly the plan; below 1 the engine preempts first."""
        return self.allocated_tokens / self.planned_tokens

    def short(self, below: float | None = None) -> bool:
        """The engine holds materially less KV than its plan needs (below
        ``thresholds.kv_cache_plan_coverage`` unless ``below`` is given)."""
        return self.ratio < (DEFAULT.kv_cache_plan_coverage if below is None else below)


@dataclass(frozen=True)
class PlannedKv:
    """What a plan file asks of each engine core: ``seqs_per_rank`` sequences (vLLM's
    max_num_seqs for one DP rank: the plan's target / its DP size) of ``max_model_len``."""

    seqs_per_rank: int
    max_model_len: int

    @property
    def tokens(self) -> int:
        return planned_kv_tokens(self.seqs_per_rank, self.max_model_len)


@dataclass(frozen=True)
class KvPlan:
    """An engine's plan and allocation as far as each is known."""

    planned: PlannedKv | None
    allocated: AllocatedKv | None

    @property
    def coverage(self) -> KvCoverage | None:
        if self.planned is None or self.allocated is None:
            return None
        return kv_coverage(self.planned.seqs_per_rank, self.planned.max_model_len, self.allocated)


def kv_coverage(
    planned_seqs: int, planned_max_model_len: int, allocated: AllocatedKv
) -> KvCoverage:
    """The plan's KV tokens against the engine's allocation."""
    if planned_seqs < 1 or planned_max_model_len < 1:
        raise ValueError("a plan needs at least one sequence of at least one token")
    tokens = allocated.tokens
    return KvCoverage(
        planned_tokens=planned_kv_tokens(planned_seqs, planned_max_model_len),
        planned_seqs=planned_seqs,
        planned_max_model_len=planned_max_model_len,
        allocated_tokens=tokens,
        engine_max_concurrency=allocated.kv_cache_max_concurrency,
        sequences_at_planned_len=tokens // planned_max_model_len,
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "", "None") else None
    except ValueError:
        try:
            number = float(value)  # type: ignore[arg-type]
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None
