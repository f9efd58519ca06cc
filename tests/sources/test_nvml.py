"""NvmlSource against a fake pynvml that fails like the real library (real NVMLError classes)."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable

import pynvml
import pytest
from structlog.testing import capture_logs

from moe_watch.demo.fake_nvml import GIB, FakeGpu, FakeNvml
from moe_watch.samples import GpuReading
from moe_watch.sources import nvml as nvml_module
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.nvml import INIT_RETRY_SECONDS, NvmlSource


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _short_event_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Xid thread checks its stop flag between waits; short waits make close() quick."""
    monkeypatch.setattr(nvml_module, "EVENT_WAIT_MS", 50)


@pytest.fixture
def fake() -> FakeNvml:
    gpus = [
        FakeGpu(
            0,
            utilization_percent=95,
            memory_used_bytes=72 * GIB,
            power_mw=612_500,
            temperature_c=71,
            pids=[4243, 4242, 4242],
        ),
        FakeGpu(1, utilization_percent=30, memory_used_bytes=40 * GIB, power_mw=150_000),
    ]
    return FakeNvml(gpus)


@pytest.fixture
async def source(fake: FakeNvml) -> AsyncIterator[NvmlSource]:
    nvml = NvmlSource(fake, call_timeout=0.5)
    yield nvml
    fake.release()
    await nvml.close()


