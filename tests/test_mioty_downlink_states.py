"""The downlink state machine in memory: its transition table, and Downlinks driven by a Clock
(the default 24 h expiry without waiting) against stations that answer when the test says so;
states are written to a real SQLite or PostgreSQL store."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.downlinks import PENDING, TRANSITIONS, Downlink, Downlinks, DownlinkState
from bsscihub.protocols.bssci.registry import BaseStation, Registry, Sensor
from bsscihub.protocols.bssci.schema import MIGRATIONS
from bsscihub.protocols.bssci.session import EINVAL, OperationFailed, OperationTimedOut, State
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from tests.helpers import until

EP = "0011223344556677"
A, B = "00000000000000aa", "00000000000000bb"
DAY = 86400.0
S = DownlinkState


def test_the_transition_table() -> None:
    terminal = set(S) - PENDING
    assert terminal == {S.SENT, S.EXPIRED, S.INVALID, S.REJECTED, S.REVOKED}
    # Nothing leaves an end state; every pending one can be withdrawn or reported by a station.
    assert not [key for key in TRANSITIONS if key[0] in terminal]
    for state in PENDING:
        assert TRANSITIONS[state, "revoke"] is S.REVOKED
        assert [TRANSITIONS[state, r] for r in ("sent", "expired", "invalid")] == [S.SENT, S.EXPIRED, S.INVALID]
    # A station dropping what it held queues it again; one that was expiring is over.
    assert [TRANSITIONS[s, "drop"] for s in (S.DISPATCHED, S.ACCEPTED, S.EXPIRING)] == [S.QUEUED, S.QUEUED,
                                                                                       S.EXPIRED]
    assert (S.QUEUED, "drop") not in TRANSITIONS
    # Expiry: straight away when nobody holds it; through dlDataRev when a station does.
    assert TRANSITIONS[S.QUEUED, "timeout"] is S.EXPIRED
    assert TRANSITIONS[S.ACCEPTED, "timeout"] is S.EXPIRING
    assert (S.DISPATCHED, "timeout") not in TRANSITIONS  # its dlDataQue is answered first
    assert (TRANSITIONS[S.EXPIRING, "rev_ok"], TRANSITIONS[S.EXPIRING, "rev_error"]) == (S.EXPIRED, S.REVOKED)


class FakeStation:
    """A station's session as Downlinks sees it: each request waits until the test answers it."""

    def __init__(self, bs_hex: str) -> None:
        self.bs_hex = bs_hex
        self.state = State.ESTABLISHED
        self.bidi = True
        self.requests: list[tuple[m.Message, defer.Deferred[Any]]] = []
        self._op = 0

    def request(self, make: Any) -> defer.Deferred[Any]:
        self._op -= 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.requests.append((make(self._op), d))
        return d

    def take(self) -> tuple[m.Message, defer.Deferred[Any]]:
        assert self.requests, "nothing was asked of the station"
        return self.requests.pop(0)


class Rig:
    def __init__(self, store: Store) -> None:
        self.clock = Clock()
        self.registry = Registry(store, reactor)
        self.sessions: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.writes: list[defer.Deferred[Any]] = []
        self.downlinks = Downlinks(self.clock, self.registry, self.sessions, DAY, self.emit, self.background)
        self.registry.sensors[EP] = Sensor(EP, bytes(16), 1, True, paths=(A, B))
        for bs in (A, B):
            self.registry.base_stations[bs] = BaseStation(bs, 0.0, 0.0, 0.0, bidi=True)

    def emit(self, ep: str, kind: str, fields: Any) -> None:
        assert (ep, kind) == (EP, "downlink")
        self.events.append(dict(fields))

    def background(self, work: Any, what: str) -> None:
        d = work if isinstance(work, defer.Deferred) else defer.Deferred.fromCoroutine(work)
        self.writes.append(d)

    def station(self, bs: str) -> FakeStation:
        station = self.sessions[bs] = FakeStation(bs)
        return station

    def add(self, data: bytes = b"\x01") -> defer.Deferred[Downlink]:
        return defer.ensureDeferred(self.downlinks.add(EP, data, None, 1.5, None, "test"))

    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.downlinks.tick()

    async def stored(self, dl: Downlink) -> dict[str, Any]:
        await self.downlinks.flush()
        await defer.gatherResults(self.writes)
        [row] = await self.registry.downlinks(EP, que_id=dl.que_id)
        return row


