"""`hpa-edge compare`: the device pipeline and the float reference on the same stacks, with ratios.

Timings are reported, never asserted as speeds: only that both sides ran, how often, and
that the ratios are the reference's p50 over the device's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from export.conversion.compare import RATIO_STAGES, ratios


def test_the_ratios_are_the_references_p50_over_the_devices() -> None:
    device = {s: {"p50": 2.0} for s in RATIO_STAGES}
    reference = {"embed": {"p50": 50.0}, "classify": {"p50": 3.0}, "end_to_end": {"p50": 61.0}}
    assert ratios(device, reference) == {"embed": 25.0, "classify": 1.5, "end_to_end": 30.5}


@pytest.mark.integration
def test_compare_runs_the_device_and_the_float_reference_and_gives_ratios(
    tmp_path: Path, small_model: Path, small_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary_file = tmp_path / "compare.json"
    code = main(["compare", "--bundle", str(small_bundle), "--model", str(small_model),
                 "--synthetic", "3", "--size", "256", "--runs", "5", "--warmup", "1",
                 "--compare-runs", "3", "--json", str(summary_file)])  # fmt: skip
    assert code == 0
    summary = json.loads(summary_file.read_text())
    assert summary["device"]["stages_ms"]["end_to_end"]["n"] == 5
    assert summary["float_reference"]["stages_ms"]["end_to_end"]["n"] == 3
    assert set(summary["ratio_p50"]) == {"embed", "classify", "end_to_end"}
    assert all(ratio > 0 for ratio in summary["ratio_p50"].values())
    assert summary["mismatch"] == []  # the bundle was exported from this model
    assert summary["distinct_stacks"] == 3
    out = capsys.readouterr().out
    assert "float reference (Keras + scikit-learn" in out
    assert "ratio reference / device at p50: embed" in out


def test_compare_needs_stacks_to_run_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--bundle", "b", "--model", "m"])
    assert "one of the arguments --stacks --synthetic is required" in capsys.readouterr().err
