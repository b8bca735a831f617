"""Configuration: the documented file, defaults, environment overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import yaml

from bsscihub.config import CORE_SECTIONS, HUB_SECTIONS, TOP_LEVEL, ConfigError, duration, load_config
from bsscihub.family import all_config_sections, installed_families

REPO = Path(__file__).resolve().parents[1]
HUB_YAML = REPO / "etc" / "hub.yaml"
SECTIONS = all_config_sections(installed_families())


def load(path: Path | None = None, env: dict[str, str] | None = None):
    return load_config(path, environ=env or {}, family_sections=SECTIONS)


def test_documented_file_matches_the_defaults() -> None:
    from_file = load(HUB_YAML)
    defaults = load(None)
    assert from_file == defaults


def test_every_key_is_in_the_documented_file() -> None:
    raw = yaml.safe_load(HUB_YAML.read_text())
    text = HUB_YAML.read_text()
    for key in TOP_LEVEL:
        assert f"{key}:" in text, key
    for name, cls in {**CORE_SECTIONS, **HUB_SECTIONS, **SECTIONS}.items():
        assert name in raw, f"section {name} missing from etc/hub.yaml"
        for field in attrs.fields(cls):
            assert field.name in raw[name], f"{name}.{field.name} missing from etc/hub.yaml"


def test_environment_overrides_section_and_top_level_keys(tmp_path: Path) -> None:
    config = load(
        HUB_YAML,
        {
            "BSSCIHUB_WEB_LISTEN": "tcp:18080",
            "BSSCIHUB_DATA_DIR": str(tmp_path),
            "BSSCIHUB_MIOTY_DEDUP_WINDOW": "0.25",
            "BSSCIHUB_MQTT_KEEPALIVE": "45",
            "BSSCIHUB_TLS_LENIENT": "true",
            "OTHER_VARIABLE": "ignored",
        },
    )
    assert config.web.listen == "tcp:18080"
    assert config.data_dir == tmp_path
    assert config.section("mioty").dedup_window == 0.25
    assert config.mqtt.keepalive == 45
    assert config.tls.lenient is True
    assert config.sqlite_path == tmp_path / "hub.sqlite"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BSSCIHUB_MIOTY_DEDUP_WINDOW": "banana"}, "mioty.dedup_window = 'banana': expected a duration"),
        ({"BSSCIHUB_MQTT_KEEPALIVE": "-3"}, "mqtt.keepalive = -3: expected a positive whole number"),
        ({"BSSCIHUB_LOG_FORMAT": "xml"}, "log.format = 'xml': expected one of text, json"),
        ({"BSSCIHUB_WEB_LISTEN": "8080"}, "web.listen = '8080': expected a Twisted endpoint string"),
        ({"BSSCIHUB_MQTT_URL": "http://x"}, "mqtt.url = 'http://x': expected mqtt://host:port"),
        ({"BSSCIHUB_DATABASE": "mysql://x"}, "database = 'mysql://x': expected sqlite:///FILE"),
        ({"BSSCIHUB_DEVICES_SENSOR_TOPICS": "SensorData/#, a/b#"},
         "devices.sensor_topics = ['SensorData/#', 'a/b#']: expected MQTT topic filters such as SensorData/# or"
         " site/+/data, not 'a/b#'"),
        ({"BSSCIHUB_DEVICES_SENSOR_TOPICS": "[]"},
         "devices.sensor_topics = []: expected at least one MQTT topic filter"),
        ({"BSSCIHUB_WEB_NOPE": "1"}, "web.nope = '1': unknown key"),
        ({"BSSCIHUB_NOSECTION_KEY": "1"}, "BSSCIHUB_NOSECTION_KEY = '1': unknown environment override"),
        ({"BSSCIHUB_FAMILIES": "[mioty, zigbee]"}, None),
    ],
)
def test_bad_values_name_key_value_and_expectation(env: dict[str, str], fragment: str | None) -> None:
    if fragment is None:  # family names are checked against installed plugins by the tap
        from bsscihub.tap import load_hub_config

        with pytest.raises(ConfigError) as info:
            load_hub_config(None, env)
        assert "unknown family 'zigbee'" in str(info.value)
        return
    with pytest.raises(ConfigError) as info:
        load(None, env)
    message = str(info.value)
    assert message.startswith("config error: ")
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_and_section_in_file(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text("mqtt:\n  urll: mqtt://x\n")
    with pytest.raises(ConfigError, match=r"mqtt\.urll = 'mqtt://x': unknown key; known: .*url"):
        load(path)
    path.write_text("mqtty:\n  url: mqtt://x\n")
    with pytest.raises(ConfigError, match="mqtty = .*unknown key"):
        load(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load(path)
    path.write_text("web: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("value", "seconds"), [(0.5, 0.5), (3, 3.0), ("500ms", 0.5), ("5m", 300.0), ("36h", 129600.0), ("7d", 604800.0)]
)
def test_durations(value: object, seconds: float) -> None:
    assert duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", -1, 0, True, "5 weeks"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        duration(value)


def test_masked_config_hides_secrets() -> None:
    config = load(
        None,
        {"BSSCIHUB_MQTT_URL": "mqtt://hub:s3cret@broker:1883", "BSSCIHUB_MQTT_PASSWORD": "pw"},
    )
    masked = config.masked()
    assert masked["mqtt"]["password"] == "***"
    assert masked["mqtt"]["url"] == "mqtt://hub:***@broker:1883"
    assert masked["tls"]["key"] == "***"
    assert "s3cret" not in repr(masked) and "'pw'" not in repr(masked)


def test_sqlite_paths(tmp_path: Path) -> None:
    assert load(None, {"BSSCIHUB_DATA_DIR": "/d"}).sqlite_path == Path("/d/hub.sqlite")
    absolute = load(None, {"BSSCIHUB_DATABASE": "sqlite:////srv/hub.db"})
    assert absolute.sqlite_path == Path("/srv/hub.db")
    assert load(None, {"BSSCIHUB_DATABASE": "postgresql://u@h/db"}).sqlite_path is None


# --- environment overrides are read by the key's own type


@pytest.mark.parametrize(
    ("var", "text", "path", "expected"),
    [
        # strings stay strings: a password or an EUI with leading zeros is not a number
        ("BSSCIHUB_MQTT_PASSWORD", "0123", ("mqtt", "password"), "0123"),
        ("BSSCIHUB_MQTT_PASSWORD", "true", ("mqtt", "password"), "true"),
        ("BSSCIHUB_MQTT_PASSWORD", "1e3", ("mqtt", "password"), "1e3"),
        ("BSSCIHUB_MQTT_PASSWORD", "null", ("mqtt", "password"), "null"),
        ("BSSCIHUB_MQTT_PASSWORD", "[a]", ("mqtt", "password"), "[a]"),
        ("BSSCIHUB_MQTT_USERNAME", "~", ("mqtt", "username"), "~"),
        ("BSSCIHUB_BSSCI_SC_EUI", "0000000000000123", ("bssci", "sc_eui"), "0000000000000123"),
        ("BSSCIHUB_MQTT_PROTOCOL", "5", ("mqtt", "protocol"), "5"),
        ("BSSCIHUB_MQTT_PROTOCOL", "3.1.1", ("mqtt", "protocol"), "3.1.1"),
        ("BSSCIHUB_GATE_SECRET", "0x1F", ("gate", "secret"), "0x1F"),
        # integers are decimal, whatever YAML 1.1 would make of a leading zero
        ("BSSCIHUB_MQTT_KEEPALIVE", "045", ("mqtt", "keepalive"), 45),
        ("BSSCIHUB_MQTT_KEEPALIVE", " 60 ", ("mqtt", "keepalive"), 60),
        # booleans in the usual spellings
        ("BSSCIHUB_TLS_LENIENT", "yes", ("tls", "lenient"), True),
        ("BSSCIHUB_TLS_LENIENT", "On", ("tls", "lenient"), True),
        ("BSSCIHUB_TLS_LENIENT", "1", ("tls", "lenient"), True),
        ("BSSCIHUB_WEB_HTTPS", "false", ("web", "https"), False),
        ("BSSCIHUB_DEVICES_AUTO_REGISTER", "0", ("devices", "auto_register"), False),
        # durations as numbers or with a unit
        ("BSSCIHUB_MIOTY_DEDUP_WINDOW", "0.25", ("mioty", "dedup_window"), 0.25),
        ("BSSCIHUB_MIOTY_DEDUP_WINDOW", "250ms", ("mioty", "dedup_window"), 0.25),
        ("BSSCIHUB_WEB_SESSION_IDLE", "2h", ("web", "session_idle"), 7200.0),
        ("BSSCIHUB_WEB_SESSION_IDLE", "90", ("web", "session_idle"), 90.0),
        # lists as "a, b" or as a YAML flow sequence
        ("BSSCIHUB_BLE_TOPICS", "gw/+/data, BLEGatewayData/#", ("ble", "topics"), ("gw/+/data", "BLEGatewayData/#")),
        ("BSSCIHUB_BLE_TOPICS", '["a/#", "b/+"]', ("ble", "topics"), ("a/#", "b/+")),
        ("BSSCIHUB_FAMILIES", "mioty, ble", ("families",), ("mioty", "ble")),
        ("BSSCIHUB_FAMILIES", "[mioty]", ("families",), ("mioty",)),
        ("BSSCIHUB_DATA_DIR", "0123", ("data_dir",), Path("0123")),
    ],
)
def test_environment_overrides_are_read_by_the_keys_type(
    var: str, text: str, path: tuple[str, ...], expected: object
) -> None:
    config = load(HUB_YAML, {var: text})
    value = getattr(config, path[0]) if len(path) == 1 else getattr(config.section(path[0]), path[1])
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("var", "text", "fragment"),
    [
        ("BSSCIHUB_TLS_LENIENT", "maybe", "tls.lenient = 'maybe': expected true or false"),
        ("BSSCIHUB_MQTT_KEEPALIVE", "1.5", "mqtt.keepalive = '1.5': expected a positive whole number"),
        ("BSSCIHUB_MQTT_KEEPALIVE", "0x10", "mqtt.keepalive = '0x10': expected a positive whole number"),
        ("BSSCIHUB_MQTT_KEEPALIVE", "", "mqtt.keepalive = '': expected a positive whole number"),
        ("BSSCIHUB_MQTT_PROTOCOL", "5.0", "mqtt.protocol = '5.0': expected one of 5, 3.1.1"),
        ("BSSCIHUB_WEB_SESSION_IDLE", "soon", "web.session_idle = 'soon': expected a duration"),
        ("BSSCIHUB_BLE_TOPICS", "[a/#, 7]", "ble.topics = ['a/#', 7]: expected a list of names"),
    ],
)
def test_environment_values_that_do_not_fit_the_type_name_the_key(var: str, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(HUB_YAML, {var: text})
    assert fragment in str(info.value)


def test_masked_config_hides_passwords_in_every_url() -> None:
    masked = load(
        None,
        {
            "BSSCIHUB_DATABASE": "postgresql://hub:dbsecret@db/hub",
            "BSSCIHUB_GATE_DYNSEC_URL": "mqtt://admin:dynsecret@broker:1883",
            "BSSCIHUB_GATE_SECRET": "gatesecret",
        },
    ).masked()
    assert masked["database"] == "postgresql://hub:***@db/hub"
    assert masked["gate"]["dynsec_url"] == "mqtt://admin:***@broker:1883"
    assert masked["gate"]["secret"] == "***"
    assert not any(s in repr(masked) for s in ("dbsecret", "dynsecret", "gatesecret"))


def test_a_config_error_shows_no_secret_value_and_no_url_password(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"password": ["hunter2-in-a-list"]}}))
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert str(raised.value) == "config error: mqtt.password = '***': expected a string"
    with pytest.raises(ConfigError) as raised:
        load(env={"BSSCIHUB_MQTT_URL": "mqttx://hub:pw-77x@broker"})
    assert str(raised.value).startswith("config error: mqtt.url = 'mqttx://hub:***@broker': expected ")
    assert raised.value.value == "mqttx://hub:pw-77x@broker", "the exception keeps the value for code"
