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

Two more tables make a stack a unit across crashes (schema 2):
- `ledger_files`: every file of a recorded stack, by name and sha256. A file of a recorded
  stack met again (left behind by a crash between two moves, or copied in again) is
  recognised and finished, never taken for a new, incomplete stack.
- `attempts`: stacks whose analysis started and has not ended. A row left when the process
  dies is counted at the next start, so a stack that kills the agent (memory, a runtime
  crash) is set aside after two deaths instead of looping the service. Written with
  `synchronous=NORMAL`: it must survive a process crash, not a power cut.

Errors are classified: `StateError.transient` is true for the agent's surroundings (disk
full, database locked, I/O error), which the caller retries, never a verdict on a stack.
Opening an existing database of this schema writes nothing, so the agent can start on a
full disk and catch up when space returns.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
CREATE TABLE IF NOT EXISTS ledger_files (
    name         TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    stack_id     TEXT NOT NULL,
    files_sha256 TEXT NOT NULL,
    PRIMARY KEY (name, sha256)
);
CREATE TABLE IF NOT EXISTS attempts (
    stack_id   TEXT PRIMARY KEY,
    signature  TEXT NOT NULL,
    unfinished INTEGER NOT NULL,
    started_at REAL NOT NULL
);
"""
SCHEMA_VERSION = 2

# SQLite's primary result codes that describe the surroundings, not the data.
_TRANSIENT_CODES = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
}


class StateError(RuntimeError):
    """The database cannot be opened or written; `transient` when retrying may succeed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def state_error(context: str, exc: BaseException) -> StateError:
    """A StateError for `exc`, classified: disk full, locked, I/O or out of memory are transient."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        transient = code is not None and (code & 0xFF) in _TRANSIENT_CODES
        if code is None:  # older Pythons: the message is all there is
            text = str(exc).lower()
            transient = any(w in text for w in ("full", "locked", "busy", "disk i/o", "unable to open"))
        return StateError(f"{context}: {exc}", transient)
    if isinstance(exc, OSError):
        return StateError(f"{context}: {exc.strerror or exc}", transient=True)
    return StateError(f"{context}: {exc!r}")


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open (creating if needed) the database in WAL mode. A connection belongs to one thread
    at a time (opened in start-up, then used by the loop); two threads never share one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{path}: database schema {version} is newer than this agent ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION or db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                _create_or_migrate(db)  # the only writes at open: a new or older database
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            db.close()
            raise
    except sqlite3.Error as exc:
        raise state_error(f"{path}: cannot open the state database", exc) from None
    except OSError as exc:
        raise state_error(f"{path}: cannot create the state folder", exc) from None
    return db


def _create_or_migrate(db: sqlite3.Connection) -> None:
    """Schema 0 (new) or 1 -> 2: new tables only; files of stacks recorded under schema 1 are
    not known by name, so remnants of those are handled as before (rare: a crash mid-move
    just before the upgrade)."""
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


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
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 ("" when unreadable)


@dataclass(frozen=True)
class Recorded:
    """What the ledger says about a file it has seen in a recorded stack."""

    stack_id: str
    files_sha256: str
    outcome: str
    msg_id: str


class Ledger:
    """The worker's side of the database: look up stacks and files, record batches, count attempts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path, synchronous="FULL")

    def outcome(self, stack_id: str, files_sha256: str) -> str | None:
        """The recorded outcome of this exact stack content, or None if it is new."""
        row = self._read(
            "SELECT outcome FROM ledger WHERE stack_id = ? AND files_sha256 = ?", (stack_id, files_sha256)
        )
        return None if not row else str(row[0][0])

    def known_names(self, names: Iterable[str]) -> set[str]:
        """Which of these file names belonged to a recorded stack (a cheap first filter: only
        those files are worth hashing to see whether they are its remnants)."""
        wanted = list(dict.fromkeys(names))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found |= {
                str(r[0])
                for r in self._read(f"SELECT DISTINCT name FROM ledger_files WHERE name IN ({marks})", chunk)
            }
        return found

    def recorded_file(self, name: str, sha256: str) -> Recorded | None:
        """The recorded stack this exact file (name and bytes) belonged to, if any."""
        rows = self._read(
            "SELECT l.stack_id, l.files_sha256, l.outcome, l.msg_id FROM ledger_files f"
            " JOIN ledger l ON l.stack_id = f.stack_id AND l.files_sha256 = f.files_sha256"
            " WHERE f.name = ? AND f.sha256 = ? ORDER BY l.recorded_at DESC LIMIT 1",
            (name, sha256),
        )
        return None if not rows else Recorded(*(str(v) for v in rows[0]))

    def record(self, records: Iterable[Record]) -> None:
        """Commit ledger, file and outbox rows of a batch together, or nothing (StateError)."""
        now = time.time()
        self._transaction("cannot record results", lambda: self._insert(list(records), now))

    def _insert(self, records: list[Record], now: float) -> None:
        for rec in records:
            self.db.execute(
                "INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?, ?)",
                (rec.stack_id, rec.files_sha256, rec.outcome, rec.msg_id, now),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO ledger_files VALUES (?, ?, ?, ?)",
                [(name, sha, rec.stack_id, rec.files_sha256) for name, sha in rec.files.items() if sha],
            )
            self.db.executemany(
                "INSERT INTO outbox (kind, msg_id, payload, created_at) VALUES (?, ?, ?, ?)",
                [(m.kind, m.msg_id, m.payload, now) for m in rec.messages],
            )
            self.db.execute("DELETE FROM attempts WHERE stack_id = ?", (rec.stack_id,))

    # Attempts: a stack in flight when the process dies --------------------------------------
    def attempts_started(self, stacks: Mapping[str, str]) -> dict[str, int]:
        """Count a new attempt for each stack id (-> signature of its files); returns, per stack,
        how many earlier attempts on the same files never ended (the process died in them)."""
        before: dict[str, int] = {}

        def write() -> None:
            for stack_id, signature in stacks.items():
                row = self.db.execute(
                    "SELECT signature, unfinished FROM attempts WHERE stack_id = ?", (stack_id,)
                ).fetchone()
                before[stack_id] = int(row[1]) if row is not None and row[0] == signature else 0
                self.db.execute(
                    "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?)",
                    (stack_id, signature, before[stack_id] + 1, time.time()),
                )

        self._transaction("cannot count attempts", write, synchronous="NORMAL")
        return before

    def attempts_ended(self, stack_ids: Iterable[str]) -> None:
        """These attempts ended without a record (e.g. a transient failure): not a crash."""
        ids = list(stack_ids)
        self._transaction(
            "cannot count attempts",
            lambda: self.db.executemany("DELETE FROM attempts WHERE stack_id = ?", [(i,) for i in ids]),
            synchronous="NORMAL",
        )

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome")
        return {str(outcome): int(n) for outcome, n in rows}

    # The two ways in -------------------------------------------------------------------------
    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self.db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise state_error(f"{self.path}: cannot read the ledger", exc) from None

    def _transaction(self, what: str, body: Callable[[], object], synchronous: str = "FULL") -> None:
        try:
            if synchronous != "FULL":
                self.db.execute(f"PRAGMA synchronous={synchronous}")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                body()
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                        self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise state_error(f"{self.path}: {what}", exc) from None
        finally:
            if synchronous != "FULL":
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self.db.close()
