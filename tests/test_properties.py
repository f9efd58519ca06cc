"""Property tests (hypothesis): parsing never fails except with its own error, quantiles stay in
their buckets and in order, and the fast expert-window maths equals the pairwise definition."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.expert_file import FORMAT, CountsFile, read_counts_file
from moe_watch.samples import ExpertCounts, Histogram, matrix
from moe_watch.signals.experts import window_increase
from moe_watch.signals.histograms import quantile
from moe_watch.sources.expert_sglang import MAX_CELLS, read_recorder_file
from moe_watch.sources.exposition import ExpositionError, parse_engine_exposition
from tests.conftest import read_capture

CAPTURE = read_capture("after-load")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_parse_or_fail_with_the_parser_error(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    reason = None
    try:
        parse_engine_exposition(text, "auto")
    except ExpositionError as exc:
        reason = exc.reason
    assert reason in {None, "parse", "no_engine_metrics", "truncated"}


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(CAPTURE)), st.text(max_size=40))
def test_a_real_capture_cut_or_spliced_anywhere_never_escapes_the_parser_error(
    cut: int, junk: str
) -> None:
    text = CAPTURE[:cut] + junk + CAPTURE[cut:]
    try:
        parsed = parse_engine_exposition(text, "vllm")
    except ExpositionError:
        return
    for model in parsed.models:
        assert all(math.isfinite(v) for v in model.gauges.values())
        assert all(math.isfinite(v) and v >= 0 for v in model.counters.values())


@st.composite
def histograms(draw: st.DrawFn) -> Histogram:
    bounds = sorted(
        set(draw(st.lists(st.floats(min_value=0.001, max_value=1000), min_size=1, max_size=12)))
    )
    counts = draw(
        st.lists(
            st.integers(min_value=0, max_value=1000),
            min_size=len(bounds) + 1,
            max_size=len(bounds) + 1,
        )
    )
    cumulative, running = [], 0
    for bound, count in zip([*bounds, math.inf], counts, strict=True):
        running += count
        cumulative.append((bound, float(running)))
    return Histogram(tuple(cumulative), float(running), float(running))


@settings(max_examples=300, deadline=None)
@given(
    histograms(),
    st.floats(min_value=0.01, max_value=0.99),
    st.floats(min_value=0.01, max_value=0.99),
)
def test_quantiles_are_ordered_and_inside_the_bucket_range(
    h: Histogram, q1: float, q2: float
) -> None:
    low, high = sorted((q1, q2))
    a, b = quantile(low, h), quantile(high, h)
    if h.count == 0:
        assert a is None
        assert b is None
        return
    assert a is not None
    assert b is not None
    assert a <= b + 1e-9
    finite = [bound for bound, _ in h.buckets if math.isfinite(bound)]
    assert 0.0 <= a <= max(finite) + 1e-9  # like histogram_quantile: +Inf answers the highest bound


def pairwise_increase(window: list[ExpertCounts]) -> list[list[float]]:
    """The definition: sum over consecutive pairs, a reset counts the new value in full."""
    total = [[0.0] * window[0].num_experts for _ in window[0].layers]
    for previous, current in itertools.pairwise(window):
        reset = current.started != previous.started or sum(map(sum, current.counts)) < sum(
            map(sum, previous.counts)
        )
        for row, now, before in zip(total, current.counts, previous.counts, strict=True):
            for e in range(len(row)):
                row[e] += now[e] if reset else now[e] - before[e]
    return total


@st.composite
def counter_windows(draw: st.DrawFn) -> list[ExpertCounts]:
    layers, experts = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    current = [[0] * experts for _ in range(layers)]
    started, window = 0.0, []
    for _ in range(draw(st.integers(2, 12))):
        if draw(st.booleans()) and draw(st.integers(0, 4)) == 0:  # an engine restart
            started += 1
            current = [[0] * experts for _ in range(layers)]
        for row in current:
            for e in range(experts):
                row[e] += draw(st.integers(0, 50))
        window.append(
            ExpertCounts(
                "e",
                "m",
                1,
                experts,
                tuple(range(layers)),
                matrix(current),
                started=started,
            )
        )
    return window


@settings(max_examples=300, deadline=None)
@given(counter_windows())
def test_the_fast_window_increase_equals_the_pairwise_definition(
    window: list[ExpertCounts],
) -> None:
    fast = window_increase(window)
    assert [list(row) for row in fast] == pairwise_increase(window)
    assert all(value >= 0 for row in fast for value in row)  # restarts never go negative


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
VALID_COUNTS = {
    "format": FORMAT, "pid": 1, "started": 1.0, "updated": 2.0, "model": "m", "top_k": 2,
    "num_experts": 4, "layers": [1, 3], "counts": [[1, 2, 3, 4], [0, 0, 0, 9]],
}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*VALID_COUNTS, "placement", "ep_size", "dp_rank"]), value=JSON)
def test_a_plugin_file_with_any_field_replaced_reads_or_fails_with_value_error(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    path = tmp_path_factory.mktemp("counts") / "w.experts.json"
    path.write_text(json.dumps({**VALID_COUNTS, field: value}))
    data = read_or_error(path)
    if isinstance(data, ValueError):
        assert str(data).startswith("w.experts.json: ")  # names the file, says what is wrong
        return
    # Accepted: then it is safe to use as counts.
    assert len(data.counts) == len(data.layers)
    assert all(len(row) == data.num_experts and min(row) >= 0 for row in data.counts)
    assert 1 <= data.top_k <= data.num_experts
    assert data.ep_size >= 1


def read_or_error(path: Path) -> CountsFile | ValueError:
    try:
        return read_counts_file(path)
    except ValueError as exc:
        return exc


CSV_ROWS = st.lists(
    st.tuples(
        st.integers(-2, 10**8) | st.text(max_size=3),
        st.integers(-2, 10**8) | st.text(max_size=3),
        st.floats() | st.integers(-(10**20), 10**20) | st.text(max_size=3),
    ).map(lambda cells: ",".join(map(str, cells))),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode())


@settings(max_examples=300, deadline=None)
@given(data=CSV_ROWS | st.binary(max_size=400), suffix=st.sampled_from([".csv", ".pt"]))
def test_an_sglang_dump_of_any_bytes_reads_or_fails_with_value_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, suffix: str
) -> None:
    path = tmp_path_factory.mktemp("dump") / f"expert_distribution_rank0_timestamp1{suffix}"
    path.write_bytes(b"layer_id,expert_id,count\n" + data if suffix == ".csv" else data)
    try:
        rows = read_recorder_file(path)
    except ValueError:
        return
    # Accepted: a bounded matrix of counts.
    assert len(rows) * len(rows[0] if rows else ()) <= MAX_CELLS
    assert all(len(row) == len(rows[0]) for row in rows)
    assert all(math.isfinite(c) and c >= 0 for row in rows for c in row)


MIXTRAL_CONFIG = json.loads(
    (Path(__file__).parent / "sizing" / "configs" / "mixtral-8x7b.json").read_text()
)
SHAPE_KEYS = [
    *MIXTRAL_CONFIG, "head_dim", "kv_lora_rank", "qk_rope_head_dim", "first_k_dense_replace",
    "n_shared_experts", "attention_chunk_size", "no_rope_layer_interval", "layer_types",
    "text_config", "index_topk",
]  # fmt: skip
NUMBERS = st.integers(-(10**30), 10**30) | st.floats() | st.integers(-4, 70000)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(SHAPE_KEYS), value=JSON | NUMBERS)
def test_a_config_json_with_any_field_replaced_sizes_or_fails_with_value_error(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    from moe_watch.sizing.budget import size
    from moe_watch.sizing.catalog import from_hf_config

    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps({**MIXTRAL_CONFIG, field: value}))
    try:
        plan = size(from_hf_config(path, 47.0), gpus=2)
    except ValueError as exc:  # `size` prints it as its one line, exit 2
        problem = str(exc)
        assert problem
        return
    per_gpu = plan.chosen.kv.bytes_per_token
    assert per_gpu > 0
    assert math.isfinite(plan.itemised.total_gb)


ALLOCATION = {"num_gpu_blocks": "8192", "block_size": "128", "kv_cache_size_tokens": "1048576",
              "kv_cache_max_concurrency": "1024.0", "kv_cache_memory_bytes": "1073741824"}  # fmt: skip
LABEL_NUMBERS = (
    st.text(max_size=12)
    | st.integers(-(10**300), 10**300).map(str)
    | st.floats().map(repr)
    | st.sampled_from(["None", "nan", "inf", "-0", "1e400", "0x10"])
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(list(ALLOCATION)), value=LABEL_NUMBERS)
def test_an_allocation_label_of_any_text_is_read_refused_or_unknown(field: str, value: str) -> None:
    from moe_watch import limits
    from moe_watch.sizing.allocated import allocated_from_labels, kv_coverage

    refused: list[str] = []
    allocated = allocated_from_labels({**ALLOCATION, field: value}, refused)
    if allocated is None:
        return  # refused (named) or unknown (not a number, not allocated yet)
    assert refused == []
    assert 0 <= allocated.tokens <= limits.KV_ALLOCATION
    coverage = kv_coverage(256, 8192, allocated)
    assert math.isfinite(coverage.ratio)
    assert coverage.ratio >= 0
