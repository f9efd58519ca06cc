"""Serving pods on this node, kept current with the Kubernetes list+watch protocol.

``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`` lists them and gives a resourceVersion;
``...&watch=1&resourceVersion=<rv>&allowWatchBookmarks=true`` then streams one JSON event per line
(ADDED, MODIFIED, DELETED, BOOKMARK, ERROR). A dropped stream resumes from the last
resourceVersion; ``410 Gone`` (the version fell out of etcd's window) means list again; any other
failure backs off exponentially. A pod is a target when it is annotated
``moe-watch.io/scrape: "true"`` (port ``moe-watch.io/port``, default 8000; path
``moe-watch.io/path``, default /metrics), is Running and has an IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl as ssl_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("moe_watch.discovery")

SCRAPE = "moe-watch.io/scrape"
PORT = "moe-watch.io/port"
PATH = "moe-watch.io/path"


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


def target_of(pod: dict[str, Any]) -> PodTarget | None:
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    annotations = meta.get("annotations") or {}
    if str(annotations.get(SCRAPE, "")).lower() != "true":
        return None
    ip = status.get("podIP")
    if status.get("phase") != "Running" or not ip:
        return None
    port = str(annotations.get(PORT, "8000"))
    host = f"[{ip}]" if ":" in ip else ip
    return PodTarget(
        meta.get("namespace", ""),
        meta.get("name", ""),
        meta.get("uid", ""),
        f"http://{host}:{port}",
        annotations.get(PATH, "/metrics"),
    )


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class PodWatcher:
    """Keeps ``targets`` (pod uid -> PodTarget) current; ``on_change`` runs after every change."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api: str,
        node: str,
        *,
        headers: dict[str, str] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        on_change: Callable[[dict[str, PodTarget]], None] | None = None,
        max_backoff_seconds: float = 30.0,
        watch_timeout_seconds: int = 300,
    ) -> None:
        self._session = session
        self._api = api.rstrip("/")
        self._node = node
        self._headers = headers or {}
        self._ssl: ssl_module.SSLContext | bool = ssl if ssl is not None else True
        self._on_change = on_change
        self._max_backoff = max_backoff_seconds
        self._watch_timeout = watch_timeout_seconds
        self.targets: dict[str, PodTarget] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        need_list = True
        while not stop.is_set():
            try:
                if need_list:
                    await self.list()
                    need_list = False
                await self.watch(stop)
                failures = 0  # a clean end of the watch (server timeout): resume from the version
            except Gone:
                log.info("watch expired; listing again", resource_version=self.resource_version)
                need_list = True
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                failures += 1
                delay = min(self._max_backoff, 0.5 * 2 ** min(failures, 10)) * random.uniform(
                    0.8, 1.2
                )
                log.warning(
                    "pod discovery failed; backing off",
                    error=str(exc),
                    retry_in_seconds=round(delay, 2),
                )
                need_list = need_list or failures > 3
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def _url(self, **params: str) -> str:
        query = "&".join(
            f"{k}={v}"
            for k, v in {"fieldSelector": f"spec.nodeName={self._node}", **params}.items()
        )
        return f"{self._api}/api/v1/pods?{query}"

    async def list(self) -> None:
        async with self._session.get(self._url(), headers=self._headers, ssl=self._ssl) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message="pod list failed"
                )
            body = await response.json()
        self.resource_version = body.get("metadata", {}).get("resourceVersion", "")
        self.targets = {
            t.uid: t for t in (target_of(p) for p in body.get("items", [])) if t is not None
        }
        self._changed()
        self.synced.set()

    async def watch(self, stop: asyncio.Event) -> None:
        url = self._url(
            watch="1",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self._watch_timeout),
        )
        async with self._session.get(url, headers=self._headers, ssl=self._ssl) as response:
            if response.status == 410:
                raise Gone()
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message="pod watch failed"
                )
            async for line in response.content:
                if stop.is_set():
                    return
                if line.strip():
                    self._apply(json.loads(line))

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object", {})
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ValueError(f"watch error: {obj.get('message', obj)}")
        version = obj.get("metadata", {}).get("resourceVersion")
        if version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        uid = obj.get("metadata", {}).get("uid", "")
        target = target_of(obj) if kind in ("ADDED", "MODIFIED") else None
        before = self.targets.get(uid)
        if target is None:
            self.targets.pop(uid, None)
        else:
            self.targets[uid] = target
        if before != target:
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(dict(self.targets))
