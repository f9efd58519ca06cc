"""Which engine owns each GPU, from what the cycle already read (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_watch.samples import GpuSample, ProcessInfo
from moe_watch.sources.podresources import DeviceOwner


def gpu_owners(
    gpus: Sequence[GpuSample],
    *,
    declared: Sequence[tuple[str, tuple[int, ...] | None]],
    kubelet: Mapping[str, DeviceOwner],
    pod_engines: Mapping[str, str],
    processes: Mapping[int, ProcessInfo],
) -> dict[int, str]:
    """GPU index -> engine.

    In order, later rules winning: the kubelet's allocation (GPU UUID -> pod, the most direct);
    for discovered pods (``pod_engines``: pod uid -> engine), the pod of a process NVML saw on
    the GPU; the ``gpus`` a target declares (``declared``: (engine, indices) per target). Without
    discovery a lone target that declares nothing owns every GPU.
    """
    owners: dict[int, str] = {}
    for gpu in gpus:
        if gpu.uuid in kubelet:
            owners[gpu.index] = kubelet[gpu.uuid].engine
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
