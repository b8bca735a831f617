"""The downlink lifecycle as one state machine: queued -> dispatched to a station -> accepted -> sent,
expired, invalid, rejected or revoked, and back to queued whenever a station drops what it held."""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bsscihub.errors import CommandError
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.registry import Registry
from bsscihub.protocols.bssci.session import OperationFailed, Session, State
from bsscihub.protocols.bssci.uplinks import untrack

__all__ = ["TRANSITIONS", "Downlink", "DownlinkState", "Downlinks", "hex_or_bytes"]


def hex_or_bytes(data: Any) -> Any:
    """A caller's downlink data (sensor or meter): hex text as bytes, CommandError when it is not hex;
    anything else as given, for the caller's own type and size check."""
    if isinstance(data, str):
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise CommandError("data must be hexadecimal digits, two per byte") from None
    return data


class DownlinkState(enum.Enum):
    QUEUED = "queued"
    """Stored; no station holds it. Waits for its serving station or the end point's next dlOpen uplink."""
    DISPATCHED = "dispatched"
    """dlDataQue sent to a station, not answered yet."""
    ACCEPTED = "accepted"
    """The station took it (dlDataQueRsp); its dlDataRes is due."""
    EXPIRING = "expiring"
    """Its time ran out while a station held it: dlDataRev sent to that station."""
    SENT = "sent"
    EXPIRED = "expired"
    INVALID = "invalid"
    REJECTED = "rejected"
    REVOKED = "revoked"


Q, D, A, X = DownlinkState.QUEUED, DownlinkState.DISPATCHED, DownlinkState.ACCEPTED, DownlinkState.EXPIRING
SENT, EXPIRED, INVALID, REJECTED, REVOKED = (
    DownlinkState.SENT, DownlinkState.EXPIRED, DownlinkState.INVALID, DownlinkState.REJECTED, DownlinkState.REVOKED,
)  # fmt: skip
PENDING = frozenset((Q, D, A, X))

# (state, what happened) -> next state. What happened:
#   dispatch     dlDataQue sent to the serving station
#   accept       dlDataQueRsp
#   refuse       error answer to dlDataQue
#   drop         the holding station dropped it: connection lost, dlDataQue unanswered, attPrp for the end point
#   sent, expired, invalid
#                the station's dlDataRes (from any station: one may report after a reconnect)
#   timeout      mioty.downlink_ttl passed since it was queued
#   rev_ok, rev_error
#                the answer to the dlDataRev the timeout sent
#   revoke       withdrawn from REST or MQTT
# Anything not in the table is ignored (e.g. a timeout while dlDataQue is still unanswered).
TRANSITIONS: Mapping[tuple[DownlinkState, str], DownlinkState] = {
    (Q, "dispatch"): D,
    (Q, "timeout"): EXPIRED,
    (D, "accept"): A,
    (D, "refuse"): REJECTED,
    (D, "drop"): Q,
    (A, "drop"): Q,
    (A, "timeout"): X,
    (X, "rev_ok"): EXPIRED,
    (X, "rev_error"): REVOKED,
    (X, "drop"): EXPIRED,
    **{(s, "revoke"): REVOKED for s in PENDING},
    **{(s, "sent"): SENT for s in PENDING},
    **{(s, "expired"): EXPIRED for s in PENDING},
    **{(s, "invalid"): INVALID for s in PENDING},
}


