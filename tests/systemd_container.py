"""A Debian container booted with a real systemd as PID 1, for the `systemd` test tier.

The root file system is made once by debootstrap (minbase plus systemd, dbus, libnss-systemd,
python3, python3-venv; about 300 MB) from the machine's own apt mirror and cached as a tarball
under ~/.cache/hpa-edge ($HPA_EDGE_CACHE), with the wheels of the agent extra beside it
(`pip download` on the host, through the host's pip configuration). Each session unpacks the
tarball into a tmpfs of its own (0.5 s; 10 s onto a busy disk) and boots it with
`systemd-nspawn` (about 0.5 s):

- `--register=no --keep-unit --console=pipe`: no machined or system bus is needed on the host;
- the checkout appears at /usr/local/src/hpa-edge through an overlay (writes land in a
  temporary upper layer, the checkout is never touched), the wheels read-only at
  /var/cache/hpa-edge-wheels; the network namespace is the host's, so a broker on the host's
  loopback is the container's too;
- PID 1 is a small wrapper that remounts the cgroup v1 memory hierarchy read-write before
  `exec /lib/systemd/systemd`: nspawn mounts it read-only, and without it `MemoryMax=` is
  accepted but never enforced. nspawn is started in child cgroups of the test's own (memory,
  name=systemd, unified), so the container's memory limits nest under the test's and
  clean-up removes exactly what this session made.

Commands run inside with `nsenter -t <PID 1> -a` and a clean environment, as a root shell in
the container would: `systemctl`, `journalctl`, `systemd/install.sh` itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(
    os.environ.get("HPA_EDGE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpa-edge"
)
SUITE = "bookworm"  # Debian 12: python3 is 3.11, systemd 252
PACKAGES = ("systemd", "dbus", "libnss-systemd", "python3", "python3-venv")
RECIPE = 1  # bump when the root's recipe below changes: a new tarball is built
PYTHON_TAG = "311"  # bookworm's python3
SOURCE = "/usr/local/src/hpa-edge"  # the checkout, inside the container
WHEELS = "/var/cache/hpa-edge-wheels"
INIT = "/usr/local/sbin/hpa-edge-test-init"
INIT_SCRIPT = """#!/bin/sh
# hpa-edge tests: nspawn mounts the v1 memory controller read-only; systemd needs it
# writable to apply MemoryMax= (the container's view is its own subtree of the hierarchy).
if [ -d /sys/fs/cgroup/memory ]; then mount -o remount,bind,rw /sys/fs/cgroup/memory || true; fi
exec /lib/systemd/systemd "$@"
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class UnavailableError(Exception):
    """The machine cannot run the tier; the message says exactly why (tests skip with it)."""


def why_not() -> str | None:
    """Why the container tier cannot run here, or None when it can try."""
    if sys.platform != "linux":
        return "systemd containers need Linux"
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn, cgroups and nsenter (run make test as root, as CI does)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (sudo apt-get install -y {package})"
    if not root_tarball_path().exists() and shutil.which("debootstrap") is None:
        return "debootstrap not installed and no cached root (sudo apt-get install -y debootstrap)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system at /sys/fs/cgroup"
    return None


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One builder at a time across sessions (two test runs may start together)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def recipe_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def root_tarball_path() -> Path:
    arch = platform.machine()
    return CACHE / f"systemd-root-debian-{SUITE}-{arch}-{recipe_key(SUITE, PACKAGES, RECIPE)}.tar"


def apt_mirror() -> str:
    """The Debian mirror the machine's apt uses for SUITE (deb822 or one-line sources)."""
    sources = Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text(errors="replace")
        if source.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                    return fields.get("uris", "").split()[0]
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0]
                if "[" in line and "]" in line:  # deb [options] uri suite components
                    line = line[: line.index("[")] + line[line.index("]") + 1 :]
                words = line.split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


