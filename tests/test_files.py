"""Moving files out of the acquisition folder: renames, cross-device copies, name clashes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from agent.service.files import move_file, write_json


def test_a_move_within_one_file_system_keeps_the_bytes(tmp_path: Path) -> None:
    source = tmp_path / "a_red.png"
    source.write_bytes(b"pixels")
    landed = move_file(source, tmp_path / "done")
    assert landed == tmp_path / "done" / "a_red.png"
    assert landed.read_bytes() == b"pixels"
    assert not source.exists()


def test_a_real_move_across_file_systems_copies_verifies_then_deletes(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to move across")
    source = shm / f"hpa-edge-test-{os.getpid()}_red.png"
    source.write_bytes(os.urandom(3_000_000))
    expected = source.read_bytes()
    landed = move_file(source, tmp_path / "done")
    assert landed.read_bytes() == expected
    assert not source.exists()
    assert not list((tmp_path / "done").glob(".*partial"))


def test_a_copy_that_does_not_match_keeps_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "a_red.png"
    source.write_bytes(b"pixels")

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    real_copy = shutil.copyfileobj

    def corrupting_copy(src, dst, length):
        real_copy(src, dst, length)
        dst.write(b"!")  # a bad write on the way

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copyfileobj", corrupting_copy)
    with pytest.raises(OSError, match="does not match"):
        move_file(source, tmp_path / "done")
    assert source.read_bytes() == b"pixels"
    assert list((tmp_path / "done").iterdir()) == []


def test_an_identical_file_already_in_the_target_is_not_kept_twice(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "a_red.png").write_bytes(b"same")
    source = tmp_path / "a_red.png"
    source.write_bytes(b"same")
    move_file(source, tmp_path / "done")
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["a_red.png"]
    assert not source.exists()


def test_a_different_file_with_the_same_name_gets_a_numbered_name(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "a_red.png").write_bytes(b"first")
    source = tmp_path / "a_red.png"
    source.write_bytes(b"second")
    landed = move_file(source, tmp_path / "done")
    assert landed.name == "a_red.1.png"
    assert (tmp_path / "done" / "a_red.png").read_bytes() == b"first"
    assert landed.read_bytes() == b"second"


def test_a_symlink_is_moved_as_a_link_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("outside")
    link = tmp_path / "in" / "a_red.png"
    link.parent.mkdir()
    link.symlink_to(target)
    landed = move_file(link, tmp_path / "failed")
    assert landed.is_symlink()
    assert os.readlink(landed) == str(target)
    assert target.read_text() == "outside"


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "failed" / "x.error.json"
    write_json(path, {"code": "corrupt", "message": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"code": "corrupt", "message": "ü"}
    assert [p.name for p in path.parent.iterdir()] == ["x.error.json"]
