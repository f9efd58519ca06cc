"""Expert-parallel communication in the agent: all-to-all time from the plugin's files, NVLink/PCIe topology from
NVML, and the drift rule "expert parallelism on GPUs without NVLink", end to end through
/metrics and /status."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from moe_watch.agent import Agent
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.expert_file import All2AllTimes, CountsFile, write_counts_file
from moe_watch.samples import ExpertCounts, GpuLink, GpuSample, Histogram, matrix
from moe_watch.serving.views import status_document
from moe_watch.signals.experts import all2all_window
from moe_watch.signals.gpu import interconnect
from moe_watch.sources.expert_plugin import all2all_histogram
from tests.conftest import EngineStub
from tests.test_agent import exposition, value
from tests.test_drift import read_capture

BOUNDS = [0.005, 0.02, 0.05]


def times(buckets: list[int], total: float, bounds: list[float] | None = None) -> All2AllTimes:
    return All2AllTimes(
        bounds=bounds or BOUNDS, buckets=buckets, count=sum(buckets), sum=total, backend="naive"
    )


def test_workers_histograms_add_up_and_an_alien_layout_is_left_out() -> None:
    merged = all2all_histogram(
        [times([1, 2, 0, 1], 0.5), times([0, 1, 1, 0], 0.1), times([5, 0], 9.0, bounds=[0.1])]
    )
    assert merged is not None
    assert merged.buckets == ((0.005, 1.0), (0.02, 4.0), (0.05, 5.0), (math.inf, 6.0))
    assert (merged.count, merged.sum) == (6.0, pytest.approx(0.6))
    assert all2all_histogram([]) is None


def counts(histogram: Histogram | None, started: float = 1.0) -> ExpertCounts:
    return ExpertCounts(
        engine="e",
        model="m",
        top_k=1,
        num_experts=2,
        layers=(0,),
        counts=matrix([[1, 1]]),
        started=started,
        all2all=histogram,
    )


def hist(per_bucket: list[int], total: float) -> Histogram:
    running, buckets = 0.0, []
    for bound, n in zip([*BOUNDS, math.inf], per_bucket, strict=True):
        running += n
        buckets.append((bound, running))
    return Histogram(buckets=tuple(buckets), count=running, sum=total)


def test_window_quantiles_come_from_bucket_deltas_not_the_history() -> None:
    old = counts(hist([100, 0, 0, 0], 0.1))  # 100 fast passes before the window
    now = counts(hist([100, 0, 10, 0], 0.4))  # then 10 slow ones (20-50 ms)
    quantiles, passes = all2all_window([old, now])
    assert passes == 10
    assert 0.02 < quantiles[0.5] <= 0.05
    assert 0.02 < quantiles[0.95] <= 0.05
    # One sample, or none timed in the window: nothing (absent, not 0).
    assert all2all_window([now]) == ({}, 0.0)
    assert all2all_window([now, now]) == ({}, 0.0)
    assert all2all_window([counts(None), counts(None)]) == ({}, 0.0)
    # A restarted worker (cumulative counts drop) counts what it did since.
    restarted = counts(hist([0, 0, 0, 3], 0.3), started=2.0)
    quantiles, passes = all2all_window([now, restarted])
    assert passes == 3
    assert quantiles[0.5] == 0.05


def gpu(index: int, links: int | None) -> GpuSample:
    return GpuSample(index, "", "", True, link=GpuLink(nvlink_links_up=links))


def test_interconnect_of_an_engine() -> None:
    both = [gpu(0, 18), gpu(1, 18)]
    assert interconnect(both, {(0, 1): True}) == "nvlink"
    assert interconnect(both, {(0, 1): False}) == "pcie"
    assert interconnect(both, {}) is None  # NVML could not tell
    assert interconnect([gpu(0, 18), gpu(1, 0)], {}) == "pcie"  # a GPU with no active link
    assert interconnect([gpu(0, 18)], {}) is None  # one GPU: nothing to connect
    three = [*both, gpu(2, 18)]
    assert interconnect(three, {(0, 1): True, (0, 2): True}) is None  # (1, 2) unknown
    assert interconnect(three, {(0, 1): True, (0, 2): True, (1, 2): False}) == "pcie"


async def test_slow_all2all_on_pcie_gpus_reaches_metrics_status_and_drift(tmp_path: Path) -> None:
    stub = await EngineStub(read_capture("after-load")).start()
    fake = FakeNvml.with_gpus(2)
    for g in fake.gpus:
        g.pcie_only()
        g.pcie_generation = 4
    directory = tmp_path / "experts"
    now = [time.time()]

    def write(rank: int, buckets: list[int], total: float) -> None:
        write_counts_file(
            directory / f"w{rank}.experts.json",
            CountsFile(
                pid=100 + rank,
                started=1.0,
                updated=now[0],
                model="mixtral",
                top_k=2,
                num_experts=4,
                layers=[0],
                counts=[[5, 5, 5, 5]],
                dp_rank=rank,
                ep_rank=rank,
                ep_size=2,
                all2all=times(buckets, total),
            ),
        )

    try:
        config = load_settings(
            None,
            targets=[
                {
                    "name": "mixtral-0",
                    "url": stub.url,
                    "gpus": [0, 1],
                    "experts": {"source": "plugin", "directory": str(directory)},
                }
            ],
        )
        async with Agent(config, nvml=fake) as agent:
            for rank in (0, 1):
                write(rank, [10, 0, 0, 0], 0.01)
            await agent.run_cycle()
            for rank in (0, 1):  # 20 passes of 20-50 ms each since the last cycle
                write(rank, [10, 0, 10, 0], 0.01 + 10 * 0.03)
            snap = await agent.run_cycle()
    finally:
        await stub.stop()
    m = exposition(snap)
    p95 = value(m, "moe_watch_expert_all2all_seconds", engine="mixtral-0", quantile="0.95")
    assert 0.02 < p95 <= 0.05
    assert value(m, "moe_watch_expert_all2all_passes_timed", engine="mixtral-0") == 20
    assert value(m, "moe_watch_expert_all2all_info", engine="mixtral-0", backend="naive") == 1
    assert value(m, "moe_watch_gpu_nvlink_links_up", gpu="1", engine="mixtral-0") == 0
    assert value(m, "moe_watch_gpu_pcie_link_generation", gpu="0", engine="mixtral-0") == 4
    assert value(m, "moe_watch_gpu_pcie_link_width", gpu="0", engine="mixtral-0") == 16
    assert (
        value(m, "moe_watch_engine_interconnect_info", engine="mixtral-0", interconnect="pcie") == 1
    )
    # EP is on (the plugin files say ep_size 2) over PCIe: the drift rule fires.
    assert value(m, "moe_watch_config_drift", engine="mixtral-0", setting="interconnect") == 1
    status = status_document(snap)
    assert status["interconnect"] == {"mixtral-0": "pcie"}
    assert status["all2all"]["mixtral-0"]["backend"] == "naive"
    assert status["all2all"]["mixtral-0"]["seconds_per_forward_pass"]["0.95"] == p95
    assert status["gpu_links"]["0"]["nvlink_links_up"] == 0
    assert status["gpu_links"]["1"]["pcie_generation"] == 4
    assert any(d["setting"] == "interconnect" for d in status["drift"]["mixtral-0"])


async def test_nvlink_gpus_export_traffic_and_no_drift(tmp_path: Path) -> None:
    stub = await EngineStub(read_capture("after-load")).start()
    fake = FakeNvml.with_gpus(2)
    fake.gpus[0].nvlink_tx_kib = 18 * 1000
    try:
        config = load_settings(None, targets=[{"name": "e", "url": stub.url, "gpus": [0, 1]}])
        async with Agent(config, nvml=fake) as agent:
            snap = await agent.run_cycle()
    finally:
        await stub.stop()
    m = exposition(snap)
    assert value(m, "moe_watch_gpu_nvlink_links_up", gpu="0", engine="e") == 18
    assert value(m, "moe_watch_gpu_nvlink_transmit_bytes_total", gpu="0", engine="e") == 18e3 * 1024
    assert value(m, "moe_watch_engine_interconnect_info", engine="e", interconnect="nvlink") == 1
    assert value(m, "moe_watch_config_drift", engine="e", setting="interconnect") == 0
    assert not any(name == "moe_watch_expert_all2all_seconds" for name, _ in m)  # no plugin
