"""Read a legacy PyTorch state-dict file into numpy arrays, without torch and without running code.

Why: the only real ImageNet weights for EfficientNet-Lite0 available offline ship as a torch
file, and installing torch from the registry pulls gigabytes of CUDA packages. A state dict is
plain tensors, so a restricted unpickler that knows four names is enough; any other global in
the file is refused rather than executed (pickle's `find_class` is how malicious files run code).

The legacy format (torch < 1.6, not a zip) is five pickles and raw bytes, one after another:
magic number, protocol version, system info, the object (tensors refer to storages by key),
the list of storage keys, then per key an int64 element count and the storage's bytes.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a legacy torch state dict this reader accepts."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type[np.generic]


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type[np.generic]
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise TorchFileError(f"refusing to load {module}.{name}: only plain tensors are allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchFileError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unexpected storage type {storage_type!r}")
        return _Storage(str(key), storage_type.dtype, int(numel))


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a legacy torch state dict, as a C-contiguous numpy array."""
    data = Path(path).read_bytes()
    stream = io.BytesIO(data)
    try:
        magic = _Refusing(stream).load()
        protocol = _Refusing(stream).load()
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise TorchFileError(f"{path}: not a legacy torch file (magic {magic!r}, protocol {protocol!r})")
        info = _Refusing(stream).load()
        if not info.get("little_endian", False):
            raise TorchFileError(f"{path}: big-endian torch files are not supported")
        tree = _Unpickler(stream).load()
        keys = _Unpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise TorchFileError(f"{path}: unreadable torch file: {exc}") from exc
    storages = _collect_storages(tree)
    raw: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in storages:
            raise TorchFileError(f"{path}: storage {key} is listed but never used")
        (count,) = struct.unpack("<q", _read(stream, 8, path))
        storage = storages[key]
        if count != storage.numel:
            raise TorchFileError(f"{path}: storage {key} holds {count} elements, expected {storage.numel}")
        itemsize = np.dtype(storage.dtype).itemsize
        raw[key] = np.frombuffer(_read(stream, count * itemsize, path), dtype=storage.dtype)
    if not isinstance(tree, dict):
        raise TorchFileError(f"{path}: expected a state dict, found {type(tree).__name__}")
    return {str(name): _materialise(ref, raw, path) for name, ref in tree.items()}


class _Refusing(pickle.Unpickler):
    """For the header pickles, which hold only numbers and a dict."""

    def find_class(self, module: str, name: str) -> Any:
        raise TorchFileError(f"refusing to load {module}.{name} in a header pickle")


def _collect_storages(tree: Any) -> dict[str, _Storage]:
    if not isinstance(tree, dict):
        return {}
    return {ref.storage.key: ref.storage for ref in tree.values() if isinstance(ref, _TensorRef)}


def _read(stream: io.BytesIO, n: int, path: Path) -> bytes:
    chunk = stream.read(n)
    if len(chunk) != n:
        raise TorchFileError(f"{path}: file ends early (wanted {n} bytes, found {len(chunk)})")
    return chunk


def _materialise(ref: Any, raw: dict[str, np.ndarray], path: Path) -> np.ndarray:
    if not isinstance(ref, _TensorRef):
        raise TorchFileError(f"{path}: state dict entry is {type(ref).__name__}, not a tensor")
    flat = raw[ref.storage.key]
    if not ref.shape:
        return np.array(flat[ref.offset])
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if min(ref.shape) > 0 and last >= flat.size:
        raise TorchFileError(f"{path}: tensor reaches past the end of storage {ref.storage.key}")
    itemsize = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)
