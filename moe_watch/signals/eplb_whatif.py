"""What-if: vLLM's EPLB placement on the observed expert load, in pure Python.

The question an SRE asks after "this layer is skewed": would enabling EPLB (or more redundant
experts) fix it? This module answers with **the same algorithm vLLM runs**: the default EPLB
policy of vLLM 0.32 (``vllm/distributed/eplb/policy/default.py``, ``DefaultEplbPolicy``, itself
adapted from DeepSeek's EPLB), transcribed from numpy to the standard library so the agent needs
neither torch nor numpy:

- ``balanced_packing``: n weighted items into m packs of exactly n/m items each, heaviest first,
  each into the lightest pack that still has room (``np.argmin``: the lowest index on ties);
- ``replicate_experts``: each redundant slot goes to the logical expert with the highest load
  per replica (``np.argmax``: the lowest index on ties);
- ``rebalance_experts_hierarchical``: expert groups packed onto nodes, replicas made within each
  node, physical experts packed onto the node's GPUs; ``rebalance_experts`` uses it with the
  model's groups and the node count when the groups divide by the nodes, else with one group on
  one node (the "global" policy).

Where the transcription can differ from vLLM (docs/experts.md, "What-if"):
- vLLM sorts with ``np.argsort`` (not stable), and numpy orders exactly equal keys by the CPU's
  sort kernel (AVX-512, AVX2 or neither), so vLLM itself places them differently on different
  machines; here it is the lower index first, one of those orders. In the packing onto GPUs,
  equal per-replica loads (equal counts, or made by replication: 83,208 tokens over two replicas
  tie with 41,604 over one) take the same slots in any order: replica counts, per-rank loads and
  balancedness agree on every machine, only which of the tied experts sits where may differ. In
  the hierarchical policy, groups with exactly equal token sums can land on other nodes, and
  then the loads after can differ too.
- vLLM casts the load to float32 (``weight.float()``); so does this module (``array('f')``), and
  sums a group in float64 before rounding it to float32 once, where numpy sums in float32:
  identical while a group's tokens stay below 2**24 (16.7 M assignments per window).

Load model (vLLM's too): a logical expert with r replicas gives each replica 1/r of its tokens; a
rank's load is the sum over its physical experts. Balancedness is vLLM's: per layer
mean/max of the per-rank loads; over all layers sum(mean) / sum(max), as vLLM's EPLB log line
(``_compute_eplb_load_stats``) computes it. All functions are pure and typed.
"""

from __future__ import annotations

import heapq
import math
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from moe_watch.signals.expert_placement import expert_ranks

VLLM_VERSION = "0.32.0"  # the vLLM whose policy/default.py this transcribes (and the tests check)
ALGORITHM = "vllm.distributed.eplb.policy.default.DefaultEplbPolicy"


def _f32(values: Sequence[float]) -> list[float]:
    """The values as vLLM's ``weight.float()`` sees them (rounded to float32)."""
    return list(array("f", values))


