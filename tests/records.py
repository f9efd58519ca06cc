"""One engine's record of a snapshot, for tests that read what the agent made of one engine."""

from __future__ import annotations

from collections.abc import Mapping

from moe_watch.signals.batching import BatchAnswer
from moe_watch.snapshot import EngineExperts, EngineRecord, Snapshot


def record_of(snapshot: Snapshot, engine: str) -> EngineRecord:
    record = snapshot.engine(engine)
    assert record is not None, f"no record of engine {engine!r}"
    return record


def batching_of(snapshot: Snapshot, engine: str) -> Mapping[str, BatchAnswer]:
    """The engine's batching answer per model."""
    return record_of(snapshot, engine).batching


def experts_of(snapshot: Snapshot, engine: str) -> EngineExperts:
    experts = record_of(snapshot, engine).experts
    assert experts is not None, f"no expert counts for engine {engine!r}"
    return experts
