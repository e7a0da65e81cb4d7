"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl on a free port in a temp folder.

Debian's `postgresql` package puts the server binaries in /usr/lib/postgresql/<major>/bin (not
on PATH); `.ci/run` installs the package when it is missing. The cluster trusts local
connections, listens on 127.0.0.1 only, and is removed when stopped. initdb refuses to run as
root, so as root the cluster is made and run as the `postgres` user the package creates.
Tests skip, saying why, when no server binaries are found.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.tools.demo import free_port


def server_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and pg_ctl, or $PG_BIN."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Cluster:
    """One PostgreSQL server in its own folder; `url(db)` is a psycopg/libpq connection URL."""

    def __init__(self, fsync: bool = False) -> None:
        found = server_bin()
        if found is None or not (found / "pg_ctl").exists():
            pytest.skip("PostgreSQL server binaries not found (sudo apt-get install -y postgresql)")
        self.bin: Path = found
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run initdb as")
            self.user = "postgres"
        self.folder = Path(tempfile.mkdtemp(prefix="hpa-edge-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.fsync = fsync
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), user=self.user, capture_output=True, text=True, timeout=120, cwd=self.folder
        )

    def start(self) -> Cluster:
        made = self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions", "--no-sync",
        )  # fmt: skip
        if made.returncode != 0:
            self.remove()
            pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder} "
            + ("" if self.fsync else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        )
        started = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        if started.returncode != 0:
            log = (self.folder / "server.log").read_text() if (self.folder / "server.log").exists() else ""
            self.remove()
            pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-300:]} {log[-300:]}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connect(self, database: str) -> Any:
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True)

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def cluster(fsync: bool = False) -> Iterator[Cluster]:
    started = time.monotonic()
    server = Cluster(fsync=fsync).start()
    server.startup_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
