"""The plan against what vLLM allocated: ``vllm:cache_config_info`` of the real captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.make_tiny_mixtral import MODEL_CONFIG
from moe_watch.sizing.allocated import (
    AllocatedKv,
    allocated_from_labels,
    kv_coverage,
    planned_kv_tokens,
    planned_kv_tokens_for,
)
from moe_watch.sizing.budget import size
from moe_watch.sizing.catalog import find_model, from_hf_config
from moe_watch.sizing.kv import kv_shape
from tests.conftest import read_capture, read_models

STATES = ("fresh", "after-5-requests", "busy", "after-load")


def cache_labels(state: str) -> dict[str, str]:
    for family in text_string_to_metric_families(read_capture(state)):
        if family.name == "vllm:cache_config_info":
            return dict(family.samples[0].labels)
    raise AssertionError(f"no cache_config_info in the {state} capture")


@pytest.mark.parametrize("state", STATES)
def test_the_real_captures_give_the_allocation(state: str) -> None:
    allocated = allocated_from_labels(cache_labels(state))
    assert allocated == AllocatedKv(
        num_gpu_blocks=8192,
        block_size=128,
        kv_cache_size_tokens=1_048_576,
        kv_cache_max_concurrency=1024.0,
        kv_cache_memory_bytes=1 << 30,
    )
    assert allocated.tokens == 8192 * 128


def test_the_captured_allocation_is_our_bytes_per_token(tmp_path: Path) -> None:
    # The tiny Mixtral the captures came from: 4 layers x K,V x 2 KV heads x 32 x 2 bytes.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**MODEL_CONFIG, "architectures": ["MixtralForCausalLM"]}))
    spec = from_hf_config(config)
    per_token = kv_shape(spec, tp=1).bytes_per_token
    assert per_token == 4 * 2 * 2 * 32 * 2 == 1024
    allocated = allocated_from_labels(cache_labels("fresh"))
    assert allocated is not None
    assert allocated.kv_cache_memory_bytes == allocated.tokens * per_token  # 1 GiB, exactly


def test_the_captured_engine_covers_its_own_plan() -> None:
    allocated = allocated_from_labels(cache_labels("after-load"))
    assert allocated is not None
    engine_len = read_models()["data"][0]["max_model_len"]
    assert engine_len == 1024
    # it ran with --max-num-seqs 8 --max-model-len 1024: 8,192 tokens planned, 1,048,576 held
    coverage = kv_coverage(8, engine_len, allocated)
    assert coverage.planned_tokens == 8192
    assert coverage.ratio == 128.0
    assert not coverage.short()
    assert coverage.engine_max_concurrency == 1024.0
    assert coverage.sequences_at_planned_len == 1024  # vLLM's own figure at the same length


def test_a_plan_beyond_the_allocation_is_short() -> None:
    allocated = allocated_from_labels(cache_labels("busy"))
    assert allocated is not None
    coverage = kv_coverage(256, 8192, allocated)  # 2,097,152 tokens planned
    assert coverage.ratio == pytest.approx(0.5)
    assert coverage.short()
    assert coverage.sequences_at_planned_len == 128  # preempts above 128 sequences, not 256
    assert not kv_coverage(128, 8192, allocated).short()
    # "materially": under 90 % of the plan. 142 x 8192 is 90.1 % covered, 143 x 8192 89.5 %.
    assert not kv_coverage(142, 8192, allocated).short()
    assert kv_coverage(143, 8192, allocated).short()
    assert not kv_coverage(143, 8192, allocated).short(below=0.85)


def test_labels_before_allocation_or_garbled_are_none() -> None:
    labels = cache_labels("fresh")
    assert allocated_from_labels({**labels, "num_gpu_blocks": "None"}) is None
    assert allocated_from_labels({**labels, "block_size": "abc"}) is None
    assert allocated_from_labels({k: v for k, v in labels.items() if k != "num_gpu_blocks"}) is None
    gpu = allocated_from_labels({**labels, "kv_cache_memory_bytes": "None"})
    assert gpu is not None
    assert gpu.kv_cache_memory_bytes is None  # a GPU engine sized it from gpu_memory_utilization
    older = allocated_from_labels(
        {k: v for k, v in labels.items() if not k.startswith("kv_cache_")}
    )
    assert older is not None
    assert older.tokens == 8192 * 128  # without kv_cache_size_tokens: the block pool


def test_planned_tokens_are_per_dp_rank() -> None:
    assert planned_kv_tokens(8, 1024) == 8192
    spec = find_model("deepseek-v3")
    dp8 = size(spec, dtype="fp8", gpu="h200", gpus=8, dp=8, max_num_seqs=256)
    assert planned_kv_tokens_for(dp8) == 32 * 8192  # each engine core holds 256 / 8
    tp8 = size(spec, dtype="fp8", gpu="h200", gpus=8, tp=8, max_num_seqs=256)
    assert planned_kv_tokens_for(tp8) == 256 * 8192
    with pytest.raises(ValueError, match="at least one"):
        kv_coverage(0, 1024, AllocatedKv(1, 16))
