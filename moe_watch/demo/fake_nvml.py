"""A fake ``pynvml`` module: simulated GPUs that fail the way real ones do.

Used by the tests and by ``moe-watch demo`` on machines without a GPU. It raises the *real*
``pynvml.NVMLError`` classes with the real codes (``pynvml.NVMLError(15)`` is an
``NVMLError_GpuIsLost``), exposes the real constants, refuses calls before ``nvmlInit`` like the
library, returns objects with the real field names (those of pynvml's ctypes structs), delivers
Xid events through an event set with the real wait-and-time-out semantics, and can hang a call
like a wedged driver.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"

# Attribute names the fake takes from the real module: error classes and constants.
_REAL_PREFIXES = ("NVML", "nvmlMemory", "nvmlEventType")


@dataclass
class FakeGpu:
    """One simulated GPU; every field may be changed while the agent runs.

    ``unsupported`` and ``errors`` name calls: "handle", "uuid", "name", "utilization",
    "memory" (v1), "memory_v2", "temperature", "power", "processes", "events", "nvlink"
    (link state), "nvlink_counters" (the throughput field values), "pcie", "p2p".

    Topology: ``nvlinks`` is the state of each NVLink link (an H100 SXM has 18, all active;
    ``[]`` is a GPU without NVLink, e.g. a PCIe card or a consumer GPU, where NVML answers
    NOT_SUPPORTED); ``nvlink_peers`` lists the GPUs it reaches over NVLink (None: every other GPU
    with an active link, as behind an NVSwitch); the NVLink counters are cumulative KiB, split
    evenly over the active links.
    """

    index: int
    uuid: str = ""  # "" -> a stable uuid4-looking one derived from the index
    name: str = H100
    memory_total_bytes: int = 80 * GIB
    memory_used_bytes: int = 60 * GIB
    memory_reserved_bytes: int = 512 * 1024**2  # v1 "used" includes it, v2 "used" does not
    utilization_percent: int = 50  # 0..100
    temperature_c: int = 55
    power_mw: int = 350_000
    pids: list[int] = field(default_factory=list)
    minor: int | None = None  # /dev/nvidia<minor>; None -> the index
    mig_uuids: list[str] = field(default_factory=list)  # MIG devices (MIG mode on when not empty)
    lost: bool = False  # every call on it raises GPU_IS_LOST (fell off the bus)
    unsupported: set[str] = field(default_factory=set)  # these calls raise NOT_SUPPORTED
    errors: dict[str, int] = field(default_factory=dict)  # call -> NVML return code it raises
    nvlinks: list[bool] = field(default_factory=lambda: [True] * 18)
    nvlink_peers: set[int] | None = None
    nvlink_tx_kib: int = 0
    nvlink_rx_kib: int = 0
    pcie_generation: int = 5
    pcie_max_generation: int = 5
    pcie_width: int = 16
    pcie_max_width: int = 16

    def pcie_only(self) -> FakeGpu:
        """Make this a GPU without NVLink (a PCIe card): returns self."""
        self.nvlinks = []
        self.nvlink_peers = set()
        return self

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = f"GPU-00000000-0000-4000-8000-{self.index:012d}"


@dataclass(frozen=True)
class _Handle:
    index: int
    mig_slot: int | None = None  # a MIG device handle of the GPU


class _EventSet:
    def __init__(self) -> None:
        self.registered: set[int] = set()
        self.freed = False


class FakeNvml:
    """Behaves like the ``pynvml`` module for the calls moe-watch makes.

    Knobs (all settable at any time): ``gpus``, ``library_missing`` (nvmlInit raises
    LIBRARY_NOT_FOUND), ``driver_missing`` (DRIVER_NOT_LOADED), ``hang()``/``release()``,
    ``initialized`` (set False and calls raise UNINITIALIZED, as after an nvmlShutdown
    elsewhere in the process), ``processes_v3_missing`` (the plain process call raises
    NVMLLibraryMismatchError, as nvidia-ml-py does with a driver that lacks the v3 call) and
    ``inject_xid()`` and ``event_wait_error`` (every nvmlEventSetWait fails with that code, as
    after a GPU fell off the bus). ``calls`` counts what the code under test called, per function name.
    """

    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: str = "570.133.20",
        library_missing: bool = False,
        driver_missing: bool = False,
        processes_v3_missing: bool = False,
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.library_missing = library_missing
        self.driver_missing = driver_missing
        self.processes_v3_missing = processes_v3_missing
        self.calls: Counter[str] = Counter()
        self._calls_changed = threading.Condition()  # the worker and the Xid thread both call in
        self.initialized = False
        self.hang_seconds = 0.0
        self._unhang = threading.Event()
        self._events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.event_wait_error: int | None = None  # an NVML code every event wait fails with

    @classmethod
    def with_gpus(cls, count: int, **kwargs: Any) -> FakeNvml:
        """``count`` H100-like GPUs, indexes 0..count-1."""
        return cls([FakeGpu(index) for index in range(count)], **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Constants and error classes come from the real library, so code under test cannot
        # tell the difference (NVML_TEMPERATURE_GPU, nvmlMemory_v2, NVMLError_GpuIsLost, ...).
        if name.startswith(_REAL_PREFIXES):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvml has no {name!r}")

    # -- knobs ----------------------------------------------------------------------------
    def hang(self, seconds: float) -> None:
        """Block every device call for ``seconds`` (a wedged driver) until ``release()``."""
        self._unhang.clear()
        self.hang_seconds = seconds

    def release(self) -> None:
        """End a hang: calls blocked now return at once, later ones do not block."""
        self.hang_seconds = 0.0
        self._unhang.set()

    def inject_xid(self, gpu_index: int, xid: int) -> None:
        """An Xid critical error that an in-progress or the next event-set wait returns."""
        self._events.put((gpu_index, xid))

    # -- library --------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        if self.library_missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.driver_missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        self._maybe_hang()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpu(_Handle(index), "handle")
        return _Handle(index)

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetIndex")
        return self._gpu(handle, None).index

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetUUID")
        gpu = self._gpu(handle, "uuid")
        return gpu.uuid if handle.mig_slot is None else gpu.mig_uuids[handle.mig_slot]

    def nvmlDeviceGetMinorNumber(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetMinorNumber")
        gpu = self._gpu(handle, "minor")
        return gpu.index if gpu.minor is None else gpu.minor

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        if not self._gpu(handle, "mig").mig_uuids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # not MIG capable / off
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, slot: int) -> _Handle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        if slot >= len(self._gpu(handle, "mig").mig_uuids):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return _Handle(handle.index, slot)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle, "name").name

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        self._enter("nvmlDeviceGetUtilizationRates")
        gpu = self._gpu(handle, "utilization")
        return SimpleNamespace(gpu=gpu.utilization_percent, memory=gpu.utilization_percent // 2)

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> SimpleNamespace:
        # Like pynvml: a falsy version calls v1 (c_nvmlMemory_t), any other v2 (c_nvmlMemory_v2_t).
        if not version:
            self._enter("nvmlDeviceGetMemoryInfo")
            gpu = self._gpu(handle, "memory")
            used = gpu.memory_used_bytes + gpu.memory_reserved_bytes
            return SimpleNamespace(
                total=gpu.memory_total_bytes, free=gpu.memory_total_bytes - used, used=used
            )
        self._enter("nvmlDeviceGetMemoryInfo_v2")
        gpu = self._gpu(handle, "memory_v2")
        used, reserved = gpu.memory_used_bytes, gpu.memory_reserved_bytes
        return SimpleNamespace(
            version=version,
            total=gpu.memory_total_bytes,
            reserved=reserved,
            free=gpu.memory_total_bytes - used - reserved,
            used=used,
        )

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        gpu = self._gpu(handle, "temperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        return self._gpu(handle, "power").power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        if self.processes_v3_missing:  # what pynvml's throwOnVersionMismatch raises
            raise pynvml.NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML "
                "lib version."
            )
        return self._processes(handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle) -> list[SimpleNamespace]:
        self._enter("nvmlDeviceGetComputeRunningProcesses_v2")
        return self._processes(handle)

    # -- topology -------------------------------------------------------------------------
    def nvmlDeviceGetNvLinkState(self, handle: _Handle, link: int) -> int:
        """NVML_FEATURE_ENABLED/DISABLED; NOT_SUPPORTED without NVLink; INVALID_ARGUMENT past
        the GPU's last link (as the driver answers a link index it does not have)."""
        self._enter("nvmlDeviceGetNvLinkState")
        gpu = self._gpu(handle, "nvlink")
        if not gpu.nvlinks:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < min(len(gpu.nvlinks), pynvml.NVML_NVLINK_MAX_LINKS):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(
            pynvml.NVML_FEATURE_ENABLED if gpu.nvlinks[link] else pynvml.NVML_FEATURE_DISABLED
        )

    def nvmlDeviceGetFieldValues(self, handle: _Handle, fieldIds: list[Any]) -> list[Any]:
        """Like pynvml: ids or (fieldId, scopeId) pairs in; one value struct per id out, each
        with its own ``nvmlReturn`` (the call succeeds while single fields fail)."""
        self._enter("nvmlDeviceGetFieldValues")
        gpu = self._gpu(handle, None)
        up = [link for link, active in enumerate(gpu.nvlinks) if active]
        counters = {
            pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: gpu.nvlink_tx_kib,
            pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: gpu.nvlink_rx_kib,
        }
        values = []
        for requested in fieldIds:
            field_id, scope = requested if isinstance(requested, tuple) else (requested, 0)
            ok = (
                field_id in counters
                and "nvlink_counters" not in gpu.unsupported
                and 0 <= scope < len(gpu.nvlinks)
            )
            total = counters.get(field_id, 0)
            share = total // len(up) if up and scope in up else 0
            values.append(
                SimpleNamespace(
                    fieldId=field_id,
                    scopeId=scope,
                    timestamp=0,
                    latencyUsec=0,
                    valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                    nvmlReturn=pynvml.NVML_SUCCESS if ok else pynvml.NVML_ERROR_NOT_SUPPORTED,
                    value=SimpleNamespace(ullVal=share if ok else 0),
                )
            )
        return values

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetCurrPcieLinkGeneration")
        return self._gpu(handle, "pcie").pcie_generation

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetMaxPcieLinkGeneration")
        return self._gpu(handle, "pcie").pcie_max_generation

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetCurrPcieLinkWidth")
        return self._gpu(handle, "pcie").pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetMaxPcieLinkWidth")
        return self._gpu(handle, "pcie").pcie_max_width

    def nvmlDeviceGetP2PStatus(self, device1: _Handle, device2: _Handle, p2pIndex: int) -> int:
        """An NVML_P2P_STATUS_* value (a status, not an error, when P2P is not possible)."""
        self._enter("nvmlDeviceGetP2PStatus")
        first, second = self._gpu(device1, "p2p"), self._gpu(device2, "p2p")
        if first.index == second.index or not 0 <= p2pIndex < pynvml.NVML_P2P_CAPS_INDEX_UNKNOWN:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if p2pIndex != pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            return int(pynvml.NVML_P2P_STATUS_OK)  # PCIe P2P: assumed possible
        if self._nvlinked(first, second) and self._nvlinked(second, first):
            return int(pynvml.NVML_P2P_STATUS_OK)
        return int(pynvml.NVML_P2P_STATUS_NOT_SUPPORTED)

    @staticmethod
    def _nvlinked(gpu: FakeGpu, other: FakeGpu) -> bool:
        if not any(gpu.nvlinks):
            return False
        return other.index in gpu.nvlink_peers if gpu.nvlink_peers is not None else True

    # -- events ---------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> _EventSet:
        self._enter("nvmlEventSetCreate")
        return _EventSet()

    def nvmlDeviceRegisterEvents(
        self, handle: _Handle, event_types: int, event_set: _EventSet
    ) -> None:
        self._enter("nvmlDeviceRegisterEvents")
        gpu = self._gpu(handle, "events")
        if event_set.freed:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if event_types & pynvml.nvmlEventTypeXidCriticalError:
            event_set.registered.add(gpu.index)

    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeoutms: int) -> SimpleNamespace:
        """The next Xid of a registered GPU, or pynvml.NVML_ERROR_TIMEOUT after ``timeoutms``."""
        self._enter("nvmlEventSetWait_v2")
        if event_set.freed:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.event_wait_error is not None:
            raise pynvml.NVMLError(self.event_wait_error)
        deadline = time.monotonic() + timeoutms / 1000
        while True:
            try:
                index, xid = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
            if index in event_set.registered:  # a GPU not registered sends nothing here
                return SimpleNamespace(
                    device=_Handle(index),
                    eventType=pynvml.nvmlEventTypeXidCriticalError,
                    eventData=xid,
                    gpuInstanceId=0xFFFFFFFF,  # not a MIG instance
                    computeInstanceId=0xFFFFFFFF,
                )

    def nvmlEventSetFree(self, event_set: _EventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.freed = True

    # -- helpers --------------------------------------------------------------------------
    def wait_for_calls(self, call: str, count: int, timeout: float) -> bool:
        """Block until ``call`` has been made ``count`` times in all; False after ``timeout``."""
        with self._calls_changed:
            return self._calls_changed.wait_for(lambda: self.calls[call] >= count, timeout)

    def _count(self, call: str) -> None:
        with self._calls_changed:
            self.calls[call] += 1
            self._calls_changed.notify_all()

    def _enter(self, call: str) -> None:
        self._count(call)
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _maybe_hang(self) -> None:
        if self.hang_seconds > 0:
            self._unhang.wait(self.hang_seconds)

    def _processes(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "processes")
        return [
            SimpleNamespace(
                pid=pid, usedGpuMemory=GIB, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF
            )
            for pid in gpu.pids
        ]

    def _gpu(self, handle: _Handle, call: str | None) -> FakeGpu:
        self._maybe_hang()
        if handle.index >= len(self.gpus):  # taken out of the list: gone from the bus
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call is not None and call in gpu.errors:
            raise pynvml.NVMLError(gpu.errors[call])
        if call is not None and call in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu
