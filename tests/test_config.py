"""Configuration: the documented file, defaults, environment overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import yaml

from bsscihub.config import CORE_SECTIONS, TOP_LEVEL, ConfigError, duration, load_config
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
    for name, cls in {**CORE_SECTIONS, **SECTIONS}.items():
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
        ({"BSSCIHUB_WEB_LISTEN": "8080"}, "web.listen = 8080: expected a Twisted endpoint string"),
        ({"BSSCIHUB_MQTT_URL": "http://x"}, "mqtt.url = 'http://x': expected mqtt://host:port"),
        ({"BSSCIHUB_DATABASE": "mysql://x"}, "database = 'mysql://x': expected sqlite:///FILE"),
        ({"BSSCIHUB_WEB_NOPE": "1"}, "web.nope = 1: unknown key"),
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
