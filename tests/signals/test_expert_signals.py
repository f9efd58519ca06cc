"""Expert-load formulas with hand-computed values on real MoE shapes."""

from __future__ import annotations

import heapq
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.samples import ExpertCounts, matrix
from moe_watch.signals.experts import (
    balancedness,
    derive_expert_signals,
    rank_loads,
    rank_tokens,
    skew,
    token_shares,
    window_increase,
)


def counts(
    rows: list[list[float]],
    *,
    top_k: int,
    started: float = 0.0,
    ep_size: int = 1,
    placement: tuple[int, ...] = (),
) -> ExpertCounts:
    return ExpertCounts(
        engine="e",
        model="m",
        top_k=top_k,
        num_experts=len(rows[0]),
        layers=tuple(range(len(rows))),
        counts=matrix(rows),
        started=started,
        ep_size=ep_size,
        placement=placement,
    )


def test_mixtral_top2_of_8_collapsed_layer() -> None:
    row = [40, 10, 10, 10, 10, 10, 5, 5]  # 100 assignments = 50 tokens x top-2
    assert skew(row) == pytest.approx(40 / 12.5 - 1)  # 2.2
    assert balancedness(row) == pytest.approx(12.5 / 40)  # 0.3125 = 1 / (1 + 2.2)
    shares = token_shares(row, top_k=2)
    assert shares is not None
    assert shares[0] == pytest.approx(0.8)  # 40 of the 50 tokens visited expert 0
    assert sum(shares) == pytest.approx(2.0)  # shares add up to k
    signals = derive_expert_signals([counts([[0] * 8], top_k=2), counts([row], top_k=2)])
    (layer,) = signals.layers
    assert (layer.tokens, layer.hottest_expert) == (50, 0)
    assert layer.max_share == pytest.approx(0.8)
    assert signals.collapsed_layers == (0,)
    assert signals.hot()[0].expert == 0
    assert layer.ranked[0] == (0, pytest.approx(0.8))


def test_llama4_maverick_top1_of_128() -> None:
    row = [100.0] * 128
    row[7] = 300.0  # 13,000 tokens
    assert skew(row) == pytest.approx(300 / (13_000 / 128) - 1)  # 1.95385
    shares = token_shares(row, top_k=1)
    assert shares is not None
    assert shares[7] == pytest.approx(300 / 13_000)
    signals = derive_expert_signals(
        [counts([[0.0] * 128], top_k=1), counts([row], top_k=1)], top_n=3
    )
    assert signals.collapsed_layers == ()
    assert [(h.layer, h.expert) for h in signals.hot()] == [
        (0, 7),
        (0, 0),
        (0, 1),
    ]  # ties: by index
    assert [e for e, _ in signals.layers[0].ranked] == [7, 0, 1]  # the layer's load ranks 1..3


def test_deepseek_v3_top8_of_256_with_58_layers() -> None:
    even = [10.0] * 256
    hot = [10.0] * 256
    hot[255] = 18.0  # 2,568 assignments = 321 tokens x top-8
    rows = [even] * 57 + [hot]
    signals = derive_expert_signals(
        [counts([[0.0] * 256] * 58, top_k=8), counts(rows, top_k=8)], top_n=10
    )
    assert len(signals.layers) == 58
    assert signals.layers[0].skew == pytest.approx(0.0)
    assert signals.layers[0].balancedness == pytest.approx(1.0)
    assert signals.layers[57].skew == pytest.approx(18 / (2568 / 256) - 1)  # 0.79439
    assert signals.layers[57].tokens == pytest.approx(321)
    assert signals.max_skew == pytest.approx(18 / (2568 / 256) - 1)
    hot = signals.hot()
    assert hot[0].layer == 57
    assert hot[0].expert == 255
    assert hot[0].share == pytest.approx(18 * 8 / 2568)
    assert len(hot) == 10
    # top-N load ranks per layer: 58 x 10 cells to publish, not 14,848
    assert {len(layer.ranked) for layer in signals.layers} == {10}


