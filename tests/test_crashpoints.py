"""The real agent process killed at every step of a stack's path, then started again.

`HPA_EDGE_CRASH_AT` (agent/service/crashpoint.py) makes the process SIGKILL itself at a named
point, as the OOM killer or a power cut would (the database is on a disk that survives).
After each restart: exactly one result per stack for a consumer that de-duplicates by
msg_id, no error, every file in done/, nothing left in the folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.stacks.labels import CHANNELS
from tests.agent_harness import drop, write_config
from tests.helpers import write_stack
from tests.test_agent_process import agent_process

pytestmark = pytest.mark.integration


def agent(config: Path, crash_at: str | None = None) -> Any:
    return agent_process(config, {"HPA_EDGE_CRASH_AT": crash_at} if crash_at else None)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def killed_at(config: Path, point: str, files: dict[str, Path], folder: Path, stack_id: str) -> None:
    """Drop the stack into an agent that dies at `point`; return once it has died there."""
    with agent(config, point) as (process, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        drop(files, folder, stack_id)
        assert process.wait(30) == -9, lines.lines


@pytest.mark.parametrize(
    "point",
    [
        "after_decode",
        "after_commit",
        "after_move:1",
        "after_move:2",
        "after_move:3",
        "after_move:4",
        "after_publish",
    ],
)
def test_a_stack_survives_a_kill_at_each_step_with_one_result_and_no_error(
    tmp_path, broker, subscriber, point
):
    (tmp_path / "staging").mkdir()
    config = write_config(tmp_path, broker.port, {"watch": {"incomplete_timeout": 2.0}})
    folder = tmp_path / "incoming"
    files = write_stack(tmp_path / "staging", "s", size=(96, 96))
    killed_at(config, point, files, folder, "s")
    with agent(config) as (_, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        done = folder / "done"
        assert wait_until(lambda: len(list(done.glob("s_*"))) == 4 and not list(folder.glob("s_*")))
        assert wait_until(lambda: bool(subscriber.on("results")))
        time.sleep(2.5)  # past incomplete_timeout: no late quarantine
    msg_ids = {json.loads(m.payload)["msg_id"] for m in subscriber.on("results")}
    assert len(msg_ids) == 1
    assert subscriber.on("errors") == []
    assert sorted(p.name for p in done.iterdir()) == sorted(f"s_{c}.png" for c in CHANNELS)
    assert list((folder / "quarantine").iterdir()) == []


def test_a_stack_the_process_dies_on_twice_is_set_aside_as_crashed_and_the_agent_goes_on(
    tmp_path, broker, subscriber
):
    config = write_config(tmp_path, broker.port)
    folder = tmp_path / "incoming"
    (tmp_path / "staging").mkdir()
    poison = write_stack(tmp_path / "staging", "poison", size=(96, 96))
    killed_at(config, "after_decode", poison, folder, "poison")
    with agent(config, "after_decode") as (process, lines):  # the restart dies on it again
        assert process.wait(30) == -9, lines.lines
    healthy = write_stack(tmp_path / "staging", "fine", size=(96, 96), seed=3)
    with agent(config) as (_, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        assert wait_until(lambda: len(subscriber.on("errors")) == 1)
        drop(healthy, folder, "fine")
        assert wait_until(lambda: len(subscriber.on("results")) == 1)
    error = json.loads(subscriber.on("errors")[0].payload)
    assert error["code"] == "crashed"
    assert error["stack_id"] == "poison"
    assert sorted(p.name for p in (folder / "failed").iterdir()) == sorted(
        [*(f"poison_{c}.png" for c in CHANNELS), "poison.error.json"]
    )
