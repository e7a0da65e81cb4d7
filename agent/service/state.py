"""The agent's SQLite database: the ledger of stacks it has answered for, and the outbox.

One transaction records a batch of stacks: for each, its ledger row (stack id + hash of its
files, so the same stack dropped twice is recognised and changed contents are not) and the
outbox rows of the messages it produced. Files leave the acquisition folder only after that
commit, so a crash at any point either redoes a stack or finds it in the ledger; nothing is
answered twice and nothing is lost.

Durability vs. SD-card wear: the database runs in WAL mode with `synchronous=FULL`, and
stacks are committed in groups (`state.batch`, default 16), so a burst pays one fsync per
group instead of one per stack; a lone stack still pays one (a few ms), which is the price
of moving its files only once its result is on disk. `synchronous=NORMAL` would be cheaper
but a power cut could then roll back commits whose files were already moved, i.e. lose
results. The publisher's deletes (outbox.py) use NORMAL: losing one on a power cut only
re-sends a message, which consumers de-duplicate by `msg_id`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    stack_id     TEXT NOT NULL,
    files_sha256 TEXT NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('result', 'failed', 'quarantined')),
    msg_id       TEXT NOT NULL,
    recorded_at  REAL NOT NULL,
    PRIMARY KEY (stack_id, files_sha256)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    msg_id     TEXT NOT NULL,
    payload    BLOB NOT NULL,
    state      TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'rejected')),
    reason     TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, seq);
"""
SCHEMA_VERSION = 1


class StateError(RuntimeError):
    """The database cannot be opened or written (disk full, permissions, corruption)."""


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open (creating if needed) the database in WAL mode. A connection belongs to one thread
    at a time (opened in start-up, then used by the loop); two threads never share one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StateError(f"{path}: database schema {version} is newer than this agent ({SCHEMA_VERSION})")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot open the state database: {exc}") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot create the state folder: {exc.strerror or exc}") from None
    return db


@dataclass(frozen=True)
class Message:
    kind: str  # "results" or "errors": the topic under the prefix
    msg_id: str
    payload: bytes


@dataclass(frozen=True)
class Record:
    """What the agent answered for one stack, written in one go."""

    stack_id: str
    files_sha256: str
    outcome: str  # result | failed | quarantined
    msg_id: str
    messages: Sequence[Message] = field(default_factory=tuple)


class Ledger:
    """The worker's side of the database: look up stacks, record batches."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path, synchronous="FULL")

    def outcome(self, stack_id: str, files_sha256: str) -> str | None:
        """The recorded outcome of this exact stack content, or None if it is new."""
        row = self.db.execute(
            "SELECT outcome FROM ledger WHERE stack_id = ? AND files_sha256 = ?", (stack_id, files_sha256)
        ).fetchone()
        return None if row is None else str(row[0])

    def record(self, records: Iterable[Record]) -> None:
        """Commit ledger and outbox rows of a batch together, or nothing (StateError)."""
        now = time.time()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for rec in records:
                    self.db.execute(
                        "INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?, ?)",
                        (rec.stack_id, rec.files_sha256, rec.outcome, rec.msg_id, now),
                    )
                    self.db.executemany(
                        "INSERT INTO outbox (kind, msg_id, payload, created_at) VALUES (?, ?, ?, ?)",
                        [(m.kind, m.msg_id, m.payload, now) for m in rec.messages],
                    )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot record results: {exc}") from None

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome").fetchall()
        return {str(outcome): int(n) for outcome, n in rows}

    def close(self) -> None:
        self.db.close()
