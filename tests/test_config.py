"""The agent's configuration: defaults, the example file, environment overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.cli import main
from agent.service.config import SECTIONS, Config, ConfigError, all_keys, env_name, load_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "agent" / "service" / "agent.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_example_file_holds_exactly_the_defaults() -> None:
    loaded = load_config(EXAMPLE, environ={})
    defaults = Config()
    for field in dataclasses.fields(Config):
        if field.name != "source":
            assert getattr(loaded, field.name) == getattr(defaults, field.name), field.name


def test_the_example_file_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in all_keys():
        assert f"\n{key.rsplit('.', 1)[-1]} = " in text, key


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None, environ={}).mqtt == Config().mqtt


def test_a_value_from_the_file_is_used(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[mqtt]\nhost = "broker.lab"\nport = 8883\n'), environ={})
    assert (config.mqtt.host, config.mqtt.port) == ("broker.lab", 8883)


def test_an_environment_variable_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "broker.lab"\n')
    config = load_config(
        path, environ={"HPA_EDGE_MQTT_HOST": "other", "HPA_EDGE_WATCH_SETTLE_SECONDS": "0.5"}
    )
    assert config.mqtt.host == "other"
    assert config.watch.settle_seconds == 0.5


def test_every_key_has_an_environment_name_that_round_trips(tmp_path: Path) -> None:
    assert env_name("instrument") == "HPA_EDGE_INSTRUMENT"
    assert env_name("mqtt.max_inflight") == "HPA_EDGE_MQTT_MAX_INFLIGHT"
    assert len({env_name(k) for k in all_keys()}) == len(all_keys())


def test_environment_booleans_and_tables_are_parsed() -> None:
    config = load_config(
        None,
        environ={
            "HPA_EDGE_MQTT_TLS": "true",
            "HPA_EDGE_WATCH_CHANNEL_MAP": '{"1": "blue", "2": "green", "3": "red", "4": "yellow"}',
            "HPA_EDGE_WATCH_PATTERN": r"^(?P<id>.+)_w(?P<channel>\d)\.tif$",
        },
    )
    assert config.mqtt.tls is True
    assert config.naming().parse("A1_w2.tif").channel == "green"  # type: ignore[union-attr]


def test_an_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nhots = 'x'\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: mqtt\.hots: unknown key"):
        load_config(path, environ={})


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="brokr: unknown key"):
        load_config(write(tmp_path, "[brokr]\nhost = 'x'\n"), environ={})


def test_a_value_of_the_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: mqtt\.port: must be an integer, not 'abc'"):
        load_config(write(tmp_path, "[mqtt]\nport = 'abc'\n"), environ={})


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment HPA_EDGE_MQTT_PORT: 'x' is not an integer"):
        load_config(None, environ={"HPA_EDGE_MQTT_PORT": "x"})


def test_an_out_of_range_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"environment HPA_EDGE_MQTT_PORT: mqtt\.port: must be 1\.\.65535"):
        load_config(None, environ={"HPA_EDGE_MQTT_PORT": "70000"})


def test_an_unknown_environment_variable_with_the_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match="HPA_EDGE_MQTT_HOTS: not a configuration key"):
        load_config(None, environ={"HPA_EDGE_MQTT_HOTS": "x"})


def test_hpa_edge_config_is_not_taken_for_a_key() -> None:
    assert load_config(None, environ={"HPA_EDGE_CONFIG": "/etc/hpa-edge/agent.toml"}) == Config()


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(write(tmp_path, "[mqtt\n"), environ={})


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[watch]\nobserver = 'fanotify'\n", "watch.observer: 'fanotify' is not"),
        ("[watch]\nfolder = 'relative/path'\n", "watch.folder: 'relative/path' must be an absolute path"),
        ("[watch]\npattern = '^(?P<id>.+)\\.png$'\n", "watch.pattern: .* has no \\(\\?P<channel>"),
        (
            "[watch]\nchannel_map = { w1 = 'purple' }\n",
            "watch.channel_map: channel_map maps to \\['purple'\\]",
        ),
        (
            "[watch]\nincomplete_timeout = 1.0\nsettle_seconds = 2.0\n",
            "watch.incomplete_timeout: must be longer",
        ),
        ("[files]\nafter = 'archive'\n", "files.after: 'archive' is not"),
        ("[files]\ndone = '.'\n", "files.done: must not be the watched folder"),
        ("[files]\nfailed = 'done'\n", "files.failed: is the same folder as files.done"),
        ("[mqtt]\nprotocol = '3'\n", "mqtt.protocol: '3' is not '5' or '3.1.1'"),
        ("[mqtt]\ntopic_prefix = 'lab/#'\n", "mqtt.topic_prefix: 'lab/#' must not hold"),
        (
            "[mqtt]\nca_file = '/nonexistent/ca.pem'\ntls = true\n",
            "mqtt.ca_file: '/nonexistent/ca.pem' is not a readable",
        ),
        ("instrument = 'scope/1'\n", "instrument: 'scope/1' must be letters"),
        ("[stack]\nbits = 4\n", "stack.bits: must be 9..16"),
        (
            "[mqtt]\nreconnect_min = 10.0\nreconnect_max = 1.0\n",
            "mqtt.reconnect_min: must be > 0 and at most",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("x")
    text = f"[mqtt]\ntls = true\ncert_file = '{cert}'\n"
    with pytest.raises(ConfigError, match=r"needs both mqtt\.cert_file and mqtt\.key_file"):
        load_config(write(tmp_path, text), environ={})


def test_a_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = load_config(
        write(tmp_path, f"[mqtt]\nusername = 'agent'\npassword_file = '{secret}'\n"), environ={}
    )
    assert config.password() == "s3cret"


def test_derived_names_follow_the_instrument() -> None:
    config = load_config(None, environ={"HPA_EDGE_INSTRUMENT": "confocal-2"})
    assert config.topic_prefix == "hpa-edge/confocal-2"
    assert config.client_id == "hpa-edge-confocal-2"
    assert config.folder("done") == config.watch.folder / "done"


def test_sections_are_all_described() -> None:
    expected = {"watch", "files", "stack", "bundle", "state", "mqtt", "homeassistant", "thumbnails"}
    assert set(SECTIONS) == expected


def test_check_config_exits_zero_on_a_good_file_and_prints_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPA_EDGE_MQTT_PORT", "1884")
    path = write(tmp_path, "[mqtt]\nhost = 'broker.lab'\n")
    assert main(["run", "--config", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert f'mqtt.host = "broker.lab"  # {path}' in out
    assert "mqtt.port = 1884  # environment HPA_EDGE_MQTT_PORT" in out
    assert 'mqtt.protocol = "5"  # default' in out


def test_check_config_exits_non_zero_on_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[mqtt]\nport = 0\n")
    assert main(["run", "--config", str(path), "--check-config"]) == 2
    assert "mqtt.port: must be 1..65535" in capsys.readouterr().err
