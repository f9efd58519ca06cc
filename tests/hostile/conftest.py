"""Shared helpers of the hostile-input corpus: memory bounds and hand-built torch.save files."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from moe_watch.serving.server import start_server

# Every case of the corpus runs under this bound on Python allocations (tracemalloc peak), unless
# it states its own: far below what the unbounded readers took (2.3 GB for /dev/zero, 5.5 GB
# for a .pt declaring 30000 x 30000, 3 GB for a zip bomb).
MEMORY_BOUND_BYTES = 64 * 1024 * 1024


@contextmanager
def peak_memory(limit: int = MEMORY_BOUND_BYTES) -> Iterator[None]:
    """Assert that the block's peak of Python allocations stays under ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB over the {limit / 2**20:.0f} MiB bound"


@asynccontextmanager
async def sglang_recorder(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """SGLang's recorder endpoints (start and dump) on loopback, both answered by ``answer``."""
    app = web.Application()
    app.router.add_post("/start_expert_distribution_record", answer)
    app.router.add_post("/dump_expert_distribution_record", answer)
    runner, url = await start_server(app, "127.0.0.1", 0)
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def sglang_url() -> AsyncIterator[str]:
    """SGLang's recorder endpoints, answering at once (the dumps themselves are files)."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async with sglang_recorder(ok) as url:
        yield url


# A torch.save file written by hand (no torch here): protocol-2 pickle opcodes for
# {"logical_count": <tensor>} with a persistent storage record, inside the zip layout.


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    return b"\x8a\x08" + struct.pack("<q", value)  # LONG1, 8 bytes


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_opcodes(
    shape: tuple[int, ...],
    *,
    storage: str = "FloatStorage",
    key: str = "0",
    offset: int = 0,
    stride: tuple[int, ...] | None = None,
) -> bytes:
    if stride is None:
        stride, step = [], 1
        for dim in reversed(shape):
            stride.insert(0, step)
            step *= max(dim, 1)
    numel = 1
    for dim in shape:
        numel *= dim
    persistent = (
        _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)])
        + b"Q"
    )
    args = _tuple(
        [
            persistent,
            _int(offset),
            _tuple([_int(d) for d in shape]),
            _tuple([_int(s) for s in stride]),
            b"\x89",
            _global("collections", "OrderedDict") + b")R",
        ]
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_pt(
    path: Path,
    value_opcodes: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A torch.save zip whose data.pkl is ``{"logical_count": <value_opcodes>}``."""
    pkl = b"\x80\x02}" + _str("logical_count") + value_opcodes + b"s."
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", pkl)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# The real agent, as a process: `moe-watch run` with a settings file, on a free loopback port.

REPO = Path(__file__).resolve().parents[2]


class AgentProcess:
    """``python -m moe_watch.cli run`` with JSON logs read on a thread (the pipe never fills)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_for("serving")["url"].removesuffix("/metrics")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace").rstrip()}
            with self._seen:
                self.lines.append(line if isinstance(line, dict) else {"event": str(line)})
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first log line whose event is ``event`` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                found = next((x for x in self.lines if x.get("event") == event), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"no {event!r} log line; log: {self.lines[-20:]}")
                self._seen.wait(left)

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """The process's resident memory now (VmRSS), or its peak so far (VmHWM: what a
        memory limit is held to, however short the peak)."""
        with open(f"/proc/{self.process.pid}/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def stop(self, bound: float) -> float:
        """SIGTERM; the seconds until the process exited (fails past ``bound`` + slack)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=bound + 5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {bound + 5:g}s after SIGTERM") from None
        elapsed = time.monotonic() - started
        assert code == 0, (code, self.lines[-20:])
        return elapsed


@contextmanager
def running_agent(
    directory: Path,
    settings: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    module: str = "moe_watch.cli",
) -> Iterator[AgentProcess]:
    """Run the agent with ``settings`` (YAML) until the block ends; killed if still alive.
    ``module`` is what ``python -m`` runs: the CLI, or a test launcher that wraps it."""
    config = directory / "agent.yaml"
    config.write_text(yaml.safe_dump({"nvml": "off", **settings}))
    extra = dict(env or {})
    path = [*extra.pop("PYTHONPATH", "").split(os.pathsep), str(REPO)]
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MOE_WATCH_")},
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        **extra,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", module, "run", "--config", str(config),
         "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug"],
        cwd=directory, env=environment, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield AgentProcess(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
