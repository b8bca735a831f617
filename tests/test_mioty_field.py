"""What real base stations and end points need of the service center, black-box over mutual TLS:
over-the-air attach and detach, geolocation without a fix, session resume."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater

from bsscihub.protocols.bssci.crypto import attach_signature, session_key
from tests.test_mioty_service import EP, KEY, PKI, A, B, Running, Station, pki, running, start, wait_for

__all__ = ["pki", "running"]  # fixtures, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

EP_INT = int(EP, 16)
NONCE = bytes.fromhex("a1b2c3d4")


def att(station: Station, cnt: int, sign: bytes, nonce: bytes = NONCE, **over: object) -> int:
    fields = {"dualChan": True, "repetition": False, "wideCarrOff": False, "longBlkDist": False, **over}
    return station.send("att", epEui=EP_INT, rxTime=1, attachCnt=cnt, snr=5.0, rssi=-90.0, nonce=list(nonce),
                        sign=list(sign), **{k: v for k, v in fields.items() if v is not None})


def det(station: Station, packet_cnt: int, sign: bytes = b"\x01\x02\x03\x04") -> int:
    return station.send("det", epEui=EP_INT, rxTime=1, packetCnt=packet_cnt, snr=1.0, rssi=-99.0, sign=list(sign))


@pytest_twisted.ensureDeferred
async def test_over_the_air_attach_answers_the_derived_session_key(running: Running) -> None:
    await running.service.attach(EP, KEY, 0x1A2B, True)
    a = await running.station("bs-a", A)
    b = await running.station("bs-b", B)
    assert bytes((await a.expect("attPrp"))["nwkSnKey"]) == KEY  # provisioned: the configured key
    await b.expect("attPrp")
    a.uplink(cnt=500)
    await a.expect("ulDataRsp")
    await wait_for(lambda: running.of("uplink"))

    good = attach_signature(KEY, EP_INT, 7)
    derived = session_key(KEY, EP_INT, NONCE, good)
    assert derived != KEY
    att(a, 7, good)
    rsp = await a.expect("attRsp")
    assert bytes(rsp["nwkSnKey"]) == derived and rsp["shAddr"] == 0x1A2B
    # The same request heard by another station: answered identically, attached once.
    att(b, 7, good)
    rsp_b = await b.expect("attRsp")
    assert (bytes(rsp_b["nwkSnKey"]), rsp_b["shAddr"]) == (derived, 0x1A2B)
    # The other station learns the new session: its key, and a packet counter that restarted.
    prp = await b.expect("attPrp")
    assert bytes(prp["nwkSnKey"]) == derived and prp["lastPacketCnt"] == 0 and prp["dualChan"] is True
    ota = [e.payload for e in running.of("attach") if e.payload["source"] == "ota"]
    assert len(ota) == 1 and (ota[0]["bsEui"], ota[0]["attachCnt"]) == (A, 7) and "nwKey" not in ota[0]
    sensor = await running.service.get_sensor(EP)
    assert sensor is not None and sensor["attachCnt"] == 7 and sensor["otaSession"] is True
    assert sensor["lastPacketCnt"] is None
    # Every later attPrp (a station reconnecting, the operator attaching again) carries the session key.
    await running.service.attach(EP, KEY, 0x1A2B, True)
    assert bytes((await a.expect("attPrp"))["nwkSnKey"]) == derived

    # Replays and forgeries are refused with the reason.
    att(a, 8, b"\x00\x00\x00\x00")
    error = await a.expect("error")
    assert error["code"] == 13 and "does not verify" in error["message"]
    att(a, 6, attach_signature(KEY, EP_INT, 6))
    assert "replayed attachCnt 6" in (await a.expect("error"))["message"]
    att(a, 7, good, nonce=b"\x00\x00\x00\x01")  # the counter of the last attach, another nonce: no copy
    assert "replayed attachCnt 7" in (await a.expect("error"))["message"]
    att(a, 1, attach_signature(KEY, 0x99, 1))
    assert (await a.expect("error"))["code"] == 13
    await wait_for(lambda: len(running.of("att_rejected")) == 4)
    # A higher counter is a new session with a new key.
    newer = attach_signature(KEY, EP_INT, 9)
    att(b, 9, newer, nonce=b"\x05\x06\x07\x08")
    assert bytes((await b.expect("attRsp"))["nwkSnKey"]) == session_key(KEY, EP_INT, b"\x05\x06\x07\x08", newer)
    assert bytes((await a.expect("attPrp"))["nwkSnKey"]) == session_key(KEY, EP_INT, b"\x05\x06\x07\x08", newer)


@pytest_twisted.ensureDeferred
async def test_first_attach_takes_any_counter_and_omitted_radio_flags_default_to_false(running: Running) -> None:
    await running.service.attach(EP, KEY, 0x0042, False)
    a = await running.station("bs-a", A)
    await a.expect("attPrp")
    cnt = 0xFFFF_FFF0  # no attach seen before: any counter
    att(a, cnt, attach_signature(KEY, EP_INT, cnt), dualChan=None, repetition=None, wideCarrOff=None,
        longBlkDist=None)
    await a.expect("attRsp")
    sensor = await running.service.get_sensor(EP)
    assert sensor is not None and sensor["attachCnt"] == cnt and sensor["dualChan"] is False


@pytest_twisted.ensureDeferred
async def test_the_session_key_survives_a_restart(tmp_path: Path, pki: PKI) -> None:
    first = await start(tmp_path, pki)
    sign = attach_signature(KEY, EP_INT, 3)
    try:
        await first.service.attach(EP, KEY, 0x1A2B, True)
        a = await first.station("bs-a", A)
        await a.expect("attPrp")
        att(a, 3, sign)
        await a.expect("attRsp")
    finally:
        await first.stop()
    second = await start(tmp_path, pki)
    try:
        b = await second.station("bs-b", B)
        prp = await b.expect("attPrp")
        assert bytes(prp["nwkSnKey"]) == session_key(KEY, EP_INT, NONCE, sign)
        # The counter survives too: the same attach again is a replay, not a new session.
        att(b, 3, sign)
        assert "replayed attachCnt 3" in (await b.expect("error"))["message"]
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_over_the_air_detach(running: Running) -> None:
    await running.service.attach(EP, KEY, 0x1A2B, True)
    a = await running.station("bs-a", A)
    b = await running.station("bs-b", B)
    await a.expect("attPrp")
    await b.expect("attPrp")
    sign = attach_signature(KEY, EP_INT, 1)
    att(a, 1, sign)
    await a.expect("attRsp")
    await b.expect("attPrp")
    # Heard by both stations: each gets detRsp echoing the sign; one detach, one detPrp per station.
    det(a, 12, b"\x0a\x0b\x0c\x0d")
    assert bytes((await a.expect("detRsp"))["sign"]) == b"\x0a\x0b\x0c\x0d"
    det(b, 12, b"\x0a\x0b\x0c\x0d")
    assert bytes((await b.expect("detRsp"))["sign"]) == b"\x0a\x0b\x0c\x0d"
    prp = await b.expect("detPrp")
    assert prp["epEui"] == EP_INT
    await wait_for(lambda: running.of("detach"))
    [event] = running.of("detach")
    assert event.topic == f"mioty/ep/{EP}/event/detach"
    assert (event.payload["source"], event.payload["bsEui"], event.payload["packetCnt"]) == ("ota", A, 12)
    sensor = await running.service.get_sensor(EP)
    assert sensor is not None and sensor["attached"] is False and sensor["otaSession"] is False
    assert not [msg for msg in a.inbox + b.inbox if msg["command"] == "detPrp"]
    # The end point's session ended: the operator attaching it again propagates its own key.
    await running.service.attach(EP, KEY, 0x1A2B, True)
    assert bytes((await a.expect("attPrp"))["nwkSnKey"]) == KEY
    # An end point the service center does not know is refused.
    a.send("det", epEui=0x99, rxTime=1, packetCnt=1, snr=1.0, rssi=-99.0, sign=[1, 2, 3, 4])
    assert (await a.expect("error"))["code"] == 2


# -- geolocation


@pytest_twisted.ensureDeferred
async def test_geolocation_0_0_is_no_fix_and_never_replaces_a_known_location(running: Running) -> None:
    a = await connect(running, "bs-a", A, os.urandom(16), geoLocation=[52.52, 13.405, 34.0])
    bs = await running.service.get_base_station(A)
    assert bs is not None and bs["geoLocation"] == [52.52, 13.405, 34.0]
    a.transport.loseConnection()  # type: ignore[union-attr]
    await a.lost
    a = await connect(running, "bs-a", A, os.urandom(16), geoLocation=[0.0, 0.0, 0.0])
    await wait_for(lambda: running.of("status"))  # the first poll, answered by the station without a location
    a.quiet = True  # the next ones by hand
    a.inbox.clear()
    session = running.service.sessions[A]
    d = session.poll_status()
    status = await a.expect("status")
    a.send("statusRsp", status["opId"], code=0, message="ok", time=5, dutyCycle=0.1, geoLocation=[0, 0, 0])
    await d
    bs = await running.service.get_base_station(A)
    assert bs is not None and bs["geoLocation"] == [52.52, 13.405, 34.0]
    published = [e.payload for e in running.of("status")]
    assert published and all("geoLocation" not in p for p in published)
    # A real fix moves it.
    d = session.poll_status()
    status = await a.expect("status")
    a.send("statusRsp", status["opId"], code=0, message="ok", time=6, dutyCycle=0.1, geoLocation=[48.1, 0.0, 5.0])
    await d
    bs = await running.service.get_base_station(A)
    assert bs is not None and bs["geoLocation"] == [48.1, 0.0, 5.0]


# -- session resume


class Quiet(Station):
    """A station that leaves the hub's operations unanswered while `quiet` is set."""

    quiet = False

    def dataReceived(self, data: bytes) -> None:
        if not self.quiet:
            super().dataReceived(data)
            return
        for msg in self.framer.feed(data):
            self.seen.append(msg)
            self.inbox.append(msg)


