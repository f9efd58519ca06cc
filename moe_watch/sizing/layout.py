"""Parallel layouts vLLM can deploy: tensor (TP), data (DP), pipeline (PP) and expert (EP) parallel.

vLLM places ``TP x DP x PP`` GPUs. With ``--enable-expert-parallel`` the MoE layers' expert group
is ``TP x DP`` (vLLM has no separate EP size); without it the experts are split by TP across the
same ranks, so the per-GPU weights are the same. Under DP each rank runs its own scheduler:
``--max-num-seqs`` is per DP rank, and attention (and its KV cache) is data-parallel: each rank
holds only its own sequences. That is "DP attention", which MLA models need (their latent KV
cannot be split by TP).

A layout is deployable when (pure checks, one-line reasons):
- TP divides the attention heads, and the KV heads divide TP or TP divides them (vLLM replicates
  KV heads when TP exceeds them, never splits one);
- TP fits inside one node (tensor parallelism needs NVLink between its ranks);
- beyond one node the GPUs are whole nodes, each node holds whole TP groups, and PP stages are
  whole nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_watch.sizing.catalog import ModelSpec

GPUS_PER_NODE = 8  # one HGX/DGX node


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    pp: int = 1
    expert_parallel: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def ep(self) -> int:
        """vLLM's expert-parallel group: TP x DP ranks (1 with expert parallelism off)."""
        return self.tp * self.dp if self.expert_parallel and self.tp * self.dp > 1 else 1

    @property
    def label(self) -> str:
        """``TP 8 x PP 2, EP 8`` / ``DP 8 + EP 8`` / ``TP 2 x DP 4 + EP 8`` / ``TP 1``."""
        parts = [f"TP {self.tp}"] if self.tp > 1 or self.dp == 1 else []
        if self.dp > 1:
            parts.append(f"DP {self.dp}")
        if self.pp > 1:
            parts.append(f"PP {self.pp}")
        text = " x ".join(parts)
        if self.ep > 1:
            text += f" + EP {self.ep}" if self.dp > 1 else f", EP {self.ep}"
        return text


def nodes_text(gpus: int, gpus_per_node: int) -> str:
    """``16 = 2 nodes x 8``, ``8 = 1 node``, ``4 of a node of 8``."""
    if gpus < gpus_per_node:
        return f"{gpus} of a node of {gpus_per_node}"
    if gpus == gpus_per_node:
        return f"{gpus} = 1 node"
    return f"{gpus} = {gpus // gpus_per_node} nodes x {gpus_per_node}"


def tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why vLLM cannot shard ``spec``'s attention over ``tp`` ranks, or None."""
    if spec.attention_heads % tp:
        return f"TP {tp} does not divide {spec.name}'s {spec.attention_heads} attention heads"
    kv = spec.kv_heads
    if not spec.uses_mla and kv and (kv % tp if kv >= tp else tp % kv):
        return (
            f"TP {tp} and {spec.name}'s {kv} KV heads: vLLM needs one to divide the other "
            "(it replicates KV heads, never splits one)"
        )
    return None


