"""The mioty service center over real sockets with real certificates (made with bsscihub.pki): base
stations connect with mutual TLS, uplinks are deduplicated into events, commands, revocation, durability."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from bsscihub.bus import Event
from bsscihub.cluster import Cluster
from bsscihub.errors import CommandError
from bsscihub.family import installed_families
from bsscihub.hub import Hub, make_hub
from bsscihub.mqtt.bridge import to_json
from bsscihub.pki import BindingKind, create_ca, issue_client_cert, issue_server_cert
from bsscihub.protocols.bssci.framing import Framer, encode_frame
from bsscihub.protocols.bssci.identity import APPLICATION_CENTER, STATION
from bsscihub.protocols.bssci.service import MiotyService, UnknownDevice
from tests.conftest import make_config
from tests.helpers import log_lines
from tests.helpers import until as wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

A, B, C = "00000000000000aa", "00000000000000bb", "00000000000000cc"
EP = "0011223344556677"
KEY = bytes(range(16))
# What a station answers by itself to the hub's operations.
AUTO = {
    "attPrp": "attPrpRsp", "detPrp": "detPrpRsp", "ping": "pingRsp", "dlDataQue": "dlDataQueRsp",
    "dlDataRev": "dlDataRevRsp", "dlRxStatQry": "dlRxStatQryRsp",
}  # fmt: skip


@attrs.frozen
class PKI:
    ca: Path
    ca_key: Path
    hub_cert: Path
    hub_key: Path
    bs: dict[str, tuple[Path, Path]]  # name -> (cert, key)
    other: tuple[Path, Path]


_SHARED: dict[str, PKI] = {}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Made once per session (per worker) though many modules import this fixture: eight RSA keys. Tests only
    read these files; what they issue goes into their own directories."""
    if "pki" not in _SHARED:
        _SHARED["pki"] = _make_pki(tmp_path_factory.mktemp("pki"))
    return _SHARED["pki"]


def _make_pki(d: Path) -> PKI:
    create_ca(d / "ca.pem", d / "ca.key")
    issue_server_cert(d / "ca.pem", d / "ca.key", d / "hub.pem", d / "hub.key")
    bs = {}
    for name, eui in (("bs-a", A), ("bs-b", B), ("bs-c", C), ("bs-any", None), ("bs-other", None)):
        issued = issue_client_cert(d / "ca.pem", d / "ca.key", name, d / "bs",
                                   binding=STATION.bind(eui) if eui else None)
        bs[name] = (issued.cert_path, issued.key_path)
    create_ca(d / "other.pem", d / "other.key", common_name="other CA")
    other = issue_client_cert(d / "other.pem", d / "other.key", "bs-x", d / "other")
    return PKI(d / "ca.pem", d / "ca.key", d / "hub.pem", d / "hub.key", bs, (other.cert_path, other.key_path))


@pytest.fixture
def logged() -> Iterator[list[str]]:
    with log_lines("bsscihub") as lines:
        yield lines


class Station(Protocol):
    """A base station for the tests: frames, records, answers the hub's operations by itself."""

    def __init__(self) -> None:
        self.framer = Framer()
        self.inbox: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.next_op = 1
        self.status: dict[str, Any] = {"code": 0, "message": "fine", "time": 5, "dutyCycle": 0.02, "temp": 40.5}
        self.auto = dict(AUTO)  # a test removes what it answers by hand

    def dataReceived(self, data: bytes) -> None:
        for msg in self.framer.feed(data):
            self.seen.append(msg)
            answer = self.auto.get(msg["command"])
            if answer is not None:
                self.send(answer, msg["opId"])
            elif msg["command"] == "status":
                self.send("statusRsp", msg["opId"], **self.status)
            self.inbox.append(msg)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)

    def send(self, command: str, op: int | None = None, **fields: Any) -> int:
        if op is None:
            op, self.next_op = self.next_op, self.next_op + 1
        assert self.transport is not None
        self.transport.write(encode_frame({"command": command, "opId": op, **fields}))
        return op

    async def expect(self, command: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            for i, msg in enumerate(self.inbox):
                if msg["command"] == command:
                    return self.inbox.pop(i)
            if reactor.seconds() > deadline or self.lost.called:
                raise AssertionError(f"no {command}; got {[m['command'] for m in self.inbox]}")
            await deferLater(reactor, 0.005, lambda: None)

    def uplink(self, ep: str = EP, cnt: int = 1, snr: float = 5.0, **over: Any) -> int:
        fields = {"dlOpen": True, "responseExp": False, "dlAck": False, **over}
        return self.send("ulData", epEui=int(ep, 16), rxTime=1_700_000_000_000_000_000 + cnt, packetCnt=cnt,
                         snr=snr, rssi=-100.0, userData=[1, 2, 3], **fields)


@attrs.define
class Running:
    hub: Hub
    service: MiotyService
    events: list[Event]
    pki: PKI

    @property
    def port(self) -> int:
        return int(self.service.port.getHost().port)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    async def tls(self, pair: tuple[Path, Path] | None, ca: Path | None = None) -> Station:
        client_cert = None
        if pair is not None:
            client_cert = PrivateCertificate.loadPEM(pair[0].read_bytes() + pair[1].read_bytes())
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM((ca or self.pki.ca).read_bytes()),
                                      clientCertificate=client_cert)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        return await connectProtocol(endpoint, Station())

    async def station(self, name: str, eui: str, version: str = "1.0.0") -> Station:
        station = await self.tls(self.pki.bs[name])
        station.send("con", 0, version=version, bsEui=int(eui, 16), vendor="Test", model="T1", name=name, bidi=True,
                     snBsUuid=list(os.urandom(16)))
        await station.expect("conRsp")
        station.send("conCmp", 0)
        await wait_for(lambda: self.service.sessions.get(eui) is not None and
                       self.service.sessions[eui].established_at is not None)
        return station

    async def stop(self) -> None:
        """In the hub's own order: the service, the cluster's shared parts (if any), the store."""
        if self.service.running:
            await self.service.stopService()
        try:
            await self.hub.cluster.stop()
        finally:
            await self.hub.store.stop()