async def open_tls(running: Running, name: str) -> Quiet:
    """A mutual-TLS connection to the hub with base-station certificate `name`."""
    cert, key = running.pki.bs[name]
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(running.pki.ca.read_bytes()),
                                  clientCertificate=PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", running.port))
    return await connectProtocol(endpoint, Quiet())


async def connect(running: Running, name: str, eui: str, uuid: bytes, *, resume_ops: tuple[int, int] | None = None,
                  expect_resume: bool = False, **con: Any) -> Quiet:
    station = await open_tls(running, name)
    extra = {} if resume_ops is None else {"snBsOpId": resume_ops[0], "snScOpId": resume_ops[1]}
    station.send("con", 0, version="1.0.0", bsEui=int(eui, 16), vendor="Test", bidi=True, snBsUuid=list(uuid),
                 **extra, **con)
    rsp = await station.expect("conRsp")
    station.con_rsp = rsp  # type: ignore[attr-defined]
    assert rsp["snResume"] is expect_resume
    station.send("conCmp", 0)
    await wait_for(lambda: running.service.sessions.get(eui) is not None
                   and running.service.sessions[eui].established_at is not None)
    return station


def prps(station: Station) -> list[dict[str, Any]]:
    out = [msg for msg in station.inbox if msg["command"] in ("attPrp", "detPrp")]
    station.inbox = [msg for msg in station.inbox if msg not in out]
    return out


