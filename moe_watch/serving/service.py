"""Run the agent and its HTTP server together until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from moe_watch.agent import Agent
from moe_watch.background import DaemonThreadExecutor
from moe_watch.config import Settings
from moe_watch.malloc_tuning import fix_malloc_thresholds
from moe_watch.serving.cert_reload import CertificateReloader
from moe_watch.serving.server import ServerLimits, make_app, start_server
from moe_watch.serving.web_config import load_web_config

log = structlog.get_logger("moe_watch.serving.service")


class ListenError(Exception):
    """The HTTP server could not bind its address."""


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    nvml: Any | None = None,
    on_started: Callable[[str, Agent], Awaitable[None]] | None = None,
) -> None:
    """Collect every interval and serve /metrics until ``stop`` is set.

    Shutdown is bounded: once ``stop`` is set, whatever a source is doing (a scrape waiting out
    a 120 s timeout, a hung NVML call), this returns within ``shutdown_timeout_seconds`` (plus
    scheduling slack): the cycle in flight is given most of it, then cancelled, then the server
    and the agent are closed within what is left. Kubernetes' default grace period is 30 s.
    """
    loop = asyncio.get_running_loop()
    # File and /proc reads run on daemon threads: one stuck in the kernel never holds the exit.
    loop.set_default_executor(DaemonThreadExecutor(name="moe-watch-io"))
    agent = Agent(settings, nvml=nvml)
    await agent.__aenter__()
    deadline: list[float] = []  # set when stop is seen

    def left(share: float = 1.0) -> float:
        budget = settings.shutdown_timeout_seconds
        end = deadline[0] if deadline else loop.time() + budget
        return max(0.0, (end - loop.time()) * share)

    try:
        web_config = load_web_config(settings.web_config_file) if settings.web_config_file else None
        app = make_app(
            lambda: agent.snapshot,
            expert_full_detail=settings.expert_full_detail,
            basic_auth_users=web_config.basic_auth_users if web_config else None,
            auth_workers=settings.auth_workers,
            auth_max_pending=settings.auth_max_pending,
            write_timeout_seconds=settings.server_write_timeout_seconds,
        )
        tls = web_config.tls_server_config if web_config else None
        limits = ServerLimits(
            max_connections=settings.server_max_connections,
            probe_connections=settings.server_probe_connections,
            write_timeout_seconds=settings.server_write_timeout_seconds,
            idle_timeout_seconds=settings.server_idle_timeout_seconds,
            header_timeout_seconds=settings.server_header_timeout_seconds,
            max_header_bytes=settings.server_max_header_bytes,
        )
        try:
            runner, url = await start_server(
                app,
                settings.listen_host,
                settings.listen_port,
                # a rotated certificate reaches new connections without a restart
                CertificateReloader(tls, settings.web_config_file).context if tls else None,
                limits=limits,
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {settings.listen}: {exc.strerror or exc}"
            ) from None
        log.info("serving", url=url + "/metrics")
        freeze_startup_heap()
        if not fix_malloc_thresholds():  # glibc only; elsewhere the allocator's own policy
            log.info("malloc thresholds left as they are: no glibc mallopt")
        forever = asyncio.create_task(agent.run_forever(stop))
        stopped = asyncio.create_task(stop.wait())
        try:
            if on_started is not None:
                await on_started(url, agent)
            await asyncio.wait({forever, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            deadline.append(loop.time() + settings.shutdown_timeout_seconds)
            stopped.cancel()
            stop.set()  # run_forever ends after its cycle, if it gets to finish it
            await _finish(forever, left(0.7), "the collection cycle")
            await _bounded(runner.cleanup(), left(0.5), "the HTTP server")
    finally:
        await _bounded(agent.__aexit__(None, None, None), left(), "the agent's sources")


async def _finish(task: asyncio.Task[None], seconds: float, what: str) -> None:
    """Let ``task`` end within ``seconds``, then cancel it; its failure is raised."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.warning("shutdown: cancelling what is still running", what=what, after_seconds=seconds)
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)  # a cancelled cycle ends at its next await
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("shutdown: failed while cancelled", what=what, error=str(task.exception()))
        return
    task.result()


async def _bounded(work: Awaitable[Any], seconds: float, what: str) -> None:
    task = asyncio.ensure_future(work)
    await _finish(task, max(seconds, 0.5), what)


def freeze_startup_heap() -> None:
    """Take what lives for the whole process (modules, settings, the agent) out of the garbage
    collector's reach. A full collection otherwise walks every object of pydantic, aiohttp and
    prometheus_client each time: ~22 ms on the node benchmark, every ~70 cycles, and those
    cycles were its p99."""
    gc.collect()  # garbage made during start-up goes now, not frozen for ever
    gc.freeze()


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM (kubelet) and SIGINT (Ctrl-C) end the loop cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
