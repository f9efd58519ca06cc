"""Fixtures for the real-vLLM integration tests (``-m vllm``).

Nothing here runs unless a test asks for ``vllm_server`` / ``vllm_process``: only then is the
cached venv built (first time: ~1.5 min of pip), the tiny model made and the server started
(~1-2 min on 2 CPU cores). A failure to build or start is a test failure with the log's tail,
never a skip: CI must not go green without having run these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.vllm_env import VllmEnvError, ensure_tiny_mixtral, ensure_vllm_venv
from bench.vllm_server import VllmServer, VllmServerError

_TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def vllm_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The session's vLLM server (started once; stopped at the end of the session)."""
    started = time.monotonic()
    try:
        python = ensure_vllm_venv()
        _TIMINGS["venv ready"] = time.monotonic() - started
        model_dir = ensure_tiny_mixtral(python)
        _TIMINGS["model ready"] = time.monotonic() - started
    except VllmEnvError as exc:
        pytest.fail(f"cannot set up vLLM for the integration tests: {exc}", pytrace=False)
    server = VllmServer(python, model_dir, tmp_path_factory.mktemp("vllm") / "vllm-server.log")
    try:
        server.start()
    except VllmServerError as exc:
        pytest.fail(f"cannot start vLLM: {exc}", pytrace=False)
    assert server.startup_seconds is not None
    _TIMINGS["server start-up"] = server.startup_seconds
    yield server
    server.stop()


@pytest.fixture
def vllm_server(vllm_process: VllmServer) -> str:
    """Base URL of a running vLLM server serving ``tiny-mixtral``.

    Backed by the session's process; if an earlier test stopped it (the shutdown test does, and
    runs last in its module), it is started again here.
    """
    if not vllm_process.running:
        try:
            vllm_process.start()
        except VllmServerError as exc:
            pytest.fail(f"cannot restart vLLM: {exc}", pytrace=False)
    return vllm_process.url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the real server is a ``vllm`` test, marked or not (so that
    ``-m "not vllm"`` never starts one)."""
    for item in items:
        if {"vllm_server", "vllm_process"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMINGS:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in _TIMINGS.items())
        terminalreporter.write_line(f"vllm integration: {parts}")
