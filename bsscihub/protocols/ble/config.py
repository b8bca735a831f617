"""Configuration of the BLE family (section `ble`), validated like the core sections.

Kept free of the family's implementation so that reading the config never imports it.
"""

from __future__ import annotations

from typing import Any

import attrs

from bsscihub.config import _limit, _names, _positive_int, duration, setting


def topic_filters(value: Any) -> tuple[str, ...]:
    """MQTT topic filters: '+' and '#' only as whole levels, '#' last, no '$' topics."""
    filters = _names(value)
    if not filters:
        raise ValueError("expected at least one MQTT topic filter")
    for f in filters:
        levels = f.split("/")
        bad = (
            not f
            or f.startswith("$")
            or any(("+" in level or "#" in level) and level not in ("+", "#") for level in levels)
            or "#" in levels[:-1]
        )
        if bad:
            raise ValueError(f"expected MQTT topic filters such as BLEGatewayData/#, not {f!r}")
    return filters


@attrs.frozen
class BLEConfig:
    topics: tuple[str, ...] = setting(("BLEGatewayData/#",), topic_filters, "topic filters the gateways publish on")
    dedup_window: float = setting(1.0, duration, "time to collect one beacon's copies from several gateways")
    gateway_timeout: float = setting(300.0, duration, "silence after which a gateway is marked offline")
    max_payload: int = setting(65536, _positive_int, "largest gateway message accepted, in bytes")
    retention: float = setting(30 * 86400.0, duration, "how long readings are kept")
    max_gateways: int = setting(1000, _limit, "most gateways registered on first sight (0: no limit)")
    max_nodes: int = setting(100_000, _limit, "most beacons registered on first sight (0: no limit)")
    registrations_per_minute: int = setting(
        600, _limit, "new gateways or beacons a minute per source (0: no limit)")
