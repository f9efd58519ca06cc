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
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from moe_watch.samples import ExpertCounts, matrix
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.torch_file import TorchFileError, load_torch_file

START_PATH = "/start_expert_distribution_record"
DUMP_PATH = "/dump_expert_distribution_record"
PT_PATTERN = "expert_distribution_recorder_*.pt"
CSV_PATTERN = "expert_distribution_rank*_timestamp*.csv"

Matrix = list[list[float]]
MAX_CELLS = 1 << 22  # layers x experts; DeepSeek-V3 is 61 x 256 = 15,616


def read_recorder_file(path: Path, num_experts: int | None = None) -> Matrix:
    """One dump as ``[layer][expert]`` counts. Raises ValueError with the reason on a bad file."""
    if path.suffix == ".pt":
        data = load_torch_file(path)
        if not isinstance(data, dict) or "logical_count" not in data:
            raise ValueError(f"{path}: no logical_count in the dump")
        return data["logical_count"].sum_leading_axis()  # type: ignore[no-any-return]
    return _read_csv(path, num_experts)


def _read_csv(path: Path, num_experts: int | None) -> Matrix:
    cells: dict[tuple[int, int], float] = {}
    with path.open(newline="", encoding="utf-8") as stream:
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
            raise ValueError(f"{path}:{reader.line_num}: {exc}") from None
    if not cells:
        return []
    layers = max(layer for layer, _ in cells) + 1
    experts = num_experts or max(expert for _, expert in cells) + 1
    if any(expert >= experts for _, expert in cells):
        raise ValueError(f"{path}: an expert id is out of range (num_experts {experts})")
    if layers * experts > MAX_CELLS:  # a corrupt id must not make the agent allocate gigabytes
        raise ValueError(f"{path}: {layers} layers x {experts} experts is not a real model")
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
    ) -> None:
        self.engine = engine
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
        for delta in await asyncio.to_thread(self._drain, problems):
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
                body = (await response.text())[:200]
                raise SourceError(
                    reason,
                    f"{url} answered HTTP {response.status}: {body!r} "
                    "(is SGLang started with --expert-distribution-recorder-mode stat?)",
                )

    def _drain(self, problems: Problems) -> list[Matrix]:
        """Read and delete the dumps waiting in the directory, oldest first."""
        if not self._directory.is_dir():
            raise SourceError(
                "no_data",
                f"{self._directory} does not exist: mount SGLang's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR there",
            )
        paths = sorted(
            [*self._directory.glob(PT_PATTERN), *self._directory.glob(CSV_PATTERN)], key=_mtime
        )
        deltas: list[Matrix] = []
        for path in paths:
            try:
                deltas.append(read_recorder_file(path, self._num_experts))
            except (TorchFileError, ValueError, OSError):
                problems.add("bad_file")
            path.unlink(missing_ok=True)
        return deltas

    def _add(self, delta: Matrix) -> None:
        if not delta:
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
