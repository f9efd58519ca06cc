"""What vLLM's EPLB placement is on every machine, and a check of a placement against it.

vLLM 0.32's ``DefaultEplbPolicy`` orders items by ``np.argsort(-weight)`` in two steps:

- step 1, expert groups onto nodes (hierarchical policy; sorted only when a node holds more
  than one group);
- step 3, a node's physical experts onto its GPUs (sorted only when a GPU holds more than one).

``np.argsort`` is not stable, and its order among exactly equal keys depends on the CPU: numpy
2.x sorts 64-bit keys with x86-simd-sort when the CPU has AVX-512, else with its own introsort,
and the two order equal keys differently. Everything else in the policy is machine-independent:
``np.argmax`` (replication) and ``np.argmin`` (lightest pack) return the first occurrence, as
numpy documents, and the loads are float32 / float64 arithmetic.

Step 3: equal keys are taken one after another and, whatever their order, take the same
sequence of (GPU, slot) positions, because the packing only looks at their (equal) loads. A
different order therefore only permutes them over those positions. Determined on every machine:
the replica count of every logical expert, the per-replica load in every physical slot (so the
rank loads, the balancedness and each rank's multiset of per-replica loads), and the logical
expert of every slot whose per-replica load no other logical expert of its node shares. Two
replicas of one expert always share a load; that tie changes nothing.

Step 1: a different order among groups with equal float32 token sums can put other groups on a
node (or change the order of a node's groups), and steps 2 and 3 then work on other experts.
Determined: the token total of every node. A different argsort order among tied groups is the
same as running the policy with those groups relabelled, so ``placements`` enumerates the
relabellings, and ``match_layer`` accepts a placement equal to one of them up to step-3 ties.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

from moe_watch.signals import eplb_whatif

# Step-1 tie orders enumerated at most (8 tied groups would be 40,320 runs of the policy).
TIE_ORDER_LIMIT = 720


def f32(row: Sequence[float]) -> list[float]:
    """The loads as vLLM's policy sees them (``weight.float()``)."""
    return list(array("f", row))


def effective_policy(num_groups: int, num_nodes: int) -> tuple[int, int]:
    """(groups, nodes) as ``rebalance_experts`` uses them: global when groups % nodes."""
    return (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)


def replica_counts(phy2log: Sequence[int], num_logical: int) -> list[int]:
    counts = [0] * num_logical
    for log in phy2log:
        counts[log] += 1
    return counts


def slot_loads(weight: Sequence[float], phy2log: Sequence[int]) -> list[float]:
    """The per-replica load of every physical slot: its expert's tokens / its replica count."""
    counts = replica_counts(phy2log, len(weight))
    return [weight[log] / counts[log] for log in phy2log]


def group_ties(weight: Sequence[float], num_groups: int, num_nodes: int) -> list[tuple[int, ...]]:
    """Step 1's ties: groups whose float32 token sums are equal, when the packing sorts them."""
    if num_groups // num_nodes < 2:
        return []  # one group per node: vLLM's balanced_packing returns the identity, no sort
    size = len(weight) // num_groups
    sums = f32([math.fsum(weight[g * size : (g + 1) * size]) for g in range(num_groups)])
    classes: dict[float, list[int]] = defaultdict(list)
    for group, total in enumerate(sums):
        classes[total].append(group)
    return [tuple(groups) for groups in classes.values() if len(groups) > 1]


