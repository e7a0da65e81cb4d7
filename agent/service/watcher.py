"""What is in the acquisition folder, and file events as hints to look again.

The folder's contents are the truth (`list_folder`); inotify events (through watchdog) only
wake the agent's loop early and tell the tracker which files were closed or renamed in.
The same code path serves start-up, lost events (inotify overflow) and network shares,
where `observer = "polling"` runs no watchdog at all and the loop simply looks every
`poll_interval` seconds.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.service import log
from agent.service.tracker import Entry


def list_folder(folder: Path) -> dict[str, Entry]:
    """Regular files and symlinks directly in `folder` (never followed), with size and mtime."""
    entries: dict[str, Entry] = {}
    with os.scandir(folder) as found:
        for item in found:
            try:
                symlink = item.is_symlink()
                if not symlink and not item.is_file(follow_symlinks=False):
                    continue
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
            entries[item.name] = Entry(info.st_size, info.st_mtime_ns, symlink)
    return entries


class Watcher:
    """Collects file events from a watchdog observer; `wake` is set whenever one arrives."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.folder = Path(folder)
        self.mode = mode
        self._wanted = mode
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, float]] = []
        self._observer: Any = None

    def start(self) -> str:
        """Start watching; returns the mode in effect (inotify can fall back to polling)."""
        if self.mode != "inotify":
            return self.mode
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                watcher._on_event(event)

        try:
            observer = InotifyObserver()
            observer.schedule(Handler(), str(self.folder), recursive=False)
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit, or a file system without inotify
            log.event("watch_fallback", "warning", folder=self.folder, reason=exc, mode="polling")
            self.mode = "polling"
            return self.mode
        self._observer = observer
        return self.mode

    def _on_event(self, event: Any) -> None:
        if event.is_directory:
            if Path(os.fsdecode(event.src_path)) == self.folder:
                self.wake.set()  # the folder itself went away (or moved): look now, the watch is dead
            return
        kind = type(event).__name__
        now = time.monotonic()
        found: list[tuple[str, str, float]] = []
        if kind == "FileMovedEvent":
            found.append((os.path.basename(event.src_path), "deleted", now))
            if Path(os.fsdecode(event.dest_path)).parent == self.folder:
                found.append((os.path.basename(os.fsdecode(event.dest_path)), "moved_in", now))
        else:
            mapped = {
                "FileCreatedEvent": "created",
                "FileModifiedEvent": "modified",
                "FileClosedEvent": "closed",
                "FileDeletedEvent": "deleted",
            }.get(kind)
            if mapped is None:
                return  # opened, closed-without-write: reading is not writing
            found.append((os.path.basename(os.fsdecode(event.src_path)), mapped, now))
        with self._lock:
            self._events.extend(found)
        self.wake.set()

    def drain(self) -> list[tuple[str, str, float]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def rearm(self) -> str:
        """The folder was deleted and made again: an inotify watch dies with the old folder, so
        watch the new one (in polling mode there is nothing to do)."""
        self.stop()
        if self.mode == "polling" and self._observer is None and self._wanted == "inotify":
            self.mode = "inotify"  # a fallback caused by the missing folder is undone
        return self.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
