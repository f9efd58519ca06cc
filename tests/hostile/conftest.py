"""Shared helpers of the hostile-input corpus: memory bounds and hand-built torch.save files."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Every case of the corpus runs under this bound on Python allocations (tracemalloc peak), unless
# it states its own: far below what the unbounded readers took (2.3 GB for /dev/zero, 5.5 GB
# for a .pt declaring 30000 x 30000, 3 GB for a zip bomb).
MEMORY_BOUND_BYTES = 64 * 1024 * 1024


@contextmanager
def peak_memory(limit: int = MEMORY_BOUND_BYTES) -> Iterator[None]:
    """Assert that the block's peak of Python allocations stays under ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB over the {limit / 2**20:.0f} MiB bound"


# A torch.save file written by hand (no torch here): protocol-2 pickle opcodes for
# {"logical_count": <tensor>} with a persistent storage record, inside the zip layout.


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    return b"\x8a\x08" + struct.pack("<q", value)  # LONG1, 8 bytes


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_opcodes(
    shape: tuple[int, ...],
    *,
    storage: str = "FloatStorage",
    key: str = "0",
    offset: int = 0,
    stride: tuple[int, ...] | None = None,
) -> bytes:
    if stride is None:
        stride, step = [], 1
        for dim in reversed(shape):
            stride.insert(0, step)
            step *= max(dim, 1)
    numel = 1
    for dim in shape:
        numel *= dim
    persistent = (
        _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)])
        + b"Q"
    )
    args = _tuple(
        [
            persistent,
            _int(offset),
            _tuple([_int(d) for d in shape]),
            _tuple([_int(s) for s in stride]),
            b"\x89",
            _global("collections", "OrderedDict") + b")R",
        ]
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_pt(
    path: Path,
    value_opcodes: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A torch.save zip whose data.pkl is ``{"logical_count": <value_opcodes>}``."""
    pkl = b"\x80\x02}" + _str("logical_count") + value_opcodes + b"s."
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", pkl)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)
