"""The one place a Snapshot is constructed, from everything one cycle read and derived: the GPU
views of the node, one EngineRecord per engine (built in one pass each), then the Snapshot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_watch.agent.engine_target import EngineTarget, TargetCycle
from moe_watch.agent.ownership import gpu_allocations, gpu_owners, sole_owner
from moe_watch.drift import setting_flags
from moe_watch.samples import GpuReading, GpuSample, ProcessInfo
from moe_watch.signals.batching import BatchAnswer, engine_knee
from moe_watch.signals.gpu import (
    budget_used_ratio,
    interconnect,
    memory_headroom_ratio,
    memory_used_ratio,
    utilization_spread,
)
from moe_watch.snapshot import (
    BATCHING,
    GPU_SIGNALS,
    KV_PLAN,
    EngineRecord,
    GpuView,
    Snapshot,
)
from moe_watch.sources.podresources import Allocation, DeviceOwner
from moe_watch.sources.runner import SourceStatus

# An engine's GPU utilization spread, interconnect and memory used / budget per GPU.
GpuSignals = tuple[float | None, str | None, tuple[tuple[int, float], ...]]


def gpu_views(
    reading: GpuReading | None,
    targets: Sequence[EngineTarget],
    *,
    kubelet: Sequence[Allocation],
    pod_engines: Mapping[str, str],
    processes: Mapping[int, ProcessInfo],
) -> tuple[GpuView, ...]:
    if reading is None:
        return ()
    allocated = gpu_allocations(reading.gpus, kubelet)
    owners = gpu_owners(
        reading.gpus,
        declared=[(target.name, target.config.gpus) for target in targets],
        kubelet=allocated,
        pod_engines=pod_engines,
        processes=processes,
    )
    return tuple(
        GpuView(
            sample=gpu,
            engine=owners.get(gpu.index),
            memory_used_ratio=memory_used_ratio(gpu),
            memory_headroom_ratio=memory_headroom_ratio(gpu),
            owner=_owner_labels(sole_owner(allocated.get(gpu.index, ()))),
            allocations=tuple(
                (a.device_id, a.resource, a.owner.namespace, a.owner.pod, a.owner.container)
                for a in allocated.get(gpu.index, ())
            ),
        )
        for gpu in reading.gpus
    )


def engine_record(
    target: EngineTarget,
    part: TargetCycle,
    *,
    gpus: Sequence[GpuView],
    nvlink_pairs: Mapping[tuple[int, int], bool],
    processes: Mapping[int, ProcessInfo],
    pod: tuple[str, str] | None,
) -> EngineRecord:
    """Everything the snapshot says about one engine, in one pass. Its GPU-derived values and
    its drift are stages of their own (``target.stages``): either failing leaves the rest."""
    scrape = part.scrape
    mine = [view.sample for view in gpus if view.engine == target.name]
    nothing: GpuSignals = (None, None, ())
    spread, link, budget_used = target.stages.run(
        GPU_SIGNALS, lambda: _gpu_signals(mine, nvlink_pairs, target.budget_bytes), nothing
    )
    no_answers: dict[str, BatchAnswer] = {}
    batching = target.stages.run(BATCHING, lambda: target.batch_answers(len(mine) or 1), no_answers)
    drift = kv = None
    if scrape is not None and scrape.kind == "vllm":
        kv = target.stages.run(KV_PLAN, lambda: target.kv_plan(scrape), None)
        ep_size = part.experts.latest.ep_size if part.experts is not None else None
        knee = engine_knee(batching.values())
        coverage = kv.coverage if kv is not None else None
        drift = target.drift(
            scrape, mine, processes, interconnect=link, ep_size=ep_size, knee=knee, kv=coverage
        )
    return EngineRecord(
        name=target.name,
        up=scrape is not None,
        views=part.engines,
        settings=dict(scrape.info) if scrape is not None else {},
        pod=pod,
        expert_source=target.config.experts is not None,
        experts=part.experts,
        eplb_balancedness=dict(part.eplb),
        budget_bytes=target.budget_bytes,
        budget_used=budget_used,
        kv_plan=kv,
        drift=drift,
        drift_flags=setting_flags(drift) if drift is not None else (),
        interconnect=link,
        gpu_spread=spread,
        batching=batching,
    )


def _gpu_signals(
    mine: Sequence[GpuSample],
    nvlink_pairs: Mapping[tuple[int, int], bool],
    budget_bytes: float | None,
) -> GpuSignals:
    used = ((gpu.index, budget_used_ratio(gpu, budget_bytes)) for gpu in mine)
    return (
        utilization_spread(mine),
        interconnect(mine, nvlink_pairs),
        tuple((index, ratio) for index, ratio in used if ratio is not None),
    )


def assemble_snapshot(
    *,
    timestamp: float,
    cycle: int,
    duration_seconds: float,
    sources: Sequence[SourceStatus],
    engines: Sequence[EngineRecord],
    reading: GpuReading | None,
    gpus: tuple[GpuView, ...],
) -> Snapshot:
    return Snapshot(
        timestamp=timestamp,
        cycle=cycle,
        cycle_duration_seconds=duration_seconds,
        sources=tuple(sources),
        engines=tuple(engines),
        gpus=gpus,
        driver_version=reading.driver_version if reading else None,
        xid_totals=dict(reading.xid_totals) if reading else {},
        node_gpu_spread=utilization_spread(v.sample for v in gpus),
    )


def _owner_labels(owner: DeviceOwner | None) -> tuple[str, str, str] | None:
    return (owner.namespace, owner.pod, owner.container) if owner is not None else None
