"""`hpa-edge demo`: the device side end to end, with each kind of broker it can start."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import mosquitto_binary

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def demo(tmp_path: Path, broker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--broker", broker, "--stacks", "4", "--size", "256",
         "--interval", "0.1", "--workdir", str(tmp_path / "work"), "--timeout", "60"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def check(done: subprocess.CompletedProcess[str], tmp_path: Path, protocol: str) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(MQTT {protocol})" in done.stdout
    assert "4 of 4 stacks reported" in done.stdout
    rows = [line for line in done.stdout.splitlines() if re.match(r"\[ ?\d/4\]", line)]
    assert len(rows) == 4
    assert all("[demo]" in row for row in rows)
    assert len(list((tmp_path / "work" / "incoming" / "done").glob("*.png"))) == 16
    assert "agent stopped (exit 0)" in done.stdout
    assert re.search(
        r"against the painted labels: \d of 4 label sets exact, \d of 4 share the main", done.stdout
    )


def test_demo_with_mosquitto_runs_end_to_end_and_stops_what_it_started(tmp_path: Path) -> None:
    mosquitto_binary()
    done = demo(tmp_path, "mosquitto")
    check(done, tmp_path, "5")
    assert "broker: mosquitto stopped" in done.stdout


def test_demo_with_the_embedded_amqtt_broker_speaks_mqtt_3_1_1(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    done = demo(tmp_path, "amqtt")
    check(done, tmp_path, "3.1.1")
    assert "broker: amqtt stopped" in done.stdout
    log = (tmp_path / "work" / "agent.log").read_text()
    assert "event=mqtt_connected" in log
    assert "protocol=3.1.1" in log