async def start(tmp_path: Path, pki: PKI, sink: Any = None, bssci: dict[str, Any] | None = None,
                mqtt: dict[str, Any] | None = None, cluster: Cluster | None = None,
                sections: dict[str, Any] | None = None, **mioty: Any) -> Running:
    """A mioty service in this process on the test PKI; `sections` are more config sections (database, cluster,
    scaci …), `mioty` its own settings."""
    config = make_config(
        tmp_path,
        families=["mioty"],
        tls={"ca": str(pki.ca), "ca_key": str(pki.ca_key), "cert": str(pki.hub_cert), "key": str(pki.hub_key)},
        mioty={"dedup_window": 0.2, **mioty},
        **({"bssci": bssci} if bssci else {}),
        **({"mqtt": mqtt} if mqtt else {}),
        **(sections or {}),
    )
    hub = make_hub(config, reactor, {"mioty": installed_families()["mioty"]})
    if cluster is not None:
        hub.cluster = cluster
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    try:
        await hub.cluster.start()  # a cluster's shared parts answer before any station arrives, as in the hub
    except BaseException:
        await hub.store.stop()  # its threads would keep the test run alive
        raise
    events: list[Event] = []

    def record(event: Event) -> Any:
        events.append(event)
        return sink(event) if sink is not None else None

    hub.bus.subscribe(record)
    service = MiotyService(hub)
    service.drain_wait = 0.2
    hub.services["mioty"] = service
    service.startService()
    await service.when_ready()
    hub.health.started = True  # what HubService says once every child is ready
    return Running(hub, service, events, pki)


async def heard(running: Running, station: Station, cnt: int = 1, **fields: Any) -> None:
    """The end point's uplink through `station`, published: that station now serves its downlinks."""
    uplinks = len(running.of("uplink"))
    op = station.uplink(cnt=cnt, **fields)
    assert (await station.expect("ulDataRsp"))["opId"] == op
    station.send("ulDataCmp", op)
    await wait_for(lambda: len(running.of("uplink")) > uplinks)


async def imported_elsewhere(running: Running, doc: list[dict[str, Any]]) -> dict[str, Any]:
    """`bsscihub sensors import` of `doc` in another process (the same database, no service running); its answer."""
    from bsscihub.protocols.bssci import endpoints

    cli = make_hub(running.hub.config, reactor, {"mioty": installed_families()["mioty"]})
    cli.store.start()
    try:
        return await endpoints.import_endpoints(cli, doc)
    finally:
        await cli.store.stop()


async def attached_and_heard(running: Running, name: str = "bs-b", eui: str = B, cnt: int = 1) -> Station:
    """EP attached (bidirectional) and heard through the station `name`: that station serves its downlinks."""
    await running.service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    station = await running.station(name, eui)
    await station.expect("attPrp")
    await heard(running, station, cnt=cnt)
    return station


@pytest.fixture
def running(tmp_path: Path, pki: PKI) -> Iterator[Running]:
    hub = pytest_twisted.blockon(defer.ensureDeferred(start(tmp_path, pki)))
    yield hub
    pytest_twisted.blockon(defer.ensureDeferred(hub.stop()))


