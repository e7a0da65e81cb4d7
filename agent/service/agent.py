"""The agent: watch the folder, analyse complete stacks, record, move files, publish.

One process, a few threads: this loop (look at the folder, analyse, record, dispose), the
decode threads (the next stacks, while the models run), the watchdog observer (events that
wake the loop early) and the drainer (owns the outbox's sending side and the MQTT client).
Every stack moves through the lifecycle book (`lifecycle`), and the order is fixed, which is
what makes "nothing lost" hold:
  analyse -> one transaction: ledger rows + outbox rows -> move/delete the files -> publish.
A crash before the commit redoes the stacks; after it, the ledger recognises them and only
the file moves are redone. A stack that cannot be read goes to failed/ with
`<id>.error.json`; one still incomplete after `watch.incomplete_timeout` goes to quarantine/.

The collaborators each do one job: `Tracker` (when files are written), `StackBook` (where
every stack stands), `Decoder` (decode ahead), `Pipeline` (one stack -> an analysis),
`Recorder` (the transaction), `Disposer` (the files), `Drainer` + `MqttSink` (the broker),
`Stats` (counters). This class wires them and runs the loop.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.model.bundle import Bundle, BundleError, load_bundle
from agent.model.pipeline import Analysis, Pipeline, Prepared
from agent.service import log
from agent.service.config import Config, is_set
from agent.service.decoding import Decoder
from agent.service.disposal import Disposer
from agent.service.drainer import Drainer, DrainSettings
from agent.service.lifecycle import StackBook, StackLife
from agent.service.notify import Notifier, Watchdog
from agent.service.recorder import Recorder
from agent.service.sinks.mqtt import MqttSink
from agent.service.state import Ledger, StateError
from agent.service.stats import Stats
from agent.service.tracker import Entry, Tracker
from agent.service.watcher import Watcher, list_folder
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS

STATE_RETRY_SECONDS = 5.0
MOVE_RETRY_SECONDS = 10.0  # a stack whose files could not be moved is left alone this long


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
        self.stats = Stats(self.instrument)
        self._bundle = bundle
        self._delivered: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.pipeline: Pipeline | None = None
        self.recorder: Recorder | None = None
        self.drainer: Drainer | None = None
        self.watcher: Watcher | None = None
        self.decoder: Decoder | None = None
        self.notifier = notifier or Notifier()
        self.watchdog: Watchdog | None = None
        self.heartbeat = time.monotonic()  # last turn of the loop: the systemd watchdog's sign of progress

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
                bundle = load_bundle(self.config.bundle.path, threads=self.config.bundle.threads)
            except BundleError as exc:
                raise StartError(f"bundle refused: {exc}") from None
        self.pipeline = Pipeline(bundle, self.instrument, self.config.limits(), self.config.stack.bits)
        self.stats.purpose = bundle.purpose
        self.decoder = Decoder()
        try:
            self.recorder = Recorder(Ledger(self.config.state.database))
        except StateError as exc:
            raise StartError(str(exc)) from None
        self.drainer = self._drainer(self.stats)
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
        sink = MqttSink(
            self.config.broker(), self.config.client_id, self.config.topic_prefix, mqtt.max_inflight
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
            polling = self.watcher.mode == "polling" or self.book.waiting
            wait = self.config.watch.poll_interval if polling else self.config.watch.rescan_interval
            retry = self.book.next_retry()  # a failed move is tried again on time, not at the next rescan
            if retry is not None:
                wait = min(wait, max(retry - self.clock(), 0.0))
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
        try:
            listing = dict(self.lister(self.folder))
        except OSError as exc:
            log.event("folder_unreadable", "error", folder=self.folder, error=exc.strerror or exc)
            return False
        for name in self.book.hidden(listing):
            listing.pop(name, None)
        look = self.tracker.look(listing, now)
        self.book.observe(look, now)
        for stack_id, names in look.overdue.items():
            if self.book.accepts(stack_id):  # not while an earlier stack of that id is still in hand
                self.book.analysed(stack_id, names, self._quarantine(stack_id, names))
        for name, channel in look.unsafe.items():
            stack_id, analysis = self._unsafe_name(name, channel)
            if self.book.accepts(stack_id):
                self.book.analysed(stack_id, {channel: name}, analysis)
        ready = self.book.ready(self.config.state.batch)
        self._analyse(ready)
        self._record()
        self._dispose(self.clock())
        self.stats.waiting = self.book.waiting
        return len(ready) == self.config.state.batch

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
    def _analyse(self, ready: list[StackLife]) -> None:
        assert self.decoder is not None
        for life, prepared in self.decoder.map(self._prepare, ready):
            analysis = self._infer(prepared) if isinstance(prepared, Prepared) else prepared
            self.book.analysed(life.stack_id, life.names, analysis)

    def _paths(self, names: Mapping[str, str]) -> dict[str, Path]:
        return {channel: self.folder / name for channel, name in names.items()}

    def _prepare(self, life: StackLife) -> Prepared | Analysis:
        assert self.pipeline is not None
        paths = self._paths(life.names)
        try:
            return self.pipeline.prepare(life.stack_id, paths)
        except Exception as exc:  # one stack must not stop the agent, whatever it holds
            error = StackError("decode_failed", f"reading failed unexpectedly: {exc!r}")
            return self.pipeline.failure(life.stack_id, paths, error)

    def _infer(self, ready: Prepared) -> Analysis:
        assert self.pipeline is not None
        try:
            return self.pipeline.infer(ready)
        except Exception as exc:  # a model or runtime failure on one stack must not stop the agent
            error = StackError("inference_failed", f"analysis failed: {exc!r}")
            return self.pipeline.failure(ready.stack.stack_id, ready.stack.paths, error)

    def _quarantine(self, stack_id: str, names: Mapping[str, str]) -> Analysis:
        assert self.pipeline is not None
        missing = [c for c in CHANNELS if c not in names]
        reason = f"lacks channel(s) {', '.join(missing)}" if missing else "channel files still being written"
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
        known = {life.stack_id for life in lives if self.recorder.known(self._analysis(life))}
        new = [life for life in lives if life.stack_id not in known]
        try:
            self.recorder.commit([self._analysis(life) for life in new])
        except StateError as exc:
            log.event("state_write_failed", "error", error=exc, stacks=len(new), retry_s=STATE_RETRY_SECONDS)
            for life in lives:
                self.book.record_failed(life.stack_id)  # files stay where they are; seen afresh later
            self.stop_event.wait(STATE_RETRY_SECONDS)
            return
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
            disposal = self.disposer.dispose(self._analysis(life), life.names)
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
