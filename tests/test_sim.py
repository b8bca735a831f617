"""Tests for `bsscihub sim`: one base station's protocol in memory against a scripted service
center, then whole runs over real mutual TLS against the ceiling server and a fake SC."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from bsscihub.pki import create_ca, issue_server_cert
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.framing import Framer, encode_frame
from bsscihub.protocols.bssci.sim import add_arguments
from bsscihub.protocols.bssci.sim import run as sim_run
from bsscihub.protocols.bssci.sim._certs import station_certs
from bsscihub.protocols.bssci.sim._plan import SimOptions, bs_eui, endpoints, sensor_eui, split
from bsscihub.protocols.bssci.sim._report import Aggregator, describe
from bsscihub.protocols.bssci.sim._session import BaseStation
from bsscihub.protocols.bssci.sim._stats import Counters, Histogram
from bsscihub.protocols.bssci.sim._worker import run_plan
from bsscihub.tls import MutualTLSEndpoint, server_context_factory
from tests.helpers import kill, until

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parent.parent
EUI = bs_eui(7)
SC_EUI = 0x70B3D59CD0000000


def _load_ceiling() -> Any:
    spec = importlib.util.spec_from_file_location("ceiling_server", ROOT / "bench" / "ceiling_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ceiling = _load_ceiling()


# --- one base station in memory ---------------------------------------------------


@attrs.define
class FakeHost:
    """The run a station belongs to, reduced to what the station calls."""

    counters: Counters = attrs.Factory(Counters)
    latency: Histogram = attrs.Factory(Histogram)
    latency_second: Histogram = attrs.Factory(Histogram)
    copy_spread: Histogram = attrs.Factory(Histogram)
    outstanding: int = 0
    dl_ack_due: dict[int, int] = attrs.Factory(dict)
    ready: list[BaseStation] = attrs.Factory(list)
    att_prp_done: list[BaseStation] = attrs.Factory(list)

    def request_flush(self, station: BaseStation) -> None:
        pass  # the tests flush by hand

    def station_ready(self, station: BaseStation) -> None:
        self.ready.append(station)

    def station_att_prp_done(self, station: BaseStation) -> None:
        self.att_prp_done.append(station)


@attrs.define
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class Conversation:
    """A station, and the service center's end of its connection."""

    station: BaseStation
    host: FakeHost
    clock: Clock
    written: list[bytes] = attrs.Factory(list)
    closed: list[bool] = attrs.Factory(list)
    _framer: Framer = attrs.Factory(Framer)

    def received(self) -> list[dict[str, Any]]:
        """What the station sent since the last call."""
        self.station.flush()
        data, self.written[:] = b"".join(self.written), []
        return self._framer.feed(data)

    def send(self, *messages: m.Message | dict[str, Any], version: str = "1.0.0") -> list[dict[str, Any]]:
        """Feed the station these messages (in one read) and return its answers."""
        frames = [encode_frame(msg if isinstance(msg, dict) else m.encode(msg, version=version)) for msg in messages]
        self.station.data_received(b"".join(frames))
        return self.received()


def attach(**kwargs: Any) -> tuple[Conversation, dict[str, Any]]:
    """A station that sent con; returns the conversation and the con map."""
    host, clock = FakeHost(), Clock()
    station = BaseStation(0, EUI, host, clock=clock, **kwargs)
    conv = Conversation(station, host, clock)
    station.connection_made(conv.written.append, lambda: conv.closed.append(True))
    [con] = conv.received()
    return conv, con


def connected(**kwargs: Any) -> Conversation:
    conv, _ = attach(**kwargs)
    answers = conv.send(m.ConRsp(opId=0, scEui=SC_EUI, snResume=False, snScUuid=os.urandom(16)))
    assert answers == [{"command": "conCmp", "opId": 0}]
    return conv


def att_prp(op: int, index: int = 0) -> m.AttPrp:
    return m.AttPrp(
        opId=op,
        epEui=sensor_eui(index),
        bidi=False,
        nwkSnKey=bytes(16),
        shAddr=index,
        lastPacketCnt=0,
        dualChan=False,
        repetition=False,
        wideCarrOff=False,
        longBlkDist=False,
    )


