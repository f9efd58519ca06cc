"""Per-expert counts from SGLang's expert-distribution recorder.

SGLang (``--expert-distribution-recorder-mode stat``) records routed tokens per (layer, logical
expert) once recording is started (POST /start_expert_distribution_record). Each POST
/dump_expert_distribution_record writes what was recorded since the last dump to a file in
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` and resets the recorder, so every dump is a delta:
this source adds the deltas up into cumulative counters (what the signals expect).

Two file forms exist: current releases write ``expert_distribution_recorder_<time>.pt``
(``torch.save`` of ``{"logical_count": [passes, layers, experts], ...}``, read without torch by
``torch_file``); older ones wrote one ``expert_distribution_rank<r>_timestamp<t>.csv`` per rank
with ``layer_id,expert_id,count`` rows. Files are deleted once read: the directory is a queue.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from moe_watch import limits
from moe_watch.background import OneRead
from moe_watch.samples import ExpertCounts, matrix
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.safe_io import FileRejected, read_head, read_regular
from moe_watch.sources.torch_file import Tensor, load_torch_file

log = structlog.get_logger("moe_watch.experts.sglang")

START_PATH = "/start_expert_distribution_record"
DUMP_PATH = "/dump_expert_distribution_record"
PT_PATTERN = "expert_distribution_recorder_*.pt"
CSV_PATTERN = "expert_distribution_rank*_timestamp*.csv"

Matrix = list[list[float]]
# The bounds are declared in moe_watch/limits.py (docs/limits.md).
MAX_CELLS = limits.CELLS_PER_FILE  # layers x experts of one matrix
MAX_COUNT = float(limits.COUNT)  # a routed-token count beyond this is corruption, not traffic
_FORGET_AFTER = 1024  # names of files that could not be removed, remembered to be skipped


def read_recorder_file(
    path: Path,
    num_experts: int | None = None,
    *,
    max_file_bytes: int = limits.DUMP_FILE_BYTES,
    max_member_bytes: int = limits.DUMP_MEMBER_BYTES,
    max_cells: int = MAX_CELLS,
) -> Matrix:
    """One dump as ``[layer][expert]`` counts: finite, non-negative, at most ``max_cells``.

    Raises FileRejected (a ValueError) whose ``reason`` says why: ``bad_file`` (format),
    ``bad_value`` (NaN, infinite, negative or absurd counts), ``too_large``, ``not_regular``,
    ``symlink``, ``unreadable``.
    """
    if path.suffix == ".pt":
        data = load_torch_file(
            path, max_file_bytes=max_file_bytes, max_member_bytes=max_member_bytes
        )
        tensor = data.get("logical_count") if isinstance(data, dict) else None
        if not isinstance(tensor, Tensor):
            raise FileRejected("bad_file", f"{path}: no logical_count tensor in the dump")
        if len(tensor.shape) != 3:
            raise FileRejected(
                "bad_file", f"{path}: logical_count is not [passes, layers, experts]"
            )
        if tensor.shape[1] * tensor.shape[2] > max_cells:
            raise FileRejected(
                "too_large", f"{path}: {tensor.shape[1]} x {tensor.shape[2]} is not a real model"
            )
        rows = tensor.sum_leading_axis()
    else:
        rows = _read_csv(path, num_experts, max_file_bytes, max_cells)
    _check_shape(path, rows)
    _check_counts(path, rows)
    return rows


def _check_shape(path: Path, rows: Matrix) -> None:
    """Within the per-engine limits: a dump is the whole engine's matrix."""
    layers, experts = len(rows), len(rows[0]) if rows else 0
    if layers > limits.ENGINE_LAYERS or experts > limits.EXPERTS_PER_LAYER:
        raise FileRejected(
            "too_large",
            f"{path}: {layers} layers x {experts} experts is over {limits.ENGINE_LAYERS} layers "
            f"or {limits.EXPERTS_PER_LAYER} experts",
        )


def _check_counts(path: Path, rows: Matrix) -> None:
    """Every count finite, non-negative and below MAX_COUNT (so totals never overflow)."""
    for row in rows:
        if row and not (min(row) >= 0.0 and max(row) <= MAX_COUNT):  # NaN fails both
            raise FileRejected("bad_value", f"{path}: a count is NaN, infinite, negative or absurd")


