"""The JSON views of a Snapshot: /status (what a human at 3 a.m. wants first) and /experts (the
full expert matrix). Like the exporter, they only format what the snapshot already holds, and
iterate its engines' records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from moe_watch.drift import max_num_seqs_rule
from moe_watch.signals.batching import engine_knee
from moe_watch.signals.coverage import CoverageCurve
from moe_watch.signals.eplb_whatif import ALGORITHM, VLLM_VERSION
from moe_watch.sizing.allocated import KvPlan
from moe_watch.snapshot import EngineExperts, Snapshot, WhatIfView
from moe_watch.thresholds import DEFAULT


def status_document(snapshot: Snapshot) -> dict[str, Any]:
    """JSON-friendly summary for /status: what a human at 3 a.m. wants first."""
    records = snapshot.engines
    experts = _experts(snapshot)
    return {
        "timestamp": snapshot.timestamp,
        "cycle": snapshot.cycle,
        "cycle_duration_seconds": round(snapshot.cycle_duration_seconds, 6),
        "sources": [
            {
                "source": status.name,
                "up": status.up,
                "last_success_timestamp": status.last_success_timestamp,
                "last_error": status.last_error,
                "errors_total": dict(status.errors_total),
            }
            for status in snapshot.sources
        ],
        "targets_up": dict(snapshot.targets_up),
        "engines": [
            {
                "engine": view.engine,
                "model": view.model,
                "kind": view.kind,
                "version": view.version,
                "max_model_len": view.max_model_len,
                "settings": dict(record.settings),
                # Over the agent's window, for a reader without Prometheus; /metrics carries
                # the engine's histograms instead (histogram_quantile over any range).
                "latency_seconds": latency_document(view.signals.latency_seconds),
            }
            for record in records
            for view in record.views
        ],
        "drift": {
            record.name: [
                {
                    "setting": d.setting,
                    "running": d.running,
                    "expected": d.expected,
                    "rule": d.rule,
                }
                for d in record.drift
            ]
            for record in records
            if record.drift is not None
        },
        "sized_budget_bytes": {
            record.name: record.budget_bytes
            for record in records
            if record.budget_bytes is not None
        },
        "kv_plan": {
            record.name: kv_plan_document(record.kv_plan)
            for record in records
            if record.kv_plan is not None
        },
        "eplb_whatif": {
            view.engine: whatif_document(view.whatif, full=False)
            for view in experts
            if view.whatif is not None
        },
        "gpus": [
            {
                "gpu": view.sample.index,
                "uuid": view.sample.uuid,
                "name": view.sample.name,
                "up": view.sample.up,
                "engine": view.engine,
                "utilization_ratio": view.sample.utilization_ratio,
                "memory_used_ratio": view.memory_used_ratio,
                "pids": list(view.sample.pids),
            }
            for view in snapshot.gpus
        ],
        # Each GPU's links, how each engine's GPUs reach each other, EP exchange time.
        "gpu_links": {
            str(view.sample.index): asdict(view.sample.link)
            for view in snapshot.gpus
            if view.sample.link is not None
        },
        "interconnect": {
            record.name: record.interconnect
            for record in records
            if record.interconnect is not None
        },
        "all2all": {
            view.engine: {
                "backend": view.latest.all2all_backend,
                "seconds_per_forward_pass": {
                    f"{q:g}": v for q, v in sorted(view.signals.all2all_seconds.items())
                },
                "passes_timed": view.signals.all2all_passes,
            }
            for view in experts
            if view.latest.all2all is not None
        },
        "batching": batching_document(snapshot),
        "coverage": {
            view.engine: coverage_document(view.coverage, per_layer=False)
            for view in experts
            if view.coverage is not None
        },
    }


def kv_plan_document(kv: KvPlan) -> dict[str, Any]:
    """The plan's KV tokens per engine core and the allocation, each null where unknown."""
    planned, allocated, coverage = kv.planned, kv.allocated, kv.coverage
    return {
        "planned_tokens": planned.tokens if planned is not None else None,
        "planned_max_num_seqs_per_rank": planned.seqs_per_rank if planned is not None else None,
        "planned_max_model_len": planned.max_model_len if planned is not None else None,
        "allocated_tokens": allocated.tokens if allocated is not None else None,
        "max_concurrency": allocated.kv_cache_max_concurrency if allocated is not None else None,
        "num_gpu_blocks": allocated.num_gpu_blocks if allocated is not None else None,
        "block_size": allocated.block_size if allocated is not None else None,
        "coverage_ratio": coverage.ratio if coverage is not None else None,
        "sequences_at_planned_len": (
            coverage.sequences_at_planned_len if coverage is not None else None
        ),
        "short": coverage.short() if coverage is not None else None,
    }