def root_tarball() -> Path:
    """The cached root (built by debootstrap the first time, about 75 s and 300 MB)."""
    tarball = root_tarball_path()
    if tarball.exists():
        return tarball
    with locked("systemd-root"):
        if tarball.exists():
            return tarball
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise UnavailableError("debootstrap not installed (sudo apt-get install -y debootstrap)")
        work = CACHE / f"{tarball.stem}.build"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        root = work / "root"
        mirror = apt_mirror()
        try:
            include = "--include=" + ",".join(PACKAGES)
            done = subprocess.run(
                [debootstrap, "--variant=minbase", include, SUITE, str(root), mirror],
                capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-8:])
                raise UnavailableError(
                    f"debootstrap {SUITE} from {mirror} failed (exit {done.returncode}): {tail}"
                )
            # What an installed Debian has and debootstrap leaves out: localhost by name.
            (root / "etc" / "hosts").write_text(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            )
            partial = work / "root.tar"
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def agent_requirements() -> list[str]:
    """What `pip install .[agent]` needs: the core and agent dependencies, the build backend, pip."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["agent"],
        *project["build-system"]["requires"],
        "pip",
    ]


def platforms(arch: str) -> list[str]:
    """pip's --platform for bookworm (glibc 2.36): every manylinux tag it can run, listed (pip
    does not expand manylinux_2_36 to the older tags by itself)."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)] + [f"manylinux2014_{arch}"]
    return [option for tag in tags for option in ("--platform", tag)]


def wheelhouse() -> Path:
    """Wheels of everything the agent extra installs, for the container's Python (cached).

    Downloaded on the host with the host's pip configuration (index, proxy, certificates),
    so the container needs no network of its own for packages; install.sh then runs with
    PIP_NO_INDEX=1 and PIP_FIND_LINKS pointing here, as on a device behind a wheel mirror.
    """
    requirements = agent_requirements()
    constraints = (REPO / "constraints.txt").read_text()
    arch = platform.machine()
    folder = CACHE / f"wheels-cp{PYTHON_TAG}-{arch}-{recipe_key(requirements, constraints)}"
    if (folder / ".complete").exists():
        return folder
    with locked("wheels"):
        if (folder / ".complete").exists():
            return folder
        partial = folder.with_name(folder.name + ".part")
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--dest", str(partial), "--only-binary=:all:", "--implementation", "cp",
             "--python-version", f"{PYTHON_TAG[0]}.{PYTHON_TAG[1:]}", "--abi", f"cp{PYTHON_TAG}",
             *platforms(arch), "-c", str(REPO / "constraints.txt"), *requirements],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pip download of the agent's wheels failed: {done.stdout}{done.stderr}")
        (partial / ".complete").touch()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    return folder


def own_cgroups(name: str) -> list[Path]:
    """Child cgroups of this process's own, one per hierarchy nspawn and systemd use."""
    base = Path("/sys/fs/cgroup")
    mine: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            mine[controller] = path
    found = []
    if (base / "cgroup.controllers").exists():  # the unified hierarchy alone (cgroup v2)
        found.append(base / mine.get("", "/").lstrip("/") / name)
    else:
        for hierarchy, key in (("memory", "memory"), ("systemd", "name=systemd"), ("unified", "")):
            if (base / hierarchy).is_dir() and key in mine:
                found.append(base / hierarchy / mine[key].lstrip("/") / name)
    return found


def remove_cgroup(top: Path) -> None:
    """rmdir a cgroup and everything below it, deepest first (they must be empty of tasks)."""
    if not top.is_dir():
        return
    for _ in range(50):
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        if not top.exists():
            return
        time.sleep(0.1)


