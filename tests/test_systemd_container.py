"""The service under a real systemd: installed with systemd/install.sh into a booted Debian container.

One container per module (tests/systemd_container.py: a cached debootstrap root, systemd 252
as PID 1, the checkout overlaid at /usr/local/src/hpa-edge), one install as an operator does
it (`install.sh`, then the broker and instrument in /etc/hpa-edge/agent.env), one mosquitto on
the host's loopback, which the container shares. Each test leaves the unit as installed (its
drop-ins removed, the service running). Skipped with the reason where the machine cannot boot
a container (not root, no systemd-nspawn, ...).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.service.log import format_event, parse_line
from agent.stacks.labels import CHANNELS
from tests.agent_harness import stack_files
from tests.broker import Broker, Subscriber
from tests.systemd_container import (
    SOURCE,
    WHEELS,
    Container,
    UnavailableError,
    root_tarball,
    wheelhouse,
    why_not,
    write_atomically,
)

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

UNIT = "hpa-edge.service"
INSTRUMENT = "scope-ct"
FOLDER = "/var/lib/hpa-edge/incoming"  # install.sh's default acquisition folder
FLUSH_SECONDS = 5.0  # mqtt.flush_seconds, the default the installed agent.toml keeps
TEST_DROP_INS = ("test-watchdog", "test-hang", "test-memory")
# What libraries print on stderr themselves, not the agent's events: LiteRT's C++ runtime at
# start, and python-watchdog 7 at stop (its logger.error, through Python's last-resort handler:
# the inotify thread is told to stop while it reads an event; harmless, seen at most stops).
LIBRARY_LINES = (
    re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."),
    re.compile(r"InotifyEmitter\.queue_events\(\) called when the thread is inactive"),
)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    try:
        booted = Container(tmp_path_factory.mktemp("systemd"), root_tarball(), wheelhouse())
    except UnavailableError as exc:
        pytest.skip(str(exc))
    try:
        booted.boot()
    except UnavailableError as exc:
        booted.stop()
        pytest.skip(str(exc))
    yield booted
    booted.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = Broker(tmp_path_factory.mktemp("broker")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def listener(module_broker: Broker) -> Iterator[Subscriber]:
    listening = Subscriber(module_broker.port)
    yield listening
    listening.close()


def install(container: Container, broker_port: int) -> None:
    """`install.sh` as an operator runs it (packages from the wheel cache), then agent.env."""
    done = container.run(
        "bash", f"{SOURCE}/systemd/install.sh",
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS}, check=False, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "install.sh: started: journalctl -u hpa-edge -f" in done.stdout  # enable --now under systemd
    env = container.path("/etc/hpa-edge/agent.env")
    operator = (
        f"HPA_EDGE_INSTRUMENT={INSTRUMENT}\nHPA_EDGE_MQTT_HOST=127.0.0.1\nHPA_EDGE_MQTT_PORT={broker_port}\n"
    )
    env.write_text(env.read_text() + operator)
    container.systemctl("restart", UNIT)


@pytest.fixture
def agent(container: Container, module_broker: Broker) -> Iterator[Container]:
    """The installed, running service (installed again if a test removed it)."""
    if not container.path(f"/etc/systemd/system/{UNIT}").exists():
        install(container, module_broker.port)
    yield container
    if container.path(f"/etc/systemd/system/{UNIT}").exists():
        for name in TEST_DROP_INS:
            container.path(f"/etc/systemd/system/{UNIT}.d/{name}.conf").unlink(missing_ok=True)
        container.systemctl("daemon-reload")
        container.systemctl("reset-failed", UNIT, check=False)
        container.systemctl("restart", UNIT)


def wait_until(condition: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


def payloads(listener: Subscriber, kind: str, stack_id: str) -> list[dict[str, Any]]:
    found = [
        json.loads(m.payload) for m in listener.on(kind) if m.topic.startswith(f"hpa-edge/{INSTRUMENT}/")
    ]
    return [p for p in found if p.get("stack_id") == stack_id]


def drop_stack(container: Container, files: dict[str, Path], stack_id: str) -> None:
    write_atomically(files, container.path(FOLDER), stack_id, CHANNELS)


def agent_lines(container: Container, invocation: str) -> list[str]:
    """What the agent's process wrote during one run of the unit (systemd's own lines excluded)."""
    return [e["MESSAGE"] for e in container.journal(f"_SYSTEMD_INVOCATION_ID={invocation}")]


def unit_lines(container: Container, since_usec: int) -> list[str]:
    """systemd's own lines about the unit since a monotonic time (its restarts, kills)."""
    entries = container.journal("-u", UNIT, "_PID=1")
    return [e["MESSAGE"] for e in entries if int(e["__MONOTONIC_TIMESTAMP"]) >= since_usec]


