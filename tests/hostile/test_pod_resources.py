"""Hostile kubelet pod-resources answers: the decoder refuses truncated, oversized or
malformed protobuf with PodResourcesError (the source's ``pod_resources`` reason), never with
another exception, within a memory bound."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.demo.fake_kubelet import _encode_varint, _field, encode_response
from moe_watch.sources.podresources import PodResourcesError, allocations_from_response
from tests.hostile.conftest import peak_memory

GOOD = encode_response([("llm", "pod-0", [("vllm", [("nvidia.com/gpu", ["GPU-1"])])])])

CASES = [
    ("truncated_length", _encode_varint(1 << 3 | 2) + _encode_varint(1000) + b"abc"),
    ("endless_varint", b"\x80" * 100_000),
    ("huge_varint_length", _encode_varint(1 << 3 | 2) + b"\xff" * 20 + b"\x01"),
    ("bad_wire_type", bytes([1 << 3 | 7])),
    ("fixed64_past_the_end", bytes([1 << 3 | 1]) + b"\x00\x00"),
    ("invalid_utf8_device", encode_response([("llm", "p", [("c", [("nvidia.com/gpu", ["x"])])])]).replace(b"x", b"\xff")),
    ("invalid_utf8_names", _field(1, _field(1, b"\xff\xfe") + _field(2, b"llm") + _field(3, _field(1, b"c") + _field(2, _field(1, b"nvidia.com/gpu") + _field(2, b"GPU-9"))))),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_answer_is_one_pod_resources_error(name: str, data: bytes) -> None:
    with peak_memory(), pytest.raises(PodResourcesError):
        allocations_from_response(data)


def test_a_good_answer_still_decodes() -> None:
    (allocation,) = allocations_from_response(GOOD)
    assert (allocation.gpu_uuid, allocation.owner.engine) == ("GPU-1", "llm/pod-0")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        found = allocations_from_response(data)
    except PodResourcesError:
        found = ()
    assert all(isinstance(a.device_id, str) for a in found)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=40), at=st.integers(0, 200))
def test_corrupting_a_good_answer_decodes_or_is_refused(data: bytes, at: int) -> None:
    corrupt = GOOD[:at] + data + GOOD[at + len(data) :]
    with contextlib.suppress(PodResourcesError):
        allocations_from_response(corrupt)
