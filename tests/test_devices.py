"""The `devices` family: registry, telemetry and downsampled series, status, commands with tracked
results, device keys for HTTPS, OTA, and every kind of bad input (counted, dropped). One test runs against
a real mosquitto; the others on a broker in memory (tests.memory_bridge)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, formatEvent

from bsscihub.contract import rfc3339
from bsscihub.ingest import Ingest, RegistrationLimit, Rejected
from bsscihub.protocols.devices.schema import MIGRATIONS
from bsscihub.series import DAY, bucketed, time_range
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from bsscihub.web.errors import ApiError
from tests.broker import Mosquitto
from tests.memory_bridge import FollowingClock, MemoryBroker
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

DEV = f"{PREFIX}/dev/device"
T0 = 1_700_000_000.0


def events(witness: Any, device: str, suffix: str) -> list[Any]:
    return payloads(witness, f"{DEV}/{device}/{suffix}")


@pytest_twisted.ensureDeferred
async def test_telemetry_status_registry_series_rest_and_pages(
    tmp_path: Path, mosquitto: Mosquitto, subscriber_factory: Any
) -> None:
    witness = subscriber_factory(mosquitto, f"{PREFIX}/dev/#")
    running = await start_hub(tmp_path, mosquitto, ["devices"])
    device = DeviceClient(mosquitto)
    try:
        for i in range(6):
            await device.publish("SensorData/esp32-01", {"device_id": "esp32-01", "type": "temperature",
                                                         "value": i + 1, "time": T0 + 10 * i})
        await device.publish("SensorData", {"device_id": 7, "type": "co2", "value": 612})
        await device.publish("device/esp32-02/telemetry/humidity", b"55")
        await device.publish("device/esp32-02/telemetry/humidity", {"value": 56.5})
        await device.publish("device/esp32-02/status", b"online")
        await device.publish("device/esp32-02/status", {"state": "online", "firmware": "1.0.0", "rssi": -60})
        await witness.when(lambda m: m.topic == f"{DEV}/esp32-02/status", count=3)
        await witness.when(lambda m: m.topic == f"{DEV}/esp32-02/up", count=2)

        # Events: registered once per device, one `up` per value, the status retained.
        assert [e["via"] for e in events(witness, "esp32-01", "event/registered")] == ["mqtt"]
        assert len(events(witness, "7", "event/registered")) == 1
        ups = events(witness, "esp32-01", "up")
        assert [u["value"] for u in ups] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        assert ups[0] == {"deviceId": "esp32-01", "type": "temperature", "value": 1.0, "time": rfc3339(T0),
                          "via": "mqtt",
                          "values": {"temperature": 1.0}}
        assert [u["value"] for u in events(witness, "esp32-02", "up")] == [55.0, 56.5]
        status = events(witness, "esp32-02", "status")
        # Online as soon as it speaks (telemetry first here), then its own status messages.
        assert [s["state"] for s in status] == ["online"] * 3 and status[2]["detail"]["firmware"] == "1.0.0"
        assert status[0]["detail"] == {} and RFC3339.match(status[0]["time"])
        assert [s["state"] for s in events(witness, "esp32-01", "status")] == ["online"]
        assert all(m.retain for m in witness.messages if m.topic.endswith("/status"))

        # Stored and queryable by device, type and time range; downsampled by the database.
        service = running.hub.services["devices"]
        await eventually(lambda: service.stored == 9, what="telemetry stored")
        code, found = await running.api("GET", f"/api/v1/devices/esp32-01/telemetry?type=temperature&since={T0 + 5}"
                                               f"&until={T0 + 45}")
        assert code == 200 and [i["value"] for i in found["items"]] == [5.0, 4.0, 3.0, 2.0]
        code, series = await running.api("GET", f"/api/v1/devices/esp32-01/series?type=temperature&since={T0}"
                                                f"&until={T0 + 60}&points=3")
        assert code == 200 and series["bucket"] == 20
        assert [(p["time"], p["avg"], p["count"]) for p in series["points"]] == [
            (rfc3339(T0), 1.5, 2), (rfc3339(T0 + 20), 3.5, 2), (rfc3339(T0 + 40), 5.5, 2)]
        assert (series["since"], series["until"]) == (rfc3339(T0), rfc3339(T0 + 60))

        # The registry over REST.
        code, listed = await running.api("GET", "/api/v1/devices")
        assert code == 200 and {d["deviceId"] for d in listed["items"]} == {"esp32-01", "esp32-02", "7"}
        code, two = await running.api("GET", "/api/v1/devices/esp32-02")
        assert (two["status"], two["firmware"], two["registeredVia"]) == ("online", "1.0.0", "mqtt")
        assert [(t["type"], t["value"], t["count"]) for t in two["types"]] == [("humidity", 56.5, 2)]
        assert (await running.api("GET", "/api/v1/devices/nobody"))[0] == 404
        code, renamed = await running.api("PATCH", "/api/v1/devices/esp32-02", {"name": "Boiler room"})
        assert code == 200 and renamed["name"] == "Boiler room"

        # Pages, with a chart per telemetry type.
        code, html = await running.page("/devices")
        assert code == 200 and "esp32-01" in html and "Boiler room" in html
        code, html = await running.page("/devices/esp32-01")
        assert code == 200 and 'id="chart-temperature"' in html
        # The registry survives a restart (written back on stop).
        await running.stop()
        running = await start_hub(tmp_path, mosquitto, ["devices"])
        assert running.hub.services["devices"].devices["esp32-02"].name == "Boiler room"
        assert running.hub.services["devices"].devices["esp32-01"].messages == 6
    finally:
        device.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_earlier_platforms_sensor_data_goes_online_then_offline_and_registration_is_bounded(
    memory_hub: MemoryHub,
) -> None:
    """`SensorData` as the platforms the hub replaces send it: registered, online at once, offline after
    `devices.offline_after` of silence, online again when heard; new devices a minute per source bounded."""
    clock = FollowingClock().start()  # moved past offline_after instead of waiting for it
    running, witness, device = await memory_hub(["devices"], [f"{PREFIX}/dev/#"], clock, devices={
        "offline_after": "1s", "registrations_per_minute": 2})
    await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": 25.5})
    [online] = [json.loads(m.payload) for m in await witness.when(
        lambda m: m.topic == f"{DEV}/Device001/status")]
    assert (online["state"], online["deviceId"]) == ("online", "Device001") and RFC3339.match(online["time"])
    [up] = [json.loads(m.payload) for m in await witness.when(lambda m: m.topic == f"{DEV}/Device001/up")]
    assert (up["type"], up["value"]) == ("Temperature", 25.5) and RFC3339.match(up["time"])
    code, found = await running.api("GET", "/api/v1/devices/Device001")
    assert code == 200 and found["status"] == "online" and RFC3339.match(found["lastSeen"])

    # Silent for offline_after: offline, retained; heard again: online.
    clock.advance(1.5)
    await witness.when(lambda m: m.topic == f"{DEV}/Device001/status" and b'"offline"' in m.payload,
                       timeout=5)
    offline = events(witness, "Device001", "status")[-1]
    assert offline["detail"] == {"reason": "silent"}
    assert (await running.api("GET", "/api/v1/devices/Device001"))[1]["status"] == "offline"
    await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": 25.0})
    await witness.when(lambda m: m.topic == f"{DEV}/Device001/status", count=3)
    assert events(witness, "Device001", "status")[-1]["state"] == "online"

    # A status with NaN (a failed sensor on such firmware): null with the reason, published all the same.
    await device.publish("device/Device001/status", b'{"state": "online", "battery": NaN, "fw": "1.0"}')
    await witness.when(lambda m: m.topic == f"{DEV}/Device001/status", count=4)
    status = events(witness, "Device001", "status")[-1]
    assert status["detail"] == {"state": "online", "battery": None, "fw": "1.0", "invalid": {"battery": "NaN"}}
    # Over REST, a body carrying them is refused (400), before anything is stored.
    code, key = await running.api("POST", "/api/v1/devices/Device001/key")
    code, refused = await running.api("POST", "/api/v1/devices/Device001/telemetry",
                                      raw=b'{"type": "t", "value": Infinity}',
                                      headers={"X-Device-Key": key["key"], "Content-Type": "application/json"},
                                      token=None)
    assert code == 400 and refused["error"]["code"] == "bad_json" and "Infinity" in refused["error"]["message"]

    # Two new devices a minute from SensorData: the third is refused, and nothing of it is kept.
    await device.publish("SensorData", {"device_id": "Device002", "type": "t", "value": 1})
    await device.publish("SensorData", {"device_id": "Device003", "type": "t", "value": 1})
    await device.publish("SensorData", {"device_id": "Device001", "type": "t", "value": 2})
    await witness.when(lambda m: m.topic == f"{DEV}/Device001/up", count=3)
    assert set(running.hub.services["devices"].devices) == {"Device001", "Device002"}
    assert running.rejected("devices", "registration_limit") == 1
    assert not events(witness, "Device003", "up")


def test_the_default_time_range_is_the_last_day_and_holds_a_sample_stored_now() -> None:
    """One range for the BLE and devices APIs: [since, until), its default end a second past now."""
    since, until = time_range({}, 1000.0)
    assert since <= 1000.0 < until and until - since == DAY
    assert time_range({"since": 10.0, "until": 20.0}, 1000.0) == (10.0, 20.0)
    assert time_range({"until": 20.0}, 1000.0) == (20.0 - DAY, 20.0)
    with pytest.raises(ApiError) as e:
        time_range({"since": 20.0, "until": 20.0}, 1000.0)
    assert e.value.status == 400


def test_registration_limit_caps_and_refills_per_source() -> None:
    clock = Clock()
    limit = RegistrationLimit(clock, cap=5, per_minute=2)
    limit.check("gw1", 0, "new")
    limit.check("gw1", 1, "new")
    with pytest.raises(Rejected, match="more than 2 new a minute") as caught:
        limit.check("gw1", 2, "new")
    assert caught.value.reason == "registration_limit" and caught.value.source == "gw1"
    limit.check("gw2", 2, "new")  # another source has its own budget
    clock.advance(30)  # one more from gw1 after half a minute
    limit.check("gw1", 3, "new")
    with pytest.raises(Rejected):
        limit.check("gw1", 4, "new")
    clock.advance(600)
    with pytest.raises(Rejected, match="registry is full"):
        limit.check("gw1", 5, "new")
    RegistrationLimit(clock, cap=0, per_minute=0).check("any", 10**6, "new")  # 0: no limit


@pytest_twisted.ensureDeferred
async def test_commands_keys_and_firmware_updates(memory_hub: MemoryHub) -> None:
    clock = FollowingClock().start()  # moved past the command timeout instead of waiting for it
    running, witness, device = await memory_hub(["devices"], [f"{PREFIX}/dev/#", "device/+/commands/#", "OTA/#"],
                                                clock, devices={"command_timeout": "2s"})
    await device.publish("device/esp32-01/status", b"online")
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-01/status")

    # A command from REST, answered by the device.
    code, sent = await running.api("POST", "/api/v1/devices/esp32-01/commands",
                                   {"name": "reboot", "args": {"delay": 5}})
    assert code == 202 and sent["state"] == "sent"
    [order] = await witness.when(lambda m: m.topic == "device/esp32-01/commands/reboot")
    assert json.loads(order.payload) == {"id": sent["commandId"], "name": "reboot", "args": {"delay": 5}}
    await device.publish("device/esp32-01/commands/reboot/result",
                         {"id": sent["commandId"], "ok": True, "result": {"uptime": 0}})
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-01/event/command_result")
    [answer] = events(witness, "esp32-01", "event/command_result")
    assert (answer["commandId"], answer["state"], answer["result"]) == (sent["commandId"], "ok", {"uptime": 0})
    code, tracked = await running.api("GET", f"/api/v1/devices/esp32-01/commands/{sent['commandId']}")
    assert (tracked["state"], tracked["result"], tracked["actor"]) == ("ok", {"uptime": 0}, "admin")

    # A command over MQTT that the device never answers: accepted, then timed out.
    await device.publish(f"{PREFIX}/dev/device/esp32-01/cmd/blink", {"times": 3})
    [order] = await witness.when(lambda m: m.topic == "device/esp32-01/commands/blink")
    [accepted] = [json.loads(m.payload) for m in await witness.when(
        lambda m: m.topic == f"{DEV}/esp32-01/event/cmd_result")]
    assert accepted["ok"] is True and accepted["commandId"] == json.loads(order.payload)["id"]
    clock.advance(2.1)
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-01/event/command_result", count=2, timeout=15)
    timed_out = events(witness, "esp32-01", "event/command_result")[1]
    assert (timed_out["command"], timed_out["state"], timed_out["ok"]) == ("blink", "timeout", False)
    assert (await running.api("POST", "/api/v1/devices/ghost/commands", {"name": "x"}))[0] == 404

    # A device key: shown once, stored hashed, required for HTTPS ingestion.
    code, created = await running.api("POST", "/api/v1/devices/esp32-01/key")
    assert code == 201 and created["key"].startswith("bdk_")
    key = created["key"]
    [(stored_hash,)] = await running.hub.store.fetchall("SELECT secret_hash FROM dev_keys")
    assert key.split("_", 1)[1] not in stored_hash and stored_hash.startswith("hmac-sha256:")
    post = "/api/v1/devices/esp32-01/telemetry"
    code, doc = await running.api("POST", post, {"type": "voltage", "value": 3.3}, {"X-Device-Key": key},
                                  token=None)
    assert (code, doc) == (200, {"accepted": 1})
    code, doc = await running.api("POST", post, {"values": {"a": 1, "b": 2}, "time": T0}, {"X-Device-Key": key},
                                  token=None)
    assert (code, doc) == (200, {"accepted": 2})
    for headers in ({}, {"X-Device-Key": key + "x"}, {"X-Device-Key": "bdk_" + "A" * 43}):
        assert (await running.api("POST", post, {"type": "voltage", "value": 1}, headers, token=None))[0] == 401
    await device.publish("device/esp32-02/status", b"online")
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-02/status")
    other = "/api/v1/devices/esp32-02/telemetry"
    assert (await running.api("POST", other, {"type": "v", "value": 1}, {"X-Device-Key": key}, token=None))[0] \
        == 401, "a key works only for its own device"
    code, doc = await running.api("POST", post, {"type": "voltage", "value": "high"}, {"X-Device-Key": key},
                                  token=None)
    assert code == 400 and doc["error"]["code"] == "wrong_type"
    assert running.rejected("devices", "wrong_type") == 1
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-01/up" and b'"http"' in m.payload, count=3)
    https_ups = [u for u in events(witness, "esp32-01", "up") if u["via"] == "http"]
    assert sorted((u["type"], u["value"]) for u in https_ups) == [("a", 1.0), ("b", 2.0), ("voltage", 3.3)]
    assert (await running.api("DELETE", "/api/v1/devices/esp32-01/key"))[0] == 204
    assert (await running.api("POST", post, {"type": "v", "value": 1}, {"X-Device-Key": key}, token=None))[0] \
        == 401

    # Firmware: upload, offer (URL + sha256), download with the offer's token, progress, done.
    image = bytes(range(256)) * 40
    code, firmware = await running.api("POST", "/api/v1/devices/firmware?name=sensor&version=2.0.0", raw=image,
                                       headers={"Content-Type": "application/octet-stream"})
    assert code == 201 and firmware["sha256"] == hashlib.sha256(image).hexdigest()
    code, offer = await running.api("POST", "/api/v1/devices/esp32-01/ota", {"firmware": firmware["id"]})
    assert code == 202
    [update] = [json.loads(m.payload) for m in await witness.when(lambda m: m.topic == "OTA/esp32-01/update")]
    assert (update["offerId"], update["version"], update["sha256"], update["size"]) == (
        offer["offerId"], "2.0.0", firmware["sha256"], len(image))
    url = urlsplit(update["url"])
    response = await treq.get(f"{running.base}{url.path}?{url.query}")
    assert response.code == 200 and hashlib.sha256(await response.content()).hexdigest() == update["sha256"]
    response = await treq.get(f"{running.base}{url.path}?token=wrong")
    assert response.code == 404
    await response.content()
    assert (await running.api("POST", "/api/v1/devices/esp32-01/ota", {"firmware": firmware["id"]}))[0] == 409
    await device.publish("OTA/esp32-01/response", {"offerId": offer["offerId"], "status": "downloading",
                                                   "progress": 40})
    await device.publish("OTA/esp32-01/response", {"status": "done"})
    await witness.when(lambda m: m.topic == f"{DEV}/esp32-01/event/ota", count=3)
    assert [(e["state"], e["progress"]) for e in events(witness, "esp32-01", "event/ota")] == [
        ("offered", 0), ("downloading", 40), ("done", 100)]
    code, info = await running.api("GET", "/api/v1/devices/esp32-01")
    assert info["firmware"] == "2.0.0"
    code, offers = await running.api("GET", "/api/v1/devices/esp32-01/ota")
    assert [(o["state"], o["progress"]) for o in offers["items"]] == [("done", 100)]
    response = await treq.get(f"{running.base}{url.path}?{url.query}")
    assert response.code == 404, "the link dies with the offer"
    await response.content()

    # The device page's command form runs the same path (CSRF-checked, audited).
    code, location = await running.form("/devices/esp32-01/commands", {"name": "ping", "args": ""})
    assert (code, location) == (303, "/devices/esp32-01")
    await witness.when(lambda m: m.topic == "device/esp32-01/commands/ping")
    audit = await running.hub.store.fetchall("SELECT action FROM audit_log WHERE target = 'esp32-01'")
    assert ("devices.command",) in audit and ("devices.ota",) in audit


@pytest_twisted.ensureDeferred
async def test_unknown_devices_are_rejected_with_an_event_when_auto_register_is_off(memory_hub: MemoryHub) -> None:
    running, witness, device = await memory_hub(["devices"], [f"{PREFIX}/dev/#"], devices={"auto_register": False})
    for _ in range(3):
        await device.publish("SensorData", {"device_id": "ghost", "type": "t", "value": 1})
    await device.publish("device/ghost/status", b"online")
    await witness.when(lambda m: m.topic == f"{DEV}/ghost/event/rejected")
    await eventually(lambda: running.rejected("devices", "unknown_device") == 4, what="4 rejections")
    assert len(events(witness, "ghost", "event/rejected")) == 1, "one event a minute per device, not a flood"
    assert events(witness, "ghost", "event/rejected")[0]["topic"] == "SensorData"
    assert "ghost" not in running.hub.services["devices"].devices
    assert await running.hub.store.fetchall("SELECT * FROM dev_telemetry") == []

    code, created = await running.api("POST", "/api/v1/devices", {"id": "ghost", "name": "now known"})
    assert code == 201 and created["registeredVia"] == "api"
    assert (await running.api("POST", "/api/v1/devices", {"id": "ghost"}))[0] == 409
    assert (await running.api("POST", "/api/v1/devices", {"id": "a/b"}))[0] == 400
    await device.publish("SensorData", {"device_id": "ghost", "type": "t", "value": 2})
    [up] = [json.loads(m.payload) for m in await witness.when(lambda m: m.topic == f"{DEV}/ghost/up")]
    assert up["value"] == 2.0
    await device.publish("device/ghost/status", b"online")
    await witness.when(lambda m: m.topic == f"{DEV}/ghost/status")

    # Forgotten: telemetry gone, the retained status cleared, and unknown again.
    assert (await running.api("DELETE", "/api/v1/devices/ghost"))[0] == 204
    await witness.when(lambda m: m.topic == f"{DEV}/ghost/status" and m.payload == b"" and m.retain)
    assert (await running.api("GET", "/api/v1/devices/ghost"))[0] == 404
    assert await running.hub.store.fetchall("SELECT * FROM dev_telemetry") == []
    await device.publish("SensorData", {"device_id": "ghost", "type": "t", "value": 3})
    await eventually(lambda: running.rejected("devices", "unknown_device") == 5, what="rejected again")


BAD_MESSAGES = [
    ("SensorData", b"{oops", "not_json"),
    ("SensorData", b"\xc3\x28", "not_json"),
    ("SensorData", b"[1, 2]", "wrong_type"),
    ("SensorData", {"type": "t", "value": 1}, "missing_field"),
    ("SensorData", {"device_id": "d1", "value": 1}, "missing_field"),
    ("SensorData", {"device_id": "d1", "type": "t"}, "missing_field"),
    ("SensorData", {"device_id": "d1", "type": "t", "value": "hot"}, "wrong_type"),
    ("SensorData", {"device_id": "d1", "type": "t", "value": True}, "wrong_type"),
    ("SensorData", {"device_id": "d1", "type": 5, "value": 1}, "wrong_type"),
    ("SensorData", {"device_id": "d1", "type": "t", "value": 1e13}, "implausible"),
    ("SensorData", {"device_id": "d1", "type": "t", "value": 1, "time": 12}, "implausible"),
    ("SensorData", {"device_id": "d/1", "type": "t", "value": 1}, "implausible"),
    ("SensorData", {"device_id": "d1", "type": "t", "value": 1, "pad": "x" * 300}, "oversized"),
    ("device/d1/telemetry/t", b"warm", "not_json"),
    ("device/d1/telemetry/t", b'"warm"', "wrong_type"),
    ("device/d1/telemetry/9lives", b"1", "implausible"),
    ("device/d 1/telemetry/t", b"1", "bad_topic"),
    ("device/d1/status", b"[]", "wrong_type"),
    ("device/d1/status", b"not a word!", "not_json"),
    ("device/d1/commands/reboot/result", {"id": "nope", "ok": True}, "unknown_command"),
    ("device/d1/commands/reboot/result", {"ok": True}, "missing_field"),
    ("OTA/d1/response", {"status": "exploded"}, "implausible"),
    ("OTA/d1/response", {"status": "done"}, "unknown_command"),
]


@pytest_twisted.ensureDeferred
async def test_every_kind_of_bad_input_is_counted_logged_once_per_source_and_dropped(
    memory_hub: MemoryHub, logged: list[LogEvent]
) -> None:
    running, witness, device = await memory_hub(["devices"], [f"{PREFIX}/dev/#"], devices={"max_payload": 256})
    await device.publish("SensorData", {"device_id": "d1", "type": "t", "value": 1})
    await witness.when(lambda m: m.topic == f"{DEV}/d1/up")
    for topic, payload, _ in BAD_MESSAGES:
        await device.publish(topic, payload)
    await device.publish("SensorData", {"device_id": "d1", "type": "t", "value": 2})
    await witness.when(lambda m: m.topic == f"{DEV}/d1/up", count=2)
    expected: dict[str, int] = {}
    for _, _, reason in BAD_MESSAGES:
        expected[reason] = expected.get(reason, 0) + 1
    await eventually(lambda: all(running.rejected("devices", r) == n for r, n in expected.items()),
                     what="every rejection counted")
    assert {r: running.rejected("devices", r) for r in expected} == expected
    assert running.rejected("devices", "internal") == 0
    assert [u["value"] for u in events(witness, "d1", "up")] == [1.0, 2.0], "nothing bad got through"

    lines = [e for e in logged if e.get("log_namespace") == "bsscihub.ingest.Ingest" and "source" in e]
    sources = [e["source"] for e in lines]
    assert sorted(sources) == ["SensorData", "d1", "device/d 1/telemetry/t"], "one line per source"
    first = next(e for e in lines if e["source"] == "d1")
    assert first["topic"] and first["reason"] in expected and first["family"] == "devices"

    # Over HTTPS the same rules, and an oversized body is counted too.
    await running.api("POST", "/api/v1/devices", {"id": "web1"})
    code, created = await running.api("POST", "/api/v1/devices/web1/key")
    code, doc = await running.api("POST", "/api/v1/devices/web1/telemetry", {"type": "t", "value": 1,
                                                                            "pad": "x" * 300},
                                  {"X-Device-Key": created["key"]}, token=None)
    assert code == 413 and running.rejected("devices", "oversized") == expected["oversized"] + 1


# -- the shared bad-input machinery, on a fake clock


def test_rejections_are_logged_once_per_source_then_summarized() -> None:
    from prometheus_client import CollectorRegistry

    clock, lines = Clock(), []
    ingest = Ingest("fam", CollectorRegistry(), clock, interval=60.0)
    ingest.log = Logger(namespace="test", observer=lines.append)
    for source in ("a", "a", "a", "b"):
        ingest.rejected(Rejected("not_json", "garbage", source=source), f"t/{source}")
    assert [e["source"] for e in lines] == ["a", "b"] and ingest.reject_log.lines == 2
    clock.advance(60)
    assert [formatEvent(e) for e in lines[2:]] == ["2 more like this (fam: messages dropped from a) in the last 60 s"]
    ingest.rejected(Rejected("not_json", "garbage", source="a"), "t/a")
    assert lines[-1]["source"] == "a", "a new interval, a new line"


def test_a_guarded_handler_never_raises_and_counts_bugs_as_internal() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    ingest = Ingest("fam", registry, Clock())

    def broken(topic: str, payload: bytes, properties: Any) -> None:
        raise KeyError("bug")

    def failing_later(topic: str, payload: bytes, properties: Any) -> defer.Deferred[None]:
        return defer.fail(ValueError("async bug"))

    async def rejecting(topic: str, payload: bytes, properties: Any) -> None:
        raise Rejected("implausible", "too big")

    for handler in (broken, failing_later, rejecting):
        ingest.guard(handler)("t/1", b"{}", None)
    assert registry.get_sample_value("bsscihub_ingest_rejected_total", {"family": "fam", "reason": "internal"}) == 2
    assert registry.get_sample_value("bsscihub_ingest_rejected_total", {"family": "fam", "reason": "implausible"}) \
        == 1
    calls: list[str] = []
    ingest.guard(lambda t, p, props: calls.append(t), active=lambda: False)("t/2", b"", None)
    assert calls == [], "a stopped family's handler is not called"


@pytest_twisted.ensureDeferred
async def test_series_are_bucketed_in_sql_on_both_backends(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS + MIGRATIONS)  # as a hub does: the family's moves into core tables
    rows = [("d", "t", T0 + s, float(s)) for s in (0, 9.9, 10, 19.5, 35)] + [("d", "other", T0, 100.0)]
    await store.executemany("INSERT INTO dev_telemetry (device, type, time, value) VALUES (?, ?, ?, ?)", rows)
    result = await bucketed(store, "dev_telemetry", "device = ? AND type = ?", ("d", "t"), T0, T0 + 40, 4)
    assert result["bucket"] == 10
    assert [(p["time"], round(p["avg"], 2), p["min"], p["max"], p["count"]) for p in result["points"]] == [
        (T0, 4.95, 0.0, 9.9, 2), (T0 + 10, 14.75, 10.0, 19.5, 2), (T0 + 30, 35.0, 35.0, 35.0, 1)]
    empty = await bucketed(store, "dev_telemetry", "device = ? AND type = ?", ("d", "t"), T0 + 100, T0 + 200, 10)
    assert empty["points"] == []


@pytest_twisted.ensureDeferred
async def test_stopping_flushes_pending_registry_changes(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_hub(tmp_path, broker, ["devices"])
    service = running.hub.services["devices"]
    await service.register("flush-me")
    service.rename("flush-me", "renamed just before stop")
    await task.deferLater(reactor, 0.05, lambda: None)
    await running.stop()
    from bsscihub.store import open_store

    store = open_store(running.hub.config.database, running.hub.config.sqlite_path, reactor)
    store.start()
    try:
        assert await store.fetchall("SELECT name FROM dev_devices WHERE id = 'flush-me'") == [
            ("renamed just before stop",)]
    finally:
        await store.stop()
