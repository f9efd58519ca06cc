"""NvmlSource against a fake pynvml that fails like the real library (real NVMLError classes)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pynvml
import pytest
from structlog.testing import capture_logs

from moe_watch.demo.fake_nvml import GIB, FakeGpu, FakeNvml
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.nvml import INIT_RETRY_SECONDS, NvmlSource


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeNvml:
    gpus = [
        FakeGpu(
            0,
            utilization_percent=95,
            memory_used_bytes=72 * GIB,
            power_mw=612_500,
            temperature_c=71,
            pids=[4242, 4243, 4242],
        ),
        FakeGpu(1, utilization_percent=30, memory_used_bytes=40 * GIB),
    ]
    return FakeNvml(gpus)


@pytest.fixture
async def source(fake: FakeNvml) -> AsyncIterator[NvmlSource]:
    nvml = NvmlSource(fake, call_timeout=0.5)
    yield nvml
    fake.release()
    await nvml.close()


def test_the_fake_raises_the_real_pynvml_errors(fake: FakeNvml) -> None:
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    fake.gpus[1].lost = True
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    fake.gpus[0].unsupported.add("power")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetPowerUsage(handle)
    with pytest.raises(pynvml.NVMLError_GpuIsLost) as lost:
        fake.nvmlDeviceGetHandleByIndex(1)
    assert lost.value.value == 15
    assert fake.NVML_TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU


async def test_reads_every_gpu_with_v2_memory_and_units(source: NvmlSource, fake: FakeNvml) -> None:
    problems = Problems()
    reading = await source.collect(problems)
    await source.collect(problems)
    assert fake.init_calls == 1
    assert not problems.reasons
    assert reading.driver_version == "570.133.20"
    hot, cold = reading.gpus
    assert (hot.index, hot.up, hot.name) == (0, True, "NVIDIA H100 80GB HBM3")
    assert hot.utilization_ratio == pytest.approx(0.95)
    assert hot.memory_used_bytes == 72 * GIB  # v2: without the 512 MiB reserved
    assert hot.memory_total_bytes == 80 * GIB
    assert hot.power_watts == pytest.approx(612.5)
    assert hot.temperature_celsius == 71
    assert hot.pids == (4242, 4243)
    assert cold.utilization_ratio == pytest.approx(0.30)


async def test_unsupported_fields_are_absent_and_v1_memory_is_the_fallback(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[0].unsupported |= {"power", "memory_v2"}
    problems = Problems()
    gpu = (await source.collect(problems)).gpus[0]
    assert gpu.power_watts is None
    assert gpu.memory_used_bytes == 72 * GIB + 512 * 1024**2  # v1 "used" includes reserved
    assert not problems.reasons  # not supported is not an error


async def test_a_lost_gpu_is_down_the_others_report_and_it_logs_once(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.gpus[1].lost = True
    problems = Problems()
    with capture_logs() as lost_logs:
        for _ in range(3):
            reading = await source.collect(problems)
    assert problems.reasons == {"gpu_lost": 3}
    assert reading.gpus[1].up is False
    assert reading.gpus[1].uuid == fake.gpus[1].uuid  # identity remembered from before
    assert reading.gpus[0].up is True
    assert [e["event"] for e in lost_logs] == ["gpu lost"]
    fake.gpus[1].lost = False
    with capture_logs() as back_logs:
        back = await source.collect(Problems())
        await source.collect(Problems())
    assert back.gpus[1].up is True
    assert [e["event"] for e in back_logs] == ["gpu back"]


async def test_a_missing_library_fails_clearly_and_init_retries_are_throttled() -> None:
    fake = FakeNvml.with_gpus(1, library_missing=True)
    clock = Clock()
    source = NvmlSource(fake, call_timeout=0.5, clock=clock)
    try:
        with pytest.raises(SourceError) as err:
            await source.collect(Problems())
        assert err.value.reason == "library_missing"
        assert "nvidia runtime" in err.value.message
        with pytest.raises(SourceError):
            await source.collect(Problems())
        assert fake.init_calls == 1  # not retried within INIT_RETRY_SECONDS
        fake.library_missing = False  # the driver got installed
        clock.now += INIT_RETRY_SECONDS
        reading = await source.collect(Problems())
        assert fake.init_calls == 2
        assert len(reading.gpus) == 1
    finally:
        await source.close()


async def test_a_driver_not_loaded_is_reported_as_such() -> None:
    source = NvmlSource(FakeNvml.with_gpus(1, driver_missing=True), call_timeout=0.5)
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    await source.close()
    assert err.value.reason == "driver_missing"


async def test_a_hung_driver_call_times_out_then_reports_busy_then_recovers(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.hang(30.0)
    with pytest.raises(SourceError) as timeout:
        await source.collect(Problems())
    assert timeout.value.reason == "timeout"
    with pytest.raises(SourceError) as busy:
        await source.collect(Problems())
    assert busy.value.reason == "busy"
    fake.release()
    for _ in range(100):  # bounded: the stuck call returns once released
        try:
            reading = await source.collect(Problems())
            break
        except SourceError:
            await asyncio.sleep(0.01)
    assert reading.gpus[0].up is True


async def test_uninitialized_mid_run_reinitializes_on_the_next_cycle(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.initialized = False  # the driver was reloaded under us
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    assert err.value.reason == "uninitialized"
    assert len((await source.collect(Problems())).gpus) == 2
    assert fake.init_calls == 2


async def test_xid_events_are_counted_per_gpu_and_code(source: NvmlSource, fake: FakeNvml) -> None:
    await source.collect(Problems())  # init registers the event set
    fake.inject_xid(1, 79)
    fake.inject_xid(1, 79)
    fake.inject_xid(0, 48)
    totals: dict[tuple[int, int], int] = {}
    for _ in range(200):  # bounded: the event thread picks them up within its 0.5 s waits
        totals = dict((await source.collect(Problems())).xid_totals)
        if sum(totals.values()) == 3:
            break
        await asyncio.sleep(0.01)
    assert totals == {(1, 79): 2, (0, 48): 1}


async def test_close_returns_promptly_while_a_call_hangs(fake: FakeNvml) -> None:
    source = NvmlSource(fake, call_timeout=0.2)
    await source.collect(Problems())
    fake.hang(30.0)
    with pytest.raises(SourceError):
        await source.collect(Problems())
    done = threading.Event()

    async def close() -> None:
        await source.close()
        done.set()

    await asyncio.wait_for(close(), timeout=5)
    fake.release()
    assert done.is_set()
