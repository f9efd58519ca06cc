"""GPUs through NVML (nvidia-ml-py): utilization, memory, temperature, power, PIDs, Xid events.

NVML calls block, and a wedged driver can block for a long time, so each cycle's whole read runs
as one function on one dedicated daemon worker thread, bounded by ``call_timeout``; while a read
is stuck the source answers "busy" instead of queueing more work behind it, and the process can
still exit. ``nvmlInit`` runs once
(retried at most every ``INIT_RETRY_SECONDS`` while the library or driver is missing, and again
whenever NVML reports itself uninitialized). A lost GPU is reported with ``up=False`` while the
others keep reporting; a field the GPU or driver does not support is None. Xid critical errors
arrive on an NVML event set, read by a daemon thread of their own.

Written against nvidia-ml-py >= 12.535 (pyproject): strings come back as ``str``,
``nvmlDeviceGetMemoryInfo`` takes ``version`` and ``nvmlEventSetWait_v2`` exists.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, TypeVar

import structlog

from moe_watch.samples import GpuLink, GpuReading, GpuSample
from moe_watch.sources.base import Problems, SourceError

log = structlog.get_logger("moe_watch.nvml")

T = TypeVar("T")

INIT_RETRY_SECONDS = 30.0
EVENT_WAIT_MS = 500  # one nvmlEventSetWait; also how long closing may wait for the Xid thread

WATCHER_RETRY_SECONDS = 1.0

# NVML return codes are pynvml's NVML_ERROR_* constants, read from the module in use (pynvml
# itself, or the fake, which hands out the real ones) so that a node without pynvml still gets
# its "library_missing" report instead of an ImportError here.


def _watcher_ends(nvml: Any) -> tuple[int, ...]:
    """Codes after which an event set is useless: NVML was shut down, or the set was freed."""
    return (nvml.NVML_ERROR_UNINITIALIZED, nvml.NVML_ERROR_INVALID_ARGUMENT)


def _gpu_gone(nvml: Any) -> tuple[int, ...]:
    """Codes after which nothing more can be read from a GPU this cycle."""
    return (nvml.NVML_ERROR_GPU_IS_LOST, nvml.NVML_ERROR_UNKNOWN)


def _absent(nvml: Any) -> tuple[int, ...]:
    """The GPU or the driver does not have it: a property of the node, not a fault."""
    return (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def _no_memory_v2(nvml: Any) -> tuple[int, ...]:
    """nvmlDeviceGetMemoryInfo_v2 is missing or refused: an older driver, or a GPU without it."""
    return (*_absent(nvml), nvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _handle_key(handle: Any) -> Hashable:
    # Real handles are ctypes pointers, and two pointer objects to one device do not compare
    # equal; their addresses do. Anything else (a fake's handle) is its own key.
    key: Hashable = handle
    with contextlib.suppress(ctypes.ArgumentError, TypeError):
        key = ctypes.cast(handle, ctypes.c_void_p).value
    return key


def _init_error(nvml: Any, exc: BaseException) -> SourceError:
    code = _code(exc)
    if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return SourceError(
            "library_missing",
            "libnvidia-ml.so not found: no NVIDIA driver here, or the NVIDIA runtime did not start "
            "this container. In Kubernetes set the "
            "Helm value runtimeClassName (e.g. nvidia) where that runtime is not the node's "
            "default; Bottlerocket and EKS Auto Mode ignore NVIDIA_VISIBLE_DEVICES in unprivileged "
            "containers (docs/deploy.md, GPU visibility)",
        )
    if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return SourceError(
            "driver_missing",
            "the NVIDIA kernel driver is not loaded on this node: does nvidia-smi work on the host?",
        )
    return SourceError("init", f"nvmlInit failed: {exc!r}; does nvidia-smi work in this container?")


class _DaemonWorker:
    """Runs calls one at a time, in order, on one daemon thread.

    Not a ThreadPoolExecutor: its worker threads are joined at interpreter exit, so a call hung
    in the driver would keep the process alive after SIGTERM. A daemon thread is abandoned.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)

        self._calls.put(call)
        return future

    def stop(self) -> None:
        """End the thread once the call in progress, if any, returns; never waits for it."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            call()


class _XidWatcher:
    """Waits on one NVML event set on a daemon thread and reports each Xid critical error."""

    def __init__(
        self,
        nvml: Any,
        event_set: Any,
        devices: dict[Hashable, int],
        record: Callable[[int, int], None],
        wait_ms: int,
    ) -> None:
        self.event_set = event_set
        self._nvml = nvml
        self._devices = devices
        self._record = record
        self._wait_ms = wait_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        nvml = self._nvml
        failing: int | None = None  # the error code the waits currently fail with
        try:
            while not self._stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(self.event_set, self._wait_ms)
                except nvml.NVMLError as exc:
                    code = _code(exc)
                    if code == nvml.NVML_ERROR_TIMEOUT:
                        continue  # no event within the wait: the normal case
                    if code in _watcher_ends(nvml):
                        raise
                    # GPU_IS_LOST and the like: one GPU's trouble must not end Xid counting for
                    # the others (nor miss the next Xid), so keep waiting, a little slower.
                    if code != failing:
                        log.warning("xid event wait failed; still watching", error=repr(exc))
                        failing = code
                    self._stop.wait(WATCHER_RETRY_SECONDS)
                    continue
                if failing is not None:
                    log.info("xid event wait works again")
                    failing = None
                self._record(self._index(data.device), int(data.eventData))
        except Exception as exc:  # the session is gone: the source starts a new watcher on re-init
            if not self._stop.is_set():
                log.warning("xid event watcher stopped", error=repr(exc))

    def _index(self, handle: Any) -> int:
        index = self._devices.get(_handle_key(handle))
        if index is not None:
            return index
        try:
            return int(self._nvml.nvmlDeviceGetIndex(handle))
        except Exception:
            return -1  # the event is still counted, under an unknown GPU


class NvmlSource:
    """Every GPU on the node, read through one NVML session."""

    def __init__(
        self,
        nvml: Any | None = None,
        *,
        call_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nvml: Any = nvml  # a pynvml-like module; None: import pynvml at the first collect
        self._timeout = call_timeout
        self._clock = clock
        self._worker = _DaemonWorker("nvml")
        self._pending: concurrent.futures.Future[tuple[GpuReading, list[str]]] | None = None
        self._pending_since = 0.0
        # Everything below is touched on the worker thread only, except where noted.
        self._initialized = False
        self._init_error: SourceError | None = None
        self._init_attempt_at: float | None = None
        self._driver_version = ""
        self._identity: dict[int, tuple[str, str, int | None]] = {}  # index -> (uuid, name, minor)
        self._memory_v1_only: set[int] = set()
        self._processes_v2 = False
        self._lost: set[int] = set()
        self._nvlinks: dict[int, int] = {}  # index -> NVLink links it has (learned once)
        self._handles: dict[int, Any] = {}  # this cycle's readable GPUs, for the P2P pairs
        self._watcher: _XidWatcher | None = None
        # Written by the Xid thread, read by the worker: behind the lock.
        self._xids: Counter[tuple[int, int]] = Counter()
        self._xid_lock = threading.Lock()

    @property
    def name(self) -> str:
        return "nvml"

    async def collect(self, problems: Problems) -> GpuReading:
        if self._pending is not None and not self._pending.done():
            stuck = time.monotonic() - self._pending_since
            raise SourceError(
                "busy",
                f"the previous NVML call is still running after {stuck:.1f}s (hung driver?); "
                "not queueing another",
            )
        now = self._clock()
        # The worker is idle here, so reading its init state is safe.
        if (
            not self._initialized
            and self._init_error is not None
            and self._init_attempt_at is not None
            and now - self._init_attempt_at < INIT_RETRY_SECONDS
        ):
            raise SourceError(self._init_error.reason, self._init_error.message)
        self._pending_since = time.monotonic()
        future = self._worker.submit(self._read, now)
        self._pending = future
        try:
            reading, reasons = await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError(
                "timeout",
                f"NVML did not answer within {self._timeout:g}s (hung driver call?)",
            ) from None
        for reason in reasons:
            problems.add(reason)
        return reading

    # -- worker thread --------------------------------------------------------------------
    def _read(self, now: float) -> tuple[GpuReading, list[str]]:
        nvml = self._ensure_init(now)
        reasons: list[str] = []
        try:
            if not self._driver_version:
                self._driver_version = self._read_driver_version(nvml)
            count = int(nvml.nvmlDeviceGetCount())
            self._handles = {}
            gpus = tuple(self._read_gpu(nvml, index, reasons) for index in range(count))
            pairs = self._read_nvlink_pairs(nvml, gpus, reasons)
        except nvml.NVMLError as exc:
            if (
                _code(exc) == nvml.NVML_ERROR_UNINITIALIZED
            ):  # e.g. nvmlShutdown called elsewhere in the process
                self._initialized = False
                if self._watcher is not None:
                    self._watcher.stop()  # its event set died with the old session
                    self._watcher = None
                raise SourceError(
                    "uninitialized",
                    "NVML reports it is not initialized; initializing again on the next collect",
                ) from None
            raise SourceError("nvml", f"nvmlDeviceGetCount failed: {exc!r}") from None
        with self._xid_lock:
            xids = dict(self._xids)
        reading = GpuReading(
            timestamp=now,
            driver_version=self._driver_version,
            gpus=gpus,
            xid_totals=xids,
            nvlink_pairs=pairs,
        )
        return reading, reasons

    def _ensure_init(self, now: float) -> Any:
        if self._initialized:
            return self._nvml
        self._init_attempt_at = now
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except ImportError:
            error = SourceError(
                "library_missing",
                "the Python module pynvml is not installed: install nvidia-ml-py in the agent's environment",
            )
        except Exception as exc:
            error = _init_error(self._nvml, exc)
        else:
            self._initialized, self._init_error = True, None
            self._identity.clear()  # a new session may enumerate the GPUs differently
            self._driver_version = self._read_driver_version(self._nvml)
            log.info("nvml initialized", driver_version=self._driver_version)
            self._start_watcher(self._nvml)
            return self._nvml
        self._init_error = error
        raise SourceError(error.reason, error.message)

    def _read_driver_version(self, nvml: Any) -> str:
        try:
            return str(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            return ""  # tried again next cycle (an uninitialized NVML shows up on the GPU reads)

    def _read_gpu(self, nvml: Any, index: int, reasons: list[str]) -> GpuSample:
        uuid, name, minor = self._identity.get(index, ("", "", None))
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if index not in self._identity:  # identity never changes while the GPU is there
                uuid = str(nvml.nvmlDeviceGetUUID(handle))
                name = str(nvml.nvmlDeviceGetName(handle))
                minor = self._minor(nvml, handle)
                self._identity[index] = (uuid, name, minor)
            sample = self._read_fields(nvml, index, handle, uuid, name, reasons)
            sample = replace(sample, minor=minor)
        except nvml.NVMLError as exc:
            code = _code(exc)
            if code == nvml.NVML_ERROR_UNINITIALIZED:
                raise
            if code not in _gpu_gone(nvml):
                reasons.append("gpu_read")  # no handle or identity: nothing to report it under
                return GpuSample(index=index, uuid=uuid, name=name, up=False)
            reasons.append("gpu_lost")
            if index not in self._lost:
                self._lost.add(index)
                log.warning("gpu lost", gpu=index, uuid=uuid, error=repr(exc))
            return GpuSample(index=index, uuid=uuid, name=name, up=False)
        if index in self._lost:
            self._lost.discard(index)
            log.info("gpu back", gpu=index, uuid=uuid)
        return sample

    def _read_fields(
        self, nvml: Any, index: int, handle: Any, uuid: str, name: str, reasons: list[str]
    ) -> GpuSample:
        def field(read: Callable[[], Any]) -> Any:
            try:
                return read()
            except nvml.NVMLError as exc:
                code = _code(exc)
                if code == nvml.NVML_ERROR_UNINITIALIZED or code in _gpu_gone(nvml):
                    raise  # the whole GPU (or NVML) is gone, not just this field
                if code not in _absent(nvml):
                    reasons.append("gpu_read")
                return None

        utilization = field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        memory = field(lambda: self._memory(nvml, index, handle))
        temperature = field(
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        )
        power = field(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # mW
        processes = field(lambda: self._processes(nvml, handle)) or []
        mig_uuids = field(lambda: self._mig_uuids(nvml, handle)) or ()
        link = self._read_link(nvml, index, handle, field)
        self._handles[index] = handle
        used, total = memory if memory is not None else (None, None)
        return GpuSample(
            index=index,
            uuid=uuid,
            name=name,
            up=True,
            utilization_ratio=utilization,
            memory_used_bytes=used,
            memory_total_bytes=total,
            temperature_celsius=temperature,
            power_watts=power,
            pids=tuple(sorted({int(p.pid) for p in processes})),
            mig_uuids=mig_uuids,
            link=link,
        )

    @staticmethod
    def _minor(nvml: Any, handle: Any) -> int | None:
        """/dev/nvidia<minor>: NVIDIA's DRA driver names the GPU gpu-<minor> (pod-resources)."""
        try:
            return int(nvml.nvmlDeviceGetMinorNumber(handle))
        except nvml.NVMLError as exc:
            if _code(exc) in _gpu_gone(nvml) or _code(exc) == nvml.NVML_ERROR_UNINITIALIZED:
                raise
            return None  # DRA devices then match by NVML index

    @staticmethod
    def _mig_uuids(nvml: Any, handle: Any) -> tuple[str, ...]:
        """The UUIDs of the GPU's MIG devices (the device plugin allocates MIG-<uuid>)."""
        uuids = []
        for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError as exc:
                if _code(exc) in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_INVALID_ARGUMENT):
                    continue  # an empty slot, or MIG mode off
                raise
            uuids.append(str(nvml.nvmlDeviceGetUUID(mig)))
        return tuple(uuids)

    # -- topology: NVLink and PCIe --------------------------------------------------------
    def _read_link(
        self, nvml: Any, index: int, handle: Any, field: Callable[[Callable[[], Any]], Any]
    ) -> GpuLink:
        up = field(lambda: self._nvlinks_up(nvml, index, handle))
        transmit = receive = None
        if up:
            totals = field(lambda: self._nvlink_bytes(nvml, index, handle))
            if totals is not None:
                transmit, receive = totals
        return GpuLink(
            nvlink_links_up=up,
            nvlink_transmit_bytes=transmit,
            nvlink_receive_bytes=receive,
            pcie_generation=field(lambda: int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))),
            pcie_max_generation=field(lambda: int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))),
            pcie_width=field(lambda: int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))),
            pcie_max_width=field(lambda: int(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle))),
        )

    def _nvlinks_up(self, nvml: Any, index: int, handle: Any) -> int:
        """Active NVLink links. The first read walks links 0..NVML_NVLINK_MAX_LINKS-1 until NVML
        refuses a link (NOT_SUPPORTED or INVALID_ARGUMENT: past the GPU's last link; at link 0:
        no NVLink at all) and remembers the count; later cycles read only those links."""
        known = self._nvlinks.get(index)
        limit = known if known is not None else int(nvml.NVML_NVLINK_MAX_LINKS)
        up = 0
        for link in range(limit):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(handle, link)
            except nvml.NVMLError as exc:
                if known is None and _code(exc) in (
                    nvml.NVML_ERROR_NOT_SUPPORTED,
                    nvml.NVML_ERROR_INVALID_ARGUMENT,
                ):
                    self._nvlinks[index] = link
                    return up
                raise
            if state == nvml.NVML_FEATURE_ENABLED:
                up += 1
        self._nvlinks[index] = limit
        return up

    def _nvlink_bytes(self, nvml: Any, index: int, handle: Any) -> tuple[float, float] | None:
        """NVLink data bytes sent and received, summed over the GPU's links (one call)."""
        links = range(self._nvlinks.get(index, 0))
        tx, rx = (
            nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
            nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
        )
        values = nvml.nvmlDeviceGetFieldValues(
            handle, [(tx, link) for link in links] + [(rx, link) for link in links]
        )
        totals = {tx: 0.0, rx: 0.0}
        read = 0
        for value in values:
            if value.nvmlReturn != nvml.NVML_SUCCESS:
                continue  # a link without the counter (down, or an older driver)
            totals[value.fieldId] += float(value.value.ullVal) * 1024  # KiB
            read += 1
        return (totals[tx], totals[rx]) if read else None

    def _read_nvlink_pairs(
        self, nvml: Any, gpus: tuple[GpuSample, ...], reasons: list[str]
    ) -> dict[tuple[int, int], bool]:
        """NVLink P2P status of every pair of readable GPUs (NVML_P2P_CAPS_INDEX_NVLINK)."""
        pairs: dict[tuple[int, int], bool] = {}
        indexes = sorted(self._handles)
        for i, first in enumerate(indexes):
            for second in indexes[i + 1 :]:
                try:
                    status = nvml.nvmlDeviceGetP2PStatus(
                        self._handles[first],
                        self._handles[second],
                        nvml.NVML_P2P_CAPS_INDEX_NVLINK,
                    )
                except nvml.NVMLError as exc:
                    code = _code(exc)
                    if code == nvml.NVML_ERROR_UNINITIALIZED:
                        raise
                    if code not in _absent(nvml) and code not in _gpu_gone(nvml):
                        reasons.append("gpu_read")
                    continue
                pairs[(first, second)] = status == nvml.NVML_P2P_STATUS_OK
        return pairs

    def _memory(self, nvml: Any, index: int, handle: Any) -> tuple[float, float]:
        # v2 "used" excludes the driver-reserved memory: what the workloads really hold.
        if index not in self._memory_v1_only:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return float(info.used), float(info.total)
            except nvml.NVMLError as exc:
                if _code(exc) not in _no_memory_v2(nvml):
                    raise
                self._memory_v1_only.add(index)  # remembered: not asked again every cycle
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return float(info.used), float(info.total)

    def _processes(self, nvml: Any, handle: Any) -> Any:
        # The plain call reads the v3 struct. With a driver that lacks it, newer nvidia-ml-py
        # raises NVMLLibraryMismatchError (not an NVMLError) and offers _v2: use that from then
        # on. nvidia-ml-py 12.535 has neither; it raises FUNCTION_NOT_FOUND (an absent field).
        if self._processes_v2:
            return nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
        try:
            return nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except getattr(nvml, "NVMLLibraryMismatchError", ()):
            self._processes_v2 = True
        return nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)

    # -- Xid events -----------------------------------------------------------------------
    def _start_watcher(self, nvml: Any) -> None:
        devices: dict[Hashable, int] = {}
        skipped: dict[int, str] = {}
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.info("xid events unavailable", error=repr(exc))
            return
        try:
            for index in range(int(nvml.nvmlDeviceGetCount())):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    nvml.nvmlDeviceRegisterEvents(
                        handle, nvml.nvmlEventTypeXidCriticalError, event_set
                    )
                    devices[_handle_key(handle)] = index
                except nvml.NVMLError as exc:
                    if (
                        _code(exc) != nvml.NVML_ERROR_NOT_SUPPORTED
                    ):  # unsupported: quietly no events from it
                        skipped[index] = repr(exc)
            if skipped:
                log.info("xid events not watched on some gpus", gpus=skipped)
            if not devices:
                nvml.nvmlEventSetFree(event_set)
                return
        except Exception as exc:
            log.info("xid events unavailable", error=repr(exc))
            return
        self._watcher = _XidWatcher(nvml, event_set, devices, self._record_xid, EVENT_WAIT_MS)
        self._watcher.start()

    def _record_xid(self, index: int, xid: int) -> None:  # on the Xid thread
        with self._xid_lock:
            self._xids[(index, xid)] += 1
        log.warning("xid event", gpu=index, xid=xid)  # rare, and the reason a GPU misbehaves

    # -- closing --------------------------------------------------------------------------
    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            await asyncio.to_thread(watcher.join, 2 * EVENT_WAIT_MS / 1000)
        # Shut NVML down on the worker, and only when no thread is inside NVML: a hung call owns
        # the library, and freeing the event set under a running wait would be a use-after-free.
        worker_idle = self._pending is None or self._pending.done()
        watcher_done = watcher is None or not watcher.is_alive()
        if self._initialized and worker_idle and watcher_done:
            event_set = watcher.event_set if watcher is not None else None
            future = self._worker.submit(self._shutdown, event_set)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
            except Exception as exc:  # closing: nothing left to protect
                log.debug("nvml shutdown failed", error=repr(exc))
        self._worker.stop()

    def _shutdown(self, event_set: Any) -> None:
        nvml, self._initialized = self._nvml, False
        try:
            if event_set is not None:
                nvml.nvmlEventSetFree(event_set)
        finally:
            nvml.nvmlShutdown()