def test_con_is_a_valid_message_for_the_service_center() -> None:
    conv, wire = attach(version="1.1.0", vendor="ACME", model="X1")
    con = m.decode(wire)
    assert isinstance(con, m.Con)
    assert (con.opId, con.bsEui, con.version, con.vendor, con.model) == (0, EUI, "1.1.0", "ACME", "X1")
    assert len(con.snBsUuid) == 16
    assert not conv.host.ready  # nothing before conRsp


def test_con_rsp_is_completed_and_the_station_is_ready() -> None:
    conv = connected()
    assert conv.host.ready == [conv.station]
    assert conv.host.counters.connects == 1
    assert not conv.host.counters.anomalies


def test_every_sc_operation_is_answered_then_completed() -> None:
    conv = connected()
    requests: list[m.Message] = [
        att_prp(-1),
        m.Status(opId=-2),
        m.Ping(opId=-3),
        m.DetPrp(opId=-4, epEui=sensor_eui(0)),
        m.DlDataQue(opId=-5, epEui=sensor_eui(0), queId=9, cntDepend=False, userData=(b"\x01\x02",)),
        m.DlDataRev(opId=-6, epEui=sensor_eui(0), queId=9),
        m.DlRxStatQry(opId=-7, epEui=sensor_eui(0)),
    ]
    answers = [m.decode(a) for a in conv.send(*requests)]
    assert [(a.command, a.opId) for a in answers] == [
        ("attPrpRsp", -1),
        ("statusRsp", -2),
        ("pingRsp", -3),
        ("detPrpRsp", -4),
        ("dlDataQueRsp", -5),
        ("dlDataRevRsp", -6),
        ("dlRxStatQryRsp", -7),
    ]
    status = answers[1]
    assert isinstance(status, m.StatusRsp) and status.code == 0
    assert abs(status.time - time.time_ns()) < 60 * 10**9
    completions = [{"command": a.command[:-3] + "Cmp", "opId": a.opId} for a in answers]
    assert conv.send(*completions) == []
    c = conv.host.counters
    assert (c.sc_ops, c.sc_completed, c.att_prp, c.det_prp) == (7, 7, 1, 1)
    assert not c.anomalies


def test_att_prp_in_the_1_1_layout_is_accepted() -> None:
    conv = connected(version="1.1.0", expect_att_prp=2)
    answers = conv.send(att_prp(-1, 0), att_prp(-2, 1), version="1.1.0")
    assert answers == [{"command": "attPrpRsp", "opId": -1}, {"command": "attPrpRsp", "opId": -2}]
    assert conv.station.att_prp_count == 2
    assert conv.host.att_prp_done == [conv.station]


def test_error_from_the_sc_is_acknowledged() -> None:
    conv = connected()
    conv.send(att_prp(-1))
    assert conv.send(m.Error(opId=-1, code=22, message="no")) == [{"command": "errorAck", "opId": -1}]
    assert conv.host.counters.errors_received == 1
    assert not conv.host.counters.anomalies


def test_unknown_and_invalid_operations_are_answered_with_error() -> None:
    conv = connected()
    bad_att_prp = m.encode(att_prp(-2))
    del bad_att_prp["nwkSnKey"]
    answers = conv.send({"command": "vm.foo", "opId": -1}, bad_att_prp)
    assert [(a["command"], a["opId"], a["code"]) for a in answers] == [
        ("error", -1, m.ENOSYS),
        ("error", -2, m.EINVAL),
    ]
    assert "nwkSnKey" in answers[1]["message"]
    assert conv.send({"command": "errorAck", "opId": -1}, {"command": "errorAck", "opId": -2}) == []
    assert conv.host.counters.errors_sent == conv.host.counters.sc_completed == 2


def test_broken_sc_opid_rules_are_reported() -> None:
    conv = connected()
    conv.send(att_prp(-2), att_prp(-1))
    anomalies = conv.host.counters.anomalies
    assert anomalies["first SC opId is not -1"] == 1
    assert anomalies["SC opId not strictly decreasing"] == 1


