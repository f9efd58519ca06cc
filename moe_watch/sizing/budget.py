"""Budget maths: what an MoE deployment needs per GPU under a vLLM layout (pure functions).

Two named rules, both applied per GPU of the layout:

- ``x1.15 + KV``: weights x 1.15 + KV cache (1.15 covers activations, framework overhead and
  routing buffers), one operator guide's planning formula. Its published form divides the whole
  deployment's ``weights x 1.15 + KV budget`` by the GPU count; that holds only where the KV cache
  splits evenly over the GPUs, which MLA under TP and GQA with fewer KV heads than TP ranks break.
- itemised: weights + KV cache + activations (3 GB, of the 2-4 GB range) + CUDA context (1.5 GB
  per GPU, of 1-2) + a 15 % safety margin (of 10-20 %).

Per GPU: routed experts are divided over the expert-parallel group (TP x DP ranks), the dense
part (attention, embeddings, shared experts) is split by TP and replicated over DP; PP divides
both by stage. The KV cache per GPU is vLLM's (``kv.py``) for the sequences one DP rank holds.
The verdict needs both rules to fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moe_watch.sizing.catalog import DTYPE_BYTES, ModelSpec
from moe_watch.sizing.kv import (
    KvShape,
    kv_bytes_per_token_one_copy,
    kv_element_bytes,
    kv_shape,
)
from moe_watch.sizing.layout import (
    GPUS_PER_NODE,
    Layout,
    candidate_gpu_counts,
    deployable_layouts,
    nodes_text,
    resolve_layout,
)

GB = 1e9
GPUS_GB: dict[str, float] = {
    "a100-40": 40,
    "a100-80": 80,
    "h100-80": 80,
    "h200-141": 141,
    "b200-192": 192,
    "l40s-48": 48,
    "a10g-24": 24,
    "l4-24": 24,
}
GPU_ALIASES = {
    "a100": "a100-80",
    "h100": "h100-80",
    "h200": "h200-141",
    "b200": "b200-192",
    "l40s": "l40s-48",
    "a10g": "a10g-24",
    "l4": "l4-24",
}
# GPUs whose boards in this catalog connect over NVLink (the SXM/HGX parts: NVLink 3/4/5 through
# NVSwitch, 600-1800 GB/s per GPU); the others are PCIe cards (~64-128 GB/s; no NVLink on L40S,
# A10G, L4). A100 also ships as a PCIe card: the plan assumes the SXM board.
NVLINK_GPUS = frozenset({"a100-40", "a100-80", "h100-80", "h200-141", "b200-192"})
NVSWITCH_DOMAIN_GPUS = 8  # one HGX node: beyond it, EP traffic crosses the network
OVERHEAD_FACTOR = 1.15
ACTIVATIONS_GB = 3.0
CUDA_CONTEXT_GB = 1.5
SAFETY_MARGIN = 0.15
# design.md's vLLM knobs for MoE (the source every recommendation below names).
DESIGN_GMU_LARGE = 0.80  # "0.75-0.80 for large MoE"
DESIGN_GMU_DEFAULT = 0.90  # "0.90 is the dense default"
DESIGN_SEQS_LARGE = (4, 8)  # "max_num_seqs 4-8 to start for large MoE"
SEARCH_NODES = 8  # "smallest that fits" looks up to 8 nodes


def gpu_key(gpu: str) -> str:
    key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    if key not in GPUS_GB:
        raise ValueError(f"unknown GPU {gpu!r}: use one of {', '.join(GPUS_GB)}")
    return key


def gpu_memory_gb(gpu: str) -> float:
    return GPUS_GB[gpu_key(gpu)]


def weights_bytes(spec: ModelSpec, dtype: str) -> float:
    return spec.total_params_b * 1e9 * _bytes(dtype)


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str = "bf16") -> float:
    """One copy of every layer's KV for one token (the published figure; TP 1, no window)."""
    return float(kv_bytes_per_token_one_copy(spec, kv_dtype))


@dataclass(frozen=True)
class PerGpu:
    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    cuda_context_gb: float
    margin_gb: float
    total_gb: float
    gpu_gb: float

    @property
    def free_gb(self) -> float:
        return self.gpu_gb - self.total_gb

    @property
    def fits(self) -> bool:
        return self.free_gb >= 0


