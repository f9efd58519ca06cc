"""MoE models with the architecture numbers sizing needs, and a reader for any HF config.json.

Numbers are from the models' published config.json files and model cards. `total_params_b` is the
checkpoint's parameter count (what must sit in VRAM: every expert stays resident); the routed
expert parameters follow from the shape (moe_layers x experts x 3 x hidden x moe_intermediate).
The attention numbers are the ones vLLM reads to size its KV cache (docs/sizing.md); the test
suite checks them against vLLM's own arithmetic on the same config.json (tests/sizing/configs/).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moe_watch import limits
from moe_watch.sources.safe_io import TooDeep, loads_json

# Weights. MXFP4 (gpt-oss's experts): 4-bit values plus one 8-bit scale per 32 = 4.25 bits.
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "mxfp4": 4.25 / 8, "int4": 0.5}
# KV cache element sizes vLLM stores (its kv_cache_dtype: auto = the model's bf16/fp16, or fp8).
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}

SLIDING = "sliding"  # sliding-window attention (gpt-oss, Mistral-style)
CHUNKED = "chunked"  # chunked local attention (Llama 4)


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
    # GQA/MQA/MHA: kv_heads x head_dim per layer for K and V. MLA: kv_lora_rank + qk_rope_head_dim
    # per layer, one latent vector shared by every head.
    kv_heads: int = 0
    head_dim: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    # DeepSeek sparse attention (V3.2, GLM-5): the lightning indexer keeps its own key cache per
    # layer (index_head_dim FP8 values + one FP32 scale per 128), beside the MLA latent.
    index_head_dim: int = 0
    # Local attention: `window` tokens on the layers in `window_layers` (0-based), of `window_kind`.
    window: int = 0
    window_kind: str = ""
    window_layers: tuple[int, ...] = ()
    default_dtype: str = "bf16"
    aliases: tuple[str, ...] = ()

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_kind(self) -> str:
        if self.uses_mla:
            return "MLA+DSA" if self.index_head_dim else "MLA"
        if self.kv_heads == self.attention_heads:
            return "MHA"
        return "MQA" if self.kv_heads == 1 else "GQA"

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
         hidden: int, moe_inter: int, heads: int, kv_heads: int, head_dim: int, *aliases: str, dtype: str = "bf16",
         window: int = 0, window_kind: str = "", window_layers: tuple[int, ...] = ()) -> ModelSpec:  # fmt: skip
    return ModelSpec(name, total, active, layers, moe_layers, experts, shared, top_k, hidden, moe_inter, heads,
                     kv_heads=kv_heads, head_dim=head_dim, window=window, window_kind=window_kind,
                     window_layers=window_layers, default_dtype=dtype, aliases=aliases)  # fmt: skip


def _mla(name: str, total: float, active: float, layers: int, moe_layers: int, experts: int, shared: int, top_k: int,
         hidden: int, moe_inter: int, heads: int, *aliases: str, dtype: str = "fp8", index_head_dim: int = 0) -> ModelSpec:  # fmt: skip
    return ModelSpec(name, total, active, layers, moe_layers, experts, shared, top_k, hidden, moe_inter, heads,
                     kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=index_head_dim,
                     default_dtype=dtype, aliases=aliases)  # fmt: skip


def llama4_chunked_layers(layers: int, nope_interval: int = 4) -> tuple[int, ...]:
    """Llama 4's RoPE layers, which use chunked local attention: every layer but each
    ``nope_interval``-th (the NoPE layers attend globally; transformers' ``no_rope_layers``)."""
    return tuple(i for i in range(layers) if (i + 1) % nope_interval != 0)


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
        index_head_dim=128,
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
        window=8192,
        window_kind=CHUNKED,
        window_layers=llama4_chunked_layers(48),
    ),
    _gqa("grok-1", 314.0, 86.0, 64, 64, 8, 0, 2, 6144, 32768, 48, 8, 128, "xai-org/grok-1"),
    # GLM-5: its model card (744B total, 40B active) and transformers' GlmMoeDsaConfig, whose
    # defaults follow GLM-5 (78 layers, MLA 512 + 64, DSA indexer 128); not its released config.json.
    _mla(
        "glm-5", 744.0, 40.0, 78, 75, 256, 1, 8, 6144, 2048, 64, "zai-org/GLM-5", index_head_dim=128
    ),
    # gpt-oss-120b: 116.8B total, 5.1B active (model card); sliding window 128 on even layers.
    _gqa(
        "gpt-oss-120b",
        116.8,
        5.1,
        36,
        36,
        128,
        0,
        4,
        2880,
        2880,
        64,
        8,
        64,
        "openai/gpt-oss-120b",
        dtype="mxfp4",
        window=128,
        window_kind=SLIDING,
        window_layers=tuple(range(0, 36, 2)),
    ),
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
    """A ModelSpec from a Hugging Face config.json.

    Reads Mixtral-, Qwen-MoE-, DeepSeek-, DBRX-, Llama-4- and gpt-oss-style keys, the way vLLM's
    model config reads them (KV heads, head size, MLA ranks, sliding window, chunked attention).
    """
    if total_params_b is not None and not 0 < total_params_b <= limits.PARAMS_B:
        raise ValueError(
            f"params_b {total_params_b:g}: expected a number above 0, at most {limits.PARAMS_B:,}"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.CONFIG_JSON_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read a config.json ({exc.strerror or exc})") from None
    if len(data) > limits.CONFIG_JSON_BYTES:
        raise ValueError(f"{path}: larger than {limits.CONFIG_JSON_BYTES} bytes: not a config.json")
    try:
        raw: Any = loads_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text: not a config.json") from None
    except TooDeep as exc:
        raise ValueError(f"{path}: {exc}: not a config.json") from None
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise ValueError(f"{path}: not valid JSON ({_short(exc)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a config.json (expected a JSON object)")
    config = raw.get("text_config", raw)  # multimodal wrappers (Llama 4) nest the LM config
    if not isinstance(config, dict):
        raise ValueError(f"{path}: text_config is not a JSON object")
    attn: dict[str, Any] = config.get("attn_config") or {}
    ffn: dict[str, Any] = config.get("ffn_config") or {}
    if not isinstance(attn, dict) or not isinstance(ffn, dict):
        raise ValueError(f"{path}: attn_config / ffn_config is not a JSON object")

    def first(*keys: str, default: Any = None) -> tuple[str, Any]:
        for key in keys:
            for where in (config, attn, ffn):  # DBRX nests attention and MoE keys
                if key in where and where[key] is not None:
                    return key, where[key]
        return keys[0], default

    def whole(*keys: str, default: int | None = None, low: int = 1) -> int:
        """The first of ``keys`` present, as a whole number from ``low`` to CONFIG_NUMBER."""
        key, value = first(*keys, default=default)
        if value is None:
            raise ValueError(f"{path}: {key} missing")
        return _whole(value, key, path, low)

    try:
        return _spec_from(raw, config, whole, path, total_params_b)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: unreadable attention or MoE shape ({_short(exc)})") from None


def _whole(value: Any, key: str, path: Path, low: int = 1) -> int:
    """A config.json number sizing reads: whole and within [low, CONFIG_NUMBER] (a bool, NaN or
    a 4,000-digit number is none)."""
    high = limits.CONFIG_NUMBER
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if isinstance(value, float):
        ok = math.isfinite(value) and value.is_integer()
    if ok and low <= value <= high:
        return int(value)
    raise ValueError(f"{path}: {key} is {_shown(value)}: expected a whole number {low}-{high}")


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"a {len(str(abs(value)))}-digit number"  # under Python's 4,300-digit limit
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _spec_from(
    raw: dict[str, Any],
    config: dict[str, Any],
    whole: Any,
    path: Path,
    total_params_b: float | None,
) -> ModelSpec:
    layers = whole("num_hidden_layers", "n_layers", default=0, low=0)
    experts = whole(
        "num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts", default=0, low=0
    )
    if not layers or not experts:
        raise ValueError(
            f"{path}: not an MoE config (num_hidden_layers / num_local_experts|n_routed_experts missing)"
        )
    hidden = whole("hidden_size", "d_model")
    heads = whole("num_attention_heads", "n_heads")
    moe_inter = whole(
        "moe_intermediate_size", "intermediate_size", "ffn_hidden_size", "intermediate_size_moe"
    )
    dense_first = whole("first_k_dense_replace", default=0, low=0)
    step = whole("interleave_moe_layer_step", "moe_layer_freq", default=1, low=0) or 1
    moe_layers = (layers - dense_first) // step
    if moe_layers < 1:
        raise ValueError(f"{path}: first_k_dense_replace leaves no MoE layer of {layers}")
    kv_lora = whole("kv_lora_rank", default=0, low=0)
    # vLLM's attribute order for the KV-head count; models without one are MHA.
    kv_heads = whole(
        "n_head_kv", "num_kv_heads", "num_key_value_heads", "kv_n_heads", default=heads
    )
    if kv_heads > heads:
        raise ValueError(f"{path}: {kv_heads} KV heads for {heads} attention heads")
    head_dim = whole("head_dim", default=0, low=0) or hidden // heads
    if head_dim < 1:
        raise ValueError(f"{path}: hidden_size {hidden} / {heads} heads leaves no head size")
    top_k = whole("num_experts_per_tok", "moe_top_k", "top_k", default=2)
    if top_k > experts:
        raise ValueError(f"{path}: {top_k} experts per token of {experts}")
    window, kind, window_layers = _local_attention(config, layers, path)
    spec = ModelSpec(
        name=str(raw.get("_name_or_path") or path.parent.name)[: limits.LABEL_VALUE_CHARS],
        total_params_b=0.0,
        active_params_b=0.0,
        layers=layers,
        moe_layers=moe_layers,
        routed_experts=experts,
        shared_experts=whole("n_shared_experts", "num_shared_experts", default=0, low=0),
        top_k=top_k,
        hidden_size=hidden,
        moe_intermediate_size=moe_inter,
        attention_heads=heads,
        kv_heads=0 if kv_lora else kv_heads,
        head_dim=0 if kv_lora else head_dim,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=whole("qk_rope_head_dim", default=0, low=0),
        # vLLM builds the DSA indexer (and its cache) where the config has index_topk.
        index_head_dim=whole("index_head_dim", default=128) if "index_topk" in config else 0,
        window=window,
        window_kind=kind,
        window_layers=window_layers,
        default_dtype="bf16",
    )
    total = total_params_b or _estimate_total_b(spec, config, path)
    active = spec.dense_params_b if total_params_b else 0.0
    return _with_params(spec, total, active)


def _local_attention(
    config: dict[str, Any], layers: int, path: Path
) -> tuple[int, str, tuple[int, ...]]:
    """(window, kind, layers using it) from a config's sliding-window or chunked-attention keys."""
    chunk = config.get("attention_chunk_size")
    if chunk:
        nope = config.get("no_rope_layers")
        if isinstance(nope, list) and len(nope) == layers:
            local = tuple(i for i, rope in enumerate(nope) if rope)  # 0 = NoPE = global
        else:
            interval = _whole(
                config.get("no_rope_layer_interval", 4), "no_rope_layer_interval", path
            )
            local = llama4_chunked_layers(layers, interval)
        return _whole(chunk, "attention_chunk_size", path), CHUNKED, local
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return 0, "", ()
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        local = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    else:
        local = tuple(range(layers))  # a model-level window applies to every layer
    return (_whole(window, "sliding_window", path), SLIDING, local) if local else (0, "", ())


def _estimate_total_b(spec: ModelSpec, config: dict[str, Any], path: Path) -> float:
    vocab = _whole(config.get("vocab_size", 32000), "vocab_size", path)
    embeddings = 2 * vocab * spec.hidden_size
    attention = spec.layers * 4 * spec.hidden_size * spec.hidden_size
    shared = (
        spec.moe_layers * spec.shared_experts * 3 * spec.hidden_size * spec.moe_intermediate_size
    )
    routed = spec.routed_expert_params_b * 1e9
    return (embeddings + attention + shared + routed) / 1e9


def _with_params(spec: ModelSpec, total: float, active: float) -> ModelSpec:
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
