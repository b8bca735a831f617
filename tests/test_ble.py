"""The BLE family: gateways and beacons register, copies deduplicate into one reading (nearest gateway
first), silent gateways go offline, REST and pages show it, bad input is dropped. One test runs against
a real mosquitto; the others on a broker in memory (tests.memory_bridge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from bsscihub.ingest import Rejected
from bsscihub.protocols.ble.service import normalize_mac, parse_sighting
from tests.broker import Mosquitto
from tests.memory_bridge import FollowingClock
from tests.test_families import (
    PREFIX,
    RFC3339,
    DeviceClient,
    MemoryHub,
    eventually,
    memory_hub,
    payloads,
    start_hub,
)

__all__ = ["memory_hub"]  # fixture

MAC = "112233445566"
UP = f"{PREFIX}/ble/node/{MAC}/up"


def reading(gateway: str, rssi: int, mac: str = "11:22:33:44:55:66", **values: Any) -> dict[str, Any]:
    return {"gateway_id": gateway, "mac": mac, "rssi": rssi, **values}


@pytest.mark.parametrize("text", ["11:22:33:44:55:66", "11-22-33-44-55-66", "1122.3344.5566", "112233445566",
                                  "11:22:33:44:55:66".upper()])
def test_macs_are_normalized(text: str) -> None:
    assert normalize_mac(text) == MAC


@pytest.mark.parametrize(("doc", "reason"), [
    ({"gateway_id": "GW1", "rssi": -70}, "missing_field"),
    ({"mac": MAC, "rssi": -70}, "missing_field"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": "strong"}, "wrong_type"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": True}, "wrong_type"),
    ({"gateway_id": ["GW1"], "mac": MAC, "rssi": -70}, "wrong_type"),
    ({"gateway_id": "GW1", "mac": 112233445566, "rssi": -70}, "wrong_type"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": -70, "temperature": "22"}, None),  # text fields are ignored
    ({"gateway_id": "GW1", "mac": "11:22:33", "rssi": -70}, "implausible"),
    ({"gateway_id": "GW/1", "mac": MAC, "rssi": -70}, "implausible"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": 20}, "implausible"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": -70, "humidity": 150}, "implausible"),
    ({"gateway_id": "GW1", "mac": MAC, "rssi": -70, "Bad Name": 1}, "implausible"),
    ("GW1", "wrong_type"),
])
def test_sightings_are_validated(doc: Any, reason: str | None) -> None:
    if reason is None:
        assert parse_sighting(doc, None).values == {}
        return
    with pytest.raises(Rejected) as caught:
        parse_sighting(doc, None)
    assert caught.value.reason == reason


def test_earlier_platforms_readings_without_rssi() -> None:
    """What the platforms the hub replaces send: no rssi; temperature and humidity as quantities."""
    sighting = parse_sighting({"gateway_id": "GW001", "mac": "11:22:33:44:55:66", "temperature": 22,
                               "humidity": 65}, None)
    assert (sighting.gateway, sighting.mac, sighting.rssi) == ("GW001", MAC, None)
    assert sighting.values == {"temperature": 22.0, "humidity": 65.0}


@pytest.mark.parametrize(("value", "why"), [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                            (float("-inf"), "-Infinity")])
def test_non_finite_quantities_become_null_with_the_reason(value: float, why: str) -> None:
    sighting = parse_sighting({"gateway_id": "GW1", "mac": MAC, "rssi": -70, "temperature": value,
                               "humidity": 40}, None)
    assert sighting.values == {"humidity": 40.0}
    assert sighting.invalid == {"temperature": why}


@pytest_twisted.ensureDeferred
async def test_earlier_platforms_gateways_end_to_end(tmp_path: Path, mosquitto: Mosquitto,
                                                     subscriber_factory: Any) -> None:
    """A gateway of the platforms the hub replaces, unchanged: no rssi; NaN (which such firmware writes
    for a failed sensor) is published as null with the reason; every time is RFC 3339."""
    witness = subscriber_factory(mosquitto, f"{PREFIX}/ble/#")
    running = await start_hub(tmp_path, mosquitto, ["ble"], ble={"dedup_window": "50ms"})
    gateway = DeviceClient(mosquitto)
    try:
        await gateway.publish("BLEGatewayData/GW001", {"gateway_id": "GW001", "mac": "11:22:33:44:55:66",
                                                       "temperature": 22, "humidity": 65})
        [first] = [m.payload for m in await witness.when(lambda m: m.topic == UP)]
        up = json.loads(first)
        assert (up["values"], up["rssi"], up["receivers"]) == (
            {"temperature": 22.0, "humidity": 65.0}, None, [{"gatewayId": "GW001", "rssi": None}])
        assert RFC3339.match(up["time"]) and "invalid" not in up
        await gateway.publish("BLEGatewayData/GW001", b'{"gateway_id": "GW001", "mac": "112233445566",'
                                                      b' "temperature": NaN, "humidity": 64, "rssi": -61}')
        await witness.when(lambda m: m.topic == UP, count=2)
        second = payloads(witness, UP)[1]
        assert (second["values"], second["rssi"], second["invalid"]) == ({"humidity": 64.0}, -61,
                                                                         {"temperature": "NaN"})
        await eventually(lambda: running.hub.services["ble"].readings_stored >= 2, what="readings stored")
        rows = await running.hub.store.fetchall(
            "SELECT quantity, value FROM ble_samples WHERE mac = ? ORDER BY time, quantity", (MAC,))
        assert rows == [("humidity", 65.0), ("temperature", 22.0), ("humidity", 64.0)]
        state = payloads(witness, f"{PREFIX}/ble/gw/GW001/state")[0]
        assert RFC3339.match(state["since"]) and RFC3339.match(state["lastSeen"])
        code, node = await running.api("GET", f"/api/v1/ble/nodes/{MAC}")
        assert code == 200 and node["rssi"] == -61
        assert RFC3339.match(node["firstSeen"]) and RFC3339.match(node["lastSeen"])
        code, readings = await running.api("GET", f"/api/v1/ble/nodes/{MAC}/readings")
        assert code == 200 and set(readings) == {"items", "total", "limit", "offset"}
        assert all(RFC3339.match(r["time"]) for r in readings["items"])
        code, series = await running.api("GET", f"/api/v1/ble/nodes/{MAC}/series?quantity=humidity")
        assert RFC3339.match(series["since"]) and all(RFC3339.match(p["time"]) for p in series["points"])
        assert running.rejected("ble", "not_json") == 0
    finally:
        gateway.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_gateways_and_beacons_end_to_end(memory_hub: MemoryHub) -> None:
    clock = FollowingClock().start()  # moved ahead where the test would wait for the dedup window or silence
    running, witness, gateway = await memory_hub(["ble"], [f"{PREFIX}/ble/#"], clock,
                                                 ble={"dedup_window": "1s", "gateway_timeout": "3s"})
    # One broadcast heard by two gateways (MACs written differently): one reading, nearest first.
    await gateway.publish("BLEGatewayData/GW001", reading("GW001", -71, temperature=22, humidity=65))
    await gateway.publish("BLEGatewayData/GW002", reading("GW002", -60, mac="11-22-33-44-55-66", temperature=22,
                                                          humidity=65))
    [up] = [m.payload for m in await witness.when(lambda m: m.topic == UP)]
    clock.advance(1.1)  # a late copy would make a second reading by now
    [first] = payloads(witness, UP)
    assert first["receivers"] == [{"gatewayId": "GW002", "rssi": -60}, {"gatewayId": "GW001", "rssi": -71}]
    assert (first["mac"], first["gatewayId"], first["rssi"]) == ("11:22:33:44:55:66", "GW002", -60)
    assert first["values"] == {"temperature": 22.0, "humidity": 65.0}

    # The next broadcast, heard by one gateway only; the same gateway again starts a new reading at once.
    await gateway.publish("BLEGatewayData", reading("GW001", -70, temperature=23, humidity=64))
    await gateway.publish("BLEGatewayData", reading("GW001", -69, temperature=24, humidity=64))
    await witness.when(lambda m: m.topic == UP, count=3)
    assert [p["values"]["temperature"] for p in payloads(witness, UP)] == [22.0, 23.0, 24.0]

    registered = [m.topic for m in witness.messages if m.topic.endswith("/event/registered")]
    assert sorted(registered) == sorted([f"{PREFIX}/ble/gw/GW001/event/registered",
                                         f"{PREFIX}/ble/gw/GW002/event/registered",
                                         f"{PREFIX}/ble/node/{MAC}/event/registered"])
    online = payloads(witness, f"{PREFIX}/ble/gw/GW001/state")
    assert online[0]["state"] == "online"
    assert [m.retain for m in witness.messages if m.topic == f"{PREFIX}/ble/gw/GW001/state"][0] is True

    # Stored: a time series per quantity, and the readings with their receivers.
    hub = running.hub
    await eventually(lambda: running.hub.services["ble"].readings_stored >= 3, what="readings stored")
    rows = await hub.store.fetchall(
        "SELECT quantity, value FROM ble_samples WHERE mac = ? ORDER BY time, quantity", (MAC,))
    assert rows == [("humidity", 65.0), ("temperature", 22.0), ("humidity", 64.0), ("temperature", 23.0),
                    ("humidity", 64.0), ("temperature", 24.0)]

    # The REST view.
    code, gateways = await running.api("GET", "/api/v1/ble/gateways")
    assert code == 200 and gateways["total"] == 2
    assert [g["gatewayId"] for g in gateways["items"]] == ["GW001", "GW002"], "most recently heard first"
    assert gateways["items"][0]["state"] == "online" and gateways["items"][0]["messages"] == 3
    code, node = await running.api("GET", "/api/v1/ble/nodes/11:22:33:44:55:66")
    assert code == 200
    assert (node["values"], node["readings"], node["gatewayId"]) == ({"temperature": 24.0, "humidity": 64.0}, 3,
                                                                      "GW001")
    code, readings = await running.api("GET", f"/api/v1/ble/nodes/{MAC}/readings")
    assert [len(r["receivers"]) for r in readings["items"]] == [1, 1, 2]
    code, series = await running.api("GET", f"/api/v1/ble/nodes/{MAC}/series?quantity=temperature&points=1"
                                            f"&since={hub.reactor.seconds() - 60}")
    assert code == 200 and series["bucket"] >= 60
    assert [(p["avg"], p["min"], p["max"], p["count"]) for p in series["points"]] == [(23.0, 22.0, 24.0, 3)]
    assert (await running.api("GET", "/api/v1/ble/nodes/aabbccddeeff"))[0] == 404
    assert (await running.api("GET", "/api/v1/ble/nodes/nonsense"))[0] == 400
    assert (await running.api("GET", "/api/v1/ble/gateways", token=None))[0] == 401

    # The admin pages.
    code, html = await running.page("/ble")
    assert code == 200 and "GW001" in html and "11:22:33:44:55:66" in html
    code, html = await running.page(f"/ble/nodes/{MAC}")
    assert code == 200 and 'id="chart-temperature"' in html and "GW002" in html
    code, html = await running.page("/ble/gateways/GW001")
    assert code == 200 and "11:22:33:44:55:66" in html

    # Silence: both gateways go offline, with a retained state event each.
    clock.advance(4)
    for gid in ("GW001", "GW002"):
        await witness.when(lambda m, g=gid: m.topic == f"{PREFIX}/ble/gw/{g}/state" and b'"offline"' in m.payload,
                           timeout=10)
    code, gw = await running.api("GET", "/api/v1/ble/gateways/GW002")
    assert gw["state"] == "offline" and gw["nearestNodes"] == []
    # ... and back online when heard again.
    await gateway.publish("BLEGatewayData", reading("GW002", -50))
    await witness.when(lambda m: m.topic == f"{PREFIX}/ble/gw/GW002/state" and b'"online"' in m.payload,
                       count=2)

    # Forgetting a gateway clears its retained state.
    assert (await running.api("DELETE", "/api/v1/ble/gateways/GW001"))[0] == 204
    await witness.when(lambda m: m.topic == f"{PREFIX}/ble/gw/GW001/state" and m.payload == b"" and m.retain)
    assert (await running.api("GET", "/api/v1/ble/gateways/GW001"))[0] == 404

    # A command over MQTT: forget the node.
    await gateway.publish(f"{PREFIX}/ble/node/{MAC}/cmd/forget", {})
    [result] = [m.payload for m in await witness.when(lambda m: m.topic.endswith(f"{MAC}/event/cmd_result"))]
    assert b'"ok":true' in result.replace(b" ", b"")
    assert (await running.api("GET", f"/api/v1/ble/nodes/{MAC}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_bad_gateway_input_is_counted_and_dropped(memory_hub: MemoryHub) -> None:
    running, witness, gateway = await memory_hub(["ble"], [f"{PREFIX}/ble/#"],
                                                 ble={"dedup_window": "50ms", "max_payload": 512})
    bad = [
        b"{not json",
        b"\xff\xfe",
        reading("GW001", -70) | {"mac": None},
        {"gateway_id": "GW001", "rssi": -70},
        reading("GW001", "loud"),  # type: ignore[arg-type]
        reading("GW001", -70, humidity=150),
        {"gateway_id": "GW001", "mac": MAC, "rssi": -70, "padding": "x" * 600},
        [reading("GW001", -70, mac="aa:bb:cc:dd:ee:01", temperature=21), reading("GW001", 5, mac="aa:bb")],
    ]
    for message in bad:
        await gateway.publish("BLEGatewayData", message)
    await gateway.publish("BLEGatewayData", reading("GW001", -80, mac="aa:bb:cc:dd:ee:02", temperature=20))
    # Nothing stops later messages: the good entry of the batch and the last message both arrive.
    await witness.when(lambda m: m.topic == f"{PREFIX}/ble/node/aabbccddee02/up")
    assert payloads(witness, f"{PREFIX}/ble/node/aabbccddee01/up")[0]["values"] == {"temperature": 21.0}
    assert not any(m.topic == UP for m in witness.messages)
    assert {reason: running.rejected("ble", reason) for reason in
            ("not_json", "missing_field", "wrong_type", "implausible", "oversized")} == {
        "not_json": 2, "missing_field": 2, "wrong_type": 1, "implausible": 2, "oversized": 1}
    assert running.rejected("ble", "internal") == 0
    # Every rejection came from GW001 or its topic: logged once, the rest counted silently.
    assert running.hub.services["ble"].ingest.reject_log.lines == 2


@pytest_twisted.ensureDeferred
async def test_registration_on_first_sight_is_bounded(memory_hub: MemoryHub) -> None:
    """A gateway inventing MACs cannot grow the registry without end: a cap on beacons, a rate per gateway."""
    running, witness, gateway = await memory_hub(["ble"], [f"{PREFIX}/ble/#"], ble={
        "dedup_window": "50ms", "max_nodes": 3, "registrations_per_minute": 2, "max_gateways": 1})
    macs = [f"aa:bb:cc:dd:ee:0{i}" for i in range(4)]
    for mac in macs[:3]:  # GW1's third new beacon this minute is one too many
        await gateway.publish("BLEGatewayData", reading("GW1", -70, mac=mac, temperature=20))
    await gateway.publish("BLEGatewayData", reading("GW2", -70, mac=macs[2], temperature=20))  # one gateway only
    await gateway.publish("BLEGatewayData", reading("GW1", -60, mac=macs[0], temperature=21))  # known: fine
    await witness.when(lambda m: m.topic == f"{PREFIX}/ble/node/aabbccddee00/up", count=2)
    service = running.hub.services["ble"]
    assert set(service.nodes) == {"aabbccddee00", "aabbccddee01"} and set(service.gateways) == {"GW1"}
    assert running.rejected("ble", "registration_limit") == 2
