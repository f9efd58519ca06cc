"""Read the tensors of a ``torch.save`` file without torch, and without running its pickle.

SGLang's expert-distribution recorder dumps ``{"rank": int, "logical_count": Tensor, ...}`` with
``torch.save``. The agent must not depend on torch (a 1 GB dependency for a DaemonSet) and must
not unpickle arbitrary objects from a file another process wrote, so this module implements the
small part of the format it needs: the zip layout (``<archive>/data.pkl`` + ``<archive>/data/<key>``)
and an unpickler that only knows how to rebuild plain tensors, dicts, lists and numbers.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moe_watch import limits
from moe_watch.sources.safe_io import FileRejected, open_regular

# Bounds (moe_watch/limits.py): a real SGLang dump is [passes, layers, experts] int32, a few MB
# at DeepSeek-V3 scale; its data.pkl is a few hundred bytes.
MAX_FILE_BYTES = limits.DUMP_FILE_BYTES  # the .pt file as stored
MAX_MEMBER_BYTES = limits.DUMP_MEMBER_BYTES  # one decompressed member: zip bombs stop here
MAX_PICKLE_BYTES = limits.DUMP_PICKLE_BYTES  # data.pkl, decompressed
MAX_TENSOR_CELLS = limits.TENSOR_CELLS  # elements of one tensor as declared
# A strided view is copied one run along its longest axis at a time: a 3-d tensor at
# TENSOR_CELLS has an axis of at least 256, so at most this many runs (~0.1 s here).
MAX_STRIDED_RUNS = limits.TENSOR_CELLS >> 8
# Legacy typed-storage class name -> array typecode (torch.save still writes these names).
_STORAGE_TYPES = {
    "IntStorage": "i",
    "LongStorage": "q",
    "ShortStorage": "h",
    "CharStorage": "b",
    "ByteStorage": "B",
    "FloatStorage": "f",
    "DoubleStorage": "d",
    "BoolStorage": "B",
}


class TorchFileError(FileRejected):
    """The file is not a torch.save zip file this reader understands (reason ``bad_file``), or
    one of its members is over a bound (reason ``too_large``)."""

    def __init__(self, message: str, reason: str = "bad_file") -> None:
        super().__init__(reason, message)


@dataclass(frozen=True, slots=True)
class Tensor:
    """A dense tensor: flat values in row-major order and its shape."""

    shape: tuple[int, ...]
    values: Sequence[float]

    def sum_leading_axis(self) -> list[list[float]]:
        """For a [N, A, B] tensor: the [A, B] sum over N, as nested lists."""
        if len(self.shape) != 3:
            raise TorchFileError(f"expected a 3-d tensor, got shape {list(self.shape)}")
        n, a, b = self.shape
        plane = a * b
        flat = [float(sum(self.values[j : n * plane : plane])) for j in range(plane)]
        return [flat[row * b : (row + 1) * b] for row in range(a)]


@dataclass(frozen=True, slots=True)
class _StorageType:
    typecode: str


def load_torch_file(
    path: Path | str,
    *,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Any:
    """The object a ``torch.save`` call wrote, with tensors as ``Tensor``.

    The file must be a regular file (not a symlink, FIFO or device) of at most ``max_file_bytes``;
    no member is decompressed past ``max_member_bytes``. Raises FileRejected (TorchFileError for
    the format) whose ``reason`` says why.
    """
    fd, info = open_regular(path)
    # Read from the file, not a copy of it: only the central directory and the members the
    # pickle names are read (a 64 MiB file at the limit once cost 128 MiB of the agent).
    with os.fdopen(fd, "rb") as file:
        if info.st_size > max_file_bytes:
            raise FileRejected("too_large", f"{path}: {info.st_size} bytes, over {max_file_bytes}")
        return _load_from(file, path, max_member_bytes)


def _load_from(file: IO[bytes], path: Path | str, max_member_bytes: int) -> Any:
    try:
        with zipfile.ZipFile(file) as archive:
            return _load(archive, max_member_bytes)
    except TorchFileError as exc:
        raise TorchFileError(f"{path}: {exc}", exc.reason) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError):
        raise TorchFileError(f"{path}: not a torch.save zip file") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        OverflowError,
        IndexError,
        AttributeError,
        MemoryError,
        RecursionError,
        UnicodeDecodeError,
        OSError,  # zlib.error is not one; covered below
    ) as exc:
        raise TorchFileError(f"{path}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # zlib.error and anything else a crafted archive can raise
        raise TorchFileError(f"{path}: {type(exc).__name__}: {exc}") from None


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, decompressed at most ``limit`` bytes whatever its header declares."""
    with archive.open(name) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise TorchFileError(f"{name} decompresses to more than {limit} bytes", "too_large")
    return data


