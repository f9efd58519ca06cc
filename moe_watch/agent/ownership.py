"""Which engine owns each GPU, from what the cycle already read (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_watch.samples import GpuSample, ProcessInfo
from moe_watch.sources.podresources import Allocation, DeviceOwner


def gpu_allocations(
    gpus: Sequence[GpuSample], allocations: Sequence[Allocation]
) -> dict[int, tuple[Allocation, ...]]:
    """GPU index -> the kubelet's allocations on it (a whole GPU, time-slice replicas, MIG
    devices, DRA devices), matched by GPU UUID, MIG UUID (NVML lists each GPU's) or, for DRA, the
    device's minor number (where NVML reports no minor for any GPU, the NVML index stands in)."""
    found: dict[int, list[Allocation]] = {}
    no_minors = all(gpu.minor is None for gpu in gpus)
    for gpu in gpus:
        minor = gpu.index if no_minors else gpu.minor
        for allocation in allocations:
            if (
                (allocation.gpu_uuid is not None and allocation.gpu_uuid == gpu.uuid)
                or (allocation.mig_uuid is not None and allocation.mig_uuid in gpu.mig_uuids)
                or (allocation.minor is not None and allocation.minor == minor)
            ):
                found.setdefault(gpu.index, []).append(allocation)
    return {index: tuple(sorted(a, key=lambda x: x.device_id)) for index, a in found.items()}


def sole_owner(allocations: Sequence[Allocation]) -> DeviceOwner | None:
    """The container that holds every allocation on a GPU; None when it is shared (or free)."""
    owners = {allocation.owner for allocation in allocations}
    return owners.pop() if len(owners) == 1 else None


def gpu_owners(
    gpus: Sequence[GpuSample],
    *,
    declared: Sequence[tuple[str, tuple[int, ...] | None]],
    kubelet: Mapping[int, Sequence[Allocation]],
    pod_engines: Mapping[str, str],
    processes: Mapping[int, ProcessInfo],
) -> dict[int, str]:
    """GPU index -> engine.

    In order, later rules winning: the kubelet's allocation (``kubelet``: GPU index -> its
    allocations; the pod that holds all of them, the most direct; a GPU shared between pods
    falls through to the next rule);
    for discovered pods (``pod_engines``: pod uid -> engine), the pod of a process NVML saw on
    the GPU; the ``gpus`` a target declares (``declared``: (engine, indices) per target). Without
    discovery a lone target that declares nothing owns every GPU.
    """
    owners: dict[int, str] = {}
    for gpu in gpus:
        owner = sole_owner(kubelet.get(gpu.index, ()))
        if owner is not None:
            owners[gpu.index] = owner.engine
    if pod_engines:
        for gpu in gpus:
            if gpu.index in owners:
                continue
            for pid in gpu.pids:
                info = processes.get(pid)
                uid = info.pod_uid if info is not None else None
                if uid is not None and uid in pod_engines:
                    owners[gpu.index] = pod_engines[uid]
                    break
    for engine, indices in declared:
        for index in indices or ():
            owners[index] = engine
    if not pod_engines and len(declared) == 1 and declared[0][1] is None:
        only = declared[0][0]
        owners = {gpu.index: only for gpu in gpus}
    return owners
