"""`hpa-edge bench`: the figures it reports are there and consistent (never asserted as speeds)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.tools.bench import STAGES, summarise, table
from tests.agent_harness import stack_ids

REPO = Path(__file__).resolve().parent.parent


def test_summarise_gives_the_usual_statistics() -> None:
    s = summarise([float(v) for v in range(1, 101)])
    assert (s["min"], s["max"], s["mean"]) == (1.0, 100.0, 50.5)
    assert s["p50"] == 50.5
    assert s["p99"] == pytest.approx(99.01)
    assert s["n"] == 100


def test_summarise_of_nothing_is_empty() -> None:
    assert summarise([]) == {}


def test_the_table_has_one_line_per_stage() -> None:
    text = table({"decode": summarise([1.0, 2.0]), "embed": summarise([3.0])})
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["decode", "embed"]


def bench(tmp_path: Path, *extra: str) -> tuple[dict, list[dict[str, str]], str]:  # type: ignore[type-arg]
    """Run the bench in a fresh interpreter that fails (9) if it imported the workstation's libraries."""
    summary, rows = tmp_path / "bench.json", tmp_path / "bench.csv"
    code = (
        "import sys; from agent.cli import main; rc = main(sys.argv[1:]);"
        "bad = [m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules];"
        "sys.exit(rc or (9 if bad else 0))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "bench", "--bundle", str(REPO / "models" / "demo"), "--runs", "15",
         "--warmup", "2", "--json", str(summary), "--csv", str(rows), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # 9 would mean TensorFlow was imported
    with rows.open() as handle:
        return json.loads(summary.read_text()), list(csv.DictReader(handle)), done.stdout


@pytest.mark.integration
def test_bench_on_a_stacks_folder_reports_every_stage_without_tensorflow(
    tmp_path: Path, stack_source: Path
) -> None:
    summary, rows, out = bench(tmp_path, "--stacks", str(stack_source / "stacks"))
    assert summary["runs"] == 15
    assert len(rows) == 15
    for stage in STAGES:
        assert set(summary["stages_ms"][stage]) >= {"min", "max", "mean", "std", "p50", "p90", "p95", "p99"}
    for row in rows:  # the stages happen one after the other inside the end-to-end time
        parts = sum(float(row[s]) for s in ("decode", "preprocess", "embed", "classify", "commit"))
        assert float(row["end_to_end"]) >= parts * 0.99
    assert summary["bundle"]["sha256"]
    assert summary["versions"]["embedder_runtime"] == "ai_edge_litert.interpreter"
    assert summary["machine"]["cores"] >= 1
    assert summary["peak_rss_mb"] > 0
    assert summary["threads"] >= 1
    assert summary["distinct_stacks"] == len(stack_ids(stack_source))  # every stack in the folder
    assert "end_to_end" in out
    assert "throughput" in out


@pytest.mark.integration
def test_bench_burst_startup_and_broker_round_trip(tmp_path: Path, stack_source: Path, broker) -> None:
    summary, rows, _out = bench(
        tmp_path, "--stacks", str(stack_source / "stacks"), "--burst", "40", "--startup",
        "--broker", f"127.0.0.1:{broker.port}",
    )  # fmt: skip
    assert summary["burst"]["stacks"] == 40
    assert summary["burst"]["failed"] == 0
    assert summary["burst"]["cpu_ms_per_stack"] > 0
    assert summary["burst"]["latency_ms"]["n"] == 40
    startup = summary["startup"]
    assert startup["start_to_ready_s"] > 0
    # resident memory split into the agent's own and the mapped files' (library code)
    assert startup["anonymous_after_200_stacks_mb"] > 0
    assert startup["files_after_200_stacks_mb"] > 0
    assert startup["anonymous_after_200_stacks_mb"] + startup["files_after_200_stacks_mb"] == pytest.approx(
        startup["rss_after_200_stacks_mb"], abs=1.0
    )
    assert summary["stages_ms"]["publish_rtt"]["n"] == 15
    assert all(float(row["publish_rtt"]) > 0 for row in rows)


@pytest.mark.integration
def test_bench_on_synthetic_stacks_needs_no_data(tmp_path: Path) -> None:
    summary, _, _ = bench(tmp_path, "--synthetic", "3", "--size", "256")
    assert summary["distinct_stacks"] == 3
    assert summary["stacks_source"] == "synthetic 3 at 256 px"


@pytest.mark.integration
def test_bench_landing_reports_latency_per_case_and_mode(tmp_path: Path, stack_source: Path, broker) -> None:
    summary, _rows, out = bench(
        tmp_path, "--stacks", str(stack_source / "stacks"), "--landing", "2", "--landing-cases", "as_given",
        "tif16_raw", "--landing-side", "256", "--broker", f"127.0.0.1:{broker.port}",
    )  # fmt: skip
    landing = summary["landing"]
    assert landing["stacks"] == 2
    assert set(landing["cases"]) == {
        f"{case}/{mode}" for case in ("as_given", "tif16_raw") for mode in ("in_place", "renamed_in")
    }
    for result in landing["cases"].values():
        assert result["missed"] == 0
        assert result["latency_ms"]["n"] == 2
        assert {"p50", "p95", "min", "max"} <= set(result["latency_ms"])
        # the agent's own share of each latency, read from the result it published
        assert result["analysis_ms"]["n"] == 2
        assert 0 < result["analysis_ms"]["max"] < result["latency_ms"]["max"]
    assert "landing:" in out


def test_camera_stacks_read_the_same_through_the_raw_tiff_reader_and_opencv(
    tmp_path: Path, stack_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.stacks import image
    from agent.stacks.stack import find_stacks
    from agent.tools.bench_agent import camera_stacks

    stacks = sorted(find_stacks(stack_source / "stacks").items())[:1]
    for case in ("tif16_raw", "tif16_deflate"):
        ((_, paths),) = camera_stacks(stacks, case, 300, tmp_path / case, 1)
        for path in paths.values():
            with image.open_channel(path) as opened:
                assert (opened._raw is not None) == (case == "tif16_raw")
            fast = image.read_channel(path)
            monkeypatch.setattr(image, "RAW_TIFF", False)
            slow = image.read_channel(path)
            monkeypatch.setattr(image, "RAW_TIFF", True)
            assert fast.sha256 == slow.sha256
            assert fast.pixels.dtype == slow.pixels.dtype == "uint16"
            assert (fast.pixels == slow.pixels).all()