EPS = [f"00112233445566{i:02x}" for i in range(1, 5)]


@pytest.fixture
def hub(tmp_path: Path, pki: PKI) -> Iterator[Running]:
    """A hub that keeps the session of a station whose connection broke for a minute (bssci.resume_window)."""
    running = pytest_twisted.blockon(defer.ensureDeferred(start(tmp_path, pki, bssci={"resume_window": 60})))
    yield running
    pytest_twisted.blockon(defer.ensureDeferred(running.stop()))


async def connected_with(hub: Running, attached: list[str]) -> tuple[bytes, Quiet]:
    """`attached` end points attached, then bs-a connected with a new session (its snBsUuid returned), every
    attPrp answered."""
    for ep in attached:
        await hub.service.attach(ep, KEY, 0x0100, True)
    uuid = os.urandom(16)
    a = await connect(hub, "bs-a", A, uuid)
    await wait_for(lambda: hub.service.sessions[A].propagation_pending == 0)
    return uuid, a


@pytest_twisted.ensureDeferred
async def test_a_station_back_within_the_resume_window_resumes_its_session(hub: Running) -> None:
    uuid, a = await connected_with(hub, EPS[:3])
    first_sc_uuid = a.con_rsp["snScUuid"]  # type: ignore[attr-defined]
    first = prps(a)
    assert sorted(p["epEui"] for p in first) == sorted(int(ep, 16) for ep in EPS[:3])
    a.uplink(EPS[1], cnt=1)
    a.uplink(cnt=2)
    await a.expect("ulDataRsp")
    await a.expect("ulDataRsp")
    await wait_for(lambda: hub.of("uplink"))
    # A downlink the station accepted and still holds when the network breaks ...
    queued = await hub.service.queue_downlink(EPS[1], "abcd")
    assert (await a.expect("dlDataQue"))["queId"] == queued["queId"]
    await wait_for(lambda: hub.service.downlink_queue.pending[queued["queId"]].state.value == "accepted")
    # ... one propagation it never answers ...
    a.quiet = True
    await hub.service.attach(EPS[3], KEY, 0x0104, True)
    unanswered = await a.expect("attPrp")
    a.transport.abortConnection()  # type: ignore[union-attr]
    await a.lost
    await wait_for(lambda: A not in hub.service.sessions)
    # ... and one change while it is away.
    await hub.service.detach(EPS[0])

    b = await connect(hub, "bs-a", A, uuid, resume_ops=(2, unanswered["opId"]), expect_resume=True)
    b.next_op = 3
    assert b.con_rsp["snScUuid"] == first_sc_uuid  # type: ignore[attr-defined]
    await wait_for(lambda: hub.service.sessions[A].propagation_pending == 0)
    again = prps(b)
    # Only the unfinished attPrp and the missed detPrp, not every attachment again; opIds continue.
    assert [(p["command"], p["epEui"]) for p in again] == [("attPrp", int(EPS[3], 16)),
                                                           ("detPrp", int(EPS[0], 16))]
    assert [p["opId"] for p in again] == [unanswered["opId"] - 1, unanswered["opId"] - 2]
    # It still holds the downlink: not sent again, and its report is taken.
    held = hub.service.downlink_queue.pending[queued["queId"]]
    assert held.state.value == "accepted" and held.holder is hub.service.sessions[A]
    b.uplink(EPS[1], cnt=2)  # its downlink window: nothing to hand the station again
    await b.expect("ulDataRsp")
    await wait_for(lambda: len(hub.of("uplink")) == 2)
    assert not [msg for msg in b.inbox if msg["command"] == "dlDataQue"]
    b.next_op = 4
    b.send("dlDataRes", epEui=int(EPS[1], 16), queId=queued["queId"], result="sent", txTime=5, packetCnt=2)
    await b.expect("dlDataResRsp")
    [entry] = (await hub.service.downlinks(EPS[1]))["items"]
    assert entry["status"] == "sent" and entry["resultBs"] == A
    # The station's own counter continued: opId 2 was used before the break.
    b.next_op = 2
    b.uplink(cnt=3)
    assert "does not increase" in (await b.expect("error"))["message"]
    b.send("errorAck", 2)
    b.next_op = 5
    b.uplink(cnt=4)
    await b.expect("ulDataRsp")
    assert hub.service.counters.resumed == 1