def latency_document(quantiles: Mapping[tuple[str, float], float]) -> dict[str, dict[str, float]]:
    """{kind: {quantile: seconds}} of the window quantiles."""
    result: dict[str, dict[str, float]] = {}
    for (kind, q), seconds in sorted(quantiles.items()):
        result.setdefault(kind, {})[f"{q:g}"] = seconds
    return result


def _experts(snapshot: Snapshot) -> list[EngineExperts]:
    return [record.experts for record in snapshot.engines if record.experts is not None]


def batching_document(snapshot: Snapshot) -> dict[str, Any]:
    """Each engine's batching curve and knee, and the rule that judges its max_num_seqs."""
    engines: dict[str, Any] = {}
    for record in snapshot.engines:
        if not record.batching:
            continue
        models: dict[str, Any] = {}
        for model, answer in sorted(record.batching.items()):
            models[model] = {
                "knee": answer.knee,
                "peak_reached": answer.peak_reached,
                "answer": answer.reason,
                "gpus": answer.gpus,
                "itl_p95_slo_seconds": answer.slo_seconds,
                "min_evidence_seconds": answer.min_seconds,
                "curve": [
                    {
                        "batch": p.batch_bin,
                        "evidence_seconds": round(p.seconds, 3),
                        "generation_tokens_per_second_per_gpu": p.tokens_per_second_per_gpu,
                        "itl_p95_seconds": p.itl_p95_seconds,
                        "ttft_p95_seconds": p.ttft_p95_seconds,
                        "evidenced": p.evidenced,
                        "within_slo": p.within_slo,
                    }
                    for p in answer.points
                ],
            }
        knee = engine_knee(record.batching.values())
        engines[record.name] = {"models": models, "max_num_seqs_rule": max_num_seqs_rule(knee)}
    return engines


def coverage_document(curve: CoverageCurve, *, per_layer: bool) -> dict[str, Any]:
    """An engine's coverage curve (/status); ``per_layer`` adds each layer's (/experts)."""
    document: dict[str, Any] = {
        "dense_point_tokens": curve.dense_point,
        "dense_coverage": DEFAULT.expert_dense_coverage,
        "sample_every": curve.sample_every,
        "bins": [
            {
                "tokens": b.tokens_bin,
                "steps": b.steps,
                "mean_tokens": b.mean_tokens,
                "observed": b.observed,
                "independent": b.independent,
            }
            for b in curve.bins
        ],
    }
    if per_layer:
        document["layers"] = list(curve.layers)
        document["per_layer"] = [list(row) for row in curve.per_layer]
    return document