def test_uplinks_respect_the_window_and_are_completed() -> None:
    conv = connected(in_flight=2)
    uplinks = [[sensor_eui(i), 100 + i, 5, [1, 2, 3], False, None, False] for i in range(3)]
    for uplink in uplinks:
        conv.station.offer(uplink, 10.5, -110.25)
    sent = [m.decode(w) for w in conv.received()]
    assert [(u.command, u.opId, u.epEui, u.packetCnt) for u in sent] == [  # type: ignore[attr-defined]
        ("ulData", 1, sensor_eui(0), 100),
        ("ulData", 2, sensor_eui(1), 101),
    ]
    assert isinstance(sent[0], m.UlData) and sent[0].userData == b"\x01\x02\x03"
    conv.clock.now += 0.004
    answers = conv.send({"command": "ulDataRsp", "opId": 1})
    assert answers[0] == {"command": "ulDataCmp", "opId": 1}
    assert (answers[1]["command"], answers[1]["opId"], answers[1]["packetCnt"]) == ("ulData", 3, 102)
    assert conv.host.latency.total == 1
    assert conv.host.latency.percentile(50) == pytest.approx(0.004, rel=0.02)
    # An error replaces the Rsp: acknowledged, and the slot is free again.
    assert conv.send(m.Error(opId=2, code=5, message="disk full")) == [{"command": "errorAck", "opId": 2}]
    c = conv.host.counters
    assert (c.ul_sent, c.ul_completed, c.ul_errors, c.unique_acked) == (3, 1, 1, 1)
    assert conv.host.outstanding == 1  # opId 3 still in flight


def dl_data_que(op: int, que_id: int, *counters: int, sensor: int = 0) -> m.DlDataQue:
    """A downlink for `sensor`: for any uplink, or (cntDepend) only for one of `counters`."""
    if counters:
        data = tuple(bytes([que_id, c & 0xFF]) for c in counters)
        return m.DlDataQue(opId=op, epEui=sensor_eui(sensor), queId=que_id, cntDepend=True, packetCnt=counters,
                           userData=data)  # fmt: skip
    return m.DlDataQue(opId=op, epEui=sensor_eui(sensor), queId=que_id, cntDepend=False, userData=(b"\x01\x02",))


def queue(conv: Conversation, *requests: m.Message) -> None:
    """The SC's side of SC-initiated operations: send, expect the Rsp, complete."""
    answers = conv.send(*requests)
    assert [(a["command"], a["opId"]) for a in answers] == [(r.command + "Rsp", r.opId) for r in requests]
    assert conv.send(*({"command": r.command + "Cmp", "opId": r.opId} for r in requests)) == []


def uplink_of(conv: Conversation, sensor: int, cnt: int) -> m.UlData:
    """Offer one uplink of `sensor` with counter `cnt`; returns the ulData the station sent."""
    conv.station.offer([sensor_eui(sensor), cnt, time.time_ns(), [7], False, None, False], 10.0, -110.0)
    [wire] = conv.received()
    ul = m.decode(wire)
    assert isinstance(ul, m.UlData) and (ul.epEui, ul.packetCnt) == (sensor_eui(sensor), cnt)
    return ul


def test_a_queued_downlink_goes_out_with_the_next_uplink_of_its_sensor() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9))
    other = uplink_of(conv, 1, 50)  # another sensor's uplink does not open the window
    assert not other.dlOpen
    assert conv.send({"command": "ulDataRsp", "opId": other.opId}) == [{"command": "ulDataCmp", "opId": other.opId}]
    ul = uplink_of(conv, 0, 100)
    assert ul.dlOpen and not ul.responseExp
    # The result follows the uplink's Rsp, as a new operation with the next opId.
    cmp, wire = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    assert cmp == {"command": "ulDataCmp", "opId": ul.opId}
    res = m.decode(wire)
    assert isinstance(res, m.DlDataRes)
    assert (res.opId, res.epEui, res.queId, res.result, res.packetCnt) == (ul.opId + 1, sensor_eui(0), 9, "sent", 100)
    assert res.txTime is not None and abs(res.txTime - time.time_ns()) < 60 * 10**9
    assert conv.send({"command": "dlDataResRsp", "opId": res.opId}) == [{"command": "dlDataResCmp", "opId": res.opId}]
    # Sent once: the next uplink closes its window again, and the opIds go on increasing.
    # The sensor got it, so that uplink acknowledges it (dlAck), and only that one.
    assert conv.host.dl_ack_due == {sensor_eui(0): 100}
    after = uplink_of(conv, 0, 101)
    assert not after.dlOpen and after.dlAck and after.opId == res.opId + 1
    assert conv.send({"command": "ulDataRsp", "opId": after.opId}) == [{"command": "ulDataCmp", "opId": after.opId}]
    assert conv.host.dl_ack_due == {}
    later = uplink_of(conv, 0, 102)
    assert not later.dlAck
    conv.send({"command": "ulDataRsp", "opId": later.opId})
    c = conv.host.counters
    assert (c.dl_queued, c.dl_sent, c.dl_reported, c.dl_revoked, c.dl_errors, c.dl_acked) == (1, 1, 1, 0, 0, 1)
    assert not c.anomalies
    # The SC answering a result twice breaks the rules.
    assert conv.send({"command": "dlDataResRsp", "opId": res.opId}) == []
    assert c.anomalies == {"dlDataResRsp for no dlDataRes in flight": 1}


