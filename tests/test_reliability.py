"""Faults the agent must survive without a false error, a lost result or a crash loop.

The real agent in a thread (tests/agent_harness.py), the demo bundle, real SQLite, a real
mosquitto; the fault is made for real where it can be (a tmpfs that fills up, a folder
deleted) and injected through the agent's own seams (its move function, its pipeline)
where it cannot. The process-level crash points are in test_crashpoints.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.service.agent import Agent, _signature
from agent.service.files import move_file
from agent.service.lifecycle import Phase, StackLife
from agent.service.outbox import Outbox
from agent.service.state import Ledger
from agent.service.watcher import list_folder
from agent.stacks.labels import CHANNELS
from tests.agent_harness import config_for, drop, running
from tests.broker import Subscriber
from tests.helpers import refuse_open, write_stack
from tests.test_faults import fill, tmpfs

pytestmark = pytest.mark.integration


def results(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on("results")]


def errors(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on("errors")]


@pytest.fixture
def stacks(tmp_path: Path) -> dict[str, dict[str, Path]]:
    """Small synthetic stacks outside the watched folder, by id (different pixels each)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    return {name: write_stack(staging, name, size=(96, 96), seed=i) for i, name in enumerate("abcdefg")}


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def moving_only(n: int) -> Any:
    """A move function that moves the first `n` files, then fails as a full disk does."""
    moved: list[Path] = []

    def move(source: Path, folder: Path) -> Path:
        if len(moved) >= n:
            raise OSError(28, "No space left on device")
        moved.append(source)
        return move_file(source, folder)

    return move


# Remnants: files of a recorded stack met again ---------------------------------------------
def test_files_left_by_an_interrupted_disposal_are_finished_at_restart_without_an_error(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0}})
    with running(config, demo_bundle) as agent:
        agent.disposer.move = moving_only(1)
        agent.move_retry = 3600.0  # the disposal is not retried in this run: the restart must finish it
        drop(stacks["a"], config.watch.folder, "a")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        assert subscriber.wait_for(lambda: len(names_in(config.folder("done"))) == 1)
    assert len(list(config.watch.folder.glob("a_*"))) == 3
    with running(config, demo_bundle):
        assert subscriber.wait_for(lambda: not list(config.watch.folder.glob("a_*")))
        time.sleep(1.5)  # longer than incomplete_timeout: nothing is quarantined later
    assert names_in(config.folder("done")) == sorted(f"a_{c}.png" for c in CHANNELS)
    assert len(results(subscriber)) == 1
    assert errors(subscriber) == []
    assert names_in(config.folder("quarantine")) == []


def test_a_channel_of_a_done_stack_copied_in_again_is_filed_silently(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0}})
    with running(config, demo_bundle):
        drop(stacks["a"], config.watch.folder, "a")
        assert subscriber.wait_for(lambda: len(names_in(config.folder("done"))) == 4)
        shutil.copyfile(stacks["a"]["green"], config.watch.folder / "a_green.png")
        assert subscriber.wait_for(lambda: not (config.watch.folder / "a_green.png").exists())
        time.sleep(1.5)
    assert len(results(subscriber)) == 1
    assert errors(subscriber) == []
    assert names_in(config.folder("done")) == sorted(f"a_{c}.png" for c in CHANNELS)


def test_files_of_a_failed_stack_left_by_an_interrupted_disposal_follow_it_to_failed(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    """An error's remnants wait for the incomplete timeout (the same bytes might be a new
    attempt in progress), then join their stack in failed/ with no second error."""
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0}})
    bad = dict(stacks["b"])
    broken = tmp_path / "broken_yellow.png"
    broken.write_bytes(bad["yellow"].read_bytes()[:200])
    bad["yellow"] = broken
    with running(config, demo_bundle) as agent:
        agent.disposer.move = moving_only(1)
        agent.move_retry = 3600.0
        drop(bad, config.watch.folder, "b")
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
    with running(config, demo_bundle):
        assert subscriber.wait_for(lambda: not list(config.watch.folder.glob("b_*")))
    assert names_in(config.folder("failed")) == sorted([*(f"b_{c}.png" for c in CHANNELS), "b.error.json"])
    assert len(errors(subscriber)) == 1
    assert names_in(config.folder("quarantine")) == []


