"""Reading legacy torch state dicts without torch: tensors come out right, code never runs."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from export.features.torch_file import LEGACY_MAGIC, LEGACY_PROTOCOL, TorchFileError, load_state_dict


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> tuple[object, object, object]:
    """Stand-ins named like torch's globals, so pickle writes the same references torch does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None: ...

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    float_storage = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
    long_storage = type("LongStorage", (), {"__module__": "torch", "__qualname__": "LongStorage"})
    torch.FloatStorage = float_storage  # type: ignore[attr-defined]
    torch.LongStorage = long_storage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return _rebuild_tensor_v2, float_storage, long_storage


class _Tensor:
    def __init__(
        self,
        rebuild: object,
        storage: tuple[object, ...],
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ):
        self.args: tuple[object, ...] = (storage, offset, shape, stride, False, OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.rebuild, self.args


def write_legacy(
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tensors: dict[str, tuple[np.ndarray, int, tuple[int, ...], tuple[int, ...]]],
) -> None:
    """Write {name: (storage data, offset, shape, stride)} in torch's legacy layout."""
    rebuild, float_storage, long_storage = _fake_torch(monkeypatch)
    buffer = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    storages = {}
    state = OrderedDict()
    for i, (name, (data, offset, shape, stride)) in enumerate(tensors.items()):
        kind = long_storage if data.dtype == np.int64 else float_storage
        storages[str(i)] = data
        state[name] = _Tensor(
            rebuild, ("storage", kind, str(i), "cpu", data.size, None), offset, shape, stride
        )

    class Writer(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return obj if isinstance(obj, tuple) and obj and obj[0] == "storage" else None

    Writer(buffer, protocol=2).dump(state)
    pickle.dump(list(storages), buffer, protocol=2)
    for data in storages.values():
        buffer.write(struct.pack("<q", data.size))
        buffer.write(data.tobytes())
    path.write_bytes(buffer.getvalue())


def test_tensors_come_back_with_shape_offset_and_strides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = np.arange(20, dtype=np.float32)
    path = tmp_path / "w.pth"
    write_legacy(
        path,
        monkeypatch,
        {
            "conv.weight": (storage, 2, (2, 3), (3, 1)),
            "transposed": (storage, 0, (3, 2), (1, 3)),  # a non-contiguous view, as torch saves .t()
            "steps": (np.array([7], dtype=np.int64), 0, (), ()),
        },
    )
    state = load_state_dict(path)
    np.testing.assert_array_equal(state["conv.weight"], np.arange(2, 8, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state["transposed"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert state["steps"].dtype == np.int64
    assert int(state["steps"]) == 7


def test_a_file_that_names_another_global_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    # GLOBAL os.system, the payload of a malicious checkpoint
    buffer.write(b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(TorchFileError, match=r"refusing to load os\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_a_truncated_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.pth"
    write_legacy(path, monkeypatch, {"w": (np.ones(100, np.float32), 0, (100,), (1,))})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(TorchFileError, match="ends early"):
        load_state_dict(path)


def test_a_file_that_is_not_a_legacy_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"PK\x03\x04 zip-based torch files are not this format")
    with pytest.raises(TorchFileError):
        load_state_dict(path)


@pytest.mark.integration
def test_the_lite0_package_file_reads_into_296_tensors() -> None:
    from export.features.backbones import lite0_weights_path

    state = load_state_dict(lite0_weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype == np.float32)
