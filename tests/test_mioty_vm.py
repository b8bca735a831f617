"""Variable MAC in the mioty service over real mutual TLS (in process): activation per base station,
vm.ulData stored before vm.ulDataRsp, copies merged, meter readings with keys, raw frames, vm.dlData."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater

from bsscihub.errors import CommandError
from bsscihub.protocols.bssci.framing import encode_frame
from tests.captures import load_capture
from tests.test_mioty_service import PKI, Running, Station, pki, start, wait_for  # noqa: F401
from tests.wmbus_frames import KEY, WATER_VALUES, mode5_frame, mode7_frame

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

A, B = "00000000000000aa", "00000000000000bb"
DIEHL = "dme-81795246"
METER = "dme-12345678"  # the frames built by tests.wmbus_frames


class VmStation(Station):
    """A base station with Variable MAC: answers vm.status with `active`, takes (de)activations."""

    def __init__(self, active: list[int] | None = None, refuse: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.active = active
        self.refuse = refuse

    def dataReceived(self, data: bytes) -> None:
        for msg in self.framer.feed(data):
            command, op = msg["command"], msg["opId"]
            if command == "vm.status":
                if self.active is None:
                    self.send("error", op, code=38, message="unsupported sub-channel command 'vm.status'")
                else:
                    self.send("vm.statusRsp", op, macTypes=list(self.active))
            elif command in ("vm.activate", "vm.deactivate"):
                if msg["macType"] in self.refuse:
                    self.send("error", op, code=22, message="no such MAC type")
                else:
                    if self.active is not None:
                        (self.active.append if command == "vm.activate" else self.active.remove)(msg["macType"])
                    self.send(command + "Rsp", op)
            elif command == "vm.dlData":
                self.send("vm.dlDataRsp", op)
            elif command in ("attPrp", "ping"):
                self.send(command + "Rsp", op)
            self.seen.append(msg)
            self.inbox.append(msg)

    def vm_uplink(self, frame: bytes, snr: float = 5.0, mac_type: int = 1, sys_time: int = 1_744_394_681_234_086_798,
                  **extra: Any) -> int:
        return self.send("vm.ulData", macType=mac_type, userData=list(frame), trxTime=2_624_805_061_575_111,
                         sysTime=sys_time, freqOff=868157596.0, rssi=-120.5, snr=snr, carrSpace=1, pattGrp=0,
                         pattNum=3, crc=[87, 142], **extra)


async def connect(running: Running, name: str, eui: str, station: VmStation) -> VmStation:
    """`station` connected over mutual TLS with base-station certificate `name`, its session set up."""
    cert, key = running.pki.bs[name]
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(running.pki.ca.read_bytes()),
                                  clientCertificate=PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", running.port))
    client = await connectProtocol(endpoint, station)
    client.send("con", 0, version="1.0.0", bsEui=int(eui, 16), vendor="Diehl Metering", model="T", name=name,
                bidi=True, snBsUuid=list(os.urandom(16)))
    await client.expect("conRsp")
    client.send("conCmp", 0)
    await wait_for(lambda: running.service.sessions.get(eui) is not None)
    return client


def capture_frame() -> bytes:
    return bytes(msgpack.unpackb(load_capture("diehl-wmbus-vm-uldata.hex")[12:], strict_map_key=False)["userData"])


@pytest.fixture
def running(tmp_path: Path, pki: PKI) -> Iterator[Running]:  # noqa: F811
    hub = pytest_twisted.blockon(defer.ensureDeferred(start(tmp_path, pki, vm_mac_types={1: "wmbus", 7: "raw"})))
    yield hub
    pytest_twisted.blockon(defer.ensureDeferred(hub.stop()))


@pytest_twisted.ensureDeferred
async def test_activation_follows_the_configuration_and_what_the_station_offers(running: Running) -> None:
    a = await connect(running, "bs-a", A, VmStation(active=[3]))
    assert (await a.expect("vm.status"))["opId"] < 0
    assert (await a.expect("vm.activate"))["macType"] == 1
    assert (await a.expect("vm.activate"))["macType"] == 7
    assert (await a.expect("vm.deactivate"))["macType"] == 3  # active there, not configured
    await wait_for(lambda: running.service.vm.active.get(A) == (1, 7))
    for cmp in ("vm.statusCmp", "vm.activateCmp", "vm.deactivateCmp"):
        await a.expect(cmp)
    # A station without Variable MAC answers error 38: nothing more is asked.
    b = await connect(running, "bs-b", B, VmStation(active=None))
    await b.expect("vm.status")
    await b.expect("errorAck")
    await deferLater(reactor, 0.1, lambda: None)
    assert not [m for m in b.seen if m["command"] in ("vm.activate", "vm.deactivate")]
    assert B not in running.service.vm.active


@pytest_twisted.ensureDeferred
async def test_a_type_the_station_refuses_is_left_out(running: Running) -> None:
    await connect(running, "bs-a", A, VmStation(active=[], refuse=frozenset({7})))
    await wait_for(lambda: A in running.service.vm.active)
    assert running.service.vm.active[A] == (1,)


@pytest_twisted.ensureDeferred
async def test_the_diehl_capture_heard_twice_is_one_reading_of_a_registered_meter(running: Running) -> None:
    a = await connect(running, "bs-a", A, VmStation(active=[1]))
    b = await connect(running, "bs-b", B, VmStation(active=[1]))
    frame = load_capture("diehl-wmbus-vm-uldata.hex")
    a.transport.write(frame)  # the real frame, byte for byte (opId 4)
    assert (await a.expect("vm.ulDataRsp"))["opId"] == 4
    a.send("vm.ulDataCmp", 4)
    op = b.vm_uplink(capture_frame(), snr=9.0)
    assert (await b.expect("vm.ulDataRsp"))["opId"] == op
    await wait_for(lambda: [e for e in running.events if e.kind == "meter_reading"])
    await deferLater(reactor, 0.3, lambda: None)
    [event] = [e for e in running.events if e.kind == "meter_reading"]
    assert event.topic == f"mioty/meter/{DIEHL}/reading"
    p = event.payload
    assert (p["manufacturer"], p["meterId"], p["medium"], p["deviceType"], p["version"]) == (
        "DME", "81795246", "water", 7, 0x76)
    assert (p["encrypted"], p["decrypted"], p["securityMode"], p["records"]) == (True, False, 7, [])
    assert p["error"] == "encrypted (security mode 7) and no key is set for this meter"
    assert p["data"] == capture_frame().hex() and p["macType"] == 1
    assert [r["bsEui"] for r in p["receivers"]] == [B, A]
    assert p["receivers"][1]["sysTime"] == 1744394681234086798 and p["receivers"][1]["rssi"] == -128.89166259765625
    [registered] = [e for e in running.events if e.kind == "registered"]
    assert registered.topic == f"mioty/meter/{DIEHL}/event/registered"
    meter = await running.service.vm.get_meter(DIEHL)
    assert meter is not None and meter["medium"] == "water" and meter["bestBs"] == B and not meter["hasKey"]
    assert (await running.service.vm.readings(DIEHL))["items"][0]["error"] == p["error"]
    assert running.service.vm.counters["merged"] == 1
    from prometheus_client import generate_latest

    text = generate_latest(running.hub.metrics).decode()
    assert "bsscihub_mioty_vm_frames_total 2.0" in text and "bsscihub_mioty_vm_duplicate_frames_total 1.0" in text
    assert "bsscihub_mioty_vm_base_stations 2.0" in text


@pytest_twisted.ensureDeferred
async def test_a_frame_built_with_a_known_key_decrypts_once_the_key_is_set(running: Running) -> None:
    vm = running.service.vm
    a = await connect(running, "bs-a", A, VmStation(active=[1]))
    await vm.set_meter_key(METER, KEY.hex(), name="cellar")
    a.vm_uplink(mode5_frame(), sys_time=1)
    a.vm_uplink(mode7_frame(), sys_time=2)
    await wait_for(lambda: len([e for e in running.events if e.kind == "meter_reading"]) == 2)
    for event in (e for e in running.events if e.kind == "meter_reading"):
        assert event.payload["values"] == WATER_VALUES
        assert event.payload["decrypted"] and event.payload["error"] is None
    meter = await vm.get_meter(METER)
    assert meter is not None and meter["hasKey"] and meter["name"] == "cellar"
    assert meter["lastReading"]["values"]["volume"] == 12345.678
    assert "key" not in meter and KEY.hex() not in str(meter)
    # The key is sealed in the database, not stored as given.
    [[sealed]] = await running.hub.store.fetchall("SELECT key_box FROM mioty_meters WHERE id = ?", (METER,))
    assert KEY not in bytes(sealed)
    # A wrong key: the reading is published all the same, raw, with the reason.
    await vm.set_meter_key(METER, "00" * 16)
    a.vm_uplink(mode5_frame(acc=0x2B), sys_time=3)
    await wait_for(lambda: len([e for e in running.events if e.kind == "meter_reading"]) == 3)
    last = [e for e in running.events if e.kind == "meter_reading"][-1].payload
    assert last["values"] == {} and "wrong key" in last["error"] and last["data"] == mode5_frame(acc=0x2B).hex()
    with pytest.raises(CommandError, match="32 hexadecimal digits"):
        await vm.set_meter_key(METER, "xyz")


@pytest_twisted.ensureDeferred
async def test_raw_types_and_frames_that_are_not_wmbus_are_published_raw_with_the_reason(running: Running) -> None:
    a = await connect(running, "bs-a", A, VmStation(active=[1, 7]))
    a.vm_uplink(b"\x01\x02\x03", mac_type=7)
    a.vm_uplink(b"\x05\x44\x00", mac_type=1)
    await wait_for(lambda: len([e for e in running.events if e.kind == "vm_uplink"]) == 2)
    raw, broken = sorted((e for e in running.events if e.kind == "vm_uplink"), key=lambda e: e.payload["macType"],
                         reverse=True)
    assert raw.topic == "mioty/vm/7/up" and raw.payload["data"] == "010203"
    assert raw.payload["error"] == "Variable-MAC type 7 is not decoded (mioty.vm_mac_types)"
    assert broken.topic == "mioty/vm/1/up" and broken.payload["error"].startswith("not a wireless M-Bus frame: ")


@pytest_twisted.ensureDeferred
async def test_invalid_vm_uldata_is_answered_with_error_and_the_connection_stays(running: Running) -> None:
    a = await connect(running, "bs-a", A, VmStation(active=[1]))
    op = a.send("vm.ulData", macType=1, userData=[1, 2], snr=1.0, rssi=-100.0)  # no sysTime
    error = await a.expect("error")
    assert error["opId"] == op and error["code"] == 22 and "sysTime" in error["message"]
    op = a.vm_uplink(b"", snr=1.0)
    assert (await a.expect("error"))["message"] == "vm.ulData: userData must hold 1 to 512 bytes"
    op = a.vm_uplink(mode5_frame())
    assert (await a.expect("vm.ulDataRsp"))["opId"] == op


@pytest_twisted.ensureDeferred
async def test_a_queued_downlink_goes_out_with_the_meters_next_uplink(running: Running) -> None:
    vm = running.service.vm
    a = await connect(running, "bs-a", A, VmStation(active=[1]))
    with pytest.raises(CommandError, match="unknown meter dme-12345678"):
        await vm.queue_downlink(METER, "cafe")
    a.vm_uplink(mode5_frame(), sys_time=1)
    await wait_for(lambda: [e for e in running.events if e.kind == "meter_reading"])
    result = await running.service.command("meter", METER, "down", {"data": "cafe"})
    assert result is not None and result["status"] == "queued"
    audited = await running.hub.store.fetchall("SELECT actor, action, target FROM audit_log")
    assert ("mqtt", "mioty.meter.downlink", METER) in audited
    assert (await vm.get_meter(METER) or {})["pendingDownlinks"][0]["data"] == "cafe"
    a.vm_uplink(mode5_frame(acc=0x2C), sys_time=5, snr=4.0)
    dl = await a.expect("vm.dlData")
    assert dl["userData"] == [0xCA, 0xFE] and dl["macType"] == 1
    assert (dl["trxTime"], dl["sysTime"], dl["ulCrc"], dl["ulSnr"]) == (2_624_805_061_575_111, 5, [87, 142], 4.0)
    await wait_for(lambda: [e for e in running.events if e.kind == "dl_result"])
    [done] = [e for e in running.events if e.kind == "dl_result"]
    assert done.topic == f"mioty/meter/{METER}/event/dl_result" and done.payload["result"] == "sent"
    assert done.payload["bsEui"] == A
    with pytest.raises(CommandError, match="exactly one field"):
        await running.service.command("meter", METER, "down", {"data": "00", "x": 1})
    for _ in range(100):  # the final state is written after the event
        [entry] = (await vm.downlinks(METER))["items"]
        if entry["status"] == "sent":
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert (entry["status"], entry["bsEui"], entry["data"], entry["actor"]) == ("sent", A, "cafe", "mqtt")


@pytest_twisted.ensureDeferred
async def test_a_queued_meter_downlink_survives_a_restart(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    first = await start(tmp_path, pki)
    a = await connect(first, "bs-a", A, VmStation(active=[1]))
    a.vm_uplink(mode5_frame(), sys_time=1)
    await wait_for(lambda: [e for e in first.events if e.kind == "meter_reading"])
    queued = await first.service.vm.queue_downlink(METER, "beef", actor="test")
    await first.stop()
    second = await start(tmp_path, pki)
    try:
        meter = await second.service.vm.get_meter(METER)
        assert meter is not None and [d["dlId"] for d in meter["pendingDownlinks"]] == [queued["dlId"]]
        b = await connect(second, "bs-b", B, VmStation(active=[1]))
        b.vm_uplink(mode5_frame(acc=0x31), sys_time=2)
        assert (await b.expect("vm.dlData"))["userData"] == [0xBE, 0xEF]
        await wait_for(lambda: [e for e in second.events if e.kind == "dl_result"])
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_acknowledged_frames_are_published_after_a_stop_that_did_not(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    first = await start(tmp_path, pki, dedup_window=30.0)
    a = await connect(first, "bs-a", A, VmStation(active=[1]))
    op = a.vm_uplink(capture_frame())
    assert (await a.expect("vm.ulDataRsp"))["opId"] == op
    # The hub goes down before the window closes and without publishing (the bus refuses).
    first.service.vm.dedup._emit = lambda *args: None  # type: ignore[method-assign]
    await first.stop()
    assert not [e for e in first.events if e.kind == "meter_reading"]
    second = await start(tmp_path, pki)
    try:
        [event] = [e for e in second.events if e.kind == "meter_reading"]
        assert event.topic == f"mioty/meter/{DIEHL}/reading" and event.payload["receivers"][0]["bsEui"] == A
        [[unpublished]] = await second.hub.store.fetchall("SELECT count(*) FROM mioty_vm_frames WHERE published = 0")
        assert unpublished == 0
    finally:
        await second.stop()


def test_vm_messages_round_trip() -> None:
    from bsscihub.protocols.bssci import messages as m

    wire = msgpack.unpackb(load_capture("diehl-wmbus-vm-uldata.hex")[12:], strict_map_key=False)
    msg = m.decode(wire)
    assert isinstance(msg, m.VmUlData) and msg.macType == 1 and msg.crc == bytes([87, 142]) and msg.pattNum == 3
    assert msg.rxTime == msg.sysTime == 1744394681234086798 and len(msg.userData) == 86
    again = m.decode(m.encode(msg))
    assert again == msg
    assert encode_frame(m.encode(m.VmActivate(opId=-2, macType=1)))[12:] == msgpack.packb(
        {"command": "vm.activate", "opId": -2, "macType": 1})


@pytest.mark.parametrize(("text", "expected"), [("{1: wmbus, 7: raw}", {1: "wmbus", 7: "raw"}), ("1: raw", {1: "raw"}),
                                                ("{}", {})])
def test_vm_mac_types_from_the_environment(tmp_path: Path, text: str, expected: dict[int, str]) -> None:
    from bsscihub.config import load_config
    from bsscihub.protocols.bssci.config import BSSCIConfig, MiotyConfig

    sections = {"mioty": MiotyConfig, "bssci": BSSCIConfig}
    config = load_config(None, {"BSSCIHUB_MIOTY_VM_MAC_TYPES": text}, sections)
    assert config.section("mioty").vm_mac_types == expected


def test_a_bad_vm_mac_types_stops_with_the_key_named() -> None:
    from bsscihub.config import ConfigError, load_config
    from bsscihub.protocols.bssci.config import MiotyConfig

    with pytest.raises(ConfigError, match="mioty.vm_mac_types") as e:
        load_config(None, {"BSSCIHUB_MIOTY_VM_MAC_TYPES": "{1: lorawan}"}, {"mioty": MiotyConfig})
    assert "wmbus or raw" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_the_meter_registry_on_both_backends(tmp_path: Path, database_url: str) -> None:
    from bsscihub.family import installed_families
    from bsscihub.hub import make_hub
    from bsscihub.protocols.bssci.meters import registry_for
    from tests.conftest import make_config

    config = make_config(tmp_path, families=["mioty"], database=database_url)
    hub = make_hub(config, reactor, {"mioty": installed_families()["mioty"]})
    hub.store.start()
    try:
        await hub.store.migrate(hub.migrations())
        registry = registry_for(hub)
        row = ("00000000000000aa", 100.0, 1, b"\x01\x02", 1 << 62, 5, 1.5, 2.0, -90.0, None, None, 1, 0, 3, b"\x57\x8e")
        first, second = await registry.add_frame(row), await registry.add_frame(row)
        assert second == first + 1
        await registry.mark_published([first])
        [(frame_id, *rest)] = await registry.unpublished()
        assert frame_id == second and bytes(rest[3]) == b"\x01\x02" and rest[4] == 1 << 62
        meter = await registry.set_key(METER, KEY, 50.0, name="hall")
        assert registry.key_of(meter) == KEY
        meter.last_seen, meter.last_reading = 120.0, {"values": {"volume": 1.5}}
        await registry.save(meter)
        again = await registry.get(METER)
        assert again is not None and again.last_reading == {"values": {"volume": 1.5}} and again.name == "hall"
        assert registry.key_of(again) == KEY
        found, total = await registry.find("HALL")
        assert [m.id for m in found] == [METER] and total == 1
        await registry.add_reading(METER, 120.0, {"values": {"volume": 1.5}})
        await registry.add_reading(METER, 180.0, {"values": {"volume": 1.6}})
        assert [r["values"]["volume"] for r in await registry.readings(METER, 10)] == [1.6, 1.5]
        await registry.prune(150.0)
        assert [r["values"]["volume"] for r in await registry.readings(METER, 10)] == [1.6]
        assert len(await registry.unpublished()) == 1  # unpublished frames are never pruned
        assert await registry.delete(METER) and await registry.get(METER) is None
    finally:
        await hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_a_late_copy_after_a_restart_is_not_published_again(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    first = await start(tmp_path, pki)
    a = await connect(first, "bs-a", A, VmStation(active=[1]))
    a.vm_uplink(capture_frame())
    await wait_for(lambda: [e for e in first.events if e.kind == "meter_reading"])
    await first.stop()
    second = await start(tmp_path, pki)
    try:
        b = await connect(second, "bs-b", B, VmStation(active=[1]))
        op = b.vm_uplink(capture_frame(), snr=1.0)
        assert (await b.expect("vm.ulDataRsp"))["opId"] == op  # acknowledged, counted, dropped
        await wait_for(lambda: second.service.vm.counters["late"] == 1)
        await deferLater(reactor, 0.3, lambda: None)
        assert not [e for e in second.events if e.kind == "meter_reading"]
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_frame_that_trips_a_decoding_bug_is_published_raw(running: Running,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from bsscihub.protocols.bssci import vm

    def broken(frame: bytes, key: bytes | None = None) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vm, "parse_telegram", broken)
    a = await connect(running, "bs-a", A, VmStation(active=[1]))
    op = a.vm_uplink(mode5_frame())
    assert (await a.expect("vm.ulDataRsp"))["opId"] == op
    await wait_for(lambda: [e for e in running.events if e.kind == "vm_uplink"])
    [event] = [e for e in running.events if e.kind == "vm_uplink"]
    assert event.topic == "mioty/vm/1/up" and event.payload["data"] == mode5_frame().hex()
    assert event.payload["error"] == "the hub could not decode this frame (an internal error, logged)"
    for _ in range(100):  # marked published right after the bus took it
        [[unpublished]] = await running.hub.store.fetchall(
            "SELECT count(*) FROM mioty_vm_frames WHERE published = 0")
        if unpublished == 0:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert unpublished == 0  # not retried at every start
