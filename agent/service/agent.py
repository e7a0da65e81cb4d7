"""The agent: watch the folder, analyse complete stacks, record, move files, publish.

One process, three threads: this loop (look at the folder, analyse, record, move), the
watchdog observer (events that wake the loop early) and the publisher (owns the MQTT client).
The order for every batch of ready stacks is fixed, and is what makes "nothing lost" hold:
  analyse -> one transaction: ledger rows + outbox rows -> move/delete the files -> kick the publisher.
A crash before the commit redoes the stacks; after it, the ledger recognises them and only
the file moves are redone. A stack that cannot be read goes to failed/ with
`<id>.error.json`; one still incomplete after `watch.incomplete_timeout` goes to quarantine/.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agent.model import messages
from agent.model.bundle import Bundle, load_bundle
from agent.model.pipeline import Outcome, Pipeline, Prepared
from agent.service import log
from agent.service.config import Config, is_set
from agent.service.files import move_file, write_json
from agent.service.notify import Notifier, Watchdog
from agent.service.publisher import Publisher
from agent.service.state import Ledger, StateError
from agent.service.tracker import Entry, Tracker
from agent.service.watcher import Watcher, list_folder
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS

STATE_RETRY_SECONDS = 5.0
MOVE_RETRY_SECONDS = 10.0  # files that could not be moved are left alone this long
DECODE_THREADS = 2  # on 2 cores: 110-115 stacks/s in a burst against 96 with one (hpa-edge bench --burst)
DECODE_AHEAD = 3


class StartError(RuntimeError):
    """The agent cannot start (folder, bundle or database); the message says why."""


class Agent:
    def __init__(
        self,
        config: Config,
        bundle: Bundle | None = None,
        lister: Callable[[Path], Mapping[str, Entry]] = list_folder,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.folder = config.watch.folder
        self.instrument = config.instrument_name
        self.lister = lister
        self.clock = clock
        self.stop_event = threading.Event()
        self.tracker = Tracker(config.naming(), config.watch.settle_seconds, config.watch.incomplete_timeout)
        self.counts = {"processed": 0, "failed": 0, "quarantined": 0, "duplicates": 0}
        self.latencies: deque[float] = deque(maxlen=1000)
        self.waiting = 0
        self.started_at = time.time()
        self._left: dict[str, Entry] = {}  # files.after = "leave": handled files and how they looked
        self._held: dict[str, float] = {}  # files whose move failed -> when to try again
        self._bundle = bundle
        self.pipeline: Pipeline | None = None
        self.ledger: Ledger | None = None
        self.publisher: Publisher | None = None
        self.watcher: Watcher | None = None
        self.notifier = notifier or Notifier()
        self.watchdog: Watchdog | None = None
        self.decoder: ThreadPoolExecutor | None = None  # decodes the next stacks while the models run
        self.heartbeat = time.monotonic()  # last turn of the loop: the systemd watchdog's sign of progress

    # Start and stop ---------------------------------------------------------------------
    def start(self) -> None:
        """Everything that can fail is checked here, before the first stack is touched."""
        from agent.model.bundle import BundleError

        if not self.folder.is_dir():
            raise StartError(f"watch.folder {self.folder} does not exist or is not a folder")
        secret = self.config.mqtt.password_file
        if is_set(secret) and secret.stat().st_mode & 0o077:
            log.event(
                "password_file_readable",
                "warning",
                path=secret,
                mode=oct(secret.stat().st_mode & 0o777),
                advice="chmod 600 and owned by the agent's user",
            )
        for name in ("done", "failed", "quarantine"):
            try:
                self.config.folder(name).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StartError(
                    f"files.{name}: cannot create {self.config.folder(name)}: {exc.strerror}"
                ) from None
        bundle = self._bundle
        if bundle is None:
            try:
                bundle = load_bundle(self.config.bundle.path, threads=self.config.bundle.threads)
            except BundleError as exc:
                raise StartError(f"bundle refused: {exc}") from None
        self.pipeline = Pipeline(bundle, self.instrument, self.config.limits(), self.config.stack.bits)
        self.decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
        try:
            self.ledger = Ledger(self.config.state.database)
        except StateError as exc:
            raise StartError(str(exc)) from None
        self.publisher = Publisher(self.config, stats=self.stats)
        self.publisher.start()
        self.watcher = Watcher(self.folder, self.config.watch.observer)
        mode = self.watcher.start()
        golden = bundle.golden
        log.event(
            "agent_ready",
            instrument=self.instrument,
            folder=self.folder,
            observer=mode,
            bundle=bundle.id,
            purpose=bundle.purpose,
            golden_cosine=None if golden is None else round(golden.min_cosine, 5),
            runtime=bundle.embedder.runtime,
            topics=self.config.topic_prefix + "/#",
        )
        self.notifier.ready(self.status_line())
        if self.notifier.watchdog_interval is not None:
            self.watchdog = Watchdog(self.notifier, self.healthy, self.status_line)
            self.watchdog.start()
        if bundle.purpose == "demo":
            log.event(
                "demo_bundle",
                "warning",
                message="demonstration bundle trained on synthetic data: results are marked purpose=demo",
            )

    def request_stop(self) -> None:
        self.stop_event.set()
        if self.watcher is not None:
            self.watcher.wake.set()

    def close(self, flush_seconds: float | None = None) -> None:
        self.notifier.stopping()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.publisher is not None:
            self.publisher.shutdown(flush_seconds)
        if self.ledger is not None:
            self.ledger.close()
        if self.decoder is not None:
            self.decoder.shutdown(wait=True)
        log.event(
            "agent_stopped",
            processed=self.counts["processed"],
            failed=self.counts["failed"],
            quarantined=self.counts["quarantined"],
            duplicates=self.counts["duplicates"],
        )

    # The loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Look, act, wait for an event or the next look; until request_stop()."""
        assert self.watcher is not None
        # With a systemd watchdog the loop turns at least every interval/4 even when idle.
        interval = self.notifier.watchdog_interval
        longest = interval / 4 if interval else float("inf")
        while not self.stop_event.is_set():
            self.heartbeat = time.monotonic()
            if self.step():
                continue  # a full batch: more may be ready, look again at once
            # Every look is a full listing; events only bring the next one forward.
            polling = self.watcher.mode == "polling" or self.waiting
            wait = self.config.watch.poll_interval if polling else self.config.watch.rescan_interval
            self.watcher.wake.wait(min(wait, longest))
            self.watcher.wake.clear()
            if self.publisher is not None and self.publisher.failure is not None:
                raise RuntimeError(f"publisher thread failed: {self.publisher.failure!r}")

    def step(self) -> bool:
        """One look at the folder; True when a full batch was handled (so look again soon)."""
        now = self.clock()
        if self.watcher is not None:
            for name, kind, at in self.watcher.drain():
                self.tracker.note(name, kind, at)
        try:
            listing = dict(self.lister(self.folder))
        except OSError as exc:
            log.event("folder_unreadable", "error", folder=self.folder, error=exc.strerror or exc)
            return False
        for name, entry in list(self._left.items()):
            if listing.get(name) == entry:
                del listing[name]
            elif name not in listing:
                del self._left[name]
        for name, until in list(self._held.items()):
            if now < until:
                listing.pop(name, None)
            else:
                del self._held[name]
        look = self.tracker.look(listing, now)
        self.waiting = look.waiting + len(look.ready)
        outcomes = [self._quarantine(stack_id, names) for stack_id, names in look.overdue.items()]
        outcomes += [self._unsafe_name(name, channel) for name, channel in look.unsafe.items()]
        ready = sorted(look.ready.items())[: self.config.state.batch]
        for item in self._decoded(ready):
            outcomes.append(self._infer(item) if isinstance(item, Prepared) else item)
        if not outcomes:
            return False
        self._commit_and_dispose(outcomes)
        return len(ready) == self.config.state.batch

    def _paths(self, names: Mapping[str, str]) -> dict[str, Path]:
        return {channel: self.folder / name for channel, name in names.items()}

    def _decoded(self, ready: list[tuple[str, dict[str, str]]]) -> Iterator[Prepared | Outcome]:
        """Stacks decoded by the decode threads at most DECODE_AHEAD ahead of the models, in order.

        Decoding (OpenCV, numpy: the GIL is released) is the longest stage; running it beside
        the models keeps both cores busy, and the bound keeps only a few decoded stacks in memory.
        """
        assert self.decoder is not None
        pending: deque[Future[Prepared | Outcome]] = deque()
        waiting = iter(ready)
        for stack_id, names in itertools.islice(waiting, DECODE_AHEAD):
            pending.append(self.decoder.submit(self._prepare, stack_id, names))
        while pending:
            done = pending.popleft().result()
            following = next(waiting, None)
            if following is not None:
                pending.append(self.decoder.submit(self._prepare, *following))
            yield done

    def _prepare(self, stack_id: str, names: Mapping[str, str]) -> Prepared | Outcome:
        assert self.pipeline is not None
        try:
            return self.pipeline.prepare(stack_id, self._paths(names))
        except Exception as exc:  # one stack must not stop the agent, whatever it holds
            error = StackError("decode_failed", f"reading failed unexpectedly: {exc!r}")
            return self.pipeline.failure(stack_id, self._paths(names), error, "failed")

    def _infer(self, ready: Prepared) -> Outcome:
        assert self.pipeline is not None
        try:
            return self.pipeline.infer(ready)
        except Exception as exc:  # a model or runtime failure on one stack must not stop the agent
            error = StackError("inference_failed", f"analysis failed: {exc!r}")
            return self.pipeline.failure(ready.stack.stack_id, ready.stack.paths, error, "failed")

    def _quarantine(self, stack_id: str, names: Mapping[str, str]) -> Outcome:
        assert self.pipeline is not None
        missing = [c for c in CHANNELS if c not in names]
        reason = f"lacks channel(s) {', '.join(missing)}" if missing else "channel files still being written"
        error = StackError(
            "incomplete",
            f"stack {stack_id!r} {reason} after {self.config.watch.incomplete_timeout:g} s",
            self.folder,
        )
        return self.pipeline.failure(stack_id, self._paths(names), error, "quarantine")

    def _unsafe_name(self, name: str, channel: str) -> Outcome:
        """A channel file whose name cannot give a stack id: moved to failed/ under its own name."""
        assert self.pipeline is not None
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        error = StackError(
            "unsafe_name",
            f"file name {name!r} cannot name a stack (only letters, digits and ._+=@,- are allowed in ids)",
            self.folder,
        )
        return self.pipeline.failure(f"unsafe-{digest}", {channel: self.folder / name}, error, "failed")

    def _commit_and_dispose(self, outcomes: list[Outcome]) -> None:
        assert self.ledger is not None
        new: list[Outcome] = []
        duplicates: list[Outcome] = []
        for outcome in outcomes:
            seen = self.ledger.outcome(outcome.stack_id, outcome.files_sha256)
            (duplicates if seen is not None else new).append(outcome)
        try:
            self.ledger.record([outcome.record() for outcome in new])
        except StateError as exc:
            log.event("state_write_failed", "error", error=exc, stacks=len(new), retry_s=STATE_RETRY_SECONDS)
            self.stop_event.wait(STATE_RETRY_SECONDS)  # files stay where they are; retried next look
            return
        if self.publisher is not None and new:
            self.publisher.kick()
        for outcome in new:
            self._report(outcome)
            self._dispose(outcome)
        for outcome in duplicates:
            self.counts["duplicates"] += 1
            log.event(
                "stack_duplicate",
                stack=outcome.stack_id,
                msg_id=outcome.msg_id,
                files=outcome.files_sha256[:16],
            )
            self._dispose(outcome)

    def _report(self, outcome: Outcome) -> None:
        document = outcome.document
        if outcome.outcome == "result":
            self.counts["processed"] += 1
            self.latencies.append(float(document["total_ms"]))
            log.event(
                "stack_done",
                stack=outcome.stack_id,
                labels="|".join(document["labels"]) or "-",
                ms=document["total_ms"],
                msg_id=outcome.msg_id,
            )
        else:
            self.counts[outcome.outcome] += 1
            log.event(
                f"stack_{outcome.outcome}",
                "error",
                stack=outcome.stack_id,
                code=document["code"],
                message=document["message"],
                msg_id=outcome.msg_id,
            )

    def _dispose(self, outcome: Outcome) -> None:
        """Move, delete or leave the files; a failure leaves them for the next look to retry."""
        names = [path.name for path in outcome.paths.values()]
        after = self.config.files.after if outcome.destination == "done" else "move"
        target = self.config.folder(outcome.destination)
        try:
            if outcome.destination != "done":
                write_json(target / f"{outcome.stack_id}.error.json", outcome.document)
            for path in outcome.paths.values():
                if after == "move":
                    move_file(path, target)
                elif after == "delete":
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.event(
                "move_failed",
                "error",
                stack=outcome.stack_id,
                target=target,
                error=exc.strerror or exc,
                retry_s=MOVE_RETRY_SECONDS,
            )
            self.tracker.forget(names)  # seen afresh after the pause: the ledger then knows it
            self._held.update({name: self.clock() + MOVE_RETRY_SECONDS for name in names})
            return
        if after == "leave":
            listing = self.lister(self.folder)
            self._left.update({name: listing[name] for name in names if name in listing})
        self.tracker.forget(names)

    # Health -----------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Both working threads turned recently: what keeps the systemd watchdog fed."""
        interval = self.notifier.watchdog_interval or float("inf")
        now = time.monotonic()
        loop_ok = now - self.heartbeat < interval / 2
        publisher_ok = self.publisher is None or (
            self.publisher.is_alive() and now - self.publisher.beat < interval / 2
        )
        return loop_ok and publisher_ok

    def status_line(self) -> str:
        """One line for `systemctl status`."""
        mqtt = "connected" if self.publisher is not None and self.publisher.connected else "not connected"
        return (
            f"processed {self.counts['processed']}, failed {self.counts['failed']}, "
            f"quarantined {self.counts['quarantined']}, waiting {self.waiting}; MQTT {mqtt}"
        )

    # Stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The stats document (called from the publisher thread: reads counters only)."""
        latencies = np.asarray(self.latencies, dtype=np.float64)
        publisher = self.publisher
        depth = publisher.outbox_depth() if publisher is not None else {"pending": 0, "rejected": 0}
        assert self.pipeline is not None
        return {
            "schema_version": messages.MESSAGE_SCHEMA_VERSION,
            "kind": "stats",
            "instrument": self.instrument,
            "time": messages.utc_now(),
            "uptime_s": round(time.time() - self.started_at, 1),
            **self.counts,
            "waiting_stacks": self.waiting,
            "outbox_pending": depth["pending"],
            "outbox_rejected": depth["rejected"],
            "inflight": len(publisher.inflight) if publisher is not None else 0,
            "latency_p50_ms": _percentile(latencies, 50),
            "latency_p95_ms": _percentile(latencies, 95),
            "latency_max_ms": _percentile(latencies, 100),
            "purpose": self.pipeline.bundle.purpose,
        }


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None
