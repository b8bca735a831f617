"""Configuration of the `devices` family (section `devices`), validated like the core sections.

Kept free of the family's implementation so that reading the config never imports it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from bsscihub.config import (
    ConfigError,
    _bool,
    _limit,
    _positive_int,
    _str,
    _topic_root,
    duration,
    mqtt_url_or_empty,
    one_of,
    setting,
    topic_filters,
)


def _base_url(value: Any) -> str:
    text = _str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected the hub's URL as devices reach it, e.g. https://hub.example.net:8080")
    return text


@attrs.frozen
class DevicesConfig:
    sensor_topics: tuple[str, ...] = setting(("SensorData/#",), topic_filters,
                                             'topic filters of {"device_id", "type", "value"} messages')
    device_root: str = setting("device", _topic_root, "root of device/{id}/telemetry/{type}, /status, /commands")
    ota_root: str = setting("OTA", _topic_root, "root of OTA/{id}/update (to devices) and OTA/{id}/response")
    auto_register: bool = setting(True, _bool, "register unknown devices on first sight (else reject them)")
    command_timeout: float = setting(30.0, duration, "a command not answered in time is marked timeout")
    ota_timeout: float = setting(3600.0, duration, "an OTA offer without a final answer in time is marked timeout")
    ota_base_url: str = setting("http://127.0.0.1:8080", _base_url, "the hub's URL in firmware links sent to devices")
    max_payload: int = setting(16384, _positive_int, "largest device message accepted, in bytes")
    max_firmware: int = setting(8 << 20, _positive_int, "largest firmware image accepted, in bytes")
    retention: float = setting(30 * 86400.0, duration, "how long telemetry is kept")
    offline_after: float = setting(600.0, duration, "a device silent this long is marked offline")
    max_devices: int = setting(10_000, _limit, "most devices registered on first sight (0: no limit)")
    registrations_per_minute: int = setting(
        60, _limit, "devices registered on first sight a minute per source (0: no limit)")
    broker_provisioning: str = setting(
        "none", one_of("none", "dynsec"), "dynsec: a broker account per device key (dynamic-security plugin)")
    dynsec_url: str = setting("", mqtt_url_or_empty, "broker for dynsec control (empty: mqtt.url)")
    dynsec_username: str = setting("", _str, "dynamic-security admin user")
    dynsec_password: str = setting("", _str, "dynamic-security admin password", secret=True)
    device_mqtt_url: str = setting("", mqtt_url_or_empty, "broker URL told to devices (empty: mqtt.url)")

    def __attrs_post_init__(self) -> None:
        if self.broker_provisioning == "dynsec" and not self.dynsec_username:
            raise ConfigError("devices.dynsec_username", self.dynsec_username,
                              "the dynamic-security admin user, since devices.broker_provisioning is dynsec")
