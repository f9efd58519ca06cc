"""The file the moe-watch vLLM plugin writes and the agent reads: cumulative expert counts.

Stdlib only: the plugin imports it inside vLLM workers, the agent on nodes without torch. One
JSON file per worker process, replaced atomically (write a temporary file, then rename), so a
reader sees either the previous or the next complete file, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "moe-watch-expert-counts/1"
SUFFIX = ".experts.json"


@dataclass(frozen=True)
class CountsFile:
    pid: int
    started: float  # when counting began (after warm-up); a new value = a reset
    updated: float
    model: str
    top_k: int
    num_experts: int
    layers: list[int]  # model layer index of each MoE layer counted by this process
    counts: list[list[int]]  # [layer][logical expert], cumulative since `started`
    vllm_version: str = ""
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    ep_size: int = 1
    placement: list[int] = field(default_factory=list)  # logical expert -> EP rank, when known
    format: str = FORMAT


def write_counts_file(path: Path, data: CountsFile) -> None:
    """Atomically replace ``path`` with ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(asdict(data), stream, separators=(",", ":"))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_counts_file(path: Path) -> CountsFile:
    """Parse and validate one file. Raises ValueError saying what is wrong."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: unreadable ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path.name}: not a {FORMAT} file")
    try:
        data = CountsFile(**raw)
    except TypeError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    _check(path.name, data)
    return data


def _check(name: str, data: CountsFile) -> None:
    if not (1 <= data.top_k <= data.num_experts):
        raise ValueError(f"{name}: top_k {data.top_k} does not fit {data.num_experts} experts")
    if len(data.counts) != len(data.layers):
        raise ValueError(f"{name}: {len(data.counts)} count rows for {len(data.layers)} layers")
    for row in data.counts:
        if len(row) != data.num_experts or not _non_negative_integers(row):
            raise ValueError(f"{name}: a count row is not {data.num_experts} non-negative integers")
    if data.placement and len(data.placement) != data.num_experts:
        raise ValueError(
            f"{name}: placement names {len(data.placement)} of {data.num_experts} experts"
        )


def _non_negative_integers(row: object) -> bool:
    # array("q") checks every item is an int that fits 64 bits in C: 5x faster than a generator
    # over 14,848 cells per file per cycle at DeepSeek-V3 scale.
    try:
        return min(array("q", row), default=0) >= 0  # type: ignore[call-overload]
    except (TypeError, OverflowError):
        return False
