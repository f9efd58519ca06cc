"""The series budget (docs/metrics.md, "Series budget"): what one engine and one node may export
with the default `expert_top_n` 4. bench/node.py prints it beside what it measured and
tests/test_metrics_lint.py holds the benchmark to it at both node shapes."""

from __future__ import annotations

EXPERT_TOP_N = 4
PER_LAYER = 3 + 2 * EXPERT_TOP_N  # skew, max share, balancedness; the load-rank grid
PER_GPU = 16
PER_MODEL = 250  # latency and length histograms, finish reasons, curves, engine gauges
NODE_PER_ENGINE = 10  # the self-metrics of each engine's sources
NODE_FIXED = 40  # the agent's own


def engine_budget(*, layers: int, ep: int, gpus: int, models: int = 1) -> int:
    """Series one engine may export: its MoE layers, EP ranks (+1 for their balancedness),
    the GPUs it holds on this node, and its models."""
    return PER_LAYER * layers + (ep + 1 if ep > 1 else 0) + PER_GPU * gpus + PER_MODEL * models


def node_budget(engines: int, per_engine: int) -> int:
    """Series one node may export with ``engines`` engines of ``per_engine`` each."""
    return engines * (per_engine + NODE_PER_ENGINE) + NODE_FIXED
