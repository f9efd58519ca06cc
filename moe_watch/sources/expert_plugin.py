"""Per-expert counts from the moe-watch vLLM plugin: the files its workers write (docs/vllm-plugin.md).

Each vLLM worker process that holds MoE layers writes one file. Combining them without double
counting: under tensor parallelism every TP rank routes the same tokens, so only tp_rank 0
counts; data-parallel ranks route different tokens, so they add up; pipeline stages hold
different layers, so their layers are joined.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from operator import add
from pathlib import Path

from moe_watch.expert_file import SUFFIX, CountsFile, read_counts_file
from moe_watch.samples import ExpertCounts
from moe_watch.sources.base import Problems, SourceError


def combine(engine: str, files: list[CountsFile]) -> ExpertCounts:
    """One engine's counts from its workers' files (all tp_rank 0, one model shape)."""
    first = files[0]
    rows: dict[int, array[float]] = {}
    for item in files:
        for layer, row in zip(item.layers, item.counts, strict=True):
            total = rows.get(layer)
            rows[layer] = array("d", row) if total is None else array("d", map(add, total, row))
    layers = tuple(sorted(rows))
    return ExpertCounts(
        engine=engine,
        model=first.model,
        top_k=first.top_k,
        num_experts=first.num_experts,
        layers=layers,
        counts=tuple(rows[layer] for layer in layers),
        started=max(item.started for item in files),  # any worker restarting resets the set
        ep_size=max(item.ep_size for item in files),
        placement=tuple(first.placement),
        source="plugin",
    )


class PluginExpertSource:
    def __init__(
        self,
        engine: str,
        directory: Path,
        *,
        stale_after_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self._directory = directory
        self._stale_after = stale_after_seconds
        self._clock = clock

    @property
    def name(self) -> str:
        return f"experts:{self.engine}"

    async def collect(self, problems: Problems) -> ExpertCounts:
        files = await asyncio.to_thread(self._read, problems)
        if not files:
            raise SourceError(
                "no_data",
                f"no fresh plugin files in {self._directory}: is moe-watch installed in the vLLM "
                "image (its vllm.general_plugins entry point) and MOE_WATCH_EXPERTS_DIR this directory?",
            )
        shape = (files[0].top_k, files[0].num_experts)
        same = [f for f in files if (f.top_k, f.num_experts) == shape]
        if len(same) != len(files):
            problems.add("mixed_models")
        return combine(self.engine, same)

    def _read(self, problems: Problems) -> list[CountsFile]:
        if not self._directory.is_dir():
            return []
        now = self._clock()
        files: list[CountsFile] = []
        for path in sorted(self._directory.glob("*" + SUFFIX)):
            if path.name.startswith(".tmp-"):
                continue
            try:
                item = read_counts_file(path)
            except ValueError:
                problems.add("bad_file")
                continue
            if now - item.updated > self._stale_after:
                continue  # a worker that died without cleaning up
            if item.tp_rank == 0:
                files.append(item)
        return files

    async def close(self) -> None:
        """Nothing held open."""