@pytest_twisted.ensureDeferred
async def test_one_uplink_heard_by_two_base_stations_is_one_event(running: Running) -> None:
    service = running.service
    await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    a = await running.station("bs-a", A)
    b = await running.station("bs-b", B)
    for station in (a, b):
        prp = await station.expect("attPrp")
        assert prp["epEui"] == int(EP, 16) and bytes(prp["nwkSnKey"]) == KEY and prp["shAddr"] == 0x1A2B
        assert prp["opId"] == -1  # per connection
    op_a = a.uplink(snr=3.0)
    op_b = b.uplink(snr=9.0)
    assert (await a.expect("ulDataRsp"))["opId"] == op_a
    assert (await b.expect("ulDataRsp"))["opId"] == op_b
    a.send("ulDataCmp", op_a)
    b.send("ulDataCmp", op_b)
    # Both copies through the deduplicator: each one either opened an event or joined one.
    counters = service.counters
    await wait_for(lambda: len(running.of("uplink")) + counters.merged + counters.late >= 2)
    [event] = running.of("uplink")
    assert event.topic == f"mioty/ep/{EP}/up" and event.family == "mioty" and not event.retain
    payload = event.payload
    assert [r["bsEui"] for r in payload["receivers"]] == [B, A]
    assert [r["snr"] for r in payload["receivers"]] == [9.0, 3.0]
    assert payload["data"] == "010203" and payload["packetCnt"] == 1 and payload["time"].endswith("Z")
    assert set(payload) == {"epEui", "packetCnt", "rxTime", "time", "data", "format", "dlOpen", "responseExp",
                            "dlAck", "receivers"}
    sensor = await service.get_sensor(EP)
    assert sensor is not None and sensor["bestBs"] == B and sensor["lastPacketCnt"] == 1
    history = (await service.uplink_history(EP))["items"]
    assert [[r["bsEui"] for r in up["receivers"]] for up in history] == [[B, A]]
    assert (service.counters.copies, service.counters.uplinks, service.counters.merged) == (2, 1, 1)
    # A late copy is acknowledged, counted and dropped.
    c = await running.station("bs-c", C)
    op_c = c.uplink(snr=1.0)
    assert (await c.expect("ulDataRsp"))["opId"] == op_c
    await wait_for(lambda: service.counters.late == 1)
    assert len(running.of("uplink")) == 1
    # The downlink goes to the best path: B.
    result = await service.queue_downlink(EP, b"\xca\xfe", format=1, actor="test")
    assert result["baseStations"] == [B] and result["status"] == "accepted"
    que = await b.expect("dlDataQue")
    assert que["userData"] == [[0xCA, 0xFE]] and que["queId"] == result["queId"]
    assert not [m for m in a.seen if m["command"] == "dlDataQue"]
    op = b.send("dlDataRes", epEui=int(EP, 16), queId=result["queId"], result="sent", txTime=7, packetCnt=2)
    assert (await b.expect("dlDataResRsp"))["opId"] == op
    await wait_for(lambda: running.of("dl_result"))
    [dl] = running.of("dl_result")
    assert dl.topic == f"mioty/ep/{EP}/event/dl_result"
    assert dl.payload["result"] == "sent" and dl.payload["bsEui"] == B and dl.payload["queId"] == result["queId"]
    deadline = reactor.seconds() + 15
    while True:  # the result is recorded in the background, after queued/dispatched/accepted
        [entry] = (await service.downlinks(EP))["items"]
        if entry["status"] not in ("queued", "dispatched", "accepted") or reactor.seconds() > deadline:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert entry["status"] == "sent" and entry["resultBs"] == B
    # Prometheus sees the counters.
    from prometheus_client import generate_latest

    text = generate_latest(running.hub.metrics).decode()
    assert "bsscihub_mioty_uplinks_total 1.0" in text and "bsscihub_mioty_late_copies_total 1.0" in text
    assert 'bsscihub_mioty_dedup_latency_seconds_bucket{le="+Inf"} 1.0' in text


