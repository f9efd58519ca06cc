"""vLLM's EPLB placement in pure Python, on cases small enough to compute by hand.

The same functions are checked against vLLM's own ``rebalance_experts`` on DeepSeek-V3 shapes in
tests/integration/test_vllm_eplb_whatif.py (marker ``vllm``), with the check of
tests/eplb_crosscheck.py, whose own cases are here too."""

from __future__ import annotations

import pytest

from moe_watch.signals.eplb_whatif import (
    balanced_packing,
    eplb_whatif,
    overall_balancedness,
    physical_rank_loads,
    policy,
    rebalance_experts,
    rebalance_layer,
    replicate_experts,
    search_range,
    static_rank_loads,
    valid_redundancy,
)
from tests.eplb_crosscheck import (
    difference,
    group_ties,
    match_layer,
    placements,
    slot_ties,
)


def test_balanced_packing_puts_the_heaviest_first_into_the_lightest_pack_with_room() -> None:
    # 4 -> pack 0; 3 -> pack 1; 2 -> pack 1 (3 < 4), now full; 1 -> pack 0.
    assert balanced_packing([4, 3, 2, 1], 2) == ([0, 1, 1, 0], [0, 0, 1, 1])
    # Ties go to the lower pack (1 vs 1: pack 0), and equal items keep their index order.
    assert balanced_packing([1, 1, 1, 1], 2) == ([0, 1, 0, 1], [0, 0, 1, 1])
    # One item per pack: the identity, as in vLLM.
    assert balanced_packing([1, 9, 5], 3) == ([0, 1, 2], [0, 0, 0])
    with pytest.raises(ValueError, match="do not divide"):
        balanced_packing([1, 2, 3], 2)


def test_replicate_experts_gives_each_slot_to_the_most_loaded_replica() -> None:
    # Slot 4: expert 0 (6 per replica) -> 3; slot 5: expert 0 again (3 > 2) -> 2.
    assert replicate_experts([6, 2, 1, 1], 6) == ([0, 1, 2, 3, 0, 0], [3, 1, 1, 1])
    # Ties go to the lower expert: after slot 3 every replica carries 2, slot 4 is expert 0's.
    assert replicate_experts([4, 2, 2], 5) == ([0, 1, 2, 0, 0], [3, 1, 1])
    with pytest.raises(ValueError, match="cannot hold"):
        replicate_experts([1, 1, 1], 2)


def test_global_policy_on_a_hand_computed_layer() -> None:
    # 6 physical experts (2 redundant) on 2 ranks: expert 0 gets 3 replicas of 2 tokens each,
    # physical loads [2, 2, 1, 1, 2, 2] pack into ranks of 3: [e0, e0, e2] and [e1, e0, e3].
    phy2log = rebalance_layer([6, 2, 1, 1], 6, 1, 1, 2)
    assert phy2log == [0, 0, 2, 1, 0, 3]
    assert physical_rank_loads([6, 2, 1, 1], phy2log, 2) == [5.0, 5.0]
    # Without redundancy: e0 and e3 on rank 0 (7), e1 and e2 on rank 1 (3).
    assert rebalance_layer([6, 2, 1, 1], 4, 1, 1, 2) == [0, 3, 1, 2]


def test_hierarchical_policy_on_a_hand_computed_layer() -> None:
    # 8 experts in 4 groups of 2, 2 nodes of 2 GPUs. Group totals 9, 8, 4, 1: node 0 gets groups
    # 0 and 3 (experts 0, 1, 6, 7), node 1 groups 1 and 2 (experts 2, 3, 4, 5); inside each node
    # the experts are packed onto its 2 GPUs.
    weight = [8, 1, 4, 4, 2, 2, 1, 0]
    phy2log = rebalance_layer(weight, 8, 4, 2, 4)
    assert phy2log == [0, 7, 1, 6, 2, 4, 3, 5]
    assert physical_rank_loads(weight, phy2log, 4) == [8.0, 2.0, 6.0, 6.0]
    # rebalance_experts picks hierarchical because 4 groups divide by 2 nodes ...
    assert rebalance_experts([weight], 8, 4, 2, 4) == [phy2log]
    # ... and global when they do not (3 nodes), as vLLM does.
    assert rebalance_experts([weight], 8, 4, 3, 4) == [rebalance_layer(weight, 8, 1, 1, 4)]
    assert policy(4, 2, 4) == (4, 2)
    assert policy(4, 3, 6) == (1, 1)
    assert policy(8, 2, 3) == (8, 1)  # 3 GPUs on 2 nodes: vLLM's EplbState falls back to 1 node


def test_balancedness_is_vllms_sum_of_means_over_sum_of_maxes() -> None:
    assert overall_balancedness([[5, 5], [8, 2]]) == pytest.approx((5 + 5) / (5 + 8))
    assert overall_balancedness([[0, 0]]) is None
    assert static_rank_loads([6, 2, 1, 1], [0, 0, 1, 1], 2) == [8, 2]


def test_redundancies_vllm_accepts_and_the_search_range() -> None:
    assert valid_redundancy(256, 32, 32) is None
    assert "do not divide" in str(valid_redundancy(256, 32, 16))
    assert search_range(256, 32) == [0, 32, 64, 96, 128, 160, 192, 224, 256]
    assert search_range(60, 8) == [4, 12, 20, 28, 36, 44, 52, 60]  # 60 + 4 = 64 is the first
    assert search_range(8, 2, limit=4) == [0, 2, 4]


