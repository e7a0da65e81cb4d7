"""What is in the acquisition folder, and file events as hints to look again.

The folder's contents are the truth (`list_folder`); inotify events only wake the agent's
loop early and tell the tracker which files were closed after a write or renamed in. The
same code path serves start-up, lost events (inotify overflow) and network shares, where
`observer = "polling"` watches nothing and the loop simply looks every `poll_interval` seconds.

The events come from the kernel's inotify directly (ctypes on the C library's
inotify_init1/inotify_add_watch and `os.read`), read by one thread and handed over as they
arrive. watchdog's observer was used before: its inotify buffer holds every event for up to
0.5 s to pair a rename's IN_MOVED_FROM with its IN_MOVED_TO, which is where most of a renamed-in
stack's latency went (docs/benchmark.md#landing). Here a rename into the folder is the single
IN_MOVED_TO the kernel reports, `moved_in` to the tracker (written at once); a rename out is
IN_MOVED_FROM, `deleted`. Nothing needs pairing, since the listing says where files are.
Events are handed over in bursts, once they pause for 2 ms: the four files of a stack copied
in one after the other (well under a millisecond apart) wake the loop once, so it meets the
stack whole rather than file by file; files written further apart wake it once each, which
costs a listing (the pause is on every stack's path to its result: 10 ms before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
import time
from pathlib import Path

from agent.service import log
from agent.service.tracker import Entry

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCHED = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_CREATE
    | IN_MODIFY
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)  # fmt: skip
# (IN_Q_OVERFLOW and IN_IGNORED come unasked)
FOLDER_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW
KINDS = (
    (IN_CLOSE_WRITE, "closed"),
    (IN_MOVED_TO, "moved_in"),
    (IN_MOVED_FROM, "deleted"),
    (IN_CREATE, "created"),
    (IN_MODIFY, "modified"),
    (IN_DELETE, "deleted"),
)
# Events are handed over once they pause this long (at most COALESCE_MAX after the first).
COALESCE_QUIET = 0.002
COALESCE_MAX = 0.1
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024


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


class _Libc:
    """inotify_init1 and inotify_add_watch from the C library (glibc and musl have both)."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def get(cls) -> ctypes.CDLL:
        if cls._lib is None:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_init1.restype = ctypes.c_int
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            lib.inotify_add_watch.restype = ctypes.c_int
            cls._lib = lib
        return cls._lib


def parse_events(data: bytes) -> list[tuple[int, str]]:
    """(mask, file name) of each event in one read of an inotify descriptor."""
    found = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        raw = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        found.append((mask, os.fsdecode(raw)))
    return found


class Inotify:
    """One inotify descriptor watching one folder (not recursive); raises OSError if it cannot."""

    def __init__(self, folder: Path) -> None:
        try:
            lib = _Libc.get()
        except (OSError, AttributeError) as exc:  # no C library with inotify (not Linux)
            raise OSError(errno.ENOSYS, f"inotify is not available: {exc}") from None
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        if lib.inotify_add_watch(fd, os.fsencode(folder), WATCHED | IN_ONLYDIR) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, f"inotify_add_watch {folder}: {os.strerror(code)}")
        self.fd = fd

    def read(self) -> list[tuple[int, str]]:
        """The events waiting now (none if there are none)."""
        try:
            return parse_events(os.read(self.fd, _READ_SIZE))
        except BlockingIOError:
            return []

    def close(self) -> None:
        os.close(self.fd)


class Watcher:
    """Collects file events from the kernel's inotify; `wake` is set whenever one arrives."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.folder = Path(folder)
        self.mode = mode
        self._wanted = mode
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, float]] = []
        self._thread: threading.Thread | None = None
        self._stop_w: int | None = None

    def start(self) -> str:
        """Start watching; returns the mode in effect (inotify can fall back to polling)."""
        if self.mode != "inotify":
            return self.mode
        try:
            inotify = Inotify(self.folder)
        except OSError as exc:  # e.g. the inotify watch limit, or a file system without inotify
            log.event("watch_fallback", "warning", folder=self.folder, reason=exc, mode="polling")
            self.mode = "polling"
            return self.mode
        stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._read, args=(inotify, stop_r), name="inotify", daemon=True
        )
        self._thread.start()
        return self.mode

    def _read(self, inotify: Inotify, stop_r: int) -> None:
        poller = select.poll()
        poller.register(inotify.fd, select.POLLIN)
        poller.register(stop_r, select.POLLIN)
        try:
            while True:
                if stop_r in {fd for fd, _ in poller.poll()}:
                    return
                # A burst of events (four files copied in, a file written in chunks) wakes the
                # loop once, when it pauses: the loop sees the stack whole, as it landed.
                events = inotify.read()
                first = time.monotonic()
                while True:
                    left = min(COALESCE_QUIET, first + COALESCE_MAX - time.monotonic())
                    ready = {fd for fd, _ in poller.poll(max(0, int(left * 1000)))} if left > 0 else set()
                    if stop_r in ready:
                        return
                    if not ready:
                        break
                    events += inotify.read()
                self._on_events(events)
        finally:
            inotify.close()
            os.close(stop_r)

    def _on_events(self, events: list[tuple[int, str]]) -> None:
        now = time.monotonic()
        found: list[tuple[str, str, float]] = []
        wake = False
        for mask, name in events:
            if mask & FOLDER_GONE:
                wake = True  # the folder went away or moved, or events were lost: look now
                continue
            if mask & IN_ISDIR or not name:
                continue
            for bit, kind in KINDS:
                if mask & bit:
                    found.append((name, kind, now))
        if found:
            with self._lock:
                self._events.extend(found)
        if found or wake:
            self.wake.set()

    def drain(self) -> list[tuple[str, str, float]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def rearm(self) -> str:
        """The folder was deleted and made again: an inotify watch dies with the old folder, so
        watch the new one (in polling mode there is nothing to do)."""
        self.stop()
        if self.mode == "polling" and self._wanted == "inotify":
            self.mode = "inotify"  # a fallback caused by the missing folder is undone
        return self.start()

    def stop(self) -> None:
        if self._thread is not None and self._stop_w is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
            os.close(self._stop_w)
        self._thread = None
        self._stop_w = None
