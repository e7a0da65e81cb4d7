"""`hpa-edge reanalyse --bundle DIR ARCHIVE...`: a bundle over an archive of stacks, on Dask.

ARCHIVEs are folders (searched recursively) or channel files; files are grouped into stacks
by the naming scheme, as `hpa-edge predict` does (Kaggle's by default, `--pattern` and
`--channel-map` for others). Each stack's result, or error, is written into the collector's
database (`--db`, the same default as `hpa-edge collect`) through the collector's own code,
so its row is the row `hpa-edge collect` would have stored had an instrument named
`--instrument` published it. Resumable: a stack that already has a result from this bundle
(its sha256) and this instrument name is skipped before any file is read, and every row is
written `ON CONFLICT (msg_id) DO NOTHING`, so a stack analysed twice (a worker killed after
its work was done) is stored once. Stacks that gave an error are tried again on the next run.

Dask is the engine: without `--scheduler`, a local cluster of `--workers` processes (all
cores by default) with one thread each; with `--scheduler tcp://HOST:8786`, that cluster's
workers (which must see the archive and the bundle at the same paths). Tasks are chunks of
`--chunk` stacks, a bounded number in flight; a worker loads the bundle once (a cache keyed
by its path, sha256 and threads) and keeps it for every later task and run. A worker that
dies has its tasks re-run elsewhere by the scheduler. A progress line goes to stderr, a JSON
summary to stdout. Exit 0 when every stack has a result, 1 when any failed, 2 when refused.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.collector import ingest, store
from agent.collector.database import Database, DatabaseError, open_database
from agent.collector.schema import migrate
from agent.model.bundle import MANIFEST, BundleError, check_files, load_bundle, read_manifest
from agent.model.messages import encode
from agent.model.pipeline import Pipeline
from agent.stacks.digest import file_sha256
from agent.stacks.naming import KAGGLE_PATTERN, NamingScheme
from agent.tools.collect import add_database_argument
from agent.tools.predict import collect

RECEIVED_BY = "reanalyse"
Stacks = dict[str, dict[str, Path]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archives", type=Path, nargs="+", metavar="ARCHIVE", help="folders or channel files")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    add_database_argument(parser)
    parser.add_argument(
        "--pattern", default=KAGGLE_PATTERN, help="file-name regular expression (see docs/stacks.md)"
    )
    parser.add_argument(
        "--channel-map",
        action="append",
        default=[],
        metavar="TOKEN=CHANNEL",
        help="a channel token of the file names and the channel it is (repeat), e.g. w1=blue",
    )
    parser.add_argument(
        "--instrument", default="archive", help="instrument name put in the results (archive)"
    )
    parser.add_argument("--scheduler", help="address of a Dask scheduler (default: a local cluster)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="local cluster's worker processes (all cores)",
    )
    parser.add_argument("--threads", type=int, default=1, help="embedder threads per worker (1)")
    parser.add_argument("--chunk", type=int, default=4, help="stacks per Dask task (4)")


# -- on the workers ------------------------------------------------------------------------

_PIPELINES: dict[tuple[str, str, int, str], Pipeline] = {}
_LOCK = threading.Lock()
LOADS = [0]  # bundles this process has loaded: once per bundle, whatever the number of tasks


def worker_pipeline(bundle_dir: str, bundle_sha256: str, threads: int, instrument: str) -> Pipeline:
    """This process's pipeline for the bundle: loaded on its first task, kept for every later one."""
    key = (bundle_dir, bundle_sha256, threads, instrument)
    with _LOCK:
        pipeline = _PIPELINES.get(key)
        if pipeline is None:
            bundle = load_bundle(Path(bundle_dir), threads=threads, release_unread_embedder=True)
            if bundle.sha256 != bundle_sha256:
                raise BundleError(
                    f"{bundle_dir} on this worker is bundle {bundle.sha256[:12]}..., "
                    f"not {bundle_sha256[:12]}... (the client's)"
                )
            LOADS[0] += 1
            pipeline = _PIPELINES[key] = Pipeline(bundle, instrument)
        return pipeline