def test_eplb_whatif_today_the_cases_and_the_smallest_redundancy_reaching_the_target() -> None:
    counts = [[6, 2, 1, 1], [1, 1, 1, 1]]
    result = eplb_whatif(counts, [3, 7], 2, redundant=[0, 2, 3], target=0.9)
    assert result is not None
    # Today, linear placement: layer 3 ranks (8, 2), layer 7 (2, 2): (5 + 2) / (8 + 2).
    assert result.balancedness_today == pytest.approx(0.7)
    assert result.layer_balancedness_today == pytest.approx((5 / 8, 1.0))
    assert result.rank_loads_today == ((8.0, 2.0), (2.0, 2.0))
    zero, two = result.cases
    # No redundancy: layer 3 (7, 3), layer 7 (2, 2): (5 + 2) / (7 + 2).
    assert zero.redundant_experts == 0
    assert zero.balancedness == pytest.approx(7 / 9)
    assert two.balancedness == pytest.approx(1.0)
    assert two.layers[0].phy2log == (0, 0, 2, 1, 0, 3)
    assert two.layers[0].rank_loads == (5.0, 5.0)
    assert result.skipped == ((3, "4 + 3 physical experts do not divide over 2 EP ranks"),)
    assert result.searched == (0, 2)
    assert result.redundant_needed == 2
    assert result.needed_balancedness == pytest.approx(1.0)
    assert not result.hierarchical


def test_eplb_whatif_says_none_in_range_and_keeps_the_best_it_saw() -> None:
    # One expert takes everything; a search capped at 0 redundant experts cannot split it.
    result = eplb_whatif([[100, 0, 0, 0]], [0], 2, target=0.99, search_limit=0)
    assert result is not None
    assert result.searched == (0,)
    assert result.redundant_needed is None
    assert result.needed_balancedness == pytest.approx(0.5)


def test_eplb_whatif_needs_expert_parallelism_and_traffic() -> None:
    assert eplb_whatif([[1, 2]], [0], 1) is None
    assert eplb_whatif([[0, 0]], [0], 2) is None
    # A corrupt layer is left out; the others still answer.
    result = eplb_whatif([[float("nan"), 1], [3, 1]], [0, 1], 2)
    assert result is not None
    assert result.layers == (1,)


def test_the_check_allows_experts_of_equal_per_replica_load_to_trade_slots_and_nothing_else() -> (
    None
):
    # Expert 0 gets 2 redundant replicas (6 -> 3 -> 2 per replica; the second is argmax's first
    # of the tie 3 = 3), and then carries 2 per replica, like expert 2: the packing's sort may
    # take those four items in any order, vLLM's np.argsort in the order of the CPU's kernel.
    weight = [6.0, 3.0, 2.0, 1.0]
    ours = rebalance_layer(weight, 6, 1, 1, 2)
    assert ours == [1, 0, 3, 0, 2, 0]  # GPU 0: e1 e0 e3 (3 + 2 + 1); GPU 1: e0 e2 e0 (2 + 2 + 2)
    assert slot_ties(weight, ours, 1, 2) == [(0, (0, 2))]
    assert difference(weight, ours, ours, 1) is None
    # Expert 2 and a replica of expert 0 trade GPUs: what another CPU's sort gives.
    assert difference(weight, ours, [1, 2, 3, 0, 0, 0], 1) is None
    # Experts 1 and 0 trade: the loads move (GPU 0: 2 + 2 + 1), a real difference.
    assert difference(weight, ours, [0, 0, 3, 1, 2, 0], 1) == (
        "slot 0: per-replica load 2.0 (expert 0), expected 3.0 (expert 1)"
    )
    # Replica counts are determined (argmax's first maximum): 2 for expert 1 is wrong.
    assert difference(weight, ours, [1, 0, 3, 1, 2, 0], 1) == "expert 0: 2 replicas, expected 3"
    assert difference(weight, ours, [1, 0, 3, 0, 0, 0], 1) == (
        "a logical expert is missing or an expert id is out of range"
    )
    # One physical expert per GPU: the packing does not sort, no tie can matter.
    assert slot_ties([1.0, 1.0], [0, 1], 1, 2) == []


def test_tied_group_sums_are_tried_in_every_order_and_can_change_the_balancedness() -> None:
    # 4 groups of 2 on 2 nodes of 2 GPUs; group sums 6, 6, 4, 4: step 1 packs g0 and g2 on node
    # 0 when it takes g0 first (the transcription), g1 and g2 when it takes g1 first.
    weight = [5.0, 1.0, 3.0, 3.0, 2.0, 2.0, 4.0, 0.0]
    assert group_ties(weight, 4, 2) == [(0, 1), (2, 3)]
    assert group_ties(weight, 4, 4) == []  # one group per node: no sort, no tie matters
    found = placements(weight, 8, 4, 2, 4)
    assert len(found) == 4
    assert found[0] == rebalance_layer(weight, 8, 4, 2, 4) == [0, 1, 4, 5, 6, 7, 2, 3]
    assert found[1] == [0, 7, 6, 1, 2, 4, 3, 5]  # g3 before g2: node 0 holds g0 and g3
    # The order of equal group sums is the CPU's, and it changes the rank loads.
    assert physical_rank_loads(weight, found[0], 4) == [6.0, 4.0, 4.0, 6.0]
    assert physical_rank_loads(weight, found[1], 4) == [5.0, 5.0, 5.0, 5.0]
    for placement in found:
        assert match_layer(weight, placement, 8, 4, 2, 4) == (placement, "")
    # Not an order of tied groups: experts 0 and 2 trade nodes.
    assert match_layer(weight, [2, 1, 4, 5, 6, 7, 0, 3], 8, 4, 2, 4) == (
        None,
        "slot 0: per-replica load 3.0 (expert 2), expected 5.0 (expert 0)",
    )
    # Eight equal groups would be 40,320 orders: the check refuses rather than guesses.
    with pytest.raises(ValueError, match="orders of tied groups"):
        placements([1.0] * 16, 16, 8, 2, 4)
