"""The agent end to end: real folder, real demo bundle, real SQLite, real mosquitto."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from agent.model.review import Trust
from agent.stacks.labels import CHANNELS
from agent.stacks.preprocess import preprocess
from agent.stacks.stack import read_stack
from tests.agent_harness import config_for, drop, outbox_depth, running, stack_files
from tests.broker import Proxy, Subscriber

pytestmark = pytest.mark.integration
SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "agent" / "model" / "messages.schema.json").read_text()
)


def validate(payload: bytes, definition: str) -> dict[str, Any]:
    document = json.loads(payload)
    jsonschema.validate(document, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"})
    return document


def results(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on("results")]


def test_a_dropped_stack_arrives_as_a_valid_result_and_its_files_move_to_done(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source)
    with running(config, demo_bundle):
        drop(files, config.watch.folder, "s1")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        assert subscriber.wait_for(lambda: len(subscriber.on("latest")) == 1)
    document = validate(subscriber.on("results")[0].payload, "result")
    assert document["stack_id"] == "s1"
    assert document["instrument"] == "scope"
    assert document["purpose"] == "demo"
    # The labels are the bundle's answer for exactly these pixels.
    stack = read_stack("s1", {c: config.folder("done") / f"s1_{c}.png" for c in CHANNELS})
    probabilities = demo_bundle.probabilities(preprocess(stack.channels, demo_bundle.preprocessing)[None])
    expected = [
        name
        for name, on in zip(document["scores"], demo_bundle.labels_for(probabilities)[0], strict=True)
        if on
    ]
    assert document["labels"] == expected
    np.testing.assert_allclose(list(document["scores"].values()), probabilities[0], atol=1e-6)
    assert {c: e["sha256"] for c, e in document["files"].items()} == dict(stack.sha256)
    assert sorted(p.name for p in config.folder("done").iterdir()) == sorted(f"s1_{c}.png" for c in CHANNELS)
    assert not any(config.watch.folder.glob("s1_*"))
    assert json.loads(subscriber.on("latest")[0].payload)["msg_id"] == document["msg_id"]
    statuses = [m.payload for m in subscriber.on("status")]
    assert statuses[0] == b"online"
    assert statuses[-1] == b"offline"


def test_channels_arriving_in_any_order_slowly_give_one_result(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 1)
    with running(config, demo_bundle) as agent:
        for channel in ("yellow", "blue", "green"):
            shutil.copyfile(files[channel], config.watch.folder / f"late_{channel}.png")
            time.sleep(0.4)
        assert agent.book.waiting == 1
        assert not subscriber.on("results")
        shutil.copyfile(files["red"], config.watch.folder / "late_red.png")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        time.sleep(0.5)
    assert [r["stack_id"] for r in results(subscriber)] == ["late"]


def test_a_channel_written_slowly_in_chunks_is_read_only_once_closed(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 2)
    with running(config, demo_bundle):
        drop(files, config.watch.folder, "slow", order=("red", "green", "blue"))
        data = files["yellow"].read_bytes()
        with open(config.watch.folder / "slow_yellow.png", "wb") as handle:
            for start in range(0, len(data), len(data) // 4 + 1):
                handle.write(data[start : start + len(data) // 4 + 1])
                handle.flush()
                time.sleep(0.5)  # longer than settle_seconds: only the close event says it is done
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) + len(subscriber.on("errors")) >= 1)
    assert not subscriber.on("errors")
    assert [r["stack_id"] for r in results(subscriber)] == ["slow"]


def test_write_then_rename_is_picked_up(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 3)
    outside = tmp_path / "staging"
    outside.mkdir()
    with running(config, demo_bundle):
        for channel in CHANNELS[:2]:  # written under a temporary name in the folder, then renamed
            temporary = config.watch.folder / f"ren_{channel}.png.part"
            shutil.copyfile(files[channel], temporary)
            os.rename(temporary, config.watch.folder / f"ren_{channel}.png")
        for channel in CHANNELS[2:]:  # written elsewhere on the same disk, renamed in
            shutil.copyfile(files[channel], outside / f"ren_{channel}.png")
            os.rename(outside / f"ren_{channel}.png", config.watch.folder / f"ren_{channel}.png")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    assert results(subscriber)[0]["stack_id"] == "ren"
    assert not any(config.folder("done").glob("*.part"))


def test_stacks_already_in_the_folder_at_start_are_processed(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    drop(stack_files(stack_source, 4), config.watch.folder, "before")
    with running(config, demo_bundle):
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
    assert results(subscriber)[0]["stack_id"] == "before"


def test_the_polling_observer_processes_stacks(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port, {"watch": {"observer": "polling"}})
    with running(config, demo_bundle) as agent:
        assert agent.watcher is not None
        assert agent.watcher.mode == "polling"
        drop(stack_files(stack_source, 5), config.watch.folder, "polled")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)


def test_the_same_stack_twice_gives_one_result(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 6)
    with running(config, demo_bundle) as agent:
        drop(files, config.watch.folder, "twice")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        drop(files, config.watch.folder, "twice")
        assert subscriber.wait_for(lambda: agent.stats.counts["duplicates"] == 1)
        time.sleep(0.5)
    assert len(results(subscriber)) == 1
    assert not any(config.watch.folder.glob("twice_*")), "the duplicate's files were left behind"
    assert len(list(config.folder("done").glob("twice_*"))) == 4  # identical copies are not kept twice


def test_a_changed_stack_under_the_same_id_is_processed_again(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 7), config.watch.folder, "redo")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        drop(stack_files(stack_source, 8), config.watch.folder, "redo")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 2)
    first, second = results(subscriber)
    assert first["msg_id"] != second["msg_id"]
    assert len(list(config.folder("done").glob("redo_*"))) == 8  # the second set under numbered names


def test_a_corrupt_stack_goes_to_failed_with_an_error_message(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 9)
    with running(config, demo_bundle) as agent:
        drop(files, config.watch.folder, "bad", order=("red", "green", "blue"))
        (config.watch.folder / "bad_yellow.png").write_bytes(files["yellow"].read_bytes()[:3000])
        assert subscriber.wait_for(lambda: len(subscriber.on("errors")) == 1)
        # and the agent keeps working
        drop(files, config.watch.folder, "good")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        assert agent.stats.counts["failed"] == 1
    error = validate(subscriber.on("errors")[0].payload, "error")
    assert error["stack_id"] == "bad"
    assert error["code"] == "truncated"
    assert error["moved_to"] == "failed"
    failed = config.folder("failed")
    assert sorted(p.name for p in failed.iterdir()) == sorted(
        [*(f"bad_{c}.png" for c in CHANNELS), "bad.error.json"]
    )
    assert json.loads((failed / "bad.error.json").read_text())["msg_id"] == error["msg_id"]


def test_an_incomplete_stack_is_quarantined_after_the_timeout(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.5}})
    with running(config, demo_bundle) as agent:
        drop(stack_files(stack_source, 10), config.watch.folder, "three", order=("red", "green", "blue"))
        assert subscriber.wait_for(lambda: len(subscriber.on("errors")) == 1)
        assert agent.stats.counts["quarantined"] == 1
    error = validate(subscriber.on("errors")[0].payload, "error")
    assert error["code"] == "incomplete"
    assert "yellow" in error["message"]
    assert error["moved_to"] == "quarantine"
    assert sorted(p.name for p in config.folder("quarantine").iterdir()) == sorted(
        ["three_red.png", "three_green.png", "three_blue.png", "three.error.json"]
    )


def test_broker_down_at_start_then_up_delivers_the_backlog_in_order(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    proxy = Proxy(broker.port)  # the agent's way to the broker: closed until started
    config = config_for(tmp_path, proxy.port)
    with running(config, demo_bundle) as agent:
        for i in range(3):
            drop(stack_files(stack_source, 11 + i), config.watch.folder, f"wait{i}")
        assert subscriber.wait_for(lambda: agent.stats.counts["processed"] == 3)
        # files moved although the broker is down (they move just after the count: wait for it)
        assert subscriber.wait_for(lambda: len(list(config.folder("done").glob("wait*"))) == 12)
        assert not subscriber.on("results")
        proxy.start()
        try:
            assert subscriber.wait_for(lambda: len(results(subscriber)) == 3, timeout=30)
        finally:
            time.sleep(0.3)
            agent.request_stop()
    proxy.stop()
    assert [r["stack_id"] for r in results(subscriber)] == ["wait0", "wait1", "wait2"]
    assert outbox_depth(config.state.database) == {"pending": 0, "rejected": 0}


def test_after_delete_removes_processed_files(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port, {"files": {"after": "delete"}})
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 40), config.watch.folder, "gone")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        assert subscriber.wait_for(lambda: not any(config.watch.folder.glob("gone_*")))
    assert not any(config.folder("done").iterdir())


def test_after_leave_keeps_files_in_place_and_does_not_process_them_again(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port, {"files": {"after": "leave"}})
    with running(config, demo_bundle) as agent:
        drop(stack_files(stack_source, 41), config.watch.folder, "kept")
        assert subscriber.wait_for(lambda: len(results(subscriber)) == 1)
        time.sleep(1.5)  # several looks and settle periods
        assert agent.stats.counts == {"processed": 1, "failed": 0, "quarantined": 0, "duplicates": 0}
    assert len(list(config.watch.folder.glob("kept_*"))) == 4


def test_a_symlinked_channel_is_refused_and_its_target_untouched(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    files = stack_files(stack_source, 42)
    outside = tmp_path / "outside_yellow.png"
    shutil.copyfile(files["yellow"], outside)
    with running(config, demo_bundle):
        drop(files, config.watch.folder, "link", order=("red", "green", "blue"))
        (config.watch.folder / "link_yellow.png").symlink_to(outside)
        assert subscriber.wait_for(lambda: len(subscriber.on("errors")) == 1)
    error = validate(subscriber.on("errors")[0].payload, "error")
    assert error["code"] == "symlink"
    assert (config.folder("failed") / "link_yellow.png").is_symlink()
    assert outside.read_bytes() == files["yellow"].read_bytes()


def test_a_stack_half_moved_when_a_move_fails_is_finished_later_not_quarantined(
    tmp_path, broker, subscriber, demo_bundle
):
    """The first file reaches done/, the second move fails: the rest follow at the retry, no false error."""
    from agent.service.files import move_file
    from tests.helpers import write_stack

    # A rescan far off: the retry must come on its own time, not with the next full look.
    config = config_for(
        tmp_path, broker.port, {"watch": {"incomplete_timeout": 1.0, "rescan_interval": 60.0}}
    )
    calls: list[Path] = []

    def full_after_one(source: Path, folder: Path) -> Path:
        calls.append(source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return move_file(source, folder)

    staging = tmp_path / "staging"
    staging.mkdir()
    files = write_stack(staging, "half", size=(128, 128))
    with running(config, demo_bundle) as agent:
        agent.disposer.move = full_after_one
        agent.move_retry = 1.5  # longer than incomplete_timeout: the waiting files must not look incomplete
        drop(files, config.watch.folder, "half")
        assert subscriber.wait_for(lambda: len(list(config.folder("done").glob("half_*"))) == 4, 20)
    assert len(results(subscriber)) == 1
    assert not subscriber.on("errors")
    assert not list(config.folder("quarantine").iterdir())
    assert len(calls) == 5  # one moved, one failed, then the three still in the folder


def test_a_result_flagged_for_review_also_arrives_on_the_review_topic(
    tmp_path, broker, subscriber, demo_bundle
):
    """With margins as wide as the score range every label is uncertain: the stack needs a person."""
    from tests.helpers import write_stack

    wide = dataclasses.replace(demo_bundle, trust=Trust(margins=np.ones(len(demo_bundle.thresholds))))
    config = config_for(tmp_path, broker.port)
    staging = tmp_path / "staging"
    staging.mkdir()
    files = write_stack(staging, "unsure", size=(128, 128))
    with running(config, wide):
        drop(files, config.watch.folder, "unsure")
        assert subscriber.wait_for(lambda: len(subscriber.on("review")) == 1)
    (document,) = results(subscriber)
    assert document["review"] is True
    assert "near_threshold" in document["review_reasons"]
    assert document["near_threshold"]
    assert json.loads(subscriber.on("review")[0].payload) == document
    validate(subscriber.on("review")[0].payload, "result")


def test_an_unflagged_result_is_not_on_the_review_topic(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    """Without margins or a novelty reference, a sound stack with labels is not flagged.

    Stack 0 has labels under the demo bundle in both sources (the real set and the synthetic one).
    """
    config = config_for(tmp_path, broker.port)
    plain = dataclasses.replace(demo_bundle, trust=Trust())  # no margins, no novelty reference
    with running(config, plain):
        drop(stack_files(stack_source), config.watch.folder, "sure")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        time.sleep(0.5)
    (document,) = results(subscriber)
    assert (document["review"], document["review_reasons"]) == (False, [])
    assert not subscriber.on("review")