def test_a_revoked_downlink_is_not_sent() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9), dl_data_que(-2, 10))
    queue(conv, m.DlDataRev(opId=-3, epEui=sensor_eui(0), queId=9))
    ul = uplink_of(conv, 0, 100)
    assert ul.dlOpen
    [_, wire] = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    assert (wire["command"], wire["queId"]) == ("dlDataRes", 10)
    conv.send({"command": "dlDataResRsp", "opId": wire["opId"]})
    queue(conv, dl_data_que(-4, 11), m.DlDataRev(opId=-5, epEui=sensor_eui(0), queId=11))
    ul = uplink_of(conv, 0, 101)
    assert not ul.dlOpen
    assert conv.send({"command": "ulDataRsp", "opId": ul.opId}) == [{"command": "ulDataCmp", "opId": ul.opId}]
    c = conv.host.counters
    assert (c.dl_queued, c.dl_revoked, c.dl_sent, c.dl_reported) == (3, 2, 1, 1)
    assert not c.anomalies


def test_a_counter_dependent_downlink_waits_for_its_counter() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9, 104, 105), dl_data_que(-2, 10, 101))
    ul = uplink_of(conv, 0, 100)  # neither is meant for 100
    assert not ul.dlOpen
    assert conv.send({"command": "ulDataRsp", "opId": ul.opId}) == [{"command": "ulDataCmp", "opId": ul.opId}]
    # 101 was missed: queId 10 can never go out, and is reported expired (without txTime or packetCnt).
    ul = uplink_of(conv, 0, 102)
    assert not ul.dlOpen
    [_, wire] = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    assert wire == {"command": "dlDataRes", "opId": ul.opId + 1, "epEui": sensor_eui(0), "queId": 10,
                    "result": "expired"}  # fmt: skip
    conv.send({"command": "dlDataResRsp", "opId": wire["opId"]})
    ul = uplink_of(conv, 0, 105)
    assert ul.dlOpen
    [_, wire] = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    assert (wire["command"], wire["queId"], wire["result"], wire["packetCnt"]) == ("dlDataRes", 9, "sent", 105)
    conv.send({"command": "dlDataResRsp", "opId": wire["opId"]})
    c = conv.host.counters
    assert (c.dl_queued, c.dl_sent, c.dl_expired, c.dl_reported) == (2, 1, 1, 2)
    assert not c.anomalies


def test_an_error_for_a_downlink_result_is_acknowledged() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9), dl_data_que(-2, 10, sensor=1))
    ul = uplink_of(conv, 0, 100)
    [_, wire] = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    op = wire["opId"]
    assert conv.send(m.Error(opId=op, code=2, message="no such downlink")) == [{"command": "errorAck", "opId": op}]
    # An error instead of the uplink's Rsp: the downlink went out all the same, and is reported.
    ul = uplink_of(conv, 1, 200)
    assert ul.dlOpen
    ack, wire = conv.send(m.Error(opId=ul.opId, code=5, message="disk full"))
    assert ack == {"command": "errorAck", "opId": ul.opId}
    assert (wire["command"], wire["opId"], wire["queId"], wire["packetCnt"]) == ("dlDataRes", ul.opId + 1, 10, 200)
    c = conv.host.counters
    assert (c.dl_sent, c.dl_errors, c.ul_errors, c.errors_received, c.dl_reported) == (2, 1, 1, 2, 0)
    assert conv.station.dl_results_pending == 1
    assert not c.anomalies


