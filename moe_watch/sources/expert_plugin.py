"""Per-expert counts from the moe-watch vLLM plugin: the files its workers write (docs/vllm-plugin.md).

Each counting vLLM worker writes one file into the engine's directory. Combining them without
double counting:
- tensor parallelism: every TP rank routes the same tokens, so only tp_rank 0's file counts —
  unless the file says ``sequence_parallel`` (DP + EP + TP MoE), where each TP rank routes its
  own shard and every TP rank's file counts;
- data parallelism: the plugin counts only its own DP rank's tokens, so DP ranks add up;
- pipeline parallelism: stages hold different layers, so their layers are joined;
- restarts: a worker killed without cleaning up leaves its file until it goes stale; of two
  files for the same (DP, PP, TP) rank only the newer worker's counts.
"""

from __future__ import annotations

import math
import os
import time
from array import array
from collections.abc import Callable
from operator import add
from pathlib import Path

from moe_watch import limits
from moe_watch.background import OneRead
from moe_watch.expert_file import (
    SUFFIX,
    TEMP_PREFIX,
    All2AllTimes,
    CountsFile,
    read_counts_file,
)
from moe_watch.samples import ExpertCounts, Histogram, StepCoverageCounts
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.safe_io import FileRejected


def usable(files: list[CountsFile]) -> list[CountsFile]:
    """The files that count: tp_rank 0 (or sequence-parallel), the newest worker per rank."""
    newest: dict[tuple[int, int, int], CountsFile] = {}
    for item in files:
        if item.tp_rank != 0 and not item.sequence_parallel:
            continue  # the same tokens as its TP rank 0
        key = (item.dp_rank, item.pp_rank, item.tp_rank)
        other = newest.get(key)
        if other is None or (item.started, item.updated) > (other.started, other.updated):
            newest[key] = item
    return list(newest.values())


def check_engine_shape(files: list[CountsFile]) -> None:
    """The engine's files joined stay within the per-engine limits (each file alone is within
    the per-file ones; pipeline stages add layers). Raises SourceError ``too_large``."""
    layers = len({layer for item in files for layer in item.layers})
    experts = max((item.num_experts for item in files), default=0)
    if layers > limits.ENGINE_LAYERS or layers * experts > limits.ENGINE_CELLS:
        raise SourceError(
            "too_large",
            f"the engine's {len(files)} plugin files join to {layers} layers x {experts} experts, "
            f"over {limits.ENGINE_LAYERS} layers or {limits.ENGINE_CELLS} cells per engine",
        )


def combine(engine: str, files: list[CountsFile]) -> ExpertCounts:
    """One engine's counts from its workers' usable files (one model shape)."""
    rows: dict[int, array[float]] = {}
    for item in files:
        for layer, row in zip(item.layers, item.counts, strict=True):
            total = rows.get(layer)
            rows[layer] = array("d", row) if total is None else array("d", map(add, total, row))
    layers = tuple(sorted(rows))
    latest = max(files, key=lambda item: item.updated)
    placement = next((item.placement for item in files if item.placement), [])
    timed = [(item.updated, item.all2all) for item in files if item.all2all is not None]
    coverage = step_coverage(files, layers)
    return ExpertCounts(
        engine=engine,
        model=latest.model,
        top_k=latest.top_k,
        num_experts=latest.num_experts,
        layers=layers,
        counts=tuple(rows[layer] for layer in layers),
        started=max(item.started for item in files),  # any worker restarting resets the set
        ep_size=max(item.ep_size for item in files),
        placement=tuple(placement),
        source="plugin",
        all2all=all2all_histogram([times for _, times in timed]),
        all2all_backend=max(timed, key=lambda pair: pair[0])[1].backend if timed else "",
        coverage=coverage,
    )


def step_coverage(files: list[CountsFile], layers: tuple[int, ...]) -> StepCoverageCounts | None:
    """The workers' coverage as the engine's: only when every usable file has one.

    DP ranks (and their files) add up: each counts its own steps. Pipeline stages hold different
    layers of the same steps: each layer's sums come from its stage, and the steps and tokens
    from the first stage (every stage runs every step, with the same sampling).
    """
    measured = [item for item in files if item.coverage is not None]
    if not measured or len(measured) != len(files):
        return None
    first = min(item.pp_rank for item in measured)
    column = {layer: index for index, layer in enumerate(layers)}
    bins = len(measured[0].coverage.steps) if measured[0].coverage else 0
    steps, tokens = [0.0] * bins, [0.0] * bins
    distinct = [array("d", bytes(8 * len(layers))) for _ in range(bins)]
    for item in measured:
        coverage = item.coverage
        assert coverage is not None
        if item.pp_rank == first:
            steps = list(map(add, steps, coverage.steps))
            tokens = list(map(add, tokens, coverage.tokens))
        for b, row in enumerate(coverage.distinct):
            for layer, value in zip(item.layers, row, strict=True):
                distinct[b][column[layer]] += value
    return StepCoverageCounts(
        steps=tuple(steps),
        tokens=tuple(tokens),
        distinct=tuple(distinct),
        sample_every=max(item.coverage.sample_every for item in measured if item.coverage),
    )


