"""Writes one worker's expert counts to its file, every interval, from a daemon thread.

Stdlib only. The thread never touches the serving step: it asks ``snapshot`` for the counts
(the counter copies them off the device itself, see counter.py) and writes them atomically with
``moe_watch.expert_file``. Write failures (a read-only or missing volume) are logged once and
retried every interval; the file is removed at clean exit and when counting stops.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from moe_watch.expert_file import CountsFile, write_counts_file

log = logging.getLogger("moe_watch.vllm_plugin")


class Publisher:
    def __init__(
        self, path: Path, interval: float, snapshot: Callable[[], CountsFile | None]
    ) -> None:
        self.path = path
        self.interval = interval
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.writes = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="moe-watch-experts", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.publish_once():
                self.close()
                return
            if self._stop.wait(self.interval):
                return

    def publish_once(self) -> bool:
        """Write the current counts. False when the counter has stopped (nothing more to write)."""
        try:
            data = self._snapshot()
        except Exception:
            log.warning(
                "moe-watch plugin: reading the expert counts failed; stopping", exc_info=True
            )
            return False
        if data is None:
            return False
        try:
            write_counts_file(self.path, data)
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "moe-watch plugin: cannot write %s (%s); retrying every %.0f s",
                    self.path,
                    exc,
                    self.interval,
                )
            self._failing = True
            return True
        except Exception:  # not the volume: a bug; stop rather than fail every interval
            log.warning(
                "moe-watch plugin: writing the expert counts failed; stopping", exc_info=True
            )
            return False
        if self._failing:
            log.info("moe-watch plugin: writing %s again", self.path)
            self._failing = False
        self.writes += 1
        return True

    def close(self) -> None:
        """Stop writing and remove the file (best effort: a killed process leaves it behind)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)  # let a write in progress finish before removing the file
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