def bundles_loaded() -> int:
    """How many bundles this worker process has loaded (for `client.run`)."""
    return LOADS[0]


def analyse_chunk(
    bundle_dir: str,
    bundle_sha256: str,
    threads: int,
    instrument: str,
    stacks: Sequence[tuple[str, Mapping[str, str]]],
) -> list[tuple[str, bytes]]:
    """A Dask task: (topic kind, JSON document) for each stack, "results" or "errors"."""
    pipeline = worker_pipeline(bundle_dir, bundle_sha256, threads, instrument)
    out = []
    for stack_id, names in stacks:
        paths = {channel: Path(name) for channel, name in names.items()}
        analysis = pipeline.analyse(stack_id, paths)  # a stack lacking a channel fails as missing_channel
        out.append(("results" if analysis.kind == "result" else "errors", encode(analysis.document)))
    return out


# -- on the client -------------------------------------------------------------------------


@dataclass
class Summary:
    stacks: int = 0  # found in the archive
    skipped: int = 0  # already analysed with this bundle
    analysed: int = 0  # results written (or already there: a task re-run after a lost worker)
    failed: int = 0  # error documents written
    lost: int = 0  # stacks of tasks that failed outright (workers dying again and again)
    seconds: float = 0.0

    @property
    def stacks_per_second(self) -> float:
        done = self.analysed + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "seconds": round(self.seconds, 3),
            "stacks_per_s": round(self.stacks_per_second, 2),
        }


def find_stacks(archives: Iterable[Path], naming: NamingScheme) -> tuple[Stacks, list[str]]:
    """{stack id: {channel: path}} of every file under the archives, as `predict` groups them."""
    paths: list[Path] = []
    for archive in archives:
        paths.append(archive)
        if archive.is_dir():
            paths.extend(sorted(p for p in archive.rglob("*") if p.is_dir() and not p.name.startswith(".")))
    return collect(paths, naming)


def analysed_stacks(db: Database, instrument: str, bundle_sha256: str) -> set[str]:
    """Stack ids that already have a result from this bundle and instrument."""
    _, rows = db.rows(
        "SELECT DISTINCT stack_id FROM results WHERE bundle_sha256 = ? AND instrument = ?",
        (bundle_sha256, instrument),
    )
    return {row[0] for row in rows}


def write_documents(db: Database, instrument: str, documents: Sequence[tuple[str, bytes]]) -> store.Counts:
    """Documents to rows with the collector's own code, in one transaction."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    records = [(ingest.parse(f"hpa-edge/{instrument}/{kind}", payload), now) for kind, payload in documents]
    with db.transaction() as tx:
        return store.write(tx, records, RECEIVED_BY)


def reanalyse(
    client: Any,
    stacks: Stacks,
    bundle_dir: Path,
    bundle_sha256: str,
    db: Database,
    instrument: str = "archive",
    threads: int = 1,
    chunk: int = 4,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Run the bundle over the stacks not yet analysed on the client's cluster; write as tasks finish."""
    started = time.perf_counter()
    summary = Summary(stacks=len(stacks))
    done = analysed_stacks(db, instrument, bundle_sha256)
    todo = [
        (sid, {c: str(p) for c, p in paths.items()})
        for sid, paths in sorted(stacks.items())
        if sid not in done
    ]
    summary.skipped = len(stacks) - len(todo)
    chunks = iter([todo[i : i + chunk] for i in range(0, len(todo), chunk)])
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    in_flight = max(2, 3 * workers)
    folder = str(bundle_dir.resolve())

    def submit(part: list[tuple[str, dict[str, str]]]) -> Any:
        return client.submit(analyse_chunk, folder, bundle_sha256, threads, instrument, part, pure=False)

    sizes: dict[str, int] = {}
    pending = _distributed().as_completed()
    for part in itertools.islice(chunks, in_flight):
        future = submit(part)
        sizes[future.key] = len(part)
        pending.add(future)
    for future in pending:
        try:
            documents = future.result()
        except Exception as exc:  # KilledWorker after repeated deaths, a bundle refused on a worker
            summary.lost += sizes[future.key]
            print(f"reanalyse: a task of {sizes[future.key]} stacks failed: {exc!r}", file=sys.stderr)
        else:
            write_documents(db, instrument, documents)
            summary.analysed += sum(kind == "results" for kind, _ in documents)
            summary.failed += sum(kind == "errors" for kind, _ in documents)
        future.release()
        for part in itertools.islice(chunks, 1):
            nxt = submit(part)
            sizes[nxt.key] = len(part)
            pending.add(nxt)
        summary.seconds = time.perf_counter() - started
        if progress is not None:
            progress(summary)
    summary.seconds = time.perf_counter() - started
    return summary