def all2all_histogram(times: list[All2AllTimes]) -> Histogram | None:
    """The workers' per-forward-pass exchange times as one cumulative histogram (+Inf last).

    Workers normally share one bucket layout (the plugin's); workers with another layout (a
    different plugin version mid-rollout) are left out rather than mixed in: the layout that
    timed the most passes wins.
    """
    if not times:
        return None
    passes: dict[tuple[float, ...], int] = {}
    for t in times:
        layout: tuple[float, ...] = tuple(t.bounds)
        passes[layout] = passes.get(layout, 0) + t.count
    best, _ = max(passes.items(), key=lambda item: (item[1], len(item[0])))
    bounds = list(best)
    same = [t for t in times if t.bounds == bounds]
    per_bucket = [sum(column) for column in zip(*(t.buckets for t in same), strict=True)]
    cumulative, running = [], 0.0
    for bound, count in zip([*bounds, math.inf], per_bucket, strict=True):
        running += count
        cumulative.append((float(bound), running))
    return Histogram(
        buckets=tuple(cumulative),
        count=float(sum(t.count for t in same)),
        sum=sum(t.sum for t in same),
    )


class PluginExpertSource:
    def __init__(
        self,
        engine: str,
        directory: Path,
        *,
        stale_after_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        max_file_bytes: int = limits.PLUGIN_FILE_BYTES,
        max_cells: int = limits.CELLS_PER_FILE,
        max_files: int = limits.FILES_PER_CYCLE,
    ) -> None:
        self.engine = engine
        self._reads = OneRead()  # a read that outlives its cycle is waited for, not doubled
        self._max_file_bytes = max_file_bytes
        self._max_cells = max_cells
        self._max_files = max_files
        self._directory = directory
        self._stale_after = stale_after_seconds
        self._clock = clock

    @property
    def name(self) -> str:
        return f"experts:{self.engine}"

    async def collect(self, problems: Problems) -> ExpertCounts:
        files = usable(await self._reads(self._read, problems))
        if not files:
            raise SourceError(
                "no_data",
                f"no fresh moe-watch plugin files (*{SUFFIX}, rewritten every few seconds) in "
                f"{self._directory}: check that moe-watch is installed in the vLLM image (its "
                "vllm.general_plugins entry point), that MOE_WATCH_PLUGIN is not 0, that the "
                "engine's MOE_WATCH_EXPERTS_DIR is this directory (the same volume), and the "
                "vLLM log for 'moe-watch plugin' lines",
            )
        # One engine per directory; if files of another model shape are here, keep the shape of
        # the most recently written file and say so.
        latest = max(files, key=lambda item: item.updated)
        shape = (latest.model, latest.top_k, latest.num_experts)
        same = [f for f in files if (f.model, f.top_k, f.num_experts) == shape]
        if len(same) != len(files):
            problems.add("mixed_models")
        check_engine_shape(same)
        return combine(self.engine, same)

    def _names(self, problems: Problems) -> list[str]:
        """The ``max_files`` most recently written counts files (live workers rewrite theirs
        every few seconds); a flood beyond that is counted, not read."""
        found: list[tuple[float, str]] = []
        try:
            with os.scandir(self._directory) as entries:
                for scanned, entry in enumerate(entries):
                    if scanned >= limits.SCAN_ENTRIES:
                        break
                    if not entry.name.endswith(SUFFIX) or entry.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                    except OSError:
                        continue
        except OSError:
            return []
        if len(found) > self._max_files:
            problems.add("too_many_files")
            found = sorted(found, reverse=True)[: self._max_files]
        return sorted(name for _, name in found)

    def _read(self, problems: Problems) -> list[CountsFile]:
        now = self._clock()
        files: list[CountsFile] = []
        for name in self._names(problems):
            path = self._directory / name
            dropped: list[str] = []
            try:
                item = read_counts_file(
                    path, max_bytes=self._max_file_bytes, max_cells=self._max_cells, dropped=dropped
                )
            except FileNotFoundError:
                continue  # removed between listing and reading (a worker exiting)
            except FileRejected as exc:
                problems.add(exc.reason)
                continue
            except Exception:  # whatever one file does, the others are still read
                problems.add("bad_file")
                continue
            if now - item.updated > self._stale_after:
                continue  # a worker that died without cleaning up
            if dropped:  # read without its coverage: the counts are good
                problems.add("bad_coverage")
            files.append(item)
        return files

    async def close(self) -> None:
        """Nothing held open."""