@pytest_twisted.ensureDeferred
async def test_copies_received_in_the_window_merge_however_slow_their_commit(tmp_path: Path, pki: PKI) -> None:
    # A slow disk: every commit of uplink copies takes longer than the whole window. The copy
    # from B arrives while A's commit is under way, well inside the window, and is committed
    # one commit later, after the window's end: it must still join A's event, not be "late".
    running = await start(tmp_path, pki, dedup_window=1.0)
    store = running.hub.store
    commits: list[int] = []
    execute_rows = store.execute_rows

    def slow(sql: str, rows: Any) -> defer.Deferred[None]:
        rows = list(rows)
        if "mioty_uplinks" in sql and "INSERT" in sql.upper():
            commits.append(len(rows))
            return execute_rows(sql, rows).addCallback(lambda r: deferLater(reactor, 1.5, lambda: r))
        return execute_rows(sql, rows)

    store.execute_rows = slow  # type: ignore[method-assign]
    try:
        service = running.service
        await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
        a = await running.station("bs-a", A)
        b = await running.station("bs-b", B)
        for station in (a, b):
            await station.expect("attPrp")
        op_a = a.uplink(snr=3.0)
        await wait_for(lambda: commits)  # A's commit has begun; B's copy waits for the next one
        op_b = b.uplink(snr=9.0)
        assert (await a.expect("ulDataRsp"))["opId"] == op_a
        assert (await b.expect("ulDataRsp"))["opId"] == op_b
        assert commits[:2] == [1, 1]
        counters = service.counters
        await wait_for(lambda: len(running.of("uplink")) + counters.merged + counters.late >= 2)
        [event] = running.of("uplink")
        assert [r["bsEui"] for r in event.payload["receivers"]] == [B, A]
        assert (counters.copies, counters.uplinks, counters.merged, counters.late) == (2, 1, 1, 0)
        sensor = await service.get_sensor(EP)
        assert sensor is not None and sensor["bestBs"] == B
        # Published means marked: nothing of it is published again after a restart.
        await service.registry.flush()
        unpublished = await service.registry.unpublished()
        assert unpublished == []
    finally:
        store.execute_rows = execute_rows  # type: ignore[method-assign]
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_state_and_status_events_and_health(running: Running) -> None:
    a = await running.station("bs-a", A)
    await wait_for(lambda: running.of("status"))
    [state] = running.of("state")
    assert state.retain and state.topic == f"mioty/bs/{A}/state"
    assert state.payload["state"] == "online" and state.payload["vendor"] == "Test"
    assert set(state.payload) == {"state", "vendor", "model", "name", "swVersion", "version", "since"}
    [status] = running.of("status")
    assert status.retain and status.payload["code"] == 0 and status.payload["temp"] == 40.5
    assert status.payload["bsTime"] == 5 and status.payload["time"].endswith("Z")
    up, detail = running.hub.health.report()
    assert up and detail["components"]["bssci"]["baseStations"] == [A]
    assert running.hub.commands["mioty"] == running.service.command
    polled = await running.hub.commands["mioty"]("bs", A.upper(), "status", {})
    assert polled["bsEui"] == A and polled["dutyCycle"] == 0.02
    a.transport.loseConnection()
    await wait_for(lambda: len(running.of("state")) == 2)
    assert running.of("state")[1].payload["state"] == "offline"
    [bs] = await running.service.list_base_stations()
    assert bs["state"] == "offline" and bs["certSerial"].startswith("0x")


@pytest_twisted.ensureDeferred
async def test_stations_without_or_with_a_foreign_certificate_are_refused(running: Running,
                                                                          logged: list[str]) -> None:
    bare = await running.tls(None)
    await bare.lost
    foreign = await running.tls(running.pki.other, ca=running.pki.ca)
    await foreign.lost
    refused = [line for line in logged if "TLS handshake with 127.0.0.1:" in line]
    assert any("refused: no client certificate" in line for line in refused)
    assert any("certificate verify failed" in line and "CN=bs-x" in line for line in refused)
    assert running.service.sessions == {}


@pytest_twisted.ensureDeferred
async def test_revoked_base_station_is_dropped_and_refused(running: Running, logged: list[str]) -> None:
    a = await running.station("bs-a", A)
    result = await running.service.revoke_base_station(A, "stolen from the roof", actor="test")
    assert result["revoked"] and result["revokedSerials"]
    await a.lost
    again = await running.tls(running.pki.bs["bs-a"])
    await again.lost
    assert any("TLS handshake with 127.0.0.1:" in line and "revoked" in line and "stolen" in line
               for line in logged)
    # The same bsEui with another certificate is refused at con.
    other = await running.tls(running.pki.bs["bs-any"])
    other.send("con", 0, version="1.0.0", bsEui=int(A, 16), bidi=True, snBsUuid=[0] * 16)
    error = await other.expect("error")
    assert error["code"] == 13 and "revoked" in error["message"]
    await other.lost
    with pytest.raises(UnknownDevice):
        await running.service.revoke_base_station(C, "never seen")


@pytest_twisted.ensureDeferred
async def test_certificate_bound_to_another_bs_eui_is_refused(running: Running) -> None:
    station = await running.tls(running.pki.bs["bs-a"])
    station.send("con", 0, version="1.0.0", bsEui=int(B, 16), bidi=True, snBsUuid=[0] * 16)
    error = await station.expect("error")
    assert error["code"] == 13 and f"belongs to base station {A}" in error["message"]
    await station.lost


