"""The agent and its companions as real processes: `run` with signals, `predict`, `listen`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.service.log import parse_line
from agent.stacks.labels import CHANNELS
from tests.agent_harness import drop, stack_files, write_config
from tests.broker import retained
from tests.helpers import refuse_open

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def hpa_edge(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


class Lines:
    """Collects a process's stdout lines in a thread so the test can wait for events."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[str]:
        return [parse_line(line).get("event", "") for line in self.lines if line.startswith("level=")]

    def wait_for(self, event: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if event in self.events():
                return True
            time.sleep(0.05)
        return False


@contextmanager
def agent_process(
    config: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """`hpa-edge run` with only the test's HPA_EDGE_* variables (`env`)."""
    process = subprocess.Popen(
        hpa_edge("run", "--config", str(config)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}, **(env or {})},
    )
    lines = Lines(process)
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        lines.thread.join(5)


def test_sigterm_finishes_publishes_offline_and_exits_zero(tmp_path, broker, subscriber, stack_source):
    config = write_config(tmp_path, broker.port)
    with agent_process(config) as (process, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        drop(stack_files(stack_source, 30), tmp_path / "incoming", "term")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    own = [e for e in lines.events() if e != "library_log"]  # e.g. watchdog's observer at stop
    assert own[-3:] == ["stop_requested", "mqtt_offline", "agent_stopped"]
    assert [m.payload for m in subscriber.on("status")][-1] == b"offline"
    status = retained(broker.port, "hpa-edge/scope/status")
    assert status.payload == b"offline"
    assert status.retain


def test_sigint_stops_cleanly_too(tmp_path, broker):
    config = write_config(tmp_path, broker.port)
    with agent_process(config) as (process, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0


def test_a_bundle_with_a_changed_byte_stops_the_agent_at_start_with_the_reason(tmp_path, broker):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "models" / "demo", bundle)
    onnx = bundle / "classifiers.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    config = write_config(tmp_path, broker.port, {"bundle": {"path": str(bundle)}})
    with agent_process(config) as (process, lines):
        assert process.wait(30) == 1
    lines.thread.join(5)
    failed = [parse_line(line) for line in lines.lines if "event=start_failed" in line]
    assert failed
    assert "classifiers.onnx: sha256" in failed[0]["reason"]


def test_a_missing_acquisition_folder_stops_the_agent_at_start(tmp_path, broker):
    config = write_config(tmp_path, broker.port, {"watch": {"folder": str(tmp_path / "absent")}})
    with agent_process(config) as (process, lines):
        assert process.wait(30) == 1
    lines.thread.join(5)
    assert any("does not exist" in line for line in lines.lines if "start_failed" in line)


def test_a_bad_configuration_exits_2_before_anything_starts(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nprotocol = 'four'\n")
    done = subprocess.run(hpa_edge("run", "--config", str(config)), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "mqtt.protocol: 'four' is not '5' or '3.1.1'" in done.stderr


def test_predict_prints_one_json_result_per_stack_and_errors_on_stderr(tmp_path, stack_source):
    folder = tmp_path / "stacks"
    folder.mkdir()
    drop(stack_files(stack_source, 31), folder, "p1")
    drop(stack_files(stack_source, 32), folder, "p2")
    drop(stack_files(stack_source, 33), folder, "p3", order=("red", "green", "blue"))
    done = subprocess.run(
        hpa_edge("predict", "--bundle", str(REPO / "models" / "demo"), str(folder)),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1  # one stack lacks a channel
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["stack_id"] for d in documents] == ["p1", "p2"]
    assert all(len(d["scores"]) == 28 and d["purpose"] == "demo" for d in documents)
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert errors == [{"stack_id": "p3", "code": "missing_channel", "message": errors[0]["message"]}]
    assert "yellow" in errors[0]["message"]


def test_predict_reports_a_stack_the_machine_cannot_open_for_now_and_goes_on(
    tmp_path, stack_source, monkeypatch, capsys
):
    """Too many open files is no verdict on the stack (no `unreadable`), and it does not end
    the run: one line says so, the other stacks get their results."""
    from agent.cli import main

    folder = tmp_path / "stacks"
    folder.mkdir()
    drop(stack_files(stack_source, 31), folder, "p1")
    drop(stack_files(stack_source, 32), folder, "p2")
    refuse_open(monkeypatch, "p1_green.png")
    assert main(["predict", "--bundle", str(REPO / "models" / "demo"), str(folder)]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["stack_id"] for line in out.splitlines()] == ["p2"]
    (error,) = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert (error["stack_id"], error["code"]) == ("p1", "os_error")
    assert "Too many open files" in error["message"]


def test_predict_gives_the_same_scores_as_the_agent(tmp_path, broker, subscriber, stack_source):
    config = write_config(tmp_path, broker.port)
    files = stack_files(stack_source, 34)
    with agent_process(config) as (process, lines):
        assert lines.wait_for("agent_ready"), lines.lines
        drop(files, tmp_path / "incoming", "same")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    from_agent = json.loads(subscriber.on("results")[0].payload)
    done = subprocess.run(
        hpa_edge("predict", "--bundle", str(REPO / "models" / "demo"),
                 *(str(tmp_path / "incoming" / "done" / f"same_{c}.png") for c in CHANNELS)),
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    from_predict = json.loads(done.stdout)
    assert from_predict["scores"] == from_agent["scores"]
    assert from_predict["labels"] == from_agent["labels"]


def test_predict_refuses_a_missing_bundle(tmp_path):
    done = subprocess.run(
        hpa_edge("predict", "--bundle", str(tmp_path / "nope"), str(tmp_path)),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "bundle folder does not exist" in done.stderr


def test_listen_prints_results_as_a_table(tmp_path, broker, stack_source):
    listener = subprocess.Popen(
        hpa_edge("listen", "--broker", f"127.0.0.1:{broker.port}", "--count", "1", "--seconds", "60"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # let it subscribe
        config = write_config(tmp_path, broker.port)
        with agent_process(config) as (process, lines):
            assert lines.wait_for("agent_ready"), lines.lines
            drop(stack_files(stack_source, 35), tmp_path / "incoming", "shown")
            out, err = listener.communicate(timeout=60)
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert listener.returncode == 0, err
    row = next(line for line in out.splitlines() if " shown " in line)
    assert "scope" in row
    assert "[demo]" in row
    assert "| top " in row
    assert " ms" in row