@attrs.define(eq=False)
class Downlink:
    """One downlink; `que_id` is its id everywhere (REST, MQTT, the dlDataQue of every attempt)."""

    que_id: int
    ep_eui: str
    data: bytes = attrs.field(repr=False)
    format: int | None
    prio: float | None
    response_exp: bool | None
    created: float
    state: DownlinkState = Q
    holder: Session | None = None
    """The session of the station holding it (dispatched, accepted, expiring), else None."""
    attempts: int = 0
    """dlDataQue sent so far; an answer to an earlier attempt is stale."""
    error: str | None = None
    result_bs: str | None = None
    tx_time: int | None = None
    packet_cnt: int | None = None
    _saving: defer.Deferred[None] | None = attrs.field(default=None, init=False)
    _dirty: bool = attrs.field(default=False, init=False)
    _waiters: list[defer.Deferred[None]] = attrs.field(factory=list, init=False)

    def columns(self) -> dict[str, Any]:
        return {
            "status": self.state.value,
            "targets": [self.holder.bs_hex] if self.holder is not None else [],
            "attempts": self.attempts,
            "error": self.error,
            "result_bs": self.result_bs,
            "tx_time": self.tx_time,
            "packet_cnt": self.packet_cnt,
        }

    def que(self, op_id: int) -> m.DlDataQue:
        return m.DlDataQue(opId=op_id, epEui=int(self.ep_eui, 16), queId=self.que_id, cntDepend=False,
                           userData=(self.data,), format=self.format,
                           prio=None if self.prio is None else float(self.prio), responseExp=self.response_exp)

    def rev(self, op_id: int) -> m.DlDataRev:
        return m.DlDataRev(opId=op_id, epEui=int(self.ep_eui, 16), queId=self.que_id)


