"""MoE models with the architecture numbers sizing needs, and a reader for any HF config.json.

Numbers are from the models' published config.json files and model cards. `total_params_b` is the
checkpoint's parameter count (what must sit in VRAM: every expert stays resident); the routed
expert parameters follow from the shape (moe_layers x experts x 3 x hidden x moe_intermediate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    total_params_b: float
    active_params_b: float
    layers: int
    moe_layers: int
    routed_experts: int
    shared_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    attention_heads: int
    # GQA: kv_heads x head_dim per layer for K and V. MLA: kv_lora_rank + qk_rope_head_dim per layer.
    kv_heads: int = 0
    head_dim: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    default_dtype: str = "bf16"
    aliases: tuple[str, ...] = ()

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def routed_expert_params_b(self) -> float:
        return (
            self.moe_layers
            * self.routed_experts
            * 3
            * self.hidden_size
            * self.moe_intermediate_size
            / 1e9
        )

    @property
    def dense_params_b(self) -> float:
        """Attention, embeddings, shared experts, dense layers: what TP splits or EP replicates."""
        return max(0.0, self.total_params_b - self.routed_expert_params_b)

    @property
    def is_large(self) -> bool:
        """design.md's "large MoE": the tighter vLLM settings apply (> 100B total)."""
        return self.total_params_b > 100


def _gqa(name: str, total: float, active: float, layers: int, moe_layers: int, experts: int, shared: int, top_k: int,
         hidden: int, moe_inter: int, heads: int, kv_heads: int, head_dim: int, *aliases: str, dtype: str = "bf16") -> ModelSpec:  # fmt: skip
    return ModelSpec(name, total, active, layers, moe_layers, experts, shared, top_k, hidden, moe_inter, heads,
                     kv_heads=kv_heads, head_dim=head_dim, default_dtype=dtype, aliases=aliases)  # fmt: skip


def _mla(name: str, total: float, active: float, layers: int, moe_layers: int, experts: int, shared: int, top_k: int,
         hidden: int, moe_inter: int, heads: int, *aliases: str, dtype: str = "fp8") -> ModelSpec:  # fmt: skip
    return ModelSpec(name, total, active, layers, moe_layers, experts, shared, top_k, hidden, moe_inter, heads,
                     kv_lora_rank=512, qk_rope_head_dim=64, default_dtype=dtype, aliases=aliases)  # fmt: skip


