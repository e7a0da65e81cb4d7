"""`hpa-edge outbox list|retry|drop`, run as the operator runs it, against a real database file."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.service.outbox import Outbox
from tests.agent_harness import outbox_depth
from tests.test_drainer import FAST, ListSink, draining, fill, wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """Four results rows, seq 1..4; the broker rejected seq 2 and 4."""
    path = tmp_path / "state.db"
    fill(path, 4)
    outbox = Outbox(path)
    try:
        outbox.rejected(2, "Not authorized (135)")
        outbox.rejected(4, "Topic Name invalid (144)")
    finally:
        outbox.close()
    return path


def states(database: Path) -> dict[int, str]:
    outbox = Outbox(database)
    try:
        return {entry.seq: entry.state for entry in outbox.entries()}
    finally:
        outbox.close()


def hpa_edge(*args: str) -> int:
    return main(["outbox", *args])


def test_list_json_shows_every_row_with_state_reason_and_age(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hpa_edge("list", "--database", str(database), "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["kind"], r["msg_id"], r["state"]) for r in rows] == [
        (1, "results", "m0", "pending"),
        (2, "results", "m1", "rejected"),
        (3, "results", "m2", "pending"),
        (4, "results", "m3", "rejected"),
    ]
    assert [r["reason"] for r in rows] == [None, "Not authorized (135)", None, "Topic Name invalid (144)"]
    assert all(r["age_s"] >= 0 for r in rows)


def test_list_as_text_has_a_line_per_row_and_the_counts(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hpa_edge("list", "--database", str(database)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seq", "kind", "msg_id", "state", "age", "reason"]
    assert lines[2].split()[:4] == ["2", "results", "m1", "rejected"]
    assert lines[2].endswith("Not authorized (135)")
    assert lines[-1] == "2 pending, 2 rejected"


def test_retry_puts_every_rejected_row_back_to_pending(database: Path) -> None:
    assert hpa_edge("retry", "--database", str(database)) == 0
    assert states(database) == {1: "pending", 2: "pending", 3: "pending", 4: "pending"}


def test_retry_with_seq_puts_back_only_those_rows(database: Path) -> None:
    assert hpa_edge("retry", "--database", str(database), "--seq", "4") == 0
    assert states(database) == {1: "pending", 2: "rejected", 3: "pending", 4: "pending"}


def test_retry_of_a_row_that_is_not_rejected_says_so_and_fails(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hpa_edge("retry", "--database", str(database), "--seq", "2", "3") == 1
    assert "seq 3: no such rejected row" in capsys.readouterr().err
    assert states(database)[2] == "pending"


def test_drop_without_a_selection_is_refused_and_deletes_nothing(database: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        hpa_edge("drop", "--database", str(database))
    assert refused.value.code == 2
    assert outbox_depth(database) == {"pending": 2, "rejected": 2}


def test_drop_rejected_deletes_every_rejected_row_and_only_those(database: Path) -> None:
    assert hpa_edge("drop", "--database", str(database), "--rejected") == 0
    assert states(database) == {1: "pending", 3: "pending"}


def test_drop_seq_deletes_those_rows_whatever_their_state(database: Path) -> None:
    assert hpa_edge("drop", "--database", str(database), "--seq", "1", "2") == 0
    assert states(database) == {3: "pending", 4: "rejected"}


def test_the_database_is_the_one_the_agents_configuration_names(
    database: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[state]\ndatabase = "{database}"\n')
    assert hpa_edge("list", "--config", str(config)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 pending, 2 rejected"


def test_a_missing_database_is_reported_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing.db"
    assert hpa_edge("list", "--database", str(missing)) == 1
    assert "no such database" in capsys.readouterr().err
    assert not missing.exists()


def test_rows_put_back_while_the_agent_runs_are_sent_by_its_drainer(database: Path) -> None:
    sink = ListSink()  # the ACL was fixed: the broker now accepts everything
    settings = dataclasses.replace(FAST, rescan_seconds=0.1)
    with draining(database, sink, settings) as drainer:
        assert wait_for(lambda: drainer.sent == 2)  # the pending rows; the rejected ones stay
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "outbox", "retry", "--database", str(database)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("put back to pending: 2 row(s)")
        assert wait_for(lambda: drainer.sent == 4)
    assert [row.msg_id for row in sink.sent] == ["m0", "m2", "m1", "m3"]
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}