class Downlinks:
    """Every pending downlink, moved through TRANSITIONS by what stations, end points, the clock
    and operators do. Each move is written to mioty_downlinks (one write in flight per downlink,
    the newest state last) and published as a `downlink` event.

    A downlink goes to its end point's serving station: the first bidirectional one among the
    receivers of its last uplink (best SNR first; the station that took its over-the-air attach,
    or the stored best path after a restart). While that station is offline the downlink waits
    for it, or for the end point's next dlOpen uplink, whose best receiver then serves.

    In a cluster each pending downlink is kept by one hub (the `node` column): the one holding its
    station, else the one that queued or last took it. Every state write is made only while this hub
    keeps the downlink; one that finds another hub took it forgets it here (`take`, `let_go`).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        sessions: Mapping[str, Session],
        ttl: float,
        emit: Callable[[str, str, Mapping[str, Any]], Any],
        background: Callable[[Any, str], None],
        node: str = "local",
        clustered: bool = False,
    ) -> None:
        self.clock = clock
        self.node = node
        """This hub's name: the keeper written with every downlink it keeps."""
        self.clustered = clustered
        self.registry = registry
        self.sessions = sessions
        self.ttl = ttl
        self._emit = emit
        self._background = background
        self.pending: dict[int, Downlink] = {}
        self.by_ep: dict[str, dict[int, Downlink]] = {}
        """Pending downlinks per end point; the propagation hook checks it for every attPrp."""
        self.waiting: set[str] = set()
        """End points with a queued downlink; the uplink pipeline checks dlOpen uplinks against it."""
        self.on_waiting: Callable[[str, bool], None] | None = None
        """Called with (epEui, True/False) when an end point starts or stops waiting here (a cluster tells the
        other hubs, whose dlOpen uplinks of it come here)."""
        self.ended: Counter[str] = Counter()
        """Downlinks that reached an end state since the start, by state (for /metrics)."""
        self._last_sent: dict[str, tuple[int, int]] = {}  # epEui -> (queId, packetCnt) of its last sent downlink
        self._writes: set[defer.Deferred[Any]] = set()
        self._emitted: Any = None  # what emit returned for the last move (a Deferred from the bus)

    # -- the machine

    def move(self, dl: Downlink, what: str, *, bs: str | None = None, reason: str | None = None) -> bool:
        """Apply one happening; False (and nothing changes) if the table has no such transition."""
        old = dl.state
        new = TRANSITIONS.get((old, what))
        if new is None:
            return False
        dl.state = new
        if new not in PENDING:
            self.ended[new.value] += 1
            self._forget(dl)
        if new is not D and new is not A and new is not X:
            dl.holder = None
        if reason is not None or new is D:
            dl.error = reason
        self._track_waiting(dl.ep_eui)
        self._save(dl)
        self._emitted = self._emit(dl.ep_eui, "downlink", {
            "queId": dl.que_id, "state": new.value, "previous": old.value, "event": what,
            "bsEui": bs if bs is not None else dl.holder.bs_hex if dl.holder is not None else None,
            "attempts": dl.attempts, "reason": reason,
        })  # fmt: skip
        if new is Q:
            self.log.info("downlink {queId} for {epEui} queued again ({what}): {reason}", queId=dl.que_id,
                          epEui=dl.ep_eui, what=what, reason=reason or "")
        return True

    def _track_waiting(self, ep: str) -> None:
        was = ep in self.waiting
        if any(d.state is Q for d in self.by_ep.get(ep, {}).values()):
            self.waiting.add(ep)
        else:
            self.waiting.discard(ep)
        if self.on_waiting is not None and was != (ep in self.waiting):
            self.on_waiting(ep, not was)

    def _adopt(self, dl: Downlink) -> None:
        self.pending[dl.que_id] = dl
        self.by_ep.setdefault(dl.ep_eui, {})[dl.que_id] = dl
        self._track_waiting(dl.ep_eui)

    def _save(self, dl: Downlink) -> None:
        """Write the downlink's state; one write at a time per downlink, so the last one wins."""
        dl._dirty = True
        if dl._saving is None:
            self._write(dl)

    def _write(self, dl: Downlink) -> None:
        dl._dirty = False
        saving = defer.Deferred.fromCoroutine(
            self.registry.update_downlink(dl.que_id, self.clock.seconds(), node=self.node, **dl.columns())
        ).addCallback(self._written, dl)
        dl._saving = saving

        def done(result: Any) -> Any:
            dl._saving = None
            if dl._dirty:
                self._write(dl)
            else:
                waiters, dl._waiters = dl._waiters, []
                for d in waiters:
                    if isinstance(result, Failure):
                        d.errback(result)
                    else:
                        d.callback(None)
            return result

        saving.addBoth(done)
        self._writes.add(saving)
        saving.addBoth(untrack, saving, self._writes)
        self._background(saving, f"recording the state of downlink {dl.que_id}")

    def _written(self, rows: int, dl: Downlink) -> None:
        if not rows and self.pending.get(dl.que_id) is dl:
            # Another hub of the cluster took it (its station is there now): it is that hub's to move.
            self.log.info("downlink {queId} for {epEui} is kept by another hub now", queId=dl.que_id,
                          epEui=dl.ep_eui)
            self._forget(dl)

    def _forget(self, dl: Downlink) -> None:
        self.pending.pop(dl.que_id, None)
        of_ep = self.by_ep.get(dl.ep_eui)
        if of_ep is not None:
            of_ep.pop(dl.que_id, None)
            if not of_ep:
                del self.by_ep[dl.ep_eui]
        self._track_waiting(dl.ep_eui)

    def durable(self, dl: Downlink) -> defer.Deferred[None]:
        """Fires once the downlink's current state is in the database."""
        d: defer.Deferred[None] = defer.Deferred()
        if dl._saving is None and not dl._dirty:
            d.callback(None)
        else:
            dl._waiters.append(d)
        return d

    async def flush(self) -> None:
        """Wait for the state writes under way (the stop)."""
        for _ in range(3):
            if not self._writes:
                return
            await defer.DeferredList(list(self._writes), consumeErrors=True)

    # -- start

    async def load(self) -> None:
        """Take the pending downlinks from the database: every one is queued (a station forgets
        its downlinks when it starts a new session, and every session after a restart is new).
        In a cluster only those this hub kept before, or nobody keeps: the others are kept by
        running hubs, or taken when their station shows up (`take`)."""
        rows = await self.registry.pending_downlinks()
        if self.clustered:
            rows = [row for row in rows if row[10] in (None, self.node)]
        taken = set(await self.registry.keep_downlinks(self.node, [(row[0], row[10]) for row in rows]))
        for row in rows:
            if row[0] in taken:
                self._taken(row, "the hub restarted", restart=True)

    def _taken(self, row: tuple[Any, ...], reason: str | None, restart: bool = False) -> Downlink:
        """Keep one pending downlink read from the database, queued: no station holds it for this hub."""
        dl = pending_from_row(row)
        old = dl.state
        dl.state = Q
        self._adopt(dl)
        holders = tuple(json.loads(row[9] or "[]"))
        sensor = self.registry.sensors.get(dl.ep_eui)
        if sensor is not None and not sensor.paths and not sensor.best_bs and row[11]:
            sensor.best_bs = row[11]  # its best receiver as another hub wrote it back
        if old is not Q:
            self._save(dl)
            self._emit(dl.ep_eui, "downlink", {
                "queId": dl.que_id, "state": Q.value, "previous": None if restart else old.value, "event": "drop",
                "bsEui": None, "attempts": dl.attempts, "reason": reason,
            })  # fmt: skip
            if sensor is not None and holders and (not restart or not sensor.paths):
                # The station that held it is a known path, fresher than a best path not yet written back
                # (taken from another hub: fresher than what this hub heard).
                sensor.paths = (*holders, *(bs for bs in sensor.paths if bs not in holders))
        return dl

    async def take(self, rows: list[tuple[Any, ...]], reason: str | None,
                   keepers: Mapping[int, str | None] | None = None) -> list[defer.Deferred[None]]:
        """Keep these pending downlinks (rows as `Registry.pending_downlinks` reads them) from now on, if
        their keeper is still the one read (or as in `keepers`), and offer them; returns the dispatches."""
        rows = [row for row in rows if row[0] not in self.pending]
        claims = [(row[0], keepers[row[0]] if keepers is not None else row[10]) for row in rows]
        taken = set(await self.registry.keep_downlinks(self.node, claims))
        eps = {self._taken(row, reason).ep_eui for row in rows if row[0] in taken and row[0] not in self.pending}
        if taken:
            self.log.info("took {count} pending downlinks: {reason}", count=len(taken), reason=reason or "asked to")
        return [d for ep in sorted(eps) for d in self.offer(ep)]

    def queued_for(self, ep: str) -> list[Downlink]:
        """The end point's downlinks that no station holds, oldest first."""
        return [dl for dl in sorted(self.by_ep.get(ep, {}).values(), key=_que_id) if dl.state is Q]

    def forget(self, dl: Downlink) -> None:
        """Keep `dl` no longer in memory (it is handed to another hub); its row stays as it is."""
        self._forget(dl)

    def let_go(self, station: str) -> list[Downlink]:
        """Another hub holds `station` now: forget the downlinks it held or serves (that hub takes them);
        returns them, to release in the database."""
        gone = [dl for dl in self.pending.values()
                if (dl.holder.bs_hex == station if dl.holder is not None else self.serving(dl.ep_eui) == station)]
        for dl in gone:
            self._forget(dl)
        return gone

    # -- routing

    def serving(self, ep: str) -> str | None:
        """The end point's serving station (bsEui), online or not; None if none is known."""
        sensor = self.registry.sensors.get(ep)
        if sensor is None:
            return None
        stations = self.registry.base_stations
        for bs in sensor.paths or ((sensor.best_bs,) if sensor.best_bs else ()):
            station = stations.get(bs)
            # A station this hub never saw is on another hub of the cluster, which checks it.
            if station.bidi if station is not None else self.clustered:
                return bs
        return None

    def station_for(self, ep: str) -> Session | None:
        """The serving station's session, if it is connected."""
        bs = self.serving(ep)
        session = self.sessions.get(bs) if bs is not None else None
        if session is not None and session.state is State.ESTABLISHED and session.bidi:
            return session
        return None

    def offer(self, ep: str) -> list[defer.Deferred[None]]:
        """Dispatch the end point's queued downlinks to its serving station, if it is connected."""
        of_ep = self.by_ep.get(ep)
        session = self.station_for(ep) if of_ep else None
        if session is None or of_ep is None:
            return []
        return [self.dispatch(dl, session) for dl in sorted(of_ep.values(), key=_que_id) if dl.state is Q]

    def dispatch(self, dl: Downlink, session: Session) -> defer.Deferred[None]:
        """dlDataQue to `session`; fires (never fails) once the downlink is accepted, refused or dropped."""
        dl.attempts += 1
        attempt = dl.attempts
        dl.holder = session
        self.move(dl, "dispatch", bs=session.bs_hex)
        d = session.request(dl.que)
        d.addCallback(self._que_answered, dl, attempt)
        d.addErrback(self._que_failed, dl, attempt)
        return d

    def _que_answered(self, _: object, dl: Downlink, attempt: int) -> None:
        if dl.attempts == attempt and dl.state is D:
            self.move(dl, "accept")

    def _que_failed(self, failure: Failure, dl: Downlink, attempt: int) -> None:
        if dl.attempts != attempt or dl.state is not D:
            return
        bs = dl.holder.bs_hex if dl.holder is not None else None
        problem = f"{bs}: {failure.getErrorMessage()}"
        self.move(dl, "refuse" if failure.check(OperationFailed) else "drop", bs=bs, reason=problem)

    # -- what stations and end points do

    def propagating(self, session: Session, ep: str) -> None:
        """An attPrp for `ep` goes to `session` now: the station forgets the end point's downlinks.
        They are queued again and offered once the attPrp is on the wire (frames go out in order)."""
        for dl in list(self.by_ep.get(ep, {}).values()):
            if dl.holder is session:
                self.move(dl, "drop", bs=session.bs_hex, reason=f"{session.bs_hex} took an attPrp for the end point")
        self.clock.callLater(0, self.offer, ep)

    def resumed(self, session: Session) -> None:
        """A station resumed its session (it kept its attachments, no attPrp follows): offer it the
        queued downlinks it serves now (those it held were handed over to the new session)."""
        for ep in list(self.waiting):
            if self.station_for(ep) is session:
                self.offer(ep)

    def station_gone(self, session: Session) -> None:
        """A station's session ended: what it held is queued again (its next session starts empty)."""
        for dl in [d for d in self.pending.values() if d.holder is session]:
            self.move(dl, "drop", bs=session.bs_hex, reason=f"{session.bs_hex} disconnected")

    def hand_over(self, old: Session, new: Session) -> None:
        """A station resumed its session (snResume): it still holds what `old` held."""
        for dl in self.pending.values():
            if dl.holder is old:
                dl.holder = new

    def detached(self, ep: str) -> None:
        """The end point is detached (or removed): its pending downlinks end as revoked; the
        stations drop them with the detPrp."""
        for dl in sorted(self.by_ep.get(ep, {}).values(), key=_que_id):
            self.move(dl, "revoke", reason="the end point was detached")

    def uplink(self, ep: str, packet_cnt: int, payload: Mapping[str, Any]) -> None:
        """A published uplink that acknowledges a downlink (dlAck) or opens a downlink window
        for an end point with queued downlinks (dlOpen)."""
        if payload["dlAck"]:
            last = self._last_sent.get(ep)
            if last is not None and last[1] == packet_cnt - 1:
                del self._last_sent[ep]
                self._background(self.registry.update_downlink(last[0], self.clock.seconds(), acked=True),
                                 "recording a downlink acknowledgement")
                self._acked(ep, last[0])
            elif last is None and self.clustered:
                # Maybe sent through another hub: the database knows.
                self._background(self._ack_stored(ep, packet_cnt), "recording a downlink acknowledgement")
        if payload["dlOpen"] and ep in self.waiting:
            self.offer(ep)

    def _acked(self, ep: str, que_id: int) -> None:
        self._emit(ep, "downlink", {"queId": que_id, "state": SENT.value, "previous": SENT.value, "event": "ack",
                                    "bsEui": None, "attempts": None, "reason": None})

    async def _ack_stored(self, ep: str, packet_cnt: int) -> None:
        que_id = await self.registry.ack_downlink(ep, packet_cnt - 1, self.clock.seconds())
        if que_id is not None:
            self._acked(ep, que_id)

    def result(self, session: Session, msg: m.DlDataRes) -> defer.Deferred[None] | None:
        """A station's dlDataRes (sent, expired, invalid); the Deferred fires once it is recorded."""
        ep = f"{msg.epEui:016x}"
        dl = self.pending.get(msg.queId)
        if dl is None or dl.ep_eui != ep:
            self.log.info("dlDataRes {result} from {bsEui} for queId {queId}, which is not pending",
                          result=msg.result, bsEui=session.bs_hex, queId=msg.queId)
            return None
        holder = dl.holder
        if msg.result == "sent":
            dl.result_bs, dl.tx_time, dl.packet_cnt = session.bs_hex, msg.txTime, msg.packetCnt
        else:
            dl.result_bs = session.bs_hex
        if not self.move(dl, msg.result, bs=session.bs_hex):
            return None
        if msg.result == "sent" and msg.packetCnt is not None:
            self._last_sent[ep] = (dl.que_id, msg.packetCnt)
        if holder is not None and (holder is not session or dl.attempts > 1) and holder.state is State.ESTABLISHED:
            # Maybe the report of an earlier attempt: the copy of the current one must not go out too
            # (a station that has none left answers error, which is ignored).
            _quiet(holder.request(dl.rev))
        recorded = [self.durable(dl)]
        if isinstance(self._emitted, defer.Deferred):
            recorded.append(self._emitted)  # its event in the MQTT outbox too
        return defer.gatherResults(recorded).addCallback(lambda _: None)

    # -- the clock and operators

    def tick(self) -> None:
        """Expire what waited longer than `ttl`; offer queued downlinks whose station is back."""
        now = self.clock.seconds()
        offered: set[str] = set()
        for dl in list(self.pending.values()):
            if now - dl.created >= self.ttl:
                self._expire(dl)
            elif dl.state is Q and dl.ep_eui not in offered:
                offered.add(dl.ep_eui)
                self.offer(dl.ep_eui)

    def _expire(self, dl: Downlink) -> None:
        holder = dl.holder
        reason = f"not sent within {self.ttl:g} s"
        if not self.move(dl, "timeout", reason=reason) or dl.state is not X or holder is None:
            return
        d = holder.request(dl.rev)
        d.addCallback(self._rev_answered, dl)
        d.addErrback(self._rev_failed, dl)

    def _rev_answered(self, _: object, dl: Downlink) -> None:
        if dl.state is X:
            self.move(dl, "rev_ok")

    def _rev_failed(self, failure: Failure, dl: Downlink) -> None:
        if dl.state is X:
            what = "rev_error" if failure.check(OperationFailed) else "drop"
            self.move(dl, what, reason=f"dlDataRev: {failure.getErrorMessage()}")

    async def add(self, ep: str, data: bytes, fmt: int | None, prio: float | None, response_exp: bool | None,
                  actor: str, keep: bool = True) -> Downlink:
        """Store a new downlink (queued) and offer it to the end point's serving station. `keep` False:
        stored only, for the hub holding that station to take (see `take`)."""
        now = self.clock.seconds()
        que_id = await self.registry.add_downlink(ep, data, fmt, prio, response_exp, actor, [], now, self.node)
        dl = Downlink(que_id, ep, data, fmt, prio, response_exp, now)
        self._emit(ep, "downlink", {"queId": que_id, "state": Q.value, "previous": None, "event": "queue",
                                    "bsEui": None, "attempts": 0, "reason": None})
        if not keep:
            return dl
        self._adopt(dl)
        session = self.station_for(ep)
        if session is not None:
            await self.dispatch(dl, session)
        return dl

    async def revoke(self, dl: Downlink, actor: str) -> list[str]:
        """Withdraw a pending downlink: dlDataRev to the station holding it. Returns its problems."""
        holder = dl.holder
        self.move(dl, "revoke", reason=f"revoked by {actor}")
        if holder is None:
            return []
        try:
            await holder.request(dl.rev)
        except Exception as e:
            problem = f"{holder.bs_hex}: {e}"
            dl.error = f"{dl.error}; dlDataRev: {problem}"
            self._save(dl)
            return [problem]
        return []


def _que_id(dl: Downlink) -> int:
    return dl.que_id


def _quiet(d: defer.Deferred[Any]) -> None:
    d.addErrback(lambda f: None)  # best effort: the station may not hold that queId any more


def pending_from_row(row: tuple[Any, ...]) -> Downlink:
    """A pending downlink as `Registry.pending_downlinks` reads it."""
    que_id, ep, data, fmt, prio, response_exp, created, status, attempts = row[:9]
    return Downlink(int(que_id), ep, bytes(data), None if fmt is None else int(fmt),
                    None if prio is None else float(prio), None if response_exp is None else bool(response_exp),
                    float(created), DownlinkState(status) if status in _VALUES else Q, attempts=int(attempts or 0))


_VALUES = {s.value for s in DownlinkState}
