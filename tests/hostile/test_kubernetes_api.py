"""Hostile Kubernetes API answers and pods: list bodies and watch events of unexpected shapes,
over-long lines, pods whose annotations or names make no valid target. The watch never dies:
each is counted under source="discovery" with a reason, good pods are still discovered, and the
API server is not hammered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_watch.serving.server import start_server
from moe_watch.sources.discovery import BadPod, DiscoverySource, PodWatcher, target_of
from moe_watch.sources.runner import SourceRunner
from tests.hostile.conftest import peak_memory
from tests.sources.test_discovery import pod


class RawApi:
    """A fake API server whose list body and watch lines are raw bytes chosen by the test."""

    def __init__(self) -> None:
        self.list_bodies: list[bytes] = []  # one per list; the last one repeats
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()  # None ends the watch
        self.lists = 0
        self.watches = 0
        self.listed: asyncio.Queue[int] = asyncio.Queue()  # the number of each list answered

    async def pods(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "1":
            self.watches += 1
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            while (line := await self.lines.get()) is not None:
                await response.write(line)
            return response
        self.lists += 1
        self.listed.put_nowait(self.lists)
        body = self.list_bodies[min(self.lists, len(self.list_bodies)) - 1]
        return web.Response(body=body, content_type="application/json")


def pod_list(*items: Any, rv: str = "100") -> bytes:
    return json.dumps(
        {"kind": "PodList", "metadata": {"resourceVersion": rv}, "items": list(items)}
    ).encode()


GOOD = pod("good-0", "u-good", rv="90")


@pytest.fixture
async def api() -> AsyncIterator[tuple[RawApi, str]]:
    fake = RawApi()
    app = web.Application()
    app.router.add_get("/api/v1/pods", fake.pods)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield fake, url
    for _ in range(8):
        fake.lines.put_nowait(None)
    await runner.cleanup()


async def run_watcher(url: str, steps: Any, **kwargs: Any) -> tuple[PodWatcher, SourceRunner[int]]:
    """Start a watcher, run ``steps(watcher, changes)``, stop it; the task must still be alive."""
    changes: asyncio.Queue[set[str]] = asyncio.Queue()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = PodWatcher(
            session,
            url,
            "gpu-node-1",
            on_change=lambda t: changes.put_nowait({x.engine for x in t.values()}),
            max_backoff_seconds=0.05,
            min_relist_seconds=0.05,
            **kwargs,
        )
        runner = SourceRunner(DiscoverySource(watcher), timeout_seconds=1.0)
        task = asyncio.create_task(watcher.run(stop))
        try:
            await steps(watcher, changes)
            assert not task.done()  # the discovery task is alive
            await runner.run()
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    return watcher, runner


async def next_change(changes: asyncio.Queue[set[str]]) -> set[str]:
    return await asyncio.wait_for(changes.get(), 5)


BAD_PODS: list[tuple[str, dict[str, Any]]] = []
for name, change in [
    ("path_without_slash", {"annotations": {"moe-watch.io/path": "metrics"}}),
    ("path_with_space", {"annotations": {"moe-watch.io/path": "/me trics"}}),
    ("port_out_of_range", {"annotations": {"moe-watch.io/port": "70000"}}),
    ("port_not_a_number", {"annotations": {"moe-watch.io/port": "http"}}),
    ("long_names", {"namespace": "n" * 63, "name": "p" * 253}),
    ("no_uid", {"uid": None}),
    ("annotations_a_list", {"annotations": ["moe-watch.io/scrape"]}),
]:
    bad = pod("bad", f"u-{name}", rv="91")
    annotations = change.pop("annotations", None)
    if isinstance(annotations, dict):
        bad["metadata"]["annotations"].update(annotations)
    elif annotations is not None:
        bad["metadata"]["annotations"] = annotations
    bad["metadata"].update(change)
    BAD_PODS.append((name, bad))
BAD_IP = pod("bad", "u-ip", rv="92", ip="not-an-ip")


@pytest.mark.parametrize(("name", "bad"), BAD_PODS, ids=[n for n, _ in BAD_PODS])
def test_a_pod_that_makes_no_valid_target_is_refused(name: str, bad: dict[str, Any]) -> None:
    if name == "annotations_a_list":
        assert target_of(bad) is None  # not annotated at all: not a target, not an error
        return
    with pytest.raises(BadPod):
        target_of(bad)


async def test_bad_pods_in_a_list_and_a_watch_are_counted_and_skipped(
    api: tuple[RawApi, str],
) -> None:
    fake, url = api
    bads = [bad for _, bad in BAD_PODS] + [BAD_IP]
    fake.list_bodies = [pod_list(GOOD, *bads)]

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        assert await next_change(changes) == {"llm/good-0"}
        for bad in bads:
            fake.lines.put_nowait(json.dumps({"type": "ADDED", "object": bad}).encode() + b"\n")
        fake.lines.put_nowait(
            json.dumps({"type": "ADDED", "object": pod("good-1", "u-g1", rv="95")}).encode() + b"\n"
        )
        assert await next_change(changes) == {"llm/good-0", "llm/good-1"}

    watcher, runner = await run_watcher(url, steps)
    # 7 bad pods, in the list and again over the watch; the one without a uid is a bad event
    # in a watch (nothing to key it by)
    assert dict(watcher.errors) == {"bad_pod": 13, "bad_event": 1}
    status = runner.status()
    assert status.up
    assert status.errors_total == {"bad_pod": 13, "bad_event": 1}


WATCH_LINES: list[tuple[str, bytes, str]] = [
    ("an_array", b"[1, 2, 3]\n", "bad_event"),
    ("object_null", b'{"type": "ADDED", "object": null}\n', "bad_event"),
    ("object_a_string", b'{"type": "MODIFIED", "object": "pod"}\n', "bad_event"),
    ("unknown_type", b'{"type": "EXPLODED", "object": {}}\n', "bad_event"),
    ("no_metadata", b'{"type": "ADDED", "object": {"kind": "Pod"}}\n', "bad_event"),
    ("metadata_a_list", b'{"type": "ADDED", "object": {"metadata": []}}\n', "bad_event"),
    ("deleted_without_uid", b'{"type": "DELETED", "object": {"metadata": {}}}\n', "bad_event"),
    ("not_json", b"{{{{\n", "bad_event"),
    ("deep_json", b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad_event"),
    ("not_utf8", b'{"type": "\xff\xfe"}\n', "bad_event"),
]


@pytest.mark.parametrize(("name", "line", "reason"), WATCH_LINES, ids=[c[0] for c in WATCH_LINES])
async def test_a_watch_event_of_an_unexpected_shape_is_counted_and_skipped(
    api: tuple[RawApi, str], name: str, line: bytes, reason: str
) -> None:
    fake, url = api
    fake.list_bodies = [pod_list(GOOD)]

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        assert await next_change(changes) == {"llm/good-0"}
        fake.lines.put_nowait(line)
        fake.lines.put_nowait(
            json.dumps({"type": "ADDED", "object": pod("good-1", "u-g1", rv="95")}).encode() + b"\n"
        )
        assert await next_change(changes) == {"llm/good-0", "llm/good-1"}  # the watch goes on

    with peak_memory():
        watcher, runner = await run_watcher(url, steps)
    assert dict(watcher.errors) == {reason: 1}
    assert runner.status().errors_total == {reason: 1}
    assert fake.watches == 1


async def test_a_line_over_the_bound_ends_the_watch_and_lists_again(
    api: tuple[RawApi, str],
) -> None:
    fake, url = api
    fake.list_bodies = [pod_list(GOOD), pod_list(GOOD, pod("good-1", "u-g1", rv="95"), rv="200")]

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        assert await next_change(changes) == {"llm/good-0"}
        fake.lines.put_nowait(b'{"type": "ADDED", "object": {"pad": "' + b"x" * 300_000)
        assert await next_change(changes) == {"llm/good-0", "llm/good-1"}  # the second list

    with peak_memory():
        watcher, _ = await run_watcher(url, steps, max_line_bytes=128 * 1024)
    assert watcher.errors["line_too_long"] == 1
    assert fake.lists == 2


LINE_LIMIT = 4096


@pytest.mark.parametrize("extra", [0, 1], ids=["at_the_limit", "one_past_it"])
async def test_a_whole_line_in_one_chunk_is_held_to_the_bound(
    api: tuple[RawApi, str], extra: int
) -> None:
    # Before: only the partial line left after a chunk was measured, so a complete line up to
    # one chunk past the bound passed whenever its newline came in the same chunk.
    fake, url = api
    fake.list_bodies = [pod_list(GOOD), pod_list(GOOD, pod("good-2", "u-g2", rv="96"), rv="300")]
    event = json.dumps({"type": "ADDED", "object": pod("good-1", "u-g1", rv="95")}).encode()
    line = event + b" " * (LINE_LIMIT + extra - len(event))  # valid JSON of exactly that size

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        assert await next_change(changes) == {"llm/good-0"}
        fake.lines.put_nowait(line + b"\n")  # one write: the line and its newline together
        expected = {"llm/good-0", "llm/good-2"} if extra else {"llm/good-0", "llm/good-1"}
        assert await next_change(changes) == expected  # past it: the watch ends, lists again

    watcher, _ = await run_watcher(url, steps, max_line_bytes=LINE_LIMIT)
    assert watcher.errors["line_too_long"] == extra
    assert fake.lists == 1 + extra


LIST_BODIES: list[tuple[str, bytes, str]] = [
    ("an_array", b"[]", "bad_list"),
    ("null", b"null", "bad_list"),
    ("items_a_string", b'{"metadata": {}, "items": "pods"}', "bad_list"),
    ("metadata_null", b'{"metadata": null, "items": []}', "bad_list"),
    ("not_json", b"<html>proxy error</html>", "bad_list"),
    ("deep_json", b"[" * 100_000 + b"]" * 100_000, "bad_list"),
]


@pytest.mark.parametrize(("name", "body", "reason"), LIST_BODIES, ids=[c[0] for c in LIST_BODIES])
async def test_a_list_of_an_unexpected_shape_backs_off_and_is_retried(
    api: tuple[RawApi, str], name: str, body: bytes, reason: str
) -> None:
    fake, url = api
    fake.list_bodies = [body, pod_list(GOOD)]

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        assert await next_change(changes) == {"llm/good-0"}  # the retried list

    watcher, runner = await run_watcher(url, steps)
    assert dict(watcher.errors) == {reason: 1}
    assert runner.status().errors_total == {reason: 1}
    assert runner.status().up


async def test_discovery_is_down_in_status_while_the_list_fails(api: tuple[RawApi, str]) -> None:
    fake, url = api
    fake.list_bodies = [b"[]"]  # for ever

    async def steps(watcher: PodWatcher, changes: asyncio.Queue[set[str]]) -> None:
        while await asyncio.wait_for(fake.listed.get(), 5) < 4:  # three failed, a fourth asked
            pass

    _, runner = await run_watcher(url, steps)
    status = runner.status()
    assert not status.up
    assert status.last_error is not None
    assert status.last_error.startswith("bad_list")
    assert status.errors_total["bad_list"] >= 3


@settings(max_examples=60, deadline=None)
@given(
    event=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=6),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["type", "object", "metadata", "uid", "code", "annotations"]),
                children,
                max_size=4,
            )
        ),
        max_leaves=15,
    )
)
def test_any_decoded_watch_event_is_applied_or_counted(event: Any) -> None:
    watcher = PodWatcher.__new__(PodWatcher)  # state only: no session needed for _apply
    PodWatcher.__init__(watcher, None, "http://x", "n")  # type: ignore[arg-type]
    raised = None
    try:
        watcher._apply(event)
    except Exception as exc:  # only the two documented outcomes of an ERROR event
        raised = type(exc).__name__
    assert raised in {None, "Gone", "DiscoveryError"}
    assert all(t.engine.count("/") == 1 for t in watcher.targets.values())
