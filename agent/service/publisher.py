"""The one thread that owns the MQTT client and drains the outbox.

paho-mqtt is not reliably thread-safe, so this thread alone creates, drives (`loop()`) and
closes the client; every paho callback runs here too. Other threads only `kick()` it.

- A fresh client per connection: paho keeps unacknowledged messages in memory and would
  replay them on its own; here the outbox on disk is the only backlog, so after a reconnect
  the oldest pending rows are simply sent again (consumers de-duplicate by `msg_id`).
- At most `mqtt.max_inflight` outbox rows are unacknowledged at once; a row is deleted when
  the broker's PUBACK carries a success code and marked rejected when it carries a failure
  (MQTT 5 only: a 3.1.1 broker acknowledges refused messages as if delivered).
- Connection failures back off from `reconnect_min` to `reconnect_max` seconds (doubling,
  with jitter); a silent connection is detected by paho's keepalive.
- `status` is "online" (retained) after each connect and "offline" as the last will; a clean
  shutdown publishes "offline" itself because the broker sends the will only on a lost link.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.model import messages
from agent.service import log
from agent.service.config import Config, is_set
from agent.service.outbox import Outbox, Row
from agent.service.state import StateError


class Publisher(threading.Thread):
    def __init__(self, config: Config, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(name="mqtt-publisher", daemon=True)
        self.config = config
        self.mqtt = config.mqtt
        self.prefix = config.topic_prefix
        self.stats_source = stats
        self.connected = False
        self.sent = 0
        self.rejected = 0
        self.inflight: dict[int, Row] = {}
        self._kick = threading.Event()
        self._stop_request = threading.Event()
        self._flush_until = 0.0
        self._client: Any = None
        self._outbox: Outbox | None = None
        self._backoff = self.mqtt.reconnect_min
        self._next_attempt = 0.0
        self._more = True
        self._next_stats = time.monotonic() + self.mqtt.stats_interval
        self._password = config.password()
        self.failure: BaseException | None = None
        self.beat = time.monotonic()  # last turn of this thread's loop, for the systemd watchdog

    # Called from other threads ------------------------------------------------------------
    def kick(self) -> None:
        """New rows are in the outbox."""
        self._kick.set()

    def shutdown(self, flush_seconds: float | None = None) -> None:
        """Deliver what the broker takes within `flush_seconds`, publish offline, disconnect."""
        flush = self.mqtt.flush_seconds if flush_seconds is None else flush_seconds
        self._flush_until = time.monotonic() + flush
        self._stop_request.set()
        self._kick.set()
        self.join(timeout=flush + 10)

    # The publisher thread -----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._outbox = Outbox(self.config.state.database)
            while True:
                self.beat = time.monotonic()
                if self._stop_request.is_set() and self._drained_or_late():
                    break
                if self._client is None:
                    self._try_connect()
                    continue
                self._step()
            self._goodbye()
        except BaseException as exc:  # surfaced to the service, which exits non-zero
            self.failure = exc
            log.event("publisher_failed", "error", error=repr(exc))
        finally:
            self._drop_client()
            if self._outbox is not None:
                self._outbox.close()

    def _drained_or_late(self) -> bool:
        if time.monotonic() >= self._flush_until or not self.connected:
            return True
        assert self._outbox is not None
        return not self.inflight and self._outbox.depth()["pending"] == 0

    def _try_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            self._kick.wait(min(self._next_attempt - now, 0.25))
            self._kick.clear()
            return
        client = self._new_client()
        try:
            client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive)
        except (OSError, ssl.SSLError) as exc:
            self._retry_later("connect_failed", exc)
            return
        self._client = client

    def _new_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self.mqtt.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(self.mqtt.max_inflight * 2 + 2)  # results + latest
        client.max_queued_messages_set(0)
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self._password)
        if self.mqtt.tls:
            client.tls_set(
                ca_certs=str(self.mqtt.ca_file) if is_set(self.mqtt.ca_file) else None,
                certfile=str(self.mqtt.cert_file) if is_set(self.mqtt.cert_file) else None,
                keyfile=str(self.mqtt.key_file) if is_set(self.mqtt.key_file) else None,
            )
        client.will_set(messages.topic(self.prefix, "status"), messages.OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.event("mqtt_refused", "error", broker=self._broker(), reason=str(reason))
            return  # the broker closes the link; loop() then reports it and we back off
        self.connected = True
        self._backoff = self.mqtt.reconnect_min
        self._more = True
        client.publish(messages.topic(self.prefix, "status"), messages.ONLINE, qos=1, retain=True)
        log.event("mqtt_connected", broker=self._broker(), protocol=self.mqtt.protocol)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        row = self.inflight.pop(mid, None)
        if row is None:
            return  # status, latest or stats: not from the outbox
        assert self._outbox is not None
        self._more = True
        if reason.is_failure:
            self._outbox.rejected(row.seq, str(reason))
            self.rejected += 1
            log.event("mqtt_rejected", "error", topic=self._topic(row), msg_id=row.msg_id, reason=str(reason))
            return
        self._outbox.acknowledged(row.seq)
        self.sent += 1
        if row.kind == "results":  # latest = the newest result the broker accepted
            client.publish(messages.topic(self.prefix, "latest"), row.payload, qos=1, retain=True)

    def _step(self) -> None:
        import paho.mqtt.client as mqtt

        rc = self._client.loop(timeout=0.05)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._retry_later("connection_lost", mqtt.error_string(rc))
            return
        if not self.connected:
            return
        if self._kick.is_set():
            self._kick.clear()
            self._more = True
        if self._more and len(self.inflight) < self.mqtt.max_inflight:
            self._fill()
        if self.mqtt.stats_interval and time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + self.mqtt.stats_interval
            self.publish_stats()

    def _fill(self) -> None:
        import paho.mqtt.client as mqtt

        assert self._outbox is not None
        room = self.mqtt.max_inflight - len(self.inflight)
        try:
            rows = self._outbox.next_rows(room, skip={r.seq for r in self.inflight.values()})
        except StateError as exc:
            log.event("outbox_unreadable", "error", error=exc)
            return
        self._more = len(rows) == room
        for row in rows:
            info = self._client.publish(self._topic(row), row.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._more = True
                return
            self.inflight[info.mid] = row

    def outbox_depth(self) -> dict[str, int]:
        """Pending and rejected rows (publisher thread only: the outbox connection is its own)."""
        assert self._outbox is not None
        return self._outbox.depth()

    def publish_stats(self) -> None:
        if self.stats_source is None or self._client is None:
            return
        document = self.stats_source()
        self._client.publish(messages.topic(self.prefix, "stats"), messages.encode(document), qos=0)

    def _goodbye(self) -> None:
        """Publish offline ourselves (a clean disconnect suppresses the will) and disconnect."""
        if self._client is None or not self.connected:
            return
        info = self._client.publish(
            messages.topic(self.prefix, "status"), messages.OFFLINE, qos=1, retain=True
        )
        deadline = time.monotonic() + 2.0
        while not info.is_published() and time.monotonic() < deadline:
            if self._client.loop(timeout=0.05) != 0:
                break
        self._client.disconnect()
        self._client.loop(timeout=0.05)
        log.event("mqtt_offline", broker=self._broker(), pending=len(self.inflight))

    def _retry_later(self, why: str, error: object) -> None:
        self._drop_client()
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_attempt = time.monotonic() + delay
        log.event(f"mqtt_{why}", "warning", broker=self._broker(), error=error, retry_s=round(delay, 1))
        self._backoff = min(self._backoff * 2, self.mqtt.reconnect_max)

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.disconnect()
                self._client.loop(timeout=0.01)
            except Exception:
                pass
            self._client = None
        self.connected = False
        self.inflight.clear()  # unacknowledged rows are still pending in the outbox

    def _topic(self, row: Row) -> str:
        return messages.topic(self.prefix, row.kind)

    def _broker(self) -> str:
        return f"{self.mqtt.host}:{self.mqtt.port}"
