"""Serving pods on this node, kept current with the Kubernetes list+watch protocol.

``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`` lists them and gives a resourceVersion;
``...&watch=1&resourceVersion=<rv>&allowWatchBookmarks=true`` then streams one JSON event per line
(ADDED, MODIFIED, DELETED, BOOKMARK, ERROR). A dropped stream resumes from the last
resourceVersion; ``410 Gone`` (the version fell out of etcd's window) means list again. A pod is
a target when it is annotated ``moe-watch.io/scrape: "true"`` (port ``moe-watch.io/port``, default
8000; path ``moe-watch.io/path``, default /metrics), is Running and has an IP.

Friendly to the API server and contained (docs/configuration.md, "Bounds"):
- every failure (410 included, and a watch that ends at once) backs off exponentially with
  jitter, and two lists are never closer than ``min_relist_seconds``;
- list bodies and watch lines are read up to a byte bound; a body or event of an unexpected
  shape is counted (``bad_list``, ``bad_event``) and skipped, never raised out of the task;
- an annotated pod whose annotations or names do not make a valid target (a path without a
  leading ``/``, a port out of range, a namespace/pod id over 128 characters) is counted as
  ``bad_pod`` and skipped: someone else's pod never takes this node's agent down;
- at most ``max_targets`` pods are targets (first by namespace/pod in a list; a watch adds no
  more once full); the others are counted as ``too_many_targets`` and logged;
- the service-account token is re-read on every connection (bound tokens rotate; EKS rejects
  stale ones after 90 days), so a 401 is followed by a connection with the current token;
- ``DiscoverySource`` shows the watcher in /status and ``moe_watch_collect_errors_total``
  ``{source="discovery",reason=...}`` like any other source.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import ssl as ssl_module
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import ValidationError

from moe_watch import limits
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.safe_io import BodyTooLarge, loads_json, read_body

log = structlog.get_logger("moe_watch.discovery")

SCRAPE = "moe-watch.io/scrape"
PORT = "moe-watch.io/port"
PATH = "moe-watch.io/path"

# Bounds (moe_watch/limits.py, docs/limits.md); the rest is pacing toward the API server.
MAX_LIST_BYTES = limits.LIST_BYTES  # one pod list
MAX_LINE_BYTES = limits.WATCH_LINE_BYTES  # one watch event (one pod object)
MIN_RELIST_SECONDS = 5.0  # floor between two lists
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner is a failure: back off before the next
MAX_BACKOFF_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 30.0  # a list, and the headers of a watch
_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
_LOGGED_MAX = 1024


@dataclass(frozen=True)
class PodTarget:
    namespace: str
    pod: str
    uid: str
    url: str
    metrics_path: str

    @property
    def engine(self) -> str:
        return f"{self.namespace}/{self.pod}"


class BadPod(ValueError):
    """An annotated pod that does not make a valid target."""


def target_of(pod: dict[str, Any]) -> PodTarget | None:
    """The pod's target; None when it is not one (not annotated, not running, no IP yet).

    Raises BadPod when it is annotated but its annotations or names do not make a valid target.
    """
    from moe_watch.config import TargetConfig

    meta, status = pod.get("metadata"), pod.get("status")
    meta = meta if isinstance(meta, dict) else {}
    status = status if isinstance(status, dict) else {}
    annotations = meta.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    if str(annotations.get(SCRAPE, "")).lower() != "true":
        return None
    ip = status.get("podIP")
    if status.get("phase") != "Running" or not ip:
        return None
    try:
        address = ipaddress.ip_address(str(ip))
        port = int(str(annotations.get(PORT, "8000")))
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        namespace, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
        if not all(isinstance(v, str) and v for v in (namespace, name, uid)):
            raise ValueError("no namespace, name or uid")
        path = annotations.get(PATH, "/metrics")
        host = f"[{address}]" if address.version == 6 else str(address)
        config = TargetConfig(
            name=f"{namespace}/{name}", url=f"http://{host}:{port}", metrics_path=str(path)
        )
    except (ValueError, ValidationError) as exc:
        raise BadPod(_one_line(exc)) from None
    return PodTarget(str(namespace), str(name), str(uid), config.url, config.metrics_path)


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


class DiscoveryError(Exception):
    """One failed list or watch; ``reason`` is the label value it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Gone(DiscoveryError):
    """The watch's resourceVersion is too old: list again."""

    def __init__(self) -> None:
        super().__init__("gone", "410 Gone: the resourceVersion is too old; listing again")


