"""The watcher: the kernel's inotify events as hints, without watchdog's pairing delay."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from agent.service.watcher import (
    IN_CLOSE_WRITE,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Watcher,
    parse_events,
)


def collect(watcher: Watcher, until: set[tuple[str, str]], seconds: float = 5.0) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    while not until <= set(seen) and time.monotonic() < deadline:
        watcher.wake.wait(0.05)
        watcher.wake.clear()
        seen += [(name, kind) for name, kind, _ in watcher.drain()]
    return seen


def test_events_are_parsed_from_the_kernel_s_layout() -> None:
    def event(mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name)) if name else b""
        return struct.pack("iIII", 1, mask, 0, len(padded)) + padded

    data = event(IN_CLOSE_WRITE, b"a_red.png") + event(IN_Q_OVERFLOW, b"") + event(IN_MOVED_TO, b"b.tif")
    assert parse_events(data) == [(IN_CLOSE_WRITE, "a_red.png"), (IN_Q_OVERFLOW, ""), (IN_MOVED_TO, "b.tif")]


def test_a_file_written_in_place_is_closed_and_one_renamed_in_is_moved_in(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    watcher = Watcher(folder, "inotify")
    assert watcher.start() == "inotify"
    try:
        (folder / "a_red.png").write_bytes(b"x" * 100)
        (tmp_path / "b_red.png").write_bytes(b"y" * 100)
        os.rename(tmp_path / "b_red.png", folder / "b_red.png")
        os.rename(folder / "a_red.png", tmp_path / "a_red.png")  # out again
        (folder / "sub").mkdir()  # a folder is not a file: no event
        expected = {
            ("a_red.png", "created"),
            ("a_red.png", "modified"),
            ("a_red.png", "closed"),
            ("b_red.png", "moved_in"),
            ("a_red.png", "deleted"),
        }
        seen = collect(watcher, expected)
        assert expected <= set(seen)
        assert ("b_red.png", "created") not in seen  # a rename in is one event: written at once
        assert not any(name == "sub" for name, _ in seen)
    finally:
        watcher.stop()
    assert watcher._thread is None


def test_a_burst_of_events_wakes_the_loop_once(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    watcher = Watcher(folder, "inotify")
    watcher.start()
    try:
        for channel in ("red", "green", "blue", "yellow"):
            (folder / f"s_{channel}.png").write_bytes(b"z" * 10)
        assert watcher.wake.wait(5)
        closed = {name for name, kind, _ in watcher.drain() if kind == "closed"}
        assert closed == {f"s_{c}.png" for c in ("red", "green", "blue", "yellow")}
    finally:
        watcher.stop()


def test_the_folder_gone_wakes_the_loop_and_rearm_watches_the_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    watcher = Watcher(folder, "inotify")
    watcher.start()
    try:
        folder.rmdir()
        assert watcher.wake.wait(5)
        watcher.wake.clear()
        assert watcher.rearm() == "polling"  # not there: polled until it is
        folder.mkdir()
        assert watcher.rearm() == "inotify"
        (folder / "c_red.png").write_bytes(b"w")
        assert ("c_red.png", "closed") in collect(watcher, {("c_red.png", "closed")})
    finally:
        watcher.stop()


def test_polling_mode_watches_nothing(tmp_path: Path) -> None:
    watcher = Watcher(tmp_path, "polling")
    assert watcher.start() == "polling"
    (tmp_path / "d_red.png").write_bytes(b"v")
    time.sleep(0.05)
    assert watcher.drain() == []
    assert watcher.rearm() == "polling"
    watcher.stop()
