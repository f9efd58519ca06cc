"""Budget maths: what an MoE deployment needs per GPU, by two named rules (pure functions).

- ``x1.15 + KV``: total_vram = weights x 1.15 + kv_cache_budget (1.15 covers activations,
  framework overhead and routing buffers), one operator guide's planning formula.
- itemised: weights + KV cache + activations (3 GB, of the 2-4 GB range) + CUDA context (1.5 GB
  per GPU, of 1-2) + a 15 % safety margin (of 10-20 %).
The verdict uses the x1.15 rule (the documented planning formula); the itemised rule is shown
beside it. Per GPU: routed experts are divided across EP ranks, the dense part (attention,
embeddings, shared experts) is split by TP, or replicated where TP is 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_watch.sizing.catalog import DTYPE_BYTES, ModelSpec

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


def gpu_memory_gb(gpu: str) -> float:
    key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    if key not in GPUS_GB:
        raise ValueError(f"unknown GPU {gpu!r}: use one of {', '.join(GPUS_GB)}")
    return GPUS_GB[key]


def weights_bytes(spec: ModelSpec, dtype: str) -> float:
    return spec.total_params_b * 1e9 * _bytes(dtype)


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str = "bf16") -> float:
    """K and V for every layer (GQA), or the compressed latent + rope key per layer (MLA)."""
    if spec.uses_mla:
        per_layer = spec.kv_lora_rank + spec.qk_rope_head_dim
    else:
        per_layer = 2 * spec.kv_heads * spec.head_dim
    return spec.layers * per_layer * _bytes(kv_dtype)


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
class Plan:
    model: str
    dtype: str
    kv_dtype: str
    gpu: str
    gpus: int
    tp: int
    ep: int
    max_model_len: int
    max_num_seqs: int
    weights_gb: float
    kv_per_token_bytes: float
    kv_budget_gb: float
    rule_115_total_gb: float
    rule_115_per_gpu_gb: float
    itemised: PerGpu
    fits: bool
    smallest_fitting_gpus: int | None
    smallest_fitting_tp: int | None
    recommended: dict[str, object]
    interconnect: str = ""  # what expert parallelism needs from the GPUs' links (issue #19)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["itemised"]["free_gb"] = self.itemised.free_gb
        return data


def size(
    spec: ModelSpec,
    *,
    dtype: str | None = None,
    kv_dtype: str = "bf16",
    gpu: str = "h100-80",
    gpus: int = 1,
    max_model_len: int = 8192,
    max_num_seqs: int = 8,
) -> Plan:
    dtype = dtype or spec.default_dtype
    gpu_gb = gpu_memory_gb(gpu)
    tp = largest_valid_tp(spec, gpus)
    weights = weights_bytes(spec, dtype) / GB
    kv_token = kv_bytes_per_token(spec, kv_dtype)
    kv_budget = kv_token * max_model_len * max_num_seqs / GB
    rule_total = weights * OVERHEAD_FACTOR + kv_budget
    itemised = per_gpu(spec, dtype, gpus, tp, kv_budget, gpu_gb)
    fits = rule_total / gpus <= gpu_gb and itemised.fits
    smallest = smallest_fitting(spec, dtype, kv_budget, gpu_gb)
    return Plan(
        model=spec.name, dtype=dtype, kv_dtype=kv_dtype, gpu=gpu, gpus=gpus, tp=tp, ep=gpus,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, weights_gb=weights,
        kv_per_token_bytes=kv_token, kv_budget_gb=kv_budget, rule_115_total_gb=rule_total,
        rule_115_per_gpu_gb=rule_total / gpus, itemised=itemised, fits=fits,
        smallest_fitting_gpus=smallest,
        smallest_fitting_tp=largest_valid_tp(spec, smallest) if smallest else None,
        recommended=recommended_settings(spec, gpus, max_model_len, max_num_seqs, kv_dtype),
        interconnect=interconnect_requirement(gpu, gpus),
    )  # fmt: skip


def per_gpu(
    spec: ModelSpec, dtype: str, gpus: int, tp: int, kv_budget_gb: float, gpu_gb: float
) -> PerGpu:
    routed = spec.routed_expert_params_b * 1e9 * _bytes(dtype) / GB / gpus  # EP over all GPUs
    dense = spec.dense_params_b * 1e9 * _bytes(dtype) / GB / tp  # split by TP, else replicated
    weights = routed + dense
    kv = kv_budget_gb / gpus
    subtotal = weights + kv + ACTIVATIONS_GB + CUDA_CONTEXT_GB
    margin = subtotal * SAFETY_MARGIN
    return PerGpu(weights, kv, ACTIVATIONS_GB, CUDA_CONTEXT_GB, margin, subtotal + margin, gpu_gb)


def largest_valid_tp(spec: ModelSpec, gpus: int) -> int:
    """TP must divide the attention heads (and the KV heads for GQA); powers of two in practice."""
    tp = 1
    while tp * 2 <= gpus and spec.attention_heads % (tp * 2) == 0:
        tp *= 2
    return tp


def smallest_fitting(
    spec: ModelSpec, dtype: str, kv_budget_gb: float, gpu_gb: float, limit: int = 64
) -> int | None:
    weights = weights_bytes(spec, dtype) / GB
    for gpus in range(1, limit + 1):
        tp = largest_valid_tp(spec, gpus)
        if (weights * OVERHEAD_FACTOR + kv_budget_gb) / gpus <= gpu_gb and per_gpu(
            spec, dtype, gpus, tp, kv_budget_gb, gpu_gb
        ).fits:
            return gpus
    return None


def recommended_settings(
    spec: ModelSpec, gpus: int, max_model_len: int, max_num_seqs: int, kv_dtype: str
) -> dict[str, object]:
    """design.md's vLLM knobs for MoE."""
    return {
        "gpu_memory_utilization": 0.80 if spec.is_large else 0.90,
        "max_num_seqs": min(max_num_seqs, 8) if spec.is_large else max_num_seqs,
        "max_model_len": max_model_len,
        "enable_expert_parallel": gpus > 1,
        "tensor_parallel_size": largest_valid_tp(spec, gpus),
        "enable_prefix_caching": kv_dtype not in ("fp8",),  # not compatible with an FP8 KV cache
    }


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
