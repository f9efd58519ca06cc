"""A target's ExpositionLayout only saves work: every parse gives what the full parse gives."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.sources import exposition
from moe_watch.sources.exposition import (
    ExpositionError,
    ExpositionLayout,
    ParsedExposition,
    parse_engine_exposition,
)
from tests.conftest import read_capture

CAPTURES = ("fresh", "after-5-requests", "after-load", "busy")
VALUE = re.compile(r"(?m)^(vllm:[^#\n]*\}) (\S+)$")  # a labelled vllm sample line's value

TEMPLATE = """\
# HELP vllm:num_requests_running Requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {0}
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {1}
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="1.0",model_name="m"}} {2}
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {3}
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="m"}} {3}
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="m"}} {4}
"""
# Values as engines write them, and as nobody should: each must parse (or fail) the same way
# with the layout as without it.
VALUES = st.sampled_from(
    ["0", "1", "7", "2.5", "1e3", "NaN", "+Inf", "-1", "0x10", "1_000", "abc", "", "1 1700000000",
     "\t3", "3\t", "1.0 ", "4 # {a=\"b\"} 1"]
)  # fmt: skip


def outcome(text: str, layout: ExpositionLayout | None) -> ParsedExposition | str:
    try:
        return parse_engine_exposition(text, "vllm", layout=layout)
    except ExpositionError as exc:
        return exc.reason


def test_the_captures_parse_the_same_through_one_layout_as_alone() -> None:
    layout = ExpositionLayout()
    for name in CAPTURES + CAPTURES:
        text = read_capture(name)
        assert parse_engine_exposition(text, layout=layout) == parse_engine_exposition(text)


def test_a_scrape_with_the_same_layout_and_new_values_skips_the_full_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = read_capture("after-load")
    moved = VALUE.sub(lambda m: f"{m.group(1)} {float(m.group(2)) * 2 + 1:g}", text)
    assert moved != text
    expected = parse_engine_exposition(moved)
    layout = ExpositionLayout()
    parse_engine_exposition(text, layout=layout)

    def no_full_parse(_: str) -> None:
        raise AssertionError("the full parser ran on a known layout")

    monkeypatch.setattr(exposition, "text_string_to_metric_families", no_full_parse)
    assert parse_engine_exposition(moved, layout=layout) == expected


def test_a_new_series_takes_the_full_parse_and_is_kept() -> None:
    layout = ExpositionLayout()
    text = read_capture("after-load")
    parse_engine_exposition(text, layout=layout)
    grown = text + 'vllm:num_requests_waiting{engine="1",model_name="other"} 3\n'
    assert parse_engine_exposition(grown, layout=layout) == parse_engine_exposition(grown)
    assert parse_engine_exposition(grown, layout=layout).models[0].model == "other"


def test_a_malformed_value_on_a_known_layout_is_the_same_parse_error() -> None:
    layout = ExpositionLayout()
    good = TEMPLATE.format(1, 2, 3, 4, 5.0)
    parse_engine_exposition(good, layout=layout)
    bad = TEMPLATE.format("twelve", 2, 3, 4, 5.0)
    with pytest.raises(ExpositionError) as err:
        parse_engine_exposition(bad, layout=layout)
    assert err.value.reason == "parse"
    assert parse_engine_exposition(good, layout=layout) == parse_engine_exposition(good)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(VALUES, VALUES, VALUES, VALUES, VALUES), min_size=1, max_size=4),
)
def test_any_sequence_of_values_parses_as_the_full_parser_does(
    scrapes: list[tuple[str, str, str, str, str]],
) -> None:
    layout = ExpositionLayout()
    for values in scrapes:
        text = TEMPLATE.format(*values)
        assert outcome(text, layout) == outcome(text, None)


def test_a_layout_over_its_size_bound_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    text = TEMPLATE.format(1, 2, 3, 4, 5.0)
    kept = ExpositionLayout()
    parse_engine_exposition(text, layout=kept)
    assert kept.samples(text.splitlines()) is not None  # within the bound: kept
    monkeypatch.setattr(exposition, "LAYOUT_CHARS", 100)
    layout = ExpositionLayout()
    parse_engine_exposition(text, layout=layout)
    assert layout.samples(text.splitlines()) is None
