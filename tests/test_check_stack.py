"""`hpa-edge check-stack`: an operator's look at a folder before the agent watches it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from tests.helpers import refuse_open, write_png, write_stack


def test_reports_each_stack_and_fails_when_one_is_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_stack(tmp_path, "good")
    write_stack(tmp_path, "bad")
    (tmp_path / "bad_green.png").write_bytes(b"")
    assert main(["check-stack", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "OK   good: 64 x 64 uint8" in out
    assert "FAIL bad:" in out
    assert "bad_green.png" in out
    assert "[empty_file]" in out
    assert "1 of 2 stacks OK" in out


def test_a_stack_the_machine_cannot_open_for_now_is_reported_and_the_others_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack(tmp_path, "good")
    write_stack(tmp_path, "busy")
    refuse_open(monkeypatch, "busy_red.png")
    assert main(["check-stack", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "OK   good: 64 x 64 uint8" in out
    assert "FAIL busy:" in out
    assert "[os_error]" in out
    assert "1 of 2 stacks OK" in out


def test_json_output_and_success_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_stack(tmp_path, "s16", dtype=np.uint16)
    for path in paths.values():
        write_png(path, np.full((8, 8), 3000, np.uint16))
    assert main(["check-stack", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip())
    assert report == {
        "stack_id": "s16",
        "ok": True,
        "width": 8,
        "height": 8,
        "dtype": "uint16",
        "auto_bits": 12,
    }


def test_bad_pattern_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-stack", str(tmp_path), "--pattern", "^(?P<id>.+)$"]) == 2
    assert "channel" in capsys.readouterr().out


def test_missing_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-stack", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().out
