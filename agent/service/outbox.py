"""The publisher's side of the outbox: what to send next, and what the broker said about it.

A row leaves the outbox only when the broker acknowledged it with a success code. A row the
broker refused (MQTT 5 reason code >= 0x80, e.g. 135 "not authorized") is marked rejected
with the reason and kept for the operator; it is not retried, so an ACL mistake cannot turn
into a retry storm. Rows are sent in the order they were written.

Every database error comes out as StateError (disk full, locked, unreadable): the drainer
treats it as a passing condition of the database, never as a reason to stop.

The operator's side (`hpa-edge outbox`) lists rows, puts rejected ones back to pending once the
cause is fixed, and drops rows, while the agent runs: each change is one short transaction
(WAL: the drainer keeps reading meanwhile), and the drainer looks for pending rows again every
few seconds, so a row put back is sent without waiting for the next stack.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.service.state import StateError, connect


@dataclass(frozen=True)
class Row:
    seq: int
    kind: str
    msg_id: str
    payload: bytes


@dataclass(frozen=True)
class Entry:
    """A row as the operator sees it: everything but the payload."""

    seq: int
    kind: str
    msg_id: str
    state: str  # pending | rejected
    reason: str | None  # why the broker refused it (rejected rows)
    created_at: float  # time.time() when the row was written
    size: int  # payload bytes


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # A delete lost to a power cut only re-sends a message that consumers de-duplicate.
        self.db = connect(self.path, synchronous="NORMAL")

    def next_rows(self, limit: int, skip: Collection[int] = ()) -> list[Row]:
        """The oldest pending rows not in `skip` (those already in flight)."""
        rows = self._read(
            "SELECT seq, kind, msg_id, payload FROM outbox WHERE state = 'pending' ORDER BY seq LIMIT ?",
            (limit + len(skip),),
        )
        picked = [Row(int(s), str(k), str(m), bytes(p)) for s, k, m, p in rows if s not in skip]
        return picked[:limit]

    def acknowledged(self, seq: int) -> None:
        self._write("DELETE FROM outbox WHERE seq = ?", (seq,))

    def rejected(self, seq: int, reason: str) -> None:
        self._write("UPDATE outbox SET state = 'rejected', reason = ? WHERE seq = ?", (reason, seq))

    def depth(self) -> dict[str, int]:
        rows = self._read("SELECT state, COUNT(*) FROM outbox GROUP BY state", ())
        counts = {"pending": 0, "rejected": 0}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    # The operator's side -------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every row, pending and rejected, oldest first."""
        rows = self._read(
            "SELECT seq, kind, msg_id, state, reason, created_at, length(payload) FROM outbox ORDER BY seq",
            (),
        )
        return [
            Entry(int(s), str(k), str(m), str(st), None if r is None else str(r), float(c), int(n))
            for s, k, m, st, r, c, n in rows
        ]

    def requeue(self, seqs: Collection[int] | None = None) -> list[int]:
        """Rejected rows (all, or those of `seqs`) back to pending; the seqs that changed."""
        return self._change("UPDATE outbox SET state = 'pending', reason = NULL", seqs, rejected_only=True)

    def drop(self, seqs: Collection[int] | None = None) -> list[int]:
        """Delete the rows of `seqs` (any state), or with None every rejected row; the seqs deleted."""
        return self._change("DELETE FROM outbox", seqs, rejected_only=seqs is None)

    def _change(self, statement: str, seqs: Collection[int] | None, rejected_only: bool) -> list[int]:
        """`statement` on the chosen rows in one short transaction; the seqs it touched."""
        where = " WHERE state = 'rejected'" if rejected_only else " WHERE 1"
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if seqs is None:
                    rows = self.db.execute(f"SELECT seq FROM outbox{where} ORDER BY seq").fetchall()
                else:
                    rows = [
                        (seq,)
                        for seq in sorted(set(seqs))
                        if self.db.execute(f"SELECT 1 FROM outbox{where} AND seq = ?", (seq,)).fetchone()
                    ]
                self.db.executemany(f"{statement} WHERE seq = ?", rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot change the outbox: {exc}") from None
        return [int(seq) for (seq,) in rows]

    def _read(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the outbox: {exc}") from None

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            self.db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot update the outbox: {exc}") from None

    def close(self) -> None:
        self.db.close()
