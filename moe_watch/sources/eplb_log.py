"""vLLM EPLB balancedness from its log (``--enable-eplb`` with ``log_balancedness`` on).

vLLM has no per-expert metric, but with EPLB logging on it prints, every
``log_balancedness_interval`` steps, on EP rank 0:

    EPLB step: 120 for model mixtral: avg_tokens=1234.50, max_tokens=2048, balancedness=0.6028, steps until the next rearrangement: 2880

This source follows that log (a file the engine's stdout is written to, e.g. a container log
path) like ``tail -F``: from the end on first open, from the start after rotation or truncation,
at most ``max_bytes_per_cycle`` per cycle so a huge backlog never stalls the agent.

The path is opened non-blocking and must be a regular file: a FIFO or a device is refused
(``not_regular``) rather than blocking a worker thread or reading without end. Symlinks are
followed here (the operator names the path, and ``/var/log/containers/*.log`` are symlinks).
A line longer than ``max_line_bytes`` is dropped and counted (``line_too_long``): the partial
line kept between cycles never grows past that bound.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moe_watch import limits
from moe_watch.background import OneRead
from moe_watch.samples import EplbBalance
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.safe_io import FileRejected, open_regular

MAX_LINE_BYTES = limits.LOG_LINE_BYTES  # an EPLB line is ~200 bytes

EPLB_LINE = re.compile(
    r"EPLB step: (?P<step>\d+) for model (?P<model>\S+?): avg_tokens=(?P<avg>[0-9.eE+-]+), "
    r"max_tokens=(?P<max>\d+), balancedness=(?P<balancedness>[0-9.eE+-]+)"
)


def parse_eplb_lines(text: str) -> dict[str, float]:
    """model -> the last balancedness in ``text`` (0..1). Other lines are ignored."""
    latest: dict[str, float] = {}
    for match in EPLB_LINE.finditer(text):
        value = float(match["balancedness"])
        if 0.0 <= value <= 1.0:
            latest[match["model"]] = value
    return latest


class EplbLogSource:
    def __init__(
        self,
        engine: str,
        path: Path,
        *,
        max_bytes_per_cycle: int = limits.LOG_BYTES_PER_CYCLE,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.engine = engine
        self._reads = OneRead()  # a read that outlives its cycle is waited for, not doubled
        self._path = path
        self._max_bytes = max_bytes_per_cycle
        self._max_line = max_line_bytes
        self._skipping = False  # inside a line over the bound: drop up to its newline
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._latest: dict[str, float] = {}

    @property
    def name(self) -> str:
        return f"eplb:{self.engine}"

    async def collect(self, problems: Problems) -> EplbBalance:
        text = await self._reads(self._read_new, problems)
        for model, value in parse_eplb_lines(text).items():
            if len(model) > limits.LABEL_VALUE_CHARS:  # the `model` label of its series
                problems.add("label_too_long")
            elif model in self._latest or len(self._latest) < limits.MODELS_PER_ENGINE:
                self._latest[model] = value
            else:  # kept for ever otherwise: a log naming a new model per line would grow it
                problems.add("series_limit")
        return EplbBalance(self.engine, dict(self._latest))

    def _read_new(self, problems: Problems) -> str:
        try:
            fd, stat = open_regular(self._path, follow_symlinks=True)
        except FileRejected as exc:
            raise SourceError(exc.reason, f"the EPLB log {exc}") from None
        except OSError as exc:
            raise SourceError(
                "no_log", f"cannot read the EPLB log {self._path}: {exc.strerror}"
            ) from None
        try:
            if self._inode is None:  # first open: only what is written from now on
                self._inode, self._offset = stat.st_ino, stat.st_size
            elif stat.st_ino != self._inode or stat.st_size < self._offset:  # rotated, truncated
                self._inode, self._offset, self._partial = stat.st_ino, 0, b""
                self._skipping = False
            if stat.st_size == self._offset:
                return ""
            chunk = os.pread(fd, min(self._max_bytes, stat.st_size - self._offset), self._offset)
        finally:
            os.close(fd)
        self._offset += len(chunk)
        if self._skipping:  # the rest of an over-long line: drop it up to its newline
            end = chunk.find(b"\n")
            if end < 0:
                return ""
            chunk, self._skipping = chunk[end + 1 :], False
        data = self._partial + chunk
        complete, _, self._partial = data.rpartition(b"\n")  # keep a half-written last line
        if len(self._partial) > self._max_line:
            problems.add("line_too_long")
            self._partial, self._skipping = b"", True
        if len(complete) > self._max_line:  # a whole line past the bound is dropped too
            lines = complete.split(b"\n")
            kept = [line for line in lines if len(line) <= self._max_line]
            if len(kept) < len(lines):
                problems.add("line_too_long")  # once per cycle, like a partial line
            complete = b"\n".join(kept)
        return complete.decode("utf-8", errors="replace") + ("\n" if complete else "")

    async def close(self) -> None:
        """Nothing held open between cycles."""