def test_ep_rank_load_contiguous_and_with_a_placement() -> None:
    per_expert = [40.0, 10, 10, 10, 10, 10, 5, 5]  # ranks (contiguous, 4 ranks): 50, 20, 20, 10
    assert rank_loads(per_expert, 4) == pytest.approx({0: 2.0, 1: 0.8, 2: 0.8, 3: 0.4})
    placement = (3, 0, 1, 2, 0, 1, 2, 3)  # rank 3 hosts experts 0 and 7: 45
    assert rank_loads(per_expert, 4, placement) == pytest.approx({0: 0.8, 1: 0.8, 2: 0.6, 3: 1.8})
    # 10 experts on 4 ranks: 3, 3, 2, 2 (vLLM's determine_expert_map: the first ranks take one more)
    assert rank_loads([1.0] * 10, 4) == pytest.approx({0: 1.2, 1: 1.2, 2: 0.8, 3: 0.8})
    with pytest.raises(ValueError, match="placement names 2 experts"):
        rank_loads(per_expert, 4, (0, 1))


def test_rank_tokens_sum_every_layer_over_the_experts_each_rank_holds() -> None:
    window = matrix([[40.0, 10, 10, 10, 10, 10, 5, 5], [1.0, 2, 3, 4, 5, 6, 7, 8]])
    # linear placement, 4 ranks: experts (0, 1), (2, 3), (4, 5), (6, 7)
    assert rank_tokens(window, 8, 4) == (53.0, 27.0, 31.0, 25.0)
    placement = (3, 0, 1, 2, 0, 1, 2, 3)
    assert rank_tokens(window, 8, 4, placement) == (27.0, 29.0, 26.0, 54.0)
    assert rank_tokens(window, 8, 1) == ()  # no expert parallelism
    assert rank_tokens((), 8, 4) == ()  # no window yet
    with pytest.raises(ValueError, match="placement names 2 experts"):
        rank_tokens(window, 8, 4, (0, 1))


def test_rank_load_is_published_only_under_expert_parallelism() -> None:
    rows = [[40.0, 10, 10, 10, 10, 10, 5, 5]]
    zero = [[0.0] * 8]
    assert derive_expert_signals([counts(zero, top_k=2), counts(rows, top_k=2)]).rank_load == {}
    ep = derive_expert_signals([counts(zero, top_k=2, ep_size=4), counts(rows, top_k=2, ep_size=4)])
    assert ep.rank_load[0] == pytest.approx(2.0)


def test_counter_reset_counts_the_traffic_after_it() -> None:
    window = [
        counts([[10, 10]], top_k=1, started=1.0),
        counts([[30, 20]], top_k=1, started=1.0),
        counts([[5, 1]], top_k=1, started=2.0),  # the engine restarted
        counts([[6, 3]], top_k=1, started=2.0),
    ]
    assert window_increase(window) == matrix([[20 + 5 + 1, 10 + 1 + 2]])
    # a drop without a new start time (plugin state lost) is a reset too
    dropped = [counts([[10, 10]], top_k=1), counts([[2, 0]], top_k=1)]
    assert window_increase(dropped) == matrix([[2, 0]])


def test_empty_and_all_zero_windows_give_no_signals_not_zeros() -> None:
    assert skew([]) is None
    assert skew([0, 0]) is None
    assert balancedness([0, 0]) is None
    assert token_shares([0, 0], 2) is None
    assert rank_loads([0.0, 0.0], 2) == {}
    assert derive_expert_signals([]).layers == ()
    single = derive_expert_signals([counts([[5, 5]], top_k=1)])  # one sample: no window yet
    assert single.layers == ()
    assert single.max_skew is None
    idle = derive_expert_signals([counts([[5, 5]], top_k=1), counts([[5, 5]], top_k=1)])
    assert idle.layers == ()
    assert idle.hot() == ()


def test_a_different_model_shape_restarts_the_window() -> None:
    window = [
        counts([[1, 1]], top_k=1),
        counts([[9, 1, 0]], top_k=1),
        counts([[10, 3, 1]], top_k=1),
    ]
    assert window_increase(window) == matrix([[1, 2, 1]])