CATALOG: tuple[ModelSpec, ...] = (
    _gqa(
        "mixtral-8x7b",
        46.7,
        12.9,
        32,
        32,
        8,
        0,
        2,
        4096,
        14336,
        32,
        8,
        128,
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "mixtral",
    ),
    _gqa(
        "mixtral-8x22b",
        141.0,
        39.0,
        56,
        56,
        8,
        0,
        2,
        6144,
        16384,
        48,
        8,
        128,
        "mistralai/Mixtral-8x22B-Instruct-v0.1",
    ),
    _mla("deepseek-v3", 671.0, 37.0, 61, 58, 256, 1, 8, 7168, 2048, 128, "deepseek-ai/DeepSeek-V3"),
    _mla(
        "deepseek-v3.2",
        685.0,
        37.0,
        61,
        58,
        256,
        1,
        8,
        7168,
        2048,
        128,
        "deepseek-ai/DeepSeek-V3.2-Exp",
        "deepseek-v3.2-exp",
    ),
    _mla("kimi-k2", 1000.0, 32.0, 61, 60, 384, 1, 8, 7168, 2048, 64, "moonshotai/Kimi-K2-Instruct"),
    _gqa(
        "qwen3-235b-a22b",
        235.0,
        22.0,
        94,
        94,
        128,
        0,
        8,
        4096,
        1536,
        64,
        4,
        128,
        "Qwen/Qwen3-235B-A22B",
    ),
    _gqa(
        "qwen2-57b-a14b",
        57.0,
        14.0,
        28,
        28,
        64,
        8,
        8,
        3584,
        2560,
        28,
        4,
        128,
        "Qwen/Qwen2-57B-A14B-Instruct",
    ),
    _gqa(
        "qwen1.5-moe-a2.7b",
        14.3,
        2.7,
        24,
        24,
        60,
        4,
        4,
        2048,
        1408,
        16,
        16,
        128,
        "Qwen/Qwen1.5-MoE-A2.7B",
    ),
    _gqa(
        "deepseek-moe-16b",
        16.4,
        2.8,
        28,
        27,
        64,
        2,
        6,
        2048,
        1408,
        16,
        16,
        128,
        "deepseek-ai/deepseek-moe-16b-base",
    ),
    _gqa(
        "dbrx", 132.0, 36.0, 40, 40, 16, 0, 4, 6144, 10752, 48, 8, 128, "databricks/dbrx-instruct"
    ),
    _gqa(
        "llama-4-maverick",
        400.0,
        17.0,
        48,
        24,
        128,
        1,
        1,
        5120,
        8192,
        40,
        8,
        128,
        "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    ),
    _gqa("grok-1", 314.0, 86.0, 64, 64, 8, 0, 2, 6144, 32768, 48, 8, 128, "xai-org/grok-1"),
    # GLM-5: numbers from its model card (744B total, 40B active, DeepSeek-style MLA and sparse
    # attention); check them against the released config.json before relying on them.
    _mla("glm-5", 744.0, 40.0, 78, 75, 256, 1, 8, 6144, 2048, 64, "zai-org/GLM-5"),
)


class UnknownModel(ValueError):
    pass


def find_model(name: str) -> ModelSpec:
    key = name.strip().lower()
    for spec in CATALOG:
        if key == spec.name or key in (alias.lower() for alias in spec.aliases):
            return spec
    known = ", ".join(spec.name for spec in CATALOG)
    raise UnknownModel(f"unknown model {name!r}: use one of {known}, or --config PATH/config.json")


def from_hf_config(path: Path, total_params_b: float | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (Mixtral-, Qwen-MoE- and DeepSeek-style keys)."""
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a config.json ({exc})") from None
    config = raw.get("text_config", raw)  # multimodal wrappers (Llama 4) nest the LM config

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if key in config and config[key] is not None:
                return config[key]
        return default

    layers = int(first("num_hidden_layers", "n_layers", default=0))
    experts = int(first("num_local_experts", "n_routed_experts", "num_experts", default=0))
    if not layers or not experts:
        raise ValueError(
            f"{path}: not an MoE config (num_hidden_layers / num_local_experts|n_routed_experts missing)"
        )
    hidden = int(first("hidden_size", "d_model"))
    heads = int(first("num_attention_heads", "n_heads"))
    moe_inter = int(first("moe_intermediate_size", "intermediate_size_moe", "intermediate_size"))
    dense_first = int(first("first_k_dense_replace", default=0))
    step = int(first("interleave_moe_layer_step", "moe_layer_freq", default=1)) or 1
    moe_layers = (layers - dense_first) // step
    kv_lora = int(first("kv_lora_rank", default=0) or 0)
    spec = ModelSpec(
        name=str(raw.get("_name_or_path") or path.parent.name),
        total_params_b=0.0,
        active_params_b=0.0,
        layers=layers,
        moe_layers=moe_layers,
        routed_experts=experts,
        shared_experts=int(first("n_shared_experts", "num_shared_experts", default=0) or 0),
        top_k=int(first("num_experts_per_tok", "moe_top_k", "top_k", default=2)),
        hidden_size=hidden,
        moe_intermediate_size=moe_inter,
        attention_heads=heads,
        kv_heads=0 if kv_lora else int(first("num_key_value_heads", default=heads)),
        head_dim=0 if kv_lora else int(first("head_dim", default=hidden // heads)),
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=int(first("qk_rope_head_dim", default=0) or 0),
        default_dtype="bf16",
    )
    total = total_params_b or _estimate_total_b(spec, config)
    active = spec.dense_params_b if total_params_b else 0.0
    return _with_params(spec, total, active)


def _estimate_total_b(spec: ModelSpec, config: dict[str, Any]) -> float:
    vocab = int(config.get("vocab_size", 32000))
    embeddings = 2 * vocab * spec.hidden_size
    attention = spec.layers * 4 * spec.hidden_size * spec.hidden_size
    shared = (
        spec.moe_layers * spec.shared_experts * 3 * spec.hidden_size * spec.moe_intermediate_size
    )
    routed = spec.routed_expert_params_b * 1e9
    return (embeddings + attention + shared + routed) / 1e9


def _with_params(spec: ModelSpec, total: float, active: float) -> ModelSpec:
    from dataclasses import replace

    routed_per_token = (
        spec.moe_layers * spec.top_k * 3 * spec.hidden_size * spec.moe_intermediate_size / 1e9
    )
    return replace(
        spec,
        total_params_b=round(total, 2),
        active_params_b=round(
            active or (total - spec.routed_expert_params_b + routed_per_token), 2
        ),
    )
