"""Decides when a channel file is completely written and when a stack is ready or overdue.

Pure logic with no threads or file access: the caller passes what the folder holds now (a
listing of name -> size, mtime, symlink) and the file events seen since the last look, so
tests drive it with made-up listings and a made-up clock.

A channel file counts as written when
- a `closed` event says its writer closed it after writing (inotify's IN_CLOSE_WRITE), or
- it is the target of a rename into the folder (`moved_in`: inotify's IN_MOVED_TO, from
  inside the folder or from beside it; written at once), or it appeared through a `created`
  event that no write followed for RENAME_QUIET (a hard link made in the folder), or
- its size and mtime have stayed unchanged for `settle` seconds (polling, network shares,
  files found at start-up). A file with a write seen but no close must stay unchanged ten
  times longer, in case the close event was lost.
Empty files are never taken as written by an event: some writers create the file first and
fill it later. A stack is ready when its four channels are written; a stack that is not
ready `timeout` seconds after its first file appeared is overdue (quarantined by the caller).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.stacks.labels import CHANNELS
from agent.stacks.naming import ChannelName, NamingScheme, group_parsed

# A created file with no write event for this long was linked in, not opened for writing
# (open(O_CREAT) and the first write follow each other within microseconds). A rename into
# the folder needs no wait: the kernel reports it as one IN_MOVED_TO (`moved_in`).
RENAME_QUIET = 0.2
STALE_WRITE_FACTOR = 10.0
EVENT_KINDS = ("created", "modified", "closed", "moved_in", "deleted")


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    symlink: bool = False


@dataclass
class _File:
    size: int
    mtime_ns: int
    since: float  # when the current (size, mtime) was first seen
    first_seen: float
    parsed: ChannelName | None  # what the name says, parsed once (`NamingScheme.parse`)
    unsafe: str | None  # the channel, when the name is a channel file's with an unusable stack id
    closed: bool = False
    writing: bool = False
    created_at: float | None = None


@dataclass
class Look:
    ready: dict[str, dict[str, str]] = field(default_factory=dict)  # stack id -> channel -> file name
    overdue: dict[str, dict[str, str]] = field(default_factory=dict)
    pending: dict[str, dict[str, str]] = field(default_factory=dict)  # seen, neither ready nor overdue
    unsafe: dict[str, str] = field(default_factory=dict)  # written files with an unusable stack id -> channel

    @property
    def waiting(self) -> int:
        """Stacks seen but not ready yet."""
        return len(self.pending)


class Tracker:
    def __init__(self, naming: NamingScheme, settle: float, timeout: float) -> None:
        self.naming = naming
        self.settle = settle
        self.timeout = timeout
        self.files: dict[str, _File] = {}
        self._events: dict[str, list[tuple[str, float]]] = {}

    def note(self, name: str, kind: str, now: float) -> None:
        """Record a file event (from the watcher thread, via the caller) for the next look."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        self._events.setdefault(name, []).append((kind, now))

    def look(self, listing: Mapping[str, Entry], now: float) -> Look:
        """Compare the folder's contents with what was known; say which stacks are ready or overdue."""
        for name in list(self.files):
            if name not in listing:
                del self.files[name]
        for name, entry in listing.items():
            known = self.files.get(name)
            if known is None:
                parsed = self.naming.parse(name)
                unsafe = None if parsed is not None else self.naming.unsafe(name)  # a usable name is safe
                self.files[name] = _File(entry.size, entry.mtime_ns, now, now, parsed, unsafe)
            elif (known.size, known.mtime_ns) != (entry.size, entry.mtime_ns):
                known.size, known.mtime_ns, known.since = entry.size, entry.mtime_ns, now
        for name, events in self._events.items():
            state = self.files.get(name)
            if state is None:
                continue
            for kind, at in events:
                self._apply(state, kind, at)
        self._events.clear()  # events of files no longer listed no longer matter

        result = Look()
        for name, state in self.files.items():
            if state.unsafe is not None and self._written(state, now):
                result.unsafe[name] = state.unsafe
        for stack_id, channels in group_parsed((n, s.parsed) for n, s in self.files.items()).items():
            written = all(self._written(self.files[n], now) for n in channels.values())
            if written and len(channels) == len(CHANNELS):
                result.ready[stack_id] = channels
            elif now - min(self.files[n].first_seen for n in channels.values()) >= self.timeout:
                result.overdue[stack_id] = channels
            else:
                result.pending[stack_id] = channels
        return result

    def next_due(self, now: float) -> float | None:
        """The earliest time a file not yet written will count as written if nothing else
        happens (a rename's quiet time or a settle time running out): the loop looks again
        then instead of sleeping a whole poll interval. None when no file is waiting."""
        times = []
        for state in self.files.values():
            if self._written(state, now):
                continue
            if state.created_at is not None and state.size > 0 and not state.writing:
                times.append(state.created_at + RENAME_QUIET)
            factor = STALE_WRITE_FACTOR if state.writing else 1.0
            times.append(state.since + self.settle * factor)
        return min(times) if times else None

    def written(self, name: str, now: float) -> bool:
        """This listed file counts as completely written (see the module's docstring)."""
        state = self.files.get(name)
        return state is not None and self._written(state, now)

    def forget(self, names: Iterable[str]) -> None:
        """Drop files the caller has dealt with (moved, deleted, or left in place on purpose)."""
        for name in names:
            self.files.pop(name, None)

    @staticmethod
    def _apply(state: _File, kind: str, at: float) -> None:
        if kind == "modified":
            state.writing, state.closed = True, False
        elif kind in ("closed", "moved_in"):
            state.writing, state.closed = False, True
        elif kind == "created":
            state.created_at = at

    def _written(self, state: _File, now: float) -> bool:
        if state.size > 0 and state.closed:
            return True
        renamed_in = state.created_at is not None and now - state.created_at >= RENAME_QUIET
        if state.size > 0 and not state.writing and renamed_in:
            return True
        unchanged = now - state.since
        if state.writing:
            return unchanged >= self.settle * STALE_WRITE_FACTOR
        return unchanged >= self.settle
