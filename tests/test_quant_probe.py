"""`hpa-edge quant-probe` on a folder of stacks (the real ones when present): every variant reported
with its cosine to the float model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from tests.agent_harness import stack_ids

pytestmark = pytest.mark.slow


def test_quant_probe_reports_int8_below_float32_for_lite0(
    stack_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quant-probe", "--stacks", str(stack_source / "stacks"), "--backbone", "lite0",
            "--weights", "imagenet", "--calibration", "20", "--variants", "int8,float32"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    found = dict(re.findall(r"^  (\S+)\s+cosine min \S+ mean (\S+);", out, re.M))
    assert set(found) == {"int8", "float32"}
    assert float(found["float32"]) > 0.9999  # the float TFLite is the Keras model
    assert float(found["int8"]) < float(found["float32"])
    assert f"{len(stack_ids(stack_source)) - 20} scored stacks" in out  # all but the 20 calibration ones
