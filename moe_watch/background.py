"""Work off the event loop that never holds the process at exit.

``concurrent.futures.ThreadPoolExecutor`` (asyncio's default executor, behind
``asyncio.to_thread``) joins its threads at interpreter exit, and ``asyncio.run`` waits for
them: one call stuck in a read or a computation that runs for an hour keeps the process alive
after SIGTERM until the kubelet's SIGKILL. Here every thread is a daemon and shutting down
never waits: what is still running is abandoned, and ends with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from moe_watch.sources.base import Problems

T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadExecutor(ThreadPoolExecutor):
    """At most ``max_workers`` daemon threads; ``shutdown`` never joins them.

    A ThreadPoolExecutor only by type (asyncio's ``set_default_executor`` accepts nothing
    else): ``submit`` and ``shutdown`` are its own, and no thread of the base class is started.
    """

    def __init__(self, max_workers: int = 8, name: str = "moe-watch") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=name)
        self._max_workers = max_workers
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._daemons: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._calls.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._daemons) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._daemons)}", daemon=True
                )
                self._daemons.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
            del call, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Idle threads end; a call in progress is abandoned, never waited for."""
        with self._lock:
            self._shutdown = True
            for _ in self._daemons:
                self._calls.put(None)


def in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run ``fn`` on a thread of its own that the process does not wait for at exit.

    The thread starts once the caller yields to the event loop, not before: background work
    asked for inside a cycle (the what-if, the coverage prediction) then runs after that cycle
    has published its snapshot, instead of taking the GIL from it halfway through."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if result.done():
            return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            error: BaseException | None = exc
            value = None
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
            loop.call_soon_threadsafe(settle, value, error)

    thread = threading.Thread(target=run, name=getattr(fn, "__name__", "work"), daemon=True)
    loop.call_soon(thread.start)
    return result


class OneRead:
    """A source's blocking read, on a daemon thread of its own, one at a time.

    The source runner gives up on a cycle at its timeout, but a thread cannot be stopped: a read
    that outlives its cycle (a wedged volume, a hostile file that takes a minute to refuse) is
    still running at the next cycle. Starting another beside it would race the source's state
    (file offsets, what was consumed), pile up a thread per cycle, and drop what the first one
    read. So a later cycle waits for that same read and takes its answer; the read's own
    problems (counted reasons) go to the cycle that receives the answer. A thread of its own,
    not the shared pool: one engine's slow reads never queue another engine's behind them.
    """

    def __init__(self) -> None:
        self._running: tuple[asyncio.Future[Any], Problems] | None = None

    async def __call__(self, read: Callable[[Problems], T], problems: Problems) -> T:
        if self._running is None:
            own = Problems()
            self._running = (in_daemon_thread(read, own), own)
        future, own = self._running
        try:
            # shield: the runner's timeout cancels this wait, never the read
            result: T = await asyncio.shield(future)
            return result
        finally:
            if future.done() and self._running is not None and self._running[0] is future:
                self._running = None
                problems.reasons.update(own.reasons)
