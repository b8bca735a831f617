"""Fleets of earlier platforms against the running hub and a real mosquitto: their dashboards' /ws channels
and their OTA calls, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted

from tests.broker import Mosquitto
from tests.test_families import RFC3339, DeviceClient, start_hub
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