def slot_ties(
    weight: Sequence[float], phy2log: Sequence[int], num_nodes: int, num_gpus: int
) -> list[tuple[int, tuple[int, ...]]]:
    """Step 3's ties that matter: (node, logical experts) where different logical experts of
    one node have the same per-replica load, when the packing sorts (more than one slot per
    GPU)."""
    if len(phy2log) // num_gpus < 2:
        return []  # one physical expert per GPU: the identity, no sort
    per_node = len(phy2log) // num_nodes
    loads = slot_loads(weight, phy2log)
    classes: dict[tuple[int, float], set[int]] = defaultdict(set)
    for slot, log in enumerate(phy2log):
        classes[slot // per_node, loads[slot]].add(log)
    return [
        (node, tuple(sorted(experts)))
        for (node, _), experts in sorted(classes.items())
        if len(experts) > 1
    ]


def difference(
    weight: Sequence[float], ours: Sequence[int], theirs: Sequence[int], num_nodes: int
) -> str | None:
    """Where ``theirs`` is not ``ours`` up to step-3 ties (None: it is); ``weight`` float32."""
    if len(ours) != len(theirs):
        return f"{len(theirs)} physical experts, expected {len(ours)}"
    num_logical = len(weight)
    if sorted(set(theirs)) != list(range(num_logical)):
        return "a logical expert is missing or an expert id is out of range"
    mine, other = replica_counts(ours, num_logical), replica_counts(theirs, num_logical)
    for expert, (want, have) in enumerate(zip(mine, other, strict=True)):
        if want != have:
            return f"expert {expert}: {have} replicas, expected {want}"
    expected, got = slot_loads(weight, ours), slot_loads(weight, theirs)
    for slot, (a, b) in enumerate(zip(expected, got, strict=True)):
        if a != b:
            return f"slot {slot}: per-replica load {b!r} (expert {theirs[slot]}), expected {a!r} (expert {ours[slot]})"
    # Equal loads in every slot: each node's slots of one load must hold the same experts
    # (a permutation among them is what a different order of equal keys gives).
    per_node = len(ours) // num_nodes
    classes_ours: Counter[tuple[int, float, int]] = Counter(
        (slot // per_node, expected[slot], log) for slot, log in enumerate(ours)
    )
    classes_theirs: Counter[tuple[int, float, int]] = Counter(
        (slot // per_node, got[slot], log) for slot, log in enumerate(theirs)
    )
    if classes_ours != classes_theirs:
        extra = sorted((classes_theirs - classes_ours).elements())
        return f"(node, per-replica load, expert) {extra[:3]} not in the expected placement"
    return None


def tie_orders(ties: Sequence[tuple[int, ...]], num_groups: int) -> Iterator[list[int]]:
    """Every relabelling of the groups that permutes each tie class: ``order[new] = old``."""
    count = math.prod(math.factorial(len(tie)) for tie in ties)
    if count > TIE_ORDER_LIMIT:
        raise ValueError(f"{count} orders of tied groups: more than {TIE_ORDER_LIMIT} to try")
    for permuted in itertools.product(*(itertools.permutations(tie) for tie in ties)):
        order = list(range(num_groups))
        for tie, image in zip(ties, permuted, strict=True):
            for new, old in zip(tie, image, strict=True):
                order[new] = old
        yield order


def placements(
    row: Sequence[float], num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[list[int]]:
    """Every placement vLLM's policy can return for this layer up to step-3 ties: the
    transcription's (``eplb_whatif.rebalance_layer``, looked up at call time) under every order
    of the step-1 tied groups; the first is the transcription's own (lower index first)."""
    weight = f32(row)
    groups, nodes = effective_policy(num_groups, num_nodes)
    size = len(weight) // groups
    found: list[list[int]] = []
    for order in tie_orders(group_ties(weight, groups, nodes), groups):
        relabelled = [weight[order[g] * size + i] for g in range(groups) for i in range(size)]
        phy2log = eplb_whatif.rebalance_layer(relabelled, num_physical, groups, nodes, num_gpus)
        found.append([order[log // size] * size + log % size for log in phy2log])
    return found


def match_layer(
    row: Sequence[float],
    theirs: Sequence[int],
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[list[int] | None, str]:
    """(the transcription's placement that ``theirs`` equals up to step-3 ties, "") or
    (None, how ``theirs`` differs from the transcription's own placement)."""
    weight = f32(row)
    _, nodes = effective_policy(num_groups, num_nodes)
    candidates = placements(row, num_physical, num_groups, num_nodes, num_gpus)
    for candidate in candidates:
        if difference(weight, candidate, theirs, nodes) is None:
            return candidate, ""
    return None, str(difference(weight, candidates[0], theirs, nodes))
