"""A real crash of the hub under twistd: uplinks acknowledged with ulDataRsp but not yet published
when the process is killed with SIGKILL are published after the restart, each exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bsscihub.protocols.bssci.framing import MAGIC, Framer, encode_frame
from tests.broker import Mosquitto, Received, Subscriber, free_port
from tests.helpers import hub_cli, kill, start_hub, station_cert

EP = "0011223344556677"
KEY = "000102030405060708090a0b0c0d0e0f"
A, B = "70b3d59cd00000a1", "70b3d59cd00000b2"
COUNT = 20  # uplinks; the even packetCnts are heard by both base stations
# What a station answers by itself to the hub's operations.
AUTO = {"attPrp": "attPrpRsp", "detPrp": "detPrpRsp", "ping": "pingRsp", "dlDataQue": "dlDataQueRsp",
        "dlDataRev": "dlDataRevRsp", "dlRxStatQry": "dlRxStatQryRsp"}  # fmt: skip


class Station:
    """A base station over real mutual TLS on a blocking socket (stdlib ssl): frames, records, and
    answers the hub's operations by itself while it waits for what the test expects."""

    def __init__(self, port: int, cert: Path, key: Path, ca: Path, magic: bytes = MAGIC) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca)
        context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.magic = magic
        self.framer = Framer(magic=magic)
        self.inbox: list[dict[str, Any]] = []
        self.next_op = 1

    def send(self, command: str, op: int | None = None, **fields: Any) -> int:
        if op is None:
            op, self.next_op = self.next_op, self.next_op + 1
        self.sock.sendall(encode_frame({"command": command, "opId": op, **fields}, magic=self.magic))
        return op

    def answer(self, msg: dict[str, Any]) -> None:
        """Answer what a base station answers by itself (the hub's attPrp, ping, status, ...)."""
        answer = AUTO.get(msg["command"])
        if answer is not None:
            self.send(answer, msg["opId"])
        elif msg["command"] == "status":
            self.send("statusRsp", msg["opId"], code=0, message="fine", time=time.time_ns(), dutyCycle=0.01)

    def expect(self, command: str, op: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The first received `command` (with opId `op` if given), reading until it arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.inbox):
                if msg["command"] == command and (op is None or msg["opId"] == op):
                    return self.inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {command} {op}; got {[(m['command'], m['opId']) for m in self.inbox]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"the hub closed the connection; got {self.inbox}")
            for msg in self.framer.feed(data):
                self.answer(msg)
                self.inbox.append(msg)

    def connect(self, eui: str, name: str) -> None:
        self.send(
            "con",
            0,
            version="1.0.0",
            bsEui=int(eui, 16),
            vendor="Test",
            model="T1",
            name=name,
            bidi=True,
            snBsUuid=list(os.urandom(16)),
        )
        self.expect("conRsp", 0)
        self.send("conCmp", 0)

    def uplink(self, cnt: int, snr: float) -> int:
        return self.send("ulData", epEui=int(EP, 16), rxTime=1_700_000_000_000_000_000 + cnt * 1_000_000,
                         packetCnt=cnt, snr=snr, rssi=-100.0, userData=[cnt, 2, 3], dlOpen=False,
                         responseExp=False, dlAck=False)  # fmt: skip

    def close(self) -> None:
        self.sock.close()


