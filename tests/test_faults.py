"""The fault suite: the real agent process against a real mosquitto, each scenario ending with
the same invariants (tests/fault_harness.py: check_invariants)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.tools.bench_agent import link_or_copy
from tests.agent_harness import stack_files, stack_ids, write_config
from tests.broker import Broker, Proxy
from tests.fault_harness import AgentProcess, Consumer, check_invariants, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stacks(stack_source: Path) -> list[dict[str, Path]]:
    """Every stack of the session's source (real HPA stacks, or 24 synthetic ones), by channel."""
    return [stack_files(stack_source, i) for i in range(len(stack_ids(stack_source)))]


def drop(files: dict[str, Path], folder: Path, stack_id: str) -> None:
    """Link (or copy) a stack in under a new id, each file written elsewhere and renamed in."""
    staging = folder.parent / "staging"
    staging.mkdir(exist_ok=True)
    for channel, source in files.items():
        staged = staging / f"{stack_id}_{channel}.png"
        link_or_copy(source, staged)
        os.rename(staged, folder / staged.name)


def drop_many(stacks: list[dict[str, Path]], folder: Path, ids: list[str]) -> None:
    for i, stack_id in enumerate(ids):
        drop(stacks[i % len(stacks)], folder, stack_id)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A persistent broker, a consumer on it, and the agent's configuration (not started)."""
    broker = Broker(tmp_path / "broker", persist=True).start()
    consumer = Consumer(broker.port)
    parts: dict[str, object] = {"broker": broker, "consumer": consumer, "tmp": tmp_path}
    yield parts
    agent = parts.get("agent")
    if isinstance(agent, AgentProcess) and agent.alive():
        agent.stop()
    consumer.close()
    broker.stop()
    proxy = parts.get("proxy")
    if isinstance(proxy, Proxy):
        proxy.stop()


def start_agent(world: dict[str, object], port: int | None = None, **sections: object) -> AgentProcess:
    tmp = world["tmp"]
    broker = world["broker"]
    assert isinstance(tmp, Path)
    assert isinstance(broker, Broker)
    merged: dict[str, dict[str, object]] = {
        "mqtt": {"keepalive": 5, "flush_seconds": 2.0},
        "watch": {"incomplete_timeout": 4.0},
    }
    for name, values in sections.items():
        assert isinstance(values, dict)
        merged.setdefault(name, {}).update(values)
    config = write_config(tmp, port or broker.port, merged)
    agent = AgentProcess(config, tmp / "agent.log").start()
    world["agent"] = agent
    return agent


def consumer_of(world: dict[str, object]) -> Consumer:
    consumer = world["consumer"]
    assert isinstance(consumer, Consumer)
    return consumer


def incoming(world: dict[str, object]) -> Path:
    tmp = world["tmp"]
    assert isinstance(tmp, Path)
    return tmp / "incoming"


def test_broker_stopped_mid_burst_and_restarted(world, stacks):
    agent = start_agent(world)
    consumer, broker = consumer_of(world), world["broker"]
    assert isinstance(broker, Broker)
    ids = [f"b{i:03d}" for i in range(200)]
    drop_many(stacks, incoming(world), ids)
    assert wait_until(lambda: len(consumer.results) >= 10)
    broker.stop()
    time.sleep(2)
    broker.start()  # same port; the consumer's session (and what was queued for it) survives
    check_invariants(consumer, incoming(world), ids, [], 4 * len(ids), agent)
    assert agent.lines("mqtt_connection_lost") or agent.lines("mqtt_connect_failed")


def test_broker_down_when_the_agent_starts(world, stacks):
    broker = world["broker"]
    assert isinstance(broker, Broker)
    proxy = Proxy(broker.port)  # the agent's only way to the broker, closed for now
    world["proxy"] = proxy
    agent = start_agent(world, port=proxy.port)
    ids = [f"d{i:02d}" for i in range(10)]
    drop_many(stacks, incoming(world), ids)
    assert wait_until(lambda: len(list((incoming(world) / "done").glob("*"))) == 40)
    assert not consumer_of(world).results
    proxy.start()
    check_invariants(consumer_of(world), incoming(world), ids, [], 40, agent)


