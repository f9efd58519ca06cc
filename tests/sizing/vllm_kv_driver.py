"""Runs inside the cached vLLM venv: vLLM's own KV arithmetic for each config.json given.

    python vllm_kv_driver.py CASES.json ANSWER.json

CASES maps a name to a directory holding a config.json (and nothing else but, for a model whose
config class is remote code, that class). For each, vLLM's ``ModelConfig`` is built offline (no
weights, no tokenizer), and per tensor-parallel size vLLM's figures are recorded:
``get_num_kv_heads``, ``get_head_size``, ``use_mla``, ``get_num_layers``, and the page size per
token of the KV cache spec each attention layer returns, obtained by calling vLLM's own
``get_kv_cache_spec`` methods (``Attention``, ``MLAAttention``, ``ChunkedLocalAttention``,
``DeepseekV32IndexerCache``) on the attributes a layer of that model would carry. Which layers
are local (sliding / chunked) follows the model files of the installed vLLM: the driver checks
the rule it applies is still in their source. Sliding and chunked windows are recorded as
vLLM's ``max_admission_blocks_per_request`` for the in-flight tokens and lengths in CASES.
"""

from __future__ import annotations

import inspect
import json
import sys
from types import SimpleNamespace
from typing import Any

import torch
from vllm.config import ModelConfig, ParallelConfig
from vllm.distributed.utils import get_pp_indices
from vllm.model_executor.layers.attention import mla_attention
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.attention.chunked_local_attention import ChunkedLocalAttention
from vllm.model_executor.models import deepseek_v2, gpt_oss, llama4
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import SlidingWindowSpec

BLOCK = 16  # any block size: the page is block_size tokens, the figure is per token
TPS = (1, 2, 4, 8)
KV_DTYPES = ("auto", "fp8")


def _backend(name: str) -> Any:
    return SimpleNamespace(get_name=lambda: name)


def full_or_chunked(mc: ModelConfig, kv_heads: int, head: int, kv: str, chunk: int | None) -> Any:
    layer = SimpleNamespace(
        attn_type=AttentionType.DECODER,
        kv_cache_dtype=kv,
        sliding_window=None,
        num_kv_heads=kv_heads,
        head_size=head,
        head_size_v=head,
        kv_cache_torch_dtype=kv_cache_dtype_str_to_dtype(kv, mc),
        attention_chunk_size=chunk,
    )
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK), model_config=mc)
    if chunk:
        return ChunkedLocalAttention.get_kv_cache_spec(layer, config)  # type: ignore[arg-type]
    return Attention.get_kv_cache_spec(layer, config)  # type: ignore[arg-type]


def mla_specs(mc: ModelConfig, head: int, kv: str) -> list[Any]:
    text = mc.hf_text_config
    sparse = hasattr(text, "index_topk")  # deepseek_v2.py: is_v32
    # Hopper's sparse-MLA backend for a quantized KV cache is FlashMLA-sparse (FlashAttention's
    # sparse MLA supports bf16/fp16 only); vLLM then stores its fp8_ds_mla layout.
    backend = _backend("FLASHMLA_SPARSE" if sparse else "FLASHMLA")
    kv = mla_attention._canonicalize_sparse_mla_kv_cache_dtype(backend, kv)
    layer = SimpleNamespace(
        kv_cache_dtype=kv, head_size=head, sliding_window=None, indexer=None,
        non_causal_multi_token_decode=False,
    )  # fmt: skip
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK), model_config=mc)
    specs = [mla_attention.MLAAttention.get_kv_cache_spec(layer, config)]  # type: ignore[arg-type]
    if sparse:
        # Indexer.__init__: head_dim + head_dim // quant_block_size(128) * 4, uint8
        source = inspect.getsource(deepseek_v2.Indexer.__init__)
        assert "self.head_dim + self.head_dim // self.quant_block_size * 4" in source
        assert "self.quant_block_size = 128" in source
        index = text.index_head_dim
        cache = SimpleNamespace(
            cache_config=SimpleNamespace(block_size=BLOCK),
            head_dim=index + index // 128 * 4,
            dtype=torch.uint8,
        )
        specs.append(deepseek_v2.DeepseekV32IndexerCache.get_kv_cache_spec(cache, config))  # type: ignore[arg-type]
    return specs


