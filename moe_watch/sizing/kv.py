"""KV cache per GPU as vLLM 0.32 computes it (pure functions).

Per layer, vLLM builds a KV cache spec whose ``page_size_bytes / block_size`` is the bytes one
token costs on one GPU (``vllm/v1/kv_cache_interface.py``; docs/sizing.md has the sources):

- GQA / MQA / MHA (``FullAttentionSpec``): K and V, ``2 x heads_per_rank x head_size x bytes``,
  where ``heads_per_rank = max(1, kv_heads // TP)`` (``ModelConfig.get_num_kv_heads``): with
  fewer KV heads than TP ranks each rank holds a replica of one head.
- MLA (``MLAAttentionSpec``, ``num_kv_heads=1``, ``max_tp_shards=1``): one latent vector of
  ``kv_lora_rank + qk_rope_head_dim`` values, no separate V, replicated on every TP rank: TP does
  not divide it, only data-parallel attention does (each DP rank holds its own sequences).
  DeepSeek sparse attention with an FP8 KV cache on Hopper is served by FlashMLA-sparse in the
  ``fp8_ds_mla`` layout: 656 bytes per token (512 FP8 values, 4 FP32 scales, 64 BF16 rope).
- The DSA lightning indexer (DeepSeek-V3.2, GLM-5): one more cache per layer,
  ``index_head_dim + index_head_dim // 128 x 4`` bytes (FP8 keys and FP32 scales), replicated.
- Sliding-window layers (``SlidingWindowSpec``, the hybrid KV cache manager, on by default on
  GPUs) keep per sequence ``min(window - 1 + in_flight, max_model_len)`` tokens plus one block,
  where ``in_flight = concurrent batches x max_num_batched_tokens`` (vLLM's admission bound).
  Chunked local attention (Llama 4) is sized the same way (``chunk + in_flight``) only with
  ``VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=1``; by default vLLM 0.32 turns the hybrid
  manager off for it and sizes those layers as full attention.
- Pipeline parallelism: a GPU holds the layers of its stage (``get_pp_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_watch.sizing.catalog import CHUNKED, KV_DTYPE_BYTES, SLIDING, ModelSpec

FP8_DS_MLA_BYTES = 656  # FlashMLA-sparse's packed FP8 token: 512 + 4 x 4 + 64 x 2
INDEXER_QUANT_BLOCK = 128  # one FP32 scale per 128 FP8 indexer values
# GPUs whose sparse-MLA backend in vLLM 0.32 is FlashMLA-sparse for an FP8 KV cache (SM90);
# Blackwell prefers FlashInfer's sparse MLA, which keeps the plain FP8 latent.
FP8_DS_MLA_GPUS = frozenset({"h100-80", "h200-141"})
# vLLM's default max_num_batched_tokens for the OpenAI server by GPU (EngineArgs defaults).
DEFAULT_BATCHED_TOKENS = {"b200-192": 16384, "h100-80": 8192, "h200-141": 8192}
FALLBACK_BATCHED_TOKENS = 2048
GPU_BLOCK_SIZE = 16  # vLLM's default block size on CUDA (the +1 block of a sliding window)


@dataclass(frozen=True)
class Cache:
    """One KV cache of one layer on one GPU."""

    what: str  # e.g. "K+V 1 of 4 KV heads x 128 (replicated)", "MLA latent 512+64"
    bytes_per_token: int
    window: int = 0  # tokens a sequence keeps; 0 = every token (full attention)


@dataclass(frozen=True)
class KvShape:
    """What one GPU's KV cache holds per token and per sequence under a layout."""

    layers: int  # attention layers on this GPU (its PP stage; the largest stage)
    caches: tuple[tuple[Cache, int], ...]  # (cache, how many layers have it)
    bytes_per_token: int  # all layers of the stage, every token of a full-length sequence

    def bytes_per_sequence(self, max_model_len: int) -> int:
        """Bytes one sequence of ``max_model_len`` tokens costs on this GPU."""
        return sum(
            cache.bytes_per_token * count * (cache.window or max_model_len)
            for cache, count in self.caches
        )


def kv_element_bytes(kv_dtype: str) -> int:
    key = kv_dtype.lower()
    if key not in KV_DTYPE_BYTES:
        raise ValueError(
            f"unknown KV cache dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPE_BYTES)}"
        )
    return KV_DTYPE_BYTES[key]


