"""The agent's configuration: one typed object, read from TOML, overridden from the environment.

Every key has a default (the commented `agent/service/agent.example.toml` lists them all, and a
test checks it parses to exactly these defaults). Any key can be overridden by an
environment variable named `HPA_EDGE_<SECTION>_<KEY>` (`HPA_EDGE_MQTT_HOST`,
`HPA_EDGE_INSTRUMENT` for top-level keys), which is how systemd's `EnvironmentFile` and
containers set per-device values. Everything is validated here, before any connection or
model load, and every error names the key and where its value came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.service.mqtt_client import Broker
from agent.stacks.image import Limits
from agent.stacks.naming import KAGGLE_PATTERN, NamingScheme

ENV_PREFIX = "HPA_EDGE_"
# Variables with this prefix that are not configuration keys.
ENV_RESERVED = frozenset({"HPA_EDGE_CONFIG", "HPA_EDGE_CRASH_AT"})  # not settings: see crashpoint.py
_TOPIC_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and its source."""


@dataclass(frozen=True)
class WatchConfig:
    folder: Path = Path("/var/lib/hpa-edge/incoming")
    observer: str = "inotify"  # "inotify" (local disks) or "polling" (SMB/NFS shares)
    poll_interval: float = 1.0  # seconds between looks with the polling observer
    settle_seconds: float = 2.0  # unchanged size and mtime for this long = written (no close event seen)
    incomplete_timeout: float = 600.0  # a stack lacking channels this long goes to quarantine
    rescan_interval: float = 30.0  # full look at the folder even without events (lost events)
    pattern: str = KAGGLE_PATTERN
    channel_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FilesConfig:
    after: str = "move"  # processed stacks: "move" to done, "delete", or "leave" in place
    done: Path = Path("done")  # relative paths are inside watch.folder
    failed: Path = Path("failed")
    quarantine: Path = Path("quarantine")


@dataclass(frozen=True)
class StackConfig:
    bits: int = 0  # the camera's real bit depth for 16-bit files; 0 = as the bundle says
    max_bytes: int = Limits.max_bytes
    max_side: int = Limits.max_side
    max_pixels: int = Limits.max_pixels


@dataclass(frozen=True)
class BundleConfig:
    path: Path = Path("/opt/hpa-edge/models/demo")
    threads: int = 2  # CPU threads for the embedder


@dataclass(frozen=True)
class StateConfig:
    database: Path = Path("/var/lib/hpa-edge/state.db")
    batch: int = 16  # stacks committed together at most (one fsync per batch)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # "" = hpa-edge-<instrument>
    topic_prefix: str = ""  # "" = hpa-edge/<instrument>
    keepalive: int = 30
    username: str = ""
    password_file: Path = Path("")  # a file holding the password, readable by the agent's user only
    tls: bool = False
    ca_file: Path = Path("")  # "" = the system's CA certificates
    cert_file: Path = Path("")  # client certificate (optional)
    key_file: Path = Path("")
    max_inflight: int = 20  # unacknowledged messages at once; the backlog waits on disk
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    stats_interval: float = 60.0
    flush_seconds: float = 5.0  # on shutdown, how long to keep delivering the backlog


@dataclass(frozen=True)
class ThumbnailsConfig:
    enabled: bool = True  # publish a small JPEG of each stack, retained, on <prefix>/thumbnail
    size: int = 256  # longest side in pixels, at most the model's input size


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = True  # publish MQTT discovery, so Home Assistant shows the instrument by itself
    discovery_prefix: str = "homeassistant"  # Home Assistant's default