class Container:
    """One booted container: `boot()`, `run()`/`systemctl()`/`journal()` inside, `stop()`."""

    def __init__(self, folder: Path, tarball: Path, wheels: Path) -> None:
        self.name = f"hpa-edge-test-{os.getpid()}"
        self.folder = folder
        self.memory = folder / "tmpfs"  # the root lives in RAM: unpacked in 0.5 s, not 10 s on a busy disk
        self.root = self.memory / self.name
        self.tarball = tarball
        self.wheels = wheels
        self.log = folder / "nspawn.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.cgroups: list[Path] = []

    # Life -------------------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> Container:
        self.memory.mkdir(parents=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs", str(self.memory)], check=True
        )
        self.root.mkdir()
        subprocess.run(
            ["tar", "-C", str(self.root), "--numeric-owner", "-xpf", str(self.tarball)], check=True
        )
        init = self.path(INIT)
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        self.cgroups = own_cgroups(self.name)
        for cgroup in self.cgroups:
            cgroup.mkdir(parents=True, exist_ok=True)
        nspawn = [
            "systemd-nspawn", "--quiet", "-D", str(self.root), f"--machine={self.name}",
            "--register=no", "--keep-unit", "--console=pipe", "--kill-signal=SIGRTMIN+3",
            f"--overlay={REPO}::{SOURCE}", f"--bind-ro={self.wheels}:{WHEELS}", INIT,
        ]  # fmt: skip
        # Into the child cgroups first, then exec nspawn (no preexec_fn in a threaded test).
        enter = 'for p in $HPA_EDGE_CGROUPS; do echo $$ > "$p/cgroup.procs" || exit 97; done; exec "$@"'
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["sh", "-c", enter, "sh", *nspawn],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "HPA_EDGE_CGROUPS": " ".join(str(c) for c in self.cgroups)},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UnavailableError(f"systemd-nspawn exited {self.process.returncode}: {self.log_tail()}")
            self.pid1 = self._pid1()
            if self.pid1 and Path(f"/proc/{self.pid1}/root/run/systemd/private").exists():
                break
            time.sleep(0.05)
        else:
            raise UnavailableError(
                f"the container's systemd did not come up in {timeout:.0f} s: {self.log_tail()}"
            )
        state = self.run(
            "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
        ).stdout.strip()
        if state not in ("running", "degraded"):
            raise UnavailableError(f"the container's systemd is {state!r}: {self.log_tail()}")
        return self

    def _pid1(self) -> int:
        assert self.process is not None
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def log_tail(self, lines: int = 12) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Halt the container (SIGTERM: systemd shuts down), kill it if it lingers, clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)
        for leftover in (Path("/run/systemd/nspawn/propagate") / self.name,):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in ("/run/systemd/nspawn/propagate", "/run/systemd/nspawn/locks", "/run/systemd/nspawn"):
            with contextlib.suppress(OSError):
                Path(folder).rmdir()  # only when empty: another session may be using it
        if self.memory.is_mount():
            subprocess.run(["umount", "--lazy", str(self.memory)], check=False)

    # Inside -----------------------------------------------------------------------------
    def path(self, inside: str) -> Path:
        """The host's path of a file in the container's root (not in a unit's private mounts)."""
        return self.root / inside.lstrip("/")

    def run(
        self,
        *command: str,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """A command in every namespace of the container, with a root shell's clean environment."""
        clean = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", **(env or {})}
        argv = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *(f"{k}={v}" for k, v in clean.items())]
        done = subprocess.run([*argv, *command], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, str]]:
        """journalctl -o json entries (MESSAGE, _PID, _SYSTEMD_INVOCATION_ID, ...)."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        entries = []
        for line in out.splitlines():
            entry = json.loads(line)
            if isinstance(entry.get("MESSAGE"), list):  # bytes that are not UTF-8
                entry["MESSAGE"] = bytes(entry["MESSAGE"]).decode(errors="replace")
            entries.append(entry)
        return entries

    def drop_in(self, unit: str, name: str, text: str | None) -> None:
        """Write (or with None remove) /etc/systemd/system/<unit>.d/<name>.conf; daemon-reload."""
        path = self.path(f"/etc/systemd/system/{unit}.d/{name}.conf")
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.systemctl("daemon-reload")


def write_atomically(files: Mapping[str, Path], folder: Path, stack_id: str, channels: Sequence[str]) -> None:
    """Copy a stack's channels into `folder` as acquisition software should: write, then rename."""
    for channel in channels:
        temporary = folder / f".{stack_id}_{channel}.part"
        shutil.copyfile(files[channel], temporary)
        os.chmod(temporary, 0o644)
        temporary.rename(folder / f"{stack_id}_{channel}.png")