def test_start_returns_after_ready_status_shows_the_agent_and_a_dropped_stack_gets_its_result(
    agent: Container, listener: Subscriber, stack_source: Path
) -> None:
    agent.systemctl("stop", UNIT)
    assert agent.show(UNIT, "StatusText")["StatusText"] == "stopping"  # the agent's STOPPING=1 said so
    started = time.monotonic()
    agent.systemctl("start", UNIT)
    seconds = time.monotonic() - started
    unit = agent.show(
        UNIT, "Type", "ActiveState", "SubState", "StatusText", "InvocationID",
        "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
    )  # fmt: skip
    assert unit["Type"] == "notify"
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running")
    # The status text travels in the same datagram as READY=1: it is there as start returns.
    assert re.fullmatch(
        r"processed \d+, failed \d+, quarantined \d+, waiting \d+; MQTT .*", unit["StatusText"]
    )
    waited = (int(unit["ActiveEnterTimestampMonotonic"]) - int(unit["ExecMainStartTimestampMonotonic"])) / 1e6
    assert waited > 0.3, waited  # the agent's start-up (bundle checked, database, watcher), not an exec
    assert seconds >= waited
    lines = agent_lines(agent, unit["InvocationID"])
    assert sum("event=agent_ready" in line for line in lines) == 1, lines
    print(f"systemctl start: {seconds:.2f} s, exec to READY=1 {waited:.2f} s")

    status = agent.systemctl("status", UNIT).stdout
    assert re.search(r'Status: "processed \d+, failed \d+, quarantined \d+, waiting \d+; MQTT', status), (
        status
    )
    assert "Active: active (running)" in status

    drop_stack(agent, stack_files(stack_source, 0), "ct-start")
    assert wait_until(lambda: payloads(listener, "results", "ct-start"), 30), agent_lines(
        agent, unit["InvocationID"]
    )
    (result,) = payloads(listener, "results", "ct-start")
    assert result["instrument"] == INSTRUMENT
    assert result["purpose"] == "demo"
    done = agent.path(f"{FOLDER}/done")
    assert wait_until(lambda: len(list(done.glob("ct-start_*.png"))) == 4, 10)