@dataclass(frozen=True)
class LayoutOption:
    """One deployable layout, sized per GPU."""

    layout: Layout
    weights_gb: float  # per GPU
    kv: KvShape  # per GPU: its stage's layers, its TP share
    seqs_per_rank: int  # sequences one DP rank holds (vLLM's max_num_seqs for it)
    kv_gb: float  # per GPU, for seqs_per_rank sequences of max_model_len
    rule_115_gb: float  # weights x 1.15 + KV, per GPU
    itemised: PerGpu

    @property
    def label(self) -> str:
        return self.layout.label

    @property
    def fits(self) -> bool:
        return self.rule_115_gb <= self.itemised.gpu_gb and self.itemised.fits


@dataclass(frozen=True)
class Setting:
    """One recommended vLLM setting and where its value comes from."""

    name: str
    value: object
    source: str


@dataclass(frozen=True)
class Smallest:
    gpus: int
    nodes: str  # "16 = 2 nodes x 8"
    fitting: tuple[LayoutOption, ...]  # the layouts of that count that fit, most free first


@dataclass(frozen=True)
class Plan:
    model: str
    attention: str  # MLA, MLA+DSA, GQA, MQA, MHA
    dtype: str
    kv_dtype: str
    gpu: str
    gpus: int
    gpus_per_node: int
    max_model_len: int
    max_num_seqs: int  # the target: concurrent sequences of the whole deployment
    layout_source: str  # "given" or how it was picked
    chosen: LayoutOption
    options: tuple[LayoutOption, ...]  # every deployable layout of `gpus`, most free first
    weights_gb: float  # all GPUs together
    kv_bytes_per_token: int  # one copy, unsharded: the published figure
    kv_total_gb: float  # one copy x max_model_len x max_num_seqs: the published KV budget
    rule_115_total_gb: float  # published form: weights x 1.15 + KV budget, all GPUs
    smallest: Smallest | None
    recommended: tuple[Setting, ...]
    notes: tuple[str, ...]
    interconnect: str = ""  # what expert parallelism needs from the GPUs' links

    @property
    def layout(self) -> Layout:
        return self.chosen.layout

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def itemised(self) -> PerGpu:
        return self.chosen.itemised

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    @property
    def kv_per_gpu_gb(self) -> float:
        return self.chosen.kv_gb

    @property
    def rule_115_per_gpu_gb(self) -> float:
        return self.chosen.rule_115_gb

    @property
    def smallest_fitting_gpus(self) -> int | None:
        return self.smallest.gpus if self.smallest else None

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "attention": self.attention,
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "gpu": self.gpu,
            "gpus": self.gpus,
            "gpus_per_node": self.gpus_per_node,
            "target": {"max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len},
            "layout": _option_dict(self.chosen) | {"source": self.layout_source},
            "fits": self.fits,
            "weights_gb": self.weights_gb,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_total_gb": self.kv_total_gb,
            "rule_115_total_gb": self.rule_115_total_gb,
            "options": [_option_dict(option) for option in self.options],
            "smallest_fitting": None
            if self.smallest is None
            else {
                "gpus": self.smallest.gpus,
                "nodes": self.smallest.nodes,
                "layouts": [_option_dict(option) for option in self.smallest.fitting],
            },
            "recommended": [asdict(setting) for setting in self.recommended],
            "notes": list(self.notes),
            "interconnect": self.interconnect,
        }


def _option_dict(option: LayoutOption) -> dict[str, Any]:
    layout = option.layout
    itemised = asdict(option.itemised) | {"free_gb": option.itemised.free_gb}
    return {
        "label": option.label,
        "tp": layout.tp,
        "dp": layout.dp,
        "pp": layout.pp,
        "ep": layout.ep,
        "gpus": layout.gpus,
        "weights_gb": option.weights_gb,
        "kv_layers": option.kv.layers,
        "kv_bytes_per_token": option.kv.bytes_per_token,
        "kv_caches": [
            {
                "what": cache.what,
                "bytes_per_token": cache.bytes_per_token,
                "layers": count,
                "tokens_per_sequence": cache.window or None,
            }
            for cache, count in option.kv.caches
        ],
        "seqs_per_rank": option.seqs_per_rank,
        "kv_gb": option.kv_gb,
        "rule_115_gb": option.rule_115_gb,
        "itemised": itemised,
        "fits": option.fits,
    }


