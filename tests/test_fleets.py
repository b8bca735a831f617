"""Fleets of earlier platforms against the running hub and a real mosquitto: their dashboards' /ws channels
and their OTA calls, unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
from twisted.internet import reactor

from bsscihub import users
from bsscihub.web import auth
from tests.broker import Mosquitto
from tests.test_families import PREFIX, RFC3339, DeviceClient, start_hub
from tests.test_web_stream import connect, next_message


@pytest_twisted.ensureDeferred
async def test_ws_channels_carry_what_devices_and_gateways_send(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_hub(tmp_path, mosquitto, ["devices", "ble"], ble={"dedup_window": "50ms"})
    device = DeviceClient(mosquitto)
    port = urlsplit(running.base).port
    assert port is not None
    client = await connect(port, path="/ws", headers={"Authorization": f"Bearer {running.token}"})
    try:
        assert (await next_message(client))["data"]["channels"] == ["devices", "gateways", "sensor_data", "ota",
                                                                    "logs"]
        client.send_json({"type": "subscribe", "channels": ["devices", "gateways", "sensor_data"]})
        assert (await next_message(client))["type"] == "subscribed"
        await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": 25.5})
        await device.publish("BLEGatewayData/GW001", {"gateway_id": "GW001", "mac": "11:22:33:44:55:66",
                                                      "temperature": 22, "humidity": 65})
        seen: dict[str, list[dict[str, Any]]] = {}
        while len(seen.get("sensor_data", [])) < 2 or "gateways" not in seen:
            message = await next_message(client)
            seen.setdefault(message["type"], []).append(message["data"])
        readings = {d["topic"]: d for d in seen["sensor_data"]}
        up = readings["dev/device/Device001/up"]
        assert (up["deviceId"], up["type"], up["value"]) == ("Device001", "Temperature", 25.5)
        assert RFC3339.match(up["time"])
        assert readings["ble/node/112233445566/up"]["values"] == {"temperature": 22.0, "humidity": 65.0}
        assert {d["topic"] for d in seen["devices"]} >= {"dev/device/Device001/event/registered",
                                                         "dev/device/Device001/status"}
        assert any(d.get("state") == "online" for d in seen["devices"])
        assert seen["gateways"][0]["gatewayId"] == "GW001"
    finally:
        client.sendClose()
        await client.closed
        device.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_ota_as_earlier_platforms_do_it(tmp_path: Path, mosquitto: Mosquitto, subscriber_factory: Any) -> None:
    """POST /api/ota/update (bearer auth, operator role) -> OTA/{id}/update; the device's
    {"status": "success", "firmware_version"} answer sets its firmware and closes the update in its history."""
    witness = subscriber_factory(mosquitto, "OTA/#", f"{PREFIX}/dev/#")
    running = await start_hub(tmp_path, mosquitto, ["devices"])
    device = DeviceClient(mosquitto)
    try:
        await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": 25.5})
        await witness.when(lambda m: m.topic == f"{PREFIX}/dev/device/Device001/up")
        body = {"device_id": "Device001", "firmware_version": "2.0.0",
                "firmware_url": "https://files.example.net/fw/2.0.0.bin"}

        # The same authentication and roles as the API.
        assert (await running.api("POST", "/api/ota/update", body, token=None))[0] == 401
        viewer = await _token(running, "viewer")
        code, refused = await running.api("POST", "/api/ota/update", body, headers={
            "Authorization": f"Bearer {viewer}"}, token=None)
        assert code == 403
        code, bad = await running.api("POST", "/api/ota/update", {**body, "firmware_url": "ftp://x/y"})
        assert code == 400 and "firmware_url" in bad["error"]["message"]
        assert (await running.api("POST", "/api/ota/update", {**body, "device_id": "Nobody"}))[0] == 404

        code, started = await running.api("POST", "/api/ota/update", {**body, "checksum": "ab" * 32})
        assert code == 202 and started["state"] == "offered" and started["version"] == "2.0.0"
        [update] = [json.loads(m.payload) for m in await witness.when(lambda m: m.topic == "OTA/Device001/update")]
        assert (update["device_id"], update["firmware_version"], update["firmware_url"], update["checksum"]) == (
            "Device001", "2.0.0", body["firmware_url"], "ab" * 32)
        assert (await running.api("POST", "/api/ota/update", body))[0] == 409  # one update at a time

        await device.publish("OTA/Device001/response", {"status": "success", "firmware_version": "2.0.0"})
        done = await witness.when(lambda m: m.topic == f"{PREFIX}/dev/device/Device001/event/ota"
                                  and b'"done"' in m.payload)
        assert json.loads(done[0].payload)["version"] == "2.0.0"
        code, found = await running.api("GET", "/api/v1/devices/Device001")
        assert found["firmware"] == "2.0.0"
        code, history = await running.api("GET", "/api/v1/devices/Device001/ota")
        [entry] = history["items"]
        assert (entry["state"], entry["version"], entry["url"], entry["checksum"]) == (
            "done", "2.0.0", body["firmware_url"], "ab" * 32)
        assert RFC3339.match(entry["createdAt"])

        # A failure answer, as those devices send it.
        code, again = await running.api("POST", "/api/ota/update", {**body, "firmware_version": "2.1.0"})
        await device.publish("OTA/Device001/response", {"status": "failure", "message": "checksum mismatch"})
        await witness.when(lambda m: m.topic == f"{PREFIX}/dev/device/Device001/event/ota"
                           and b'"failed"' in m.payload)
        code, history = await running.api("GET", "/api/v1/devices/Device001/ota")
        assert (history["items"][0]["state"], history["items"][0]["error"]) == ("failed", "checksum mismatch")
        assert (await running.api("GET", "/api/v1/devices/Device001"))[1]["firmware"] == "2.0.0"
    finally:
        device.stop()
        await running.stop()


async def _token(running: Any, role: str) -> str:
    await users.add_user(running.hub.store, role, role, "correct horse battery")
    user = await users.get_user(running.hub.store, role)
    assert user is not None
    _, token = await auth.create_key(running.hub.store, user, "tests", role, "key", reactor.seconds(), None)
    return str(token)