@pytest_twisted.ensureDeferred
async def test_a_station_refusing_the_resume_gets_a_fresh_session(hub: Running) -> None:
    uuid, a = await connected_with(hub, EPS)
    first_sc_uuid = a.con_rsp["snScUuid"]  # type: ignore[attr-defined]
    a.transport.loseConnection()  # type: ignore[union-attr]
    await a.lost
    await wait_for(lambda: A not in hub.service.sessions)

    # Offered a resume it cannot take, the station answers error and asks again on the same connection.
    b = await connect_refusing(hub, uuid)
    rsp = await b.expect("conRsp")
    assert rsp["snResume"] is False and rsp["snScUuid"] != first_sc_uuid and bytes(rsp["snScUuid"]) != uuid
    b.send("conCmp", 0)
    await wait_for(lambda: hub.service.sessions[A].established_at is not None
                   and hub.service.sessions[A].propagation_pending == 0)
    fresh = prps(b)
    # A fresh session: SC opIds from -1, every attachment propagated.
    assert sorted(p["epEui"] for p in fresh) == sorted(int(ep, 16) for ep in EPS)
    assert sorted(p["opId"] for p in fresh)[-1] == -1
    assert hub.service.counters.resumed == 0
    b.transport.loseConnection()  # type: ignore[union-attr]
    await b.lost
    await wait_for(lambda: A not in hub.service.sessions)

    # Refusing and closing: the next connection is fresh without asking.
    c = await connect_refusing(hub, uuid, close=True)
    await c.lost
    await connect(hub, "bs-a", A, uuid, expect_resume=False)


