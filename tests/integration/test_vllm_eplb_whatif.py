"""The what-if's EPLB against vLLM's own: ``DefaultEplbPolicy.rebalance_experts`` of the
installed vLLM (0.32, torch and numpy) and moe-watch's pure-Python transcription must place the
same loads the same way, on real MoE shapes (DeepSeek-V3 58 x 256 on EP 32 and 64, Qwen3, Mixtral),
hierarchical and global, with random, skewed, float and tied loads.

Agreement is checked twice: the per-rank loads (what the balancedness is made of) must be equal
for every layer of every case; the placement (physical -> logical map) must be identical for every
layer whose loads have no exact ties (vLLM's ``np.argsort`` is not stable: among equal weights
its order is numpy's, ours the lower index first, docs/experts.md)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.vllm_env import ensure_vllm_venv
from moe_watch.signals.eplb_whatif import (
    overall_balancedness,
    physical_rank_loads,
    rebalance_experts,
)

pytestmark = pytest.mark.vllm

# (name, layers, experts, EP ranks, redundant, groups, nodes, load kind)
SHAPES: list[tuple[str, int, int, int, int, int, int, str]] = [
    ("dsv3-ep32-r0-global", 58, 256, 32, 0, 1, 1, "random"),
    ("dsv3-ep32-r32-global", 58, 256, 32, 32, 1, 1, "skewed"),
    ("dsv3-ep32-r64-global", 58, 256, 32, 64, 1, 1, "random"),
    ("dsv3-ep32-r32-g8n4", 58, 256, 32, 32, 8, 4, "skewed"),
    ("dsv3-ep32-r64-g8n4", 58, 256, 32, 64, 8, 4, "random"),
    ("dsv3-ep32-r0-g8n1", 58, 256, 32, 0, 8, 1, "skewed"),
    ("dsv3-ep32-r32-g8n3-fallback", 58, 256, 32, 32, 8, 3, "skewed"),  # 8 % 3: global
    ("dsv3-ep64-r0-g8n8", 58, 256, 64, 0, 8, 8, "skewed"),
    ("dsv3-ep64-r64-g8n8", 58, 256, 64, 64, 8, 8, "random"),
    ("dsv3-ep64-r128-global", 58, 256, 64, 128, 1, 1, "skewed"),
    ("dsv3-ep32-r32-g8n4-distinct", 58, 256, 32, 32, 8, 4, "skewed-distinct"),
    ("dsv3-ep64-r64-g8n8-distinct", 58, 256, 64, 64, 8, 8, "skewed-distinct"),
    ("dsv3-ep32-r0-global-distinct", 58, 256, 32, 0, 1, 1, "skewed-distinct"),
    ("dsv3-ep32-r32-floats", 58, 256, 32, 32, 8, 4, "floats"),
    ("dsv3-ep32-r32-hot-zero-rows", 58, 256, 32, 32, 1, 1, "hot"),
    ("qwen3-ep16-r16", 94, 128, 16, 16, 1, 1, "skewed"),
    ("mixtral-ep2-r2", 32, 8, 2, 2, 1, 1, "skewed"),
    ("mixtral-ep4-r4-ties", 32, 8, 4, 4, 1, 1, "ties"),
    ("mixtral-ep8-r8", 32, 8, 8, 8, 1, 1, "random"),
]


def make_loads(kind: str, layers: int, experts: int, seed: int) -> list[list[float]]:
    """Window counts like the agent's: integers (token assignments) except ``floats``."""
    rng = random.Random(seed)
    rows: list[list[float]] = []
    for layer in range(layers):
        if kind == "random":
            row = [float(rng.randrange(0, 100_000)) for _ in range(experts)]
        elif kind == "skewed":  # a few hot experts, the rest Zipf-like
            row = [float(int(50_000 / (1 + rng.randrange(experts)) ** 1.2)) for _ in range(experts)]
            for hot in rng.sample(range(experts), k=max(1, experts // 32)):
                row[hot] += rng.randrange(100_000, 400_000)
        elif kind == "skewed-distinct":  # skewed, every count different: placements must match
            row = [float(c) for c in rng.sample(range(1, 200_000), experts)]
            for hot in rng.sample(range(experts), k=max(1, experts // 32)):
                row[hot] += 1_000_000.0 + rng.randrange(1_000_000)
        elif kind == "floats":
            row = [rng.uniform(0.0, 1000.0) for _ in range(experts)]
        elif kind == "hot":  # one collapsed expert per layer, every 7th layer idle
            row = (
                [0.0] * experts
                if layer % 7 == 0
                else [float(rng.randrange(10)) for _ in range(experts)]
            )
            row[rng.randrange(experts)] += 1_000_000.0 if layer % 7 else 0.0
        elif kind == "ties":
            row = [float(rng.choice((10, 10, 20))) for _ in range(experts)]
        else:
            raise AssertionError(kind)
        rows.append(row)
    return rows


# Runs inside the vLLM venv: vLLM's policy on each case, phy2log as lists.
VLLM_EPLB = """
import json, sys
import torch
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

cases = json.load(open(sys.argv[1]))
out = {}
for name, case in cases.items():
    weight = torch.tensor(case["weight"], dtype=torch.float64)
    phy2log = DefaultEplbPolicy.rebalance_experts(
        weight, case["replicas"], case["groups"], case["nodes"], case["ranks"]
    )
    out[name] = phy2log.tolist()
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    built: dict[str, dict[str, Any]] = {}
    for seed, (name, layers, experts, ranks, redundant, groups, nodes, kind) in enumerate(SHAPES):
        built[name] = {
            "weight": make_loads(kind, layers, experts, seed),
            "replicas": experts + redundant,
            "groups": groups,
            "nodes": nodes,
            "ranks": ranks,
        }
    return built


@pytest.fixture(scope="module")
def vllm_placements(
    cases: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[list[int]]]:
    python = ensure_vllm_venv()
    folder = tmp_path_factory.mktemp("eplb")
    given, answer = folder / "cases.json", folder / "vllm.json"
    given.write_text(json.dumps(cases))
    run = subprocess.run(
        [str(python), "-c", VLLM_EPLB, str(given), str(answer)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result: dict[str, list[list[int]]] = json.loads(Path(answer).read_text())
    return result


def has_ties(row: list[float]) -> bool:
    return len(set(row)) < len(row)


@pytest.mark.parametrize("name", [shape[0] for shape in SHAPES])
def test_whatif_eplb_places_experts_like_vllms_rebalance_experts(
    name: str, cases: dict[str, dict[str, Any]], vllm_placements: dict[str, list[list[int]]]
) -> None:
    case = cases[name]
    theirs = vllm_placements[name]
    ours = rebalance_experts(
        case["weight"], case["replicas"], case["groups"], case["nodes"], case["ranks"]
    )
    ranks = case["ranks"]
    assert len(ours) == len(theirs)
    same_placement = 0
    untied = 0
    for layer, (row, mine, vllm) in enumerate(zip(case["weight"], ours, theirs, strict=True)):
        assert sorted(set(vllm)) == sorted(set(mine)) == list(range(len(row))), layer
        assert physical_rank_loads(row, mine, ranks) == pytest.approx(
            physical_rank_loads(row, vllm, ranks), rel=1e-12, abs=1e-9
        ), (name, layer)
        same_placement += mine == vllm
        if not has_ties(row):
            untied += 1
            assert mine == vllm, (name, layer)
    ours_overall = overall_balancedness(
        [physical_rank_loads(r, p, ranks) for r, p in zip(case["weight"], ours, strict=True)]
    )
    theirs_overall = overall_balancedness(
        [physical_rank_loads(r, p, ranks) for r, p in zip(case["weight"], theirs, strict=True)]
    )
    assert ours_overall == pytest.approx(theirs_overall, rel=1e-12)
    print(
        f"{name}: placement identical in {same_placement}/{len(ours)} layers ({untied} without ties), balancedness {ours_overall:.4f}"
    )
