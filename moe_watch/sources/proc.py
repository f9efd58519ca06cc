"""Which pod, and which vLLM server command line, each GPU process belongs to (``/proc``).

NVML lists the PIDs on each GPU. With hostPID, ``/proc/<pid>/cgroup`` names the pod (GPU
attribution of discovered engines) and the command lines up the process tree carry the flags
vLLM exposes nowhere else (``--max-num-seqs``, parallel sizes: configuration drift). The reads
block, so they run in a thread under the runner's time bound, like every other source's I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from moe_watch import limits
from moe_watch.background import OneRead
from moe_watch.samples import ProcessInfo
from moe_watch.sources.base import Problems
from moe_watch.sources.cgroup import PodRef, parse_cgroup

PARENT_DEPTH = 6  # vLLM workers are multiprocessing children a few levels below the server


class ProcSource:
    """pid -> ProcessInfo for the PIDs ``pids()`` names (those NVML reported this cycle)."""

    def __init__(self, pids: Callable[[], Iterable[int]], root: str = "/proc") -> None:
        self._pids = pids
        self._reads = OneRead()  # a read that outlives its cycle is waited for, not doubled
        self.root = root

    @property
    def name(self) -> str:
        return "proc"

    async def collect(self, problems: Problems) -> dict[int, ProcessInfo]:
        pids = sorted(set(self._pids()))
        if not pids:
            return {}
        return await self._reads(lambda found: self._read(pids, found), problems)

    def _read(self, pids: list[int], problems: Problems) -> dict[int, ProcessInfo]:
        result: dict[int, ProcessInfo] = {}
        for pid in pids:
            ref = pod_of_pid(pid, self.root)
            try:
                cmdline = server_cmdline(pid, self.root)
            except CommandLineTooLarge:
                problems.add("too_large")  # not used: drift parses it, /status shows it
                cmdline = None
            result[pid] = ProcessInfo(
                pod_uid=ref.pod_uid if ref is not None else None,
                server_cmdline=tuple(cmdline) if cmdline is not None else None,
            )
        return result

    async def close(self) -> None:
        """Nothing held open between cycles."""


class CommandLineTooLarge(ValueError):
    """A command line over CMDLINE_BYTES or CMDLINE_ARGS."""


def pod_of_pid(pid: int, proc: str = "/proc") -> PodRef | None:
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as stream:
            return parse_cgroup(stream.read(limits.CMDLINE_BYTES))
    except OSError:
        return None  # the process ended, or /proc is not the host's (no hostPID)


def server_cmdline(pid: int, proc: str = "/proc", depth: int = PARENT_DEPTH) -> list[str] | None:
    """The vLLM server command line for one process on an engine's GPU.

    GPU processes are vLLM workers (multiprocessing children whose own command line is a spawn
    stub), so walk up the parents to the first one that names vLLM with arguments. Raises
    CommandLineTooLarge for a command line on the way past CMDLINE_BYTES or CMDLINE_ARGS.
    """
    current = pid
    for _ in range(depth):
        args = _read_cmdline(proc, current)
        if (
            args
            and any("vllm" in a for a in args)
            and any(a.startswith("--") or a == "serve" for a in args)
        ):
            return args
        parent = _parent(proc, current)
        if parent is None or parent <= 1:
            break
        current = parent
    return None


def _read_cmdline(proc: str, pid: int) -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as stream:
            raw = stream.read(limits.CMDLINE_BYTES + 1)
    except OSError:
        return []
    if len(raw) > limits.CMDLINE_BYTES or raw.count(b"\0") > limits.CMDLINE_ARGS:
        raise CommandLineTooLarge(f"/proc/{pid}/cmdline is over the limits")
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(proc: str, pid: int) -> int | None:
    try:
        with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as stream:
            stat = stream.read(4096)
        return int(stat.rsplit(")", 1)[1].split()[1])  # the comm field may hold spaces
    except (OSError, ValueError, IndexError):
        return None
