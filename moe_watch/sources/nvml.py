"""GPUs through NVML (nvidia-ml-py): utilization, memory, temperature, power, PIDs, Xid events.

NVML calls block, and a wedged driver can block for a long time, so every read runs on one
dedicated worker thread, bounded by ``call_timeout``; while a call is stuck the source answers
"busy" instead of piling up more threads. ``nvmlInit`` runs once (retried at most every
``INIT_RETRY_SECONDS`` when the driver is missing). A lost GPU is reported with ``up=False``
while the others keep reporting. Xid critical errors arrive on an event set, read by a
daemon thread of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from moe_watch.samples import GpuReading, GpuSample
from moe_watch.sources.base import Problems, SourceError

log = structlog.get_logger("moe_watch.nvml")

INIT_RETRY_SECONDS = 30.0
EVENT_WAIT_MS = 500

# NVML return codes (nvml.h) this source tells apart.
UNINITIALIZED, NOT_SUPPORTED, DRIVER_NOT_LOADED, TIMEOUT = 1, 3, 9, 10
LIBRARY_NOT_FOUND, FUNCTION_NOT_FOUND, GPU_IS_LOST = 12, 13, 15
ARGUMENT_VERSION_MISMATCH, UNKNOWN = 25, 999


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


class NvmlSource:
    def __init__(
        self,
        nvml: Any | None = None,
        *,
        call_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nvml: Any = nvml
        self._timeout = call_timeout
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nvml"
        )
        self._pending: concurrent.futures.Future[tuple[GpuReading, list[str]]] | None = None
        self._initialized = False
        self._init_failed_at: float | None = None
        self._init_error: SourceError | None = None
        self._driver_version = ""
        self._identity: dict[int, tuple[str, str]] = {}
        self._memory_v2 = True
        self._lost: set[int] = set()
        self._xids: Counter[tuple[int, int]] = Counter()
        self._xid_lock = threading.Lock()
        self._events_stop = threading.Event()
        self._events_thread: threading.Thread | None = None
        self._event_set: Any = None

    @property
    def name(self) -> str:
        return "nvml"

    async def collect(self, problems: Problems) -> GpuReading:
        if self._pending is not None and not self._pending.done():
            raise SourceError(
                "busy",
                f"the previous NVML call is still running after {self._timeout:g}s (hung driver?)",
            )
        now = self._clock()
        future = self._executor.submit(self._read, now)
        self._pending = future
        try:
            reading, reasons = await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError("timeout", f"NVML did not answer within {self._timeout:g}s") from None
        for reason in reasons:
            problems.add(reason)
        return reading

    # -- worker thread --------------------------------------------------------------------
    def _read(self, now: float) -> tuple[GpuReading, list[str]]:
        nvml = self._ensure_init(now)
        reasons: list[str] = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise self._whole_failure(exc) from None
        gpus = tuple(self._read_gpu(nvml, index, reasons) for index in range(count))
        with self._xid_lock:
            xids = dict(self._xids)
        return GpuReading(
            timestamp=now, driver_version=self._driver_version, gpus=gpus, xid_totals=xids
        ), reasons

    def _ensure_init(self, now: float) -> Any:
        if self._initialized:
            return self._nvml
        if self._init_failed_at is not None and now - self._init_failed_at < INIT_RETRY_SECONDS:
            assert self._init_error is not None
            raise self._init_error
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._driver_version = _text(self._nvml.nvmlSystemGetDriverVersion())
        except ImportError:
            self._fail_init(
                now,
                SourceError("library_missing", "the pynvml module (nvidia-ml-py) is not installed"),
            )
        except Exception as exc:
            code = _code(exc)
            if code == LIBRARY_NOT_FOUND:
                error = SourceError(
                    "library_missing",
                    "libnvidia-ml.so not found: is the NVIDIA driver installed and the container started with the nvidia runtime (NVIDIA_VISIBLE_DEVICES, runtimeClassName: nvidia)?",
                )
            elif code == DRIVER_NOT_LOADED:
                error = SourceError(
                    "driver_missing",
                    "the NVIDIA kernel driver is not loaded on this node (nvidia-smi fails too?)",
                )
            else:
                error = SourceError("init", f"nvmlInit failed: {exc}")
            self._fail_init(now, error)
        self._initialized, self._init_failed_at = True, None
        log.info("nvml initialized", driver_version=self._driver_version)
        self._start_events()
        return self._nvml

    def _fail_init(self, now: float, error: SourceError) -> None:
        self._init_failed_at, self._init_error = now, error
        raise error

    def _whole_failure(self, exc: BaseException) -> SourceError:
        if _code(exc) == UNINITIALIZED:  # the driver was reloaded: init again next cycle
            self._initialized = False
            return SourceError(
                "uninitialized", "NVML is no longer initialized (driver reloaded?); re-initializing"
            )
        return SourceError("nvml", f"nvmlDeviceGetCount failed: {exc}")

    def _read_gpu(self, nvml: Any, index: int, reasons: list[str]) -> GpuSample:
        uuid, name = self._identity.get(index, ("", ""))
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if index not in self._identity:
                uuid, name = (
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                )
                self._identity[index] = (uuid, name)

            def field(read: Callable[[], Any]) -> Any:
                try:
                    return read()
                except nvml.NVMLError as exc:
                    if _code(exc) in (GPU_IS_LOST, UNKNOWN):
                        raise
                    if _code(exc) != NOT_SUPPORTED:
                        reasons.append("gpu_read")
                    return None

            utilization = field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            memory = field(lambda: self._memory(nvml, handle))
            temperature = field(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            )
            power = field(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            processes = field(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        except nvml.NVMLError as exc:
            if _code(exc) not in (GPU_IS_LOST, UNKNOWN):
                reasons.append("gpu_read")
                return GpuSample(index=index, uuid=uuid, name=name, up=False)
            reasons.append("gpu_lost")
            if index not in self._lost:
                self._lost.add(index)
                log.warning("gpu lost", gpu=index, uuid=uuid, error=str(exc))
            return GpuSample(index=index, uuid=uuid, name=name, up=False)
        if index in self._lost:
            self._lost.discard(index)
            log.info("gpu back", gpu=index, uuid=uuid)
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
        )

    def _memory(self, nvml: Any, handle: Any) -> tuple[float, float]:
        # v2 "used" excludes driver-reserved memory: what the workload really holds.
        if self._memory_v2:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return float(info.used), float(info.total)
            except nvml.NVMLError as exc:
                if _code(exc) not in (NOT_SUPPORTED, FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH):
                    raise
                self._memory_v2 = False  # old driver: v1 from now on
            except TypeError:
                self._memory_v2 = False
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return float(info.used), float(info.total)

    # -- Xid events -----------------------------------------------------------------------
    def _start_events(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
            registered = 0
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    nvml.nvmlDeviceRegisterEvents(
                        handle, nvml.nvmlEventTypeXidCriticalError, event_set
                    )
                    registered += 1
                except nvml.NVMLError:
                    continue  # not supported on this GPU (or lost): no Xid events from it
        except Exception as exc:
            log.info("xid events unavailable", error=str(exc))
            return
        if not registered:
            nvml.nvmlEventSetFree(event_set)
            return
        self._event_set = event_set
        self._events_stop.clear()
        self._events_thread = threading.Thread(
            target=self._watch_events, name="nvml-xid", daemon=True
        )
        self._events_thread.start()

    def _watch_events(self) -> None:
        nvml = self._nvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        while not self._events_stop.is_set():
            try:
                data = wait(self._event_set, EVENT_WAIT_MS)
            except Exception as exc:
                if _code(exc) == TIMEOUT:
                    continue  # no event within the wait: the normal case
                if not self._events_stop.is_set():
                    log.warning("xid event watcher stopped", error=str(exc))
                return
            try:
                index = int(nvml.nvmlDeviceGetIndex(data.device))
            except Exception:
                index = -1
            xid = int(data.eventData)
            with self._xid_lock:
                self._xids[(index, xid)] += 1
            log.warning("xid event", gpu=index, xid=xid)

    async def close(self) -> None:
        self._events_stop.set()
        if self._events_thread is not None:
            await asyncio.to_thread(self._events_thread.join, EVENT_WAIT_MS / 1000 * 2)
        if self._initialized and (self._pending is None or self._pending.done()):
            try:
                if self._event_set is not None:
                    self._nvml.nvmlEventSetFree(self._event_set)
                self._nvml.nvmlShutdown()
            except Exception as exc:  # shutting down: nothing left to protect
                log.debug("nvml shutdown failed", error=str(exc))
            self._initialized = False
        self._executor.shutdown(wait=False, cancel_futures=True)  # a hung call must not block exit


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
