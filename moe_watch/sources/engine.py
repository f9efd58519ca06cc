"""Scrape one serving engine's /metrics (and, now and then, its metadata endpoints).

Failures are contained here and reported as ``SourceError`` with a short reason: the runner
counts them per target, so one dead engine never hides the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from moe_watch import limits
from moe_watch.config import TargetConfig
from moe_watch.samples import EngineScrape
from moe_watch.sources.base import Problems, SourceError
from moe_watch.sources.body_budget import BodyBudget, BodyBudgetSpent, BodyReader
from moe_watch.sources.exposition import (
    ExpositionError,
    ExpositionLayout,
    parse_engine_exposition,
)
from moe_watch.sources.safe_io import BodyTooLarge, loads_json, read_body, utf8_error

# /v1/models and /version change only on restart; re-read them this often.
METADATA_REFRESH_SECONDS = 60.0
ACCEPT = "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"


class EngineSource:
    """One target. Create many; they share one aiohttp session."""

    def __init__(
        self,
        target: TargetConfig,
        session: aiohttp.ClientSession,
        *,
        timeout_seconds: float,
        max_body_bytes: int,
        bodies: BodyBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        # shared by every engine of the agent: one budget for the bodies held at once
        self._bodies = bodies if bodies is not None else BodyBudget(limits.BODY_BYTES_IN_FLIGHT)
        self._session = session
        self._timeout = timeout_seconds
        self._max_body = max_body_bytes
        self._clock = clock
        self._kind: str = target.kind
        self._max_model_len: int | None = None
        self._version: str | None = None
        self._metadata_at: float | None = None
        self._layout = ExpositionLayout()  # the last scrape's lines, parsed: reused while equal

    @property
    def name(self) -> str:
        return f"engine:{self.target.name}"

    @property
    def metrics_url(self) -> str:
        return self.target.url + self.target.metrics_path

    async def collect(self, problems: Problems) -> EngineScrape:
        with self._bodies.reader() as reader:  # the body counts until it is parsed
            try:
                body = await self._fetch(self.metrics_url, self._max_body, reader)
                if reader.dropped:  # read whole, then dropped while waiting to be parsed
                    raise BodyBudgetSpent
            except BodyBudgetSpent:
                raise SourceError(
                    "body_budget",
                    f"dropped after {reader.held} bytes: the largest of the engine bodies in "
                    f"flight when they passed max_body_bytes_in_flight "
                    f"({self._bodies.limit} bytes, all engines together)",
                ) from None
            invalid = utf8_error(body)
            if invalid is not None:
                raise SourceError("encoding", f"response is not UTF-8 ({invalid})")
            try:  # the body as bytes: only the lines of mapped families become strings
                parsed = parse_engine_exposition(body, self._kind, layout=self._layout)
            except ExpositionError as exc:
                raise SourceError(exc.reason, str(exc)) from None
            del body
        self._kind = parsed.kind  # detected once, then fixed: a later garbage body is an error
        if parsed.series_dropped:
            problems.add("series_limit")
        if parsed.labels_dropped:
            problems.add("label_too_long")
        now = self._clock()
        if self._metadata_at is None or now - self._metadata_at >= METADATA_REFRESH_SECONDS:
            await self._refresh_metadata(problems)
            self._metadata_at = now
        info = dict(parsed.info)
        if self._version:
            info["version"] = self._version
        return EngineScrape(
            engine=self.target.name,
            kind=parsed.kind,
            timestamp=now,
            models=parsed.models,
            info=info,
            max_model_len=self._max_model_len,
            dropped_samples=parsed.dropped_samples,
        )

    async def _fetch(self, url: str, limit: int, reader: BodyReader | None = None) -> bytes:
        try:  # one bound for connect + headers + the whole body: a trickling target is a hang
            return await asyncio.wait_for(self._read(url, limit, reader), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError(
                "timeout", f"no complete answer from {url} in {self._timeout:g}s"
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise SourceError("connect", f"cannot reach {url}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise SourceError("http", f"request to {url} failed: {exc}") from None

    async def _read(self, url: str, limit: int, reader: BodyReader | None = None) -> bytes:
        # Redirects are not followed: a target answers where it was configured or is down.
        async with self._session.get(
            url, headers={"Accept": ACCEPT}, allow_redirects=False
        ) as response:
            if response.status != 200:
                raise SourceError("http_status", f"{url} answered HTTP {response.status}")
            try:
                return await read_body(response, limit, reader)
            except BodyTooLarge as exc:
                sent = (
                    f"more than {limit} bytes"
                    if exc.declared is None
                    else f"{exc.declared} bytes, over the {limit}-byte cap"
                )
                raise SourceError("body_too_large", f"{url} sent {sent}") from None

    async def _refresh_metadata(self, problems: Problems) -> None:
        """max_model_len from /v1/models and the version; failures never fail the scrape."""
        if self._kind != "vllm":
            return
        models = await self._json(self.target.url + "/v1/models", problems)
        if isinstance(models, dict):
            for entry in models.get("data") or []:
                value = entry.get("max_model_len") if isinstance(entry, dict) else None
                if isinstance(value, int | float):  # the first model that states one decides
                    self._max_model_len = max_model_len(value)
                    if self._max_model_len is None:
                        problems.add("bad_value")
                    break
        version = await self._json(self.target.url + "/version", problems)
        text = version.get("version") if isinstance(version, dict) else None
        if isinstance(text, str):
            if len(text) <= limits.LABEL_VALUE_CHARS:
                self._version = text
            else:
                problems.add("label_too_long")

    async def _json(self, url: str, problems: Problems) -> Any:
        try:
            body = await self._fetch(url, limits.METADATA_BYTES)
            return loads_json(body)
        except (SourceError, ValueError):
            problems.add("metadata")
            return None

    async def close(self) -> None:
        """The shared session belongs to the agent."""


def max_model_len(value: float) -> int | None:
    """A context length as /v1/models states it: a whole number of tokens in
    [1, limits.MODEL_LEN]; None (refused) for anything else, a bool or 1e309 included."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= limits.MODEL_LEN else None