@pytest_twisted.ensureDeferred
async def test_a_second_certificate_cannot_push_a_registered_station_offline(running: Running,
                                                                           logged: list[str]) -> None:
    await running.service.attach(EP, KEY, 0x1A2B, False)
    station = await running.station("bs-c", C)
    await station.expect("attPrp")
    # Whoever holds another station certificate of the same CA tries, again and again, to be C.
    for pair in ("bs-any", "bs-a", "bs-any"):
        intruder = await running.tls(running.pki.bs[pair])
        port = intruder.transport.getHost().port  # type: ignore[union-attr]
        intruder.send("con", 0, version="1.0.0", bsEui=int(C, 16), bidi=True, snBsUuid=[0] * 16)
        error = await intruder.expect("error")
        assert error["code"] == 13
        await intruder.lost
        assert any(line.startswith(f"refused base station {C} at 127.0.0.1:{port}: ") for line in logged)
    assert "bound to no EUI and cannot take it over" in error["message"]
    # C never noticed: same session, still online, its uplinks still answered.
    assert not station.lost.called and running.service.sessions[C].peer is not None
    assert [e.payload["state"] for e in running.of("state")] == ["online"]
    op = station.uplink()
    assert (await station.expect("ulDataRsp"))["opId"] == op
    assert running.service.counters.refused == 3


@pytest_twisted.ensureDeferred
async def test_unbound_certificate_of_an_unknown_station_is_refused_by_default(running: Running,
                                                                             logged: list[str]) -> None:
    station = await running.tls(running.pki.bs["bs-any"])
    station.send("con", 0, version="1.0.0", bsEui=int(C, 16), bidi=True, snBsUuid=[0] * 16)
    error = await station.expect("error")
    assert error["code"] == 13 and f"base station {C} is not registered" in error["message"]
    assert f"bsscihub certs issue-bs NAME --eui {C}" in error["message"]
    await station.lost
    assert C not in running.service.registry.base_stations and running.service.sessions == {}
    # The same station with a certificate bound to its EUI is admitted, registered and pinned to it.
    admitted = await running.station("bs-c", C)
    assert running.service.registry.base_stations[C].cert_serial is not None
    assert not admitted.lost.called


@pytest_twisted.ensureDeferred
async def test_self_registered_station_is_pinned_to_its_certificate(tmp_path: Path, pki: PKI) -> None:
    running = await start(tmp_path, pki, bssci={"self_register": True})
    try:
        first = await running.station("bs-any", C)
        pinned = running.service.registry.base_stations[C].cert_serial
        assert pinned is not None
        # Another unbound certificate cannot take C over, not even with self-registration on ...
        intruder = await running.tls(pki.bs["bs-other"])
        intruder.send("con", 0, version="1.0.0", bsEui=int(C, 16), bidi=True, snBsUuid=[0] * 16)
        assert "registered with another certificate" in (await intruder.expect("error"))["message"]
        await intruder.lost
        assert not first.lost.called
        # ... while the station itself reconnecting with its own certificate replaces its old connection.
        again = await running.station("bs-any", C)
        await first.lost
        assert not again.lost.called and running.service.registry.base_stations[C].cert_serial == pinned
        # A certificate bound to C is C's identity: it is admitted and becomes the pin.
        bound = await running.station("bs-c", C)
        await again.lost
        assert running.service.registry.base_stations[C].cert_serial != pinned
        assert not bound.lost.called
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_certificate_bound_to_another_kind_never_registers_as_a_station(tmp_path: Path, pki: PKI,
                                                                               logged: list[str]) -> None:
    # Self-registration admits unbound certificates; an application center's (or another family's
    # device's) is bound, to something that is no base station, and stays refused.
    running = await start(tmp_path, pki, bssci={"self_register": True})
    try:
        other = BindingKind("test.gadget", "another family's device", "its id")
        for name, binding, kind in (("ac-1", APPLICATION_CENTER.bind(), "scaci.ac"),
                                    ("gadget-1", other.bind("g-7"), "test.gadget")):
            issued = issue_client_cert(pki.ca, pki.ca_key, name, tmp_path / "certs", binding=binding)
            intruder = await running.tls((issued.cert_path, issued.key_path))
            port = intruder.transport.getHost().port  # type: ignore[union-attr]
            intruder.send("con", 0, version="1.0.0", bsEui=int(C, 16), bidi=True, snBsUuid=[0] * 16)
            error = await intruder.expect("error")
            assert error["code"] == 13 and f"is bound to {kind}, not to a base station" in error["message"]
            await intruder.lost
            assert any(line.startswith(f"refused base station {C} at 127.0.0.1:{port}: ") and kind in line
                       for line in logged)
        assert C not in running.service.registry.base_stations and running.service.sessions == {}
        # while an unbound certificate still registers itself
        await running.station("bs-any", C)
        assert running.service.registry.base_stations[C].cert_serial is not None
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_second_connection_of_a_bs_eui_replaces_the_first(running: Running, logged: list[str]) -> None:
    await running.service.attach(EP, KEY, 0x1A2B, False)
    first = await running.station("bs-c", C)
    assert (await first.expect("attPrp"))["opId"] == -1
    second = await running.station("bs-c", C)
    await first.lost
    # Re-propagated on the new connection, SC opIds from -1 again.
    prp = await second.expect("attPrp")
    assert prp["opId"] == -1 and prp["bidi"] is False
    assert any(f"base station {C} connected again" in line and "closing its older connection" in line
               for line in logged)
    assert [e.payload["state"] for e in running.of("state")] == ["online", "online"]
    second.uplink()
    await second.expect("ulDataRsp")


