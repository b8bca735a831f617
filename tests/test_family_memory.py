"""Family behaviour that depends on time, without a broker or sleeps: BLE's dedup window and silent
gateways, devices going offline when silent. Time is a Clock the test advances; every event is also
checked against the family's EventSpecs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from tests.memory_bridge import running_family, stop_family, until

T0 = 1_700_000_000.0


def _clock() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


def _of(witness: Any, kind: str) -> list[Any]:
    return [e for e in witness.events if e.kind == kind]


@pytest_twisted.ensureDeferred
async def test_ble_copies_merge_within_the_window_and_silent_gateways_go_offline_and_back(tmp_path: Path) -> None:
    clock = _clock()
    hub, bridge, witness = await running_family(tmp_path, "ble", clock, ble={"dedup_window": "1s",
                                                                             "gateway_timeout": "60s"})
    try:
        for gateway, rssi in (("GW001", -71), ("GW002", -60)):
            bridge.deliver("BLEGatewayData", {"gateway_id": gateway, "mac": "11:22:33:44:55:66", "rssi": rssi,
                                              "temperature": 22})
        clock.advance(0.5)
        assert _of(witness, "up") == [], "still within the dedup window"
        clock.advance(0.6)
        await until(lambda: _of(witness, "up"), "the reading")
        [up] = _of(witness, "up")
        assert [r["gatewayId"] for r in up.payload["receivers"]] == ["GW002", "GW001"], "nearest first"
        assert [e.payload["state"] for e in _of(witness, "gateway_state")] == ["online", "online"]

        clock.advance(58)  # heard at T0; now T0 + 59.1
        assert len(_of(witness, "gateway_state")) == 2, "not silent for gateway_timeout yet"
        clock.advance(16)  # past the timeout and the next check (every timeout/4, at most 15 s)
        await until(lambda: len(_of(witness, "gateway_state")) == 4, "both gateways offline")
        offline = _of(witness, "gateway_state")[2:]
        assert {e.payload["gatewayId"] for e in offline} == {"GW001", "GW002"}
        assert all(e.payload["state"] == "offline" and e.retain for e in offline)

        bridge.deliver("BLEGatewayData", {"gateway_id": "GW002", "mac": "11:22:33:44:55:66", "rssi": -50})
        await until(lambda: len(_of(witness, "gateway_state")) == 5, "GW002 back online")
        assert _of(witness, "gateway_state")[4].payload["state"] == "online"
    finally:
        await stop_family(hub)
    assert witness.problems == []


@pytest_twisted.ensureDeferred
async def test_a_silent_device_goes_offline_after_offline_after(tmp_path: Path) -> None:
    clock = _clock()
    hub, bridge, witness = await running_family(tmp_path, "devices", clock, devices={"offline_after": "10m"})
    try:
        bridge.deliver("device/esp32-01/telemetry/temperature", b"21.5")
        await until(lambda: _of(witness, "status"), "online")
        assert _of(witness, "status")[0].payload["state"] == "online"
        clock.advance(9 * 60)
        assert len(_of(witness, "status")) == 1
        clock.advance(60 + 150)  # past offline_after and the next check (every offline_after/4, at most 15 s)
        await until(lambda: len(_of(witness, "status")) == 2, "offline")
        offline = _of(witness, "status")[1]
        assert (offline.payload["state"], offline.payload["detail"], offline.retain) == (
            "offline", {"reason": "silent"}, True)
    finally:
        await stop_family(hub)
    assert witness.problems == []
