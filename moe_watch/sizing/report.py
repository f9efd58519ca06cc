"""`moe-watch size`: the per-GPU table under a named layout, the verdict, the layouts compared
and the recommended vLLM settings with their sources."""

from __future__ import annotations

from moe_watch.sizing.budget import (
    ACTIVATIONS_GB,
    CUDA_CONTEXT_GB,
    OVERHEAD_FACTOR,
    SAFETY_MARGIN,
    LayoutOption,
    Plan,
)


def render_plan(plan: Plan) -> str:
    chosen, g = plan.chosen, plan.itemised
    under = f"under {chosen.label}"
    kv = chosen.kv
    lines = [
        f"{plan.model}: {plan.attention} attention, {plan.dtype} weights, {plan.kv_dtype} KV cache, "
        f"{plan.gpus} x {plan.gpu} ({_nodes(plan.gpus, plan.gpus_per_node)})",
        f"  target (yours): {plan.max_num_seqs} concurrent sequences x max_model_len {plan.max_model_len}",
        f"  layout: {chosen.label} ({plan.layout_source})",
        "",
        f"  KV cache per token, one copy: {plan.kv_bytes_per_token:,} B; budget {plan.kv_total_gb:,.1f} GB for the target",
        f"  KV cache per GPU {under}: {kv.bytes_per_token:,} B per token over {kv.layers} layers, "
        f"{chosen.seqs_per_rank} sequences per GPU = {chosen.kv_gb:,.1f} GB",
    ]
    for cache, count in kv.caches:
        held = f", {cache.window:,} tokens per sequence" if cache.window else ""
        lines.append(f"    {count} layers x {cache.what}: {cache.bytes_per_token:,} B/token{held}")
    lines += [
        f"  rule 'weights x {OVERHEAD_FACTOR} + KV' per GPU {under}: {chosen.weights_gb:,.1f} GB x {OVERHEAD_FACTOR}"
        f" + {chosen.kv_gb:,.1f} GB = {chosen.rule_115_gb:,.1f} GB of {g.gpu_gb:g} GB",
    ]
    if plan.gpus > 1:
        lines.append(
            f"    (published form: {plan.weights_gb:,.1f} GB x {OVERHEAD_FACTOR} + {plan.kv_total_gb:,.1f} GB"
            f" = {plan.rule_115_total_gb:,.1f} GB for all {plan.gpus} GPUs, {plan.rule_115_total_gb / plan.gpus:,.1f} GB each)"
        )
    lines += [
        f"  rule 'itemised' per GPU {under}:",
        f"    weights        {g.weights_gb:9.1f} GB   (routed experts / {chosen.layout.tp * chosen.layout.dp} TP x DP ranks"
        f" + dense part / TP {chosen.layout.tp}{f', / PP {chosen.layout.pp}' if chosen.layout.pp > 1 else ''})",
        f"    KV cache       {g.kv_cache_gb:9.1f} GB",
        f"    activations    {g.activations_gb:9.1f} GB   (2-4 GB; {ACTIVATIONS_GB:g} used)",
        f"    CUDA context   {g.cuda_context_gb:9.1f} GB   (1-2 GB; {CUDA_CONTEXT_GB:g} used)",
        f"    safety margin  {g.margin_gb:9.1f} GB   ({SAFETY_MARGIN:.0%})",
        f"    total          {g.total_gb:9.1f} GB   of {g.gpu_gb:g} GB, free {g.free_gb:.1f} GB",
        "",
        f"  verdict: {'FITS' if plan.fits else 'DOES NOT FIT'} on {plan.gpus} x {plan.gpu} {under}",
    ]
    lines += [f"  note: {note}" for note in plan.notes]
    if len(plan.options) > 1 or plan.layout_source == "given":
        lines.append(f"  layouts of {plan.gpus} x {plan.gpu}, per GPU:")
        lines.append(_row("layout", "KV GB", "weights GB", "total GB", "free GB", "fits"))
        lines += [_option_row(option) for option in plan.options]
    if plan.smallest is None:
        lines.append(f"  no deployable count of {plan.gpu} up to 8 nodes fits this target")
    else:
        best = plan.smallest.fitting
        names = ", or ".join(option.label for option in best[:3])
        more = f" (+{len(best) - 3} more)" if len(best) > 3 else ""
        lines.append(
            f"  smallest {plan.gpu} count that fits: {plan.smallest.nodes}: {names}{more}"
            f"; KV per GPU {', '.join(f'{o.kv_gb:,.1f}' for o in best[:3])} GB"
        )
    lines.append(f"  recommended vLLM settings for {chosen.label}:")
    width = max(len(f"{s.name}={s.value}") for s in plan.recommended)
    lines += [f"    {f'{s.name}={s.value}':<{width}}  ({s.source})" for s in plan.recommended]
    if plan.interconnect:
        lines.append(f"  interconnect: {plan.interconnect}")
    return "\n".join(lines)


def _nodes(gpus: int, gpus_per_node: int) -> str:
    if gpus <= gpus_per_node:
        return f"one node of {gpus_per_node}"
    return f"{gpus // gpus_per_node} nodes of {gpus_per_node}"


def _row(*cells: str) -> str:
    label, *rest = cells
    return f"    {label:<24}" + "".join(f"{cell:>11}" for cell in rest)


def _option_row(option: LayoutOption) -> str:
    g = option.itemised
    return _row(
        option.label,
        f"{option.kv_gb:,.1f}",
        f"{option.weights_gb:,.1f}",
        f"{g.total_gb:,.1f}",
        f"{g.free_gb:,.1f}",
        "yes" if option.fits else "no",
    )
