"""SQLite or PostgreSQL behind one small interface: a URL, transactions, `?` placeholders.

`--db sqlite:///PATH` (the default, `sqlite:///hpa-edge-results.db`, a file in the current
folder; four slashes for an absolute path, as in SQLAlchemy) or `--db postgresql://...` (any
libpq URL, through psycopg 3). SQL is written once with `?` placeholders; the PostgreSQL side
turns them into `%s`. Table definitions name their column types by role (`{time}`, `{json}`,
`{bool}`, `{real}`, `{blob}`) and each dialect fills them in: TEXT holding ISO 8601 UTC times,
JSON as TEXT and 0/1 in SQLite; TIMESTAMPTZ, JSONB and BOOLEAN in PostgreSQL, so Grafana's
PostgreSQL data source sees real times.

SQLite runs in WAL mode with `synchronous=FULL`: a commit is on disk before the collector
acknowledges the messages it holds. Several collectors may share one SQLite file on one host
(writers wait for each other up to `busy_timeout`); across hosts, use PostgreSQL.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

DEFAULT_URL = "sqlite:///hpa-edge-results.db"
Params = Sequence[Any] | Mapping[str, Any]
TYPES = {
    "sqlite": {"time": "TEXT", "json": "TEXT", "bool": "INTEGER", "real": "REAL", "blob": "BLOB"},
    "postgresql": {
        "time": "TIMESTAMPTZ",
        "json": "JSONB",
        "bool": "BOOLEAN",
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
    },
}


class DatabaseError(Exception):
    """The database cannot be opened or used; the message is fit for a user."""


class Transaction(Protocol):
    def execute(self, sql: str, params: Params = ()) -> int: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int: ...
    def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...


class Database(Protocol):
    dialect: str
    url: str

    def transaction(self, exclusive: bool = False) -> contextlib.AbstractContextManager[Transaction]: ...
    def rows(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple[Any, ...]]]: ...
    def is_transient(self, error: BaseException) -> bool: ...
    def close(self) -> None: ...


def ddl(dialect: str, sql: str) -> str:
    """A table definition with its `{time}`, `{json}`... roles filled in for `dialect`."""
    return sql.format(**TYPES[dialect])


def sqlite_path(url: str) -> Path | None:
    """`sqlite:///relative.db` or `sqlite:////absolute.db` to a path; None for other URLs."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    return None


def open_database(url: str) -> Database:
    """A connection to `url`; DatabaseError with the reason when it cannot be opened."""
    path = sqlite_path(url)
    if path is not None:
        return SqliteDatabase(url, path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise DatabaseError(f"--db {url!r}: expected sqlite:///PATH or postgresql://...")


def time_text(value: Any) -> Any:
    """A time from either database as ISO 8601 UTC text with milliseconds and Z; anything else unchanged."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


class _SqliteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Params = ()) -> int:
        return self.connection.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self.connection.executemany(sql, rows).rowcount if rows else 0

    def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()


OPEN_RETRY_SECONDS = 30.0  # how long a collector waits for another to finish setting up the file


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, url: str, path: Path, busy_seconds: float = 5.0) -> None:
        self.url = url
        self.path = path
        if path.parent != Path() and not path.parent.is_dir():
            raise DatabaseError(f"--db {url}: folder {path.parent} does not exist")
        # Two collectors started together on a new file race to set WAL mode, which needs the
        # file to themselves; the busy timeout does not always cover that, so the loser retries.
        deadline = time.monotonic() + OPEN_RETRY_SECONDS
        while True:
            try:
                self.connection = sqlite3.connect(
                    path, isolation_level=None, timeout=busy_seconds, check_same_thread=False
                )
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.connection.execute("PRAGMA synchronous=FULL")
                self.connection.execute("PRAGMA foreign_keys=ON")
                break
            except sqlite3.OperationalError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                if not locked or time.monotonic() >= deadline:
                    raise DatabaseError(f"--db {url}: {exc}") from None
                time.sleep(0.1)
            except sqlite3.Error as exc:
                raise DatabaseError(f"--db {url}: {exc}") from None

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[Transaction]:
        # IMMEDIATE takes the write lock at once: two collectors never deadlock upgrading a read.
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTransaction(self.connection)
        except BaseException:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def rows(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        cursor = self.connection.execute(sql, params)
        names = [d[0] for d in cursor.description or ()]
        return names, cursor.fetchall()

    def is_transient(self, error: BaseException) -> bool:
        """Locked, busy, disk full or I/O: try the batch again later. Anything else is the data's fault."""
        return isinstance(error, sqlite3.OperationalError)

    def close(self) -> None:
        self.connection.close()


class _PostgresTransaction:
    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Params = ()) -> int:
        self.cursor.execute(_pg(sql), params)
        return int(self.cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        self.cursor.executemany(_pg(sql), rows)
        return int(self.cursor.rowcount)

    def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        self.cursor.execute(_pg(sql), params)
        return list(self.cursor.fetchall())


def _pg(sql: str) -> str:
    """`?` and `:name` placeholders (sqlite3's) to psycopg's `%s` and `%(name)s`."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%").replace("?", "%s"))


_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            import psycopg
        except ImportError:
            raise DatabaseError(
                "a postgresql:// database needs psycopg 3 (pip install 'hpa-edge[collector]')"
            ) from None
        self._psycopg = psycopg
        self.connection: Any = None
        self._connect()

    def _connect(self) -> None:
        try:
            self.connection = self._psycopg.connect(
                self.url, connect_timeout=10, options="-c TimeZone=UTC", autocommit=True
            )
        except self._psycopg.Error as exc:
            raise DatabaseError(f"--db {_safe(self.url)}: {str(exc).strip()}") from None

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[Transaction]:
        if self.connection is None or self.connection.closed:
            self._connect()
        with self.connection.transaction(), self.connection.cursor() as cursor:
            if exclusive:  # one migrating collector at a time, whatever the host
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (0x48504145,))
            yield _PostgresTransaction(cursor)

    def rows(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        with self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(_pg(sql), params)
            names = [d.name for d in cursor.description or ()]
            return names, list(cursor.fetchall())

    def is_transient(self, error: BaseException) -> bool:
        """A lost connection or a server going down: try again later (reconnecting first)."""
        transient = isinstance(error, self._psycopg.OperationalError) or (
            self.connection is not None and self.connection.closed
        )
        if transient and self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
        return transient

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def _safe(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@{rest.split('@', 1)[1]}"
    return scheme + sep + rest
