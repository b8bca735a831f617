"""Fleets of earlier platforms against the running hub and a real mosquitto: their dashboards' /ws channels
and their OTA calls, unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from bsscihub import pki, users
from bsscihub.web import auth
from tests.broker import DYNSEC_PLUGIN, MOSQUITTO_CTRL, BrokerTLS, Mosquitto
from tests.test_families import PREFIX, RFC3339, DeviceClient, eventually, start_hub
from tests.test_gate_dynsec import ADMIN, HUB, Probe, _hub_account
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


# -- broker accounts for generic devices (a real mosquitto with the dynamic-security plugin, over TLS)


class TLSProbe(Probe):
    """A Raspberry Pi client as earlier platforms have it: username = device id, password = its key, TLS."""

    def __init__(self, broker: Mosquitto, ca: Path, username: str, password: str) -> None:
        super().__init__(broker, username, password, username)  # the account is bound to that client id
        self.client.tls_set(ca_certs=str(ca))

    def _connect(self) -> bool:
        assert self.broker.tls_port is not None
        self.client.connect(self.broker.host, self.broker.tls_port, keepalive=30)
        self.client.loop_start()
        assert self._events["connack"].wait(5), "no CONNACK"
        return not self.connack.is_failure


@pytest.mark.skipif(DYNSEC_PLUGIN is None or MOSQUITTO_CTRL is None,
                    reason="needs mosquitto's dynamic-security plugin and mosquitto_ctrl")
@pytest_twisted.ensureDeferred
async def test_devices_get_broker_accounts_limited_to_their_topics(tmp_path: Path, mosquitto_factory: Any) -> None:
    certs = tmp_path / "pki"
    certs.mkdir()
    pki.create_ca(certs / "ca.pem", certs / "ca.key")
    pki.issue_server_cert(certs / "ca.pem", certs / "ca.key", certs / "broker.pem", certs / "broker.key")
    broker: Mosquitto = mosquitto_factory(dynsec=ADMIN, tls=BrokerTLS(certs / "ca.pem", certs / "broker.pem",
                                                                       certs / "broker.key"))
    await threads.deferToThread(_hub_account, broker)
    address = SimpleNamespace(host=f"{HUB[0]}:{HUB[1]}@{broker.host}", port=broker.port)
    running = await start_hub(tmp_path, address, ["devices"], devices={  # type: ignore[arg-type]
        "broker_provisioning": "dynsec", "dynsec_username": ADMIN[0], "dynsec_password": ADMIN[1],
        "device_mqtt_url": f"mqtts://127.0.0.1:{broker.tls_port}"})
    probes: list[Probe] = []

    def probe(username: str, password: str) -> Probe:
        p = TLSProbe(broker, certs / "ca.pem", username, password)
        probes.append(p)
        return p

    try:
        # An organisation key (admin) lets devices register themselves.
        code, org = await running.api("POST", "/api/v1/devices/org-keys", {"name": "installers"})
        assert code == 201 and org["key"].startswith("bok_")
        code, refused = await running.api("POST", "/api/v1/devices/register", {"device_id": "pi-1"},
                                          headers={"X-Org-Key": "bok_wrong"}, token=None)
        assert (code, refused["error"]["code"]) == (401, "invalid_org_key")
        code, mine = await running.api("POST", "/api/v1/devices/register", {"device_id": "pi-1", "name": "kitchen"},
                                       headers={"X-Org-Key": org["key"]}, token=None)
        assert code == 201, mine
        creds = mine["mqtt"]
        assert (creds["username"], creds["password"], creds["url"], creds["tls"]) == (
            "pi-1", mine["key"], f"mqtts://127.0.0.1:{broker.tls_port}", True)
        assert (await running.api("POST", "/api/v1/devices/register", {"device_id": "pi-1"},
                                  headers={"X-Org-Key": org["key"]}, token=None))[0] == 409
        code, keys = await running.api("GET", "/api/v1/devices/org-keys")
        assert keys["items"][0]["registrations"] == 1 and "key" not in keys["items"][0]

        # The device: its key is its broker password, over TLS; its own topics only.
        assert not await probe("pi-1", "bdk_not-the-key").connect()
        pi = probe("pi-1", mine["key"])
        assert await pi.connect()
        assert await pi.subscribe("device/pi-1/commands/+")
        assert not await pi.subscribe("device/pi-2/commands/+")
        assert not await pi.subscribe("#")
        assert await pi.publish("device/pi-1/telemetry/temperature", {"value": 21.5})
        assert await pi.publish("SensorData/pi-1", {"device_id": "pi-1", "type": "humidity", "value": 40})
        assert not await pi.publish("device/pi-2/telemetry/temperature", {"value": 99})
        assert not await pi.publish("SensorData", {"device_id": "pi-2", "type": "t", "value": 1})
        service = running.hub.services["devices"]
        await eventually(lambda: service.devices["pi-1"].messages == 2, what="two readings of pi-1")
        assert "pi-2" not in service.devices
        code, sent = await running.api("POST", "/api/v1/devices/pi-1/commands", {"name": "reboot"})
        await eventually(lambda: any(t == "device/pi-1/commands/reboot" for t, _ in pi.messages),
                         what="the command at the device")

        # An account of another kind (the hub's own) is never replaced by a device's.
        assert (await running.api("POST", "/api/v1/devices", {"id": HUB[0]}))[0] == 201
        code, clash = await running.api("POST", f"/api/v1/devices/{HUB[0]}/key")
        assert code == 503 and "not a device's" in clash["error"]["message"]
        assert await probe(HUB[0], HUB[1]).connect(), "the hub's account is intact"

        # Revoking the key (or forgetting the device) removes the account.
        assert (await running.api("DELETE", "/api/v1/devices/pi-1/key"))[0] == 204
        assert not await probe("pi-1", mine["key"]).connect()
        code, _ = await running.api("DELETE", f"/api/v1/devices/org-keys/{org['id']}")
        assert code == 200
        assert (await running.api("POST", "/api/v1/devices/register", {"device_id": "pi-3"},
                                  headers={"X-Org-Key": org["key"]}, token=None))[0] == 401
    finally:
        for p in probes:
            p.stop()
        await running.stop()
