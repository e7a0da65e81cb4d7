"""The MQTT sink: sends outbox rows to a broker with QoS 1 and reports each PUBACK.

A fresh paho client per connection (paho would otherwise replay unacknowledged messages from
memory; the outbox on disk is the only backlog). After each connect it publishes `status`
"online" (retained), with "offline" as the last will; `close(goodbye=True)` publishes
"offline" itself, because the broker sends the will only when a link is lost. When the broker
accepts a result, the same payload goes to `latest` (retained), so `latest` only ever shows
results the broker took.

Answers: a success PUBACK is ACCEPTED. Under MQTT 5 a failure reason code is REJECTED (not
authorized, topic name invalid, payload format invalid, and every code not known to pass),
except the codes that describe a passing condition of the broker, which are RETRY: the
drainer sends the row again after a growing pause, a bounded number of times, then rejects it
with the last reason. Unknown failure codes count as permanent because a wrong guess the other
way re-sends a refused message for ever. A 3.1.1 broker acknowledges refused messages as if
delivered: nothing to report.

Home Assistant discovery (`agent.service.homeassistant`): after each connect the sink
publishes the retained discovery message (or an empty one, which removes the device, when
switched off) and, when on, subscribes to Home Assistant's birth topic, the one topic it
subscribes to, to publish the discovery again when Home Assistant restarts. `stats` is
retained, so a dashboard that joins late shows counters at once.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

from agent.model import messages
from agent.service import log
from agent.service.mqtt_client import Broker, Will, make_client
from agent.service.outbox import Row
from agent.service.sinks import Answer, SinkUnavailableError, Verdict

# MQTT 5 PUBACK reason codes that say "not now" rather than "never".
TRANSIENT_CODES = frozenset(
    {
        0x80,  # unspecified error: the broker did not say why (an overloaded broker, a plugin's hiccup)
        0x83,  # implementation specific error: the same, from the broker's own code
        0x91,  # packet identifier in use: a clash on the link, gone once the old one is acknowledged
        0x97,  # quota exceeded: the broker's rate or size quota, which refills
    }
)


def verdict_of(code: int) -> Verdict:
    """What an MQTT 5 PUBACK reason code means for the row it answers."""
    if code < 0x80:
        return Verdict.ACCEPTED  # 0x00 success, 0x10 no matching subscribers: the broker took it
    return Verdict.RETRY if code in TRANSIENT_CODES else Verdict.REJECTED


class MqttSink:
    def __init__(
        self,
        broker: Broker,
        client_id: str,
        prefix: str,
        max_inflight: int,
        discovery: tuple[str, bytes] | None = None,
        birth_topic: str | None = None,
    ) -> None:
        self.broker = broker
        self.discovery = discovery  # (topic, payload); an empty payload removes the device
        self.birth_topic = birth_topic
        self.client_id = client_id
        self.prefix = prefix
        self.max_inflight = max_inflight
        self.connected = False
        self._client: Any = None
        self._answers: list[Answer] = []
        self._results: dict[int, bytes] = {}  # mid -> payload of a results row in flight

    @property
    def name(self) -> str:
        return f"mqtt://{self.broker.address}"

    @property
    def ready(self) -> bool:
        return self._client is not None and self.connected

    def connect(self) -> None:
        client = make_client(
            self.broker,
            client_id=self.client_id,
            will=Will(messages.topic(self.prefix, "status"), messages.OFFLINE),
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(self.max_inflight * 2 + 2)  # results + latest
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise SinkUnavailableError(str(exc) or repr(exc)) from None
        self._client = client

    def send(self, row: Row) -> int | None:
        import paho.mqtt.client as mqtt

        if row.kind == "thumbnail":  # the newest picture, retained, typed for MQTT 5 consumers
            info = self._client.publish(
                messages.topic(self.prefix, row.kind), row.payload, qos=1, retain=True,
                properties=self._image_properties(),
            )  # fmt: skip
        else:
            info = self._client.publish(messages.topic(self.prefix, row.kind), row.payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        if row.kind == "results":
            self._results[info.mid] = row.payload
        return int(info.mid)

    def _image_properties(self) -> Any:
        if self.broker.protocol != "5":
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = "image/jpeg"
        return properties

    def wake(self) -> None:
        """Any thread: end the current `poll` early. paho wakes its own select through this
        socket pair when another thread publishes; a byte on it does the same here."""
        pair = getattr(self._client, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(OSError):
                pair.send(b"0")

    def poll(self, timeout: float) -> list[Answer]:
        import paho.mqtt.client as mqtt

        if self._client is None:
            raise SinkUnavailableError("not connected")
        rc = self._client.loop(timeout=timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._drop()
            raise SinkUnavailableError(mqtt.error_string(rc))
        answers, self._answers = self._answers, []
        return answers

    def send_stats(self, payload: bytes) -> None:
        if self.ready:
            self._client.publish(messages.topic(self.prefix, "stats"), payload, qos=0, retain=True)

    def send_status(self, payload: bytes) -> None:
        if self.ready:
            self._client.publish(messages.topic(self.prefix, "status"), payload, qos=1, retain=True)

    def close(self, goodbye: bool) -> None:
        if goodbye and self.ready:
            self._goodbye()
        self._drop()

    # paho callbacks (run inside poll, on the drainer's thread) ----------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.event("mqtt_refused", "error", broker=self.broker.address, reason=str(reason))
            return  # the broker closes the link; poll() then reports it and the drainer backs off
        self.connected = True
        client.publish(messages.topic(self.prefix, "status"), messages.ONLINE, qos=1, retain=True)
        self._announce(client)
        if self.birth_topic is not None and self.discovery is not None and self.discovery[1]:
            client.subscribe(self.birth_topic, qos=1)
        log.event("mqtt_connected", broker=self.broker.address, protocol=self.broker.protocol)

    def _announce(self, client: Any) -> None:
        if self.discovery is not None:
            topic, payload = self.discovery
            client.publish(topic, payload, qos=1, retain=True)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        """Home Assistant's birth message: it may have forgotten the device, so say it again."""
        if message.topic == self.birth_topic and message.payload == b"online":
            self._announce(client)
            log.event("homeassistant_discovery_sent", topic=self.discovery[0] if self.discovery else "")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        payload = self._results.pop(mid, None)
        verdict = verdict_of(reason.value)
        if verdict != Verdict.ACCEPTED:
            self._answers.append(Answer(mid, verdict, f"{reason} ({reason.value})"))
            return
        self._answers.append(Answer(mid, Verdict.ACCEPTED))
        if payload is not None:  # latest = the newest result the broker accepted
            client.publish(messages.topic(self.prefix, "latest"), payload, qos=1, retain=True)

    def _goodbye(self) -> None:
        info = self._client.publish(
            messages.topic(self.prefix, "status"), messages.OFFLINE, qos=1, retain=True
        )
        import time

        deadline = time.monotonic() + 2.0
        while not info.is_published() and time.monotonic() < deadline:
            if self._client.loop(timeout=0.05) != 0:
                break

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.disconnect()
                self._client.loop(timeout=0.01)
            except Exception:
                pass
            self._client = None
        self.connected = False
        self._results.clear()
        self._answers.clear()
