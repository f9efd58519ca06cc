"""Expert placement against vLLM's own: ``determine_expert_map`` of the installed vLLM decides,
for every rank, which experts it holds; moe-watch's one rule (``expert_ranks``, used by the
plugin and by ``rank_loads``) must name the same rank for every expert, including expert counts
that do not divide evenly over the EP ranks."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench.vllm_env import ensure_vllm_venv
from moe_watch.signals.expert_placement import STRATEGIES, expert_ranks
from moe_watch.signals.experts import rank_loads

pytestmark = pytest.mark.vllm

CASES = [(experts, ranks) for experts in (1, 3, 7, 8, 10, 60, 61, 256) for ranks in range(1, 10)]


def supported(experts: int, ranks: int, strategy: str) -> bool:
    """vLLM's round_robin needs at least one expert per rank (torch.arange fails otherwise)."""
    return strategy == "linear" or experts >= ranks


# Runs inside the vLLM venv: expert -> rank as vLLM's expert maps say (-1 = not on this rank).
VLLM_MAPS = """
import json, sys
try:  # vLLM 0.32
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
except ImportError:  # where it lived before
    from vllm.model_executor.layers.fused_moe.layer import determine_expert_map

result = {}
for experts, ranks, strategy in json.loads(sys.argv[1]):
    owner = [None] * experts
    for rank in range(ranks):
        expert_map = determine_expert_map(
            ep_size=ranks, ep_rank=rank, global_num_experts=experts,
            expert_placement_strategy=strategy,
        )[1]
        local = [0] * experts if expert_map is None else expert_map.tolist()
        for expert, index in enumerate(local):
            if index >= 0:
                assert owner[expert] is None, (experts, ranks, strategy, expert)
                owner[expert] = rank
    result[f"{experts},{ranks},{strategy}"] = owner
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def vllm_placement() -> dict[str, list[int | None]]:
    python = ensure_vllm_venv()
    cases = [(e, r, s) for e, r in CASES for s in STRATEGIES if supported(e, r, s)]
    run = subprocess.run(
        [str(python), "-c", VLLM_MAPS, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result: dict[str, list[int | None]] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_placement_matches_vllms_determine_expert_map(
    vllm_placement: dict[str, list[int | None]], strategy: str
) -> None:
    for experts, ranks in CASES:
        if not supported(experts, ranks, strategy):
            continue
        expected = vllm_placement[f"{experts},{ranks},{strategy}"]
        assert expert_ranks(experts, ranks, strategy) == expected, (experts, ranks)


def test_rank_loads_default_placement_is_vllms_on_uneven_splits(
    vllm_placement: dict[str, list[int | None]],
) -> None:
    for experts, ranks in CASES:
        owner = vllm_placement[f"{experts},{ranks},linear"]
        traffic = [float(expert + 1) for expert in range(experts)]  # every expert distinct
        per_rank = [0.0] * ranks
        for expert, rank in enumerate(owner):
            assert rank is not None
            per_rank[rank] += traffic[expert]
        mean = sum(per_rank) / ranks
        expected = {rank: load / mean for rank, load in enumerate(per_rank)}
        assert rank_loads(traffic, ranks) == pytest.approx(expected), (experts, ranks)
