"""Background work asked for inside a cycle starts only once the cycle yields to the loop."""

import asyncio
import threading

from moe_watch.background import in_daemon_thread


def running(name: str) -> bool:
    return any(thread.name == name for thread in threading.enumerate())


async def test_the_thread_starts_when_the_caller_yields_not_before() -> None:
    gate = threading.Event()

    def held_background_work() -> int:
        gate.wait(10)  # bounded: released below, once the thread is seen running
        return 42

    result = in_daemon_thread(held_background_work)
    assert not running("held_background_work")  # the rest of the cycle has the GIL to itself
    for _ in range(1000):  # yield to the loop until the thread is up (bounded)
        await asyncio.sleep(0)
        if running("held_background_work"):
            break
    assert running("held_background_work")
    gate.set()
    assert await result == 42