async def connect_refusing(running: Running, uuid: bytes, close: bool = False) -> Quiet:
    """A station that asks to resume, refuses the hub's resume with error, then asks again (or closes)."""
    station = await open_tls(running, "bs-a")
    con = {"version": "1.0.0", "bsEui": int(A, 16), "bidi": True, "snBsUuid": list(uuid)}
    station.send("con", 0, **con)
    assert (await station.expect("conRsp"))["snResume"] is True
    station.send("error", 0, code=22, message="no session to resume")
    await station.expect("errorAck")
    if close:
        station.transport.loseConnection()  # type: ignore[union-attr]
    else:
        station.send("con", 0, **con)
    return station


@pytest_twisted.ensureDeferred
async def test_resume_is_off_by_default(running: Running) -> None:
    assert running.hub.config.section("bssci").resume_window == 0
    uuid = os.urandom(16)
    a = await connect(running, "bs-a", A, uuid)
    a.transport.loseConnection()  # type: ignore[union-attr]
    await a.lost
    await wait_for(lambda: A not in running.service.sessions)
    await connect(running, "bs-a", A, uuid, expect_resume=False)


@pytest_twisted.ensureDeferred
async def test_downlinks_of_a_station_that_does_not_resume_in_time_are_queued_again(tmp_path: Path,
                                                                                     pki: PKI) -> None:
    hub = await start(tmp_path, pki, bssci={"resume_window": "300ms"})
    try:
        await hub.service.attach(EPS[1], KEY, 0x0100, True)
        a = await connect(hub, "bs-a", A, os.urandom(16))
        a.uplink(EPS[1], cnt=1)
        await a.expect("ulDataRsp")
        await wait_for(lambda: hub.of("uplink"))
        queued = await hub.service.queue_downlink(EPS[1], "abcd")
        dl = hub.service.downlink_queue.pending[queued["queId"]]
        await wait_for(lambda: dl.state.value == "accepted")
        a.transport.loseConnection()  # type: ignore[union-attr]
        await a.lost
        await wait_for(lambda: A not in hub.service.sessions)
        assert dl.state.value == "accepted"  # the station may still resume and send it
        await wait_for(lambda: dl.state.value == "queued")
        assert A not in hub.service._resumable
    finally:
        await hub.stop()


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("off", 0.0), ("2m", 120.0), ("45", 45.0)])
def test_resume_window_is_off_or_a_duration(value: str, seconds: float) -> None:
    from tests.test_config import load

    assert load(None, {"BSSCIHUB_BSSCI_RESUME_WINDOW": value}).section("bssci").resume_window == seconds


@pytest.mark.parametrize("value", ["banana", "-1"])
def test_a_bad_resume_window_stops_the_start_naming_the_key(value: str) -> None:
    from bsscihub.config import ConfigError
    from tests.test_config import load

    with pytest.raises(ConfigError, match=r"bssci\.resume_window = .*expected 0 \(off\) or a duration"):
        load(None, {"BSSCIHUB_BSSCI_RESUME_WINDOW": value})


