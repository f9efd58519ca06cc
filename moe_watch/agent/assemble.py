"""The one place a Snapshot is constructed, from everything one cycle read and derived (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_watch.agent.engine_target import EngineTarget, TargetCycle
from moe_watch.agent.ownership import gpu_allocations, gpu_owners, sole_owner
from moe_watch.samples import GpuReading, ProcessInfo
from moe_watch.signals.batching import engine_knee
from moe_watch.signals.gpu import interconnect, memory_used_ratio, utilization_spread
from moe_watch.snapshot import GpuView, Snapshot
from moe_watch.sources.podresources import Allocation, DeviceOwner
from moe_watch.sources.runner import SourceStatus


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
            owner=_owner_labels(sole_owner(allocated.get(gpu.index, ()))),
            allocations=tuple(
                (a.device_id, a.resource, a.owner.namespace, a.owner.pod, a.owner.container)
                for a in allocated.get(gpu.index, ())
            ),
        )
        for gpu in reading.gpus
    )


def assemble_snapshot(
    *,
    timestamp: float,
    cycle: int,
    duration_seconds: float,
    sources: Sequence[SourceStatus],
    targets: Sequence[tuple[EngineTarget, TargetCycle]],
    reading: GpuReading | None,
    gpus: tuple[GpuView, ...],
    processes: Mapping[int, ProcessInfo],
    engine_pods: Mapping[str, tuple[str, str]],
) -> Snapshot:
    up = [(target, part, part.scrape) for target, part in targets if part.scrape is not None]
    spreads = {
        target.name: utilization_spread(v.sample for v in gpus if v.engine == target.name)
        for target, _ in targets
    }
    links = {
        target.name: interconnect(
            [v.sample for v in gpus if v.engine == target.name],
            reading.nvlink_pairs if reading else {},
        )
        for target, _ in targets
    }
    engine_links = {name: kind for name, kind in links.items() if kind is not None}
    answers = {
        target.name: target.batch_answers(sum(1 for v in gpus if v.engine == target.name) or 1)
        for target, _, _ in up
    }
    return Snapshot(
        timestamp=timestamp,
        cycle=cycle,
        cycle_duration_seconds=duration_seconds,
        sources=tuple(sources),
        targets_up={part.name: part.scrape is not None for _, part in targets},
        engines=tuple(view for _, part in targets for view in part.engines),
        gpus=gpus,
        driver_version=reading.driver_version if reading else None,
        xid_totals=dict(reading.xid_totals) if reading else {},
        engine_gpu_spread={name: value for name, value in spreads.items() if value is not None},
        node_gpu_spread=utilization_spread(v.sample for v in gpus),
        engine_settings={part.name: dict(scrape.info) for _, part, scrape in up},
        experts=tuple(part.experts for _, part in targets if part.experts is not None),
        expert_engines=tuple(t.name for t, _ in targets if t.config.experts is not None),
        eplb_balancedness={
            (part.name, model): value for _, part in targets for model, value in part.eplb.items()
        },
        budgets={
            target.name: target.budget_bytes
            for target, _ in targets
            if target.budget_bytes is not None
        },
        drift={
            target.name: target.drift(
                scrape,
                gpus,
                processes,
                interconnect=engine_links.get(target.name),
                ep_size=part.experts.latest.ep_size if part.experts is not None else None,
                knee=engine_knee(answers[target.name].values()),
            )
            for target, part, scrape in up
            if scrape.kind == "vllm"
        },
        engine_pods=dict(engine_pods),
        engine_interconnect=engine_links,
        batching={
            (name, model): answer
            for name, by_model in answers.items()
            for model, answer in by_model.items()
        },
    )


def _owner_labels(owner: DeviceOwner | None) -> tuple[str, str, str] | None:
    return (owner.namespace, owner.pod, owner.container) if owner is not None else None
