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
before it reaches its planned concurrency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moe_watch.sizing.budget import Plan

# "Materially less": the engine holds under 90 % of the tokens its plan needs.
SHORT_BELOW = 0.9


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


def allocated_from_labels(labels: Mapping[str, str]) -> AllocatedKv | None:
    """``vllm:cache_config_info``'s labels -> AllocatedKv; None before the engine allocated
    (``num_gpu_blocks`` absent or ``None``) or when a value is not a number."""
    blocks = _int(labels.get("num_gpu_blocks"))
    block_size = _int(labels.get("block_size"))
    if blocks is None or block_size is None or block_size < 1 or blocks < 0:
        return None
    return AllocatedKv(
        num_gpu_blocks=blocks,
        block_size=block_size,
        kv_cache_size_tokens=_int(labels.get("kv_cache_size_tokens")),
        kv_cache_max_concurrency=_float(labels.get("kv_cache_max_concurrency")),
        kv_cache_memory_bytes=_int(labels.get("kv_cache_memory_bytes")),
    )


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

    def short(self, below: float = SHORT_BELOW) -> bool:
        """The engine holds materially less KV than its plan needs."""
        return self.ratio < below


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