@dataclass(frozen=True)
class Target:
    """What every layout is sized for: the user's numbers and vLLM's knobs that change KV."""

    dtype: str
    kv_dtype: str
    gpu: str  # canonical key
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int | None = None
    chunked_hybrid: bool = False


def size(
    spec: ModelSpec,
    *,
    dtype: str | None = None,
    kv_dtype: str = "bf16",
    gpu: str = "h100-80",
    gpus: int | None = None,
    tp: int | None = None,
    dp: int | None = None,
    pp: int | None = None,
    ep: int | None = None,
    gpus_per_node: int = GPUS_PER_NODE,
    max_model_len: int = 8192,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int | None = None,
    chunked_hybrid: bool = False,
) -> Plan:
    """Size ``spec`` on ``gpus`` x ``gpu`` under the given layout, or the best deployable one."""
    dtype = (dtype or spec.default_dtype).lower()
    _bytes(dtype)
    kv_element_bytes(kv_dtype)
    if max_model_len < 1 or max_num_seqs < 1:
        raise ValueError("max_model_len and max_num_seqs must be at least 1")
    target = Target(dtype, kv_dtype.lower(), gpu_key(gpu), max_model_len, max_num_seqs,
                    max_num_batched_tokens, chunked_hybrid)  # fmt: skip
    count, fixed = resolve_layout(
        spec, gpus, tp=tp, dp=dp, pp=pp, ep=ep, gpus_per_node=gpus_per_node
    )
    layouts = deployable_layouts(spec, count, gpus_per_node, expert_parallel=ep != 1)
    options = _ranked(size_layout(spec, layout, target) for layout in layouts)
    if fixed is not None:
        chosen = size_layout(spec, fixed, target)
        source = "given"
    elif options:
        chosen = options[0]
        fitting = sum(option.fits for option in options)
        source = (
            f"picked: most free memory per GPU of {len(options)} deployable "
            f"layout{'s' if len(options) > 1 else ''}, {fitting} fit"
        )
    else:
        raise ValueError(
            f"no deployable layout of {count} GPUs for {spec.name}: TP must divide its "
            f"{spec.attention_heads} attention heads and fit in a node of {gpus_per_node}"
        )
    weights = weights_bytes(spec, dtype) / GB
    kv_token = kv_bytes_per_token_one_copy(spec, target.kv_dtype)
    kv_total = kv_token * max_model_len * max_num_seqs / GB
    smallest = smallest_fitting(spec, target, gpus_per_node)
    return Plan(
        model=spec.name, attention=spec.attention_kind, dtype=dtype, kv_dtype=target.kv_dtype,
        gpu=gpu, gpus=count, gpus_per_node=gpus_per_node, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, layout_source=source, chosen=chosen, options=tuple(options),
        weights_gb=weights, kv_bytes_per_token=kv_token, kv_total_gb=kv_total,
        rule_115_total_gb=weights * OVERHEAD_FACTOR + kv_total, smallest=smallest,
        recommended=recommended_settings(spec, chosen, target),
        notes=_notes(spec, chosen, target, kv_total, count),
        interconnect=interconnect_requirement(gpu, chosen.layout.ep)
        if chosen.layout.ep > 1 or count == 1
        else "expert parallelism off: the experts are split by TP, no all-to-all",
    )  # fmt: skip


def size_layout(spec: ModelSpec, layout: Layout, target: Target) -> LayoutOption:
    """One layout, per GPU: weights, vLLM's KV for one DP rank's sequences, both rules."""
    size_ = _bytes(target.dtype)
    routed = spec.routed_expert_params_b * 1e9 * size_ / GB / (layout.tp * layout.dp) / layout.pp
    dense = spec.dense_params_b * 1e9 * size_ / GB / layout.tp / layout.pp
    weights = routed + dense
    shape = kv_shape(
        spec, tp=layout.tp, pp=layout.pp, kv_dtype=target.kv_dtype, gpu=target.gpu,
        max_model_len=target.max_model_len, max_num_batched_tokens=target.max_num_batched_tokens,
        chunked_hybrid=target.chunked_hybrid,
    )  # fmt: skip
    seqs = math.ceil(target.max_num_seqs / layout.dp)
    kv = shape.bytes_per_sequence(target.max_model_len) * seqs / GB
    gpu_gb = GPUS_GB[target.gpu]
    subtotal = weights + kv + ACTIVATIONS_GB + CUDA_CONTEXT_GB
    margin = subtotal * SAFETY_MARGIN
    itemised = PerGpu(
        weights, kv, ACTIVATIONS_GB, CUDA_CONTEXT_GB, margin, subtotal + margin, gpu_gb
    )
    return LayoutOption(layout, weights, shape, seqs, kv, weights * OVERHEAD_FACTOR + kv, itemised)