def layout_problem(spec: ModelSpec, layout: Layout, gpus_per_node: int) -> str | None:
    """Why ``layout`` is not a deployable vLLM layout for ``spec``, or None."""
    if problem := tp_problem(spec, layout.tp):
        return problem
    if layout.tp > gpus_per_node:
        return (
            f"TP {layout.tp} spans nodes: tensor parallelism stays inside one node's "
            f"{gpus_per_node} GPUs (--gpus-per-node); add PP or DP across nodes"
        )
    if layout.pp > spec.layers:
        return f"PP {layout.pp} exceeds {spec.name}'s {spec.layers} layers"
    gpus = layout.gpus
    if gpus > gpus_per_node:
        if gpus % gpus_per_node:
            below, above = gpus // gpus_per_node, gpus // gpus_per_node + 1
            return (
                f"{gpus} GPUs is not a deployable layout: beyond one node of {gpus_per_node}, "
                f"use whole nodes ({below * gpus_per_node} or {above * gpus_per_node}; "
                "--gpus-per-node to change)"
            )
        if gpus_per_node % layout.tp:
            return f"TP {layout.tp} groups do not tile nodes of {gpus_per_node} GPUs"
        if (gpus // gpus_per_node) % layout.pp:
            return (
                f"PP {layout.pp} over {gpus // gpus_per_node} nodes: "
                "pipeline stages must be whole nodes"
            )
    return None


def deployable_layouts(
    spec: ModelSpec, gpus: int, gpus_per_node: int, *, expert_parallel: bool = True
) -> list[Layout]:
    """Every deployable layout of exactly ``gpus`` GPUs (PP only across whole nodes)."""
    found: list[Layout] = []
    nodes = gpus // gpus_per_node if gpus > gpus_per_node else 1
    for tp in range(1, min(gpus, gpus_per_node) + 1):
        if gpus % tp:
            continue
        for pp in range(1, nodes + 1):
            if (gpus // tp) % pp or (pp > 1 and nodes % pp):
                continue
            layout = Layout(tp=tp, dp=gpus // tp // pp, pp=pp, expert_parallel=expert_parallel)
            if layout_problem(spec, layout, gpus_per_node) is None:
                found.append(layout)
    return found


def candidate_gpu_counts(gpus_per_node: int, limit_nodes: int) -> list[int]:
    """GPU counts a deployment is built from: a divisor of one node, then whole nodes."""
    one_node = [n for n in range(1, gpus_per_node + 1) if gpus_per_node % n == 0]
    return one_node + [k * gpus_per_node for k in range(2, limit_nodes + 1)]


def resolve_layout(
    spec: ModelSpec,
    gpus: int | None,
    *,
    tp: int | None = None,
    dp: int | None = None,
    pp: int | None = None,
    ep: int | None = None,
    gpus_per_node: int = GPUS_PER_NODE,
) -> tuple[int, Layout | None]:
    """The GPU count and the layout the user fixed (None: to be picked among the deployable ones;
    ``ep=1`` alone keeps the pick but turns expert parallelism off).

    Raises ValueError (one line) for a layout vLLM cannot deploy or numbers that disagree.
    """
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    given = {name: v for name, v in (("tp", tp), ("dp", dp), ("pp", pp)) if v is not None}
    for name, value in given.items():
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if not given and ep in (None, 1):
        count = gpus or 1
        if problem := _count_problem(count, gpus_per_node):
            raise ValueError(problem)
        return count, None
    tp_, pp_ = tp or 1, pp or 1
    if dp is None:
        if gpus is None:
            dp_ = 1
        elif gpus % (tp_ * pp_):
            raise ValueError(f"--gpus {gpus} is not a multiple of TP {tp_} x PP {pp_}")
        else:
            dp_ = gpus // (tp_ * pp_)
    else:
        dp_ = dp
    layout = Layout(tp=tp_, dp=dp_, pp=pp_, expert_parallel=ep != 1)
    if gpus is not None and layout.gpus != gpus:
        raise ValueError(f"TP {tp_} x DP {dp_} x PP {pp_} = {layout.gpus} GPUs, not --gpus {gpus}")
    if ep is not None and ep not in (1, tp_ * dp_):
        raise ValueError(
            f"--ep {ep} is not a vLLM layout: the expert-parallel group is TP x DP = {tp_ * dp_} "
            "(or 1 with expert parallelism off)"
        )
    if problem := layout_problem(spec, layout, gpus_per_node):
        raise ValueError(problem)
    return layout.gpus, layout


def _count_problem(gpus: int, gpus_per_node: int) -> str | None:
    if gpus < 1:
        return f"--gpus must be at least 1, got {gpus}"
    if gpus > gpus_per_node and gpus % gpus_per_node:
        below, above = gpus // gpus_per_node, gpus // gpus_per_node + 1
        return (
            f"{gpus} GPUs is not a deployable layout: beyond one node of {gpus_per_node}, use "
            f"whole nodes ({below * gpus_per_node} or {above * gpus_per_node}; --gpus-per-node "
            "to change)"
        )
    return None
