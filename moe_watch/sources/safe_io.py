"""Bounded, non-blocking reads of files other processes write (expert counts, dumps, logs),
and bounded reads of HTTP bodies (engine /metrics, the Kubernetes pod list).

Every file the agent reads from a shared directory is opened ``O_RDONLY | O_NONBLOCK`` (a FIFO
never blocks a worker thread), without following a symlink unless the operator named the path
itself (a container log path is a symlink), checked with ``fstat`` to be a regular file (not
``/dev/zero``, a FIFO, a socket or a directory), and read up to a byte bound. A refusal raises
``FileRejected`` whose ``reason`` becomes the ``reason`` label of
``moe_watch_collect_errors_total``.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp

from moe_watch.limits import JSON_DEPTH
from moe_watch.sources.body_budget import BodyBudgetSpent, BodyReader


class FileRejected(ValueError):
    """A file that is not read. ``reason``: not_regular, symlink, too_large, unreadable, bad_file,
    non_finite."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_regular(path: Path | str, *, follow_symlinks: bool = False) -> tuple[int, os.stat_result]:
    """A read-only, non-blocking descriptor of a regular file and its ``fstat``.

    The caller closes the descriptor. Raises FileNotFoundError when the file is gone (a writer
    removed it: not an error), FileRejected otherwise.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileRejected("symlink", f"{path}: a symbolic link (not followed)") from None
        raise FileRejected("unreadable", f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRejected("not_regular", f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular(path: Path | str, max_bytes: int, *, follow_symlinks: bool = False) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes."""
    fd, info = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        if info.st_size > max_bytes:
            raise FileRejected("too_large", f"{path}: {info.st_size} bytes, over {max_bytes}")
        return read_at_most(fd, max_bytes, str(path))
    finally:
        os.close(fd)


def read_at_most(fd: int, max_bytes: int, name: str) -> bytes:
    """Read ``fd`` to its end; FileRejected when it holds more than ``max_bytes`` (it grew)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
        except BlockingIOError:  # not for regular files, but never wait for a writer
            break
        except OSError as exc:
            raise FileRejected("unreadable", f"{name}: {exc.strerror or exc}") from None
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise FileRejected("too_large", f"{name}: more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class BodyTooLarge(Exception):
    """An HTTP body over its cap; ``declared``: its Content-Length when that alone said so."""

    def __init__(self, declared: int | None) -> None:
        super().__init__(declared)
        self.declared = declared


async def read_body(
    response: aiohttp.ClientResponse, limit: int, reader: BodyReader | None = None
) -> bytes:
    """The body, read in chunks and abandoned past ``limit`` bytes: the cap protects the
    agent's memory whatever the peer declares or sends. Raises BodyTooLarge. With a
    ``reader``, every chunk is counted in the agent's body budget, which may drop this body
    (BodyBudgetSpent) by closing its response."""
    if response.content_length is not None and response.content_length > limit:
        raise BodyTooLarge(response.content_length)
    if reader is not None:

        def abort() -> None:
            # wakes the read waiting for its next chunk now: closing alone leaves it waiting
            # (and its bytes held) until the scrape's timeout
            response.content.set_exception(BodyBudgetSpent())
            response.close()

        reader.abort = abort
    body = bytearray()  # grown in place: no list of chunks beside a joined copy at the end
    try:
        async for chunk in response.content.iter_chunked(64 * 1024):
            if len(body) + len(chunk) > limit:
                raise BodyTooLarge(None)
            if reader is not None:
                reader.take(len(chunk))
            body += chunk
    except aiohttp.ClientError:
        body.clear()
        if reader is not None and reader.dropped:  # its response closed under it
            raise BodyBudgetSpent from None
        raise
    except BaseException:
        # freed now: the exception's traceback keeps this frame, and the bytes with it, until
        # the garbage collector finds the cycle
        body.clear()
        raise
    if reader is not None and reader.dropped:  # a closed response may read as a short body
        raise BodyBudgetSpent
    return bytes(body)


async def read_head(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most the first ``limit`` bytes of the body (a refusal read for its message); the rest
    is never read, and the connection is closed rather than drained."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(min(limit, 64 * 1024)):
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            response.close()
            break
    return b"".join(chunks)


def utf8_error(body: bytes, step: int = 1 << 20) -> str | None:
    """Where ``body`` stops being UTF-8 ("invalid start byte at byte 12"), or None when it all
    is. Checked a MiB at a time: a 16 MiB body of wide characters never becomes a 64 MiB str."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    for start in range(0, len(body), step):
        try:
            decoder.decode(view[start : start + step], final=start + step >= len(body))
        except UnicodeDecodeError as exc:
            return f"{exc.reason} at byte {start + exc.start}"
    return None


class TooDeep(ValueError):
    """JSON nested deeper than its limit."""


def loads_json(raw: bytes | str, max_depth: int = JSON_DEPTH) -> Any:
    """``json.loads`` with a bound on nesting: TooDeep (a ValueError) past ``max_depth``
    levels, also where the parser itself would run out of stack (RecursionError)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    level: list[Any] = [value] if isinstance(value, (list, dict)) else []
    depth = 0
    while level:  # level by level over containers only: rows of numbers cost one C-level pass
        depth += 1
        if depth > max_depth:
            raise TooDeep(f"JSON nested deeper than {max_depth} levels")
        below: list[Any] = []
        for item in level:
            values = item.values() if isinstance(item, dict) else item
            kinds = set(map(type, values))
            if list in kinds or dict in kinds:
                below.extend(v for v in values if isinstance(v, (list, dict)))
        level = below
    return value
