"""Read the tensors of a ``torch.save`` file without torch, and without running its pickle.

SGLang's expert-distribution recorder dumps ``{"rank": int, "logical_count": Tensor, ...}`` with
``torch.save``. The agent must not depend on torch (a 1 GB dependency for a DaemonSet) and must
not unpickle arbitrary objects from a file another process wrote, so this module implements the
small part of the format it needs: the zip layout (``<archive>/data.pkl`` + ``<archive>/data/<key>``)
and an unpickler that only knows how to rebuild plain tensors, dicts, lists and numbers.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


class TorchFileError(ValueError):
    """The file is not a torch.save zip file this reader understands."""


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


def load_torch_file(path: Path | str) -> Any:
    """The object a ``torch.save`` call wrote, with tensors as ``Tensor``. Raises TorchFileError."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _load(archive)
    except TorchFileError as exc:
        raise TorchFileError(f"{path}: {exc}") from None
    except zipfile.BadZipFile:
        raise TorchFileError(f"{path}: not a torch.save zip file") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        OverflowError,
    ) as exc:
        raise TorchFileError(f"{path}: {exc}") from None


def _load(archive: zipfile.ZipFile) -> Any:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("no data.pkl in the archive")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
        byteorder = archive.read(prefix + "byteorder").decode().strip()
    with archive.open(pickles[0]) as stream:
        return _Unpickler(stream, archive, prefix, byteorder).load()


class _Unpickler(pickle.Unpickler):
    def __init__(
        self, stream: IO[bytes], archive: zipfile.ZipFile, prefix: str, byteorder: str
    ) -> None:
        super().__init__(stream)
        self._archive = archive
        self._prefix = prefix
        self._swap = byteorder != sys.byteorder
        self._storages: dict[str, array[Any]] = {}

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
            values = array(storage_type.typecode)
            values.frombytes(self._archive.read(f"{self._prefix}data/{key}"))
            if self._swap:
                values.byteswap()
            self._storages[key] = values
        return self._storages[key]


def _rebuild_tensor(
    storage: array[Any], offset: int, size: Sequence[int], stride: Sequence[int], *_: Any
) -> Tensor:
    shape = tuple(int(s) for s in size)
    count = 1
    for dim in shape:
        count *= dim
    if _is_contiguous(shape, stride):
        return Tensor(shape, storage[offset : offset + count])
    flat = [storage[offset + _position(index, shape, stride)] for index in range(count)]
    return Tensor(shape, flat)


def _is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def _position(index: int, shape: Sequence[int], stride: Sequence[int]) -> int:
    position = 0
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        index, coordinate = divmod(index, dim)
        position += coordinate * step
    return position
