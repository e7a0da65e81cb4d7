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


def test_a_thumbnail_keeps_the_hpa_colours_of_the_model_input() -> None:
    image = np.zeros((224, 224, 3), np.uint8)
    image[:, :, 1] = 200  # the protein slot: green
    made = thumbnail.make(image, size=256)
    decoded = cv2.imdecode(np.frombuffer(made.data, np.uint8), cv2.IMREAD_COLOR)
    blue, green, red = (float(decoded[:, :, i].mean()) for i in range(3))  # OpenCV decodes BGR
    assert green > 180
    assert max(blue, red) < 20
    assert (made.width, made.height) == (224, 224)  # never enlarged


def test_a_large_input_is_shrunk_to_the_size_asked_for() -> None:
    made = thumbnail.make(np.full((512, 384, 3), 90, np.uint8), size=128)
    decoded = cv2.imdecode(np.frombuffer(made.data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == (128, 96)
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
    assert cv2.imdecode(np.frombuffer(picture, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (
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
