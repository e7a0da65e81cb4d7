"""Moving a stack's files out of the acquisition folder without ever losing one.

A move within one file system is a rename, with no sync: if a power cut undoes it, the file
is back in the acquisition folder and the ledger recognises it. Across file systems (the
acquisition folder on a network share, `done/` on the local disk) it is copy to a temporary
name, fsync, compare the sha256 of both copies, rename into place, fsync the folder, and only
then delete the source.
A name already taken in the target keeps both: identical contents replace nothing and just
drop the source; different contents get a numbered name (`x_red.1.png`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.stacks.digest import file_sha256


def move_file(source: Path, folder: Path) -> Path:
    """Move `source` into `folder` (created if needed); returns where it landed. OSError on failure."""
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, source)
    if target is None:  # the same bytes are already there
        source.unlink()
        return folder / source.name
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_verified(source, target)
        _fsync_folder(folder)  # the copy is durable before the original goes
        source.unlink()
    return target


def _free_name(folder: Path, source: Path) -> Path | None:
    """Where `source` can go in `folder`; None when an identical copy is already there."""
    name = source.name
    target = folder / name
    if not target.exists() and not target.is_symlink():
        return target
    plain = not target.is_symlink() and not source.is_symlink() and target.is_file()
    if plain and file_sha256(target) == file_sha256(source):
        return None
    stem, dot, suffix = name.partition(".")
    for n in range(1, 10_000):
        candidate = folder / f"{stem}.{n}{dot}{suffix}"
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise OSError(errno.EEXIST, f"no free name for {name} in {folder}")


def _copy_verified(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.partial")
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), temporary)
        else:
            with open(source, "rb") as src, open(temporary, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            if file_sha256(temporary) != file_sha256(source):
                raise OSError(errno.EIO, f"copy of {source} to {target} does not match the original")
        os.rename(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write a small JSON file atomically (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
