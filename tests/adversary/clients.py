"""Raw HTTP/1.1 clients of the agent's own server, as an attacker writes them: blocking sockets
on loopback, every wait bounded by a deadline, every socket closed by whoever opened it."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator

Address = tuple[str, int]
WAIT = 5.0  # seconds any single read may wait before the client gives up


def address(url: str) -> Address:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(where: Address, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # set before connecting: it fixes the window the agent sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock


def request(path: str, headers: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: agent\r\n".encode() + headers + b"\r\n"


def send(sock: socket.socket, data: bytes) -> bool:
    """False when the agent has already closed the connection."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


class Reader:
    """Reads HTTP answers off one connection; None where the agent closed it first."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.received = 0  # bytes of answers received in all
        self.closed = False  # the agent closed (or reset) the connection

    def _more(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0 or self.closed:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buffer += chunk
        self.received += len(chunk)
        return True

    def answer(self, seconds: float = WAIT) -> tuple[int, bytes] | None:
        """The next answer's status and body (its Content-Length), or None."""
        deadline = time.monotonic() + seconds
        while b"\r\n\r\n" not in self.buffer:
            if not self._more(deadline):
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(
            (int(line.split(b":", 1)[1]) for line in lines[1:]
             if line.lower().startswith(b"content-length:")), 0,
        )  # fmt: skip
        while len(self.buffer) < length:
            if not self._more(deadline):
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, body

    def until_closed(self, seconds: float) -> bool:
        """Read (and drop) whatever comes until the agent closes the connection."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            self.buffer = b""
            if not self._more(deadline) and not self.closed:
                return False
        return True


def closed_by_agent(sock: socket.socket) -> bool:
    """Whether the agent has closed ``sock`` by now (readable with nothing, or reset); any
    data waiting is left unread."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list of sockets, every one closed when the block ends."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()