# Errors are not final ---------------------------------------------------------------------
def test_the_same_bytes_dropped_again_after_a_refusal_since_lifted_get_a_result(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    small = config_for(tmp_path, broker.port, {"stack": {"max_side": 64}})
    with running(small, demo_bundle):
        drop(stacks["c"], small.watch.folder, "c")
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
    first_error = errors(subscriber)[0]
    assert first_error["moved_to"] == "failed"
    wide = config_for(tmp_path, broker.port, {"stack": {"max_side": 4096}})
    with running(wide, demo_bundle):
        for channel in CHANNELS:
            shutil.copyfile(
                wide.folder("failed") / f"c_{channel}.png", wide.watch.folder / f"c_{channel}.png"
            )
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    assert results(subscriber)[0]["stack_id"] == "c"
    assert names_in(wide.folder("done")) == sorted(f"c_{c}.png" for c in CHANNELS)


def test_a_second_different_error_of_the_same_stack_keeps_the_first_error_file(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 0.8}})
    with running(config, demo_bundle):
        drop(stacks["d"], config.watch.folder, "d", order=("red", "green", "blue"))
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
        # The error is published before the files move; writing the same names while they move
        # races the rename itself, which no stat can catch (docs/reliability.md).
        assert subscriber.wait_for(lambda: not list(config.watch.folder.glob("d_*")))
        drop(stacks["e"], config.watch.folder, "d", order=("red", "green"))  # other bytes, same id
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 2)
    documents = [json.loads(p.read_text()) for p in sorted(config.folder("quarantine").glob("d.error*.json"))]
    assert sorted(d["msg_id"] for d in documents) == sorted(e["msg_id"] for e in errors(subscriber))


# A file that changes after it was read ------------------------------------------------------
def test_a_channel_rewritten_after_it_was_read_is_quarantined_with_an_error_naming_it(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0}})
    with running(config, demo_bundle) as agent:
        dispose = agent.disposer.dispose

        def rewrite_then_dispose(analysis: Any, names: Any, expected: Any = None) -> Any:
            target = config.watch.folder / "f_green.png"
            if target.exists():
                shutil.copyfile(stacks["g"]["green"], target)  # the microscope writes it again
            return dispose(analysis, names, expected)

        agent.disposer.dispose = rewrite_then_dispose  # type: ignore[method-assign]
        drop(stacks["f"], config.watch.folder, "f")
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
    (result,) = results(subscriber)
    (error,) = errors(subscriber)
    assert error["code"] == "changed_after_read"
    assert "f_green.png" in error["message"]
    assert error["files"]["green"]["sha256"] != result["files"]["green"]["sha256"]
    assert names_in(config.folder("done")) == sorted(f"f_{c}.png" for c in ("red", "blue", "yellow"))
    assert "f_green.png" in names_in(config.folder("quarantine"))


def test_a_channel_rewritten_while_it_is_being_moved_is_put_back_and_quarantined_on_its_own(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0}})
    with running(config, demo_bundle) as agent:

        def move_as_the_microscope_rewrites(source: Path, folder: Path) -> Path:
            if source.name == "h_green.png":  # past the agent's stat, before the rename
                shutil.copyfile(stacks["g"]["green"], source)
            return move_file(source, folder)

        agent.disposer.move = move_as_the_microscope_rewrites
        drop(stacks["f"], config.watch.folder, "h")
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
    (result,) = results(subscriber)
    (error,) = errors(subscriber)
    assert error["code"] == "changed_after_read"
    assert error["files"]["green"]["sha256"] != result["files"]["green"]["sha256"]
    assert names_in(config.folder("done")) == sorted(f"h_{c}.png" for c in ("red", "blue", "yellow"))
    assert (config.folder("quarantine") / "h_green.png").read_bytes() == stacks["g"]["green"].read_bytes()