def test_unanswered_results_survive_a_reconnect_and_queued_downlinks_do_not() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9), dl_data_que(-2, 10, sensor=1))
    ul = uplink_of(conv, 0, 100)
    [_, res] = conv.send({"command": "ulDataRsp", "opId": ul.opId})
    conv.station.connection_lost()  # before the SC answered the result
    conv.station.connection_made(conv.written.append, lambda: conv.closed.append(True))
    conv.received()  # con
    answers = conv.send(m.ConRsp(opId=0, scEui=SC_EUI, snResume=False, snScUuid=os.urandom(16)))
    # The new session reports it again, with its own opIds from 1.
    assert answers == [{"command": "conCmp", "opId": 0}, {**res, "opId": 1}]
    assert conv.send({"command": "dlDataResRsp", "opId": 1}) == [{"command": "dlDataResCmp", "opId": 1}]
    # ... but the downlink still queued is forgotten with the old session, as base stations do.
    assert not uplink_of(conv, 1, 200).dlOpen
    c = conv.host.counters
    assert (c.dl_queued, c.dl_sent, c.dl_reported, c.dl_forgotten) == (2, 1, 1, 1)
    assert not c.anomalies


def test_an_att_prp_forgets_the_downlinks_of_its_sensor_only() -> None:
    conv = connected()
    queue(conv, dl_data_que(-1, 9), dl_data_que(-2, 10, sensor=1))
    queue(conv, att_prp(-3, 0))
    assert not uplink_of(conv, 0, 100).dlOpen
    assert uplink_of(conv, 1, 100).dlOpen
    c = conv.host.counters
    assert (c.dl_queued, c.dl_forgotten, c.dl_sent) == (2, 1, 1)


def test_the_summary_shows_the_downlinks() -> None:
    counters = Counters(connects=1, dl_queued=3, dl_sent=2, dl_expired=1, dl_reported=3, dl_acked=2)
    summary = Aggregator(_options(port=1), None).summary(
        [
            {
                "counters": counters.as_dict(),
                "phases": {},
                "latency": {},
                "copy_spread": {},
                "att_prp_done": 0,
                "att_prp_last_at": None,
                "att_prp_per_station_min": 0,
                "loop_lag_max_ms": 0.0,
            }
        ]
    )
    assert summary["counters"]["dl_sent"] == 2
    assert (
        "downlinks: 3 queued, 2 sent, 1 expired, 0 revoked, 0 forgotten; 3 results completed, 0 answered with error;"
        " 2 acknowledged by the sensor's next uplink" in describe(summary)
    )


def test_an_idle_station_pings() -> None:
    conv = connected()
    conv.station.check_idle(conv.clock.now + 5, idle=30, timeout=10)
    assert conv.received() == []
    conv.clock.now += 31
    conv.station.check_idle(conv.clock.now, idle=30, timeout=10)
    [ping] = conv.received()
    assert ping == {"command": "ping", "opId": 1}
    assert conv.send({"command": "pingRsp", "opId": 1}) == [{"command": "pingCmp", "opId": 1}]
    assert conv.host.counters.pings_answered == 1


def test_a_broken_stream_closes_the_connection() -> None:
    conv = connected()
    conv.station.data_received(b"NOTMIOTY" + bytes(8))
    assert conv.closed == [True]


# --- plan, statistics, command line ---------------------------------------------


def test_histogram_percentiles_are_within_two_percent() -> None:
    h = Histogram()
    for i in range(1, 1001):
        h.record(i / 1000.0)
    assert h.percentile(50) == pytest.approx(0.5, rel=0.02)
    assert h.percentile(99) == pytest.approx(0.99, rel=0.02)
    merged = Histogram.from_sparse(json.loads(json.dumps(h.sparse())))
    assert merged.total == 1000 and merged.percentile(99) == h.percentile(99)


def test_split_gives_every_worker_its_own_stations_and_sensors() -> None:
    options = _options(port=1, base_stations=10, sensors=101, rate=100.0, processes=3)
    plans = split(options, 0.0)
    assert [(p.bs_start, p.bs_count) for p in plans] == [(0, 4), (4, 3), (7, 3)]
    assert [(p.sensor_start, p.sensor_count) for p in plans] == [(0, 34), (34, 34), (68, 33)]
    assert sum(p.rate for p in plans) == pytest.approx(100.0)


