"""Blueprints end to end against the running hub (twistd): imported from the command line and over REST, a sensor
given a Type EUI, its uplinks over real mutual TLS published on a real Mosquitto with the decoded values."""

from __future__ import annotations

import json
import re
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.broker import Mosquitto, Received, Subscriber, free_port
from tests.helpers import hub_cli, kill, login_token, start_hub, station_cert
from tests.test_mioty_crash import Station, metric

DATA = Path(__file__).parent / "data" / "blueprints"
EP = "0011223344556677"
A = "70b3d59cd00000a1"
CLIMATE, METER = "70b3d5677000a001", "70b3d5677000a003"


def api(web: int, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{web}/api/v1{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def up_of(ep: str) -> Callable[[Received], bool]:
    return lambda m: m.topic == f"bsscihub/mioty/ep/{ep}/up"


def send_uplink(station: Station, cnt: int, data: bytes, fmt: int) -> None:
    op = station.send("ulData", epEui=int(EP, 16), rxTime=1_700_000_000_000_000_000 + cnt * 1_000_000,
                      packetCnt=cnt, snr=7.5, rssi=-101.0, userData=list(data), format=fmt, dlOpen=False,
                      responseExp=False, dlAck=False)
    station.expect("ulDataRsp", op)
    station.send("ulDataCmp", op)


def test_blueprint_decoded_values_in_the_uplink_event_and_rest(
    home: Path,
    log: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    certs = home / "certs"
    issued = station_cert(home, "bs-a", A)
    # The command line imports two blueprints; a broken file is refused with the place of the problem.
    imported = hub_cli(home, "blueprints", "import", str(DATA / "climate.json"), str(DATA / "door-flags.json"))
    assert imported.returncode == 0, imported.stderr
    assert f"blueprint {CLIMATE} (Indoor climate sensor), formats 0, 192" in imported.stdout
    broken = home / "broken.json"
    doc = json.loads((DATA / "climate.json").read_text())
    doc["component"]["pressure"]["func"] = "$ / "
    broken.write_text(json.dumps(doc))
    refused = hub_cli(home, "blueprints", "import", str(broken))
    assert refused.returncode == 1 and "pressure" in refused.stderr and "ends too early" in refused.stderr
    broker = mosquitto_factory()
    witness = subscriber_factory(broker, "bsscihub/#")
    web, bssci = free_port(), free_port()
    hub = start_hub(home, log, web, bssci, broker)
    station = None
    try:
        token = login_token(web, home)
        # REST: a third blueprint, a bad one refused with the reason, the list.
        status, created = api(web, token, "POST", "/mioty/blueprints", json.loads((DATA / "meter-le.json").read_text()))
        assert status == 201 and created["typeEui"] == METER and created["formats"] == [3]
        status, error = api(web, token, "POST", "/mioty/blueprints", {"version": "1.0", "typeEui": "xyz"})
        assert status == 400 and "typeEui must be 16 hex digits" in error["error"]["message"]
        status, listed = api(web, token, "GET", "/mioty/blueprints")
        assert [b["typeEui"] for b in listed["items"]] == sorted([CLIMATE, METER, "70b3d5677000a002"])
        # The sensor, given its Type EUI over REST.
        status, _ = api(web, token, "POST", "/mioty/sensors",
                        {"eui": EP, "nwKey": "000102030405060708090a0b0c0d0e0f", "shortAddr": "1a2b", "bidi": False})
        assert status == 201
        status, sensor = api(web, token, "PUT", f"/mioty/sensors/{EP}/type", {"typeEui": CLIMATE.upper()})
        assert status == 200 and sensor["typeEui"] == CLIMATE
        station = Station(bssci, issued.cert_path, issued.key_path, certs / "ca.pem")
        station.connect(A, "bs-a")
        station.expect("attPrp")
        # Format 192: temperature, humidity, pressure, battery.
        payload = (2981).to_bytes(2, "big") + bytes([40]) + (10132).to_bytes(2, "big") + bytes([128])
        send_uplink(station, 1, payload, 192)
        [message] = witness.wait_for(up_of(EP), timeout=10)
        event = json.loads(message.payload)
        assert event["data"] == payload.hex() and event["typeEui"] == CLIMATE
        assert event["decoded"] == {
            "temperature": {"value": 24.95, "unit": "°C"}, "humidity": {"value": 40, "unit": "%"},
            "pressure": {"value": 1013.2, "unit": "hPa"}, "battery": {"value": 3.65, "unit": "V"}}
        # A payload that does not match: published raw, with the reason.
        send_uplink(station, 2, payload[:3], 0)
        until_two = witness.wait_for(lambda m: up_of(EP)(m) and json.loads(m.payload)["packetCnt"] == 2, timeout=10)
        bad = json.loads(until_two[-1].payload)
        assert bad["data"] == payload[:3].hex() and "decoded" not in bad
        assert bad["decodeError"] == "payload ends at bit 24: field 'pressure' needs 16 bits, 0 left"
        # REST history carries the decoded values too.
        status, history = api(web, token, "GET", f"/mioty/sensors/{EP}/uplinks")
        assert status == 200
        by_cnt = {u["packetCnt"]: u for u in history["items"]}
        assert by_cnt[1]["decoded"]["pressure"] == {"value": 1013.2, "unit": "hPa"}
        assert "decodeError" in by_cnt[2]
        # A type assigned from the command line reaches the running hub; float and signed little-endian fields.
        assert hub_cli(home, "blueprints", "assign", EP, METER).returncode == 0
        frame = ((7).to_bytes(4, "little") + (1500).to_bytes(4, "little") + (-20).to_bytes(2, "little", signed=True)
                 + struct.pack("<f", -3.25) + bytes.fromhex("0a0b0c0d") + bytes([0x02]))
        # The hub looks for changes every 5 s: uplinks until one is decoded with the new type
        # (a loaded machine may take a round longer; 30 s is the limit).
        deadline, cnt = time.monotonic() + 30, 3
        while True:
            send_uplink(station, cnt, frame, 3)
            [third] = [json.loads(m.payload) for m in witness.wait_for(
                lambda m, cnt=cnt: up_of(EP)(m) and json.loads(m.payload)["packetCnt"] == cnt, timeout=10)][-1:]
            if third["typeEui"] == METER or time.monotonic() > deadline:
                break
            cnt += 1
            time.sleep(0.5)
        assert third["typeEui"] == METER and third["decoded"]["temperature"] == {"value": -3.25, "unit": "°C"}
        assert third["decoded"]["flow"] == {"value": -2, "unit": "l/h"}
        assert metric(web, 'bsscihub_mioty_blueprint_decodes_total{outcome="decoded"}') == 2
        published = [json.loads(m.payload) for m in witness.messages if up_of(EP)(m)]
        failed = sum(1 for up in published if "decodeError" in up)  # 2, and those before the new type was seen
        assert metric(web, 'bsscihub_mioty_blueprint_decodes_total{outcome="failed"}') == failed >= 1
        listed_cli = hub_cli(home, "blueprints", "list")
        assert re.search(rf"{METER}\t.*sensors: 1", listed_cli.stdout), listed_cli.stdout
    finally:
        if station is not None:
            station.close()
        kill(hub)
    assert "Traceback" not in log.read_text()