def test_a_silent_connection_is_detected_by_keepalive(world, stacks):
    broker = world["broker"]
    assert isinstance(broker, Broker)
    proxy = Proxy(broker.port).start()
    world["proxy"] = proxy
    agent = start_agent(world, port=proxy.port)
    consumer = consumer_of(world)
    drop_many(stacks, incoming(world), ["s00", "s01", "s02"])
    assert wait_until(lambda: len(consumer.results) == 3)
    proxy.freeze()  # the link stays open but carries nothing, as behind a dead NAT or a cut cable
    later = [f"s{i:02d}" for i in range(3, 8)]
    drop_many(stacks, incoming(world), later)
    check_invariants(consumer, incoming(world), ["s00", "s01", "s02", *later], [], 32, agent, timeout=60)
    assert agent.lines("mqtt_connection_lost"), agent.tail()


def test_agent_killed_mid_burst_and_started_again(world, stacks):
    agent = start_agent(world)
    consumer = consumer_of(world)
    ids = [f"k{i:03d}" for i in range(120)]
    drop_many(stacks, incoming(world), ids)
    assert wait_until(lambda: len(consumer.results) >= 15)
    agent.kill()
    assert wait_until(lambda: consumer.statuses and consumer.statuses[-1][0] == b"offline", 20)  # the will
    agent.start()
    check_invariants(consumer, incoming(world), ids, [], 4 * len(ids), agent)
    print(
        f"killed mid-burst: {consumer.deliveries} deliveries for {len(ids)} stacks (duplicates de-duplicated)"
    )


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return bytes(data)


def absurd_png() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 pixels (a decompression bomb's calling card)."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_inputs_each_give_one_error_and_the_good_ones_one_result(world, stacks, tmp_path):
    agent = start_agent(world)
    consumer = consumer_of(world)
    folder = incoming(world)
    good: list[str] = []
    bad: list[str] = []
    dropped = 0

    def bad_stack(name: str, channel: str, content: bytes) -> None:
        nonlocal dropped
        files = {c: p for c, p in stacks[len(bad)].items() if c != channel}
        drop(files, folder, name)
        (folder / f"{name}_{channel}.png").write_bytes(content)
        bad.append(name)
        dropped += 4

    red = stacks[0]["red"].read_bytes()
    pixels = cv2.imread(str(stacks[0]["red"]), cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    shape = pixels.shape  # the good channels' shape: the bad ones below differ only as they mean to
    corrupt = bytearray(red)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 200] = b"\x00" * 200
    bad_stack("corrupt", "red", bytes(corrupt))
    bad_stack("truncated", "green", red[:3000])
    bad_stack("zerobyte", "blue", b"")
    bad_stack("notimage", "yellow", b"this is a lab notebook, not an image\n")
    bad_stack("shapes", "red", png_bytes(np.zeros((256, 256), np.uint8)))
    bad_stack("bitdepth", "green", png_bytes(np.zeros(shape, np.uint16)))
    bad_stack("colour", "blue", png_bytes(np.random.default_rng(0).integers(0, 255, (*shape, 3), np.uint8)))
    bad_stack("absurd", "yellow", absurd_png())
    # only three of four channels: quarantined after watch.incomplete_timeout
    drop({c: p for c, p in stacks[20].items() if c != "yellow"}, folder, "three")
    bad.append("three")
    dropped += 3
    # a channel that is a symlink to a file outside the folder
    outside = tmp_path / "secret_red.png"
    shutil.copyfile(stacks[21]["red"], outside)
    drop({c: p for c, p in stacks[21].items() if c != "red"}, folder, "symlinked")
    (folder / "symlinked_red.png").symlink_to(outside)
    bad.append("symlinked")
    dropped += 4
    # names that cannot be stack ids: a control character, a backslash
    for odd in ("bell\x07_red.png", "back\\slash_green.png"):
        shutil.copyfile(stacks[22]["red"], folder / odd)
        bad.append("unsafe-" + hashlib.sha256(os.fsencode(odd)).hexdigest()[:16])
        dropped += 1

    # and good ones, arriving in awkward ways
    drop(stacks[10], folder, "plain")
    good.append("plain")
    data = stacks[11]["yellow"].read_bytes()
    drop({c: p for c, p in stacks[11].items() if c != "yellow"}, folder, "chunked")
    with open(folder / "chunked_yellow.png", "wb") as handle:  # slow chunked writes, in place
        for start in range(0, len(data), 8192):
            handle.write(data[start : start + 8192])
            handle.flush()
            time.sleep(0.05)
    good.append("chunked")
    dropped += 8
    assert wait_until(lambda: "plain" in consumer.result_ids())
    drop(stacks[10], folder, "plain")  # the same stack twice: no second result, and done/
    # keeps one copy of identical bytes (a file with the same name and different bytes is kept too)

    check_invariants(consumer, folder, good, bad, dropped, agent)
    codes = {doc["stack_id"]: doc["code"] for doc in consumer.errors.values()}
    assert codes["corrupt"] in ("corrupt", "truncated")
    assert codes["truncated"] == "truncated"
    assert codes["zerobyte"] == "empty_file"
    assert codes["notimage"] == "not_an_image"
    assert codes["shapes"] == "shape_mismatch"
    assert codes["bitdepth"] == "dtype_mismatch"
    assert codes["colour"] == "colour_image"
    assert codes["absurd"] == "too_large"
    assert codes["three"] == "incomplete"
    assert codes["symlinked"] == "symlink"
    assert [c for s, c in codes.items() if s.startswith("unsafe-")] == ["unsafe_name", "unsafe_name"]
    assert outside.read_bytes() == stacks[21]["red"].read_bytes()  # the target was never touched
    assert (folder / "failed" / "symlinked_red.png").is_symlink()


def test_a_burst_of_1000_stacks_keeps_memory_bounded(world, stacks):
    agent = start_agent(world)
    ids = [f"m{i:04d}" for i in range(1000)]
    start = time.monotonic()
    drop_many(stacks, incoming(world), ids)
    check_invariants(consumer_of(world), incoming(world), ids, [], 4000, agent, timeout=240)
    peak = agent.peak_rss_mb()
    print(
        f"burst of 1000 through the agent process: {time.monotonic() - start:.1f} s, peak RSS {peak:.0f} MB"
    )


def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "small", "4m")


