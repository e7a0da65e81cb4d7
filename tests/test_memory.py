"""Memory per stack: a channel at a time, its full resolution let go before the next, big
channels decoded one at a time by the decode threads; and the same results as the
whole-stack path.

Figures (peak RSS, time) are the benchmark's (`python -m agent.tools.memory`,
docs/benchmark.md#memory); here only behaviour is checked, plus, in the slow tier, a
measured bound on a big stack in a fresh process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.model.pipeline import Pipeline, Prepared
from agent.service.config import Config
from agent.service.decoding import Decoder
from agent.stacks import image, quality
from agent.stacks.budget import DEFAULT_BUDGET, Budget
from agent.stacks.image import Header, Limits, decode_cost
from agent.stacks.preprocess import BitDepth, Preprocessing, Reducer, preprocess
from agent.stacks.stack import CHANNEL_THREADS, find_stacks, read_reduced, read_stack
from agent.tools import memory
from tests.conftest import REPO

MB = 1024 * 1024
# The agent's RSS once idle with the demo bundle, after 20 small stacks (measured on the
# team's 2-core x86 with `python -m agent.tools.memory --agent`, docs/benchmark.md#memory).
IDLE_RSS_MB = 212


# ---------------------------------------------------------------- stacks


Paths = dict[str, Path]


def _read(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, path
    return pixels


def _camera_16(folder: Path, source: Paths, size: int, suffix: str, stack_id: str) -> Paths:
    """A real-format 8-bit stack as a 12-bit camera's 16-bit files (offset 100), `size` across."""
    paths = {}
    for channel, path in source.items():
        big = cv2.resize(_read(path), (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        paths[channel] = folder / f"{stack_id}_{channel}{suffix}"
        assert cv2.imwrite(str(paths[channel]), np.rint(big * (3995 / 255) + 100).astype(np.uint16))
    return paths


def _dim_red(folder: Path, source: Paths) -> Paths:
    """16-bit PNGs whose red channel alone would be 10-bit: red is scaled before the stack's
    12 bits are known, and decoded again."""
    paths = {}
    for channel, path in source.items():
        pixels = _read(path).astype(np.float32)
        top = 1000 if channel == "red" else 4000
        paths[channel] = folder / f"dim_{channel}.png"
        assert cv2.imwrite(str(paths[channel]), np.rint(pixels * (top / 255)).astype(np.uint16))
    return paths


@pytest.fixture(scope="module")
def stacks(stack_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Paths]]:
    """Stacks of every kind the device meets: 512 8-bit PNG (real), 2048 16-bit TIFF, a 16-bit
    PNG whose bit depth comes late."""
    found = find_stacks(stack_source / "stacks")
    ids = sorted(found)[:2]
    folder = tmp_path_factory.mktemp("memory")
    out = {f"png8-{i}": (sid, found[sid]) for i, sid in enumerate(ids)}
    out["tiff16-2048"] = ("cam", _camera_16(folder, found[ids[0]], 2048, ".tif", "cam"))
    out["png16-late-bits"] = ("dim", _dim_red(folder, found[ids[1]]))
    return out


def _without_timings(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if not k.endswith("_ms") and k not in ("time", "timings_ms")}


# ---------------------------------------------------------------- same results


@pytest.mark.integration
@pytest.mark.parametrize("bits", [0, 12])
def test_prepare_gives_the_whole_stack_paths_image_figures_and_result(
    demo_bundle: Any, stacks: dict[str, tuple[str, Paths]], bits: int
) -> None:
    """Channel by channel, the pipeline must see exactly what it saw with the four channels
    held at once: the same image, figures, scores, labels and review."""
    pipeline = Pipeline(demo_bundle, "test", bits=bits)
    for kind, (stack_id, paths) in stacks.items():
        prepared = pipeline.prepare(stack_id, paths)
        assert isinstance(prepared, Prepared), kind
        whole = read_stack(stack_id, paths)
        image = preprocess(whole.channels, pipeline.preprocessing)
        figures = quality.measure(whole.channels, bits or None)
        np.testing.assert_array_equal(prepared.image, image, err_msg=kind)
        assert prepared.quality == figures, kind
        assert prepared.stack.sha256 == whole.sha256, kind
        assert prepared.stack.decoded_again == (("red",) if kind == "png16-late-bits" and not bits else ()), (
            kind
        )
        reference = dataclasses.replace(prepared, image=image, quality=figures)
        got, expected = pipeline.infer(prepared).document, pipeline.infer(reference).document
        assert _without_timings(got) == _without_timings(expected), kind


# ---------------------------------------------------------------- a channel per reading thread


@pytest.fixture
def watched_reads(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[np.ndarray]]:
    """Every full-resolution array a channel read returns; each read first checks that of the
    arrays of earlier reads no more are alive than the other reading threads hold."""
    seen: list[weakref.ref[np.ndarray]] = []
    read = image.ChannelFile.read

    def watched(self: image.ChannelFile) -> image.Channel:
        alive = [ref for ref in seen if ref() is not None]
        assert len(alive) < CHANNEL_THREADS, (
            f"{len(alive)} full-resolution channel(s) still held when {self.path.name} is read"
        )
        channel = read(self)
        seen.append(weakref.ref(channel.pixels))
        return channel

    monkeypatch.setattr(image.ChannelFile, "read", watched)
    return seen


@pytest.mark.integration
def test_prepare_holds_no_more_full_resolution_channels_than_its_reading_threads(
    demo_bundle: Any, stacks: dict[str, tuple[str, Paths]], watched_reads: list[Any]
) -> None:
    pipeline = Pipeline(demo_bundle, "test")
    for kind in ("png8-0", "tiff16-2048", "png16-late-bits"):
        watched_reads.clear()
        prepared = pipeline.prepare(*stacks[kind])
        assert isinstance(prepared, Prepared), kind
        assert len(watched_reads) == 4 + len(prepared.stack.decoded_again), kind
        assert all(ref() is None for ref in watched_reads), f"{kind}: the prepared stack holds a channel"
        assert prepared.image.shape == (224, 224, 3)
        assert not hasattr(prepared.stack, "channels")


def test_a_whole_stack_read_holds_all_four_the_reduced_read_one_per_thread(
    tmp_path: Path, watched_reads: list[Any]
) -> None:
    """The fixture itself: it does catch a reader that keeps channels (read_stack holds four)."""
    paths = memory.write_stack(tmp_path, "s", 300, 16, "tif")
    read_reduced("s", paths, Preprocessing(size=64))
    assert len(watched_reads) == 4
    with pytest.raises(AssertionError, match="still held"):
        read_stack("s", paths)


# ---------------------------------------------------------------- the decode threads share a budget


def _stacks_16(folder: Path, n: int, side: int) -> list[tuple[str, dict[str, Path]]]:
    return [(f"b{i}", memory.write_stack(folder, f"b{i}", side, 16, "tif", seed=i)) for i in range(n)]


@pytest.mark.integration
def test_the_decode_threads_decode_big_channels_one_at_a_time(demo_bundle: Any, tmp_path: Path) -> None:
    """A budget smaller than one channel: the agent's two decode threads never hold two."""
    items = _stacks_16(tmp_path, 4, 512)
    pipeline = Pipeline(demo_bundle, "test", decode_budget=64 * 1024)  # one 512 x 512 16-bit channel: 1.5 MB
    decoder = Decoder()
    try:
        results = list(decoder.map(lambda item: pipeline.prepare(*item), items))
    finally:
        decoder.close()
    assert all(isinstance(prepared, Prepared) for _, prepared in results)
    assert pipeline.budget.most_at_once == 1
    assert pipeline.budget.held == 0


def test_a_reservation_that_fits_runs_beside_others_and_one_too_big_waits_until_alone() -> None:
    budget = Budget(100)
    order: list[str] = []
    small_held = threading.Event()
    release_small = threading.Event()

    def hold(name: str, nbytes: int, started: threading.Event | None, until: threading.Event | None) -> None:
        with budget.reserve(nbytes):
            order.append(name)
            if started:
                started.set()
            if until:
                assert until.wait(10)

    first = threading.Thread(target=hold, args=("small", 60, small_held, release_small))
    first.start()
    assert small_held.wait(10)
    with budget.reserve(40):  # fits beside the 60 held
        assert budget.held == 100
    big = threading.Thread(target=hold, args=("big", 500, None, None))
    big.start()
    _wait_for(lambda: budget._next_ticket == budget._serving + 1)  # the big one is queued
    after = threading.Thread(target=hold, args=("after", 10, None, None))
    after.start()
    time.sleep(0.2)
    assert order == ["small"], "neither the big reservation nor the one queued after it may start yet"
    release_small.set()
    for thread in (first, big, after):
        thread.join(10)
    assert order == ["small", "big", "after"], "first come, first served: the big one is not starved"
    assert budget.most_held == 500
    assert budget.held == 0


def _wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        Budget(0)


# ---------------------------------------------------------------- the limits fit the unit


def _unit_memory_max() -> int:
    unit = (REPO / "systemd" / "hpa-edge.service").read_text()
    match = re.search(r"^MemoryMax=(\d+)M$", unit, re.MULTILINE)
    assert match, "MemoryMax=<n>M in the unit"
    return int(match.group(1)) * MB


def _worst_channel_cost(limits: Limits, policy: BitDepth) -> int:
    """The most one legal channel may cost: at the pixel limit, 16-bit, every format and
    colour encoding, a file of the byte limit."""
    reducer = Reducer(Preprocessing(bit_depth=policy))
    costs = []
    for fmt in ("png", "tiff"):
        for samples in (1, 2, 3, 4):
            planes = Header(fmt, 1, 1, 16, samples, 1).planes
            side = int((limits.max_pixels / planes) ** 0.5)
            header = Header(fmt, side, side, 16, samples, 1)
            costs.append(decode_cost(header, limits.max_bytes) + reducer.cost(side, side, 16))
    return max(costs)


@pytest.mark.parametrize("into", [True, False], ids=["opencv>=4.10", "opencv<4.10"])
@pytest.mark.parametrize("mode", ["bits", "percentile"])
def test_the_worst_legal_stack_fits_the_units_memory_max_beside_the_idle_agent(
    monkeypatch: pytest.MonkeyPatch, into: bool, mode: str
) -> None:
    """The default limits (config = agent.example.toml, a test of its own) against the unit's
    MemoryMax: the idle agent plus the decode threads, which hold at most the budget, or one
    channel alone when it is bigger. On the device (Linux: decoded from the open file)."""
    monkeypatch.setattr(image, "DECODE_FROM_FD", True)
    monkeypatch.setattr(image, "DECODE_INTO", into)
    limits = Config().limits()
    worst = _worst_channel_cost(limits, BitDepth(mode=mode))
    decoding = max(DEFAULT_BUDGET, worst)
    assert IDLE_RSS_MB * MB + decoding <= _unit_memory_max(), f"decoding may hold {decoding / MB:.0f} MB"


# ---------------------------------------------------------------- measured, in a fresh process


def test_the_memory_benchmark_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    assert memory.main(["--side", "96", "--repeat", "1", "--whole", "--json", str(out)]) == 0
    report = out.read_text()
    for key in ("reduced", "whole", "peak_above_before_mb", "seconds_median", "96 x 96"):
        assert key in report


@pytest.mark.integration
def test_the_memory_benchmark_measures_the_real_agent_started_as_systemd_starts_it(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    bundle = str(REPO / "models" / "demo")
    argv = ["--side", "256", "--bits", "16", "--format", "tif", "--bundle", bundle, "--agent"]
    assert memory.main([*argv, "--count", "1", "--warmup", "2", "--json", str(out)]) == 0
    agent = json.loads(out.read_text())["agent"]
    assert agent["outcome"] == {"big00_red.tif": "done"}
    assert agent["rss_at_ready_mb"] > 0
    assert agent["peak_mb"] >= agent["idle_rss_mb"]


@pytest.mark.slow
def test_a_big_legal_stack_is_read_within_two_channels_and_a_half(tmp_path: Path) -> None:
    """Four 4000 x 4000 16-bit uncompressed TIFFs (32 MB a channel, 128 MB the stack), read in
    a fresh process: the device's reader peaks under 2.5 channels (the decoded channel, the
    TIFF decoder's strip buffer, the 8-bit copy), where holding the stack took over 4."""
    channel_mb = 4000 * 4000 * 2 / MB
    paths = memory.write_stack(tmp_path / "stack", "big", 4000, 16, "tif")
    args = memory.build_parser().parse_args(["--repeat", "1", "--threads", "2"])
    reduced = memory.measure_reader(args, paths["red"].parent, "reduced")
    whole = memory.measure_reader(args, paths["red"].parent, "whole")
    assert reduced["peak_reset"]
    assert whole["peak_reset"]
    assert reduced["peak_above_before_mb"] < 2.5 * channel_mb, reduced
    assert whole["peak_above_before_mb"] > 4 * channel_mb, whole


_REFAULTS = """
import os, resource, sys
import numpy as np
from agent.stacks.budget import fix_malloc_threshold
if sys.argv[1] == "fixed" and not fix_malloc_threshold():
    print("unfixed"); raise SystemExit
def cycle():
    buffer = np.empty(4 << 20, np.uint8)  # a 2048 x 2048 channel's 8-bit copy
    buffer.fill(1)  # touch every page
    small = np.empty(1, np.uint8)  # a block above it keeps the heap's top from moving down
    del buffer
    return small
kept = [cycle()]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
kept += [cycle() for _ in range(20)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_few_mb_freed_by_a_channel_is_reused_without_faulting_its_pages_in_again() -> None:
    """Fixing the mmap threshold must not leave the trim threshold at glibc's 128 kB: a
    freed 4 MB buffer would go back to the system and be faulted in again, 1,024 pages a
    time (a fifth of a 2048 x 2048 stack's time, docs/benchmark.md)."""
    found = _refaults()
    if found == "unfixed":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert int(found) < 2 * 1024, "20 buffers of 4 MB faulted in again"


def _refaults(**environment: str) -> str:
    """Pages faulted in by 20 cycles of a freed 4 MB buffer, with the thresholds fixed, in a
    fresh process whose environment sets no malloc parameter but `environment`."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run = subprocess.run(
        [sys.executable, "-c", _REFAULTS, "fixed"],
        capture_output=True,
        text=True,
        env={**env, **environment},
        cwd=REPO,
        check=True,
    )
    return run.stdout.strip()


@pytest.mark.parametrize("setting", ["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_an_mmap_threshold_the_operator_set_is_left_alone(setting: str) -> None:
    value = "1048576" if setting.startswith("MALLOC") else "glibc.malloc.mmap_threshold=1048576"
    assert _refaults(**{setting: value}) == "unfixed"


def test_a_trim_threshold_the_operator_set_as_a_tunable_is_kept() -> None:
    """glibc's 128 kB, set on purpose: freed 4 MB buffers go back to the system and fault in again."""
    found = _refaults(GLIBC_TUNABLES="glibc.malloc.check=0:glibc.malloc.trim_threshold=131072")
    if found == "unfixed":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert int(found) > 4 * 1024, "the operator's trim threshold was overridden"  # overridden: < 2,048
