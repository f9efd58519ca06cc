"""Which EP rank holds each logical expert without EPLB: vLLM's ``determine_expert_map`` as data.

The one definition, used by the vLLM plugin (the placement it writes into its counts file) and
by ``signals/experts.rank_loads`` (the placement it assumes when the counts carry none).
vLLM 0.32 (``vllm/model_executor/layers/fused_moe/expert_map_manager.py``, earlier ``layer.py``)
spreads E experts over P ranks with ``base = E // P`` and ``remainder = E % P``:

- ``linear``: rank r holds the contiguous block of ``base + (r < remainder)`` experts from
  ``r * base + min(r, remainder)``, so the *first* ``remainder`` ranks hold one extra expert
  (its docstring says "the last rank"; the code, which decides, says the first);
- ``round_robin``: rank r holds experts r, r + P, r + 2P, ...

Standard library only: the plugin imports this inside vLLM.
"""

from __future__ import annotations

STRATEGIES = ("linear", "round_robin")


def expert_ranks(num_experts: int, ep_size: int, strategy: str = "linear") -> list[int]:
    """The EP rank of each logical expert, ``[rank of expert 0, rank of expert 1, ...]``."""
    if ep_size < 1:
        raise ValueError(f"ep_size must be at least 1, got {ep_size}")
    if strategy == "round_robin":
        return [expert % ep_size for expert in range(num_experts)]
    if strategy != "linear":
        raise ValueError(f"unknown expert placement strategy {strategy!r}; know {STRATEGIES}")
    base, remainder = divmod(num_experts, ep_size)
    ranks: list[int] = []
    for rank in range(ep_size):
        ranks += [rank] * (base + (1 if rank < remainder else 0))
    return ranks