def _read_csv(path: Path, num_experts: int | None, max_bytes: int, max_cells: int) -> Matrix:
    cells: dict[tuple[int, int], float] = {}
    try:
        text = read_regular(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRejected("bad_file", f"{path}: not UTF-8 ({exc.reason})") from None
    with io.StringIO(text, newline="") as stream:
        reader = csv.DictReader(stream)
        try:
            if reader.fieldnames != ["layer_id", "expert_id", "count"]:
                raise ValueError(f"{path}: expected the header layer_id,expert_id,count")
            for row in reader:
                cell = _csv_cell(row)
                if cell is None:
                    raise ValueError(
                        f"{path}:{reader.line_num}: not a layer_id,expert_id,count row"
                    )
                key, count = cell
                cells[key] = cells.get(key, 0.0) + count
        except csv.Error as exc:  # e.g. a NUL byte: not a CSV at all
            raise FileRejected("bad_file", f"{path}:{reader.line_num}: {exc}") from None
        except ValueError as exc:
            raise FileRejected("bad_file", str(exc)) from None
    if not cells:
        return []
    if not all(count <= MAX_COUNT for count in cells.values()):  # rows that add up past 2**53
        raise FileRejected("bad_value", f"{path}: a count adds up to more than {MAX_COUNT:.0f}")
    layers = max(layer for layer, _ in cells) + 1
    experts = num_experts or max(expert for _, expert in cells) + 1
    if any(expert >= experts for _, expert in cells):
        raise FileRejected(
            "bad_file", f"{path}: an expert id is out of range (num_experts {experts})"
        )
    if layers * experts > max_cells:  # a corrupt id must not make the agent allocate gigabytes
        raise FileRejected(
            "too_large", f"{path}: {layers} layers x {experts} experts is not a real model"
        )
    rows = [[0.0] * experts for _ in range(layers)]
    for (layer, expert), count in cells.items():
        rows[layer][expert] += count
    return rows


def _csv_cell(row: dict[str | Any, str | Any]) -> tuple[tuple[int, int], float] | None:
    """((layer, expert), count) of one row, or None when it is not a valid row."""
    try:
        layer, expert, count = int(row["layer_id"]), int(row["expert_id"]), float(row["count"])
    except (TypeError, ValueError):
        return None
    if None in row or layer < 0 or expert < 0 or not (math.isfinite(count) and count >= 0):
        return None  # a None key holds extra columns
    return (layer, expert), count


class SGLangExpertSource:
    """Starts SGLang's recorder, asks for a dump every cycle and accumulates the dumps."""

    def __init__(
        self,
        engine: str,
        url: str,
        directory: Path,
        session: aiohttp.ClientSession,
        *,
        top_k: int,
        num_experts: int | None = None,
        ep_size: int = 1,
        timeout_seconds: float = 3.0,
        clock: Callable[[], float] = time.time,
        max_file_bytes: int = limits.DUMP_FILE_BYTES,
        max_member_bytes: int = limits.DUMP_MEMBER_BYTES,
        max_cells: int = MAX_CELLS,
        max_files_per_cycle: int = limits.FILES_PER_CYCLE,
    ) -> None:
        self.engine = engine
        self._reads = OneRead()  # a read that outlives its cycle is waited for, not doubled
        self._max_file_bytes = max_file_bytes
        self._max_member_bytes = max_member_bytes
        self._max_cells = max_cells
        self._max_files = max_files_per_cycle
        self._stuck: dict[str, None] = {}  # files that could not be removed (ordered, bounded)
        self._url = url
        self._directory = directory
        self._session = session
        self._top_k = top_k
        self._num_experts = num_experts
        self._ep_size = ep_size
        self._timeout = timeout_seconds
        self._clock = clock
        self._recording = False
        self._started = clock()
        self._totals: Matrix = []

    @property
    def name(self) -> str:
        return f"experts:{self.engine}"

    async def collect(self, problems: Problems) -> ExpertCounts:
        if not self._recording:
            await self._post(START_PATH, "recorder")
            self._recording = True
        try:
            await self._post(DUMP_PATH, "dump")
        except SourceError:
            self._recording = False  # restarted server: start recording again next cycle
            raise
        for delta in await self._reads(self._drain, problems):
            self._add(delta)
        if not self._totals:
            raise SourceError(
                "no_data",
                f"no recorder dump in {self._directory} yet: is SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR this directory, shared with the agent?",
            )
        return ExpertCounts(
            engine=self.engine,
            model="",
            top_k=self._top_k,
            num_experts=len(self._totals[0]),
            layers=tuple(range(len(self._totals))),
            counts=matrix(self._totals),
            started=self._started,
            ep_size=self._ep_size,
            source="sglang",
            from_zero=True,  # the recorder starts at zero: the first dump is traffic, not a baseline
        )

    async def _post(self, path: str, reason: str) -> None:
        url = self._url + path
        try:
            await asyncio.wait_for(self._request(url, reason), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError("timeout", f"no answer from {url} in {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise SourceError("connect", f"cannot reach {url}: {exc}") from None

    async def _request(self, url: str, reason: str) -> None:
        async with self._session.post(url) as response:
            if response.status != 200:
                # the first bytes only, for the message: a refusal's body is as untrusted as a
                # dump, and an endless one must not grow the agent
                head = await read_head(response, limits.ERROR_BODY_BYTES)
                body = head.decode("utf-8", "replace")[:200]
                raise SourceError(
                    reason,
                    f"{url} answered HTTP {response.status}: {body!r} "
                    "(is SGLang started with --expert-distribution-recorder-mode stat?)",
                )

    def _drain(self, problems: Problems) -> list[Matrix]:
        """Read and delete the dumps waiting in the directory, oldest first, at most
        ``max_files_per_cycle`` of them. Every file read is removed, good or bad: one bad dump
        never jams the queue, and never costs the counts of the dumps around it."""
        if not self._directory.is_dir():
            raise SourceError(
                "no_data",
                f"{self._directory} does not exist: mount SGLang's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR there",
            )
        deltas: list[Matrix] = []
        for path in self._waiting():
            try:
                deltas.append(self._read_one(path))
            except FileNotFoundError:
                continue
            except FileRejected as exc:
                problems.add(exc.reason)
                log.debug("dump refused", engine=self.engine, reason=exc.reason, error=str(exc))
            except Exception as exc:  # whatever a crafted file does, it is consumed and counted
                problems.add("bad_file")
                log.debug("dump refused", engine=self.engine, error=f"{type(exc).__name__}: {exc}")
            self._consume(path, problems)
        return deltas

    def _read_one(self, path: Path) -> Matrix:
        return read_recorder_file(
            path,
            self._num_experts,
            max_file_bytes=self._max_file_bytes,
            max_member_bytes=self._max_member_bytes,
            max_cells=self._max_cells,
        )

    def _waiting(self) -> list[Path]:
        """The oldest dumps by mtime (of the link itself: nothing is followed), bounded."""
        found: list[tuple[float, str]] = []
        with os.scandir(self._directory) as entries:
            for scanned, entry in enumerate(entries):
                if scanned >= limits.SCAN_ENTRIES:
                    break
                if entry.name in self._stuck or not _is_dump(entry.name):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                found.append((mtime, entry.name))
        found.sort()
        return [self._directory / name for _, name in found[: self._max_files]]

    def _consume(self, path: Path, problems: Problems) -> None:
        try:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(path)
            path.unlink(missing_ok=True)
        except FileNotFoundError:
            return
        except OSError:  # not ours to remove: skip it from now on instead of re-reading it
            self._stuck[path.name] = None
            while len(self._stuck) > _FORGET_AFTER:
                del self._stuck[next(iter(self._stuck))]

    def _add(self, delta: Matrix) -> None:
        if not delta or not delta[0]:
            return
        if (
            not self._totals
            or len(delta) != len(self._totals)
            or len(delta[0]) != len(self._totals[0])
        ):
            self._totals = [[0.0] * len(delta[0]) for _ in delta]
            self._started = self._clock()  # a new shape is a new counter set
        for row, add in zip(self._totals, delta, strict=True):
            for expert, count in enumerate(add):
                row[expert] += count

    async def close(self) -> None:
        """The session belongs to the agent; recording stays on for the next agent."""


def _is_dump(name: str) -> bool:
    return (name.startswith("expert_distribution_recorder_") and name.endswith(".pt")) or (
        name.startswith("expert_distribution_rank")
        and "_timestamp" in name
        and name.endswith(".csv")
    )