def _ranked(options: Any) -> list[LayoutOption]:
    """Fitting layouts first, then the most free memory per GPU; ties: fewer PP stages, less DP."""
    return sorted(
        options,
        key=lambda o: (not o.fits, -round(o.itemised.free_gb, 6), o.layout.pp, o.layout.dp),
    )


def smallest_fitting(
    spec: ModelSpec, target: Target, gpus_per_node: int, limit_nodes: int = SEARCH_NODES
) -> Smallest | None:
    """The smallest deployable GPU count with a layout that fits, and its fitting layouts."""
    for count in candidate_gpu_counts(gpus_per_node, limit_nodes):
        options = _ranked(
            size_layout(spec, layout, target)
            for layout in deployable_layouts(spec, count, gpus_per_node)
        )
        fitting = tuple(option for option in options if option.fits)
        if fitting:
            return Smallest(count, nodes_text(count, gpus_per_node), fitting)
    return None


def recommended_settings(
    spec: ModelSpec, chosen: LayoutOption, target: Target
) -> tuple[Setting, ...]:
    """vLLM flags for the chosen layout: the user's target kept, each value with its source."""
    layout = chosen.layout
    where = f"layout {layout.label}"
    settings = [Setting("tensor_parallel_size", layout.tp, where)]
    if layout.dp > 1:
        settings.append(Setting("data_parallel_size", layout.dp, where + ": DP attention"))
    if layout.pp > 1:
        settings.append(Setting("pipeline_parallel_size", layout.pp, where))
    settings.append(
        Setting(
            "enable_expert_parallel",
            layout.ep > 1,
            where + (f": experts over {layout.ep} ranks" if layout.ep > 1 else ""),
        )
    )
    seqs_source = f"your target: {target.max_num_seqs} concurrent sequences"
    if layout.dp > 1:
        seqs_source += f" / DP {layout.dp}; vLLM's max_num_seqs is per DP rank"
    settings.append(Setting("max_num_seqs", chosen.seqs_per_rank, seqs_source))
    settings.append(Setting("max_model_len", target.max_model_len, "your target"))
    gmu = DESIGN_GMU_LARGE if spec.is_large else DESIGN_GMU_DEFAULT
    need = needed_gpu_memory_utilization(chosen)
    settings.append(
        Setting(
            "gpu_memory_utilization",
            gmu,
            (
                "design notes: 0.75-0.80 for large MoE, over 100B total"
                if spec.is_large
                else "design notes: 0.90, the dense default, for MoE under 100B"
            )
            + f"; your target needs {need:.2f} under {layout.label}",
        )
    )
    settings.append(
        Setting(
            "kv_cache_dtype",
            "fp8" if target.kv_dtype == "fp8" else "auto",
            "your --kv-dtype",
        )
    )
    settings.append(
        Setting(
            "enable_prefix_caching",
            target.kv_dtype != "fp8",
            "design notes: not compatible with an FP8 KV cache"
            if target.kv_dtype == "fp8"
            else "vLLM's default",
        )
    )
    return tuple(settings)


def needed_gpu_memory_utilization(option: LayoutOption) -> float:
    """The share of each GPU vLLM must be given to hold the target under ``option``:
    weights, activations, CUDA context and the target's KV cache (no safety margin)."""
    g = option.itemised
    return (g.weights_gb + g.kv_cache_gb + g.activations_gb + g.cuda_context_gb) / g.gpu_gb


def kv_room_gb(option: LayoutOption, gpu_memory_utilization: float) -> float:
    """What vLLM leaves for the KV cache per GPU: its share of the GPU less weights,
    activations and CUDA context (no safety margin: vLLM allocates up to the share)."""
    used = option.weights_gb + ACTIVATIONS_GB + CUDA_CONTEXT_GB
    return option.itemised.gpu_gb * gpu_memory_utilization - used


