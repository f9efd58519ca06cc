"""The batching curves on disk, so that an agent restart does not throw away hours of evidence.

One small JSON file, ``batching-curves.json`` in the agent's state directory (``state_dir``),
rewritten atomically (a temporary file in the same directory, flushed to disk, then renamed):
a reader, or an agent killed mid-write, sees the previous or the next file, never half of one.
Bounded: at most ``MAX_CURVES`` (engine, model) curves of 12 bins, histogram layouts of at most
64 bounds, ``MAX_BYTES`` in all; when there are more curves the most recently updated are kept.

Loading validates everything (the format, every number finite and non-negative, the shapes);
a file that fails is refused as a whole with a reason (``bad_state``, or safe_io's
``too_large``, ``symlink``, ``not_regular``, ``unreadable``), and the agent starts empty. A
missing file is a first start, not an error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import structlog

from moe_watch.signals.batching import MAX_HISTOGRAM_BOUNDS, BatchCurve, BinEvidence
from moe_watch.signals.power_bins import BIN_COUNT
from moe_watch.sources.runner import SourceStatus
from moe_watch.sources.safe_io import FileRejected, read_regular

log = structlog.get_logger("moe_watch.agent")

FORMAT = "moe-watch-batching-curves/1"
FILE_NAME = "batching-curves.json"
MAX_BYTES = 2 * 1024 * 1024
MAX_CURVES = 64
MAX_NAME = 256  # characters of an engine id or a model name

Key = tuple[str, str]  # (engine, model)


@dataclass(frozen=True, slots=True)
class LoadResult:
    curves: Mapping[Key, BatchCurve]
    reason: str | None = None  # why the file was refused; None: read (or there was none)
    message: str | None = None


def save_curves(path: Path, curves: Mapping[Key, BatchCurve], now: float) -> None:
    """Atomically replace ``path`` with ``curves`` (the MAX_CURVES most recently updated).
    Raises OSError when the directory refuses it."""
    kept = sorted(curves.items(), key=lambda item: item[1].updated, reverse=True)[:MAX_CURVES]
    document = {
        "format": FORMAT,
        "saved": now,
        "curves": [_curve_json(engine, model, curve) for (engine, model), curve in kept],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(document, stream, separators=(",", ":"), allow_nan=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_curves(path: Path, *, max_bytes: int = MAX_BYTES) -> LoadResult:
    """The curves in ``path``; an empty result with a reason when the file is refused."""
    try:
        raw: Any = json.loads(read_regular(path, max_bytes).decode("utf-8"))
    except FileNotFoundError:
        return LoadResult({})
    except FileRejected as exc:
        return LoadResult({}, exc.reason, str(exc))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return LoadResult({}, "bad_state", f"{path}: not JSON ({type(exc).__name__})")
    try:
        return LoadResult(_curves(raw))
    except (ValueError, TypeError, KeyError) as exc:
        return LoadResult({}, "bad_state", f"{path}: {exc}")


def _curve_json(engine: str, model: str, curve: BatchCurve) -> dict[str, Any]:
    return {
        "engine": engine,
        "model": model,
        "updated": curve.updated,
        "itl_bounds": list(curve.itl_bounds),
        "ttft_bounds": list(curve.ttft_bounds),
        "bins": [
            {
                "seconds": b.seconds,
                "generation_tokens": b.generation_tokens,
                "itl": list(b.itl),
                "ttft": list(b.ttft),
            }
            for b in curve.bins
        ],
    }


def _curves(raw: Any) -> dict[Key, BatchCurve]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    items = raw.get("curves")
    if not isinstance(items, list) or len(items) > MAX_CURVES:
        raise ValueError(f"curves is not a list of at most {MAX_CURVES}")
    curves: dict[Key, BatchCurve] = {}
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a curve is not an object")
        key = (_name(item["engine"]), _name(item["model"]))
        if key in curves:
            raise ValueError(f"the curve of {key} is there twice")
        curves[key] = _curve(item)
    return curves


def _curve(item: dict[str, Any]) -> BatchCurve:
    itl_bounds, ttft_bounds = _bounds(item["itl_bounds"]), _bounds(item["ttft_bounds"])
    rows = item["bins"]
    if not isinstance(rows, list) or len(rows) != BIN_COUNT:
        raise ValueError(f"a curve does not have {BIN_COUNT} bins")
    bins: list[BinEvidence] = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("a bin is not an object")
        bins.append(
            BinEvidence(
                seconds=_number(row["seconds"]),
                generation_tokens=_number(row["generation_tokens"]),
                itl=_buckets(row["itl"], itl_bounds),
                ttft=_buckets(row["ttft"], ttft_bounds),
            )
        )
    return BatchCurve(
        updated=_number(item["updated"]),
        bins=tuple(bins),
        itl_bounds=itl_bounds,
        ttft_bounds=ttft_bounds,
    )


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise ValueError(f"an engine or model name is not a string of 1-{MAX_NAME} characters")
    return value


def _number(value: Any) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{value!r} is not a finite non-negative number")
    return float(value)


def _bounds(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) > MAX_HISTOGRAM_BOUNDS:
        raise ValueError(f"histogram bounds are not a list of at most {MAX_HISTOGRAM_BOUNDS}")
    bounds = tuple(_number(v) for v in value)
    if any(a >= b for a, b in pairwise(bounds)):
        raise ValueError("histogram bounds are not increasing")
    return bounds


def _buckets(value: Any, bounds: tuple[float, ...]) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) not in (0, len(bounds) + 1):
        raise ValueError("a bin's buckets do not fit its curve's bounds")
    return tuple(_number(v) for v in value)


class CurveStore:
    """The agent's side of the state file: load once at start, save now and then, and report
    like a source (``source="state"``: up, last success, failures counted by reason)."""

    name = "state"

    def __init__(self, directory: Path, clock: Callable[[], float]) -> None:
        self.path = directory / FILE_NAME
        self._clock = clock
        self.restored: dict[Key, BatchCurve] = {}
        self._errors: Counter[str] = Counter()
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._up = True
        self._duration = 0.0

    def load(self) -> None:
        started = time.perf_counter()
        result = load_curves(self.path)
        self._duration = time.perf_counter() - started
        self.restored = dict(result.curves)
        if result.reason is not None:
            self._failed(result.reason, result.message or result.reason)
            log.warning("state file refused; starting without it", error=result.message)
        else:
            self._succeeded()

    def save(self, curves: Mapping[Key, BatchCurve]) -> None:
        """Write ``curves`` and whatever was restored for engines not seen since."""
        started = time.perf_counter()
        try:
            save_curves(self.path, {**self.restored, **curves}, self._clock())
        except (OSError, ValueError) as exc:
            self._failed("write", f"{self.path}: {exc}")
        else:
            self._succeeded()
        self._duration = time.perf_counter() - started

    def _failed(self, reason: str, message: str) -> None:
        if self._up:
            log.warning("state file failure", reason=reason, error=message)
        self._errors[reason] += 1
        self._last_error, self._up = message, False

    def _succeeded(self) -> None:
        if not self._up:
            log.info("state file written again", path=str(self.path))
        self._last_success, self._up = self._clock(), True

    def status(self) -> SourceStatus:
        return SourceStatus(
            name=self.name,
            up=self._up,
            duration_seconds=self._duration,
            last_success_timestamp=self._last_success,
            errors_total=dict(self._errors),
            last_error=self._last_error,
        )