def test_the_hardening_the_unit_claims_is_in_force(agent: Container) -> None:
    unit = agent.show(UNIT, "MainPID", "User", "InvocationID")
    pid = unit["MainPID"]
    assert unit["User"] == "hpa-edge"
    passwd = agent.path("/etc/passwd").read_text()
    uid, gid = re.search(r"^hpa-edge:x:(\d+):(\d+):", passwd, re.M).groups()  # type: ignore[union-attr]
    status = dict(
        (key, value.split()) for key, _, value in
        (line.partition(":") for line in agent.run("cat", f"/proc/{pid}/status").stdout.splitlines())
    )  # fmt: skip
    assert status["Uid"] == [uid] * 4  # real, effective, saved, file system
    assert status["Gid"] == [gid] * 4
    assert status["NoNewPrivs"] == ["1"]
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[capabilities] == ["0000000000000000"], capabilities
    assert status["Seccomp"] == ["2"]  # SystemCallFilter, MemoryDenyWriteExecute, ... as BPF filters
    assert int(status["Seccomp_filters"][0]) >= 1

    # The file system as the agent sees it (its own mount namespace): read-only but its state.
    for path in ("/usr/lib/hpa-edge-probe", "/etc/hpa-edge/probe", "/opt/hpa-edge/probe", "/root/probe"):
        refused = agent.run("nsenter", "-t", pid, "-m", "touch", path, check=False)
        assert refused.returncode != 0, path
        assert "Read-only file system" in refused.stderr or "No such file" in refused.stderr, refused.stderr
    agent.run("nsenter", "-t", pid, "-m", "touch", "/var/lib/hpa-edge/.probe")
    agent.run("nsenter", "-t", pid, "-m", "rm", "/var/lib/hpa-edge/.probe")

    # The libraries run as they do outside the unit: XNNPACK present, golden vectors exact.
    lines = agent_lines(agent, unit["InvocationID"])
    ready = parse_line(next(line for line in lines if "event=agent_ready" in line))
    assert float(ready["golden_cosine"]) == 1.0, ready
    assert not [line for line in lines if "cpuinfo" in line], lines

    # What MemoryDenyWriteExecute and SystemCallFilter do, under the unit's own settings.
    settings = hardening(agent)
    assert "MemoryDenyWriteExecute=true" in settings
    assert "SystemCallFilter=@system-service" in settings
    probe = agent.run(
        "systemd-run", "--wait", "--pipe", *(f"--property={s}" for s in settings),
        "/opt/hpa-edge/venv/bin/python", "-c", PROBE, check=False,
    )  # fmt: skip
    assert "wx_mapping=refused:EPERM" in probe.stdout, probe.stdout + probe.stderr
    assert "chroot=" not in probe.stdout  # killed in the call, before it could print
    assert "code=killed/status=SYS" in probe.stderr, probe.stderr  # SIGSYS from the filter
    control = agent.run(
        "systemd-run", "--wait", "--pipe", "--property=User=hpa-edge",
        "/opt/hpa-edge/venv/bin/python", "-c", PROBE, check=False,
    )  # fmt: skip
    assert "wx_mapping=allowed" in control.stdout, control.stdout
    assert "chroot=refused:EPERM" in control.stdout, control.stdout  # no filter: only no capability


PROBE = """
import errno, mmap, os
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
    print("wx_mapping=allowed", flush=True)
except OSError as exc:
    print(f"wx_mapping=refused:{errno.errorcode[exc.errno]}", flush=True)
try:
    os.chroot("/")  # outside @system-service (it is @mount): the filter kills the process
    print("chroot=allowed", flush=True)
except OSError as exc:
    print(f"chroot=refused:{errno.errorcode[exc.errno]}", flush=True)
"""

# Keys of the unit's [Service] that are about the process's lifecycle, not its confinement.
LIFECYCLE = {
    "Type", "NotifyAccess", "ExecStart", "EnvironmentFile", "Restart", "RestartSec", "WatchdogSec",
    "TimeoutStartSec", "TimeoutStopSec", "KillMode", "MemoryHigh", "MemoryMax", "CPUQuota", "TasksMax",
}  # fmt: skip


def hardening(container: Container) -> list[str]:
    """The installed unit's confinement settings, KEY=value, as systemd-run --property takes them."""
    found = []
    section = ""
    for raw in container.path(f"/etc/systemd/system/{UNIT}").read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if key not in LIFECYCLE:
                found.append(f"{key}={value}")
    return found


