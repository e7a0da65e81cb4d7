"""The SQLite ledger and outbox: atomic batches, de-duplication keys, acknowledgement and rejection."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from agent.service.outbox import Outbox
from agent.service.state import Ledger, Message, Record, StateError, connect
from agent.stacks.digest import stack_fingerprint


def record(stack: str, digest: str = "d1", outcome: str = "result", n: int = 1) -> Record:
    messages = tuple(Message("results", f"{stack}-{i}", f'{{"stack":"{stack}"}}'.encode()) for i in range(n))
    return Record(stack, digest, outcome, f"{stack}-0", messages)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


def test_the_database_runs_in_wal_mode_with_full_sync_for_the_ledger(db: Path) -> None:
    ledger = Ledger(db)
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    outbox = Outbox(db)
    assert outbox.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: a lost delete only re-sends
    ledger.close()
    outbox.close()


def test_a_recorded_stack_is_known_by_id_and_file_hash(db: Path) -> None:
    ledger = Ledger(db)
    ledger.record([record("a", "d1")])
    assert ledger.outcome("a", "d1") == "result"
    assert ledger.outcome("a", "d2") is None  # changed contents: a new stack
    assert ledger.outcome("b", "d1") is None
    ledger.close()


def test_ledger_and_outbox_rows_are_committed_together_or_not_at_all(db: Path) -> None:
    ledger = Ledger(db)
    with pytest.raises(StateError, match="cannot record"):
        ledger.record([record("a"), record("b", outcome="bogus")])  # the second violates a CHECK
    assert ledger.outcome("a", "d1") is None
    outbox = Outbox(db)
    assert outbox.depth() == {"pending": 0, "rejected": 0}
    ledger.close()
    outbox.close()


def test_the_outbox_returns_rows_oldest_first_skipping_those_in_flight(db: Path) -> None:
    ledger, outbox = Ledger(db), Outbox(db)
    ledger.record([record("a"), record("b"), record("c")])
    rows = outbox.next_rows(2)
    assert [r.msg_id for r in rows] == ["a-0", "b-0"]
    assert [r.msg_id for r in outbox.next_rows(2, skip={rows[0].seq, rows[1].seq})] == ["c-0"]
    ledger.close()
    outbox.close()


def test_an_acknowledged_row_is_deleted_and_a_rejected_one_kept_aside(db: Path) -> None:
    ledger, outbox = Ledger(db), Outbox(db)
    ledger.record([record("a"), record("b")])
    first, second = outbox.next_rows(10)
    outbox.acknowledged(first.seq)
    outbox.rejected(second.seq, "Not authorized")
    assert outbox.next_rows(10) == []
    assert outbox.depth() == {"pending": 0, "rejected": 1}
    reason = outbox.db.execute("SELECT reason FROM outbox WHERE seq = ?", (second.seq,)).fetchone()[0]
    assert reason == "Not authorized"
    ledger.close()
    outbox.close()


def test_the_backlog_survives_closing_and_reopening(db: Path) -> None:
    ledger = Ledger(db)
    ledger.record([record(f"s{i}") for i in range(5)])
    ledger.close()
    outbox = Outbox(db)
    assert [r.msg_id for r in outbox.next_rows(10)] == [f"s{i}-0" for i in range(5)]
    outbox.close()


def test_a_full_disk_is_a_state_error_and_records_nothing(db: Path) -> None:
    ledger = Ledger(db)
    ledger.record([record("small")])
    pages = ledger.db.execute("PRAGMA page_count").fetchone()[0]
    ledger.db.execute(f"PRAGMA max_page_count={pages}")  # the database may not grow: "disk full"
    big = Record("big", "d", "result", "m", (Message("results", "m", b"x" * 200_000),))
    with pytest.raises(StateError, match="full"):
        ledger.record([big])
    assert ledger.outcome("big", "d") is None
    ledger.db.execute("PRAGMA max_page_count=1073741823")  # space returns
    ledger.record([big])
    assert ledger.outcome("big", "d") == "result"
    ledger.close()


def test_a_database_from_a_newer_agent_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(StateError, match="schema 99 is newer"):
        connect(db)


def test_an_unwritable_location_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StateError):
        Ledger(blocker / "state.db")


def test_the_stack_fingerprint_changes_with_any_channel_and_not_with_order() -> None:
    a = {"red": "1", "green": "2", "blue": "3", "yellow": "4"}
    assert stack_fingerprint(a) == stack_fingerprint(dict(reversed(list(a.items()))))
    assert stack_fingerprint(a) != stack_fingerprint({**a, "yellow": "5"})


def test_the_stack_fingerprint_is_frozen() -> None:
    """Devices in the field key their ledgers and msg_ids by it: a change would answer every stack twice."""
    channels = {"red": "1", "green": "2", "blue": "3", "yellow": "4"}
    assert stack_fingerprint(channels) == hashlib.sha256(b"blue:3\ngreen:2\nred:1\nyellow:4").hexdigest()