def _notes(
    spec: ModelSpec, chosen: LayoutOption, target: Target, kv_total_gb: float, gpus: int
) -> tuple[str, ...]:
    notes: list[str] = []
    layout = chosen.layout
    even = kv_total_gb / gpus
    if abs(chosen.kv_gb - even) > 0.01 * max(chosen.kv_gb, even):
        why = []
        if spec.uses_mla and layout.tp > 1:
            why.append(
                f"MLA's latent is whole on every TP rank: TP {layout.tp} does not divide it, only DP does"
            )
        if not spec.uses_mla and spec.kv_heads < layout.tp:
            why.append(
                f"{spec.kv_heads} KV heads under TP {layout.tp}: vLLM replicates each over {layout.tp // spec.kv_heads} ranks"
            )
        if any(cache.window for cache, _ in chosen.kv.caches):
            why.append(f"{spec.window_kind} layers keep at most their window per sequence")
        if spec.index_head_dim:
            why.append("the DSA indexer cache is whole on every TP rank")
        notes.append(
            f"per-GPU KV under {layout.label} is {chosen.kv_gb:,.1f} GB, not the published "
            f"{kv_total_gb:,.1f} GB / {gpus} GPUs = {even:,.1f} GB"
            + (f": {'; '.join(why)}" if why else "")
        )  # fmt: skip
    if spec.is_large and target.max_num_seqs > DESIGN_SEQS_LARGE[1]:
        low, high = DESIGN_SEQS_LARGE
        notes.append(
            f"design notes: start large MoE at max_num_seqs {low}-{high} (DeepSeek-scale on "
            f"8 x H100) and raise it while P95 holds; your target {target.max_num_seqs} is kept"
        )
    gmu = DESIGN_GMU_LARGE if spec.is_large else DESIGN_GMU_DEFAULT
    room = kv_room_gb(chosen, gmu)
    per_seq = chosen.kv.bytes_per_sequence(target.max_model_len) / GB
    fit = max(0, math.floor(room / per_seq)) if per_seq > 0 else 0
    if room <= 0:
        notes.append(
            f"at gpu_memory_utilization {gmu:g} weights, activations and CUDA context alone "
            f"exceed vLLM's share of the GPU under {layout.label}: no room for a KV cache"
        )
    elif fit < chosen.seqs_per_rank:
        notes.append(
            f"at gpu_memory_utilization {gmu:g} vLLM keeps {room:,.1f} GB per GPU for "
            f"KV: {fit} sequences of {target.max_model_len} tokens per DP rank, short of the "
            f"{chosen.seqs_per_rank} your target needs (it would preempt)"
        )
    return tuple(notes)


def interconnect_requirement(gpu: str, gpus: int) -> str:
    """What expert parallelism over ``gpus`` x ``gpu`` needs from the interconnect.

    Under EP every MoE layer of every forward pass dispatches tokens to the GPUs holding their
    experts and combines the results back (all-to-all): healthy < 5 ms per forward pass. On
    PCIe (~128 GB/s against NVLink's 900 GB/s on H100) it can eat the gain of EP.
    """
    if gpus <= 1:
        return "one GPU: no expert-parallel all-to-all"
    key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    need = (
        f"expert parallelism over {gpus} GPUs: every MoE layer's all-to-all must run over NVLink "
        "(verify with `nvidia-smi topo -m` before launch: NV# between every pair, not PIX/PHB/SYS; "
        "moe-watch exports moe_watch_engine_interconnect_info and flags EP without NVLink as drift)"
    )
    if key not in NVLINK_GPUS:
        return (
            f"{gpu} has no NVLink: the all-to-all would cross PCIe (~128 GB/s vs 900 GB/s), "
            "expect > 20 ms per forward pass; prefer tensor parallelism without EP, or NVLink "
            "GPUs. " + need
        )
    if gpus > NVSWITCH_DOMAIN_GPUS:
        return (
            f"{gpus} GPUs span more than one NVSwitch node ({NVSWITCH_DOMAIN_GPUS} GPUs): EP "
            "traffic between nodes crosses the network; use RDMA (InfiniBand/EFA) with a DeepEP "
            "or NIXL all2all backend. " + need
        )
    return need


def _bytes(dtype: str) -> float:
    key = dtype.lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]
