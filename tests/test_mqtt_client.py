"""The one MQTT client factory and the broker options every tool shares."""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path

import pytest

from agent.service.mqtt_client import Broker, add_broker_arguments, broker_from_args, make_client
from tests.broker import tls_broker


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return parser.parse_args(argv)


def test_the_broker_options_default_to_plain_mqtt_5_on_localhost() -> None:
    assert broker_from_args(parse()) == Broker("localhost", 1883, "5")


def test_a_port_that_is_not_a_number_is_refused_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="--broker 'host:x': port 'x' is not a number"):
        broker_from_args(parse("--broker", "host:x"))


def test_certificate_files_without_tls_are_refused() -> None:
    with pytest.raises(ValueError, match="need --tls"):
        broker_from_args(parse("--cert-file", "client.pem"))


def test_the_password_is_read_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    broker = broker_from_args(parse("--username", "lab", "--password-file", str(secret)))
    assert (broker.username, broker.password) == ("lab", "s3cret")


def test_a_missing_password_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--password-file .*missing"):
        broker_from_args(parse("--password-file", str(tmp_path / "missing")))


def test_an_unknown_protocol_is_refused_by_the_factory() -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        make_client(Broker(protocol="4"))


@pytest.mark.integration
def test_listen_reaches_a_broker_that_requires_tls_and_a_client_certificate(tmp_path: Path) -> None:
    """The operator's tool connects wherever the agent does: same options, same factory."""
    from agent.tools import listen

    mosquitto, tls_port, certs = tls_broker(tmp_path)
    parser = argparse.ArgumentParser()
    listen.add_arguments(parser)
    args = parser.parse_args(
        ["--broker", f"127.0.0.1:{tls_port}", "--tls", "--ca-file", str(certs["ca.pem"]),
         "--cert-file", str(certs["client.pem"]), "--key-file", str(certs["client.key"]),
         "--count", "1", "--seconds", "30", "--topic", "hpa-edge/+/errors"]
    )  # fmt: skip
    out = io.StringIO()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(listen.listen(args, broker_from_args(args), out)))
    publisher = make_client(Broker("127.0.0.1", mosquitto.port))  # on the plain listener
    document = b'{"instrument": "scope", "stack_id": "s", "code": "truncated", "message": "m"}'
    try:
        thread.start()
        publisher.connect("127.0.0.1", mosquitto.port)
        publisher.loop_start()
        deadline = time.monotonic() + 20
        while thread.is_alive() and time.monotonic() < deadline:  # until listen has one and exits
            publisher.publish("hpa-edge/scope/errors", document, qos=1)
            thread.join(0.3)
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        thread.join(30)
        mosquitto.stop()
    assert codes == [0]
    assert "ERROR truncated: m" in out.getvalue()