def fill(folder: Path) -> Path:
    """Fill a file system to the last byte; removing the returned file gives the space back."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError:
                continue
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_under_the_database_loses_nothing(world, stacks, small_disk):
    agent = start_agent(world, state={"database": str(small_disk / "state.db")})
    consumer = consumer_of(world)
    drop_many(stacks, incoming(world), ["f0"])
    assert wait_until(lambda: "f0" in consumer.result_ids())
    filler = fill(small_disk)
    ids = [f"f{i}" for i in range(1, 6)]
    drop_many(stacks, incoming(world), ids)
    assert wait_until(lambda: agent.lines("state_write_failed"), 30), agent.tail()
    assert all((incoming(world) / f"{s}_red.png").exists() for s in ids)  # left where they were
    filler.unlink()  # space returns
    check_invariants(consumer, incoming(world), ["f0", *ids], [], 24, agent)


def test_a_full_disk_for_the_file_moves_loses_nothing(world, stacks, small_disk):
    agent = start_agent(world, files={"done": str(small_disk / "done")})
    consumer = consumer_of(world)
    filler = fill(small_disk)  # the agent made done/ there at start
    ids = [f"e{i}" for i in range(4)]
    drop_many(stacks, incoming(world), ids)
    assert wait_until(lambda: agent.lines("move_failed"), 30), agent.tail()
    assert wait_until(lambda: set(consumer.result_ids()) == set(ids))  # results go out meanwhile
    filler.unlink()
    # done/ is elsewhere here, so count it there
    assert wait_until(lambda: len(list((small_disk / "done").glob("*.png"))) == 16, 60), agent.tail()
    assert not list(incoming(world).glob("e*_*.png"))
    assert sum(len(v) for v in consumer.result_ids().values()) == 4
    assert agent.alive()


def test_a_bundle_with_a_missing_file_is_refused_at_start(world, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).resolve().parent.parent / "models" / "demo", bundle)
    (bundle / "golden.npz").unlink()
    config = write_config(tmp_path, 1, {"bundle": {"path": str(bundle)}})
    agent = AgentProcess(config, tmp_path / "refused.log").start(wait=False)
    assert agent.process is not None
    assert agent.process.wait(60) == 1
    (line,) = agent.lines("start_failed")
    assert "golden file is missing" in line