def test_write_endpoints_matches_the_simulated_sensors(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "endpoints.json"
    args = parser.parse_args(["--sensors", "3", "--write-endpoints", str(out)])
    assert sim_run(None, args) == 0
    written = json.loads(out.read_text())
    assert written == endpoints(3, bidi=True)  # bidirectional: they take downlinks
    assert written[1]["eui"] == f"{sensor_eui(1):016x}" and len(written[1]["nwKey"]) == 32


# --- whole runs over real mutual TLS ---------------------------------------------


@attrs.frozen
class PKI:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    stations: tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    create_ca(d / "ca.pem", d / "ca.key")
    issue_server_cert(d / "ca.pem", d / "ca.key", d / "hub.pem", d / "hub.key")
    certs = station_certs(str(d / "ca.pem"), str(d / "ca.key"), [bs_eui(i) for i in range(3)], d / "bs")
    return PKI(d / "ca.pem", d / "ca.key", d / "hub.pem", d / "hub.key", tuple(certs))


def _options(**overrides: Any) -> SimOptions:
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        base_stations=2,
        sensors=10,
        rate=0.0,
        copies=2,
        in_flight=4,
        duration=1.0,
        ca="ca.pem",
        certs=(("a", "b"),) * overrides.get("base_stations", 2),
        connect_timeout=10.0,
        first_packet_cnt=1,
    )
    values.update(overrides)
    return SimOptions(**values)


async def _simulate(options: SimOptions) -> dict[str, Any]:
    """Run one worker in a thread (its own asyncio loop) while this reactor serves it."""
    plan = split(options, time.time())[0]
    aggregator = Aggregator(options, None)
    worker = await deferToThread(run_plan, plan, aggregator.add)
    return aggregator.summary([worker])


@pytest_twisted.ensureDeferred
async def test_sim_completes_uplinks_against_the_ceiling(pki: PKI) -> None:
    factory, listening = ceiling.listen(reactor, "tcp:0:interface=127.0.0.1", pki.ca, pki.cert, pki.key)
    port: Any = await listening
    try:
        options = _options(port=port.getHost().port, ca=str(pki.ca), certs=pki.stations[:2])
        summary = await _simulate(options)
    finally:
        await port.stopListening()
    c = Counters.from_dict(summary["counters"])
    assert c.connects == 2 and not c.anomalies and not c.disconnects
    assert c.ul_completed > 0
    # Drained: every copy sent was answered, every uplink acknowledged.
    assert c.ul_sent == c.ul_completed == factory.stats.ul_data
    assert c.unique_acked == c.unique_generated
    window = summary["phases"]["window"]
    assert window["ul_completed"] > 0 and window["latency"]["samples"] == window["ul_completed"]


class FakeSC(Protocol):
    """A scripted service center: after conCmp it propagates `factory.attach` sensors,
    polls status, pings and queues a downlink for sensor 0; it answers ulData and dlDataRes
    and checks every message with the codec."""

    factory: FakeSCFactory

    def connectionMade(self) -> None:
        self.framer = Framer()

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        for wire in self.framer.feed(data):
            message = m.decode(wire)
            self.factory.received.append(message)
            op = message.opId
            if isinstance(message, m.Con):
                rsp = m.ConRsp(opId=0, scEui=SC_EUI, snResume=False, snScUuid=os.urandom(16))
                transport.write(encode_frame(m.encode(rsp)))
            elif isinstance(message, m.ConCmp):
                ops: list[m.Message] = [att_prp(-1 - i, i) for i in range(self.factory.attach)]
                n = len(ops)
                ops += [m.Status(opId=-1 - n), m.Ping(opId=-2 - n), dl_data_que(-3 - n, 77)]
                for request in ops:
                    transport.write(encode_frame(m.encode(request)))
            elif isinstance(message, m.UlData):
                transport.write(encode_frame({"command": "ulDataRsp", "opId": op}))
            elif isinstance(message, m.DlDataRes):
                transport.write(encode_frame({"command": "dlDataResRsp", "opId": op}))
            elif message.command.endswith("Rsp"):
                transport.write(encode_frame({"command": message.command[:-3] + "Cmp", "opId": op}))


class FakeSCFactory(Factory):
    protocol = FakeSC  # type: ignore[assignment]

    def __init__(self, attach: int) -> None:
        self.attach = attach
        self.received: list[m.Message] = []


