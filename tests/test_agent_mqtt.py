"""The agent's MQTT side against a real mosquitto: protocols, refusals, credentials, status, stats."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.model.review import Trust
from tests.agent_harness import config_for, drop, outbox_depth, running, stack_files
from tests.broker import Broker, Subscriber, retained, tls_broker

pytestmark = pytest.mark.integration
SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "agent" / "model" / "messages.schema.json").read_text()
)


def test_mqtt_3_1_1_delivers_results(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port, {"mqtt": {"protocol": "3.1.1"}})
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 20), config.watch.folder, "old")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
    assert json.loads(subscriber.on("results")[0].payload)["stack_id"] == "old"
    assert outbox_depth(config.state.database)["pending"] == 0


NO_THUMBNAILS = {"thumbnails": {"enabled": False}}  # one outbox row per stack: the result alone


@pytest.fixture
def plain_bundle(demo_bundle: Any) -> Any:
    """The demo bundle without its trust entries: fewer review copies (a result with no label is
    still flagged, and also goes to review)."""
    return dataclasses.replace(demo_bundle, trust=Trust())


def test_a_topic_refused_by_the_broker_is_marked_rejected_not_retried(tmp_path, plain_bundle, stack_source):
    acl = tmp_path / "acl"
    acl.write_text(
        "topic readwrite hpa-edge/scope/status\n"
        "topic readwrite hpa-edge/scope/latest\n"
        "topic readwrite hpa-edge/scope/errors\n"
        "topic read #\n"
    )
    broker = Broker(tmp_path / "broker", extra=f"allow_anonymous true\nacl_file {acl}\n").start()
    subscriber = Subscriber(broker.port)
    try:
        config = config_for(tmp_path, broker.port, NO_THUMBNAILS)
        with running(config, plain_bundle) as agent:
            drop(stack_files(stack_source, 21), config.watch.folder, "denied")
            # One row on results, and one on review when the result is flagged (e.g. no label).
            database = config.state.database
            assert subscriber.wait_for(
                lambda: (
                    agent.drainer is not None
                    and agent.drainer.rejected >= 1
                    and outbox_depth(database)["pending"] == 0
                )
            )
            time.sleep(1.0)  # long enough for a retry storm to show
            assert agent.drainer is not None
            rejected = agent.drainer.rejected
            assert rejected in (1, 2)
            assert agent.drainer.sent == 0
        assert outbox_depth(config.state.database) == {"pending": 0, "rejected": rejected}
        assert not subscriber.on("results")
        assert not subscriber.on("latest")  # latest carries only results the broker took
        denied = re.findall(
            r"Denied PUBLISH from hpa-edge-scope \(d\d, q1, r0, (m\d+), 'hpa-edge/scope/results'",
            broker.log.read_text(),
        )
        assert len(set(denied)) == 1  # one attempt, no retries
    finally:
        subscriber.close()
        broker.stop()


def test_username_and_password_from_a_file_are_used(tmp_path, demo_bundle, stack_source):
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    passwords = tmp_path / "passwords"
    subprocess.run([tool, "-b", "-c", str(passwords), "agent", "s3cret"], check=True)
    subprocess.run([tool, "-b", str(passwords), "reader", "r"], check=True)
    broker = Broker(tmp_path / "broker", extra=f"allow_anonymous false\npassword_file {passwords}\n").start()
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[Any] = []
    reader = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    reader.username_pw_set("reader", "r")
    reader.on_connect = lambda c, u, f, r, p: c.subscribe("hpa-edge/#", qos=1)
    reader.on_message = lambda c, u, m: got.append(m.topic)
    reader.connect("127.0.0.1", broker.port)
    reader.loop_start()
    try:
        secret = tmp_path / "mqtt-password"
        secret.write_text("s3cret\n")
        config = config_for(
            tmp_path, broker.port, {"mqtt": {"username": "agent", "password_file": str(secret)}}
        )
        with running(config, demo_bundle):
            drop(stack_files(stack_source, 22), config.watch.folder, "authed")
            deadline = time.monotonic() + 20
            while "hpa-edge/scope/results" not in got and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "hpa-edge/scope/results" in got
    finally:
        reader.disconnect()
        reader.loop_stop()
        broker.stop()


def test_a_wrong_password_is_logged_and_retried_with_backoff_without_a_crash(
    tmp_path, plain_bundle, stack_source, capsys
):
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    passwords = tmp_path / "passwords"
    subprocess.run([tool, "-b", "-c", str(passwords), "agent", "right"], check=True)
    broker = Broker(tmp_path / "broker", extra=f"allow_anonymous false\npassword_file {passwords}\n").start()
    try:
        secret = tmp_path / "mqtt-password"
        secret.write_text("wrong")
        config = config_for(
            tmp_path,
            broker.port,
            {"mqtt": {"username": "agent", "password_file": str(secret)}, **NO_THUMBNAILS},
        )
        with running(config, plain_bundle) as agent:
            drop(stack_files(stack_source, 23), config.watch.folder, "kept")
            time.sleep(2.5)
            assert agent.stats.counts["processed"] == 1  # the pipeline goes on; the result waits on disk
        log = capsys.readouterr().out
        refusals = log.count("event=mqtt_refused")
        assert 2 <= refusals <= 6, log  # backoff 0.2 s doubling to 1 s over 2.5 s: a handful, not a storm
        assert "Bad user name or password" in log or "Not authorized" in log
        assert "event=password_file_readable" in log  # written with the default mode 0644 above
        assert outbox_depth(config.state.database)["pending"] in (1, 2)  # the result (+ its review copy)
    finally:
        broker.stop()


def test_status_is_retained_online_while_running(tmp_path, broker, subscriber, demo_bundle):
    config = config_for(tmp_path, broker.port)
    with running(config, demo_bundle):
        # Only once the agent has published `online` may the late subscriber join: before that it
        # would get the live message (retain false), not the retained one.
        assert subscriber.wait_for(lambda: [m.payload for m in subscriber.on("status")] == [b"online"])
        status = retained(broker.port, "hpa-edge/scope/status")
        assert status.payload == b"online"
        assert status.retain


def test_stats_are_published_and_valid(tmp_path, broker, subscriber, demo_bundle, stack_source):
    config = config_for(tmp_path, broker.port, {"mqtt": {"stats_interval": 0.5}})
    with running(config, demo_bundle):
        drop(stack_files(stack_source, 24), config.watch.folder, "counted")
        assert subscriber.wait_for(
            lambda: any(json.loads(m.payload)["processed"] == 1 for m in subscriber.on("stats"))
        )
    stats = [json.loads(m.payload) for m in subscriber.on("stats")]
    for document in stats:
        jsonschema.validate(document, {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/stats"})
    last = next(s for s in stats if s["processed"] == 1)
    assert last["latency_p50_ms"] > 0
    assert last["purpose"] == "demo"


def test_tls_with_a_client_certificate_delivers_results(tmp_path, demo_bundle, stack_source):
    broker, tls_port, certs = tls_broker(tmp_path)
    subscriber = Subscriber(broker.port)  # on the plain listener
    try:
        tls = {"tls": True, "ca_file": str(certs["ca.pem"]), "cert_file": str(certs["client.pem"]),
               "key_file": str(certs["client.key"])}  # fmt: skip
        config = config_for(tmp_path, tls_port, {"mqtt": tls})
        with running(config, demo_bundle):
            drop(stack_files(stack_source, 25), config.watch.folder, "secure")
            assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        assert "New client connected" in broker.log.read_text()
    finally:
        subscriber.close()
        broker.stop()


def test_a_broker_that_goes_away_and_comes_back_gets_the_backlog(
    tmp_path, broker, subscriber, demo_bundle, stack_source
):
    from tests.broker import Proxy

    proxy = Proxy(broker.port).start()
    config = config_for(tmp_path, proxy.port)
    with running(config, demo_bundle) as agent:
        drop(stack_files(stack_source, 26), config.watch.folder, "before")
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 1)
        proxy.stop()  # the broker is gone for the agent
        for i in range(3):
            drop(stack_files(stack_source, 27 + i), config.watch.folder, f"during{i}")
        assert subscriber.wait_for(lambda: agent.stats.counts["processed"] == 4)
        assert len(subscriber.on("results")) == 1
        proxy.start()
        assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 4, timeout=30)
    proxy.stop()
    stacks = [json.loads(m.payload)["stack_id"] for m in subscriber.on("results")]
    assert stacks == ["before", "during0", "during1", "during2"]