def heads_per_rank(spec: ModelSpec, tp: int) -> int:
    """vLLM's ``get_num_kv_heads``: KV heads one TP rank holds (1 for MLA)."""
    if spec.uses_mla:
        return 1
    return max(1, spec.kv_heads // tp)


def layer_caches(
    spec: ModelSpec, tp: int, kv_dtype: str, gpu: str = "h100-80"
) -> tuple[Cache, ...]:
    """The caches one full-attention layer keeps on one GPU under TP ``tp`` (no window)."""
    size = kv_element_bytes(kv_dtype)
    if spec.uses_mla:
        latent = spec.kv_lora_rank + spec.qk_rope_head_dim
        caches = [
            Cache(
                f"MLA latent {spec.kv_lora_rank}+{spec.qk_rope_head_dim} (whole on every TP rank)",
                latent * size,
            )
        ]
        if spec.index_head_dim and kv_dtype == "fp8" and gpu in FP8_DS_MLA_GPUS:
            caches = [
                Cache(
                    "MLA latent, FP8 fp8_ds_mla layout (whole on every TP rank)", FP8_DS_MLA_BYTES
                )
            ]
        if spec.index_head_dim:
            scales = spec.index_head_dim // INDEXER_QUANT_BLOCK * 4
            caches.append(
                Cache(
                    f"DSA indexer keys {spec.index_head_dim} FP8 + scales",
                    spec.index_head_dim + scales,
                )
            )
        return tuple(caches)
    heads = heads_per_rank(spec, tp)
    if spec.kv_heads < tp:
        what = f"K+V 1 of {spec.kv_heads} KV heads x {spec.head_dim}, replicated over {tp // spec.kv_heads} TP ranks"
    else:
        what = f"K+V {heads} of {spec.kv_heads} KV heads x {spec.head_dim}"
    return (Cache(what, 2 * heads * spec.head_dim * size),)  # fmt: skip


def pp_stage_layers(layers: int, pp: int) -> list[int]:
    """vLLM's ``get_pp_indices`` partition: layers per stage, the remainder on the stages
    before the last."""
    partitions = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        partitions[-i] += 1
    return partitions


def in_flight_tokens(gpu: str, pp: int, max_num_batched_tokens: int | None = None) -> int:
    """Tokens scheduled but not yet settled: (PP + 1) concurrent batches (async scheduling,
    model runner V2, vLLM 0.32's GPU default) x max_num_batched_tokens."""
    batched = max_num_batched_tokens or DEFAULT_BATCHED_TOKENS.get(gpu, FALLBACK_BATCHED_TOKENS)
    return (pp + 1) * batched


def window_tokens(
    kind: str, window: int, max_model_len: int, in_flight: int, *, chunked_hybrid: bool = False
) -> int:
    """Tokens one sequence keeps in a local-attention layer (0: all, as full attention)."""
    if kind == SLIDING:
        # SlidingWindowSpec.max_admission_blocks_per_request: +1 block, the window may start
        # mid-block.
        blocks = -(-min(window - 1 + in_flight, max_model_len) // GPU_BLOCK_SIZE) + 1
        return blocks * GPU_BLOCK_SIZE
    if kind == CHUNKED and chunked_hybrid:
        # ChunkedLocalAttentionSpec.max_admission_blocks_per_request
        return -(-min(window + in_flight, max_model_len) // GPU_BLOCK_SIZE) * GPU_BLOCK_SIZE
    return 0


def kv_shape(
    spec: ModelSpec,
    *,
    tp: int,
    pp: int = 1,
    kv_dtype: str = "bf16",
    gpu: str = "h100-80",
    max_model_len: int = 8192,
    max_num_batched_tokens: int | None = None,
    chunked_hybrid: bool = False,
) -> KvShape:
    """The KV cache of the largest PP stage on one GPU under TP ``tp``."""
    partitions = pp_stage_layers(spec.layers, pp)
    stage = max(range(pp), key=lambda i: partitions[i])  # the first of the largest
    start = sum(partitions[:stage])
    stage_layers = range(start, start + partitions[stage])
    base = layer_caches(spec, tp, kv_dtype, gpu)
    in_flight = in_flight_tokens(gpu, pp, max_num_batched_tokens)
    local = set(spec.window_layers)
    counts: dict[Cache, int] = {}
    for layer in stage_layers:
        window = 0
        if layer in local:
            window = window_tokens(
                spec.window_kind,
                spec.window,
                max_model_len,
                in_flight,
                chunked_hybrid=chunked_hybrid,
            )
        for cache in base:
            key = Cache(cache.what, cache.bytes_per_token, window)
            counts[key] = counts.get(key, 0) + 1
    per_token = sum(cache.bytes_per_token * n for cache, n in counts.items())
    return KvShape(len(stage_layers), tuple(counts.items()), per_token)


def kv_bytes_per_token_one_copy(spec: ModelSpec, kv_dtype: str = "bf16") -> int:
    """The published figure: every layer's cache for one token, unsharded (TP 1)."""
    return kv_shape(spec, tp=1, kv_dtype=kv_dtype, gpu="").bytes_per_token
