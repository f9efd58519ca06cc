"""`moe-watch size`: a readable per-GPU table, the verdict and the recommended vLLM settings."""

from __future__ import annotations

from moe_watch.sizing.budget import (
    ACTIVATIONS_GB,
    CUDA_CONTEXT_GB,
    OVERHEAD_FACTOR,
    SAFETY_MARGIN,
    Plan,
)


def render_plan(plan: Plan) -> str:
    g = plan.itemised
    lines = [
        f"{plan.model}: {plan.dtype} weights, {plan.kv_dtype} KV cache, {plan.gpus} x {plan.gpu} (TP {plan.tp}, EP {plan.ep})",
        f"  target: max_model_len {plan.max_model_len} x max_num_seqs {plan.max_num_seqs}; KV {plan.kv_per_token_bytes / 1024:.1f} KiB/token",
        "",
        f"  rule 'weights x {OVERHEAD_FACTOR} + KV budget': {plan.weights_gb:,.1f} GB x {OVERHEAD_FACTOR} + {plan.kv_budget_gb:,.1f} GB"
        f" = {plan.rule_115_total_gb:,.1f} GB total, {plan.rule_115_per_gpu_gb:,.1f} GB per GPU of {g.gpu_gb:g} GB",
        "  rule 'itemised' (per GPU):",
        f"    weights        {g.weights_gb:9.1f} GB   (routed experts / EP {plan.ep} + dense part / TP {plan.tp})",
        f"    KV cache       {g.kv_cache_gb:9.1f} GB",
        f"    activations    {g.activations_gb:9.1f} GB   (2-4 GB; {ACTIVATIONS_GB:g} used)",
        f"    CUDA context   {g.cuda_context_gb:9.1f} GB   (1-2 GB; {CUDA_CONTEXT_GB:g} used)",
        f"    safety margin  {g.margin_gb:9.1f} GB   ({SAFETY_MARGIN:.0%})",
        f"    total          {g.total_gb:9.1f} GB   of {g.gpu_gb:g} GB, free {g.free_gb:.1f} GB",
        "",
    ]
    if plan.fits:
        lines.append(f"  verdict: FITS on {plan.gpus} x {plan.gpu}")
    else:
        lines.append(f"  verdict: DOES NOT FIT on {plan.gpus} x {plan.gpu}")
    if plan.smallest_fitting_gpus is None:
        lines.append(f"  no count of {plan.gpu} up to 64 fits this target")
    else:
        lines.append(
            f"  smallest {plan.gpu} count that fits: {plan.smallest_fitting_gpus}"
            f" (tensor_parallel_size {plan.smallest_fitting_tp}, expert parallel over all of them)"
        )
    lines.append(
        "  recommended vLLM settings: " + ", ".join(f"{k}={v}" for k, v in plan.recommended.items())
    )
    if plan.interconnect:
        lines.append(f"  interconnect: {plan.interconnect}")
    return "\n".join(lines)
