"""Expert placement over EP ranks: one rule (vLLM's determine_expert_map) for the plugin and the
rank loads. tests/integration/test_vllm_placement.py checks it against vLLM itself."""

from __future__ import annotations

import pytest

from moe_watch.signals.expert_placement import expert_ranks
from moe_watch.signals.experts import rank_loads


def test_linear_placement_gives_the_remainder_to_the_first_ranks() -> None:
    assert expert_ranks(8, 1) == [0] * 8
    assert expert_ranks(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_ranks(10, 4, "linear") == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert expert_ranks(3, 4) == [0, 1, 2]  # fewer experts than ranks: the last rank holds none
    assert len(expert_ranks(256, 8)) == 256


def test_round_robin_placement_deals_experts_out_in_turn() -> None:
    assert expert_ranks(10, 4, "round_robin") == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_an_unknown_strategy_or_no_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="strategy"):
        expert_ranks(8, 2, "by_load")
    with pytest.raises(ValueError, match="ep_size"):
        expert_ranks(8, 0)


def test_rank_loads_without_a_placement_use_vllms_uneven_blocks() -> None:
    # 10 experts over 4 ranks hold 3, 3, 2, 2 experts; equal traffic per expert.
    loads = rank_loads([1.0] * 10, 4)
    assert loads == pytest.approx({0: 1.2, 1: 1.2, 2: 0.8, 3: 0.8})
    assert rank_loads([1.0] * 10, 4, expert_ranks(10, 4, "round_robin")) == loads