def test_a_deepseek_v3_matrix_is_held_as_c_doubles_with_its_total() -> None:
    # A 5-minute window keeps ~60 of these per engine: as tuples of Python floats they were 4x
    # larger and the node benchmark's RSS missed its 100 MB target.
    rows = [[float(layer * 256 + e) for e in range(256)] for layer in range(58)]
    sample = counts(rows, top_k=8)
    assert sum(sys.getsizeof(row) for row in sample.counts) < 58 * 256 * 8 * 1.05
    assert sample.total == sum(map(sum, rows))
    assert [list(row) for row in sample.counts] == rows


def test_load_ranks_keep_their_identity_when_the_hottest_expert_changes() -> None:
    """Expert 5 then expert 2 is hottest: load rank 1 is one cell whose expert id moves."""
    zero = counts([[0.0] * 8], top_k=2)
    five = derive_expert_signals([zero, counts([[1, 1, 1, 1, 1, 9, 1, 1]], top_k=2)], top_n=2)
    two = derive_expert_signals([zero, counts([[1, 1, 9, 1, 1, 1, 1, 1]], top_k=2)], top_n=2)
    assert [e for e, _ in five.layers[0].ranked] == [5, 0]
    assert [e for e, _ in two.layers[0].ranked] == [2, 0]
    assert five.layers[0].skew == two.layers[0].skew  # same value, same series, new expert id


def test_only_counters_that_start_at_zero_get_a_zero_baseline() -> None:
    from dataclasses import replace

    from moe_watch.signals.experts import needs_zero_baseline, zero_baseline

    plugin = counts([[3, 1], [2, 2]], top_k=1, started=5.0)  # attached mid-run: unknown start
    sglang = replace(plugin, from_zero=True)
    assert not needs_zero_baseline(None, plugin)
    assert needs_zero_baseline(None, sglang)
    assert not needs_zero_baseline(sglang, sglang)  # the same counter set: already windowed
    assert needs_zero_baseline(replace(sglang, started=1.0), sglang)  # a new counter set
    base = zero_baseline(sglang)
    assert (base.total, base.started, base.layers) == (0, 5.0, sglang.layers)
    assert window_increase([base, sglang]) == matrix([[3, 1], [2, 2]])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(min_value=0, max_value=12), min_size=8, max_size=8),
        min_size=3,
        max_size=3,
    ),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=9),
)
def test_each_layer_load_is_the_definitions_applied_to_its_window_increase(
    rows: list[list[int]], ep_size: int, top_n: int
) -> None:
    first = ExpertCounts(
        engine="e", model="m", top_k=2, num_experts=8, layers=(0, 1, 2),
        counts=matrix([[0.0] * 8 for _ in rows]), started=1.0, ep_size=ep_size,
    )  # fmt: skip
    last = replace(first, counts=matrix([[float(c) for c in row] for row in rows]))
    signals = derive_expert_signals([first, last], top_n=top_n)
    by_layer = {load.layer: load for load in signals.layers}
    for layer, row in zip(first.layers, rows, strict=True):
        if sum(row) == 0:
            assert layer not in by_layer
            continue
        load, cells = by_layer[layer], [float(c) for c in row]
        assert load.skew == skew(cells)
        assert load.balancedness == balancedness(cells)
        # Ties (small counts make many) rank the lower expert id first, as nlargest does.
        top = heapq.nlargest(top_n, range(8), key=cells.__getitem__)
        assert [expert for expert, _ in load.ranked] == top
        assert load.hottest_expert == top[0]
        assert load.ranked == tuple((e, cells[e] * (2 / sum(cells))) for e in top)
    busy = [[float(c) for c in row] for row in rows if sum(row) > 0]
    expected = (
        rank_loads([sum(column) for column in zip(*busy, strict=True)], ep_size) if busy else {}
    )
    assert signals.rank_load == (pytest.approx(expected) if ep_size > 1 else {})
