"""vLLM's KV arithmetic per attention kind, by hand (the vLLM cross-check is test_vllm_kv.py)."""

from __future__ import annotations

import pytest

from moe_watch.sizing.budget import size
from moe_watch.sizing.catalog import find_model
from moe_watch.sizing.kv import (
    heads_per_rank,
    in_flight_tokens,
    kv_bytes_per_token_one_copy,
    kv_shape,
    pp_stage_layers,
    window_tokens,
)


def test_gqa_heads_split_by_tp_until_one_then_replicated() -> None:
    qwen3 = find_model("qwen3-235b-a22b")  # 4 KV heads
    assert [heads_per_rank(qwen3, tp) for tp in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert [kv_shape(qwen3, tp=tp).bytes_per_token for tp in (1, 2, 4, 8)] == [
        94 * 2 * h * 128 * 2 for h in (4, 2, 1, 1)
    ]
    mha = find_model("qwen1.5-moe-a2.7b")  # MHA: 16 KV heads
    assert mha.attention_kind == "MHA"
    assert kv_shape(mha, tp=8).bytes_per_token == 24 * 2 * 2 * 128 * 2


def test_mla_latent_is_not_divided_by_tp() -> None:
    spec = find_model("kimi-k2")
    assert spec.attention_kind == "MLA"
    per_tp = {kv_shape(spec, tp=tp, kv_dtype="fp8").bytes_per_token for tp in (1, 2, 4, 8)}
    assert per_tp == {61 * 576}


def test_dsa_adds_the_indexer_cache_and_fp8_uses_flashmla_sparse_layout_on_hopper() -> None:
    spec = find_model("deepseek-v3.2")
    assert spec.attention_kind == "MLA+DSA"
    # BF16 latent 576 x 2 + indexer 128 FP8 + one FP32 scale
    assert kv_shape(spec, tp=8, kv_dtype="bf16").bytes_per_token == 61 * (1152 + 132)
    # FP8 on H100/H200: FlashMLA-sparse's fp8_ds_mla, 656 B per token (512 + 16 + 128)
    assert kv_shape(spec, tp=8, kv_dtype="fp8", gpu="h200-141").bytes_per_token == 61 * (656 + 132)
    # FP8 on B200: FlashInfer's sparse MLA keeps the plain FP8 latent
    assert kv_shape(spec, tp=8, kv_dtype="fp8", gpu="b200-192").bytes_per_token == 61 * (576 + 132)
    # dense-MLA DeepSeek-V3 has neither
    assert (
        kv_shape(find_model("deepseek-v3"), tp=8, kv_dtype="fp8", gpu="h200-141").bytes_per_token
        == 61 * 576
    )


def test_pipeline_stages_hold_their_layers_as_vllm_partitions_them() -> None:
    assert pp_stage_layers(61, 2) == [31, 30]
    assert pp_stage_layers(94, 4) == [23, 24, 24, 23]  # remainder on the middle stages
    spec = find_model("deepseek-v3")
    assert kv_shape(spec, tp=8, pp=2).layers == 31
    assert kv_shape(spec, tp=8, pp=2).bytes_per_token == 31 * 1152


def test_sliding_window_layers_keep_vllms_admission_bound() -> None:
    spec = find_model("gpt-oss-120b")  # window 128 on the 18 even layers, 8 KV heads x 64
    in_flight = in_flight_tokens("h100-80", pp=1)
    assert in_flight == 2 * 8192  # async scheduling: two batches of max_num_batched_tokens
    # min(128 - 1 + 16384, len) tokens in 16-token blocks, + 1 block
    assert window_tokens("sliding", 128, 131072, in_flight) == (-(-16511 // 16) + 1) * 16
    assert window_tokens("sliding", 128, 4096, in_flight) == 4096 + 16
    shape = kv_shape(spec, tp=8, max_model_len=131072)
    per_layer = 2 * 1 * 64 * 2
    assert shape.bytes_per_token == 36 * per_layer
    full = 18 * per_layer * 131072
    local = 18 * per_layer * 16528
    assert shape.bytes_per_sequence(131072) == full + local
    # a smaller max_num_batched_tokens tightens the bound
    tight = kv_shape(spec, tp=8, max_model_len=131072, max_num_batched_tokens=2048)
    assert (
        tight.bytes_per_sequence(131072)
        == full + 18 * per_layer * (-(-(127 + 4096) // 16) + 1) * 16
    )


def test_llama4_chunked_layers_are_full_attention_unless_hybrid_is_allowed() -> None:
    spec = find_model("llama-4-maverick")
    assert len(spec.window_layers) == 36  # every layer but each 4th (NoPE, global)
    default = kv_shape(spec, tp=8, max_model_len=1_000_000)
    assert default.bytes_per_sequence(1_000_000) == 48 * 2 * 1 * 128 * 2 * 1_000_000
    hybrid = kv_shape(spec, tp=8, max_model_len=1_000_000, chunked_hybrid=True)
    per_layer = 2 * 1 * 128 * 2
    assert hybrid.bytes_per_sequence(1_000_000) == per_layer * (
        12 * 1_000_000 + 36 * (8192 + 2 * 8192)
    )


def test_the_published_figure_is_one_unsharded_copy() -> None:
    assert kv_bytes_per_token_one_copy(find_model("mixtral-8x7b")) == 131_072
    assert kv_bytes_per_token_one_copy(find_model("deepseek-v3"), "fp8") == 35_136


def test_windows_shrink_the_per_gpu_kv_of_long_contexts() -> None:
    spec = find_model("gpt-oss-120b")
    plan = size(spec, gpu="h100", gpus=8, tp=8, max_model_len=131072, max_num_seqs=16)
    full_only = 36 * 2 * 1 * 64 * 2 * 131072 * 16 / 1e9
    assert plan.kv_per_gpu_gb < 0.6 * full_only
    assert any("sliding layers keep at most their window" in note for note in plan.notes)


def test_unknown_kv_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int8'"):
        kv_shape(find_model("mixtral-8x7b"), tp=1, kv_dtype="int8")
