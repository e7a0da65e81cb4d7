"""The one place a paho MQTT client is built: protocol, credentials, TLS, will.

The agent's sink, `hpa-edge listen`, `bench --broker` and `demo` all connect through
`make_client`, so every one of them speaks MQTT 5 or 3.1.1 and does TLS with a CA and a
client certificate the same way. `add_broker_arguments` gives the command-line tools the same
options with the same names as the agent's `[mqtt]` section.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class Broker:
    """Where a broker is and how to talk to it."""

    host: str = "localhost"
    port: int = 1883
    protocol: str = "5"
    username: str = ""
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None  # None = the system's CA certificates
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def make_client(broker: Broker, client_id: str = "", will: Will | None = None, **options: Any) -> Any:
    """A paho client (callback API 2) set up for `broker`; not yet connected.

    `options` go to paho's constructor (e.g. `reconnect_on_failure=False`). Under MQTT 3.1.1 the
    session is clean; under 5 paho's default (a clean start) applies.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if broker.protocol not in PROTOCOLS:
        raise ValueError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, not {broker.protocol!r}")
    v5 = broker.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
        **options,
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(
            ca_certs=_text(broker.ca_file), certfile=_text(broker.cert_file), keyfile=_text(broker.key_file)
        )
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


# Command-line tools ---------------------------------------------------------------------
def add_broker_arguments(parser: argparse.ArgumentParser, default: str | None = "localhost:1883") -> None:
    """The broker options, named as in the agent's [mqtt] section: address, protocol, credentials, TLS."""
    group = parser.add_argument_group("broker")
    where = f"default {default}" if default else "none by default"
    group.add_argument("--broker", default=default, help=f"HOST[:PORT] ({where})")
    group.add_argument("--protocol", choices=PROTOCOLS, default="5", help="MQTT version (default 5)")
    group.add_argument("--username", default="", help="broker user name")
    group.add_argument("--password-file", type=Path, help="file holding the broker password")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-file", type=Path, help="CA certificate(s) for TLS (default: the system's)")
    group.add_argument("--cert-file", type=Path, help="client certificate for TLS")
    group.add_argument("--key-file", type=Path, help="client key for TLS")


def parse_address(text: str, default_port: int = 1883) -> tuple[str, int]:
    """HOST[:PORT] -> (host, port); ValueError with a message fit for a user."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    if not host:
        raise ValueError(f"--broker {text!r}: expected HOST[:PORT]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--broker {text!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"--broker {text!r}: port must be 1..65535")
    return host, number


def broker_from_args(args: argparse.Namespace, read: Callable[[Path], str] | None = None) -> Broker:
    """The Broker the tool's options name; ValueError with a message fit for a user."""
    host, port = parse_address(args.broker)
    password = None
    if args.password_file is not None:
        try:
            password = (read or _read_secret)(args.password_file)
        except OSError as exc:
            raise ValueError(f"--password-file {args.password_file}: {exc.strerror or exc}") from None
    if (args.cert_file or args.key_file or args.ca_file) and not args.tls:
        raise ValueError("--ca-file, --cert-file and --key-file need --tls")
    return Broker(
        host=host,
        port=port,
        protocol=args.protocol,
        username=args.username,
        password=password,
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )


def _read_secret(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()
