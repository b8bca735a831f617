"""Configuration sections of the mioty family: `bssci` (the base-station listener) and `mioty` (sensors).

Validated like the core sections; every key is documented in etc/hub.yaml.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import yaml

from bsscihub.config import _bool, _endpoint, _positive_int, _str, duration, setting
from bsscihub.contract import eui64


def _eui(value: Any) -> str:
    eui = eui64(_str(value))
    if eui is None:
        raise ValueError("expected an EUI-64 as 16 hex digits")
    return eui


def _version(value: Any) -> str:
    text = _str(value)
    if not re.fullmatch(r"\d+\.\d+\.\d+", text):
        raise ValueError("expected a version major.minor.patch, e.g. 1.0.0")
    return text


def _window_or_off(value: Any) -> float:
    if value is False or value == "off" or (type(value) in (int, float) and value == 0):
        return 0.0
    try:
        return duration(value)
    except ValueError:
        raise ValueError("expected 0 (off) or a duration, e.g. 30s, 2m") from None


@attrs.frozen
class BSSCIConfig:
    listen: str = setting(
        "tcp:16017:backlog=1024", _endpoint, "endpoint of the BSSCI listener; the hub adds mutual TLS"
    )
    sc_eui: str = setting("70b3d59cd0000000", _eui, "the service center's EUI-64 sent in conRsp")
    version: str = setting("1.0.0", _version, "BSSCI version the hub speaks; every 1.x base station is served")
    status_interval: float = setting(300.0, duration, "how often each base station is polled for status")
    ping_idle: float = setting(60.0, duration, "idle time after which the hub pings a base station")
    ping_timeout: float = setting(30.0, duration, "a base station that does not answer a ping in time is dropped")
    op_timeout: float = setting(60.0, duration, "an SC-initiated operation not answered in time is abandoned")
    max_frame: int = setting(1 << 20, _positive_int, "largest accepted frame payload in bytes")
    propagate_window: int = setting(64, _positive_int, "attPrp/detPrp operations in flight per base station")
    self_register: bool = setting(
        False, _bool, "an unknown base station with a certificate bound to no EUI may register itself (pinned to it)"
    )
    max_connections: int = setting(4096, _positive_int, "open BSSCI connections at most; more are closed at accept")
    max_handshakes: int = setting(
        1024, _positive_int, "TLS handshakes in progress at most; connections beyond are closed at accept"
    )
    handshake_timeout: float = setting(30.0, duration, "a connection without a finished TLS handshake by then is cut")
    resume_window: float = setting(
        0.0, _window_or_off,
        "a base station reconnecting with the same snBsUuid within this time resumes its session; 0: never",
    )


_VM_DECODERS = ("wmbus", "raw")


def _vm_mac_types(value: Any) -> dict[int, str]:
    if value is None:
        return {}
    if isinstance(value, str):  # from the environment: "{1: wmbus, 7: raw}" or "1: wmbus, 7: raw"
        text = value.strip()
        try:
            value = yaml.safe_load(text if text.startswith("{") else "{" + text + "}")
        except yaml.YAMLError:
            pass
    if not isinstance(value, dict) or not all(
        type(k) is int and 0 <= k < 1 << 32 and v in _VM_DECODERS for k, v in value.items()
    ):
        raise ValueError("expected a mapping of Variable-MAC type (an integer) to wmbus or raw, e.g. {1: wmbus}")
    return dict(value)


@attrs.frozen
class MiotyConfig:
    dedup_window: float = setting(0.5, duration, "seconds to collect copies of one uplink from several base stations")
    inactivity_warning: float = setting(129600.0, duration, "silence after which a sensor gets an inactivity_warning")
    auto_detach: float = setting(259200.0, duration, "silence after which a sensor is detached automatically")
    uplink_retention: float = setting(2592000.0, duration, "how long uplink history is kept")
    dedup_memory: int = setting(200_000, _positive_int, "most recent uplink keys remembered to drop late copies")
    flush_interval: float = setting(
        5.0, duration, "how often sensor state is written back and sensor changes by other processes are taken in"
    )
    vm_mac_types: dict[int, str] = setting(
        {1: "wmbus"}, _vm_mac_types,
        "Variable-MAC types activated at base stations that offer them, and how their frames are decoded",
    )
    downlink_ttl: float = setting(
        86400.0, duration, "a downlink not reported sent this long after it was queued expires"
    )


def _endpoint_or_off(value: Any) -> str:
    if value in (None, False, "", "off"):
        return ""
    return _endpoint(value)


@attrs.frozen
class ScaciConfig:
    listen: str = setting(
        "", _endpoint_or_off,
        "endpoint of the SCACI listener for mioty application centers (e.g. tcp:16019); empty: off",
    )
    eui_strings: bool = setting(
        False, _bool, "send EUIs to application centers as 16 hex digits instead of integers (BSSCI style)",
    )
