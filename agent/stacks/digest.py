"""sha256 of files, and the one fingerprint of a stack's contents.

`file_sha256` identifies bundles, caches, weights files and channel files. `stack_fingerprint`
is what the ledger keys a stack by, what every `msg_id` is derived from, and what embedding
caches compare to decide whether a stack changed: one definition, so the device and the
workstation always agree on whether two stacks are the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stack_fingerprint(channel_sha256: Mapping[str, str]) -> str:
    """One hash over the channels' file hashes (in channel-name order): changes when any file changes.

    The definition is frozen: devices in the field key their ledgers and `msg_id`s by it.
    """
    text = "\n".join(f"{channel}:{channel_sha256[channel]}" for channel in sorted(channel_sha256))
    return hashlib.sha256(text.encode()).hexdigest()
