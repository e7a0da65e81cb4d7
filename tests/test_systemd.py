"""The systemd unit (verify, security exposure, what it promises) and the install script, for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "hpa-edge.service"
INSTALL = REPO / "systemd" / "install.sh"
EXEC = "/opt/hpa-edge/venv/bin/hpa-edge"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not installed (sudo apt-get install -y systemd)")
    return found


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit_text: str, executable: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify, with ExecStart pointing at an executable that exists here."""
    copy = tmp_path / "hpa-edge.service"
    copy.write_text(unit_text.replace(EXEC, executable))
    return subprocess.run([analyze(), "verify", str(copy)], capture_output=True, text=True, cwd=tmp_path)


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    done = verify(UNIT.read_text(), shutil.which("true") or "/bin/true", tmp_path)
    assert done.returncode == 0
    assert done.stderr == ""


def test_verify_would_catch_an_unknown_key(tmp_path: Path) -> None:
    done = verify(
        UNIT.read_text().replace("[Service]\n", "[Service]\nRestartt=always\n"), "/bin/true", tmp_path
    )
    assert "Unknown key" in done.stderr  # so the empty stderr above means something


def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "security", "--offline=true", str(UNIT)], capture_output=True, text=True, cwd=tmp_path
    )
    match = re.search(r"Overall exposure level for hpa-edge\.service: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0  # 1.3 with the system call filter and W^X memory


def test_the_unit_is_a_watched_notify_service_of_its_own_user() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"]
    assert int(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"]
    assert unit["StartLimitBurst"]
    assert unit["StartLimitIntervalSec"]
    assert unit["User"] == ["hpa-edge"]
    assert unit["StateDirectory"] == ["hpa-edge"]
    assert unit["EnvironmentFile"] == ["-/etc/hpa-edge/agent.env"]
    assert unit["ExecStart"] == [f"{EXEC} run --config /etc/hpa-edge/agent.toml"]


def test_the_unit_is_hardened_as_far_as_the_container_tier_showed_the_agent_runs() -> None:
    unit = settings(UNIT.read_text())
    for key, value in {
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/hpa-edge",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0027",
    }.items():
        assert unit.get(key) == [value], key
    assert "MemoryMax" in unit
    assert "CPUQuota" in unit
    # shown to work with LiteRT, ONNX Runtime and OpenCV (tests/test_systemd_container.py)
    assert unit["SystemCallFilter"] == ["@system-service"]
    assert unit["MemoryDenyWriteExecute"] == ["true"]
    # ProcSubset=pid hides /proc/cpuinfo: no XNNPACK, ~70 times slower, other embeddings
    assert "ProcSubset" not in unit


def test_the_sysusers_file_makes_a_system_user_without_login() -> None:
    line = next(
        ln for ln in (REPO / "systemd" / "hpa-edge.sysusers").read_text().splitlines() if ln.startswith("u ")
    )
    assert line.split()[1] == "hpa-edge"
    assert line.endswith("/usr/sbin/nologin")


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, check=False)


def test_install_refuses_a_relative_folder(tmp_path: Path) -> None:
    done = run_install("--root", str(tmp_path), "--folder", "data")
    assert done.returncode == 2
    assert "--folder must be an absolute path" in done.stderr


@pytest.mark.slow
def test_install_and_uninstall_into_a_temporary_root(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None:
        pytest.skip("systemd tools not installed")
    root = tmp_path / "root"
    done = run_install("--root", str(root), "--folder", "/data/acquisition")
    assert done.returncode == 0, done.stdout + done.stderr

    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^hpa-edge:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.M)
    uid = int(next(ln for ln in passwd.splitlines() if ln.startswith("hpa-edge:")).split(":")[2])
    assert (root / "data" / "acquisition").stat().st_uid == uid
    assert (root / "var" / "lib" / "hpa-edge").stat().st_uid == uid
    units = root / "etc" / "systemd" / "system"
    assert (units / "multi-user.target.wants" / "hpa-edge.service").is_symlink()
    assert "ReadWritePaths=/data/acquisition" in (units / "hpa-edge.service.d" / "folder.conf").read_text()
    env = (root / "etc" / "hpa-edge" / "agent.env").read_text()
    assert "HPA_EDGE_WATCH_FOLDER=/data/acquisition" in env
    assert (root / "etc" / "hpa-edge" / "agent.toml").read_text() == (
        REPO / "agent" / "service" / "agent.example.toml"
    ).read_text()
    documentation = re.search(
        r"^Documentation=(.*)$", (REPO / "systemd" / "hpa-edge.service").read_text(), re.M
    )
    assert documentation is not None
    for uri in documentation.group(1).split():  # what `systemctl help hpa-edge` opens is installed
        assert (root / uri.removeprefix("file:///")).is_file(), uri

    # the device environment: the agent extra and nothing of the workstation
    python = root / "opt" / "hpa-edge" / "venv" / "bin" / "python"
    probe = (
        "import importlib.util as u;"
        "print([m for m in ('tensorflow', 'sklearn', 'torch', 'keras') if u.find_spec(m)])"
    )
    assert (
        subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "[]"
    )
    hpa_edge = root / "opt" / "hpa-edge" / "venv" / "bin" / "hpa-edge"
    checked = subprocess.run(
        [str(hpa_edge), "verify", str(root / "opt" / "hpa-edge" / "models" / "demo")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = subprocess.run(
        [str(hpa_edge), "run", "--config", str(root / "etc" / "hpa-edge" / "agent.toml"), "--check-config"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert config.returncode == 0, config.stderr
    installed = verify((units / "hpa-edge.service").read_text(), str(hpa_edge), tmp_path)
    assert installed.returncode == 0
    assert installed.stderr == ""

    # a second install keeps the operator's configuration
    (root / "etc" / "hpa-edge" / "agent.toml").write_text("instrument = 'mine'\n")
    assert run_install("--root", str(root), "--no-enable").returncode == 0
    assert (root / "etc" / "hpa-edge" / "agent.toml").read_text() == "instrument = 'mine'\n"

    done = run_install("--root", str(root), "--uninstall")
    assert done.returncode == 0, done.stderr
    assert not (units / "hpa-edge.service").exists()
    assert not (units / "multi-user.target.wants" / "hpa-edge.service").exists()
    assert not (root / "opt" / "hpa-edge").exists()
    assert (root / "etc" / "hpa-edge" / "agent.toml").exists()  # configuration kept

    done = run_install("--root", str(root), "--uninstall", "--purge")
    assert done.returncode == 0, done.stderr
    assert not (root / "etc" / "hpa-edge").exists()
    assert not (root / "var" / "lib" / "hpa-edge").exists()
    assert "hpa-edge:" not in (root / "etc" / "passwd").read_text()