@pytest_twisted.ensureDeferred
async def test_sim_answers_a_service_center_over_tls(pki: PKI) -> None:
    from twisted.internet.endpoints import serverFromString

    factory = FakeSCFactory(attach=25)
    policy = server_context_factory(pki.ca, pki.cert, pki.key)
    endpoint = MutualTLSEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), policy, clock=reactor)
    port: Any = await endpoint.listen(factory)
    try:
        options = _options(
            port=port.getHost().port,
            ca=str(pki.ca),
            certs=pki.stations,
            base_stations=3,
            sensors=6,
            copies=3,
            duration=0.5,
            expect_att_prp=25,
        )
        summary = await _simulate(options)
    finally:
        await port.stopListening()
    att = summary["att_prp"]
    assert att["received"] == 75 and att["stations_done"] == 3 and att["all_done_after_s"] is not None
    c = Counters.from_dict(summary["counters"])
    assert (c.sc_ops, c.sc_completed) == (84, 84)
    assert not c.anomalies and c.errors_sent == 0
    by_command: dict[str, int] = {}
    for message in factory.received:
        by_command[message.command] = by_command.get(message.command, 0) + 1
    assert by_command["attPrpRsp"] == 75
    assert by_command["statusRsp"] == by_command["pingRsp"] == by_command["dlDataQueRsp"] == 3
    # Each station sent its downlink with an uplink of sensor 0 and reported it, completed.
    assert (c.dl_queued, c.dl_sent, c.dl_reported) == (3, 3, 3)
    assert by_command["dlDataRes"] == by_command["dlDataResCmp"] == 3
    opened = {(u.epEui, u.packetCnt) for u in factory.received if isinstance(u, m.UlData) and u.dlOpen}
    results = [r for r in factory.received if isinstance(r, m.DlDataRes)]
    assert all(r.result == "sent" and r.queId == 77 and r.epEui == sensor_eui(0) for r in results)
    assert {(r.epEui, r.packetCnt) for r in results} <= opened
    # The sensor acknowledged in its next uplink, through every station hearing it, never elsewhere.
    acks = [u for u in factory.received if isinstance(u, m.UlData) and u.dlAck]
    assert acks and c.dl_acked == len({u.packetCnt for u in acks})
    assert {(u.epEui, u.packetCnt - 1) for u in acks} <= {(r.epEui, r.packetCnt) for r in results}
    assert by_command["ulDataCmp"] == by_command["ulData"] == c.ul_completed
    # Every uplink was heard by all three stations: the closed loop makes an
    # uplink only when all of its stations are connected and have room.
    heard: dict[tuple[int, int], int] = {}
    for message in factory.received:
        if isinstance(message, m.UlData):
            key = (message.epEui, message.packetCnt)
            heard[key] = heard.get(key, 0) + 1
    assert heard and c.unique_acked == len(heard)
    assert set(heard.values()) == {3} and c.ul_skipped == 0


@contextlib.asynccontextmanager
async def _mioty_service(pki: PKI, tmp_path: Path) -> AsyncIterator[Any]:
    """A hub's mioty service center on a free port, in this reactor, trusting the stations of `pki`."""
    from bsscihub.family import installed_families
    from bsscihub.hub import make_hub
    from bsscihub.protocols.bssci.service import MiotyService
    from tests.conftest import make_config

    tls = {"ca": str(pki.ca), "ca_key": str(pki.ca_key), "cert": str(pki.cert), "key": str(pki.key)}
    config = make_config(tmp_path, families=["mioty"], tls=tls, mioty={"dedup_window": 0.05})
    hub = make_hub(config, reactor, {"mioty": installed_families()["mioty"]})
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    service = MiotyService(hub)
    hub.services["mioty"] = service
    service.startService()
    try:
        await service.when_ready()
        yield service
    finally:
        if service.running:
            await service.stopService()
        await hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_sim_sends_a_downlink_queued_on_the_hub(pki: PKI, tmp_path: Path) -> None:
    """The hub's own service center queues a downlink; a simulated station sends it with the
    sensor's next uplink, and the hub records it as sent."""
    async with _mioty_service(pki, tmp_path) as service:
        [sensor] = endpoints(1, bidi=True)
        ep = sensor["eui"]
        await service.attach(ep, sensor["nwKey"], sensor["shortAddr"], True, actor="test")
        options = _options(
            port=service.port.getHost().port,
            ca=str(pki.ca),
            certs=pki.stations[:2],
            sensors=1,
            rate=20.0,
            duration=1.5,
        )
        simulating = defer.ensureDeferred(_simulate(options))
        deadline = time.monotonic() + 10
        while len(service.sessions) < 2 or (await service.get_sensor(ep) or {}).get("lastPacketCnt") is None:
            assert time.monotonic() < deadline, "the simulated stations did not connect and send"
            await deferLater(reactor, 0.02, lambda: None)
        queued = await service.queue_downlink(ep, b"\xca\xfe", actor="test")
        summary = await simulating
        for _ in range(200):  # the hub records the result in the background
            [entry] = (await service.downlinks(ep))["items"]
            if entry["status"] != "accepted":
                break
            await deferLater(reactor, 0.01, lambda: None)
    assert entry["queId"] == queued["queId"] and entry["status"] == "sent"
    assert entry["resultBs"] in queued["baseStations"] and entry["packetCnt"] >= 1
    c = Counters.from_dict(summary["counters"])
    assert c.dl_queued == len(queued["baseStations"]) and c.dl_sent >= 1 and c.dl_reported == c.dl_sent
    assert not c.anomalies and c.errors_received == 0


