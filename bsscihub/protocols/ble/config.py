"""Configuration of the BLE family (section `ble`), validated like the core sections.

Kept free of the family's implementation so that reading the config never imports it.
"""

from __future__ import annotations

import attrs

from bsscihub.config import _limit, _positive_int, duration, setting, topic_filters


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
