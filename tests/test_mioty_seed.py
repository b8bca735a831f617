"""The seed layout (mqtt.layout: seed): the mapping of mioty events, and a client of the replaced service
center against the running hub, a real Mosquitto and a base station over mutual TLS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from bsscihub.bus import Event
from bsscihub.family import IMQTTLayout, IMQTTLayouts, installed_families
from bsscihub.protocols.bssci.seed import seed_messages
from bsscihub.tap import build_service
from tests import test_mioty_service, test_mqtt_bridge
from tests.broker import Mosquitto, Received, Subscriber
from tests.conftest import make_config
from tests.test_mioty_service import PKI, C, Running, wait_for
from tests.test_mqtt_bridge import ATTACH, BS, BS_STATUS, EP, Commander, until, uplink_payload

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

pki = test_mioty_service.pki
commander = test_mqtt_bridge.commander

EPU, BSU = EP.upper(), BS.upper()
KEY = "000102030405060708090A0B0C0D0E0F"


def doc(message: Received) -> Any:
    return json.loads(message.payload)


# -- the mapping -----------------------------------------------------------------------------------


def test_the_mioty_family_speaks_the_seed_layout(tmp_path: Path) -> None:
    family = installed_families()["mioty"]
    assert verifyObject(IMQTTLayouts, family) and "seed" in family.mqtt_layouts
    assert family.mqtt_layout("other", None) is None
    hub = SimpleNamespace(config=SimpleNamespace(mqtt=SimpleNamespace(seed_base="bssci")))
    layout = family.mqtt_layout("seed", hub)
    assert verifyObject(IMQTTLayout, layout) and layout.base == "bssci"
    assert sorted(layout.inbound()) == [f"bssci/ep/+/{r}" for r in ("cmd", "config", "dl", "register")]


def test_uplinks_and_station_status_in_the_seed_layout() -> None:
    up = Event("mioty", "uplink", f"mioty/ep/{EP}/up", uplink_payload(4830))
    reversed_receivers = dict(uplink_payload(4830), receivers=uplink_payload()["receivers"][::-1])
    for event in (up, attrs.evolve(up, payload=reversed_receivers)):
        # the best receiver (highest SNR), whatever the order; EUIs upper-case, data as byte values
        assert seed_messages(event, "bssci") == [(f"bssci/ep/{EPU}/ul", {
            "bs_eui": BSU, "rxTime": 1_755_708_639_613_188_798, "snr": 22.88, "rssi": -71.39, "cnt": 4830,
            "data": [2, 83, 1, 97, 6],
        }, False)]  # fmt: skip
    # every statusRsp field the station sent, its own time in nanoseconds
    status = {**BS_STATUS, "bsTime": BS_STATUS["time"], "time": "2025-08-20T16:50:40.000Z", "message": "fine",
              "geoLocation": [51.1, 7.2, 90.0]}  # fmt: skip
    assert seed_messages(Event("mioty", "status", f"mioty/bs/{BS}/status", status), "bssci") == [(f"bssci/bs/{BSU}", {
        "code": 0, "memLoad": 0.33, "cpuLoad": 0.23, "dutyCycle": 0.0, "time": 1_755_706_414_392_137_804,
        "uptime": 1566, "temp": 41.5, "geoLocation": [51.1, 7.2, 90.0],
    }, False)]  # fmt: skip
    # a status without the station's time (as stored before it was kept): the hub's, in nanoseconds
    older = {"code": 0, "dutyCycle": 0.1, "time": "1970-01-01T00:00:01.5Z"}
    assert seed_messages(Event("mioty", "status", f"mioty/bs/{BS}/status", older), "bssci")[0][1] == {
        "code": 0, "dutyCycle": 0.1, "time": 1_500_000_000}  # fmt: skip
    for other in (
        Event("ble", "uplink", f"mioty/ep/{EP}/up", uplink_payload()),
        Event("mioty", "state", f"mioty/bs/{BS}/state", {"state": "online"}),
        Event("mioty", "cmd_result", f"mioty/ep/{EP}/event/cmd_result", {"command": "down", "ok": True}),
        attrs.evolve(up, payload={**uplink_payload(), "data": "not hex"}),
    ):
        assert seed_messages(other, "bssci") == []
    [(_, empty, _)] = seed_messages(attrs.evolve(up, payload={**uplink_payload(), "receivers": []}), "bssci")
    assert empty["bs_eui"] is None and empty["cnt"] == 7


def test_sensor_events_in_the_seed_layout() -> None:
    def one(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        payload = {"epEui": EP, "time": "2025-08-20T16:50:39.5Z", **fields}
        [(topic, body, retain)] = seed_messages(Event("mioty", kind, f"mioty/ep/{EP}/event/{kind}", payload), "b")
        assert not retain
        return topic, body

    when = 1_755_708_639.5
    assert one("attach", **{k: v for k, v in ATTACH.items() if k != "time"}, source="ota") == (f"b/ep/{EPU}/status", {
        "action": "attached", "sensor_eui": EPU, "timestamp": when, "source": "ota", "base_station_eui": BSU})
    assert one("detach", source="mqtt") == (f"b/ep/{EPU}/status", {
        "action": "detached", "sensor_eui": EPU, "timestamp": when, "source": "mqtt"})
    assert one("auto_detach", silentFor=259_200, lastSeen=None) == (f"b/ep/{EPU}/status", {
        "action": "auto_detached", "sensor_eui": EPU, "timestamp": when, "reason": "inactivity",
        "inactive_hours": 72.0})
    assert one("inactivity_warning", silentFor=131_000) == (f"b/ep/{EPU}/warning", {
        "action": "inactivity_warning", "sensor_eui": EPU, "timestamp": when, "inactive_hours": 36.4})
    assert one("att_rejected", bsEui=BS, attachCnt=3, reason="bad signature") == (f"b/ep/{EPU}/error", {
        "action": "attach_rejected", "sensor_eui": EPU, "timestamp": when, "base_station_eui": BSU,
        "error": "bad signature"})
    assert one("dl_result", queId=4, bsEui=BS, result="expired", txTime=None, packetCnt=None) == (
        f"b/ep/{EPU}/response", {"command": "dl", "action": "dl_result", "sensor_eui": EPU, "timestamp": when,
                                 "success": False, "queId": 4, "result": "expired", "base_station_eui": BSU,
                                 "txTime": None, "packetCnt": None})  # fmt: skip


# -- a seed client against the running hub ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_seed_client_registers_a_sensor_sends_a_downlink_and_commands(
    tmp_path: Path, pki: PKI, mosquitto: Mosquitto, subscriber_factory: Callable[..., Subscriber],
    commander: Callable[..., Commander],
) -> None:
    seen = subscriber_factory(mosquitto, "bssci/#")
    # the whole hub as twistd builds it: storage, the MQTT bridge, the mioty family, the web app
    config = make_config(
        tmp_path, families=["mioty"], mioty={"dedup_window": 0.2},
        tls={"ca": str(pki.ca), "ca_key": str(pki.ca_key), "cert": str(pki.hub_cert), "key": str(pki.hub_key)},
        mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}", "layout": "seed", "client_id": "seed-hub"},
    )  # fmt: skip
    whole = build_service(config, {"mioty": installed_families()["mioty"]}, reactor, on_start_failure=lambda: None)
    whole.startService()
    await whole.when_ready()
    hub = whole.hub
    bridge = hub.mqtt
    running = Running(hub, hub.services["mioty"], [], pki)
    client = commander(mosquitto)
    CU = C.upper()

    async def answer(request: str, payload: bytes | str, count: int = 1) -> dict[str, Any]:
        before = len([m for m in seen.messages if m.topic == f"bssci/ep/{EPU}/response"])
        client.send(f"bssci/ep/{EPU}/{request}", payload.encode() if isinstance(payload, str) else payload)
        found = await seen.when(lambda m: m.topic == f"bssci/ep/{EPU}/response", count=before + count)
        return doc(found[before])  # type: ignore[no-any-return]

    try:
        await until(lambda: bridge.connected)
        station = await running.station("bs-c", C)
        # register: keys in upper-case hex, as the replaced service center's clients send them
        registered = await answer("register", json.dumps({"nwKey": KEY, "shortAddr": "1A2B", "bidi": True}))
        assert registered == {"command": "register", "action": "register_response", "sensor_eui": EPU,
                              "success": True, "attached_to": 1, "timestamp": registered["timestamp"]}
        prp = await station.expect("attPrp")
        assert bytes(prp["nwkSnKey"]).hex() == KEY.lower() and prp["shAddr"] == 0x1A2B
        [attached] = await seen.when(lambda m: m.topic == f"bssci/ep/{EPU}/status")
        assert doc(attached)["action"] == "attached" and doc(attached)["sensor_eui"] == EPU
        # an uplink comes out as `ul`, upper-case EUIs, the data as byte values
        op = station.uplink(EP, cnt=5, snr=7.5)
        await station.expect("ulDataRsp")
        station.send("ulDataCmp", op)
        [ul] = await seen.when(lambda m: m.topic == f"bssci/ep/{EPU}/ul")
        assert doc(ul) == {"bs_eui": CU, "rxTime": 1_700_000_000_000_000_005, "snr": 7.5, "rssi": -100.0, "cnt": 5,
                           "data": [1, 2, 3]}  # fmt: skip
        # a downlink, data as byte values; the station takes it, then reports it sent
        queued = await answer("dl", json.dumps({"data": [0xCA, 0xFE], "format": 1}))
        assert queued["success"] and queued["command"] == "dl" and queued["base_stations"] == [CU]
        que = await station.expect("dlDataQue")
        assert que["userData"] == [[0xCA, 0xFE]] and que["queId"] == queued["queId"]
        station.send("dlDataRes", epEui=int(EP, 16), queId=que["queId"], result="sent", txTime=9, packetCnt=6)
        result = await seen.when(lambda m: m.topic == f"bssci/ep/{EPU}/response" and b"dl_result" in m.payload)
        assert {k: doc(result[0])[k] for k in ("action", "queId", "result", "success", "base_station_eui")} == {
            "action": "dl_result", "queId": que["queId"], "result": "sent", "success": True, "base_station_eui": CU}
        # commands: a bare word, or a JSON object with `command`
        status = await answer("cmd", "status")
        assert status["action"] == "status_response" and status["status"]["registered"] is True
        assert status["status"]["attached"] is True and status["status"]["epEui"] == EPU
        detached = await answer("cmd", json.dumps({"command": "detach"}))
        assert detached["success"] and detached["action"] == "detach_response"
        assert (await station.expect("detPrp"))["epEui"] == int(EP, 16)
        statuses = await seen.when(lambda m: m.topic == f"bssci/ep/{EPU}/status", count=2)
        assert doc(statuses[1])["action"] == "detached"
        # attach without keys: again with the stored ones
        again = await answer("cmd", "attach")
        assert again["success"] and again["action"] == "attach_response"
        assert bytes((await station.expect("attPrp"))["nwkSnKey"]).hex() == KEY.lower()
        # bad requests are answered with the reason, and change nothing
        unknown = await answer("cmd", "reboot")
        assert unknown["success"] is False and unknown["action"] == "error_response"
        assert unknown["error"] == "unknown command 'reboot' (known: attach, detach, status)"
        missing = await answer("register", json.dumps({"shortAddr": "0001"}))
        assert missing["error"] == "missing field 'nwKey'" and not missing["success"]
        garbage = await answer("dl", b"\xff\xfe")
        assert garbage["error"] == "payload is not UTF-8"
        assert (await answer("config", json.dumps({"nwKey": "zz", "shortAddr": "0001"})))["error"].startswith("nwKey")
        assert (await running.service.get_sensor(EP))["shortAddr"] == "1a2b"  # type: ignore[index]
        # the station's status report
        await running.service.poll_status(C)
        [bs] = await seen.when(lambda m: m.topic == f"bssci/bs/{CU}")
        assert doc(bs) == {"code": 0, "dutyCycle": 0.02, "time": 5, "temp": 40.5}
        # the standard contract is published all the same
        await wait_for(lambda: bridge.outbox.acked >= 10)
    finally:
        await whole.stopService()
