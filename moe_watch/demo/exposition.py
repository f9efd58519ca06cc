"""The simulated engine's /metrics page, in the flavor of the engine it stands in for."""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest

from moe_watch.demo.exposition_sglang import SglangCollector
from moe_watch.demo.exposition_vllm import VllmCollector
from moe_watch.demo.simulated_engine import EngineSim

Flavor = Literal["vllm", "vllm_legacy", "sglang"]
FLAVORS: tuple[Flavor, ...] = ("vllm", "vllm_legacy", "sglang")


def render_exposition(sim: EngineSim, flavor: Flavor = "vllm") -> str:
    """The Prometheus text exposition (format 0.0.4) of the current state."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} (one of {', '.join(FLAVORS)})")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        SglangCollector(sim)
        if flavor == "sglang"
        else VllmCollector(sim, legacy=flavor == "vllm_legacy")
    )
    return generate_latest(registry).decode()