# Failures outside the stack ---------------------------------------------------------------
def test_analysis_failing_on_every_stack_degrades_the_agent_and_keeps_the_files(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle) as agent:
        assert agent.pipeline is not None
        infer = agent.pipeline.infer
        agent.breaker.retry_after, agent.breaker.pause = 0.2, 1.0

        def broken(prepared: Any) -> Any:
            raise RuntimeError("the runtime lost its delegate")

        agent.pipeline.infer = broken  # type: ignore[method-assign,assignment]
        for name in "abcde":
            drop(stacks[name], config.watch.folder, name)
        assert subscriber.wait_for(lambda: agent.stats.degraded is not None)
        assert "DEGRADED" in agent.status_line()
        assert subscriber.wait_for(lambda: [m.payload for m in subscriber.on("status")][-1] == b"degraded")
        assert errors(subscriber) == []
        assert len(list(config.watch.folder.glob("*.png"))) == 20
        agent.pipeline.infer = infer  # type: ignore[method-assign]
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 5, 20)
        assert subscriber.wait_for(lambda: agent.stats.degraded is None)
        assert subscriber.wait_for(lambda: [m.payload for m in subscriber.on("status")][-1] == b"online")
    assert errors(subscriber) == []


def test_a_stack_that_fails_unexpectedly_on_every_attempt_fails_for_good_once(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle) as agent:
        assert agent.pipeline is not None
        infer = agent.pipeline.infer
        agent.breaker.retry_after = 0.2
        tries: list[str] = []

        def poisoned(prepared: Any) -> Any:
            if prepared.stack.stack_id == "p":
                tries.append("p")
                raise ValueError("kernel failed on this input")
            return infer(prepared)

        agent.pipeline.infer = poisoned  # type: ignore[method-assign,assignment]
        drop(stacks["a"], config.watch.folder, "p")
        drop(stacks["b"], config.watch.folder, "ok")
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1 and len(results(subscriber)) == 1)
    (error,) = errors(subscriber)
    assert error["code"] == "inference_failed"
    assert len(tries) == agent.breaker.per_stack


def test_a_file_that_cannot_be_opened_for_now_is_tried_again_not_failed(
    tmp_path, broker, subscriber, demo_bundle, stacks, monkeypatch
):
    """Too many open files (or a network share failing for now) says nothing about the stack:
    it is deferred and taken again, and gets its result; no error, nothing in failed/."""
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle) as agent:
        agent.breaker.retry_after = 0.2
        refused = refuse_open(monkeypatch, "m_red.png", times=2)
        drop(stacks["a"], config.watch.folder, "m")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    assert len(refused) == 2
    assert errors(subscriber) == []
    assert names_in(config.folder("failed")) == []


def test_a_stack_whose_file_changed_while_it_was_read_is_taken_again_once_it_settles(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    """`changed` is about a writer still busy, not about the bytes: no error, a result later."""
    from agent.stacks.errors import StackError

    config = config_for(tmp_path, broker.port, {"watch": {"settle_seconds": 0.3}})
    with running(config, demo_bundle) as agent:
        assert agent.pipeline is not None
        pipeline = agent.pipeline
        prepare = pipeline.prepare
        calls: list[str] = []

        def changing_once(stack_id: str, paths: Any) -> Any:
            calls.append(stack_id)
            if len(calls) == 1:
                return pipeline.failure(stack_id, paths, StackError("changed", "file changed while read"))
            return prepare(stack_id, paths)

        pipeline.prepare = changing_once  # type: ignore[method-assign]
        drop(stacks["a"], config.watch.folder, "w")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    assert errors(subscriber) == []
    assert calls == ["w", "w"]


def test_a_stack_the_process_died_on_twice_is_set_aside_as_crashed(
    tmp_path, broker, subscriber, demo_bundle, stacks
):
    config = config_for(tmp_path, broker.port)
    drop(stacks["a"], config.watch.folder, "x")
    listing = list_folder(config.watch.folder)
    life = StackLife("x", {c: f"x_{c}.png" for c in CHANNELS}, Phase.COMPLETE, 0.0)
    life.entries = {name: listing[name] for name in life.names.values()}
    ledger = Ledger(config.state.database)
    for _ in range(2):  # two starts that died in the middle of this stack
        ledger.attempts_started({"x": _signature(life)})
    ledger.close()
    with running(config, demo_bundle):
        assert subscriber.wait_for(lambda: len(errors(subscriber)) == 1)
        drop(stacks["b"], config.watch.folder, "y")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    (error,) = errors(subscriber)
    assert error["code"] == "crashed"
    assert names_in(config.folder("failed")) == sorted([*(f"x_{c}.png" for c in CHANNELS), "x.error.json"])


# The state database -----------------------------------------------------------------------
@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "statedisk", "2m")