class PodWatcher:
    """Keeps ``targets`` (pod uid -> PodTarget) current; ``on_change`` runs after every change.

    ``credentials`` (called on every connection) gives the Authorization headers: the service
    account token is re-read each time, so a rotated token is used from the next connection on.
    ``errors`` counts every failure and skipped item by reason; ``failing`` is the current
    failure (None while the watch is healthy).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api: str,
        node: str,
        *,
        headers: dict[str, str] | None = None,
        credentials: Callable[[], dict[str, str]] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        on_change: Callable[[dict[str, PodTarget]], None] | None = None,
        max_backoff_seconds: float = MAX_BACKOFF_SECONDS,
        watch_timeout_seconds: int = 300,
        min_relist_seconds: float = MIN_RELIST_SECONDS,
        min_watch_seconds: float = MIN_WATCH_SECONDS,
        max_list_bytes: int = MAX_LIST_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
        request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        max_targets: int = limits.TARGETS_PER_AGENT,
    ) -> None:
        self._session = session
        self._api = api.rstrip("/")
        self._node = node
        self._static_headers = headers or {}
        self._credentials = credentials
        self._ssl: ssl_module.SSLContext | bool = ssl if ssl is not None else True
        self._on_change = on_change
        self._max_backoff = max_backoff_seconds
        self._watch_timeout = watch_timeout_seconds
        self._min_relist = min_relist_seconds
        self._min_watch = min_watch_seconds
        self._max_list = max_list_bytes
        self._max_line = max_line_bytes
        self._request_timeout = request_timeout_seconds
        self._max_targets = max_targets
        self.targets: dict[str, PodTarget] = {}
        self.resource_version = ""
        self.lists = 0
        self.requests = 0
        self.synced = asyncio.Event()
        self.errors: Counter[str] = Counter()
        self.failing: tuple[str, str] | None = None
        self._logged: dict[tuple[str, str], None] = {}

    def _headers(self) -> dict[str, str]:
        headers = dict(self._static_headers)
        if self._credentials is not None:
            try:
                headers.update(self._credentials())
            except Exception as exc:  # an unreadable token file: try without, and say why
                self._count("credentials", f"cannot read the credentials: {exc}")
        return headers

    async def run(self, stop: asyncio.Event) -> None:
        """List, then watch, until ``stop``; never raises (except cancellation)."""
        loop = asyncio.get_running_loop()
        failures = 0
        need_list = True
        last_list: float | None = None
        while not stop.is_set():
            try:
                if need_list:
                    if last_list is not None:
                        floor = self._min_relist - (loop.time() - last_list)
                        if floor > 0 and await _sleep(stop, floor):
                            return
                    last_list = loop.time()
                    if await _until_stopped(self.list(), stop):
                        return
                    need_list = False
                started = loop.time()
                if await _until_stopped(self.watch(stop), stop):
                    return
                if loop.time() - started < self._min_watch:
                    raise DiscoveryError("watch_ended", "the watch ended at once")
                failures = 0  # a clean end of a long watch: resume from the version
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing ends the task but stop
                reason, message = _classify(exc)
                if reason == "internal":
                    log.exception("pod discovery failed unexpectedly")
            failures += 1
            need_list = need_list or reason in ("gone", "line_too_long") or failures > 3
            self._count(reason, message)
            self.failing = (reason, message)
            delay = min(self._max_backoff, 0.5 * 2 ** min(failures - 1, 16))
            delay *= random.uniform(0.5, 1.0)  # jitter: agents on every node do not align
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "pod discovery failed; backing off",
                    reason=reason,
                    error=message,
                    failures=failures,
                    retry_in_seconds=round(delay, 2),
                )
            if await _sleep(stop, delay):
                return

    def _url(self, **params: str) -> str:
        query = "&".join(
            f"{k}={v}"
            for k, v in {"fieldSelector": f"spec.nodeName={self._node}", **params}.items()
        )
        return f"{self._api}/api/v1/pods?{query}"

    def _check_status(self, response: aiohttp.ClientResponse, what: str) -> None:
        if response.status == 200:
            return
        if response.status == 410:
            raise Gone()
        if response.status in (401, 403):
            raise DiscoveryError(
                "unauthorized", f"pod {what} answered HTTP {response.status}: token re-read next"
            )
        raise DiscoveryError("http_status", f"pod {what} answered HTTP {response.status}")

    async def list(self) -> None:
        self.requests += 1
        timeout = aiohttp.ClientTimeout(total=self._request_timeout)
        async with self._session.get(
            self._url(),
            headers=self._headers(),
            ssl=self._ssl,
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            self._check_status(response, "list")
            try:
                raw = await read_body(response, self._max_list)
            except BodyTooLarge as exc:
                size = f"over {self._max_list}" if exc.declared is None else exc.declared
                raise DiscoveryError("too_large", f"the pod list is {size} bytes") from None
        try:
            body = loads_json(raw)
        except ValueError as exc:  # TooDeep too
            raise DiscoveryError("bad_list", f"the pod list is not JSON ({exc})"[:300]) from None
        meta = body.get("metadata") if isinstance(body, dict) else None
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(meta, dict) or not isinstance(items, (list, type(None))):
            raise DiscoveryError("bad_list", "the pod list is not a PodList object")
        self.lists += 1
        version = meta.get("resourceVersion")
        self.resource_version = version if isinstance(version, str) else ""
        targets: dict[str, PodTarget] = {}
        for item in items or ():
            if not isinstance(item, dict):
                self._count("bad_pod", "a list item is not an object")
                continue
            target = self._target(item)
            if target is not None:
                targets[target.uid] = target
        if len(targets) > self._max_targets:
            ordered = sorted(targets.values(), key=lambda t: (t.namespace, t.pod, t.uid))
            kept, dropped = ordered[: self._max_targets], ordered[self._max_targets :]
            self._over_limit(len(dropped), tuple(t.engine for t in dropped[:5]))
            targets = {t.uid: t for t in kept}
        self.targets = targets
        self.failing = None
        self._changed()
        self.synced.set()

    async def watch(self, stop: asyncio.Event) -> None:
        url = self._url(
            watch="1",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self._watch_timeout),
        )
        self.requests += 1
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._request_timeout,
            sock_read=self._watch_timeout + self._request_timeout,
        )
        async with self._session.get(
            url, headers=self._headers(), ssl=self._ssl, timeout=timeout, allow_redirects=False
        ) as response:
            self._check_status(response, "watch")
            self.failing = None
            async for line in _lines(response.content, self._max_line):
                if stop.is_set():
                    return
                if line.strip():
                    self._apply_line(line)

    def _apply_line(self, line: bytes) -> None:
        try:
            event = loads_json(line)
        except ValueError:  # TooDeep too
            self._count("bad_event", "a watch line is not JSON")
            return
        self._apply(event)

    def _apply(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(kind, str) or kind not in _EVENT_TYPES or not isinstance(obj, dict):
            self._count("bad_event", f"a watch event of type {str(kind)[:40]!r} without an object")
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise DiscoveryError(
                "watch_error", f"watch error: {str(obj.get('message', obj))[:300]}"
            )
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            self._count("bad_event", "a watch event without metadata")
            return
        version = meta.get("resourceVersion")
        if isinstance(version, str) and version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        uid = meta.get("uid")
        if not isinstance(uid, str) or not uid:
            self._count("bad_event", "a watch event without a pod uid")
            return
        target = self._target(obj) if kind in ("ADDED", "MODIFIED") else None
        before = self.targets.get(uid)
        if target is not None and before is None and len(self.targets) >= self._max_targets:
            self._over_limit(1, (target.engine,), logged=self.errors["too_many_targets"] % 100 == 0)
            return
        if target is None:
            self.targets.pop(uid, None)
        else:
            self.targets[uid] = target
        if before != target:
            self._changed()

    def _target(self, pod: dict[str, Any]) -> PodTarget | None:
        try:
            return target_of(pod)
        except BadPod as exc:
            meta = pod.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            where = f"{str(meta.get('namespace'))[:63]}/{str(meta.get('name'))[:253]}"
            self._count("bad_pod", f"pod {where} is annotated but not a valid target: {exc}")
            return None

    def _over_limit(self, dropped: int, first: tuple[str, ...], *, logged: bool = True) -> None:
        self.errors["too_many_targets"] += 1
        if not logged:  # a watch adding pods past the limit: one line per hundred
            return
        log.warning(
            "pod discovery dropped targets over the limit",
            reason="too_many_targets",
            limit=self._max_targets,
            dropped=dropped,
            first_dropped=first,
        )

    def _count(self, reason: str, message: str) -> None:
        self.errors[reason] += 1
        key = (reason, message[:200])
        if reason in ("bad_pod", "bad_event", "credentials") and key not in self._logged:
            self._logged[key] = None
            while len(self._logged) > _LOGGED_MAX:
                del self._logged[next(iter(self._logged))]
            log.warning("pod discovery skipped an item", reason=reason, error=message)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(dict(self.targets))


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, DiscoveryError):
        return exc.reason, str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", "the API server did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connect", f"cannot reach the API server: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return "http", f"request to the API server failed: {exc}"
    return "internal", f"{type(exc).__name__}: {exc}"


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` until it ends (its exception propagates) or ``stop`` is set (then it is
    cancelled: a watch blocked on a quiet stream ends at once). True when stopped."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return True
    task.result()  # re-raise the list's or the watch's failure
    return stop.is_set()


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True when stopped."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _lines(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The stream's lines, none longer than ``limit`` (a longer one ends the watch: list again)."""
    buffer = b""
    while True:
        chunk = await content.readany()
        if not chunk:
            if buffer:
                yield buffer
            return
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        # every line is measured, not only the partial one left over: a whole line that
        # arrives with its newline in one chunk is held to the same bound
        for line in complete:
            if len(line) > limit:
                raise DiscoveryError("line_too_long", f"a watch event is over {limit} bytes")
            yield line
        if len(buffer) > limit:
            raise DiscoveryError("line_too_long", f"a watch event is over {limit} bytes")


class DiscoverySource:
    """The watcher seen as a source: up while the watch is healthy, its failures and skipped
    items counted under ``source="discovery"``. Reads state only; the watch runs on its own."""

    def __init__(self, watcher: PodWatcher) -> None:
        self._watcher = watcher
        self._seen: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return "discovery"

    async def collect(self, problems: Problems) -> int:
        current = self._watcher.errors
        problems.reasons.update(current - self._seen)  # counted as they happened
        self._seen = Counter(current)
        if self._watcher.failing is not None:
            reason, message = self._watcher.failing
            raise SourceError(reason, message, counted=False)
        if not self._watcher.synced.is_set():
            raise SourceError("not_synced", "waiting for the first pod list", counted=False)
        return len(self._watcher.targets)

    async def close(self) -> None:
        """The agent stops the watch task."""