# -- lenient where stations are, strict where it matters


@pytest_twisted.ensureDeferred
async def test_lenient_and_strict_over_mutual_tls(running: Running) -> None:
    await running.service.attach(EP, KEY, 0x0042, True)
    early = await open_tls(running, "bs-a")
    early.send("ulData", epEui=EP_INT, rxTime=1, packetCnt=1, snr=1.0, rssi=-90.0, userData=[1])
    assert "con, conRsp, conCmp come first" in (await early.expect("error"))["message"]
    early.send("con", 0, version="1.7.2", bsEui=int(A, 16), bidi=True, snBsUuid=list(os.urandom(16)))
    assert (await early.expect("conRsp"))["version"] == "1.1.0"  # the highest the hub speaks below 1.7.2
    early.send("conCmp", 0)
    prp = await early.expect("attPrp")
    assert "epClass" in prp and "bidi" not in prp  # the 1.1 layout
    a = early
    # A real station's uplink without dlOpen, responseExp, dlAck: taken, published with false.
    a.send("ulData", epEui=EP_INT, rxTime=1_700_000_000_000_000_000, packetCnt=7, snr=3.0, rssi=-99.0,
           userData=[9, 9])
    await a.expect("ulDataRsp")
    await wait_for(lambda: running.of("uplink"))
    up = running.of("uplink")[0].payload
    assert (up["packetCnt"], up["dlOpen"], up["responseExp"], up["dlAck"]) == (7, False, False, False)
    # Strict: too much userData, commands of the wrong direction, a second con.
    op = a.send("ulData", epEui=EP_INT, rxTime=1, packetCnt=8, snr=3.0, rssi=-99.0, userData=[0] * 201)
    error = await a.expect("error")
    assert (error["opId"], error["code"]) == (op, 22) and "at most 200 bytes" in error["message"]
    a.send("statusCmp", -77)
    assert "wrong direction" in (await a.expect("error"))["message"]
    a.send("dlDataQueCmp", -78)
    assert "wrong direction" in (await a.expect("error"))["message"]
    a.send("status")
    assert (await a.expect("error"))["code"] == 38
    a.send("con", 0, version="1.0.0", bsEui=int(A, 16), bidi=True, snBsUuid=list(os.urandom(16)))
    assert "has a session already" in (await a.expect("error"))["message"]
    assert not a.lost.called and running.service.sessions[A].established_at is not None
    assert len(running.of("uplink")) == 1  # nothing refused was taken

    # Another major version: error, then closed once the station acknowledged it.
    other = await open_tls(running, "bs-b")
    other.send("con", 0, version="2.0.0", bsEui=int(B, 16), bidi=True, snBsUuid=list(os.urandom(16)))
    error = await other.expect("error")
    assert error["code"] == 93 and "major versions differ" in error["message"]
    await deferLater(reactor, 0.3, lambda: None)
    assert not other.lost.called  # waiting for the station's errorAck
    other.send("errorAck", 0)
    await other.lost
    assert B not in running.service.sessions


@pytest_twisted.ensureDeferred
async def test_a_station_reconnecting_before_the_hub_saw_the_break_resumes_too(hub: Running) -> None:
    uuid, a = await connected_with(hub, EPS[:2])
    lowest = min(msg["opId"] for msg in a.seen if msg["opId"] < 0)
    first_uuid = a.con_rsp["snScUuid"]  # type: ignore[attr-defined]
    # The old connection is still open at the hub (a silent break): the new one takes over and resumes.
    b = await connect(hub, "bs-a", A, uuid, expect_resume=True)
    await a.lost
    assert b.con_rsp["snScUuid"] == first_uuid  # type: ignore[attr-defined]
    await deferLater(reactor, 0.2, lambda: None)
    assert not prps(b)  # nothing was unfinished: no attPrp again
    assert all(msg["opId"] < lowest for msg in b.seen if msg["opId"] < 0)  # SC opIds continue