def balanced_packing(weight: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """One row of vLLM's ``balanced_packing``: (pack index, rank in pack) of each item."""
    n = len(weight)
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items do not divide into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack_index = [-1] * n
    rank_in_pack = [-1] * n
    # The lightest pack with room, lowest index on ties: np.argmin over the packs' weights,
    # full packs masked out with inf. A heap of (weight, index) pops exactly that pack.
    heap = [(0.0, pack) for pack in range(num_packs)]
    items = [0] * num_packs
    pop, push = heapq.heappop, heapq.heappush
    # Heaviest first; equal weights keep index order (a stable sort, reverse=True included).
    for item in sorted(range(n), key=weight.__getitem__, reverse=True):
        load, pack = pop(heap)
        count = items[pack]
        pack_index[item] = pack
        rank_in_pack[item] = count
        items[pack] = count = count + 1
        if count < per_pack:
            push(heap, (load + weight[item], pack))
    return pack_index, rank_in_pack


def replicate_experts(weight: Sequence[float], num_physical: int) -> tuple[list[int], list[int]]:
    """One row of vLLM's ``replicate_experts``: (logical expert of each physical expert,
    replica count of each logical expert). Physical experts 0..E-1 are the logical ones."""
    num_logical = len(weight)
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical experts cannot hold {num_logical} logical ones")
    phy2log = list(range(num_logical))
    count = [1] * num_logical
    # np.argmax(weight / logcnt): the highest load per replica, lowest index on ties.
    heap = [(-w, e) for e, w in enumerate(weight)]
    heapq.heapify(heap)
    for _ in range(num_physical - num_logical):
        _, expert = heapq.heappop(heap)
        phy2log.append(expert)
        count[expert] += 1
        heapq.heappush(heap, (-(weight[expert] / count[expert]), expert))
    return phy2log, count


def rebalance_layer(
    weight: Sequence[float],
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> list[int]:
    """One layer of vLLM's ``rebalance_experts_hierarchical``: the logical expert of each
    physical expert (``phy2log``); physical expert p lives on GPU ``p // (num_physical /
    num_gpus)``. ``weight`` must already be float32-rounded (``rebalance_experts`` does it)."""
    num_logical = len(weight)
    if num_groups < 1 or num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not divide into {num_groups} groups")
    if num_nodes < 1 or num_groups % num_nodes:
        raise ValueError(f"{num_groups} groups do not divide over {num_nodes} nodes")
    if num_gpus < 1 or num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not divide over {num_nodes} nodes")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical experts do not divide over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    # Step 1: pack the groups onto nodes (numpy sums each group in float32, then packs).
    group_tokens = _f32(
        [math.fsum(weight[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    )
    group_pack, group_rank = balanced_packing(group_tokens, num_nodes)
    # mlog2log: node-local order (node after node) -> logical expert.
    mlog2log = [0] * num_logical
    for group in range(num_groups):
        first = (group_pack[group] * groups_per_node + group_rank[group]) * group_size
        for i in range(group_size):
            mlog2log[first + i] = group * group_size + i
    # Steps 2 and 3, node by node: replicas within the node, physical experts onto its GPUs.
    per_node = num_logical // num_nodes
    phy_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy2log = [0] * num_physical
    for node in range(num_nodes):
        base = node * per_node
        tokens = [weight[mlog2log[base + m]] for m in range(per_node)]
        phy2mlog, count = replicate_experts(tokens, phy_per_node)
        per_phy = [tokens[m] / count[m] for m in phy2mlog]
        pack, rank = balanced_packing(per_phy, gpus_per_node)
        for phy, mlog in enumerate(phy2mlog):
            slot = node * phy_per_node + pack[phy] * per_gpu + rank[phy]
            phy2log[slot] = mlog2log[base + mlog]
    return phy2log


def policy(num_groups: int, num_nodes: int, num_gpus: int) -> tuple[int, int]:
    """The (groups, nodes) vLLM's ``rebalance_experts`` passes on: hierarchical when the groups
    divide by the nodes, else global (1, 1). Like vLLM's EplbState, a GPU count that does not
    divide by the nodes means one node."""
    if num_gpus % num_nodes:
        num_nodes = 1
    if num_groups % num_nodes == 0:
        return num_groups, num_nodes
    return 1, 1


def rebalance_experts(
    weight: Sequence[Sequence[float]],
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> list[list[int]]:
    """vLLM's ``DefaultEplbPolicy.rebalance_experts`` without ``old_global_expert_indices``:
    ``phy2log[layer][physical expert]`` for ``weight[layer][logical expert]``."""
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    return [
        rebalance_layer(_f32(row), num_replicas, num_groups, num_nodes, num_ranks) for row in weight
    ]


def physical_rank_loads(weight: Sequence[float], phy2log: Sequence[int], ranks: int) -> list[float]:
    """Tokens per rank when each logical expert's tokens split evenly over its replicas."""
    replicas = [0] * len(weight)
    for log in phy2log:
        replicas[log] += 1
    per_gpu = len(phy2log) // ranks
    loads = [0.0] * ranks
    for phy, log in enumerate(phy2log):
        loads[phy // per_gpu] += weight[log] / replicas[log]
    return loads


def static_rank_loads(weight: Sequence[float], owner: Sequence[int], ranks: int) -> list[float]:
    """Tokens per rank without EPLB: each expert on the rank ``owner`` names."""
    loads = [0.0] * ranks
    for expert, rank in enumerate(owner):
        loads[rank] += weight[expert]
    return loads


def layer_balancedness(loads: Sequence[float]) -> float | None:
    """mean/max of one layer's per-rank loads; None without traffic."""
    peak = max(loads, default=0.0)
    return sum(loads) / len(loads) / peak if peak > 0 else None


def overall_balancedness(per_layer: Sequence[Sequence[float]]) -> float | None:
    """vLLM's EPLB log line: sum over layers of the mean rank load / sum of the max."""
    peaks = math.fsum(max(loads, default=0.0) for loads in per_layer)
    if peaks <= 0:
        return None
    return math.fsum(math.fsum(loads) / len(loads) for loads in per_layer if loads) / peaks


@dataclass(frozen=True, slots=True)
class LayerPlacement:
    """One layer under one what-if: where each physical expert goes and what each rank carries."""

    layer: int
    phy2log: tuple[int, ...]  # physical expert p (on rank p // slots per rank) -> logical expert
    rank_loads: tuple[float, ...]  # tokens per rank after
    balancedness: float | None


@dataclass(frozen=True, slots=True)
class WhatIfCase:
    redundant_experts: int
    balancedness: float  # over all layers (vLLM's definition)
    layers: tuple[LayerPlacement, ...] = ()  # kept for the configured cases only


@dataclass(frozen=True, slots=True)
class EplbWhatIf:
    """Balancedness today (static placement) and under vLLM's EPLB for a few redundancies."""

    ep_size: int
    num_experts: int
    num_groups: int  # as used: (1, 1) is vLLM's global policy
    num_nodes: int
    target: float
    layers: tuple[int, ...]
    balancedness_today: float
    layer_balancedness_today: tuple[float | None, ...]
    rank_loads_today: tuple[tuple[float, ...], ...]  # [layer][rank] tokens
    cases: tuple[WhatIfCase, ...]  # the configured redundancies that vLLM accepts for this shape
    skipped: tuple[tuple[int, str], ...]  # configured redundancies vLLM refuses, with why
    searched: tuple[int, ...]  # redundancies tried, in order, for redundant_needed
    redundant_needed: int | None  # the smallest in `searched` reaching `target`; None: none does
    needed_balancedness: float | None  # what that count reaches (or the best seen when None)

    @property
    def hierarchical(self) -> bool:
        return self.num_groups > 1 or self.num_nodes > 1

    def case(self, redundant: int) -> WhatIfCase | None:
        return next((c for c in self.cases if c.redundant_experts == redundant), None)


class WhatIfCancelled(Exception):
    """The ``cancel`` event was set: the computation was abandoned (the agent is stopping)."""


def default_redundancies(ep_size: int) -> tuple[int, ...]:
    """The what-ifs reported by default: no redundant expert, one per rank, two per rank."""
    return (0, ep_size, 2 * ep_size)


def valid_redundancy(num_experts: int, ep_size: int, redundant: int) -> str | None:
    """Why vLLM would refuse ``redundant`` extra experts for this shape; None when it accepts."""
    if redundant < 0:
        return "negative"
    if (num_experts + redundant) % ep_size:
        return f"{num_experts} + {redundant} physical experts do not divide over {ep_size} EP ranks"
    return None


def search_range(num_experts: int, ep_size: int, limit: int | None = None) -> list[int]:
    """Redundancies to try, smallest first: every count vLLM accepts (a multiple of the EP size
    once the logical experts are padded to one) up to ``limit`` (default: the expert count)."""
    top = num_experts if limit is None else limit
    first = -num_experts % ep_size
    return list(range(first, top + 1, ep_size))


def eplb_whatif(
    window_counts: Sequence[Sequence[float]],
    layers: Sequence[int],
    ep_size: int,
    *,
    redundant: Sequence[int] | None = None,
    target: float = 0.9,
    num_groups: int = 1,
    num_nodes: int = 1,
    placement: Sequence[int] = (),
    search_limit: int | None = None,
    cancel: threading.Event | None = None,
) -> EplbWhatIf | None:
    """The what-if for one engine's window of per-(layer, logical expert) assignments.

    ``redundant``: the counts to report in full (placement per layer); default 0, EP, 2 x EP.
    ``placement``: each expert's rank today (empty: vLLM's linear placement). Layers whose
    counts are not finite or negative are left out, like the skew signals. None when there is
    no expert parallelism or no traffic. ``cancel``: checked before every layer of every
    placement computed (milliseconds apart); once set, WhatIfCancelled is raised.
    """
    rows = [
        (layer, list(row))
        for layer, row in zip(layers, window_counts, strict=True)
        if all(math.isfinite(c) and c >= 0 for c in row)
    ]
    if ep_size < 2 or not rows:
        return None
    num_experts = len(rows[0][1])
    if placement and len(placement) != num_experts:
        raise ValueError(f"placement names {len(placement)} experts, counts have {num_experts}")
    owner = list(placement) or expert_ranks(num_experts, ep_size)
    today = [static_rank_loads(row, owner, ep_size) for _, row in rows]
    today_overall = overall_balancedness(today)
    if today_overall is None:
        return None  # no traffic in the window
    groups, nodes = policy(num_groups, num_nodes, ep_size)
    if num_experts % groups:
        groups, nodes = 1, 1  # vLLM would assert; the global policy is what a human can compare
    weights = [_f32(row) for _, row in rows]
    if redundant is None:
        redundant = default_redundancies(ep_size)

    def run(count: int, keep: bool) -> WhatIfCase:
        placed: list[LayerPlacement] = []
        loads: list[list[float]] = []
        for (layer, row), weight in zip(rows, weights, strict=True):
            if cancel is not None and cancel.is_set():
                raise WhatIfCancelled
            phy2log = rebalance_layer(weight, num_experts + count, groups, nodes, ep_size)
            after = physical_rank_loads(row, phy2log, ep_size)
            loads.append(after)
            if keep:
                placed.append(
                    LayerPlacement(layer, tuple(phy2log), tuple(after), layer_balancedness(after))
                )
        overall = overall_balancedness(loads)
        assert overall is not None  # the same traffic as today's, which has some
        return WhatIfCase(count, overall, tuple(placed))

    cases: list[WhatIfCase] = []
    skipped: list[tuple[int, str]] = []
    for count in sorted(set(redundant)):
        reason = valid_redundancy(num_experts, ep_size, count)
        if reason is None:
            cases.append(run(count, keep=True))
        else:
            skipped.append((count, reason))
    known = {case.redundant_experts: case.balancedness for case in cases}
    searched: list[int] = []
    needed: int | None = None
    best: float | None = None
    for count in search_range(num_experts, ep_size, search_limit):
        searched.append(count)
        value = known[count] if count in known else run(count, keep=False).balancedness
        best = value if best is None else max(best, value)
        if value >= target:
            needed, best = count, value
            break
    return EplbWhatIf(
        ep_size=ep_size,
        num_experts=num_experts,
        num_groups=groups,
        num_nodes=nodes,
        target=target,
        layers=tuple(layer for layer, _ in rows),
        balancedness_today=today_overall,
        layer_balancedness_today=tuple(layer_balancedness(loads) for loads in today),
        rank_loads_today=tuple(tuple(loads) for loads in today),
        cases=tuple(cases),
        skipped=tuple(skipped),
        searched=tuple(searched),
        redundant_needed=needed,
        needed_balancedness=best,
    )