def _load(archive: zipfile.ZipFile, max_member_bytes: int) -> Any:
    names = archive.namelist()
    pickles = [name for name in names if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("no data.pkl in the archive")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = _read_member(archive, prefix + "byteorder", 16).decode().strip()
    pkl = _read_member(archive, pickles[0], min(MAX_PICKLE_BYTES, max_member_bytes))
    return _Unpickler(io.BytesIO(pkl), archive, prefix, byteorder, max_member_bytes).load()


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        stream: IO[bytes],
        archive: zipfile.ZipFile,
        prefix: str,
        byteorder: str,
        max_member_bytes: int,
    ) -> None:
        super().__init__(stream)
        self._archive = archive
        self._prefix = prefix
        self._swap = byteorder != sys.byteorder
        self._max_member = max_member_bytes
        self._storages: dict[str, array[Any]] = {}
        self._storage_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} (only plain tensors are read)"
        )

    def persistent_load(self, pid: Any) -> array[Any]:
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            values = self._read_storage(f"{self._prefix}data/{key}", storage_type.typecode)
            if self._swap:
                values.byteswap()
            self._storages[key] = values
        return self._storages[key]

    def _read_storage(self, name: str, typecode: str) -> array[Any]:
        """The member's values, decompressed into their array a MiB at a time (never its bytes
        and the array at once), within one bound for all storages together."""
        values = array(typecode)
        pending = b""
        with self._archive.open(name) as stream:
            while chunk := stream.read(1 << 20):
                self._storage_bytes += len(chunk)
                if self._storage_bytes > self._max_member:  # many storages: one bound for all
                    raise TorchFileError(f"storages over {self._max_member} bytes", "too_large")
                data = pending + chunk if pending else chunk
                whole = len(data) - len(data) % values.itemsize
                values.frombytes(data[:whole])
                pending = data[whole:]
        if pending:
            raise TorchFileError(f"{name} is not a whole number of {typecode!r} elements")
        return values


def _rebuild_tensor(
    storage: array[Any], offset: int, size: Sequence[int], stride: Sequence[int], *_: Any
) -> Tensor:
    """A tensor view of ``storage``, checked before anything is allocated: integer sizes and
    strides, every element inside the storage, at most MAX_TENSOR_CELLS elements."""
    if not isinstance(storage, array):
        raise TorchFileError("a tensor without a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        raise TorchFileError("a tensor's size or stride is not a tuple")
    values = [offset, *size, *stride]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TorchFileError("a tensor's offset, sizes and strides must be non-negative integers")
    if len(size) != len(stride) or len(size) > 8:
        raise TorchFileError("a tensor's size and stride do not match")
    shape = tuple(size)
    count = 1
    for dim in shape:
        count *= dim
    if count > MAX_TENSOR_CELLS:
        raise TorchFileError(
            f"a tensor of shape {list(shape)} ({count} elements) is not a dump", "too_large"
        )
    if count and offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) >= len(
        storage
    ):
        raise TorchFileError(f"a tensor of shape {list(shape)} reaches past its storage")
    if _is_contiguous(shape, stride):
        if offset == 0 and count == len(storage):  # the whole storage: no copy of it
            return Tensor(shape, storage)
        return Tensor(shape, storage[offset : offset + count])
    return Tensor(shape, _gather(storage, offset, shape, stride, count))


def _gather(
    storage: array[Any], offset: int, shape: Sequence[int], stride: Sequence[int], count: int
) -> array[Any]:
    """A strided view copied out in row-major order, one C-level slice per run along its
    longest axis (cell by cell, a few hundred bytes declaring 2^24 cells cost 14 s of the
    thread every engine's cycle waits for)."""
    out = array(storage.typecode, [0]) * count
    if count == 0:
        return out
    axis = max(range(len(shape)), key=lambda k: shape[k])
    length, step = shape[axis], stride[axis]
    runs = count // length
    if runs > MAX_STRIDED_RUNS:
        raise TorchFileError(
            f"a strided tensor of shape {list(shape)} needs {runs} copies to rebuild", "too_large"
        )
    within = [1] * len(shape)  # the output's row-major strides
    for k in range(len(shape) - 2, -1, -1):
        within[k] = within[k + 1] * shape[k + 1]
    others = [k for k in range(len(shape)) if k != axis]
    jump = within[axis]
    for run in range(runs):
        source, target, rest = offset, 0, run
        for k in reversed(others):
            rest, coordinate = divmod(rest, shape[k])
            source += coordinate * stride[k]
            target += coordinate * within[k]
        if step == 0:  # a broadcast: one cell repeated
            out[target : target + length * jump : jump] = (
                array(storage.typecode, [storage[source]]) * length
            )
        else:
            out[target : target + length * jump : jump] = storage[
                source : source + length * step : step
            ]
    return out


def _is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True
