"""GPU-level signals: memory ratios, headroom against the plan's budget and utilization spread
(the hot-expert-makes-a-hot-GPU sign)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from moe_watch.samples import GpuSample


def memory_used_ratio(gpu: GpuSample) -> float | None:
    if not gpu.up or gpu.memory_used_bytes is None or not gpu.memory_total_bytes:
        return None
    return min(1.0, max(0.0, gpu.memory_used_bytes / gpu.memory_total_bytes))


def memory_headroom_ratio(gpu: GpuSample) -> float | None:
    """GPU memory still free / total, 0-1; None for a lost GPU or one without memory figures."""
    if not gpu.up or gpu.memory_used_bytes is None or not gpu.memory_total_bytes:
        return None
    return max(0.0, 1 - gpu.memory_used_bytes / gpu.memory_total_bytes)


def budget_used_ratio(gpu: GpuSample, budget_bytes: float | None) -> float | None:
    """GPU memory used / the plan's per-GPU budget (> 1: above plan); None without a budget or
    a reading."""
    if not gpu.up or gpu.memory_used_bytes is None or not budget_bytes:
        return None
    return gpu.memory_used_bytes / budget_bytes


def utilization_spread(gpus: Iterable[GpuSample]) -> float | None:
    """max - min utilization across the GPUs that reported one; None for fewer than two.

    Under expert parallelism a hot expert makes its GPU hot: 0.95 on one GPU and 0.30 on the
    others (spread 0.65) while the average looks healthy.
    """
    values = [g.utilization_ratio for g in gpus if g.up and g.utilization_ratio is not None]
    if len(values) < 2:
        return None
    return max(values) - min(values)


def interconnect(gpus: Iterable[GpuSample], pairs: Mapping[tuple[int, int], bool]) -> str | None:
    """How one engine's GPUs reach each other: "nvlink" when NVML says every pair talks over
    NVLink, "pcie" when some pair does not (or a GPU has no active NVLink link: an expert-parallel
    all-to-all then crosses PCIe or the host), None for fewer than two GPUs or when NVML could
    not tell."""
    mine = sorted({g.index for g in gpus if g.up})
    if len(mine) < 2:
        return None
    if any(g.link is not None and g.link.nvlink_links_up == 0 for g in gpus if g.index in mine):
        return "pcie"
    known = [pairs.get((a, b)) for i, a in enumerate(mine) for b in mine[i + 1 :]]
    if any(value is False for value in known):
        return "pcie"
    return "nvlink" if all(value is True for value in known) else None