@pytest.mark.parametrize(("stack", "processes"), [("twisted", 1), ("asyncio", 1), ("twisted", 2)])
@pytest_twisted.ensureDeferred
async def test_sigterm_ends_the_sim_cli_with_its_summary(stack: str, processes: int, pki: PKI, tmp_path: Path) -> None:
    """SIGTERM (a service manager's stop, `kill`) ends a `bsscihub sim` against a hub as Ctrl-C does: the
    stations drain and close, the summary is printed and the status is 0 (twisted crashed, asyncio died)."""
    async with _mioty_service(pki, tmp_path) as service:
        env = {**os.environ, "BSSCIHUB_TLS_CA": str(pki.ca), "BSSCIHUB_TLS_CA_KEY": str(pki.ca_key)}
        sim = subprocess.Popen(
            [sys.executable, "-m", "bsscihub.cli", "sim", "--stack", stack, "--processes", str(processes),
             "--port", str(service.port.getHost().port), "--base-stations", "2", "--sensors", "4", "--rate", "20",
             "--duration", "0", "--json", "--quiet", "--cert-dir", str(tmp_path / "certs")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
        )
        try:
            def connected() -> bool:  # conCmp received: the simulator has counted the station connected
                sessions = list(service.sessions.values())
                return len(sessions) == 2 and all(s.established_at is not None for s in sessions)

            await until(lambda: connected() or sim.poll() is not None, "both stations connected", timeout=90)
            assert sim.poll() is None, sim.communicate()[1]
            sim.send_signal(signal.SIGTERM)
            out, err = await deferToThread(sim.communicate, timeout=90)
        finally:
            kill(sim)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sim.pid, signal.SIGKILL)  # workers a failed stop left behind
        await until(lambda: not service.sessions, "the stations closed their connections", timeout=30)
    assert sim.returncode == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["counters"]["connects"] == 2 and summary["counters"]["disconnects"] == 0


def test_sim_cli_runs_against_the_ceiling_in_another_process(pki: PKI, tmp_path: Path) -> None:
    """The real command line end to end: ceiling and sim as two processes, JSON out."""

    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "ceiling_server.py"),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--ca",
            str(pki.ca),
            "--cert",
            str(pki.cert),
            "--key",
            str(pki.key),
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert time.monotonic() < deadline and server.poll() is None, "ceiling did not start"
            time.sleep(0.05)
        env = {**os.environ, "BSSCIHUB_TLS_CA": str(pki.ca), "BSSCIHUB_TLS_CA_KEY": str(pki.ca_key)}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bsscihub.cli",
                "sim",
                "--port",
                port_file.read_text().strip(),
                "--base-stations",
                "2",
                "--sensors",
                "10",
                "--rate",
                "50",
                "--duration",
                "1",
                "--processes",
                "2",
                "--copies",
                "1",
                "--json",
                "--cert-dir",
                str(tmp_path / "certs"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    c = summary["counters"]
    assert c["connects"] == 2 and c["ul_completed"] == c["ul_sent"] > 20
    assert summary["phases"]["window"]["ul_ops_per_s"] == pytest.approx(50, rel=0.3)
    assert "window" in done.stderr  # the per-second lines


def test_a_station_without_variable_mac_answers_vm_status_with_error_38_as_spec_says() -> None:
    conv = connected()
    [answer] = conv.send({"command": "vm.status", "opId": -1})
    assert (answer["command"], answer["opId"], answer["code"]) == ("error", -1, 38)
    assert conv.send({"command": "errorAck", "opId": -1}) == []
    # A command it should know is still an anomaly when it cannot answer it.
    [answer] = conv.send({"command": "ulDataTx", "opId": -2})
    assert answer["command"] == "error"
    assert list(conv.host.counters.anomalies) == ["answered error 38: the simulator does not implement 'ulDataTx'"]
