"""Where a stack's files go once its answer is recorded, and moving them there.

The policy: a result's files go to `done/` (or are deleted, or left in place: `files.after`);
an unreadable stack's go to `failed/`, an incomplete one's to `quarantine/`, always moved,
each with `<id>.error.json` beside them. The error document published for such a stack says
the same (`moved_to`), so `document_of` is the one place that fills it in.

Moving is file by file. When one move fails (disk full, permissions), the files already
moved stay moved and the rest stay in the folder; the caller keeps the stack and retries
later, and a retry only moves what is still there, so a half-moved stack is finished rather
than mistaken for a new, incomplete one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model.pipeline import Analysis
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

    def dispose(self, analysis: Analysis, names: Mapping[str, str]) -> Disposal:
        """Move, delete or leave the files still in the folder; never raises OSError."""
        destination = destination_of(analysis)
        after = self.config.files.after if destination == "done" else "move"
        target = self.config.folder(destination)
        paths = [self.folder / name for name in names.values()]
        try:
            if destination != "done":
                write_json(target / f"{analysis.stack_id}.error.json", document_of(analysis))
            for path in paths:
                if not path.exists() and not path.is_symlink():
                    continue  # moved by an earlier attempt (or removed by someone else)
                if after == "move":
                    self.move(path, target)
                elif after == "delete":
                    path.unlink(missing_ok=True)
        except OSError as exc:
            return Disposal(target, error=exc)
        if after != "leave":
            return Disposal(target)
        listing = self.lister(self.folder)
        return Disposal(target, left={name: listing[name] for name in names.values() if name in listing})
