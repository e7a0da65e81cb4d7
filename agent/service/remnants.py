"""Files of stacks already recorded, met again in the folder: recognised by name and bytes.

A stack is disposed of as a unit, but its files move one by one. A crash (or a full disk)
between two moves leaves some of a recorded stack's files behind; a user may copy a channel
in again after its stack was done. Without the ledger's memory of each file (`ledger_files`)
those files would look like a new stack that lacks channels and end in quarantine with a
false `incomplete` error. Here they are recognised: same name and same sha256 as a file of
a recorded stack. Only names the ledger knows are hashed, and each (name, size, mtime) is
looked at once, so the usual new stack costs one small query per look.

What the agent does with a sighting is its rule (see `Agent._remnants`): a result's files
are finished at once; an error's only when its stack stays incomplete, because the same
bytes dropped again after a failure deserve a new attempt. A known name with other bytes is
`changed`: when such a file ends in quarantine, the error says it changed after it was read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.service.state import Ledger, Recorded
from agent.service.tracker import Entry
from agent.stacks.digest import file_sha256


@dataclass(frozen=True)
class Sighting:
    recorded: Recorded | None  # the stack this exact file belonged to
    changed: bool = False  # its name belonged to a recorded stack, its bytes are different


NEW = Sighting(None)


class Remnants:
    def __init__(self, ledger: Ledger, folder: Path, hasher: Callable[[Path], str] = file_sha256) -> None:
        self.ledger = ledger
        self.folder = folder
        self.hasher = hasher
        self._seen: dict[tuple[str, Entry], Sighting] = {}

    def inspect(self, files: Mapping[str, Entry]) -> dict[str, Sighting]:
        """A sighting for each written file (name -> how it looks now); raises StateError, OSError."""
        todo = [name for name, entry in files.items() if (name, entry) not in self._seen]
        known = self.ledger.known_names(todo) if todo else set()
        for name in todo:
            entry = files[name]
            if name not in known or entry.symlink:
                self._seen[(name, entry)] = NEW
                continue
            try:
                recorded = self.ledger.recorded_file(name, self.hasher(self.folder / name))
            except FileNotFoundError:
                continue  # gone while looking
            self._seen[(name, entry)] = Sighting(recorded, changed=recorded is None)
        return {
            name: self._seen[(name, entry)] for name, entry in files.items() if (name, entry) in self._seen
        }

    def recorded_again(self) -> None:
        """New ledger rows: names thought new may now be known."""
        self._seen = {key: s for key, s in self._seen.items() if s is not NEW}

    def forget(self, names: Iterable[str]) -> None:
        gone = set(names)
        self._seen = {key: s for key, s in self._seen.items() if key[0] not in gone}
