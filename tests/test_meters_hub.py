"""Meters end to end against the running hub (twistd): the real Diehl vm.ulData capture over real mutual TLS comes
out on a real Mosquitto as a water meter; a frame built with a known key, set from the command line, decrypts."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bsscihub.protocols.bssci.framing import Framer
from tests.broker import Mosquitto, Received, Subscriber, free_port
from tests.captures import load_capture
from tests.helpers import hub_cli, kill, login_token, start_hub, station_cert
from tests.test_mioty_crash import Station
from tests.wmbus_frames import KEY, WATER_VALUES, mode5_frame

A, B = "70b3d59cd00000a1", "70b3d59cd00000b2"
DIEHL, BUILT = "dme-81795246", "dme-12345678"


class VmFramer(Framer):
    """Frames for a station with Variable MAC: answers vm.status (nothing active) and (de)activations."""

    def __init__(self, station: Station) -> None:
        super().__init__()
        self.station = station

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        messages = super().feed(data)
        for msg in messages:
            if msg["command"] == "vm.status":
                self.station.send("vm.statusRsp", msg["opId"], macTypes=[])
            elif msg["command"] in ("vm.activate", "vm.deactivate", "vm.dlData"):
                self.station.send(msg["command"] + "Rsp", msg["opId"])
        return messages


def vm_station(port: int, cert: Path, key: Path, ca: Path) -> Station:
    station = Station(port, cert, key, ca)
    station.framer = VmFramer(station)
    return station


def vm_uplink(station: Station, frame: bytes, snr: float, sys_time: int) -> int:
    return station.send("vm.ulData", macType=1, userData=list(frame), trxTime=2_624_805_061_575_111,
                        sysTime=sys_time, freqOff=868157596.0, snr=snr, rssi=-110.0, carrSpace=1, pattGrp=0,
                        pattNum=3, crc=[1, 2])


def capture_user_data() -> bytes:
    return bytes(msgpack.unpackb(load_capture("diehl-wmbus-vm-uldata.hex")[12:], strict_map_key=False)["userData"])


def doc(message: Received) -> Any:
    return json.loads(message.payload)


def reading_of(meter: str) -> Callable[[Received], bool]:
    return lambda m: m.topic == f"bsscihub/mioty/meter/{meter}/reading"


def test_the_diehl_capture_and_a_frame_with_a_known_key_come_out_on_mqtt(
    home: Path,
    log: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    certs = home / "certs"
    issued = {eui: station_cert(home, name, eui) for name, eui in (("bs-a", A), ("bs-b", B))}
    # The operator enters the key of the meter whose frame we build, before the hub ever heard it.
    entered = hub_cli(home, "meters", "key", BUILT.upper(), stdin=KEY.hex() + "\n")
    assert entered.returncode == 0 and f"meter {BUILT}: key set" in entered.stdout, entered.stderr
    assert KEY.hex() not in entered.stdout + entered.stderr
    refused = hub_cli(home, "meters", "key", BUILT, stdin="not a key\n")
    assert refused.returncode == 1 and "32 hexadecimal digits" in refused.stderr and "not a key" not in refused.stderr
    broker = mosquitto_factory()
    witness = subscriber_factory(broker, "bsscihub/#")
    web, bssci = free_port(), free_port()
    hub = start_hub(home, log, web, bssci, broker)
    stations: list[Station] = []
    try:
        for name, eui in (("bs-a", A), ("bs-b", B)):
            station = vm_station(bssci, issued[eui].cert_path, issued[eui].key_path, certs / "ca.pem")
            stations.append(station)
            station.connect(eui, name)
            assert station.expect("vm.activate")["macType"] == 1  # mioty.vm_mac_types: {1: wmbus}
            station.expect("vm.activateCmp")
        a, b = stations
        # The real frame, byte for byte, from one station; the same radio frame heard by the other.
        a.sock.sendall(load_capture("diehl-wmbus-vm-uldata.hex"))
        a.expect("vm.ulDataRsp", 4)
        a.send("vm.ulDataCmp", 4)
        a.next_op = 5  # the capture used opId 4
        frame = capture_user_data()
        op = vm_uplink(b, frame, snr=9.0, sys_time=1_744_394_681_234_086_798)
        b.expect("vm.ulDataRsp", op)
        b.send("vm.ulDataCmp", op)
        [message] = witness.wait_for(reading_of(DIEHL), timeout=10)
        reading = doc(message)
        assert (reading["manufacturer"], reading["meterId"], reading["medium"], reading["deviceType"]) == (
            "DME", "81795246", "water", 7)
        assert reading["error"] == "encrypted (security mode 7) and no key is set for this meter"
        assert reading["data"] == frame.hex() and reading["values"] == {} and not message.retain
        assert [r["bsEui"] for r in reading["receivers"]] == [B, A]
        witness.wait_for(lambda m: m.topic == f"bsscihub/mioty/meter/{DIEHL}/event/registered")
        # The built frame, encrypted with the key entered above, decrypts to the readings put in.
        op = vm_uplink(a, mode5_frame(), snr=4.0, sys_time=time.time_ns())
        a.expect("vm.ulDataRsp", op)
        [message] = witness.wait_for(reading_of(BUILT), timeout=10)
        built = doc(message)
        assert built["values"] == WATER_VALUES and built["decrypted"] and built["error"] is None
        volume = next(r for r in built["records"] if r["field"] == "volume")
        assert (volume["unit"], volume["storage"], volume["quantity"]) == ("m3", 0, "Volume")
        # A command for the meter over MQTT; the frame goes out with its next uplink as vm.dlData.
        sender = mqtt.Client(CallbackAPIVersion.VERSION2)
        sender.connect("127.0.0.1", broker.port)
        sender.loop_start()
        try:
            sender.publish(f"bsscihub/mioty/meter/{BUILT}/cmd/down", json.dumps({"data": "cafe"}),
                           qos=1).wait_for_publish(5)
        finally:
            sender.loop_stop()
            sender.disconnect()
        [result] = witness.wait_for(lambda m: m.topic == f"bsscihub/mioty/meter/{BUILT}/event/cmd_result")
        assert doc(result)["ok"] is True, doc(result)
        op = vm_uplink(a, mode5_frame(acc=0x30), snr=4.0, sys_time=time.time_ns())
        down = a.expect("vm.dlData")
        assert down["userData"] == [0xCA, 0xFE] and down["ulCrc"] == [1, 2] and down["macType"] == 1
        witness.wait_for(lambda m: m.topic == f"bsscihub/mioty/meter/{BUILT}/event/dl_result" and
                         doc(m)["result"] == "sent")  # fmt: skip
        # REST: the meter, its key never shown.
        token = login_token(web, home)
        request = urllib.request.Request(f"http://127.0.0.1:{web}/api/v1/mioty/meters/{BUILT}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            meter = json.load(r)
        assert meter["hasKey"] and meter["lastReading"]["values"]["volume"] == 12345.678
        assert KEY.hex() not in json.dumps(meter)
        time.sleep(0.6)  # past the dedup window: still one reading of the capture
        assert len([m for m in witness.messages if reading_of(DIEHL)(m)]) == 1
    finally:
        for station in stations:
            station.close()
        kill(hub)
    output = log.read_text()
    assert "Traceback" not in output and KEY.hex() not in output
    assert f"new meter {DIEHL} (water) heard through base station" in output
