"""The file the moe-watch vLLM plugin writes and the agent reads: cumulative expert counts.

Stdlib only: the plugin imports it inside vLLM workers, the agent on nodes without torch. One
JSON file per counting worker process, ``<hostname>-<pid>.experts.json``, replaced atomically
(write a temporary file in the same directory, then rename), so a reader sees either the
previous or the next complete file, never half of one. See docs/vllm-plugin.md for the fields.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from moe_watch import limits
from moe_watch.signals.power_bins import BINS, bin_edges
from moe_watch.sources.safe_io import FileRejected, TooDeep, loads_json, read_regular

FORMAT = "moe-watch-expert-counts/1"
SUFFIX = ".experts.json"
TEMP_PREFIX = ".tmp-"  # temporary files: never read (the suffix alone would match them)


@dataclass(frozen=True)
class All2AllTimes:
    """Expert-parallel exchange time per forward pass of one worker: a histogram, cumulative
    since ``started`` (optional in the file: only workers under expert parallelism write it)."""

    bounds: list[float]  # upper bounds in seconds, increasing; one more bucket above the last
    buckets: list[int]  # forward passes per bucket (not cumulative), len(bounds) + 1
    count: int  # timed forward passes (= sum(buckets))
    sum: float  # seconds, over those passes
    backend: str = ""  # vLLM's all2all_backend
    method: str = ""  # "cuda_events" | "perf_counter"
    sample_every: int = 1  # one forward pass in N is timed
    exchanges: int = 0  # timed dispatch/combine calls


_A2A_REQUIRED = ("bounds", "buckets", "count", "sum")
_A2A_KNOWN = frozenset(f.name for f in fields(All2AllTimes))


@dataclass(frozen=True)
class StepCoverage:
    """How many experts a step touches, per MoE layer, against the step's tokens (optional in
    the file; cumulative since ``started``). On sampled steps (one in ``sample_every``) the
    plugin counts, per layer, the experts that received at least one of the step's tokens, and
    adds that to the step's bin (signals/power_bins.py: by the step's token count)."""

    bins: list[int]  # the bins' labels, 1, 2, 4 ... 2048 (power_bins.BINS): a fixed layout
    steps: list[int]  # sampled steps per bin
    tokens: list[int]  # the tokens of those steps, per bin
    distinct: list[list[int]]  # [bin][layer of ``layers``]: experts hit, summed over the steps
    sample_every: int = 1


_COVERAGE_REQUIRED = ("bins", "steps", "tokens", "distinct")
_COVERAGE_KNOWN = frozenset(f.name for f in fields(StepCoverage))


@dataclass(frozen=True)
class CountsFile:
    pid: int
    started: float  # unix time counting began (after warm-up); a new value = a reset
    updated: float  # unix time of this write; a file not rewritten for long = a dead worker
    model: str
    top_k: int
    num_experts: int  # logical (routed) experts per MoE layer
    layers: list[int]  # model layer index of each MoE layer counted by this process
    counts: list[list[int]]  # [layer][logical expert] assignments, cumulative since `started`
    vllm_version: str = ""
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    ep_size: int = 1
    # True when every TP rank routes only its own shard of the tokens (vLLM's sequence-parallel
    # MoE: DP + EP + TP > 1): then every TP rank's file counts; otherwise only tp_rank 0's does.
    sequence_parallel: bool = False
    placement: list[int] = field(default_factory=list)  # logical expert -> EP rank, when known
    format: str = FORMAT
    all2all: All2AllTimes | None = None  # expert-parallel exchange time, when timed
    coverage: StepCoverage | None = None  # experts touched per step, when measured


_REQUIRED = ("pid", "started", "updated", "model", "top_k", "num_experts", "layers", "counts")
_KNOWN = frozenset(f.name for f in fields(CountsFile))


def counts_file_name(hostname: str, pid: int) -> str:
    return f"{hostname}-{pid}{SUFFIX}"


def write_counts_file(path: Path, data: CountsFile) -> None:
    """Atomically replace ``path`` with ``data`` (same-directory temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(asdict(data), stream, separators=(",", ":"))
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the agent may run as another user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_counts_file(
    path: Path,
    *,
    max_bytes: int = limits.PLUGIN_FILE_BYTES,
    max_cells: int = limits.CELLS_PER_FILE,
    dropped: list[str] | None = None,
) -> CountsFile:
    """Parse and validate one file. Raises FileRejected (a ValueError) saying what is wrong,
    with a ``reason``: ``bad_file``, ``too_large``, ``not_regular``, ``symlink``, ``unreadable``.

    An invalid ``coverage`` object costs only the coverage: the file is read without it and
    what is wrong is appended to ``dropped`` (the agent counts it as ``bad_coverage``).

    The file must be a regular file (opened non-blocking, symlinks not followed) of at most
    ``max_bytes`` with at most ``max_cells`` counts; every field within its limit
    (moe_watch/limits.py: ranks, experts, layer indices, counts, string lengths, nesting).
    Fields this reader does not know are
    ignored (a newer plugin may add some within format /1); a missing required field, a wrong
    type or inconsistent shapes are errors. A file that does not exist (a worker removed it at
    exit) raises FileNotFoundError.
    """
    try:
        raw: Any = loads_json(read_regular(path, max_bytes).decode("utf-8"))
    except FileNotFoundError:
        raise
    except FileRejected as exc:
        raise FileRejected(exc.reason, f"{path.name}: unreadable ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, TooDeep) as exc:
        raise FileRejected("bad_file", f"{path.name}: unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise FileRejected("bad_file", f"{path.name}: not a {FORMAT} file")
    missing = [name for name in _REQUIRED if name not in raw]
    if missing:
        raise FileRejected("bad_file", f"{path.name}: missing {', '.join(missing)}")
    known = {key: value for key, value in raw.items() if key in _KNOWN and key != "coverage"}
    try:
        known["all2all"] = _all2all(path.name, raw.get("all2all"))
        data = CountsFile(**known)
        _check(path.name, data, max_cells)
    except FileRejected:
        raise
    except ValueError as exc:
        raise FileRejected("bad_file", str(exc)) from None
    try:
        coverage = _coverage(path.name, raw.get("coverage"), data, max_cells)
    except (ValueError, TypeError) as exc:
        if dropped is not None:
            dropped.append(str(exc))
        return data
    return replace(data, coverage=coverage) if coverage is not None else data


def _coverage(name: str, raw: object, data: CountsFile, max_cells: int) -> StepCoverage | None:
    """The optional ``coverage`` object of a valid file, strictly (a ValueError otherwise)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: coverage is not an object")
    missing = [key for key in _COVERAGE_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{name}: coverage misses {', '.join(missing)}")
    coverage = StepCoverage(**{k: v for k, v in raw.items() if k in _COVERAGE_KNOWN})
    if coverage.bins != list(BINS) or not all(_is_int(b) for b in coverage.bins):
        raise ValueError(f"{name}: coverage bins are not the {len(BINS)} power-of-two bins")
    if not _is_int(coverage.sample_every) or coverage.sample_every < 1:
        raise ValueError(f"{name}: coverage sample_every is not a positive integer")
    for key in ("steps", "tokens"):
        column = getattr(coverage, key)
        if not isinstance(column, list) or len(column) != len(BINS):
            raise ValueError(f"{name}: coverage {key} is not one integer per bin")
        if not _non_negative_integers(column):
            raise ValueError(f"{name}: coverage {key} is not one integer per bin")
    rows, layers = coverage.distinct, len(data.layers)
    if len(BINS) * layers > max_cells:
        raise ValueError(f"{name}: coverage of {layers} layers is over {max_cells} cells")
    if not isinstance(rows, list) or len(rows) != len(BINS):
        raise ValueError(f"{name}: coverage distinct does not have one row per bin")
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != layers or not _non_negative_integers(row):
            raise ValueError(f"{name}: a coverage distinct row is not {layers} integers")
        steps, tokens = coverage.steps[index], coverage.tokens[index]
        low, high = bin_edges(index)
        # A step in this bin has between ceil(low) and ceil(high) - 1 tokens; each token
        # reaches at most top_k experts of a layer, and a layer has num_experts.
        most = math.inf if math.isinf(high) else steps * (math.ceil(high) - 1)
        if not steps * math.ceil(low) <= tokens <= most:
            raise ValueError(f"{name}: coverage tokens of bin {BINS[index]} do not fit its steps")
        if row and max(row) > min(steps * data.num_experts, tokens * data.top_k):
            raise ValueError(f"{name}: coverage of bin {BINS[index]} is above what its steps allow")
    return coverage


def _all2all(name: str, raw: object) -> All2AllTimes | None:
    """The optional ``all2all`` object, strictly: absent or null is fine, anything else must be
    a consistent histogram (a wrong one makes the whole file invalid, like a wrong count)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: all2all is not an object")
    missing = [key for key in _A2A_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{name}: all2all misses {', '.join(missing)}")
    times = All2AllTimes(**{key: value for key, value in raw.items() if key in _A2A_KNOWN})
    bounds, buckets = times.bounds, times.buckets
    if (
        not isinstance(bounds, list)
        or not 1 <= len(bounds) <= limits.A2A_BOUNDS
        or not all(_is_number(b) and b > 0 for b in bounds)
        or any(b >= c for b, c in pairwise(bounds))
    ):
        raise ValueError(f"{name}: all2all bounds are not increasing positive seconds")
    if (
        not isinstance(buckets, list)
        or len(buckets) != len(bounds) + 1
        or not _non_negative_integers(buckets)
    ):
        raise ValueError(f"{name}: all2all buckets are not {len(bounds) + 1} non-negative integers")
    if not _is_int(times.count) or times.count != sum(buckets):
        raise ValueError(f"{name}: all2all count is not the sum of its buckets")
    if not _is_number(times.sum) or times.sum < 0:
        raise ValueError(f"{name}: all2all sum is not a non-negative number")
    if not _is_label(times.backend) or not _is_label(times.method):
        raise ValueError(
            f"{name}: all2all backend and method must be strings of at most "
            f"{limits.LABEL_VALUE_CHARS} characters"
        )
    for key in ("sample_every", "exchanges"):
        value = getattr(times, key)
        if not _is_int(value) or value < (1 if key == "sample_every" else 0):
            raise ValueError(f"{name}: all2all {key} is not a valid integer ({value!r})")
    return times


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_label(value: object) -> bool:
    return isinstance(value, str) and len(value) <= limits.LABEL_VALUE_CHARS


def _check(name: str, data: CountsFile, max_cells: int = limits.CELLS_PER_FILE) -> None:
    for key in ("pid", "top_k", "num_experts", "dp_rank", "tp_rank", "pp_rank", "ep_rank"):
        value = getattr(data, key)
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name}: {key} is not a non-negative integer ({value!r})")
    if not _is_int(data.ep_size) or data.ep_size < 1:
        raise ValueError(f"{name}: ep_size is not a positive integer ({data.ep_size!r})")
    if data.ep_size > limits.EP_RANKS:  # one series per rank; the what-if allocates per rank
        raise FileRejected(
            "too_large", f"{name}: ep_size {data.ep_size} is over {limits.EP_RANKS} ranks"
        )
    for key in ("dp_rank", "tp_rank", "pp_rank", "ep_rank"):
        if getattr(data, key) >= limits.EP_RANKS:
            raise ValueError(f"{name}: {key} is not below {limits.EP_RANKS}")
    if data.pid > limits.PROCESS_ID:
        raise ValueError(f"{name}: pid {data.pid} is over {limits.PROCESS_ID}")
    if data.num_experts > limits.EXPERTS_PER_LAYER:
        raise FileRejected(
            "too_large",
            f"{name}: {data.num_experts} experts is over {limits.EXPERTS_PER_LAYER} per layer",
        )
    for key in ("started", "updated"):
        if not _is_number(getattr(data, key)):
            raise ValueError(f"{name}: {key} is not a number")
    if not _is_label(data.model) or not _is_label(data.vllm_version):
        raise ValueError(
            f"{name}: model and vllm_version must be strings of at most "
            f"{limits.LABEL_VALUE_CHARS} characters"
        )
    if not isinstance(data.sequence_parallel, bool):
        raise ValueError(f"{name}: sequence_parallel is not a boolean")
    if not (1 <= data.top_k <= data.num_experts):
        raise ValueError(f"{name}: top_k {data.top_k} does not fit {data.num_experts} experts")
    if not isinstance(data.layers, list):
        raise ValueError(f"{name}: layers is not a list of layer indices")
    if len(data.layers) * data.num_experts > max_cells:  # window x cells: RSS would follow
        raise FileRejected(
            "too_large",
            f"{name}: {len(data.layers)} layers x {data.num_experts} experts is over "
            f"{max_cells} cells",
        )
    if not all(_is_int(layer) and 0 <= layer <= limits.LAYER_INDEX for layer in data.layers):
        raise ValueError(f"{name}: layers is not a list of layer indices (0-{limits.LAYER_INDEX})")
    if len(set(data.layers)) != len(data.layers):
        raise ValueError(f"{name}: a layer is listed twice")
    if not isinstance(data.counts, list) or len(data.counts) != len(data.layers):
        raise ValueError(f"{name}: the counts do not have one row per layer ({len(data.layers)})")
    for row in data.counts:
        if (
            not isinstance(row, list)
            or len(row) != data.num_experts
            or not _non_negative_integers(row)
        ):
            raise ValueError(
                f"{name}: a count row is not {data.num_experts} non-negative integers "
                f"(at most {limits.COUNT})"
            )
    if not isinstance(data.placement, list):
        raise ValueError(f"{name}: placement is not a list")
    if data.placement and (
        len(data.placement) != data.num_experts
        or not all(_is_int(r) and 0 <= r < data.ep_size for r in data.placement)
    ):
        raise ValueError(
            f"{name}: placement must give each of the {data.num_experts} experts an EP rank "
            f"below {data.ep_size}"
        )


def _non_negative_integers(row: list[Any]) -> bool:
    # C-level passes instead of a generator over 14,848 cells per file per cycle at DeepSeek-V3
    # scale (2x faster); bool is a subclass of int but not a count.
    return not row or (set(map(type, row)) == {int} and min(row) >= 0 and max(row) <= limits.COUNT)