def metric(web: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as r:
        text = r.read().decode()
    [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(value)


def doc(message: Received) -> Any:
    return json.loads(message.payload)


def is_uplink(message: Received) -> bool:
    return message.topic.startswith("bsscihub/mioty/ep/") and message.topic.endswith("/up")


def offline(message: Received) -> bool:
    return message.topic == "bsscihub/hub/status" and doc(message)["state"] == "offline"


def import_sensor(home: Path, bidi: bool) -> None:
    """EP and its key into the hub's database with `bsscihub sensors import`, as an operator does before a start."""
    endpoints = home / "endpoints.json"
    endpoints.write_text(json.dumps([{"eui": EP, "nwKey": KEY, "shortAddr": "1a2b", "bidi": bidi}]))
    imported = hub_cli(home, "sensors", "import", str(endpoints))
    assert imported.returncode == 0, imported.stderr


def test_acknowledged_uplinks_survive_kill_9_and_are_published_once_after_the_restart(
    home: Path,
    log: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    certs = home / "certs"
    stations: dict[str, tuple[str, Path, Path]] = {}  # bsEui -> (name, certificate, key)
    for name, eui in (("bs-a", A), ("bs-b", B)):
        issued = station_cert(home, name, eui)
        stations[eui] = (name, issued.cert_path, issued.key_path)
    import_sensor(home, bidi=False)
    broker = mosquitto_factory()
    witness = subscriber_factory(broker, "bsscihub/#")
    web, bssci = free_port(), free_port()

    # First run: every copy stored and acknowledged, every uplink still inside its 30 s window.
    first = start_hub(home, log, web, bssci, broker, BSSCIHUB_MIOTY_DEDUP_WINDOW="30s")
    connected: list[Station] = []
    try:
        for eui, (name, cert, key) in stations.items():
            station = Station(bssci, cert, key, certs / "ca.pem")
            connected.append(station)
            station.connect(eui, name)
            prp = station.expect("attPrp")  # the imported sensor, propagated after conCmp
            assert prp["epEui"] == int(EP, 16) and prp["shAddr"] == 0x1A2B
        a, b = connected
        ops: dict[Station, list[int]] = {a: [], b: []}
        for cnt in range(1, COUNT + 1):
            ops[a].append(a.uplink(cnt, snr=3.0))
            if cnt % 2 == 0:
                ops[b].append(b.uplink(cnt, snr=9.0))
        for station, sent in ops.items():
            for op in sent:
                station.expect("ulDataRsp", op)
                station.send("ulDataCmp", op)
        assert metric(web, "bsscihub_mioty_uplink_copies_total") == COUNT + COUNT // 2
        assert metric(web, "bsscihub_mioty_uplinks_pending") == COUNT
        # The bridge is up and publishing (the stations' states reached the broker), yet no uplink did.
        for eui in stations:
            witness.wait_for(lambda m, eui=eui: m.topic == f"bsscihub/mioty/bs/{eui}/state" and
                             doc(m)["state"] == "online")  # fmt: skip
        assert [m.topic for m in witness.messages if is_uplink(m)] == []

        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL
        witness.wait_for(offline)  # the broker's will: the hub is gone
    finally:
        for station in connected:
            station.close()
        kill(first)

    # Second run on the same data directory, default window, no base station connected.
    second = start_hub(home, log, web, bssci, broker)
    try:
        witness.wait_for(is_uplink, count=COUNT, timeout=15)
        assert metric(web, "bsscihub_mioty_uplinks_replayed_total") == COUNT
        second.send_signal(signal.SIGTERM)
        second.wait(15)
        assert second.returncode == 0, log.read_text()
        witness.wait_for(offline, count=2)  # published last at a clean stop: every uplink came before it
    finally:
        kill(second)

    ups = [m for m in witness.messages if is_uplink(m)]
    keys = [(doc(m)["epEui"], doc(m)["packetCnt"]) for m in ups]
    assert sorted(keys) == [(EP, cnt) for cnt in range(1, COUNT + 1)], "every acknowledged uplink, exactly once"
    for message in ups:
        up = doc(message)
        assert message.topic == f"bsscihub/mioty/ep/{EP}/up" and not message.retain
        both = up["packetCnt"] % 2 == 0
        assert [r["bsEui"] for r in up["receivers"]] == ([B, A] if both else [A]), up  # best SNR first
        assert up["data"] == f"{up['packetCnt']:02x}0203"
    output = log.read_text()
    assert f"published {COUNT} uplinks ({COUNT + COUNT // 2} copies) stored before the last stop" in output
    assert "Traceback" not in output


def test_downlinks_survive_kill_9_what_was_reported_sent_stays_sent_the_rest_goes_out_again(
    home: Path,
    log: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    from paho.mqtt import publish

    certs = home / "certs"
    issued = station_cert(home, "bs-a", A)
    import_sensor(home, bidi=True)
    broker = mosquitto_factory()
    witness = subscriber_factory(broker, "bsscihub/#")
    web, bssci = free_port(), free_port()

    def queue(station: Station, data: str) -> int:
        """A downlink queued through the MQTT command and taken by `station`; its queId."""
        results = len([m for m in witness.messages if m.topic.endswith("/event/cmd_result")])
        publish.single(f"bsscihub/mioty/ep/{EP}/cmd/down", json.dumps({"data": data}), qos=1,
                       hostname="127.0.0.1", port=broker.port)
        que = station.expect("dlDataQue")  # answered with dlDataQueRsp by the station
        [*_, result] = witness.wait_for(lambda m: m.topic.endswith("/event/cmd_result"), count=results + 1)
        assert doc(result)["ok"] and doc(result)["queId"] == que["queId"], doc(result)
        return int(que["queId"])

    def states(que_id: int) -> list[str]:
        return [doc(m)["state"] for m in witness.messages
                if m.topic == f"bsscihub/mioty/ep/{EP}/event/downlink" and doc(m)["queId"] == que_id]

    first = start_hub(home, log, web, bssci, broker)
    station = Station(bssci, issued.cert_path, issued.key_path, certs / "ca.pem")
    try:
        station.connect(A, "bs-a")
        station.expect("attPrp")
        station.expect("ulDataRsp", station.uplink(1, snr=5.0))  # A hears it: A serves its downlinks
        witness.wait_for(is_uplink)
        sent, held = queue(station, "01"), queue(station, "02")
        # The first is reported sent and answered (so recorded); the second stays with the station.
        op = station.send("dlDataRes", epEui=int(EP, 16), queId=sent, result="sent", txTime=time.time_ns(),
                          packetCnt=1)
        station.expect("dlDataResRsp", op)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        witness.wait_for(offline)
    finally:
        station.close()
        kill(first)

    second = start_hub(home, log, web, bssci, broker)
    station = Station(bssci, issued.cert_path, issued.key_path, certs / "ca.pem")
    try:
        station.connect(A, "bs-a")
        station.expect("attPrp")
        que = station.expect("dlDataQue")
        assert (que["queId"], que["userData"]) == (held, [[2]])  # the unreported one only
        op = station.send("dlDataRes", epEui=int(EP, 16), queId=held, result="sent", txTime=time.time_ns(),
                          packetCnt=2)
        station.expect("dlDataResRsp", op)
        witness.wait_for(lambda m: m.topic.endswith("/event/downlink") and doc(m)["queId"] == held
                         and doc(m)["state"] == "sent")  # fmt: skip
        assert not [m for m in station.inbox if m["command"] == "dlDataQue"]
    finally:
        station.close()
        kill(second)
    assert states(sent)[-1] == "sent" and "queued" not in states(sent)[2:]
    assert states(held)[-3:] == ["dispatched", "accepted", "sent"]
    restarted = [doc(m) for m in witness.messages if m.topic.endswith("/event/downlink") and doc(m)["queId"] == held
                 and doc(m)["reason"] == "the hub restarted"]  # fmt: skip
    assert [(d["previous"], d["state"]) for d in restarted] == [(None, "queued")]