def test_a_hung_agent_is_killed_by_the_watchdog_restarted_and_its_stack_answered_once(
    agent: Container, listener: Subscriber, stack_source: Path
) -> None:
    agent.drop_in(UNIT, "test-watchdog", "[Service]\nWatchdogSec=3\n")
    agent.drop_in(UNIT, "test-hang", "[Service]\nEnvironment=HPA_EDGE_CRASH_AT=hang_after_decode\n")
    agent.systemctl("restart", UNIT)
    since = journal_now(agent)
    before = agent.show(UNIT, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "3s"
    # The next start runs without the hang; the running agent keeps the environment it has.
    agent.drop_in(UNIT, "test-hang", None)

    drop_stack(agent, stack_files(stack_source, 1), "ct-hang")
    restarted = wait_until(
        lambda: (
            (u := agent.show(UNIT, "NRestarts", "MainPID", "ActiveState"))["NRestarts"]
            == str(int(before["NRestarts"]) + 1)
            and u["ActiveState"] == "active"
            and u["MainPID"] not in ("0", before["MainPID"])
        ),
        40,
    )
    lines = unit_lines(agent, since)
    assert restarted, lines
    assert any("Watchdog timeout" in line for line in lines), lines
    assert any("status=6/ABRT" in line for line in lines), lines  # WatchdogSignal=SIGABRT
    assert any("Failed with result 'watchdog'" in line for line in lines), lines

    assert wait_until(lambda: payloads(listener, "results", "ct-hang"), 30), lines
    time.sleep(2)  # room for a second answer, which must not come
    assert len(payloads(listener, "results", "ct-hang")) == 1
    assert payloads(listener, "errors", "ct-hang") == []
    done = agent.path(f"{FOLDER}/done")
    assert wait_until(lambda: len(list(done.glob("ct-hang_*.png"))) == 4, 10)
    # The status systemd shows follows the agent: each WATCHDOG=1 (every 0.75 s here) carries it.
    assert wait_until(lambda: "processed 1," in agent.show(UNIT, "StatusText")["StatusText"], 5)


def journal_now(container: Container) -> int:
    """The journal's monotonic clock now: the timestamp of a line written for the purpose."""
    marker = f"hpa-edge-test-mark-{time.monotonic_ns()}"
    container.run("systemd-cat", "-t", "hpa-edge-test", "echo", marker)
    entries = wait_until(lambda: container.journal("-t", "hpa-edge-test", f"MESSAGE={marker}"), 10, 0.05)
    return int(entries[0]["__MONOTONIC_TIMESTAMP"])


def big_stack(folder: Path, side: int = 6000) -> dict[str, Path]:
    """Four 16-bit side x side channels (72 MB each decoded) that compress to ~14 MB as PNG."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(side, dtype=np.uint32)
    files = {}
    for i, channel in enumerate(CHANNELS):
        pixels = (np.add.outer(ramp, ramp * (i + 1)) % 65536).astype(np.uint16)
        files[channel] = folder / f"big_{channel}.png"
        assert cv2.imwrite(str(files[channel]), pixels)
    return files


MEMORY_MAX = "160M"  # the idle agent with the demo bundle holds ~115 MB; the big stack needs ~230 MB


def test_a_stack_too_big_for_memory_max_is_set_aside_after_two_deaths_without_a_restart_loop(
    agent: Container, listener: Subscriber, stack_source: Path, tmp_path: Path
) -> None:
    agent.drop_in(UNIT, "test-memory", f"[Service]\nMemoryMax={MEMORY_MAX}\n")
    agent.systemctl("restart", UNIT)
    limit = memory_limit(agent)
    if limit is None or limit > 200 * 2**20:
        pytest.skip(f"MemoryMax={MEMORY_MAX} is not enforced in this container (the unit's limit: {limit})")
    since = journal_now(agent)
    before = int(agent.show(UNIT, "NRestarts")["NRestarts"])

    drop_stack(agent, big_stack(tmp_path / "big"), "ct-big")
    error_file = agent.path(f"{FOLDER}/failed/ct-big.error.json")
    assert wait_until(error_file.exists, 120), unit_lines(agent, since)
    lines = unit_lines(agent, since)
    assert sum("status=9/KILL" in line for line in lines) == 2, lines  # the OOM killer, twice
    assert int(agent.show(UNIT, "NRestarts")["NRestarts"]) == before + 2
    assert json.loads(error_file.read_text())["code"] == "crashed"
    assert wait_until(lambda: payloads(listener, "errors", "ct-big"), 20)
    (error,) = payloads(listener, "errors", "ct-big")
    assert error["code"] == "crashed"
    failed = agent.path(f"{FOLDER}/failed")
    assert len(list(failed.glob("ct-big_*.png"))) == 4

    # Not a restart loop: the agent stays up and takes the next stack.
    drop_stack(agent, stack_files(stack_source, 2), "ct-after-big")
    assert wait_until(lambda: payloads(listener, "results", "ct-after-big"), 30)
    unit = agent.show(UNIT, "NRestarts", "ActiveState")
    assert (unit["ActiveState"], int(unit["NRestarts"])) == ("active", before + 2)

    # The unit's own limits fit the same stack (36 Mpx a channel, near stack.max_pixels).
    agent.drop_in(UNIT, "test-memory", None)
    agent.systemctl("restart", UNIT)
    drop_stack(agent, big_stack(tmp_path / "big"), "ct-big-default")
    assert wait_until(lambda: payloads(listener, "results", "ct-big-default"), 60)
    assert agent.show(UNIT, "NRestarts")["NRestarts"] == "0"
    print(f"peak memory with a 4 x 6000 x 6000 16-bit stack: {memory_peak(agent)} bytes")


def memory_peak(container: Container) -> int | None:
    """The most memory the unit's cgroup has held since it started (v1 or v2 >= 5.19)."""
    group = container.show(UNIT, "ControlGroup")["ControlGroup"].lstrip("/")
    for path in (
        f"/sys/fs/cgroup/memory/{group}/memory.max_usage_in_bytes",
        f"/sys/fs/cgroup/{group}/memory.peak",
    ):
        done = container.run("cat", path, check=False)
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout)
    return None


