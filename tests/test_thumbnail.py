"""Thumbnails: a small JPEG of what the model saw, published retained beside each result."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

from agent.model import thumbnail
from tests.agent_harness import config_for, drop, running, stack_files
from tests.broker import Subscriber


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, as OpenCV decodes
    assert image is not None
    return image


def test_a_thumbnail_keeps_the_hpa_colours_of_the_model_input() -> None:
    image = np.zeros((224, 224, 3), np.uint8)
    image[:, :, 1] = 200  # the protein slot: green
    made = thumbnail.make(image, size=256)
    decoded = decode(made.data)
    blue, green, red = (float(decoded[:, :, i].mean()) for i in range(3))
    assert green > 180
    assert max(blue, red) < 20
    assert (made.width, made.height) == (224, 224)  # never enlarged


def test_a_large_input_is_shrunk_to_the_size_asked_for() -> None:
    made = thumbnail.make(np.full((512, 384, 3), 90, np.uint8), size=128)
    assert decode(made.data).shape[:2] == (128, 96)
    assert made.entry()["sha256"] == hashlib.sha256(made.data).hexdigest()


def test_only_an_rgb_byte_image_makes_a_thumbnail() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        thumbnail.make(np.zeros((64, 64), np.uint8))


@pytest.mark.integration
def test_the_agent_publishes_the_thumbnail_retained_and_the_result_names_it(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 4), config.watch.folder, "pic")
        assert subscriber.wait_for(
            lambda: bool(subscriber.on("thumbnail")) and bool(subscriber.on("results"))
        )
    result = json.loads(subscriber.on("results")[0].payload)
    picture = subscriber.on("thumbnail")[0].payload
    assert result["thumbnail"]["sha256"] == hashlib.sha256(picture).hexdigest()
    assert result["thumbnail"]["bytes"] == len(picture)
    assert decode(picture).shape[:2] == (
        result["thumbnail"]["height"],
        result["thumbnail"]["width"],
    )
    late = Subscriber(broker.port, "hpa-edge/scope/thumbnail")  # retained: a page opened later sees it
    try:
        assert late.wait_for(lambda: bool(late.messages))
        assert late.messages[0].payload == picture
    finally:
        late.close()


@pytest.mark.integration
def test_switched_off_no_thumbnail_is_made(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port, {"thumbnails": {"enabled": False}})
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 4), config.watch.folder, "nopic")
        assert subscriber.wait_for(lambda: bool(subscriber.on("results")))
    assert "thumbnail" not in json.loads(subscriber.on("results")[0].payload)
    assert subscriber.on("thumbnail") == []


# What a consumer written against the schema as it was at the start of this release requires
# (agent/model/messages.schema.json at e67a2f0): the fields added since (thumbnail, degraded)
# are optional, so such a consumer keeps working on today's messages.
OLD_REQUIRED = {
    "result": ["schema_version", "kind", "msg_id", "instrument", "stack_id", "time", "labels", "n_labels",
               "scores", "files", "bundle_id", "bundle_sha256", "purpose", "total_ms"],
    "error": ["schema_version", "kind", "msg_id", "instrument", "stack_id", "time", "code", "message",
              "files", "moved_to"],
    "stats": ["schema_version", "kind", "instrument", "time", "uptime_s", "processed", "failed",
              "quarantined", "duplicates", "outbox_pending", "outbox_rejected", "inflight", "purpose"],
}  # fmt: skip


def test_fields_added_since_are_optional_so_older_consumers_keep_working() -> None:
    from pathlib import Path

    schema = json.loads(
        (Path(__file__).resolve().parent.parent / "agent/model/messages.schema.json").read_text()
    )
    for kind, required in OLD_REQUIRED.items():
        assert schema["$defs"][kind]["required"] == required  # nothing newly required
        assert schema["$defs"][kind]["properties"]["schema_version"] == {"const": 1}


@pytest.mark.integration
def test_an_older_consumer_reads_todays_result_and_ignores_the_new_fields(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 5), config.watch.folder, "old")
        assert subscriber.wait_for(lambda: bool(subscriber.on("results")))
    document = json.loads(subscriber.on("results")[0].payload)
    assert "thumbnail" in document  # a new field is there...
    old_view = {key: document[key] for key in OLD_REQUIRED["result"]}  # ...and all the old one needs
    assert old_view["stack_id"] == "old"
    assert isinstance(old_view["labels"], list)
