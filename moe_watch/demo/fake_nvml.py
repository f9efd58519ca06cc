"""A fake ``pynvml`` module: simulated GPUs that fail the way real ones do.

Used by the tests and by ``moe-watch demo`` on machines without a GPU. It raises the *real*
``pynvml.NVMLError`` classes with the real codes (``pynvml.NVMLError(15)`` is an
``NVMLError_GpuIsLost``), refuses calls before ``nvmlInit`` like the library, returns objects
with the real field names, and can hang a call like a wedged driver.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


@dataclass
class FakeGpu:
    """One simulated GPU; every field may be changed while the agent runs."""

    index: int
    uuid: str = ""
    name: str = H100
    memory_total_bytes: int = 80 * GIB
    memory_used_bytes: int = 60 * GIB
    memory_reserved_bytes: int = 512 * 1024**2  # v1 "used" includes it, v2 "used" does not
    utilization_percent: int = 50
    temperature_c: int = 55
    power_mw: int = 350_000
    pids: list[int] = field(default_factory=list)
    lost: bool = False  # every call raises GPU_IS_LOST (fell off the bus)
    # Fields this GPU/driver does not support: "power", "temperature", "memory_v2",
    # "processes", "utilization", "events".
    unsupported: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = f"GPU-00000000-0000-4000-8000-{self.index:012d}"


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """Behaves like the ``pynvml`` module for the calls moe-watch makes."""

    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: str = "570.133.20",
        library_missing: bool = False,
        driver_missing: bool = False,
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.library_missing = library_missing
        self.driver_missing = driver_missing
        self.hang_seconds = 0.0
        self.init_calls = 0
        self.initialized = False
        self._unhang = threading.Event()
        self._events: queue.Queue[tuple[int, int]] = queue.Queue()

    @classmethod
    def with_gpus(cls, count: int, **kwargs: Any) -> FakeNvml:
        return cls([FakeGpu(index) for index in range(count)], **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Constants and error classes come from the real library, so code under test cannot
        # tell the difference (NVML_TEMPERATURE_GPU, nvmlMemory_v2, NVMLError_GpuIsLost, ...).
        if name.startswith(("NVML", "nvmlMemory", "nvmlEventType", "nvmlClocksThrottle")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvml has no {name!r}")

    # -- knobs ----------------------------------------------------------------------------
    def hang(self, seconds: float) -> None:
        """Block every device call for ``seconds`` (a wedged driver) until ``release()``."""
        self._unhang.clear()
        self.hang_seconds = seconds

    def release(self) -> None:
        self.hang_seconds = 0.0
        self._unhang.set()

    def inject_xid(self, gpu_index: int, xid: int) -> None:
        """An Xid critical error that the next ``nvmlEventSetWait_v2`` returns."""
        self._events.put((gpu_index, xid))

    # -- library --------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.library_missing:
            raise pynvml.NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.driver_missing:
            raise pynvml.NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._gpu(_Handle(index), None)
        return _Handle(index)

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        return self._gpu(handle, None).index

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._gpu(handle, None).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle, None).name

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu(handle, "utilization")
        return SimpleNamespace(gpu=gpu.utilization_percent, memory=gpu.utilization_percent // 2)

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> SimpleNamespace:
        gpu = self._gpu(handle, "memory_v2" if version else None)
        if version:
            used, reserved = gpu.memory_used_bytes, gpu.memory_reserved_bytes
            free = gpu.memory_total_bytes - used - reserved
            return SimpleNamespace(
                version=version,
                total=gpu.memory_total_bytes,
                reserved=reserved,
                free=free,
                used=used,
            )
        used = gpu.memory_used_bytes + gpu.memory_reserved_bytes
        return SimpleNamespace(
            total=gpu.memory_total_bytes, free=gpu.memory_total_bytes - used, used=used
        )

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        return self._gpu(handle, "temperature").temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._gpu(handle, "power").power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=GIB) for pid in gpu.pids]

    # -- events ---------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> object:
        self._check_init()
        return object()

    def nvmlDeviceRegisterEvents(
        self, handle: _Handle, event_types: int, event_set: object
    ) -> None:
        self._gpu(handle, "events")

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        self._check_init()
        try:
            index, xid = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(
            device=_Handle(index), eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid
        )

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._check_init()

    # -- helpers --------------------------------------------------------------------------
    def _check_init(self) -> None:
        if not self.initialized:
            raise pynvml.NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: _Handle, feature: str | None) -> FakeGpu:
        self._check_init()
        if self.hang_seconds > 0:
            self._unhang.wait(self.hang_seconds)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise pynvml.NVMLError(NVML_ERROR_GPU_IS_LOST)
        if feature is not None and feature in gpu.unsupported:
            raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu
