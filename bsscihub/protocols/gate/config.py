"""The `gate:` configuration section (imported by the plugin at start-up, so it imports nothing heavy).

Every key is documented in etc/hub.yaml; the checks that span several keys run when the section is built.
"""

from __future__ import annotations

from typing import Any

import attrs

from bsscihub.config import ConfigError, _positive_int, _str, _topic_root, duration, mqtt_url_or_empty, one_of, setting

MAX_FILE_BYTES = 8 << 20
"""The web layer reads no request body beyond 8 MiB (bsscihub.web.service.MAX_BODY)."""


def _file_size(value: Any) -> int:
    size = _positive_int(value)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"expected at most {MAX_FILE_BYTES} bytes (the web layer's request limit)")
    return size


def _base_url_or_empty(value: Any) -> str:
    text = _str(value).rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected empty (use the request's Host) or an http:// or https:// base URL")
    return text


@attrs.frozen
class GateConfig:
    topic_root: str = setting("gatetorio", _topic_root, "device-side root: {root}/{controller_id}/status|commands")
    broker_provisioning: str = setting(
        "none", one_of("none", "dynsec"), "dynsec: one broker client per unit via the dynamic-security plugin"
    )
    dynsec_url: str = setting("", mqtt_url_or_empty, "broker for dynsec control (empty: mqtt.url)")
    dynsec_username: str = setting("", _str, "dynamic-security admin user")
    dynsec_password: str = setting("", _str, "dynamic-security admin password", secret=True)
    unit_mqtt_url: str = setting("", mqtt_url_or_empty, "broker URL told to units (empty: mqtt.url, no credentials)")
    public_url: str = setting("", _base_url_or_empty, "base URL of the hub in signed file URLs (empty: request Host)")
    secret: str = setting("", _str, "key for token hashes and URL signatures (empty: keys_dir/gate.key)", secret=True)
    offline_after: float = setting(90.0, duration, "a unit silent this long is offline")
    command_timeout: float = setting(30.0, duration, "a command unanswered this long times out")
    max_queued_commands: int = setting(
        10, _positive_int, "commands kept for an offline unit; beyond, the oldest fails")
    status_history: int = setting(1000, _positive_int, "status messages kept per unit")
    max_status_bytes: int = setting(65536, _positive_int, "largest status message accepted")
    url_ttl: float = setting(900.0, duration, "lifetime of a signed file URL")
    max_file_size: int = setting(MAX_FILE_BYTES, _file_size, "largest file uploaded or pushed, in bytes")
    share_max_ttl: float = setting(604800.0, duration, "longest expiry of a sharing token")

    def __attrs_post_init__(self) -> None:
        if self.broker_provisioning == "dynsec" and not self.dynsec_username:
            raise ConfigError("gate.dynsec_username", self.dynsec_username,
                              "the dynamic-security admin user, since gate.broker_provisioning is dynsec")