class ProgressLine:
    """One line on stderr, rewritten in place on a terminal, once every few seconds otherwise."""

    def __init__(self, stream: Any = None, every: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else 10 * every
        self.last = 0.0
        self.shown = ""

    def text(self, s: Summary) -> str:
        left = s.stacks - s.skipped - s.analysed - s.failed - s.lost
        rate = s.stacks_per_second
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (
            f"reanalyse: {s.stacks - left}/{s.stacks} stacks ({s.skipped} skipped, {s.analysed} results, "
            f"{s.failed} errors, {s.lost} lost) {rate:.1f} stacks/s, {left} left, eta {eta}"
        )

    def __call__(self, summary: Summary, final: bool = False) -> None:
        now = time.monotonic()
        text = self.text(summary)
        if (not final and now - self.last < self.every) or (final and text == self.shown and not self.tty):
            return
        self.last, self.shown = now, text
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + text + end)
        self.stream.flush()


def _distributed() -> Any:
    """dask.distributed, imported when used (its own import takes a second)."""
    return importlib.import_module("distributed")


def _naming(args: argparse.Namespace) -> NamingScheme:
    channel_map = {}
    for item in args.channel_map:
        token, sep, channel = item.partition("=")
        if not sep:
            raise ValueError(f"--channel-map {item!r}: expected TOKEN=CHANNEL")
        channel_map[token] = channel
    return NamingScheme(pattern=args.pattern, channel_map=channel_map)


def run(args: argparse.Namespace) -> int:
    try:
        naming = _naming(args)
        if args.workers < 1 or args.threads < 1 or args.chunk < 1:
            raise ValueError("--workers, --threads and --chunk must be at least 1")
    except ValueError as exc:
        print(f"reanalyse: {exc}", file=sys.stderr)
        return 2
    try:  # the files against the manifest here; the models load on the workers, once each
        check_files(args.bundle, read_manifest(args.bundle))
        bundle_sha256 = file_sha256(args.bundle / MANIFEST)
    except (BundleError, OSError) as exc:
        print(f"reanalyse: bundle refused: {exc}", file=sys.stderr)
        return 2
    stacks, unmatched = find_stacks(args.archives, naming)
    hidden = [p for p in unmatched if not Path(p).name.startswith(".")]
    if hidden:
        print(f"reanalyse: {len(hidden)} files name no channel, e.g. {hidden[0]}; skipped", file=sys.stderr)
    try:
        db = open_database(args.db)
        migrate(db)
    except DatabaseError as exc:
        print(f"reanalyse: {exc}", file=sys.stderr)
        return 1
    distributed = _distributed()
    cluster = None
    try:
        if args.scheduler:
            client = distributed.Client(args.scheduler)
        else:
            cluster = distributed.LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = distributed.Client(cluster)
        line = ProgressLine()
        with client:
            summary = reanalyse(
                client,
                stacks,
                args.bundle,
                bundle_sha256,
                db,
                args.instrument,
                args.threads,
                args.chunk,
                line,
            )
        line(summary, final=True)
    finally:
        if cluster is not None:
            cluster.close()
        db.close()
    print(json.dumps({"bundle_sha256": bundle_sha256, "instrument": args.instrument, **summary.as_dict()}))
    return 1 if summary.failed or summary.lost or not stacks else 0
