"""Home Assistant MQTT discovery: the payload against the documented keys, its templates rendered
on real messages, and the agent publishing, re-publishing and removing it on a real mosquitto."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest

from agent.model.messages import topic as message_topic
from agent.service import homeassistant
from agent.stacks.labels import LOCATIONS
from tests.agent_harness import config_for, drop, running, stack_files
from tests.broker import Subscriber, retained

# Keys Home Assistant documents for device-based discovery (full names as published, not the
# abbreviations), for the sensor and binary_sensor platforms and the availability list.
ROOT_KEYS = {"dev", "o", "cmps", "qos", "state_topic", "availability"}
DEVICE_KEYS = {"ids", "name", "mf", "mdl", "sw", "sn", "hw"}
ORIGIN_KEYS = {"name", "sw", "url"}
COMPONENT_KEYS = {
    "p", "name", "unique_id", "state_topic", "value_template", "json_attributes_topic",
    "json_attributes_template", "icon", "availability", "device_class", "state_class",
    "unit_of_measurement", "payload_on", "payload_off",
}  # fmt: skip
AVAILABILITY_KEYS = {"topic", "value_template", "payload_available", "payload_not_available"}


def document(instrument: str = "scope") -> dict[str, Any]:
    _, payload = homeassistant.discovery("homeassistant", instrument, f"hpa-edge/{instrument}")
    return dict(json.loads(payload))


def render(template: str, message: bytes) -> str:
    """A template as Home Assistant renders it: `value` and `value_json` of the message."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    environment.policies["json.dumps_kwargs"] = {"sort_keys": True}
    text = message.decode()
    value_json = json.loads(text) if text.startswith("{") else None
    return environment.from_string(template).render(value=text, value_json=value_json)


def test_the_discovery_payload_uses_only_documented_keys() -> None:
    payload = document()
    assert set(payload) <= ROOT_KEYS
    assert set(payload["dev"]) <= DEVICE_KEYS
    assert set(payload["o"]) <= ORIGIN_KEYS
    assert payload["o"]["name"] == "hpa-edge"  # origin name is required
    for component in payload["cmps"].values():
        assert set(component) <= COMPONENT_KEYS
        assert component["p"] in ("sensor", "binary_sensor")
        for availability in component.get("availability", []):
            assert set(availability) <= AVAILABILITY_KEYS


def test_every_entity_has_a_unique_id_and_one_device() -> None:
    payload = document()
    ids = [c["unique_id"] for c in payload["cmps"].values()]
    assert len(ids) == len(set(ids))
    assert all(i.startswith(payload["dev"]["ids"][0]) for i in ids)


@pytest.mark.parametrize(
    ("instrument", "object_id"),
    [("scope1", "scope1"), ("Zeiss LSM-980 #2", "zeiss_lsm_980_2"), ("éé", "instrument"), ("a/b+c", "a_b_c")],
)
def test_object_ids_are_safe_for_home_assistant(instrument: str, object_id: str) -> None:
    assert homeassistant.object_id(instrument) == object_id
    assert (
        homeassistant.topic("homeassistant", instrument)
        == f"homeassistant/device/hpa_edge_{object_id}/config"
    )


def test_the_last_stack_state_stays_within_home_assistants_255_characters() -> None:
    every_label = json.dumps({"labels": list(LOCATIONS), "review_reasons": []}).encode()
    labels = document()["cmps"]["labels"]
    assert len(render(labels["value_template"], every_label)) <= 255
    assert len(", ".join(LOCATIONS)) > 255  # the reason for the cut


def test_degraded_counts_as_available_and_offline_does_not() -> None:
    availability = document()["cmps"]["labels"]["availability"][0]
    assert render(availability["value_template"], b"degraded") == availability["payload_available"]
    assert render(availability["value_template"], b"online") == availability["payload_available"]
    assert render(availability["value_template"], b"offline") == availability["payload_not_available"]


@pytest.mark.integration
def test_the_agent_publishes_discovery_whose_templates_read_its_real_messages(
    tmp_path, broker, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port, {"mqtt": {"stats_interval": 0.3}})
    everything = Subscriber(broker.port, "#")
    try:
        with running(config, demo_bundle):
            drop(stack_files(stack_source, 2), config.watch.folder, "ha1")
            assert everything.wait_for(lambda: bool(everything.on("latest")))
            assert everything.wait_for(lambda: bool(everything.on("stats")))
        discovery = retained(broker.port, homeassistant.topic("homeassistant", "scope"))
        stats = retained(broker.port, "hpa-edge/scope/stats")  # retained: a late dashboard sees counters
    finally:
        everything.close()
    assert discovery.retain
    payload = json.loads(discovery.payload)
    latest = everything.on("latest")[-1].payload
    result = json.loads(latest)
    components = payload["cmps"]
    assert render(components["labels"]["value_template"], latest) == (
        ", ".join(result["labels"]) or "no label"
    )
    attributes = json.loads(render(components["labels"]["json_attributes_template"], latest))
    assert attributes["msg_id"] == result["msg_id"]
    assert attributes["scores"] == result["scores"]
    assert attributes["review"] == result["review"]
    assert render(components["processed"]["value_template"], stats.payload) == "1"
    for component in components.values():  # every topic read is one the agent publishes
        assert component["state_topic"] in {message_topic("hpa-edge/scope", t) for t in
                                            ("latest", "stats", "status", "errors")}  # fmt: skip


@pytest.mark.integration
def test_home_assistants_birth_message_makes_the_agent_publish_discovery_again(tmp_path, broker, demo_bundle):
    config = config_for(tmp_path, broker.port)
    topic = homeassistant.topic("homeassistant", "scope")
    watching = Subscriber(broker.port, topic)
    try:
        with running(config, demo_bundle):
            assert watching.wait_for(lambda: len(watching.messages) == 1)
            watching.client.publish("homeassistant/status", b"online", qos=1)  # Home Assistant starts
            assert watching.wait_for(lambda: len(watching.messages) == 2)
            watching.client.publish("homeassistant/status", b"offline", qos=1)  # going away asks nothing
            watching.wait_for(lambda: len(watching.messages) > 2, 1.0)
    finally:
        watching.close()
    assert len(watching.messages) == 2
    assert watching.messages[1].payload == watching.messages[0].payload


@pytest.mark.integration
def test_switched_off_the_agent_removes_its_device_from_home_assistant(tmp_path, broker, demo_bundle):
    topic = homeassistant.topic("homeassistant", "scope")
    with running(config_for(tmp_path, broker.port), demo_bundle):
        assert retained(broker.port, topic).payload
    off = config_for(tmp_path, broker.port, {"homeassistant": {"enabled": False}})
    watching = Subscriber(broker.port, topic)
    try:
        with running(off, demo_bundle):
            assert watching.wait_for(lambda: any(m.payload == b"" for m in watching.messages))
    finally:
        watching.close()
    late = Subscriber(broker.port, topic)
    try:
        assert not late.wait_for(lambda: bool(late.messages), 1.0)  # nothing retained any more
    finally:
        late.close()