def memory_limit(container: Container) -> int | None:
    """The kernel's memory limit on the unit's cgroup (v1 or v2), as the container sees it."""
    group = container.show(UNIT, "ControlGroup")["ControlGroup"].lstrip("/")
    for path in (
        f"/sys/fs/cgroup/memory/{group}/memory.limit_in_bytes",
        f"/sys/fs/cgroup/{group}/memory.max",
    ):
        done = container.run("cat", path, check=False)
        if done.returncode == 0 and done.stdout.strip().isdigit():
            return int(done.stdout)
    return None


def test_stop_publishes_offline_and_exits_0_within_the_flush_time_with_one_journal_line_per_event(
    agent: Container, listener: Subscriber, stack_source: Path
) -> None:
    agent.systemctl("restart", UNIT)
    unit = agent.show(UNIT, "InvocationID", "MainPID")
    ids = ["ct-stop-1", "ct-stop-2"]
    for index, stack_id in enumerate(ids):
        drop_stack(agent, stack_files(stack_source, 3 + index), stack_id)
    assert wait_until(lambda: all(payloads(listener, "results", s) for s in ids), 30)
    statuses = len(listener.on("status"))

    started = time.monotonic()
    agent.systemctl("stop", UNIT)
    seconds = time.monotonic() - started
    print(f"systemctl stop: {seconds:.2f} s")
    assert seconds <= FLUSH_SECONDS
    after = agent.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert after == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }
    assert wait_until(lambda: [m.payload for m in listener.on("status")[statuses:]] == [b"offline"], 5)

    lines = agent_lines(agent, unit["InvocationID"])
    events = []
    for line in lines:
        if any(pattern.fullmatch(line) for pattern in LIBRARY_LINES):
            continue
        fields = parse_line(line)
        level, event = fields.pop("level", ""), fields.pop("event", "")
        assert level in ("debug", "info", "warning", "error"), line
        assert event, line
        assert format_event(level, event, fields) == line  # the whole line is its key=value pairs
        events.append((event, fields.get("stack")))
    for once in ("agent_ready", "mqtt_connected", "stop_requested", "agent_stopped"):
        assert [e for e, _ in events].count(once) == 1, (once, lines)
    for stack_id in ids:
        assert events.count(("stack_done", stack_id)) == 1, lines


def test_uninstall_stops_and_removes_the_service(agent: Container) -> None:
    invocation = agent.show(UNIT, "InvocationID")["InvocationID"]
    done = agent.run("bash", f"{SOURCE}/systemd/install.sh", "--uninstall")
    assert "removed the service and /opt/hpa-edge" in done.stdout
    assert any("event=agent_stopped" in line for line in agent_lines(agent, invocation))
    assert agent.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert agent.systemctl("status", UNIT, check=False).returncode == 4  # no such unit
    for gone in (
        f"/etc/systemd/system/{UNIT}",
        f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
        "/opt/hpa-edge",
    ):
        assert not agent.path(gone).exists(), gone
    for kept in ("/etc/hpa-edge/agent.toml", "/var/lib/hpa-edge/state.db", "/etc/passwd"):
        assert agent.path(kept).exists(), kept
    assert "hpa-edge:" in agent.path("/etc/passwd").read_text()

    agent.run("bash", f"{SOURCE}/systemd/install.sh", "--uninstall", "--purge")
    for gone in ("/etc/hpa-edge", "/var/lib/hpa-edge"):
        assert not agent.path(gone).exists(), gone
    assert "hpa-edge:" not in agent.path("/etc/passwd").read_text()
