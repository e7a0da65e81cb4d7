"""Home Assistant MQTT discovery: the instrument appears in Home Assistant as one device, no YAML.

One retained message on `<discovery>/device/<object id>/config` in Home Assistant's
device-based discovery format (`dev`, `o`, `cmps`, shared availability) describes every
entity: the last stack's labels (a short state; labels, scores, the review flag and the
stack id as attributes), whether it wants review, the last error code, the agent's status
(online / degraded / offline) and a connectivity sensor, counters and latencies from the
stats message. Entities read the agent's own topics (`latest` and `stats`, both retained,
`errors`, `status`), so nothing is published twice.

Home Assistant forgets discovery when it restarts without a persistent broker; it then
publishes `online` on `<discovery>/status` (its birth message), and the sink answers by
publishing the configuration again. Switched off, the agent publishes an empty retained
message on the same topic, which removes the device.

Pure: `discovery()` returns the topic and the payload; the MQTT sink publishes them.
"""

from __future__ import annotations

import json
import re

import agent

# A Home Assistant state is at most 255 characters; the labels of a stack can be longer.
STATE_LIMIT = 250

# Availability: 'degraded' is still there (connected, taking no stacks), only 'offline' is not.
_AVAILABLE = "{{ 'offline' if value == 'offline' else 'online' }}"

# (component id, platform, name, state topic, value template, extra options)
_STATS = (
    ("processed", "Stacks processed", "total_increasing", None),
    ("failed", "Stacks failed", "total_increasing", None),
    ("quarantined", "Stacks quarantined", "total_increasing", None),
    ("waiting_stacks", "Stacks waiting", "measurement", None),
    ("outbox_pending", "Messages waiting", "measurement", None),
    ("latency_p50_ms", "Analysis time (median)", "measurement", "ms"),
    ("delivery_p50_ms", "Delivery time (median)", "measurement", "ms"),
)


def _joined(field: str, empty: str) -> str:
    """A list field of the result as one short state: joined, `empty` when there is none."""
    return "{{ (value_json.%s | join(', ') or '%s')[:%d] }}" % (field, empty, STATE_LIMIT)  # noqa: UP031


def object_id(instrument: str) -> str:
    """The instrument's name as Home Assistant ids and topics take it: [a-z0-9_], never empty."""
    safe = re.sub(r"[^a-z0-9_]+", "_", instrument.lower()).strip("_")
    return safe or "instrument"


def topic(discovery_prefix: str, instrument: str) -> str:
    return f"{discovery_prefix}/device/hpa_edge_{object_id(instrument)}/config"


def birth_topic(discovery_prefix: str) -> str:
    return f"{discovery_prefix}/status"


def discovery(discovery_prefix: str, instrument: str, prefix: str) -> tuple[str, bytes]:
    """The retained discovery message of one instrument whose agent publishes under `prefix`."""
    oid = f"hpa_edge_{object_id(instrument)}"
    latest, stats, status, errors = (f"{prefix}/{t}" for t in ("latest", "stats", "status", "errors"))
    components: dict[str, dict[str, object]] = {
        "labels": {
            "p": "sensor",
            "name": "Last stack",
            "state_topic": latest,
            "value_template": "{{ (value_json.labels | join(', ') or 'no label')[:"
            + str(STATE_LIMIT)
            + "] }}",
            "json_attributes_topic": latest,
            "json_attributes_template": (
                "{{ {'stack_id': value_json.stack_id, 'labels': value_json.labels,"
                " 'scores': value_json.scores, 'review': value_json.review,"
                " 'review_reasons': value_json.review_reasons, 'near_threshold': value_json.near_threshold,"
                " 'msg_id': value_json.msg_id, 'time': value_json.time} | tojson }}"
            ),
            "icon": "mdi:microscope",
        },
        "review": {
            "p": "sensor",
            "name": "Review",
            "state_topic": latest,
            "value_template": "{{ (value_json.review_reasons | join(', ') or 'ok')[:"
            + str(STATE_LIMIT)
            + "] }}",
            "icon": "mdi:account-eye",
        },
        "last_error": {
            "p": "sensor",
            "name": "Last error",
            "state_topic": errors,
            "value_template": "{{ value_json.code }}",
            "json_attributes_topic": errors,
            "json_attributes_template": (
                "{{ {'stack_id': value_json.stack_id, 'message': value_json.message,"
                " 'moved_to': value_json.moved_to} | tojson }}"
            ),
            "icon": "mdi:alert-circle-outline",
        },
        "status": {
            "p": "sensor",
            "name": "Agent status",
            "state_topic": status,
            "icon": "mdi:list-status",
        },
        "connectivity": {
            "p": "binary_sensor",
            "name": "Agent",
            "device_class": "connectivity",
            "state_topic": status,
            "value_template": _AVAILABLE,
            "payload_on": "online",
            "payload_off": "offline",
        },
    }
    for field, name, state_class, unit in _STATS:
        component: dict[str, object] = {
            "p": "sensor",
            "name": name,
            "state_topic": stats,
            "value_template": "{{ value_json." + field + " }}",
            "state_class": state_class,
        }
        if unit:
            component["unit_of_measurement"] = unit
        components[field] = component
    for key, component in components.items():
        component["unique_id"] = f"{oid}_{key}"
        if key not in ("status", "connectivity"):  # those two show the agent being away
            component["availability"] = [
                {"topic": status, "value_template": _AVAILABLE, "payload_available": "online",
                 "payload_not_available": "offline"}
            ]  # fmt: skip
    document = {
        "dev": {
            "ids": [oid],
            "name": f"hpa-edge {instrument}",
            "mf": "hpa-edge",
            "mdl": "protein location agent",
            "sw": agent.__version__,
        },
        "o": {"name": "hpa-edge", "sw": agent.__version__, "url": "https://github.com/hpa-edge/hpa-edge"},
        "cmps": components,
        "qos": 1,
    }
    return topic(discovery_prefix, instrument), json.dumps(document, sort_keys=True).encode()
