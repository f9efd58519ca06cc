"""New TLS connections get the certificate and key on disk now, without a restart.

cert-manager renews a certificate into its Secret and the kubelet swaps the mounted files (a new
``..data`` symlink, so new inodes). At each TLS handshake the listening context's SNI callback
(called for every ClientHello, with or without SNI) compares the files' identity (device,
inode, size, mtime, ctime) with what was loaded; when it changed, a new SSLContext is built from
the files and handed to that connection and the ones after it. Connections already open keep the
certificate they got. A new pair that does not load (a key that does not match, a half-written
file) keeps the previous context, is logged and counted once per change, and is tried again when
the files change next. exporter-toolkit reloads the same way (GetConfigForClient).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import structlog

from moe_watch.serving.web_config import TlsServerConfig, WebConfigError, ssl_context

log = structlog.get_logger("moe_watch.serving.cert_reload")

FileStamp = tuple[int, int, int, int, int]
Stamp = tuple[FileStamp | None, ...]


def file_stamp(paths: tuple[Path, ...]) -> Stamp:
    """Each file's identity, None for one that cannot be read (being replaced, say)."""
    stamps: list[FileStamp | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


class CertificateReloader:
    """``context`` is the one to listen with; it switches each new connection to the newest
    context that loaded. ``reloads`` and ``failures`` count what happened since start."""

    def __init__(self, tls: TlsServerConfig, source: Path | None = None) -> None:
        self._tls = tls
        self._source = source
        files = [tls.cert_file, tls.key_file]
        if tls.client_ca_file is not None:
            files.append(tls.client_ca_file)
        self._files = tuple(files)
        self._loaded = file_stamp(self._files)  # taken before reading: a change meanwhile shows
        self.context = ssl_context(tls, source)  # WebConfigError at start-up, as before
        self.context.sni_callback = self._on_client_hello
        self._current = self.context
        self._refused: Stamp | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None

    def current(self) -> ssl.SSLContext:
        """The context for a new connection, rebuilt first when the files changed."""
        stamp = file_stamp(self._files)
        if stamp in (self._loaded, self._refused):
            return self._current
        try:
            fresh = ssl_context(self._tls, self._source)
        except WebConfigError as exc:
            self._refused = stamp
            self.failures += 1
            self.last_error = str(exc)
            log.error(
                "tls_reload_failed",
                error=str(exc),
                kept="the certificate loaded before",
                failures=self.failures,
            )
            return self._current
        self._current, self._loaded, self._refused = fresh, stamp, None
        self.reloads += 1
        log.info("tls_reloaded", cert_file=str(self._tls.cert_file), reloads=self.reloads)
        return self._current

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        try:
            current = self.current()
            if connection.context is not current:
                connection.context = current
        except Exception:  # never fail a handshake over a reload: serve what is loaded
            log.exception("tls_reload_check_failed")