async def collect_until(
    source: NvmlSource, done: Callable[[GpuReading], bool] = lambda _: True
) -> GpuReading:
    """Collect until a reading satisfies ``done``, a collect error counting as not yet (a stuck
    call still draining); bounded at 5 s so a slow, shared machine does not fail it."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            reading = await source.collect(Problems())
        except SourceError:
            reading = None
        if reading is not None and done(reading):
            return reading
        await asyncio.sleep(0.01)
    raise AssertionError("no reading satisfied the condition within 5 s")


def xid_count(reading: GpuReading) -> int:
    return sum(reading.xid_totals.values())


def test_the_fake_raises_the_real_pynvml_errors(fake: FakeNvml) -> None:
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(2)
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    fake.gpus[0].unsupported.add("power")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetPowerUsage(handle)
    fake.gpus[0].errors["temperature"] = pynvml.NVML_ERROR_UNKNOWN
    with pytest.raises(pynvml.NVMLError_Unknown):
        fake.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    fake.gpus[1].lost = True
    with pytest.raises(pynvml.NVMLError_GpuIsLost) as lost:
        fake.nvmlDeviceGetHandleByIndex(1)
    assert lost.value.value == 15
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(fake.nvmlEventSetCreate(), 1)
    assert fake.NVML_TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU
    assert fake.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    assert fake.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    with pytest.raises(AttributeError):
        _ = fake.nvmlDeviceGetNoSuchThing


async def test_reads_every_gpu_with_v2_memory_and_units(source: NvmlSource, fake: FakeNvml) -> None:
    problems = Problems()
    readings = [await source.collect(problems) for _ in range(3)]
    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlDeviceGetUUID"] == 2  # identity read once per GPU, then cached
    assert not problems.reasons
    reading = readings[-1]
    assert reading.driver_version == "570.133.20"
    hot, cold = reading.gpus
    assert (hot.index, hot.up, hot.uuid, hot.name) == (
        0,
        True,
        "GPU-00000000-0000-4000-8000-000000000000",
        "NVIDIA H100 80GB HBM3",
    )
    assert hot.utilization_ratio == pytest.approx(0.95)
    assert hot.memory_used_bytes == 72 * GIB  # v2: without the 512 MiB reserved
    assert hot.memory_total_bytes == 80 * GIB
    assert hot.power_watts == pytest.approx(612.5)
    assert hot.temperature_celsius == 71
    assert hot.pids == (4242, 4243)  # sorted, unique
    assert (cold.index, cold.up) == (1, True)
    assert cold.utilization_ratio == pytest.approx(0.30)
    assert cold.memory_used_bytes == 40 * GIB
    assert cold.power_watts == pytest.approx(150.0)
    assert cold.pids == ()


async def test_an_unsupported_field_is_none_and_not_a_problem(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[0].unsupported |= {"power", "temperature"}
    problems = Problems()
    gpu = (await source.collect(problems)).gpus[0]
    assert gpu.up is True
    assert gpu.power_watts is None
    assert gpu.temperature_celsius is None
    assert gpu.utilization_ratio == pytest.approx(0.95)
    assert not problems.reasons  # not supported is a property of the GPU, not an error


async def test_without_memory_v2_it_falls_back_to_v1_and_does_not_ask_again(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[0].unsupported.add("memory_v2")
    problems = Problems()
    for _ in range(3):
        reading = await source.collect(problems)
    assert reading.gpus[0].memory_used_bytes == 72 * GIB + 512 * 1024**2  # v1 includes reserved
    assert reading.gpus[1].memory_used_bytes == 40 * GIB  # still v2 where supported
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1 + 3  # GPU 0 once, GPU 1 every cycle
    assert not problems.reasons


async def test_another_field_error_is_none_and_counted(source: NvmlSource, fake: FakeNvml) -> None:
    # Neither "not supported" nor "lost":
    fake.gpus[1].errors["temperature"] = pynvml.NVML_ERROR_NO_PERMISSION
    problems = Problems()
    reading = await source.collect(problems)
    assert problems.reasons == {"gpu_read": 1}
    assert reading.gpus[1].up is True
    assert reading.gpus[1].temperature_celsius is None
    assert reading.gpus[1].power_watts == pytest.approx(150.0)
    assert reading.gpus[0].temperature_celsius == 71


async def test_a_lost_gpu_is_down_the_others_report_and_it_logs_once(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.gpus[1].lost = True
    with capture_logs() as lost_logs:
        for _ in range(3):
            problems = Problems()
            reading = await source.collect(problems)
            assert problems.reasons == {"gpu_lost": 1}
    assert reading.gpus[1].up is False
    assert reading.gpus[1].uuid == fake.gpus[1].uuid  # identity remembered from before
    assert reading.gpus[1].utilization_ratio is None
    assert reading.gpus[0].up is True
    assert reading.gpus[0].utilization_ratio == pytest.approx(0.95)
    lost_events = [e for e in lost_logs if e["event"].startswith("gpu ")]
    assert [(e["event"], e["gpu"], e["log_level"]) for e in lost_events] == [
        ("gpu lost", 1, "warning")
    ]
    assert lost_events[0]["uuid"] == fake.gpus[1].uuid
    fake.gpus[1].lost = False
    with capture_logs() as back_logs:
        problems = Problems()
        back = await source.collect(problems)
        await source.collect(problems)
    assert back.gpus[1].up is True
    assert back.gpus[1].utilization_ratio == pytest.approx(0.30)
    assert not problems.reasons
    assert [(e["event"], e["gpu"]) for e in back_logs if e["event"].startswith("gpu ")] == [
        ("gpu back", 1)
    ]


async def test_an_unknown_error_on_the_handle_counts_as_a_lost_gpu(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[0].errors["handle"] = pynvml.NVML_ERROR_UNKNOWN
    problems = Problems()
    reading = await source.collect(problems)
    assert problems.reasons == {"gpu_lost": 1}
    assert (reading.gpus[0].up, reading.gpus[0].uuid) == (False, "")  # never read: no identity
    assert reading.gpus[1].up is True


async def test_a_missing_library_fails_clearly_and_init_retries_are_throttled() -> None:
    fake = FakeNvml.with_gpus(1, library_missing=True)
    clock = Clock()
    source = NvmlSource(fake, call_timeout=0.5, clock=clock)
    try:
        with pytest.raises(SourceError) as err:
            await source.collect(Problems())
        assert err.value.reason == "library_missing"
        assert "libnvidia-ml.so" in err.value.message
        # names the chart value to set, and where the unprivileged-pod cases are explained
        assert "Helm value runtimeClassName" in err.value.message
        assert "docs/deploy.md" in err.value.message
        clock.now += INIT_RETRY_SECONDS - 1
        with pytest.raises(SourceError) as again:
            await source.collect(Problems())
        assert again.value.reason == "library_missing"
        assert fake.calls["nvmlInit"] == 1  # not retried within INIT_RETRY_SECONDS
        fake.library_missing = False  # the driver got installed
        clock.now += 1
        reading = await source.collect(Problems())
        assert fake.calls["nvmlInit"] == 2
        assert len(reading.gpus) == 1
        assert reading.gpus[0].up is True
    finally:
        await source.close()


async def test_pynvml_not_installed_is_a_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    source = NvmlSource(call_timeout=0.5)
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    await source.close()
    assert err.value.reason == "library_missing"
    assert "nvidia-ml-py" in err.value.message


async def test_a_driver_not_loaded_is_reported_as_such() -> None:
    fake = FakeNvml.with_gpus(1, driver_missing=True)
    source = NvmlSource(fake, call_timeout=0.5)
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    await source.close()
    assert err.value.reason == "driver_missing"
    assert "nvidia-smi" in err.value.message


async def test_a_hung_driver_call_times_out_then_reports_busy_then_recovers(
    fake: FakeNvml,
) -> None:
    source = NvmlSource(fake, call_timeout=0.2)
    try:
        await source.collect(Problems())
        fake.hang(30.0)
        started = time.monotonic()
        with pytest.raises(SourceError) as timeout:
            await source.collect(Problems())
        assert timeout.value.reason == "timeout"
        assert time.monotonic() - started < 2.0  # bounded by call_timeout, not by the hang
        with pytest.raises(SourceError) as busy:
            await source.collect(Problems())
        assert busy.value.reason == "busy"
        assert "still running" in busy.value.message
        fake.release()
        reading = await collect_until(source)
        assert [gpu.up for gpu in reading.gpus] == [True, True]
        assert fake.calls["nvmlInit"] == 1
    finally:
        fake.release()
        await source.close()


async def test_uninitialized_mid_run_reinitializes_on_the_next_cycle(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.initialized = False  # nvmlShutdown called elsewhere in the process
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    assert err.value.reason == "uninitialized"
    assert len((await source.collect(Problems())).gpus) == 2
    assert fake.calls["nvmlInit"] == 2


async def test_uninitialized_during_a_gpu_read_is_not_a_field_error(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.gpus[1].errors["power"] = pynvml.NVML_ERROR_UNINITIALIZED
    with pytest.raises(SourceError) as err:
        await source.collect(Problems())
    assert err.value.reason == "uninitialized"
    del fake.gpus[1].errors["power"]
    problems = Problems()
    reading = await source.collect(problems)
    assert fake.calls["nvmlInit"] == 2
    assert reading.gpus[1].power_watts == pytest.approx(150.0)
    assert not problems.reasons


async def test_xid_events_are_counted_per_gpu_and_code(source: NvmlSource, fake: FakeNvml) -> None:
    fake.gpus[1].unsupported.add("events")  # no Xid events from this GPU, quietly
    with capture_logs() as logs:
        first = await source.collect(Problems())  # init registers the event set
        assert dict(first.xid_totals) == {}
        fake.inject_xid(0, 79)
        fake.inject_xid(0, 79)
        fake.inject_xid(1, 48)  # not registered: never delivered
        fake.inject_xid(0, 48)
        reading = await collect_until(source, lambda r: xid_count(r) >= 3)
        totals = dict(reading.xid_totals)
    assert totals == {(0, 79): 2, (0, 48): 1}
    assert [(e["gpu"], e["xid"]) for e in logs if e["event"] == "xid event"] == [
        (0, 79),
        (0, 79),
        (0, 48),
    ]
    assert not [e for e in logs if e["log_level"] == "warning" and e["event"] != "xid event"]


async def test_a_failing_event_wait_does_not_end_xid_counting(
    source: NvmlSource, fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an Xid 79 the waits can fail with GPU_IS_LOST; the other GPUs' Xids still count."""
    monkeypatch.setattr(nvml_module, "WATCHER_RETRY_SECONDS", 0.01)
    with capture_logs() as logs:
        await source.collect(Problems())
        fake.event_wait_error = pynvml.NVML_ERROR_GPU_IS_LOST
        failed_waits = fake.calls["nvmlEventSetWait_v2"] + 3  # it keeps waiting
        assert await asyncio.to_thread(fake.wait_for_calls, "nvmlEventSetWait_v2", failed_waits, 5)
        fake.event_wait_error = None
        fake.inject_xid(1, 48)
        reading = await collect_until(source, lambda r: xid_count(r) >= 1)
    assert dict(reading.xid_totals) == {(1, 48): 1}
    assert [e["event"] for e in logs if e["event"].startswith("xid event wait")] == [
        "xid event wait failed; still watching",  # once, not once per failed wait
        "xid event wait works again",
    ]