def experts_document(snapshot: Snapshot | None) -> dict[str, Any]:
    """The full expert matrix for /experts: every (layer, expert), for heatmaps and humans."""
    if snapshot is None:
        return {"ready": False, "engines": []}
    engines = []
    for view in _experts(snapshot):
        counts, signals = view.latest, view.signals
        engines.append(
            {
                "engine": view.engine,
                "model": counts.model,
                "source": counts.source,
                "top_k": counts.top_k,
                "num_experts": counts.num_experts,
                "ep_size": counts.ep_size,
                "layers": list(counts.layers),
                "counts_total": [list(row) for row in counts.counts],
                "counts_window": [list(row) for row in signals.window_counts],
                "layer_stats": [
                    {
                        "layer": layer.layer,
                        "tokens": layer.tokens,
                        "skew": layer.skew,
                        "balancedness": layer.balancedness,
                        "max_token_share": layer.max_share,
                        "hottest_expert": layer.hottest_expert,
                        "load_ranks": [
                            {"expert": expert, "token_share": share}
                            for expert, share in layer.ranked
                        ],
                    }
                    for layer in signals.layers
                ],
                "hot": [
                    {"layer": h.layer, "expert": h.expert, "token_share": h.share}
                    for h in signals.hot()
                ],
                "rank_load": {str(rank): load for rank, load in signals.rank_load.items()},
                "eplb_whatif": whatif_document(view.whatif, full=True),
                "coverage": coverage_document(view.coverage, per_layer=True)
                if view.coverage is not None
                else None,
            }
        )
    return {"timestamp": snapshot.timestamp, "engines": engines}


def whatif_document(view: WhatIfView | None, *, full: bool) -> dict[str, Any] | None:
    """One engine's EPLB what-if: the summary (/status) or, ``full``, every layer's proposed
    placement and per-rank loads before and after (/experts). None: no what-if (no expert
    parallelism, or no traffic in the window)."""
    if view is None:
        return None
    r = view.result
    cases: list[dict[str, Any]] = [
        {"redundant_experts": case.redundant_experts, "balancedness": case.balancedness}
        for case in r.cases
    ]
    document: dict[str, Any] = {
        "answer": whatif_answer(view),
        "algorithm": f"{ALGORITHM} of vLLM {VLLM_VERSION}, transcribed to pure Python",
        "computed_at": view.computed_at,
        "cpu_seconds": round(view.duration_seconds, 6),
        "ep_size": r.ep_size,
        "num_experts": r.num_experts,
        "policy": "hierarchical" if r.hierarchical else "global",
        "num_groups": r.num_groups,
        "num_nodes": r.num_nodes,
        "balancedness_today": r.balancedness_today,
        "target": r.target,
        "redundant_needed": r.redundant_needed,
        "needed_balancedness": r.needed_balancedness,
        "searched": list(r.searched),
        "cases": cases,
        "skipped": [{"redundant_experts": n, "reason": why} for n, why in r.skipped],
    }
    if not full:
        return document
    document["layers"] = [
        {
            "layer": layer,
            "balancedness_today": r.layer_balancedness_today[i],
            "rank_loads_today": list(r.rank_loads_today[i]),
        }
        for i, layer in enumerate(r.layers)
    ]
    for entry, case in zip(cases, r.cases, strict=True):
        slots = (r.num_experts + case.redundant_experts) // r.ep_size  # physical experts per rank
        entry["layers"] = [
            {
                "layer": placed.layer,
                "balancedness": placed.balancedness,
                "rank_loads": list(placed.rank_loads),
                # rank -> its logical experts (a replicated expert sits on several ranks)
                "rank_experts": [
                    list(placed.phy2log[rank * slots : (rank + 1) * slots])
                    for rank in range(r.ep_size)
                ],
            }
            for placed in case.layers
        ]
    return document


def whatif_answer(view: WhatIfView) -> str:
    """The what-if in one sentence, for a human at 3 a.m."""
    r = view.result
    if r.redundant_needed is not None and r.needed_balancedness is not None:
        return (
            f"vLLM's EPLB with {r.redundant_needed} redundant experts would lift EP-rank "
            f"balancedness from {r.balancedness_today:.2f} to {r.needed_balancedness:.2f} "
            f"(target {r.target:g})."
        )
    best = f" (best {r.needed_balancedness:.2f})" if r.needed_balancedness is not None else ""
    top = r.searched[-1] if r.searched else 0
    return (
        f"No redundant-expert count up to {top} lets vLLM's EPLB reach balancedness "
        f"{r.target:g}{best}; today {r.balancedness_today:.2f}."
    )