@dataclass(frozen=True)
class Config:
    instrument: str = ""  # "" = this machine's host name
    log_level: str = "info"
    watch: WatchConfig = field(default_factory=WatchConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    state: StateConfig = field(default_factory=StateConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    thumbnails: ThumbnailsConfig = field(default_factory=ThumbnailsConfig)
    source: str = "defaults"  # where this came from, for messages

    # Derived values, resolved once so the rest of the agent never re-derives them.
    @property
    def instrument_name(self) -> str:
        return self.instrument or _safe_hostname()

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"hpa-edge/{self.instrument_name}"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"hpa-edge-{self.instrument_name}"

    def folder(self, name: str) -> Path:
        """done/failed/quarantine as absolute paths (relative ones sit in the watched folder)."""
        path = Path(getattr(self.files, name))
        return path if path.is_absolute() else self.watch.folder / path

    def naming(self) -> NamingScheme:
        return NamingScheme(pattern=self.watch.pattern, channel_map=dict(self.watch.channel_map))

    def limits(self) -> Limits:
        return Limits(self.stack.max_pixels, self.stack.max_side, self.stack.max_bytes)

    def password(self) -> str | None:
        if not is_set(self.mqtt.password_file):
            return None
        return self.mqtt.password_file.read_text(encoding="utf-8").strip()

    def broker(self) -> Broker:
        """The `[mqtt]` section as the client factory takes it (reads the password file)."""
        m = self.mqtt
        return Broker(
            host=m.host,
            port=m.port,
            protocol=m.protocol,
            username=m.username,
            password=self.password() if m.username else None,
            tls=m.tls,
            ca_file=m.ca_file if is_set(m.ca_file) else None,
            cert_file=m.cert_file if is_set(m.cert_file) else None,
            key_file=m.key_file if is_set(m.key_file) else None,
            keepalive=m.keepalive,
        )


SECTIONS: dict[str, type] = {
    "watch": WatchConfig,
    "files": FilesConfig,
    "stack": StackConfig,
    "bundle": BundleConfig,
    "state": StateConfig,
    "mqtt": MqttConfig,
    "homeassistant": HomeAssistantConfig,
    "thumbnails": ThumbnailsConfig,
}


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (None: defaults only), apply HPA_EDGE_* overrides, validate; ConfigError if wrong."""
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values = _from_table(raw, source)
    _apply_environment(values, environ)
    config = _build(values)
    validate(config)
    return config


def _from_table(raw: dict[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    """Flatten the TOML into {"section.key": (value, where)}; unknown keys are errors."""
    values: dict[str, tuple[Any, str]] = {}
    top = {f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS and f.name != "source"}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            known = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for sub, subvalue in value.items():
                if sub not in known:
                    raise ConfigError(
                        f"{source}: {key}.{sub}: unknown key (known: {', '.join(sorted(known))})"
                    )
                values[f"{key}.{sub}"] = (subvalue, source)
        elif key in top:
            values[key] = (value, source)
        else:
            allowed = sorted(top | {f"[{s}]" for s in SECTIONS})
            raise ConfigError(f"{source}: {key}: unknown key (known: {', '.join(allowed)})")
    return values


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def all_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS and f.name != "source"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _apply_environment(values: dict[str, tuple[Any, str]], environ: Mapping[str, str]) -> None:
    by_env = {env_name(key): key for key in all_keys()}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        key = by_env.get(name)
        if key is None:
            raise ConfigError(f"environment {name}: not a configuration key (e.g. {env_name('mqtt.host')})")
        values[key] = (_parse_env(text, _type_of(key), name), f"environment {name}")


def _type_of(key: str) -> Any:
    if "." not in key:
        return typing.get_type_hints(Config)[key]
    section, name = key.split(".", 1)
    return typing.get_type_hints(SECTIONS[section])[name]


def _parse_env(text: str, kind: Any, name: str) -> Any:
    """Environment values are strings; turn them into what the TOML would have held."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"environment {name}: {text!r} is not a boolean (true/false)")
    if typing.get_origin(kind) is dict:
        try:
            return json.loads(text)
        except ValueError:
            raise ConfigError(f"environment {name}: {text!r} is not a JSON object") from None
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"environment {name}: {text!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"environment {name}: {text!r} is not a number") from None
    return text


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a value's type against the field's; a TOML integer is fine where a float is wanted."""
    kind = _type_of(key)
    ok: bool
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is Path:
        ok = isinstance(value, str)
        value = Path(value) if ok else value
    elif typing.get_origin(kind) is dict:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {bool: "a boolean", int: "an integer", float: "a number", Path: "a path string"}.get(
            kind, "a table of strings" if typing.get_origin(kind) is dict else "a string"
        )
        raise ConfigError(f"{where}: {key}: must be {expected}, not {value!r}")
    return value


def _build(values: dict[str, tuple[Any, str]]) -> Config:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    for key, (value, where) in values.items():
        coerced = _coerce(key, value, where)
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = coerced
        else:
            top[key] = coerced
    wheres = {key: where for key, (_, where) in values.items()}
    sources = sorted({w for w in wheres.values()})
    built = {name: cls(**sections[name]) for name, cls in SECTIONS.items()}
    config = Config(**top, **built, source=", ".join(sources) or "defaults")
    object.__setattr__(config, "_wheres", wheres)
    return config


def where(config: Config, key: str) -> str:
    """Where a key's value came from: the file, an environment variable, or the default."""
    return getattr(config, "_wheres", {}).get(key, "default")


def validate(config: Config) -> None:
    """Every rule a value must follow; the first broken one raises ConfigError."""

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{where(config, key)}: {key}: {message}")

    if config.instrument and not _TOPIC_WORD.match(config.instrument):
        fail(
            "instrument",
            f"{config.instrument!r} must be letters, digits, '.', '_' or '-' (it is part of topics)",
        )
    if config.log_level not in ("debug", "info", "warning", "error"):
        fail("log_level", f"{config.log_level!r} is not one of debug, info, warning, error")
    w = config.watch
    if not w.folder.is_absolute():
        fail("watch.folder", f"{str(w.folder)!r} must be an absolute path")
    if w.observer not in ("inotify", "polling"):
        fail("watch.observer", f"{w.observer!r} is not 'inotify' or 'polling'")
    for key in ("poll_interval", "settle_seconds", "incomplete_timeout", "rescan_interval"):
        if not getattr(w, key) > 0:
            fail(f"watch.{key}", f"must be > 0, not {getattr(w, key)}")
    if w.incomplete_timeout <= w.settle_seconds:
        fail("watch.incomplete_timeout", "must be longer than watch.settle_seconds")
    try:
        config.naming()
    except ValueError as exc:
        key = "watch.channel_map" if "channel_map" in str(exc) else "watch.pattern"
        fail(key, str(exc))
    if config.files.after not in ("move", "delete", "leave"):
        fail("files.after", f"{config.files.after!r} is not 'move', 'delete' or 'leave'")
    targets: dict[str, Path] = {}
    for name in ("done", "failed", "quarantine"):
        target = config.folder(name).resolve()
        if target == w.folder.resolve():
            fail(f"files.{name}", "must not be the watched folder itself")
        if target in targets.values():
            fail(
                f"files.{name}",
                f"is the same folder as files.{next(k for k, v in targets.items() if v == target)}",
            )
        targets[name] = target
    s = config.stack
    if s.bits and not 9 <= s.bits <= 16:
        fail("stack.bits", f"must be 9..16 (or 0 for the bundle's setting), not {s.bits}")
    for key in ("max_bytes", "max_side", "max_pixels"):
        if getattr(s, key) <= 0:
            fail(f"stack.{key}", "must be > 0")
    if not 1 <= config.bundle.threads <= 64:
        fail("bundle.threads", f"must be 1..64, not {config.bundle.threads}")
    if not 1 <= config.state.batch <= 1000:
        fail("state.batch", f"must be 1..1000, not {config.state.batch}")
    if not config.state.database.is_absolute():
        fail("state.database", f"{str(config.state.database)!r} must be an absolute path")
    m = config.mqtt
    if not m.host:
        fail("mqtt.host", "must not be empty")
    if not 1 <= m.port <= 65535:
        fail("mqtt.port", f"must be 1..65535, not {m.port}")
    if m.protocol not in ("5", "3.1.1"):
        fail("mqtt.protocol", f"{m.protocol!r} is not '5' or '3.1.1'")
    if m.topic_prefix and (any(c in m.topic_prefix for c in "+#\0") or m.topic_prefix.endswith("/")):
        fail("mqtt.topic_prefix", f"{m.topic_prefix!r} must not hold '+', '#' or end with '/'")
    if not 5 <= m.keepalive <= 3600:
        fail("mqtt.keepalive", f"must be 5..3600 seconds, not {m.keepalive}")
    if not 1 <= m.max_inflight <= 1000:
        fail("mqtt.max_inflight", f"must be 1..1000, not {m.max_inflight}")
    if not 0 < m.reconnect_min <= m.reconnect_max:
        fail("mqtt.reconnect_min", "must be > 0 and at most mqtt.reconnect_max")
    for key in ("stats_interval", "flush_seconds"):
        if getattr(m, key) < 0:
            fail(f"mqtt.{key}", "must be >= 0")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(m, key)
        if is_set(path) and not path.is_file():
            fail(f"mqtt.{key}", f"{str(path)!r} is not a readable file")
    if is_set(m.password_file) and not m.username:
        fail("mqtt.password_file", "is set but mqtt.username is empty")
    if is_set(m.cert_file) != is_set(m.key_file):
        fail("mqtt.cert_file", "a client certificate needs both mqtt.cert_file and mqtt.key_file")
    if not m.tls and any(is_set(getattr(m, k)) for k in ("ca_file", "cert_file", "key_file")):
        fail("mqtt.tls", "is false but certificate files are set; set tls = true")
    if not 16 <= config.thumbnails.size <= 1024:
        fail("thumbnails.size", f"must be 16..1024 pixels, not {config.thumbnails.size}")
    if not _TOPIC_WORD.match(config.homeassistant.discovery_prefix):
        prefix = config.homeassistant.discovery_prefix
        fail("homeassistant.discovery_prefix", f"{prefix!r} is not one topic word")


def describe(config: Config) -> list[str]:
    """One `key = value  # source` line per key, for --check-config and the start-up log."""
    lines = []
    for key in all_keys():
        if "." in key:
            section, name = key.split(".", 1)
            value = getattr(getattr(config, section), name)
        else:
            value = getattr(config, key)
        shown = str(value) if isinstance(value, Path) else value
        lines.append(f"{key} = {json.dumps(shown)}  # {where(config, key)}")
    return lines


def is_set(path: Path) -> bool:
    """Optional paths default to "" (which pathlib reads as ".")."""
    return str(path) not in ("", ".")


def _safe_hostname() -> str:
    name = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.") or "device"
    return cleaned[:64]
