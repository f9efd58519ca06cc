import pytest

from moe_watch.samples import GpuSample
from moe_watch.signals.gpu import (
    budget_used_ratio,
    memory_headroom_ratio,
    memory_used_ratio,
    utilization_spread,
)


def gpu(index: int, util: float | None, up: bool = True) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", name="H100", up=up, utilization_ratio=util)


def test_spread_is_max_minus_min_the_hot_expert_signature() -> None:
    assert utilization_spread([gpu(0, 0.95), gpu(1, 0.30), gpu(2, 0.32)]) == pytest.approx(0.65)


def test_spread_ignores_lost_gpus_and_needs_two() -> None:
    assert utilization_spread([gpu(0, 0.9), gpu(1, 0.1, up=False)]) is None
    assert utilization_spread([]) is None


def test_memory_ratio() -> None:
    g = GpuSample(0, "u", "H100", True, memory_used_bytes=76e9, memory_total_bytes=80e9)
    assert memory_used_ratio(g) == pytest.approx(0.95)
    assert (
        memory_used_ratio(
            GpuSample(0, "u", "H100", False, memory_used_bytes=1, memory_total_bytes=2)
        )
        is None
    )


def test_headroom_is_the_free_share_never_below_zero_and_absent_without_a_reading() -> None:
    assert memory_headroom_ratio(
        GpuSample(0, "u", "H100", True, memory_used_bytes=60e9, memory_total_bytes=80e9)
    ) == pytest.approx(0.25)
    over = GpuSample(0, "u", "H100", True, memory_used_bytes=90e9, memory_total_bytes=80e9)
    assert memory_headroom_ratio(over) == 0.0
    for unknown in (
        GpuSample(0, "u", "H100", False, memory_used_bytes=1, memory_total_bytes=2),  # lost
        GpuSample(0, "u", "H100", True, memory_total_bytes=80e9),  # no used figure
        GpuSample(0, "u", "H100", True, memory_used_bytes=1, memory_total_bytes=0),
    ):
        assert memory_headroom_ratio(unknown) is None


def test_budget_used_is_memory_used_over_the_plans_budget() -> None:
    g = GpuSample(0, "u", "H100", True, memory_used_bytes=60e9, memory_total_bytes=80e9)
    assert budget_used_ratio(g, 50e9) == pytest.approx(1.2)  # above plan
    assert budget_used_ratio(g, None) is None
    assert budget_used_ratio(g, 0.0) is None  # no budget to divide by
    assert budget_used_ratio(GpuSample(0, "u", "H100", False), 50e9) is None
