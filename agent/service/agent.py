"""The agent: watch the folder, analyse complete stacks, record, move files, publish.

One process, a few threads: this loop (look at the folder, analyse, record, dispose), the
decode threads (the next stacks, while the models run), the watchdog observer (events that
wake the loop early) and the drainer (owns the outbox's sending side and the MQTT client).
Every stack moves through the lifecycle book (`lifecycle`), and the order is fixed, which is
what makes "nothing lost" hold:
  analyse -> one transaction: ledger rows + outbox rows -> move/delete the files -> publish.
A crash before the commit redoes the stacks; after it, the ledger recognises them and only
the file moves are redone: the ledger knows each recorded file by name and sha256, so files
left behind by a crash between two moves are finished, not taken for a new stack
(`remnants`). A stack that cannot be read goes to failed/ with `<id>.error.json`; one still
incomplete after `watch.incomplete_timeout` goes to quarantine/.

Faults of the surroundings are retried, never turned into a verdict on a stack: a database
that cannot be opened or written (disk full) leaves the files in place and is tried again;
analysis failing for reasons outside the stack defers it and, when it fails on everything,
the agent stops taking stacks for a while (`breaker`); a stack in flight when the process
died twice is set aside as `crashed` (the `attempts` table), so it cannot loop the service.
The folder deleted and made again is noticed and watched again. docs/reliability.md lists
every fault and what the agent does.

The collaborators each do one job: `Tracker` (when files are written), `StackBook` (where
every stack stands), `Decoder` (decode ahead), `Pipeline` (one stack -> an analysis),
`Recorder` (the transaction), `Disposer` (the files), `Drainer` + `MqttSink` (the broker),
`Stats` (counters). This class wires them and runs the loop.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.model import messages
from agent.model.bundle import Bundle, BundleError, load_bundle
from agent.model.pipeline import Analysis, Pipeline, Prepared
from agent.service import crashpoint, homeassistant, log
from agent.service.breaker import Breaker
from agent.service.config import Config, is_set
from agent.service.decoding import Decoder
from agent.service.disposal import Disposer
from agent.service.drainer import Drainer, DrainSettings
from agent.service.lifecycle import StackBook, StackLife
from agent.service.notify import Notifier, Watchdog
from agent.service.recorder import Recorder
from agent.service.remnants import Remnants, Sighting
from agent.service.sinks.mqtt import MqttSink
from agent.service.state import Ledger, StateError
from agent.service.stats import Stats
from agent.service.tracker import Entry, Look, Tracker
from agent.service.watcher import Watcher, list_folder
from agent.stacks import heap
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS

STATE_RETRY_SECONDS = 5.0
MOVE_RETRY_SECONDS = 10.0  # a stack whose files could not be moved is left alone this long
CRASH_LIMIT = 2  # deaths of the process while a stack was in flight before it is set aside
CHANGING_TRIES = 5  # a stack whose files change while read is taken again this often, then fails


@dataclass(frozen=True)
class Unexpected:
    """Analysis failed for a reason that is not about the stack's bytes (see `breaker`)."""

    error: BaseException
    stage: str  # decode | inference


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
        self.book = StackBook()
        self.disposer = Disposer(config, lister)
        self.move_retry = MOVE_RETRY_SECONDS
        self.state_retry = STATE_RETRY_SECONDS
        self.breaker = Breaker()
        self.stats = Stats(self.instrument)
        self._bundle = bundle
        self._delivered: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.pipeline: Pipeline | None = None
        self.recorder: Recorder | None = None  # None while the database cannot be opened
        self.remnants: Remnants | None = None
        self.drainer: Drainer | None = None
        self.watcher: Watcher | None = None
        self.decoder: Decoder | None = None
        self.notifier = notifier or Notifier()
        self.watchdog: Watchdog | None = None
        self.heartbeat = time.monotonic()  # last turn of the loop: the systemd watchdog's sign of progress
        self._state_failing: str | None = None  # the state error being waited out, logged once
        self._state_retry_at = 0.0
        self._database_inode: int | None = None
        self._folder_inode: int | None = None
        self._folder_lost = False
        self._changing: dict[str, int] = {}  # stack id -> times a file changed while it was read
        self._remnant_retry: dict[str, float] = {}  # remnant file -> when its failed move may be retried

    # Start and stop ---------------------------------------------------------------------
    def start(self) -> None:
        """Everything that can fail is checked here, before the first stack is touched."""
        if not self.folder.is_dir():
            raise StartError(f"watch.folder {self.folder} does not exist or is not a folder")
        self._warn_if_password_readable()
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
                bundle = load_bundle(
                    self.config.bundle.path, threads=self.config.bundle.threads, release_unread_embedder=True
                )
            except BundleError as exc:
                raise StartError(f"bundle refused: {exc}") from None
        thumbs = self.config.thumbnails
        self.pipeline = Pipeline(
            bundle,
            self.instrument,
            self.config.limits(),
            self.config.stack.bits,
            thumbnail_size=thumbs.size if thumbs.enabled else 0,
        )
        self.stats.purpose = bundle.purpose
        self.decoder = Decoder()
        self._folder_inode = os.stat(self.folder).st_ino
        self._open_state(self.clock(), at_start=True)
        self.drainer = self._drainer(self.stats)
        if self.stats.degraded is not None:  # the database could not be opened just now
            self.drainer.set_status(messages.DEGRADED)
        self.drainer.start()
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

    def _drainer(self, stats: Stats) -> Drainer:
        mqtt = self.config.mqtt
        ha = self.config.homeassistant
        topic, payload = homeassistant.discovery(
            ha.discovery_prefix, self.instrument, self.config.topic_prefix
        )
        sink = MqttSink(
            self.config.broker(),
            self.config.client_id,
            self.config.topic_prefix,
            mqtt.max_inflight,
            discovery=(topic, payload if ha.enabled else b""),
            birth_topic=homeassistant.birth_topic(ha.discovery_prefix),
        )
        settings = DrainSettings(
            max_inflight=mqtt.max_inflight,
            reconnect_min=mqtt.reconnect_min,
            reconnect_max=mqtt.reconnect_max,
            stats_interval=mqtt.stats_interval,
            flush_seconds=mqtt.flush_seconds,
        )
        return Drainer(
            self.config.state.database,
            sink,
            settings,
            stats=stats.document,
            on_delivered=lambda msg_id, at: self._delivered.put((msg_id, at)),
            on_failure=self._wake,
        )

    def _warn_if_password_readable(self) -> None:
        secret = self.config.mqtt.password_file
        if is_set(secret) and secret.stat().st_mode & 0o077:
            log.event(
                "password_file_readable",
                "warning",
                path=secret,
                mode=oct(secret.stat().st_mode & 0o777),
                advice="chmod 600 and owned by the agent's user",
            )

    def _wake(self) -> None:
        if self.watcher is not None:
            self.watcher.wake.set()

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
        if self.drainer is not None:
            self.drainer.shutdown(flush_seconds)
        if self.recorder is not None:
            self.recorder.ledger.close()
        if self.decoder is not None:
            self.decoder.close()
        counts = self.stats.counts
        log.event(
            "agent_stopped",
            processed=counts["processed"],
            failed=counts["failed"],
            quarantined=counts["quarantined"],
            duplicates=counts["duplicates"],
        )

    # The state database -------------------------------------------------------------------
    def _open_state(self, now: float, at_start: bool = False) -> bool:
        """Open the ledger; a transient failure (disk full, locked) is waited out, not fatal:
        the files stay in the folder and are analysed once the database opens."""
        path = self.config.state.database
        try:
            ledger = Ledger(path)
        except StateError as exc:
            writable = os.access(path.parent if path.parent.exists() else path.parent.parent, os.W_OK)
            if at_start and (not exc.transient or not writable):
                raise StartError(str(exc)) from None
            self._state_trouble("state_unavailable", exc, now)
            return False
        self._adopt(ledger)
        return True

    def _adopt(self, ledger: Ledger) -> None:
        self.recorder = Recorder(ledger)
        self.remnants = Remnants(ledger, self.folder)
        self._database_inode = _inode(ledger.path)
        self._state_fine()

    def _state_ready(self, now: float) -> bool:
        """The ledger is open and its file is still the one on disk; retried after a pause."""
        if self.recorder is None:
            return now >= self._state_retry_at and self._open_state(now)
        if self._state_failing is not None and now < self._state_retry_at:
            return False  # a write failed: tried again after the pause the log line gave
        if _inode(self.config.state.database) != self._database_inode:
            self._restore_database(now)
        return self.recorder is not None

    def _restore_database(self, now: float) -> None:
        """The database file was deleted (or replaced) under the running agent. Its pages are
        still readable through the open connection: copy them to a new file at the path, so
        the ledger and the pending messages survive, and carry on with that one."""
        assert self.recorder is not None
        old = self.recorder.ledger
        path = self.config.state.database
        log.event("state_database_missing", "error", path=path, action="restoring from the open connection")
        try:
            if path.exists():
                path.rename(path.with_name(path.name + f".replaced-{int(time.time())}"))
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            fresh = Ledger(path)
            old.db.backup(fresh.db)
        except (OSError, StateError, sqlite3.Error) as exc:
            self._state_trouble("state_restore_failed", exc, now)
            return
        old.close()
        self._adopt(fresh)
        if self.drainer is not None:
            self.drainer.reopen()
        log.event("state_database_restored", "warning", path=path)

    def _state_trouble(self, event: str, exc: BaseException, now: float) -> None:
        """A database fault: logged once per kind of trouble, retried after a pause."""
        self._state_retry_at = now + self.state_retry
        if self._state_failing != event:
            self._state_failing = event
            log.event(event, "error", error=exc, retry_s=self.state_retry)
            self._set_degraded(f"state database: {exc}")

    def _state_fine(self) -> None:
        if self._state_failing is not None:
            log.event("state_recovered", after=self._state_failing)
            self._state_failing = None
            self._set_degraded(None)

    def _set_degraded(self, reason: str | None) -> None:
        if self.stats.degraded == reason:
            return
        self.stats.degraded = reason
        self.notifier.send(f"STATUS={self.status_line()}")
        if self.drainer is not None:
            self.drainer.set_status(messages.ONLINE if reason is None else messages.DEGRADED)

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
            # Going idle: give back what the batch freed. glibc keeps freed blocks in each
            # thread's arena below data still in use (measured: RSS after 200 stacks 165 ->
            # 159 MB with the demo bundle); 0.1 ms when there is nothing to give back.
            heap.trim()
            # Every look is a full listing; events only bring the next one forward.
            polling = self.watcher.mode == "polling" or self.book.waiting or self._folder_lost
            wait = self.config.watch.poll_interval if polling else self.config.watch.rescan_interval
            # A deferred stack or a failed move is tried again on time, not at the next rescan; a
            # file renamed in counts as written once its quiet time is over, not a poll later.
            for due in (self.book.next_retry(), self.tracker.next_due(self.clock())):
                if due is not None:
                    wait = min(wait, max(due - self.clock(), 0.0))
            self.watcher.wake.wait(min(wait, longest))
            self.watcher.wake.clear()
            if self.drainer is not None and self.drainer.failure is not None:
                raise RuntimeError(f"publisher thread failed: {self.drainer.failure!r}")

    def step(self) -> bool:
        """One look at the folder; True when a full batch was handled (so look again soon)."""
        now = self.clock()
        self._take_deliveries()
        if self.watcher is not None:
            for name, kind, at in self.watcher.drain():
                self.tracker.note(name, kind, at)
        listing = self._list()
        if listing is None:
            return False
        for name in self.book.hidden(listing):
            listing.pop(name, None)
        look = self.tracker.look(listing, now)
        self.book.observe(look, now)
        self.stats.waiting = self.book.waiting
        if not self._state_ready(now):
            self._dispose(now)  # files of stacks already recorded may still go
            return False
        sightings = self._remnants(look, listing, now)
        for stack_id, names in look.overdue.items():
            if self.book.accepts(stack_id):  # not while an earlier stack of that id is still in hand
                changed = [n for n in names.values() if n in sightings and sightings[n].changed]
                self.book.analysed(stack_id, names, self._quarantine(stack_id, names, changed))
        for name, channel in look.unsafe.items():
            stack_id, analysis = self._unsafe_name(name, channel)
            if self.book.accepts(stack_id):
                self.book.analysed(stack_id, {channel: name}, analysis)
        self._check_breaker(now)
        ready = [] if self.breaker.degraded(now) else self.book.ready(self.config.state.batch, now)
        self._analyse(ready, listing)
        self._record()
        self._dispose(self.clock())
        self.stats.waiting = self.book.waiting
        return len(ready) == self.config.state.batch

    def _list(self) -> dict[str, Entry] | None:
        """The folder's contents; its loss is logged once, its return (or re-creation) too, and
        the watch is set again, because an inotify watch dies with the folder it watched."""
        try:
            listing = dict(self.lister(self.folder))
            inode = os.stat(self.folder).st_ino
        except OSError as exc:
            if not self._folder_lost:
                self._folder_lost = True
                log.event("folder_unreadable", "error", folder=self.folder, error=exc.strerror or exc)
            return None
        if self._folder_lost or inode != self._folder_inode:
            reason = "recreated" if inode != self._folder_inode else "readable again"
            self._folder_lost, self._folder_inode = False, inode
            mode = self.watcher.rearm() if self.watcher is not None else "none"
            log.event("folder_back", "warning", folder=self.folder, reason=reason, observer=mode)
        return listing

    def _remnants(self, look: Look, listing: Mapping[str, Entry], now: float) -> dict[str, Sighting]:
        """Finish files of recorded stacks met again (see `remnants`): a result's at once, an
        error's when its stack stays incomplete. Returns what was seen of the waiting files."""
        assert self.remnants is not None
        waiting = [
            n for group in (look.pending, look.overdue) for names in group.values() for n in names.values()
        ]
        written = {n: listing[n] for n in waiting if n in listing and self.tracker.written(n, now)}
        try:
            sightings = self.remnants.inspect(written)
        except (StateError, OSError) as exc:
            log.event("remnant_check_failed", "warning", error=exc)
            return {}
        finish = [
            n for names in look.pending.values() for n in names.values()
            if n in sightings and (r := sightings[n].recorded) is not None and r.outcome == "result"
        ]  # fmt: skip
        for stack_id, names in list(look.overdue.items()):
            found = [sightings.get(n) for n in names.values()]
            if all(s is not None and s.recorded is not None for s in found):
                finish += names.values()  # every file of an answered stack: no new error for it
                del look.overdue[stack_id]
        for name in finish:
            if self._remnant_retry.get(name, 0.0) > now:
                continue
            recorded = sightings[name].recorded
            assert recorded is not None
            disposal = self.disposer.finish_remnant(name, recorded.outcome)
            if disposal.error is not None:
                self._remnant_retry[name] = now + self.move_retry
                log.event(
                    "move_failed",
                    "error",
                    file=name,
                    target=disposal.target,
                    error=disposal.error.strerror or disposal.error,
                    retry_s=self.move_retry,
                )
                continue
            self._remnant_retry.pop(name, None)
            self.tracker.forget([name])
            self.remnants.forget([name])
            self.book.left.update(disposal.left)
            log.event(
                "remnant_finished",
                stack=recorded.stack_id,
                file=name,
                target=disposal.target,
                msg_id=recorded.msg_id,
            )
        return sightings

    def _take_deliveries(self) -> None:
        """Acknowledgements the drainer reported since the last look."""
        while True:
            try:
                msg_id, at = self._delivered.get_nowait()
            except queue.Empty:
                return
            seconds = self.book.published(msg_id, at)
            if seconds is not None:
                self.stats.delivered(seconds)

    # Analysis ---------------------------------------------------------------------------
    def _analyse(self, ready: list[StackLife], listing: Mapping[str, Entry]) -> None:
        """Count an attempt for each stack, set aside those the process died on twice, then
        decode ahead and run the models; failures not about the stack go to the breaker."""
        assert self.decoder is not None
        assert self.recorder is not None
        if not ready:
            return
        for life in ready:
            life.entries = {n: listing[n] for n in life.names.values() if n in listing}
        signatures = {life.stack_id: _signature(life) for life in ready}
        try:
            before = self.recorder.ledger.attempts_started(signatures)
        except StateError as exc:
            self._state_trouble("state_write_failed", exc, self.clock())
            return  # the stacks stay complete and are taken again after the pause
        todo = []
        for life in ready:
            if before[life.stack_id] >= CRASH_LIMIT:
                self.book.analysed(life.stack_id, life.names, self._crashed(life, before[life.stack_id]))
            else:
                todo.append(life)
        for life, prepared in self.decoder.map(self._prepare, todo):
            crashpoint.reach("after_decode")
            analysis = self._infer(prepared) if isinstance(prepared, Prepared) else prepared
            key = f"{life.stack_id}:{signatures[life.stack_id]}"
            if isinstance(analysis, Unexpected):
                self._unexpected(life, key, analysis)
            elif self._still_changing(life, analysis):
                continue
            else:
                self.breaker.succeeded(key)
                self._changing.pop(life.stack_id, None)
                self.book.analysed(life.stack_id, life.names, analysis)

    def _still_changing(self, life: StackLife, analysis: Analysis) -> bool:
        """A file that changed while it was read is still being written, not bad: the stack is
        looked at again once it settles; a file that never stops changing fails after a while."""
        if analysis.kind != "failed" or analysis.document.get("code") != "changed":
            return False
        tries = self._changing[life.stack_id] = self._changing.get(life.stack_id, 0) + 1
        if tries > CHANGING_TRIES:
            return False
        now = self.clock()
        self.book.deferred(life.stack_id, now + self.config.watch.settle_seconds)
        log.event(
            "stack_changing",
            "warning",
            stack=life.stack_id,
            message=analysis.document["message"],
            retry_s=self.config.watch.settle_seconds,
        )
        self._attempt_ended(life.stack_id, now)
        return True

    def _unexpected(self, life: StackLife, key: str, failure: Unexpected) -> None:
        """Tried again after a pause, a few times; then it fails for good (see `breaker`)."""
        assert self.pipeline is not None
        assert self.recorder is not None
        now = self.clock()
        retry_at = self.breaker.failed(key, now)
        if retry_at is None:
            code = "decode_failed" if failure.stage == "decode" else "inference_failed"
            error = StackError(code, f"{failure.stage} failed on every attempt: {failure.error!r}")
            self.book.analysed(
                life.stack_id,
                life.names,
                self.pipeline.failure(life.stack_id, self._paths(life.names), error),
            )
            return
        self.book.deferred(life.stack_id, retry_at)
        log.event(
            "analysis_deferred",
            "warning",
            stack=life.stack_id,
            stage=failure.stage,
            error=repr(failure.error),
            retry_s=round(retry_at - now, 1),
        )
        self._attempt_ended(life.stack_id, now)

    def _attempt_ended(self, stack_id: str, now: float) -> None:
        """The stack goes back to waiting: its attempt ended without a crash."""
        assert self.recorder is not None
        try:
            self.recorder.ledger.attempts_ended([stack_id])
        except StateError as exc:
            self._state_trouble("state_write_failed", exc, now)

    def _check_breaker(self, now: float) -> None:
        """Tell the world when the agent stops and starts taking stacks."""
        degraded = self.breaker.degraded(now)
        if degraded and self.stats.degraded is None:
            reason = f"analysis failed on {self.breaker.threshold} stacks in a row"
            log.event("agent_degraded", "error", reason=reason, pause_s=self.breaker.pause)
            self._set_degraded(reason)
        elif not degraded and self.stats.degraded is not None and self._state_failing is None:
            log.event("agent_resumed", "warning")
            self._set_degraded(None)

    def _crashed(self, life: StackLife, deaths: int) -> Analysis:
        assert self.pipeline is not None
        error = StackError(
            "crashed",
            f"the agent died {deaths} times while analysing stack {life.stack_id!r} (out of memory or a "
            "runtime crash); set aside so that it cannot stop the service",
        )
        return self.pipeline.failure(life.stack_id, self._paths(life.names), error)

    def _paths(self, names: Mapping[str, str]) -> dict[str, Path]:
        return {channel: self.folder / name for channel, name in names.items()}

    def _prepare(self, life: StackLife) -> Prepared | Analysis | Unexpected:
        assert self.pipeline is not None
        try:
            return self.pipeline.prepare(life.stack_id, self._paths(life.names))
        except Exception as exc:  # one stack must not stop the agent, whatever it holds
            return Unexpected(exc, "decode")

    def _infer(self, ready: Prepared) -> Analysis | Unexpected:
        assert self.pipeline is not None
        try:
            return self.pipeline.infer(ready)
        except Exception as exc:  # a model or runtime failure must not stop the agent
            return Unexpected(exc, "inference")

    def _quarantine(self, stack_id: str, names: Mapping[str, str], changed: list[str]) -> Analysis:
        assert self.pipeline is not None
        missing = [c for c in CHANNELS if c not in names]
        if changed:
            error = StackError(
                "changed_after_read",
                f"{', '.join(sorted(changed))} changed after stack {stack_id!r} was analysed and its other "
                "files were filed; the new bytes were not analysed (copy the whole stack in again)",
                self.folder,
            )
        else:
            reason = (
                f"lacks channel(s) {', '.join(missing)}" if missing else "channel files still being written"
            )
            error = StackError(
                "incomplete",
                f"stack {stack_id!r} {reason} after {self.config.watch.incomplete_timeout:g} s",
                self.folder,
            )
        return self.pipeline.failure(stack_id, self._paths(names), error, kind="quarantined")

    def _unsafe_name(self, name: str, channel: str) -> tuple[str, Analysis]:
        """A channel file whose name cannot give a stack id: moved to failed/ under its own name."""
        assert self.pipeline is not None
        stack_id = f"unsafe-{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"
        error = StackError(
            "unsafe_name",
            f"file name {name!r} cannot name a stack (only letters, digits and ._+=@,- are allowed in ids)",
            self.folder,
        )
        return stack_id, self.pipeline.failure(stack_id, {channel: self.folder / name}, error)

    # Recording --------------------------------------------------------------------------
    def _record(self) -> None:
        """One transaction for the batch's new answers; stacks the ledger knows are not written twice."""
        assert self.recorder is not None
        lives = self.book.to_record()
        if not lives:
            return
        try:
            known = {life.stack_id for life in lives if self.recorder.known(self._analysis(life))}
            new = [life for life in lives if life.stack_id not in known]
            self.recorder.commit([self._analysis(life) for life in new])
            if known:
                self.recorder.ledger.attempts_ended(known)
        except StateError as exc:
            self._state_trouble("state_write_failed", exc, self.clock())
            for life in lives:
                self.book.record_failed(life.stack_id)  # files stay where they are; seen afresh later
            return
        self._state_fine()
        crashpoint.reach("after_commit")
        assert self.remnants is not None
        self.remnants.recorded_again()
        if self.drainer is not None and new:
            self.drainer.kick()
        for life in new:
            self.book.recorded(life.stack_id)
            self._report(self._analysis(life))
        for life in lives:
            if life.stack_id in known:
                self.book.recorded(life.stack_id, duplicate=True)
                self.stats.count("duplicates")
                analysis = self._analysis(life)
                log.event(
                    "stack_duplicate",
                    stack=life.stack_id,
                    msg_id=analysis.msg_id,
                    files=analysis.files_sha256[:16],
                )

    @staticmethod
    def _analysis(life: StackLife) -> Analysis:
        assert life.analysis is not None
        return life.analysis

    def _report(self, analysis: Analysis) -> None:
        document = analysis.document
        if analysis.kind == "result":
            self.stats.count("processed", float(document["total_ms"]))
            log.event(
                "stack_done",
                stack=analysis.stack_id,
                labels="|".join(document["labels"]) or "-",
                ms=document["total_ms"],
                msg_id=analysis.msg_id,
            )
        else:
            self.stats.count(analysis.kind)
            log.event(
                f"stack_{analysis.kind}",
                "error",
                stack=analysis.stack_id,
                code=document["code"],
                message=document["message"],
                msg_id=analysis.msg_id,
            )

    # Disposal ---------------------------------------------------------------------------
    def _dispose(self, now: float) -> None:
        """Move, delete or leave the files of recorded stacks; a failure is retried after a pause."""
        for life in self.book.to_dispose(now):
            disposal = self.disposer.dispose(self._analysis(life), life.names, life.entries)
            for name in disposal.changed:
                log.event(
                    "file_changed_after_read",
                    "warning",
                    stack=life.stack_id,
                    file=name,
                    action="left in the folder; analysed again with a whole new stack, else quarantined",
                )
            for name in disposal.stranded:
                log.event(
                    "file_changed_while_moved",
                    "warning",
                    stack=life.stack_id,
                    file=name,
                    target=disposal.target,
                    action="its new bytes were moved with the stack and could not be put back",
                )
            if disposal.error is not None:
                exc = disposal.error
                log.event(
                    "move_failed",
                    "error",
                    stack=life.stack_id,
                    target=disposal.target,
                    error=exc.strerror or exc,
                    retry_s=self.move_retry,
                )
                self.book.dispose_failed(life.stack_id, now + self.move_retry)
                continue
            self.tracker.forget(life.names.values())
            if self.remnants is not None:
                self.remnants.forget(life.names.values())
            seconds = self.book.disposed(life.stack_id, now, disposal.left)
            if seconds is not None:
                self.stats.delivered(seconds)

    # Health -----------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Both working threads turned recently: what keeps the systemd watchdog fed."""
        interval = self.notifier.watchdog_interval or float("inf")
        now = time.monotonic()
        loop_ok = now - self.heartbeat < interval / 2
        drainer_ok = self.drainer is None or (
            self.drainer.is_alive() and now - self.drainer.beat < interval / 2
        )
        return loop_ok and drainer_ok

    def status_line(self) -> str:
        return self.stats.status_line(self.drainer is not None and self.drainer.connected)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _signature(life: StackLife) -> str:
    """Which files an attempt was about (names, sizes, times): other files, a fresh count."""
    text = "\n".join(f"{name}:{e.size}:{e.mtime_ns}" for name, e in sorted(life.entries.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