@pytest_twisted.ensureDeferred
async def test_operator_attach_detach_propagate_to_connected_stations(running: Running) -> None:
    a = await running.station("bs-a", A)
    b = await running.station("bs-b", B, version="1.1.0")
    await running.service.command("ep", EP, "attach", {"nwKey": KEY.hex().upper(), "shortAddr": "00ff",
                                                        "bidi": True})
    prp_a, prp_b = await a.expect("attPrp"), await b.expect("attPrp")
    assert prp_a["bidi"] is True and "epClass" not in prp_a
    assert prp_b["epClass"] == "a" and "bidi" not in prp_b  # BSSCI 1.1 layout
    result = await running.service.command("ep", EP, "detach", {})
    assert result["baseStations"] == [A, B]
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)
    await b.expect("detPrp")
    assert [e.kind for e in running.events if e.topic.startswith(f"mioty/ep/{EP}/event/")] == ["attach", "detach"]
    rows = await running.hub.store.fetchall("SELECT actor, action, target FROM audit_log ORDER BY id")
    assert rows == [("mqtt", "mioty.sensor.attach", EP), ("mqtt", "mioty.sensor.detach", EP)]


@pytest_twisted.ensureDeferred
async def test_commands_are_validated(running: Running) -> None:
    command = running.service.command
    cases = [
        (("gw", EP, "attach", {}), "unknown target 'gw'"),
        (("ep", "xyz", "attach", {}), "bad end point EUI 'xyz'"),
        (("ep", EP, "reboot", {}), "unknown ep command 'reboot'"),
        (("ep", EP, "attach", []), "the payload must be a JSON object"),
        (("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b"}), "missing field 'bidi'"),
        (("ep", EP, "attach", {"nwKey": "00", "shortAddr": "1a2b", "bidi": True}), "nwKey must be 32 hexadecimal"),
        (("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b", "bidi": 1}), "bidi must be true or false"),
        (("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "xyz1", "bidi": True}), "shortAddr must be 4"),
        (("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b", "bidi": True, "x": 1}), "unknown field 'x'"),
        (("ep", EP, "detach", {}), f"unknown end point {EP}"),
        (("bs", A, "status", {}), f"unknown base station {A}"),
    ]
    for args, expected in cases:
        with pytest.raises(CommandError) as caught:
            await command(*args)
        assert expected in str(caught.value), (args, str(caught.value))
        assert KEY.hex() not in str(caught.value)
    await command("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b", "bidi": False})
    for payload, expected in [
        ({"data": "zz"}, "data must be hexadecimal"),
        ({"data": "01", "format": 300}, "format must be an integer 0..255"),
        ({"data": "01", "prio": -1}, "prio must be a non-negative number"),
        ({"data": "01"}, "not bidirectional"),
    ]:
        with pytest.raises(CommandError) as caught:
            await command("ep", EP, "down", payload)
        assert expected in str(caught.value)
    await command("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b", "bidi": True})
    # No station to take it: it waits, queued, instead of failing.
    waiting = await command("ep", EP, "down", {"data": "01"})
    assert (waiting["status"], waiting["baseStations"]) == ("queued", [])