async def rig(store: Store) -> Rig:
    await store.migrate(CORE_MIGRATIONS + MIGRATIONS)
    return Rig(store)


@pytest_twisted.ensureDeferred
async def test_a_held_downlink_expires_after_a_day_and_an_error_to_its_dl_data_rev_revokes_it(store: Store) -> None:
    r = await rig(store)
    a = r.station(A)
    adding = r.add()
    await until(lambda: a.requests)
    que, answer = a.take()
    assert isinstance(que, m.DlDataQue) and que.prio == 1.5 and que.userData == (b"\x01",)
    answer.callback(None)
    dl = await adding
    assert dl.state is S.ACCEPTED and dl.holder is a
    r.tick(DAY - 1)
    assert dl.state is S.ACCEPTED and not a.requests
    r.tick(1)
    assert dl.state is S.EXPIRING
    rev, answer = a.take()
    assert isinstance(rev, m.DlDataRev) and rev.queId == que.queId == dl.que_id
    answer.errback(OperationFailed("dlDataRev", EINVAL, "no such queId"))
    assert dl.state is S.REVOKED and not r.downlinks.pending
    row = await r.stored(dl)
    assert (row["status"], row["bsEuis"], row["attempts"]) == ("revoked", [], 1)
    assert "no such queId" in row["error"]
    assert [(e["event"], e["state"]) for e in r.events] == [
        ("queue", "queued"), ("dispatch", "dispatched"), ("accept", "accepted"), ("timeout", "expiring"),
        ("rev_error", "revoked"),
    ]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_an_answer_to_an_earlier_attempt_is_stale(store: Store) -> None:
    r = await rig(store)
    a = r.station(A)
    adding = r.add()
    await until(lambda: a.requests)
    _, first = a.take()
    # The station takes an attPrp for the end point before answering: it forgets the downlink ...
    r.downlinks.propagating(a, EP)  # type: ignore[arg-type]
    [dl] = r.downlinks.pending.values()
    assert dl.state is S.QUEUED
    r.clock.advance(0)  # ... and gets it again once the attPrp is on the wire
    _, second = a.take()
    assert (dl.state, dl.attempts) == (S.DISPATCHED, 2)
    first.callback(None)  # the answer to the first dlDataQue changes nothing
    assert dl.state is S.DISPATCHED
    second.callback(None)
    assert (await adding).state is S.ACCEPTED


@pytest_twisted.ensureDeferred
async def test_it_waits_for_the_serving_station_and_a_timeout_queues_it_again(store: Store) -> None:
    r = await rig(store)
    b = r.station(B)
    # A serves the end point (best receiver) and is away: B, connected, does not get it.
    dl = await r.add()
    assert dl.state is S.QUEUED and not b.requests
    r.tick(60)
    assert dl.state is S.QUEUED and not b.requests
    # A is back: the next round hands it over; an unanswered dlDataQue queues it again.
    a = r.station(A)
    r.tick(60)
    assert dl.state is S.DISPATCHED
    _, answer = a.take()
    answer.errback(OperationTimedOut("dlDataQue not answered"))
    assert dl.state is S.QUEUED and dl.holder is None
    # The end point's next dlOpen uplink comes through B: B now serves it and takes it at once.
    r.registry.sensors[EP].paths = (B,)
    r.downlinks.uplink(EP, 9, {"dlAck": False, "dlOpen": True})
    _, answer = b.take()
    answer.callback(None)
    assert (dl.state, dl.holder, dl.attempts) == (S.ACCEPTED, b, 2)
    # B reports it sent: the station is answered once that is in the database (the Deferred) ...
    recorded = r.downlinks.result(b, m.DlDataRes(opId=1, epEui=int(EP, 16), queId=dl.que_id, result="sent",
                                                 txTime=5, packetCnt=9))  # type: ignore[arg-type]
    assert dl.state is S.SENT and recorded is not None and not recorded.called
    await recorded
    [row] = await r.registry.downlinks(EP, que_id=dl.que_id)
    assert row["status"] == "sent"
    # ... and its dlAck in the end point's next uplink marks it acknowledged.
    r.downlinks.uplink(EP, 10, {"dlAck": True, "dlOpen": False})
    assert r.events[-1]["event"] == "ack"
    row = await r.stored(dl)
    assert (row["status"], row["resultBs"], row["packetCnt"], row["acked"]) == ("sent", B, 9, True)
