"""In-memory BSSCI conversations: the protocol over a StringTransport, a Clock for time, a recording
service center. Every operation, both directions, and every error path of the session rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from zope.interface import implementer

from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.framing import Framer, encode_frame
from bsscihub.protocols.bssci.protocol import BSSCIProtocol
from bsscihub.protocols.bssci.session import (
    EINVAL,
    ENOSYS,
    EOPNOTSUPP,
    EPROTONOSUPPORT,
    IServiceCenter,
    OperationFailed,
    OperationTimedOut,
    Refused,
    ResumeState,
    Session,
    SessionClosed,
    SessionConfig,
    SessionStats,
    State,
    attach_signature,
    verify_attach_signature,
)
from tests.captures import load_capture
from tests.helpers import log_events, log_lines

PEER = IPv4Address("TCP", "10.0.0.5", 43122)
BS_EUI = 0x00073200007767F3
EP1, EP2, EP3 = 0x0011223344556677, 0x0011223344556678, 0x0011223344556679
KEY = bytes(range(16))
CONFIG = SessionConfig(
    sc_eui=0x70B3D59CD0000000,
    version="1.0.0",
    ping_idle=60.0,
    ping_timeout=30.0,
    op_timeout=20.0,
    status_interval=300.0,
    propagate_window=2,
    sw_version="9.9",
)


@implementer(IServiceCenter)
class Center:
    """Records what the sessions tell it; tests decide the answers."""

    def __init__(self) -> None:
        self.attached = [EP1, EP2, EP3]
        self.calls: list[tuple[str, Any]] = []
        self.uplinks: list[tuple[m.UlData, defer.Deferred[None]]] = []
        self.refuse_con: Refused | None = None
        self.att_answer: Any = None
        self.resume: ResumeState | None = None

    def session_connecting(self, session: Session, con: m.Con) -> None:
        self.calls.append(("connecting", con))
        if self.refuse_con is not None:
            raise self.refuse_con
        if self.resume is not None and self.resume.bs_uuid == con.snBsUuid:
            session.offer_resume(self.resume)
            self.resume = None  # offered once

    def session_ready(self, session: Session) -> None:
        self.calls.append(("ready", session.bs_hex))
        session.propagate((True, ep) for ep in self.attached)

    def session_closed(self, session: Session, reason: str) -> None:
        self.calls.append(("closed", reason))

    def uplink(self, session: Session, msg: m.UlData) -> defer.Deferred[None]:
        if msg.snr > 1000:
            raise Refused(EINVAL, "ulData: snr implausible")
        d: defer.Deferred[None] = defer.Deferred()
        self.uplinks.append((msg, d))
        return d

    def attach_request(self, session: Session, msg: m.Att) -> defer.Deferred[m.AttRsp]:
        self.calls.append(("att", msg.epEui))
        if isinstance(self.att_answer, Refused):
            return defer.fail(self.att_answer)
        return defer.succeed(m.AttRsp(opId=msg.opId, nwkSnKey=KEY, shAddr=0x1234))

    def detach_request(self, session: Session, msg: m.Det) -> defer.Deferred[m.DetRsp]:
        self.calls.append(("det", msg.epEui))
        return defer.fail(Refused(EOPNOTSUPP, "det: not supported"))

    def downlink_result(self, session: Session, msg: m.DlDataRes) -> None:
        self.calls.append(("dlDataRes", msg))

    def downlink_rx_status(self, session: Session, msg: m.DlRxStat) -> None:
        self.calls.append(("dlRxStat", msg))

    def status_report(self, session: Session, msg: m.StatusRsp) -> None:
        self.calls.append(("status", msg))

    def propagation(self, session: Session, attach: bool, ep_eui: int, op_id: int) -> m.Message | None:
        if not attach:
            return m.DetPrp(opId=op_id, epEui=ep_eui)
        if ep_eui not in self.attached:
            return None
        return m.AttPrp(opId=op_id, epEui=ep_eui, bidi=True, nwkSnKey=KEY, shAddr=0x1234, lastPacketCnt=7,
                        dualChan=False, repetition=False, wideCarrOff=False, longBlkDist=False)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class BS:
    """The base-station side of one in-memory connection."""

    def __init__(self, center: Center, clock: Clock, config: SessionConfig = CONFIG, max_frame: int = 1 << 20) -> None:
        self.clock = clock
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol = BSSCIProtocol(center, config, clock, SessionStats(), max_frame)
        self.protocol.makeConnection(self.transport)
        self._framer = Framer()
        self.next_op = 1

    @property
    def session(self) -> Session:
        return self.protocol.session

    def send(self, command: str, op: int | None = None, **fields: Any) -> None:
        if op is None:
            op, self.next_op = self.next_op, self.next_op + 1
        self.protocol.dataReceived(encode_frame({"command": command, "opId": op, **fields}))

    def received(self) -> list[dict[str, Any]]:
        data = self.transport.value()
        self.transport.clear()
        return self._framer.feed(data)

    def commands(self) -> list[tuple[str, int]]:
        return [(w["command"], w["opId"]) for w in self.received()]

    def connect(self, version: str = "1.0.0", answer_status: bool = True) -> list[dict[str, Any]]:
        """con → conRsp → conCmp; returns what the hub sent after conCmp (status poll answered)."""
        self.send("con", 0, version=version, bsEui=BS_EUI, vendor="Diehl Metering", bidi=True,
                  snBsUuid=list(range(16)))
        [rsp] = self.received()
        assert rsp["command"] == "conRsp", rsp
        self.send("conCmp", 0)
        out = self.received()
        if answer_status:
            [status] = [w for w in out if w["command"] == "status"]
            self.send("statusRsp", status["opId"], code=0, message="ok", time=1, dutyCycle=0.0)
            assert self.commands() == [("statusCmp", status["opId"])]
        return out

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def ul_data(ep: int = EP1, cnt: int = 1, **over: Any) -> dict[str, Any]:
    return {"epEui": ep, "rxTime": 1_700_000_000_000_000_000, "packetCnt": cnt, "snr": 12.5, "rssi": -101.0,
            "userData": [1, 2, 3], "dlOpen": False, "responseExp": False, "dlAck": False, **over}


def status_rsp(**over: Any) -> dict[str, Any]:
    return {"code": 0, "message": "ok", "time": 1, "dutyCycle": 0.01, **over}


@pytest.fixture
def center() -> Center:
    return Center()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bs(center: Center, clock: Clock) -> BS:
    return BS(center, clock)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    with log_lines("bsscihub.protocols.bssci") as lines:
        yield lines


def errors(out: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    return [(w["opId"], w["code"], w["message"]) for w in out if w["command"] == "error"]


# -- connect


def test_captured_diehl_con_gets_a_fresh_session(center: Center, clock: Clock) -> None:
    frame = load_capture("diehl-premium-gateway-con.hex")
    uuids = []
    for _ in range(2):
        bs = BS(center, clock)
        bs.protocol.dataReceived(frame)
        [rsp] = bs.received()
        assert rsp["command"] == "conRsp" and rsp["opId"] == 0
        assert rsp["scEui"] == 0x70B3D59CD0000000 and rsp["version"] == "1.0.0"
        assert rsp["snResume"] is False
        uuid = bytes(rsp["snScUuid"])
        assert len(uuid) == 16
        # Never the base station's own snBsUuid (signed int8 on the wire).
        assert uuid != bytes(b & 0xFF for b in [-61, 114, -59, 33, -89, 120, 73, -101, -117, 78, 41, -57, -125,
                                                -73, 53, -35])
        uuids.append(uuid)
        assert bs.session.bs_hex == "00073200007767f3" and bs.session.state is State.AWAIT_CON_CMP
    assert uuids[0] != uuids[1]


def test_nothing_before_con_and_conCmp(bs: BS, center: Center) -> None:
    bs.send("ulData", 1, **ul_data())
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (1, EINVAL) and "con, conRsp, conCmp come first" in message
    assert center.uplinks == [] and not bs.closed
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=False, snBsUuid=[0] * 16)
    assert bs.commands() == [("conRsp", 0)]
    bs.send("ping", 2)
    assert [e[:2] for e in errors(bs.received())] == [(2, EINVAL)]
    bs.send("conCmp", 0)
    assert center.names()[-1] == "ready" and bs.session.state is State.ESTABLISHED


def test_con_must_use_op_id_zero(bs: BS) -> None:
    bs.send("con", 5, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (5, EINVAL) and "'opId' must be 0" in message
    assert bs.session.state is State.AWAIT_CON and not bs.closed


@pytest.mark.parametrize("version", ["2.0.0", "0.9.1"])
def test_major_version_mismatch_closes_after_error_ack(bs: BS, center: Center, logged: list[str],
                                                       version: str) -> None:
    bs.send("con", 0, version=version, bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (0, EPROTONOSUPPORT) and version in message and "1.0.0, 1.1.0" in message
    assert not bs.closed  # the station may acknowledge the error first
    bs.send("ping", 1)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert bs.received() == [] and not bs.closed  # nothing else is served any more
    bs.send("errorAck", 0)
    assert bs.closed and bs.session.closed
    assert any("major versions differ" in line and "10.0.0.5:43122" in line for line in logged)
    assert "connecting" not in center.names()


def test_major_version_mismatch_closes_after_a_short_wait_without_error_ack(bs: BS, clock: Clock) -> None:
    bs.send("con", 0, version="2.1.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert errors(bs.received())[0][1] == EPROTONOSUPPORT
    clock.advance(4.9)
    assert not bs.closed
    clock.advance(0.2)
    assert bs.closed and bs.session.closed


@pytest.mark.parametrize(
    ("version", "answer", "layout"),
    [("1.0.0", "1.0.0", "bidi"), ("1.0.9", "1.0.0", "bidi"), ("1.1.0", "1.1.0", "epClass"),
     ("1.1.4", "1.1.0", "epClass"), ("1.7.0", "1.1.0", "epClass")],
)
def test_any_1_x_is_served_with_the_highest_version_not_above_the_station_s(bs: BS, version: str, answer: str,
                                                                             layout: str) -> None:
    bs.send("con", 0, version=version, bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [rsp] = bs.received()
    assert rsp["command"] == "conRsp" and rsp["version"] == answer and not bs.closed
    bs.send("conCmp", 0)
    [prp, *_] = [w for w in bs.received() if w["command"] == "attPrp"]
    assert layout in prp and ({"bidi", "epClass"} - {layout}).isdisjoint(prp)


def test_a_station_that_cannot_live_with_the_answered_version_errors_and_is_closed(bs: BS, center: Center) -> None:
    bs.send("con", 0, version="1.7.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert bs.received()[0]["version"] == "1.1.0"
    bs.send("error", 0, code=EPROTONOSUPPORT, message="need 1.7")
    assert bs.commands() == [("errorAck", 0)]
    assert bs.closed and center.names()[-1] == "closed"


def test_refused_con_is_answered_and_closed(bs: BS, center: Center) -> None:
    center.refuse_con = Refused(13, "base station 00073200007767f3 is revoked: stolen")
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert errors(bs.received()) == [(0, 13, "base station 00073200007767f3 is revoked: stolen")]
    assert bs.closed
    # Never accepted, so there is nothing for the service center to forget.
    assert "closed" not in center.names()


# -- propagation and SC opIds


def test_att_prp_after_con_cmp_in_a_window_advanced_by_responses(bs: BS, center: Center) -> None:
    sent = bs.connect(answer_status=False)
    prps = [w for w in sent if w["command"] == "attPrp"]
    # propagate_window = 2: two in flight, SC opIds from -1 down.
    assert [w["opId"] for w in prps] == [-1, -2]
    assert prps[0]["epEui"] == EP1 and prps[0]["bidi"] is True and bytes(prps[0]["nwkSnKey"]) == KEY
    assert prps[0]["shAddr"] == 0x1234 and prps[0]["lastPacketCnt"] == 7 and "epClass" not in prps[0]
    [status] = [w for w in sent if w["command"] == "status"]
    assert status["opId"] == -3
    # Reads are never blocked by the propagation: an uplink goes through meanwhile.
    bs.send("ulData", 1, **ul_data())
    [(msg, stored)] = center.uplinks
    stored.callback(None)
    assert bs.commands() == [("ulDataRsp", 1)]
    bs.send("attPrpRsp", -1)
    assert bs.commands() == [("attPrpCmp", -1), ("attPrp", -4)]
    bs.send("attPrpRsp", -2)
    bs.send("attPrpRsp", -4)
    assert bs.commands() == [("attPrpCmp", -2), ("attPrpCmp", -4)]
    assert bs.session.propagation_pending == 0


def test_att_prp_layout_follows_the_base_station_version(bs: BS) -> None:
    bs.send("con", 0, version="1.1.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [rsp] = bs.received()
    assert rsp["version"] == "1.1.0"
    bs.send("conCmp", 0)
    [prp, *_] = [w for w in bs.received() if w["command"] == "attPrp"]
    assert "bidi" not in prp and prp["epClass"] == "a" and prp["syncBurst"] is False


def test_sc_op_ids_restart_at_minus_one_on_every_connection(center: Center, clock: Clock) -> None:
    for _ in range(2):
        bs = BS(center, clock)
        sent = bs.connect(answer_status=False)
        assert sorted(w["opId"] for w in sent) == [-3, -2, -1]
        bs.protocol.connectionLost(defer.Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    assert center.names().count("ready") == 2


def test_propagation_refused_with_error_is_acknowledged_and_continues(bs: BS, logged: list[str]) -> None:
    bs.connect()
    bs.send("error", -1, code=22, message="invalid session")
    assert bs.commands() == [("errorAck", -1), ("attPrp", -4)]
    assert any("did not take attPrp of end point 0011223344556677" in line for line in logged)
    assert not bs.closed


def test_propagation_timeout_frees_the_window(bs: BS, clock: Clock) -> None:
    bs.connect()
    bs.send("attPrpRsp", -1)
    assert bs.commands() == [("attPrpCmp", -1), ("attPrp", -4)]
    clock.advance(CONFIG.op_timeout)
    assert bs.session.propagation_pending == 0
    assert bs.session.stats.op_timeouts == 2
    # A late answer to an abandoned operation is refused, not completed.
    bs.send("attPrpRsp", -2)
    assert [e[:2] for e in errors(bs.received())] == [(-2, EINVAL)]


def test_skipped_propagations_take_no_op_id(bs: BS, center: Center) -> None:
    center.attached = [EP2]
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    bs.received()
    bs.session.propagate([(True, EP1), (True, EP2)])  # EP1 is not attached: skipped
    bs.send("conCmp", 0)
    prps = [(w["opId"], w["epEui"]) for w in bs.received() if w["command"] == "attPrp"]
    assert prps == [(-1, EP2), (-2, EP2)]


# -- BS-initiated operations and opIds


def test_uplink_is_acknowledged_only_once_stored(bs: BS, center: Center) -> None:
    bs.connect()
    bs.received()
    bs.send("ulData", 1, **ul_data())
    bs.send("ulData", 2, **ul_data(cnt=2))
    assert bs.received() == []
    center.uplinks[1][1].callback(None)
    assert bs.commands() == [("ulDataRsp", 2)]
    center.uplinks[0][1].errback(RuntimeError("disk full"))
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (1, 5) and "could not store" in message
    bs.send("ulDataCmp", 2)
    bs.send("errorAck", 1)
    assert bs.received() == [] and not bs.closed


def test_bs_op_ids_must_be_positive_and_increasing(bs: BS, center: Center) -> None:
    bs.connect()
    bs.received()
    bs.send("ulData", 5, **ul_data())
    bs.send("ulData", 5, **ul_data(cnt=2))
    bs.send("ping", 3)
    bs.send("ping", -7)
    out = errors(bs.received())
    assert [(op, code) for op, code, _ in out] == [(5, EINVAL), (3, EINVAL), (-7, EINVAL)]
    assert "does not increase (the previous operation was 5)" in out[0][2]
    assert "needs a positive opId" in out[2][2]
    assert len(center.uplinks) == 1 and not bs.closed


def test_missing_field_gets_einval_naming_it_and_the_connection_stays(bs: BS, center: Center) -> None:
    bs.connect()
    bs.received()
    wire = ul_data()
    del wire["userData"]
    bs.send("ulData", 1, **wire)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (1, EINVAL) and "'userData'" in message
    bs.send("ulData", 2, **ul_data(snr="loud"))
    [(_, _, message)] = errors(bs.received())
    assert "'snr' must be a number" in message
    bs.send("ulData", 3, **ul_data(snr=1e9))  # refused by the service center
    assert errors(bs.received()) == [(3, EINVAL, "ulData: snr implausible")]
    bs.send("ulData", 4, **ul_data())
    center.uplinks[-1][1].callback(None)
    assert bs.commands() == [("ulDataRsp", 4)]
    assert not bs.closed


@pytest.mark.parametrize("command", ["vm.status", "frobnicate"])
def test_unknown_and_sub_channel_commands_get_enosys(bs: BS, command: str) -> None:
    bs.connect()
    bs.received()
    bs.send(command, 1)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (1, ENOSYS) and command in message
    bs.send("errorAck", 1)
    assert bs.received() == [] and not bs.closed


def test_commands_of_the_other_direction(bs: BS) -> None:
    bs.connect()
    bs.received()
    bs.send("attPrp", 1, epEui=EP1, bidi=True, nwkSnKey=list(KEY), shAddr=1, lastPacketCnt=0, dualChan=False,
            repetition=False, wideCarrOff=False, longBlkDist=False)
    bs.send("ulDataRsp", 2)
    bs.send("statusCmp", -9)
    bs.send("dlDataQueCmp", -10)
    bs.send("status", 3)
    out = errors(bs.received())
    assert [(op, code) for op, code, _ in out] == [(1, ENOSYS), (2, EINVAL), (-9, EINVAL), (-10, EINVAL),
                                                   (3, ENOSYS)]
    assert "wrong direction" in out[2][2] and "wrong direction" in out[3][2]
    bs.send("errorAck", -9)
    assert bs.received() == [] and not bs.closed


def test_ping_from_the_base_station(bs: BS) -> None:
    bs.connect()
    bs.received()
    bs.send("ping", 1)
    assert bs.commands() == [("pingRsp", 1)]
    bs.send("pingCmp", 1)
    assert bs.received() == []


def test_hub_pings_an_idle_base_station_and_drops_a_silent_one(bs: BS, clock: Clock, center: Center,
                                                               logged: list[str]) -> None:
    bs.connect()
    for op in (-1, -2, -4):
        bs.send("attPrpRsp", op)
    bs.received()
    clock.advance(59)
    assert bs.received() == []
    clock.advance(1)
    [(command, op)] = bs.commands()
    assert command == "ping" and op < 0
    bs.send("pingRsp", op)
    assert bs.commands() == [("pingCmp", op)]
    clock.advance(60)
    [(_, op2)] = bs.commands()
    assert op2 < op
    clock.advance(29)
    assert not bs.closed
    clock.advance(1)
    assert bs.closed and bs.transport.disconnected  # aborted: a dead peer would not read
    assert any("did not answer a ping within 30 s" in line and "10.0.0.5:43122" in line for line in logged)
    assert center.names()[-1] == "closed"


def test_con_must_come_within_the_operation_timeout(bs: BS, clock: Clock, logged: list[str]) -> None:
    clock.advance(CONFIG.op_timeout)
    assert bs.closed
    assert any("did not complete con" in line for line in logged)


def test_status_is_polled_periodically_and_on_demand(bs: BS, clock: Clock, center: Center) -> None:
    sent = bs.connect(answer_status=False)
    [status] = [w for w in sent if w["command"] == "status"]
    # Optional fields may be absent; only code, message, time and dutyCycle are required.
    bs.send("statusRsp", status["opId"], **status_rsp())
    assert bs.commands() == [("statusCmp", status["opId"])]
    assert center.calls[-1][0] == "status" and center.calls[-1][1].temp is None
    got: list[Any] = []
    bs.session.poll_status().addCallback(got.append)
    joined: list[Any] = []
    bs.session.poll_status().addCallback(joined.append)  # joins the poll under way
    [(command, op)] = bs.commands()
    assert command == "status"
    bs.send("statusRsp", op, **status_rsp(temp=41.5, uptime=12, config={"a": 1}))
    assert got[0].temp == 41.5 and joined[0] is got[0]
    bs.received()
    for op_id in (-1, -2, -4):
        bs.send("attPrpRsp", op_id)
    for _ in range(6):  # keep the connection busy so that no ping interferes
        clock.advance(50)
        bs.send("ping")
    assert ("status" in [c for c, _ in bs.commands()])


def test_invalid_status_response_is_answered_with_error_instead_of_cmp(bs: BS) -> None:
    sent = bs.connect(answer_status=False)
    [status] = [w for w in sent if w["command"] == "status"]
    bs.send("statusRsp", status["opId"], code=0, message="ok", time=1)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (status["opId"], EINVAL) and "'dutyCycle'" in message
    bs.send("errorAck", status["opId"])
    assert bs.received() == [] and not bs.closed


def test_request_timeout_and_base_station_error(bs: BS, clock: Clock) -> None:
    bs.connect()
    bs.received()
    failures: list[Any] = []
    bs.session.request(lambda op: m.DlRxStatQry(opId=op, epEui=EP1)).addErrback(failures.append)
    [(command, op)] = bs.commands()
    assert command == "dlRxStatQry"
    clock.advance(CONFIG.op_timeout)
    assert failures[0].check(OperationTimedOut)
    bs.session.request(lambda op: m.DlDataRev(opId=op, epEui=EP1, queId=9)).addErrback(failures.append)
    [(_, op)] = [c for c in bs.commands() if c[0] == "dlDataRev"]
    bs.send("error", op, code=2, message="no such queId")
    assert bs.commands() == [("errorAck", op)]
    assert failures[1].check(OperationFailed) and failures[1].value.code == 2
    assert not bs.closed


def test_downlink_operations(bs: BS, center: Center) -> None:
    bs.connect()
    bs.received()
    answers: list[Any] = []
    bs.session.request(lambda op: m.DlDataQue(opId=op, epEui=EP1, queId=77, cntDepend=False,
                                             userData=(b"\x01\x02",), format=3)).addCallback(answers.append)
    [que] = bs.received()
    assert que["command"] == "dlDataQue" and que["userData"] == [[1, 2]] and que["queId"] == 77
    bs.send("dlDataQueRsp", que["opId"])
    assert bs.commands() == [("dlDataQueCmp", que["opId"])]
    assert isinstance(answers[0], m.DlDataQueRsp)
    bs.send("dlDataRes", 1, epEui=EP1, queId=77, result="sent", txTime=5, packetCnt=8)
    assert bs.commands() == [("dlDataResRsp", 1)]
    bs.send("dlDataResCmp", 1)
    bs.send("dlRxStat", 2, epEui=EP1, rxTime=5, packetCnt=9, dlRxSnr=3.0, dlRxRssi=-90.0)
    assert bs.commands() == [("dlRxStatRsp", 2)]
    bs.send("dlRxStatCmp", 2)
    assert [name for name in center.names() if name.startswith("dl")] == ["dlDataRes", "dlRxStat"]
    bs.session.request(lambda op: m.DlRxStatQry(opId=op, epEui=EP1))
    [(_, op)] = bs.commands()
    bs.send("dlRxStatQryRsp", op)
    assert bs.commands() == [("dlRxStatQryCmp", op)]


def test_att_and_det(bs: BS, center: Center) -> None:
    bs.connect()
    bs.received()
    att = {"epEui": EP1, "rxTime": 1, "attachCnt": 3, "snr": 1.0, "rssi": -100.0, "nonce": [1, 2, 3, 4],
           "sign": [1, 2, 3, 4], "dualChan": False, "repetition": False, "wideCarrOff": False, "longBlkDist": False}
    bs.send("att", 1, **att)
    [rsp] = bs.received()
    assert rsp["command"] == "attRsp" and bytes(rsp["nwkSnKey"]) == KEY and rsp["shAddr"] == 0x1234
    bs.send("attCmp", 1)
    center.att_answer = Refused(13, "att: bad signature")
    bs.send("att", 2, **att)
    assert errors(bs.received()) == [(2, 13, "att: bad signature")]
    bs.send("errorAck", 2)
    bs.send("det", 3, epEui=EP1, rxTime=1, packetCnt=4, snr=1.0, rssi=-100.0, sign=[0, 0, 0, 0])
    assert errors(bs.received()) == [(3, EOPNOTSUPP, "det: not supported")]
    assert center.names()[-3:] == ["att", "att", "det"]
    assert not bs.closed


def test_error_for_an_unknown_operation_is_acknowledged(bs: BS, logged: list[str]) -> None:
    bs.connect()
    bs.received()
    bs.send("error", 99, code=5, message="confused")
    assert bs.commands() == [("errorAck", 99)]
    bs.send("error", 100)  # malformed (no code): still acknowledged
    assert bs.commands() == [("errorAck", 100)]
    assert any("sent error 5 for operation 99: confused" in line for line in logged)


def test_base_station_refusing_con_rsp_closes(bs: BS, center: Center) -> None:
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    bs.received()
    bs.send("error", 0, code=22, message="no")
    assert bs.commands() == [("errorAck", 0)]
    assert bs.closed and center.names()[-1] == "closed"


# -- session resume


def test_resumed_session_continues_both_op_id_counters_and_reissues_what_was_unfinished(
    center: Center, clock: Clock
) -> None:
    first = BS(center, clock)
    first.connect()
    first.received()  # attPrp -1, -2 in flight (window 2), EP3 queued
    first.send("ulData", 5, **ul_data())
    state = first.session.resume_state()
    assert state is not None and state.sc_next == -4 and state.bs_last == 5  # -3 went to the status poll
    assert state.propagations == ((True, EP1), (True, EP2), (True, EP3))
    first.protocol.connectionLost(defer.Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    assert first.session.resume_state() == state  # kept past the end of the connection
    center.resume = state

    bs = BS(center, clock)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=list(state.bs_uuid), snBsOpId=5,
            snScOpId=-3)
    [rsp] = bs.received()
    assert rsp["snResume"] is True and bytes(rsp["snScUuid"]) == state.sc_uuid
    bs.send("conCmp", 0)
    out = bs.received()
    # The unfinished propagations first, with SC opIds continuing where the last session stopped.
    assert [(w["command"], w["opId"], w["epEui"]) for w in out if w["command"] == "attPrp"] == [
        ("attPrp", -4, EP1), ("attPrp", -5, EP2)]
    assert bs.session.resumed and center.names()[-1] == "ready"
    bs.send("ulData", 5, **ul_data())
    assert "does not increase" in errors(bs.received())[0][2]
    bs.send("ulData", 6, **ul_data())
    assert center.uplinks[-1][0].opId == 6


def test_resume_never_reuses_an_sc_op_id_the_station_reports_seeing(center: Center, clock: Clock) -> None:
    center.resume = ResumeState(bytes(16), b"u" * 16, -4, 9, (), 0.0)
    bs = BS(center, clock)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16, snScOpId=-10)
    assert bs.received()[0]["snResume"] is True
    bs.send("conCmp", 0)
    assert max(w["opId"] for w in bs.received()) == -11  # below what it saw, not from the stored -4


def test_a_refused_resume_falls_back_to_a_fresh_session(center: Center, clock: Clock, logged: list[str]) -> None:
    center.resume = ResumeState(bytes(16), b"u" * 16, -40, 9, ((True, EP1),), 0.0)
    bs = BS(center, clock)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert bs.received()[0]["snResume"] is True
    bs.send("error", 0, code=EINVAL, message="unknown session")
    assert bs.commands() == [("errorAck", 0)] and not bs.closed
    assert any("refused to resume" in line for line in logged)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [rsp] = bs.received()
    assert rsp["snResume"] is False and bytes(rsp["snScUuid"]) != b"u" * 16
    bs.send("conCmp", 0)
    prps = [w for w in bs.received() if w["command"] == "attPrp"]
    assert [w["opId"] for w in prps] == [-1, -2] and not bs.session.resumed  # fresh: from -1, everything
    bs.send("ulData", 1, **ul_data())
    assert center.uplinks[-1][0].opId == 1
    # A station that refuses and then goes away is still reported as gone.
    center.resume = ResumeState(bytes(16), b"u" * 16, -40, 9, (), 0.0)
    other = BS(center, clock)
    other.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    other.send("error", 0, code=EINVAL, message="unknown session")
    other.protocol.connectionLost(defer.Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    assert center.names()[-1] == "closed"


def test_second_con_on_one_connection_is_refused(bs: BS) -> None:
    bs.connect()
    bs.received()
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [(op, code, _)] = errors(bs.received())
    assert (op, code) == (0, EINVAL) and bs.session.state is State.ESTABLISHED


def test_framing_error_closes_this_connection_with_a_log_line(bs: BS, center: Center, logged: list[str]) -> None:
    bs.connect()
    bs.protocol.dataReceived(b"GARBAGE!\x00\x00\x00\x00")
    assert bs.closed
    assert any("10.0.0.5:43122" in line and "bad frame identifier" in line for line in logged)
    assert center.names()[-1] == "closed"


def test_oversized_frame_closes(center: Center, clock: Clock) -> None:
    bs = BS(center, clock, max_frame=100)
    bs.send("con", 0, version="1.0.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16, name="x" * 200)
    assert bs.closed


def test_pending_requests_fail_when_the_connection_ends(bs: BS) -> None:
    bs.connect()
    failures: list[Any] = []
    bs.session.request(lambda op: m.DlRxStatQry(opId=op, epEui=EP1)).addErrback(failures.append)
    bs.protocol.connectionLost(defer.Failure(ConnectionError("reset")))  # type: ignore[attr-defined]
    assert failures[0].check(SessionClosed)
    assert bs.session.request(lambda op: m.Status(opId=op)).called


# -- the att signature (one open service center's reading; unverified against hardware)


def test_attach_signature_is_aes_cmac_of_the_documented_iv() -> None:
    # RFC 4493 example 2 shows this is AES-CMAC itself.
    rfc_key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    mac = CMAC(algorithms.AES(rfc_key))
    mac.update(bytes.fromhex("6bc1bee22e409f96e93d7e117393172a"))
    assert mac.finalize().hex() == "070a16b46b4d4144f79bdd9dd04a287c"
    # The IV, laid out by hand from BSSCI.md.
    iv = bytes.fromhex("0011223344556677") + b"\xff\x00" + (0x01020304).to_bytes(4, "big") + b"\xff\xff"
    mac = CMAC(algorithms.AES(rfc_key))
    mac.update(iv)
    expected = mac.finalize()[:4]
    assert attach_signature(rfc_key, EP1, 0x01020304) == expected
    assert verify_attach_signature(rfc_key, EP1, 0x01020304, expected)
    assert not verify_attach_signature(rfc_key, EP1, 0x01020305, expected)
    assert not verify_attach_signature(rfc_key, EP2, 0x01020304, expected)
    assert not verify_attach_signature(KEY, EP1, 0x01020304, expected)
    assert not verify_attach_signature(rfc_key, EP1, 1 << 32, expected)  # does not fit the IV


# -- robustness


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-300, max_value=300), max_size=20), st.binary(max_size=8),
    st.dictionaries(st.text(max_size=4), st.integers(min_value=-1000, max_value=1000), max_size=3),
)
_FIELDS = ["opId", "epEui", "bsEui", "version", "snBsUuid", "bidi", "userData", "snr", "rssi", "packetCnt",
           "rxTime",
           "dlOpen", "responseExp", "dlAck", "code", "message", "queId", "result", "attachCnt", "sign", "nonce",
           "time", "dutyCycle", "subpackets", "format"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(m.MESSAGE_CLASSES) + ["vm.x", ""]),
                          st.dictionaries(st.sampled_from(_FIELDS), _FIELD_VALUES, max_size=8)), max_size=12))
def test_arbitrary_messages_never_raise_out_of_the_protocol(messages: list[tuple[str, dict[str, Any]]]) -> None:
    center, clock = Center(), Clock()
    with log_events(lambda event: "log_failure" in event) as failures:
        bs = BS(center, clock)
        bs.connect()
        for command, fields in messages:
            bs.protocol.dataReceived(encode_frame({"command": command, **fields}))
            for _, d in center.uplinks:
                if not d.called:
                    d.callback(None)
            clock.advance(7)
    # Nothing failed inside a callback either (that would be logged, not raised).
    assert [str(formatEvent(e)) for e in failures] == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_never_raise_out_of_the_protocol(data: bytes, chunk: int) -> None:
    bs = BS(Center(), Clock())
    for start in range(0, len(data), chunk):
        bs.protocol.dataReceived(data[start : start + chunk])


def test_a_failing_service_center_costs_one_operation_not_the_connection(bs: BS, center: Center,
                                                                       logged: list[str]) -> None:
    bs.connect()
    bs.received()

    def broken(session: Session, msg: m.UlData) -> defer.Deferred[None]:
        raise RuntimeError("bug")

    center.uplink = broken  # type: ignore[method-assign]
    bs.send("ulData", 1, **ul_data())
    assert errors(bs.received()) == [(1, 5, "ulData: internal error of the service center")]
    assert any("handling ulData 1 of base station 00073200007767f3" in line for line in logged)
    bs.send("ping", 2)
    assert bs.commands() == [("pingRsp", 2)] and not bs.closed