@pytest_twisted.ensureDeferred
async def test_queued_downlink_is_revoked_and_reception_status_queried_by_command(running: Running) -> None:
    command = running.service.command
    b = await running.station("bs-b", B)
    await command("ep", EP, "attach", {"nwKey": KEY.hex(), "shortAddr": "1a2b", "bidi": True})
    await b.expect("attPrp")
    await heard(running, b)
    queued = await command("ep", EP, "down", {"data": "cafe"})
    await b.expect("dlDataQue")
    result = await command("ep", EP, "revoke_down", {"queId": queued["queId"]})
    rev = await b.expect("dlDataRev")
    assert (rev["epEui"], rev["queId"]) == (int(EP, 16), queued["queId"])
    assert result == {"epEui": EP, "queId": queued["queId"], "status": "revoked", "problems": []}
    [entry] = (await running.service.downlinks(EP))["items"]
    assert entry["status"] == "revoked"
    with pytest.raises(CommandError, match=f"no pending downlink {queued['queId']}"):
        await command("ep", EP, "revoke_down", {"queId": queued["queId"]})  # gone already
    with pytest.raises(CommandError, match="missing field 'queId'"):
        await command("ep", EP, "revoke_down", {})

    assert await command("ep", EP, "dl_rx_status", {}) == {"epEui": EP, "baseStations": [B]}
    assert (await b.expect("dlRxStatQry"))["epEui"] == int(EP, 16)
    op = b.send("dlRxStat", epEui=int(EP, 16), rxTime=9, packetCnt=3, dlRxSnr=4.5, dlRxRssi=-99.0)
    assert (await b.expect("dlRxStatRsp"))["opId"] == op
    await wait_for(lambda: running.of("dl_rx_status"))
    assert running.of("dl_rx_status")[0].payload["dlRxSnr"] == 4.5
    actions = [r[0] for r in await running.hub.store.fetchall("SELECT action FROM audit_log ORDER BY id")]
    assert "mioty.sensor.downlink_revoke" in actions


@pytest_twisted.ensureDeferred
async def test_non_finite_numbers_in_reports_are_null_with_the_reason(running: Running) -> None:
    """MessagePack carries NaN and ±Infinity, JSON does not: a status or downlink-reception report keeps its
    other fields, the number is null and `invalid` says why, and the event is one the bridge can publish."""
    b = await running.station("bs-b", B)
    await wait_for(lambda: running.of("status"))
    b.status = {"code": 0, "message": "fine", "time": 5, "dutyCycle": float("inf"), "temp": float("nan"),
                "cpuLoad": 0.5}
    polled = await running.service.command("bs", B, "status", {})
    assert (polled["temp"], polled["dutyCycle"], polled["cpuLoad"]) == (None, None, 0.5)
    assert polled["invalid"] == {"temp": "NaN", "dutyCycle": "Infinity"}
    status = running.of("status")[-1].payload
    assert status["invalid"] == {"temp": "NaN", "dutyCycle": "Infinity"} and status["time"].endswith("Z")
    assert json.loads(to_json(status))["temp"] is None
    listed = await running.service.list_base_stations()
    assert json.loads(json.dumps(listed, allow_nan=False))

    op = b.send("dlRxStat", epEui=int(EP, 16), rxTime=9, packetCnt=3, dlRxSnr=float("-inf"), dlRxRssi=-99.0)
    assert (await b.expect("dlRxStatRsp"))["opId"] == op
    await wait_for(lambda: running.of("dl_rx_status"))
    report = running.of("dl_rx_status")[0].payload
    assert (report["dlRxSnr"], report["dlRxRssi"], report["invalid"]) == (None, -99.0, {"dlRxSnr": "-Infinity"})
    assert json.loads(to_json(report))["dlRxRssi"] == -99.0


@pytest_twisted.ensureDeferred
async def test_a_sent_downlink_is_marked_acked_by_the_uplink_after_the_one_it_went_with(running: Running) -> None:
    service = running.service
    b = await running.station("bs-b", B)
    await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    await b.expect("attPrp")
    await heard(running, b, cnt=3)
    queued = await service.queue_downlink(EP, b"\xca\xfe", actor="test")
    await b.expect("dlDataQue")
    op = b.send("dlDataRes", epEui=int(EP, 16), queId=queued["queId"], result="sent", txTime=7, packetCnt=5)
    await b.expect("dlDataResRsp")
    b.send("dlDataResCmp", op)

    async def entry_after_acking_uplink(cnt: int) -> dict[str, Any]:
        uplinks = len(running.of("uplink"))
        op = b.uplink(cnt=cnt, dlAck=True)
        assert (await b.expect("ulDataRsp"))["opId"] == op
        b.send("ulDataCmp", op)
        await wait_for(lambda: len(running.of("uplink")) > uplinks)
        # the acknowledgement is recorded in the background, noted before the event is published
        await wait_for(lambda: not service._writes)
        [entry] = (await service.downlinks(EP))["items"]
        return entry

    # dlAck acknowledges the downlink of packetCnt - 1: not this one (sent with 5) for counter 7 ...
    assert not (await entry_after_acking_uplink(7))["acked"]
    # ... but for counter 6.
    entry = await entry_after_acking_uplink(6)
    assert entry["acked"] and entry["status"] == "sent" and entry["packetCnt"] == 5