def test_the_agent_starts_on_a_full_state_disk_and_catches_up_when_space_returns(
    tmp_path, broker, subscriber, demo_bundle, stacks, state_disk
):
    config = config_for(tmp_path, broker.port, {"state": {"database": str(state_disk / "state.db")}})
    filler = fill(state_disk)
    with running(config, demo_bundle) as agent:
        drop(stacks["a"], config.watch.folder, "a")
        assert subscriber.wait_for(lambda: agent.stats.degraded is not None)
        time.sleep(0.5)
        assert results(subscriber) == []
        assert len(list(config.watch.folder.glob("a_*"))) == 4  # nothing moved without a record
        agent.state_retry = 0.3
        filler.unlink()
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1, 20)
        assert subscriber.wait_for(lambda: agent.stats.degraded is None)
    assert names_in(config.folder("done")) == sorted(f"a_{c}.png" for c in CHANNELS)


def test_a_state_disk_filling_while_stacks_arrive_keeps_their_files_until_space_returns(
    tmp_path, broker, subscriber, demo_bundle, stacks, state_disk
):
    config = config_for(tmp_path, broker.port, {"state": {"database": str(state_disk / "state.db")}})
    with running(config, demo_bundle) as agent:
        agent.state_retry = 0.3
        drop(stacks["a"], config.watch.folder, "a")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        filler = fill(state_disk)
        drop(stacks["b"], config.watch.folder, "b")
        assert subscriber.wait_for(lambda: agent.stats.degraded is not None)
        assert len(list(config.watch.folder.glob("b_*"))) == 4
        filler.unlink()
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 2, 20)
    assert errors(subscriber) == []


def test_the_database_deleted_under_the_running_agent_is_restored_with_its_pending_messages(
    tmp_path, demo_bundle, stacks
):
    config = config_for(tmp_path, 9)  # nothing listens on port 9: messages stay pending
    with running(config, demo_bundle) as agent:
        drop(stacks["a"], config.watch.folder, "a")
        deadline = time.monotonic() + 20
        while len(names_in(config.folder("done"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        for suffix in ("", "-wal", "-shm"):
            Path(str(config.state.database) + suffix).unlink(missing_ok=True)
        agent.watcher.wake.set()  # type: ignore[union-attr]
        while not config.state.database.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        drop(stacks["b"], config.watch.folder, "b")
        while len(names_in(config.folder("done"))) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    outbox = Outbox(config.state.database)
    pending = {row.msg_id for row in outbox.next_rows(100)}
    outbox.close()
    assert len(pending) == 2  # both results (a flagged one is also on the review topic: two rows)
    ledger = Ledger(config.state.database)
    assert ledger.counts() == {"result": 2}
    ledger.close()


# The folder -------------------------------------------------------------------------------
def test_the_folder_deleted_and_made_again_is_watched_again(
    tmp_path, broker, subscriber, demo_bundle, stacks, capsys
):
    # Long rescans: the stack after the re-creation is found by the new watch, not by a rescan.
    config = config_for(tmp_path, broker.port, {"watch": {"rescan_interval": 120.0}})
    with running(config, demo_bundle) as agent:
        assert agent.watcher is not None
        assert agent.watcher.mode == "inotify"
        shutil.rmtree(config.watch.folder)
        deadline = time.monotonic() + 10
        while "folder_unreadable" not in capsys.readouterr().out and time.monotonic() < deadline:
            time.sleep(0.05)
        os.mkdir(config.watch.folder)
        time.sleep(0.5)
        drop(stacks["a"], config.watch.folder, "a")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1, 10)
    out = capsys.readouterr().out
    assert out.count("folder_unreadable") <= 1
    assert "folder_back" in out


def test_an_agent_started_with_a_full_state_disk_and_no_database_is_not_a_start_error(
    tmp_path, demo_bundle, state_disk
):
    config = config_for(tmp_path, 9, {"state": {"database": str(state_disk / "state.db")}})
    fill(state_disk)
    agent = Agent(config, bundle=demo_bundle)
    try:
        agent.start()
        assert agent.recorder is None
        assert agent.stats.degraded is not None
        assert "state database" in agent.stats.degraded
    finally:
        agent.close(flush_seconds=0)