async def test_xid_events_resume_after_a_reinit(source: NvmlSource, fake: FakeNvml) -> None:
    await source.collect(Problems())
    fake.initialized = False  # the event wait fails too, and that watcher stops
    with pytest.raises(SourceError):
        await source.collect(Problems())
    await source.collect(Problems())  # init again: a new event set and watcher
    fake.inject_xid(1, 31)
    reading = await collect_until(source, lambda r: xid_count(r) >= 1)
    assert dict(reading.xid_totals) == {(1, 31): 1}


def test_real_device_handles_are_matched_by_address() -> None:
    """pynvml hands out a new ctypes pointer per call (the event's ``device`` too), and two
    pointers to one device do not compare equal: the Xid watcher maps them by address."""
    handle = ctypes.cast(ctypes.c_void_p(0x7F00_1234), pynvml.c_nvmlDevice_t)
    event = pynvml.c_nvmlEventData_t()
    event.device = handle
    assert event.device != handle
    assert nvml_module._handle_key(event.device) == nvml_module._handle_key(handle) == 0x7F00_1234


async def test_xid_events_are_attributed_to_a_gpu_that_can_no_longer_be_asked(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.gpus[1].lost = True  # Xid 79: fallen off the bus, nvmlDeviceGetIndex fails now
    fake.inject_xid(1, 79)
    reading = await collect_until(source, lambda r: xid_count(r) >= 1)
    assert dict(reading.xid_totals) == {(1, 79): 1}
    assert fake.calls["nvmlDeviceGetIndex"] == 0  # known from registration


async def test_a_driver_without_the_v3_process_call_falls_back_to_v2() -> None:
    fake = FakeNvml.with_gpus(1, processes_v3_missing=True)
    fake.gpus[0].pids = [7, 5]
    source = NvmlSource(fake, call_timeout=0.5)
    try:
        problems = Problems()
        reading = await source.collect(problems)
        await source.collect(problems)
    finally:
        await source.close()
    assert reading.gpus[0].pids == (5, 7)
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 1  # v3 tried once only
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2
    assert not problems.reasons


async def test_a_call_the_driver_lacks_is_an_absent_field_not_an_error(
    source: NvmlSource, fake: FakeNvml
) -> None:
    # nvidia-ml-py 12.535 on a driver without the v3 process call: FUNCTION_NOT_FOUND, no _v2.
    fake.gpus[0].errors["processes"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    problems = Problems()
    reading = await source.collect(problems)
    assert reading.gpus[0].up is True
    assert reading.gpus[0].pids == ()
    assert not problems.reasons


async def test_a_new_nvml_session_reads_the_gpu_identities_again(
    source: NvmlSource, fake: FakeNvml
) -> None:
    await source.collect(Problems())
    fake.initialized = False
    fake.gpus[1].uuid = "GPU-11111111-0000-4000-8000-000000000001"
    with pytest.raises(SourceError):
        await source.collect(Problems())
    reading = await source.collect(Problems())
    assert reading.gpus[1].uuid == "GPU-11111111-0000-4000-8000-000000000001"


async def test_close_frees_the_event_set_and_shuts_nvml_down(fake: FakeNvml) -> None:
    source = NvmlSource(fake, call_timeout=0.5)
    await source.collect(Problems())
    await source.close()
    assert fake.calls["nvmlEventSetFree"] == 1
    assert fake.calls["nvmlShutdown"] == 1
    assert fake.initialized is False


async def test_close_returns_promptly_while_a_call_hangs(fake: FakeNvml) -> None:
    source = NvmlSource(fake, call_timeout=0.2)
    await source.collect(Problems())
    fake.hang(30.0)
    with pytest.raises(SourceError):
        await source.collect(Problems())
    started = time.monotonic()
    try:
        await asyncio.wait_for(source.close(), timeout=5)
        assert time.monotonic() - started < 2.0
        assert fake.calls["nvmlShutdown"] == 0  # the hung call still owns the library
    finally:
        fake.release()  # let the stuck worker thread finish


WEDGED_AGENT = """
import asyncio, threading
from moe_watch.config import load_settings
from moe_watch.demo.fake_nvml import FakeNvml
from moe_watch.serving.service import install_stop_signals, serve

class Wedged(FakeNvml):
    def nvmlDeviceGetCount(self) -> int:
        print("wedged", flush=True)
        threading.Event().wait()  # a driver call that never returns
        return 0

async def main() -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)  # what `moe-watch run` does
    settings = load_settings(None, listen="127.0.0.1:0", nvml_timeout_seconds=0.2)
    await serve(settings, stop=stop, nvml=Wedged.with_gpus(1))

asyncio.run(main())
"""


async def test_the_agent_exits_on_sigterm_while_an_nvml_call_hangs_forever() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WEDGED_AGENT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None

        async def wedged() -> None:
            while line := await proc.stdout.readline():  # the agent logs to stdout too
                if line.strip() == b"wedged":
                    return
            raise AssertionError("the agent ended before its NVML call hung")

        await asyncio.wait_for(wedged(), timeout=30)
        proc.send_signal(signal.SIGTERM)
        # Bounded: one NVML timeout for the cycle in flight, then close() and interpreter exit,
        # which must not join the thread still stuck in the driver.
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0


# --- topology: NVLink and PCIe ---------------------------------------------------------------


def test_the_fake_answers_topology_calls_as_pynvml_does(fake: FakeNvml) -> None:
    fake.nvmlInit()
    h0, h1 = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
    assert fake.nvmlDeviceGetNvLinkState(h0, 17) == pynvml.NVML_FEATURE_ENABLED
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # past the H100's 18 links
        fake.nvmlDeviceGetNvLinkState(h0, 18)
    status = fake.nvmlDeviceGetP2PStatus(h0, h1, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
    assert status == pynvml.NVML_P2P_STATUS_OK
    fake.gpus[1].pcie_only()
    with pytest.raises(pynvml.NVMLError_NotSupported):  # a GPU without NVLink
        fake.nvmlDeviceGetNvLinkState(h1, 0)
    status = fake.nvmlDeviceGetP2PStatus(h0, h1, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
    assert status == pynvml.NVML_P2P_STATUS_NOT_SUPPORTED  # a status, not an exception
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetP2PStatus(h0, h0, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
    values = fake.nvmlDeviceGetFieldValues(h1, [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0)])
    assert values[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED  # per field, not raised
    assert fake.nvmlDeviceGetCurrPcieLinkGeneration(h1) == 5
    assert fake.nvmlDeviceGetMaxPcieLinkWidth(h1) == 16


async def test_reads_nvlink_links_counters_pcie_and_peer_pairs(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[0].nvlinks[3] = False  # one link down
    fake.gpus[0].nvlink_tx_kib, fake.gpus[0].nvlink_rx_kib = 17 * 1000, 17 * 2000
    fake.gpus[1].pcie_width = 8  # a degraded slot
    problems = Problems()
    for _ in range(3):
        reading = await source.collect(problems)
    assert not problems.reasons
    link0, link1 = (gpu.link for gpu in reading.gpus)
    assert link0 is not None
    assert link1 is not None
    assert link0.nvlink_links_up == 17
    assert link1.nvlink_links_up == 18
    assert link0.nvlink_transmit_bytes == 17 * 1000 * 1024  # KiB summed over the active links
    assert link0.nvlink_receive_bytes == 17 * 2000 * 1024
    assert (link1.pcie_generation, link1.pcie_max_generation) == (5, 5)
    assert (link1.pcie_width, link1.pcie_max_width) == (8, 16)
    assert reading.nvlink_pairs == {(0, 1): True}
    # The link count is learned once: later cycles read 18 links, not NVML_NVLINK_MAX_LINKS.
    per_cycle = 18 * 2
    assert fake.calls["nvmlDeviceGetNvLinkState"] == 2 * 19 + 2 * per_cycle


async def test_pcie_only_gpus_have_no_links_and_no_nvlink_pair(
    source: NvmlSource, fake: FakeNvml
) -> None:
    for gpu in fake.gpus:
        gpu.pcie_only()
        gpu.pcie_generation, gpu.pcie_width = 4, 16  # an L40S-class card
    problems = Problems()
    reading = await source.collect(problems)
    assert not problems.reasons  # no NVLink is a property of the GPU, not an error
    for gpu in reading.gpus:
        assert gpu.link is not None
        assert gpu.link.nvlink_links_up == 0
        assert gpu.link.nvlink_transmit_bytes is None
        assert gpu.link.pcie_generation == 4
    assert reading.nvlink_pairs == {(0, 1): False}


async def test_a_driver_without_the_topology_calls_leaves_them_absent(
    source: NvmlSource, fake: FakeNvml
) -> None:
    for gpu in fake.gpus:
        gpu.unsupported |= {"nvlink", "pcie", "p2p", "nvlink_counters"}
    problems = Problems()
    reading = await source.collect(problems)
    assert not problems.reasons
    link = reading.gpus[0].link
    assert link is not None
    assert link.nvlink_links_up == 0  # NOT_SUPPORTED on link 0: no NVLink
    assert (link.pcie_generation, link.pcie_width, link.nvlink_transmit_bytes) == (None, None, None)
    assert reading.nvlink_pairs == {}  # unknown, not "PCIe"
    assert reading.gpus[0].utilization_ratio == pytest.approx(0.95)  # the rest still reads


async def test_a_topology_error_is_counted_and_the_gpu_still_reports(
    source: NvmlSource, fake: FakeNvml
) -> None:
    fake.gpus[1].errors["pcie"] = pynvml.NVML_ERROR_NO_PERMISSION
    fake.gpus[1].errors["p2p"] = pynvml.NVML_ERROR_UNKNOWN  # UNKNOWN: treated as gone for pairs
    problems = Problems()
    reading = await source.collect(problems)
    assert reading.gpus[1].up
    assert reading.gpus[1].link is not None
    assert reading.gpus[1].link.pcie_width is None
    assert reading.gpus[1].link.nvlink_links_up == 18
    assert problems.reasons == {"gpu_read": 4}  # the four PCIe reads; the pair is just unknown
    assert reading.nvlink_pairs == {}
