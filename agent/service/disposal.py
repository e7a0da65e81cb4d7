"""Where a stack's files go once its answer is recorded, and moving them there.

The policy: a result's files go to `done/` (or are deleted, or left in place: `files.after`);
an unreadable stack's go to `failed/`, an incomplete one's to `quarantine/`, always moved,
each with `<id>.error.json` beside them. The error document published for such a stack says
the same (`moved_to`), so `document_of` is the one place that fills it in.

Moving is file by file. When one move fails (disk full, permissions), the files already
moved stay moved and the rest stay in the folder; the caller keeps the stack and retries
later, and a retry only moves what is still there, so a half-moved stack is finished rather
than mistaken for a new, incomplete one.

A file that changed after it was read (other size or mtime than when its stack was taken
for analysis) is not moved: the answer recorded is not about its new bytes. It stays in the
folder and is seen afresh: written again as part of a whole new stack, it is analysed (a
new result, a new msg_id); alone, it ends in quarantine with a `changed_after_read` error
naming it. The check is a stat just before the move and another of the file where it landed:
a write racing the move itself (the microscope truncating and rewriting a file the agent is
moving) is caught by the second, and the file is put back under its name to be seen afresh
(unless that name was taken again meanwhile: then it stays where it landed, `stranded`, and
the warning says so). A move across disks copies, and its checksum comparison stands instead.

`<id>.error.json` is never overwritten by a different error of the same id: the next one
is `<id>.error.1.json`, and so on.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model.pipeline import Analysis
from agent.service import crashpoint
from agent.service.config import Config
from agent.service.files import move_file, write_json
from agent.service.tracker import Entry

DESTINATIONS = {"result": "done", "failed": "failed", "quarantined": "quarantine"}


def destination_of(analysis: Analysis) -> str:
    return DESTINATIONS[analysis.kind]


def document_of(analysis: Analysis) -> dict[str, Any]:
    """The document as published and as written beside failed files: errors say where the files went."""
    if analysis.kind == "result":
        return analysis.document
    return {**analysis.document, "moved_to": destination_of(analysis)}


@dataclass
class Disposal:
    """What became of a stack's files."""

    target: Path
    error: OSError | None = None  # the move that failed; None when every file is dealt with
    left: dict[str, Entry] = field(default_factory=dict)  # files.after = "leave": how they looked
    changed: list[str] = field(default_factory=list)  # changed since they were read: not moved
    stranded: list[str] = field(default_factory=list)  # written while moving, could not be put back


class Disposer:
    def __init__(
        self,
        config: Config,
        lister: Callable[[Path], Mapping[str, Entry]],
        move: Callable[[Path, Path], Path] = move_file,
    ) -> None:
        self.config = config
        self.folder = config.watch.folder
        self.lister = lister
        self.move = move

    def dispose(
        self, analysis: Analysis, names: Mapping[str, str], expected: Mapping[str, Entry] | None = None
    ) -> Disposal:
        """Move, delete or leave the files still in the folder, except those that no longer look
        as `expected` (name -> how it looked when read); never raises OSError."""
        destination = destination_of(analysis)
        after, target = self._policy(destination)
        changed: list[str] = []
        stranded: list[str] = []
        try:
            if destination != "done":
                document = document_of(analysis)
                write_json(_error_path(target, analysis.stack_id, analysis.msg_id), document)
            for name in names.values():
                path = self.folder / name
                info = _lstat(path)
                if info is None:
                    continue  # moved by an earlier attempt (or removed by someone else)
                if expected and name in expected and _entry(info) != expected[name]:
                    changed.append(name)
                    continue
                landed = self._apply(after, path, target)
                crashpoint.reach("after_move")
                if landed is not None and expected and name in expected:
                    moved = _lstat(landed)  # the same inode when renamed: written while it moved?
                    if moved is not None and _same_file(info, moved) and _entry(moved) != expected[name]:
                        (changed if _put_back(landed, path) else stranded).append(name)
        except OSError as exc:
            return Disposal(target, error=exc, changed=changed, stranded=stranded)
        if after != "leave":
            return Disposal(target, changed=changed, stranded=stranded)
        listing = self.lister(self.folder)
        left = {name: listing[name] for name in names.values() if name in listing and name not in changed}
        return Disposal(target, left=left, changed=changed, stranded=stranded)

    def finish_remnant(self, name: str, outcome: str) -> Disposal:
        """A file of a stack recorded earlier, met again: where its stack's files went, quietly."""
        after, target = self._policy(DESTINATIONS[outcome])
        path = self.folder / name
        try:
            self._apply(after, path, target)
        except OSError as exc:
            return Disposal(target, error=exc)
        if after == "leave":
            info = _lstat(path)
            return Disposal(target, left={} if info is None else {name: _entry(info)})
        return Disposal(target)

    def _policy(self, destination: str) -> tuple[str, Path]:
        """What happens to files bound for `destination`: a result's follow `files.after`,
        an error's are always moved, so nothing that failed is deleted or left in the way."""
        after = self.config.files.after if destination == "done" else "move"
        return after, self.config.folder(destination)

    def _apply(self, after: str, path: Path, target: Path) -> Path | None:
        """Where the file landed, when it was moved."""
        if after == "move":
            return self.move(path, target)
        if after == "delete":
            path.unlink(missing_ok=True)
        return None


def _put_back(landed: Path, path: Path) -> bool:
    """Return a file to the name it was moved from, never over a file written there since."""
    try:
        os.link(landed, path, follow_symlinks=False)
    except OSError:
        return False  # the name is taken again, or another disk: it stays where it landed
    landed.unlink()
    return True


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _entry(info: os.stat_result) -> Entry:
    """How a file looks (never following a link), as the folder listing sees it."""
    return Entry(info.st_size, info.st_mtime_ns, stat.S_ISLNK(info.st_mode))


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Renamed, not copied across disks nor dropped as a duplicate of a file already there."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _error_path(folder: Path, stack_id: str, msg_id: str) -> Path:
    """`<id>.error.json`, or the next free `<id>.error.N.json` when a different error holds it
    (the same error written again by a retried move keeps its file)."""
    for n in range(0, 1000):
        path = folder / (f"{stack_id}.error.json" if n == 0 else f"{stack_id}.error.{n}.json")
        try:
            held = json.loads(path.read_text()).get("msg_id")
        except FileNotFoundError:
            return path
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or not ours: leave it alone
        if held == msg_id:
            return path
    return folder / f"{stack_id}.error.{os.getpid()}.json"
