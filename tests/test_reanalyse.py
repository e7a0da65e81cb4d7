"""`hpa-edge reanalyse`: a bundle over an archive on a real local Dask cluster (2 worker processes),
into the collector's SQLite database: the same scores as `hpa-edge predict`, a second run that
skips everything, and a worker killed mid-run whose tasks re-run with nothing stored twice."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.collector.database import open_database
from agent.collector.schema import migrate
from agent.model.bundle import MANIFEST
from agent.stacks.digest import file_sha256
from agent.stacks.naming import NamingScheme
from agent.tools import reanalyse
from tests.helpers import write_stack

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
N = 20


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 stacks in two plate folders (the archive is searched recursively)."""
    root = tmp_path_factory.mktemp("archive")
    for i in range(N):
        folder = root / f"plate{i % 2}"
        folder.mkdir(exist_ok=True)
        write_stack(folder, f"stack{i:02d}", size=(96, 96), seed=i)
    return root


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as running,
    ):
        yield running


def database(path: Path) -> Any:
    db = open_database(f"sqlite:///{path}")
    migrate(db)
    return db


def stacks_of(archive: Path) -> reanalyse.Stacks:
    stacks, unmatched = reanalyse.find_stacks([archive], NamingScheme())
    assert unmatched == []
    return stacks


def test_results_equal_predicts_and_a_second_run_skips_all(archive, client, tmp_path, capsys):
    sha = file_sha256(DEMO / MANIFEST)
    db = database(tmp_path / "results.db")
    stacks = stacks_of(archive)
    assert len(stacks) == N
    seen: list[int] = []
    first = reanalyse.reanalyse(
        client, stacks, DEMO, sha, db, chunk=2, progress=lambda s: seen.append(s.analysed)
    )
    assert (first.stacks, first.skipped, first.analysed, first.failed, first.lost) == (N, 0, N, 0, 0)
    assert seen[-1] == N  # the progress callback followed the run
    _, rows = db.rows("SELECT stack_id, scores, labels, instrument, bundle_sha256, received_by FROM results")
    assert len(rows) == N
    assert {r[3:] for r in rows} == {("archive", sha, "reanalyse")}
    # each worker loaded the bundle once, whatever the number of tasks it ran
    assert set(client.run(reanalyse.bundles_loaded).values()) <= {0, 1}

    assert main(["predict", "--bundle", str(DEMO), *map(str, sorted(archive.iterdir()))]) == 0
    predicted = {d["stack_id"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert len(predicted) == N
    for stack_id, scores, labels, *_ in rows:
        assert json.loads(scores) == predicted[stack_id]["scores"]
        assert json.loads(labels) == predicted[stack_id]["labels"]

    again = reanalyse.reanalyse(client, stacks, DEMO, sha, db, chunk=2)
    assert (again.skipped, again.analysed, again.failed) == (N, 0, 0)
    assert db.rows("SELECT count(*) FROM results")[1] == [(N,)]
    db.close()


def test_a_killed_worker_has_its_tasks_run_again_and_nothing_is_stored_twice(archive, tmp_path):
    sha = file_sha256(DEMO / MANIFEST)
    db = database(tmp_path / "results.db")
    killed: list[str] = []
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):

        def kill_one_busy_worker(summary: reanalyse.Summary) -> None:
            if killed:
                return
            busy = sorted(client.processing().items(), key=lambda item: -len(item[1]))
            address, keys = busy[0]
            assert keys, "the worker to kill has tasks in hand"
            killed.append(address)
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)

        summary = reanalyse.reanalyse(
            client, stacks_of(archive), DEMO, sha, db, chunk=1, progress=kill_one_busy_worker
        )
        # the scheduler saw the worker die (its tasks could only finish elsewhere, or on its successor)
        assert killed[0] not in client.scheduler_info()["workers"]
    assert killed
    assert (summary.analysed, summary.failed, summary.lost) == (N, 0, 0)
    assert db.rows("SELECT count(*), count(DISTINCT stack_id) FROM results")[1] == [(N, N)]
    assert (
        db.rows("SELECT count(*) FROM result_labels")[1]
        == db.rows("SELECT count(*) FROM (SELECT DISTINCT msg_id, location FROM result_labels) AS t")[1]
    )
    db.close()


def test_the_command_on_a_scheduler_writes_results_and_errors(client, tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(3):
        write_stack(archive, f"whole{i}", seed=100 + i)
    write_stack(archive, "partial", seed=9)["yellow"].unlink()
    (archive / "notes.txt").write_text("not a channel")
    url = f"sqlite:///{tmp_path / 'results.db'}"
    args = ["reanalyse", "--bundle", str(DEMO), str(archive), "--db", url, "--instrument", "scope-7"]
    assert main([*args, "--scheduler", client.scheduler.address]) == 1  # one stack lacks a channel
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["stacks"], summary["analysed"], summary["failed"]) == (4, 3, 1)
    assert "reanalyse: 4/4 stacks" in err
    assert "1 files name no channel" in err
    db = open_database(url)
    assert db.rows("SELECT instrument, count(*) FROM results GROUP BY instrument")[1] == [("scope-7", 3)]
    assert db.rows("SELECT stack_id, code FROM errors")[1] == [("partial", "missing_channel")]
    db.close()


def test_the_command_starts_its_own_local_cluster_and_refuses_a_bad_bundle(tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    write_stack(archive, "one", seed=1)
    url = f"sqlite:///{tmp_path / 'results.db'}"
    assert main(["reanalyse", "--bundle", str(DEMO), str(archive), "--db", url, "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["analysed"] == 1
    assert main(["reanalyse", "--bundle", str(tmp_path / "nope"), str(archive), "--db", url]) == 2
    assert "bundle refused" in capsys.readouterr().err


def test_a_worker_refuses_a_bundle_whose_hash_differs_and_its_stacks_are_lost(archive, client, tmp_path):
    db = database(tmp_path / "results.db")
    stacks = dict(sorted(stacks_of(archive).items())[:3])
    summary = reanalyse.reanalyse(client, stacks, DEMO, "0" * 64, db, chunk=2)
    assert (summary.analysed, summary.lost) == (0, 3)
    assert db.rows("SELECT count(*) FROM results")[1] == [(0,)]
    db.close()


def test_into_postgresql_and_resumed(client, tmp_path, capsys):
    from tests.postgres import cluster

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(4):
        write_stack(archive, f"pg{i}", seed=200 + i)
    with cluster() as server:
        url = server.create_database("reanalysed")
        args = [
            "reanalyse",
            "--bundle",
            str(DEMO),
            str(archive),
            "--db",
            url,
            "--scheduler",
            client.scheduler.address,
        ]
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out)["analysed"] == 4
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out)["skipped"] == 4
        db = open_database(url)
        assert db.rows("SELECT count(*), count(DISTINCT stack_id) FROM results")[1] == [(4, 4)]
        _, [(labels, n_labels)] = db.rows(
            "SELECT (SELECT count(*) FROM result_labels), (SELECT sum(n_labels) FROM results)"
        )
        assert labels == n_labels
        db.close()