@pytest_twisted.ensureDeferred
async def test_inactivity_warning_and_auto_detach(running: Running) -> None:
    service = running.service
    await service.attach(EP, KEY, 1, False)
    a = await running.station("bs-a", A)
    await a.expect("attPrp")
    now = service.clock.seconds()
    # Heard long ago, before a long hub outage: silence counts from the hub's start only.
    service.registry.sensors[EP].last_seen = now - 100 * 86400
    await service.check_lifecycle(now + 3600)
    assert running.of("inactivity_warning") == []
    await service.check_lifecycle(now + 36 * 3600)
    await service.check_lifecycle(now + 37 * 3600)  # warned once per silence
    assert [e.kind for e in running.events if "/event/" in e.topic] == ["attach", "inactivity_warning"]
    await service.check_lifecycle(now + 72 * 3600)
    [detach] = running.of("auto_detach")
    assert detach.payload["silentFor"] >= 72 * 3600 and detach.payload["lastSeen"].endswith("Z")
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)
    sensor = await service.get_sensor(EP)
    assert sensor is not None and sensor["attached"] is False


@pytest_twisted.ensureDeferred
async def test_acknowledged_uplink_survives_a_stop_without_publishing(tmp_path: Path, pki: PKI) -> None:
    never: list[defer.Deferred[None]] = []

    def stuck(event: Event) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        never.append(d)  # the outbox never confirms: as if the process died first
        return d

    first = await start(tmp_path, pki, sink=stuck)
    try:
        a = await first.station("bs-a", A)
        a.uplink(cnt=41, snr=4.0)
        await a.expect("ulDataRsp")  # acknowledged: it must not be lost
        await wait_for(lambda: first.of("uplink"))
    finally:
        await first.stop()
    second = await start(tmp_path, pki)
    try:
        [event] = second.of("uplink")
        assert event.payload["packetCnt"] == 41 and event.payload["receivers"][0]["bsEui"] == A
        assert second.service.counters.replayed == 1
        # A late copy of it after the restart is still recognised.
        b = await second.station("bs-b", B)
        b.uplink(cnt=41)
        await b.expect("ulDataRsp")
        await wait_for(lambda: second.service.counters.late == 1)
        await second.service.registry.flush()
    finally:
        await second.stop()
    third = await start(tmp_path, pki)
    try:
        assert third.of("uplink") == []  # confirmed by the second run: not again
    finally:
        await third.stop()


@pytest_twisted.ensureDeferred
async def test_a_sensor_removed_elsewhere_is_detached_though_the_sync_that_saw_it_failed_after(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sync read the removal (and moved past it), then its read of the hubs' removal notes failed: the
    # sensor stayed attached on this hub's stations for good, as no later sync returns that removal again.
    from bsscihub.protocols.bssci.registry import Registry

    a = await attached_and_heard(running, "bs-a", A)
    assert await Registry(running.hub.store, reactor).delete_sensor(EP)  # `bsscihub sensors` in another process

    async def hiccup(euis: Any) -> set[str]:
        raise ConnectionError("the database went away for a moment")

    monkeypatch.setattr(running.service.registry, "removed_by_hubs", hiccup)
    with pytest.raises(ConnectionError):
        await running.service.sync()
    monkeypatch.undo()
    await running.service.sync()  # the next round (flush_interval)
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)
    assert EP not in running.service.registry.sensors


@pytest_twisted.ensureDeferred
async def test_sensors_imported_elsewhere_or_here_reach_connected_stations(running: Running) -> None:
    from bsscihub.protocols.bssci import endpoints

    a = await running.station("bs-a", A)
    doc = [{"eui": EP, "nwKey": KEY.hex(), "shortAddr": "0042", "bidi": False}]
    assert (await imported_elsewhere(running, doc))["created"] == 1
    assert a.seen[-1]["command"] != "attPrp"
    await running.service.sync()  # what the flush_interval timer runs
    prp = await a.expect("attPrp")
    assert prp["epEui"] == int(EP, 16) and prp["shAddr"] == 0x42
    assert running.of("attach")[-1].payload["source"] == "external"
    # Through the running service (the REST import): propagated at once, only what changed.
    doc = [{"eui": EP, "nwKey": KEY.hex(), "shortAddr": "0043", "bidi": False},
           {"eui": "0011223344556678", "nwKey": KEY.hex(), "shortAddr": "0044", "bidi": True}]
    result = await endpoints.import_endpoints(running.hub, doc, actor="alice")
    assert (result["created"], result["updated"]) == (1, 1)
    got = sorted([(await a.expect("attPrp"))["shAddr"], (await a.expect("attPrp"))["shAddr"]])
    assert got == [0x43, 0x44]
    await running.service.sync()
    await deferLater(reactor, 0.05, lambda: None)
    assert not [m for m in a.inbox if m["command"] == "attPrp"]  # its own writes are not news