def local_layers(mc: ModelConfig) -> tuple[str, int, list[int]]:
    """(kind, window, layer indices) the installed vLLM's model files make local."""
    text = mc.hf_text_config
    layers = mc.get_total_num_hidden_layers()
    if "GptOssForCausalLM" in (mc.architectures or []):
        source = inspect.getsource(gpt_oss.OAIAttention._build_attention)
        assert "config.sliding_window if self.layer_idx % 2 == 0 else None" in source
        return "sliding", int(text.sliding_window), list(range(0, layers, 2))
    if getattr(mc, "attention_chunk_size", None):
        source = inspect.getsource(llama4.Llama4Attention.__init__)
        assert "self.nope = self.no_rope_layers[self.layer_idx] == 0" in source
        assert "use_chunked_local_attn = not self.nope and config.attention_chunk_size" in source
        nope = list(text.no_rope_layers)
        return "chunked", int(mc.attention_chunk_size), [i for i in range(layers) if nope[i] != 0]
    return "", 0, []


def measure(path: str, windows: dict[str, Any]) -> dict[str, Any]:
    mc = ModelConfig(model=path, skip_tokenizer_init=True, trust_remote_code=True)
    kind, window, local = local_layers(mc)
    answer: dict[str, Any] = {
        "use_mla": mc.use_mla,
        "head_size": mc.get_head_size(),
        "total_kv_heads": mc.get_total_num_kv_heads(),
        "attention_heads": mc.get_num_attention_heads(ParallelConfig()),
        "layers": mc.get_total_num_hidden_layers(),
        "model_sliding_window": mc.get_sliding_window(),
        "window_kind": kind,
        "window": window,
        "window_layers": local,
        "pp": {str(pp): [list(get_pp_indices(mc.get_total_num_hidden_layers(), r, pp))
                         for r in range(pp)] for pp in (2, 4)},
        "tp": {},
    }  # fmt: skip
    for tp in TPS:
        parallel = ParallelConfig(tensor_parallel_size=tp)
        kv_heads = mc.get_num_kv_heads(parallel)
        head = mc.get_head_size()
        row: dict[str, Any] = {
            "kv_heads": kv_heads,
            "layers": mc.get_num_layers(parallel),
            "bytes_per_token": {},
        }
        for kv in KV_DTYPES:
            if mc.use_mla:
                specs = mla_specs(mc, head, kv)
                per_layer = sum(s.page_size_bytes // s.block_size for s in specs)
                total = per_layer * row["layers"]
            else:
                total = 0
                for layer in range(row["layers"]):
                    chunk = window if kind == "chunked" and layer in local else None
                    spec = full_or_chunked(mc, kv_heads, head, kv, chunk)
                    total += spec.page_size_bytes // spec.block_size
            row["bytes_per_token"][kv] = total
        answer["tp"][str(tp)] = row
    if kind:
        spec_cls: Any = SlidingWindowSpec if kind == "sliding" else None
        bounds = []
        for in_flight, max_len in windows["cases"]:
            if kind == "sliding":
                spec = spec_cls(block_size=BLOCK, num_kv_heads=1, head_size=64,
                                dtype=torch.bfloat16, sliding_window=window)  # fmt: skip
            else:
                spec = full_or_chunked(mc, 1, 64, "auto", window)
            blocks = spec.max_admission_blocks_per_request(in_flight, max_len)
            bounds.append([in_flight, max_len, blocks * BLOCK])
        answer["window_tokens"] = bounds
    return answer


def main() -> None:
    with open(sys.argv[1]) as handle:
        cases = json.load(handle)
    out = {
        name: measure(case["dir"], cases["_windows"])
        for name, case in cases.items()
        if name != "_windows"
    }
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
