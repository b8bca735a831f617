"""The uplink pipeline: a ulData copy is stored, deduplicated, published, then marked published.
Each step is one method below, in that order; a copy is acknowledged once its store step committed."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Container, Iterable
from itertools import chain
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bsscihub.bus import Event, EventBus
from bsscihub.cluster import IDedupStore
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.dedup import (
    LATE,
    MERGED,
    SAME_UPLINK_SPREAD_NS,
    Committing,
    Copy,
    Deduplicator,
    subpackets_json,
    uplink_payload,
)
from bsscihub.protocols.bssci.metrics import Counters
from bsscihub.protocols.bssci.registry import Registry
from bsscihub.protocols.bssci.session import EINVAL, Refused

__all__ = ["UplinkPipeline", "group_copies", "untrack"]

_I64_MAX = (1 << 63) - 1
_MAX_TEXT = 64  # profile, mode: short radio identifiers
# Cluster: a copy unpublished this long after its window is an orphan (its collecting hub is gone).
ORPHAN_GRACE = 5.0


def untrack(result: Any, d: defer.Deferred[Any], tracked: set[defer.Deferred[Any]]) -> Any:
    """A callback that forgets a Deferred the stop waits for, passing its result on."""
    tracked.discard(d)
    return result


def _check_text(name: str, value: str | None) -> None:
    if value is not None and (len(value) > _MAX_TEXT or "\x00" in value):
        raise Refused(EINVAL, f"ulData: field {name!r} must be a short text without NUL characters")


def _copy_from_row(row: tuple[Any, ...]) -> tuple[str, Copy]:
    """A stored copy (id + UPLINK_COLUMNS) back as the Copy it was."""
    (_, ep, pc, bs, received, rx_time, rx_duration, snr, rssi, eq_snr, profile, mode, sub, data, fmt, dl_open,
     response_exp, dl_ack) = row  # fmt: skip
    subpackets = m.Subpackets.from_lists(json.loads(sub)) if sub else None
    msg = m.UlData(
        opId=0,
        epEui=int(ep, 16),
        rxTime=int(rx_time),
        rxDuration=None if rx_duration is None else int(rx_duration),
        packetCnt=int(pc),
        snr=float(snr),
        rssi=float(rssi),
        eqSnr=None if eq_snr is None else float(eq_snr),
        profile=profile,
        mode=mode,
        subpackets=subpackets,
        userData=bytes(data),
        format=int(fmt),
        dlOpen=bool(dl_open),
        responseExp=bool(response_exp),
        dlAck=bool(dl_ack),
    )
    return ep, Copy(bs, float(received), msg)


def group_copies(rows: Iterable[tuple[Any, ...]]) -> list[tuple[str, list[Copy]]]:
    """Stored copies grouped into uplinks: same sensor and counter, rxTimes close together."""
    groups: list[tuple[str, list[Copy]]] = []
    index: dict[tuple[str, int], list[list[Copy]]] = {}
    for row in rows:
        ep, copy = _copy_from_row(row)
        candidates = index.setdefault((ep, copy.msg.packetCnt), [])
        for copies in candidates:
            if abs(copies[0].msg.rxTime - copy.msg.rxTime) <= SAME_UPLINK_SPREAD_NS:
                copies.append(copy)
                break
        else:
            copies = [copy]
            candidates.append(copies)
            groups.append((ep, copies))
    return groups


def encode_copy(copy: Copy) -> str:
    """A copy as text, to forward it to the hub collecting its uplink."""
    msg = copy.msg
    sub = subpackets_json(msg.subpackets)
    return json.dumps([
        f"{msg.epEui:016x}", msg.packetCnt, copy.bs_eui, copy.received, msg.rxTime, msg.rxDuration, msg.snr,
        msg.rssi, msg.eqSnr, msg.profile, msg.mode, None if sub is None else json.dumps(sub), msg.userData.hex(),
        msg.format or 0, int(msg.dlOpen), int(msg.responseExp), int(msg.dlAck),
    ])  # fmt: skip


def decode_copy(text: str) -> Copy:
    row = json.loads(text)
    row[12] = bytes.fromhex(row[12])
    return _copy_from_row((0, *row))[1]


class UplinkPipeline:
    """store → dedup → publish → mark published, for every ulData copy.

    1. `store` validates a copy and queues it for the next group commit; the session answers
       ulDataRsp when that Deferred fires (nothing is acknowledged before it is durable).
    2. `_stored` hands the committed copy to the deduplicator (an event never names an
       uncommitted copy); a late copy of a published uplink is only marked. A window that closes
       while a copy received inside it is still being committed waits for it (`Committing`).
    3. `publish` (the deduplicator's emit, once a window closes) updates the sensor's hot state
       and downlink routing, and publishes one `uplink` event.
    4. `_published` marks the copies published once the bus took the event durably; copies left
       unmarked are published again by `replay` at the next start.

    `annotate(ep, payload)`, if given, adds to the payload before it is published (decoded values).
    `on_uplink(ep, packetCnt, payload)` sees every uplink that acknowledges a downlink (dlAck)
    or opens a downlink window (dlOpen) for an end point in `waiting` (with queued downlinks).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: Registry,
        bus: EventBus,
        counters: Counters,
        window: float,
        memory: int,
        on_uplink: Callable[[str, int, dict[str, Any]], None],
        waiting: Container[str] = frozenset(),
        make_dedup: Callable[..., IDedupStore] | None = None,
        annotate: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.clock = clock
        self.registry = registry
        self.bus = bus
        self.counters = counters
        self.on_uplink = on_uplink
        self.waiting = waiting
        self.annotate = annotate
        self.memory = memory
        self.committing = Committing(window, self._emit)
        # The cluster's shared store if there is one, else this hub's own in memory (no extra work per copy).
        self.clustered = make_dedup is not None
        self.window = window
        self.dedup: IDedupStore = (
            Deduplicator(clock, window, memory, self.publish) if make_dedup is None
            else make_dedup(clock, window, memory, self.publish, late=self._late, codec=(encode_copy, decode_copy))
        )
        self._unconfirmed: set[defer.Deferred[Any]] = set()
        self._publish_notes = 0

    # 1. store

    def store(self, bs: str, msg: m.UlData) -> defer.Deferred[None]:
        """Validate one copy heard by base station `bs` and queue it for the group commit;
        fires once committed (then it is acknowledged). Raises Refused for a copy the database
        could not hold: one bad row would fail every other row of its batch."""
        if msg.packetCnt > _I64_MAX or msg.rxTime > _I64_MAX or (msg.rxDuration or 0) > _I64_MAX:
            raise Refused(EINVAL, "ulData: packetCnt, rxTime and rxDuration must be below 2**63")
        if (msg.format or 0) > _I64_MAX:
            raise Refused(EINVAL, "ulData: field 'format' must be below 2**63")
        snr, rssi, eq_snr = msg.snr, msg.rssi, msg.eqSnr
        if not (math.isfinite(snr) and math.isfinite(rssi) and (eq_snr is None or math.isfinite(eq_snr))):
            raise Refused(EINVAL, "ulData: snr, rssi and eqSnr must be finite numbers")
        _check_text("profile", msg.profile)
        _check_text("mode", msg.mode)
        sub = msg.subpackets
        sub_json = None
        if sub is not None:
            if not all(map(math.isfinite, chain(sub.snr, sub.rssi, sub.frequency, sub.phase or ()))):
                raise Refused(EINVAL, "ulData: subpackets must hold finite numbers")
            sub_json = json.dumps(subpackets_json(sub))
        ep = f"{msg.epEui:016x}"
        now = self.clock.seconds()
        self.dedup.sweep_due(now)
        self.counters.copies += 1
        stored = self.registry.add_uplink(
            (ep, msg.packetCnt, bs, now, msg.rxTime, msg.rxDuration, snr, rssi, eq_snr, msg.profile, msg.mode,
             sub_json, msg.userData, msg.format or 0, int(msg.dlOpen), int(msg.responseExp), int(msg.dlAck))
        )  # fmt: skip
        copy = Copy(bs, now, msg)
        self.committing.receiving((ep, msg.packetCnt), copy)
        stored.addCallbacks(self._stored, self._store_failed, callbackArgs=(ep, copy), errbackArgs=(ep, copy))
        return stored

    def _store_failed(self, failure: Failure, ep: str, copy: Copy) -> Failure:
        self.counters.store_failures += 1
        self.committing.failed((ep, copy.msg.packetCnt), copy)
        return failure

    # 2. dedup

    def _stored(self, _: object, ep: str, copy: Copy) -> None:
        key = (ep, copy.msg.packetCnt)
        if self.committing.committed(key, copy):
            self.counters.merged += 1  # into a window held for it
            return
        outcome = self.dedup.add(key, copy)
        if outcome == MERGED:
            self.counters.merged += 1
        elif outcome == LATE:
            self.counters.late += 1
            self.registry.mark_published(ep, copy.msg.packetCnt)

    def _late(self, key: tuple[str, int], copy: Copy) -> None:
        """A copy the cluster found late (its uplink published by another hub)."""
        self.counters.late += 1
        self.registry.mark_published(*key)

    # 3. publish

    def publish(self, key: tuple[str, int], copies: list[Copy], first: float, replay: bool = False) -> None:
        if replay:
            self._emit(key, copies, first, replay)
        else:
            self.committing.emit(key, copies, first)

    def _emit(self, key: tuple[str, int], copies: list[Copy], first: float, replay: bool = False) -> None:
        ep, packet_cnt = key
        payload = uplink_payload(ep, copies, first)
        if not replay:
            self.counters.latency.observe(self.clock.seconds() - first)
        self.counters.uplinks += 1
        sensor = self.registry.sensors.get(ep)
        if sensor is not None and (sensor.last_seen is None or first >= sensor.last_seen):
            receivers = payload["receivers"]
            sensor.last_seen, sensor.last_packet_cnt = first, packet_cnt
            sensor.best_bs, sensor.best_snr = receivers[0]["bsEui"], receivers[0]["snr"]
            sensor.paths = tuple(r["bsEui"] for r in receivers)
            sensor.warned = False
            self.registry.dirty(ep)
        if self.annotate is not None:
            self.annotate(ep, payload)  # blueprint-decoded values next to the raw data
        if payload["dlAck"] or (payload["dlOpen"] and ep in self.waiting):
            self.on_uplink(ep, packet_cnt, payload)
        d = self.bus.publish(Event("mioty", "uplink", f"mioty/ep/{ep}/up", payload))
        if not d.called:
            self._unconfirmed.add(d)
            d.addBoth(untrack, d, self._unconfirmed)
        d.addCallbacks(self._published, self._publish_failed, callbackArgs=(ep, packet_cnt),
                       errbackArgs=(ep, packet_cnt))

    # 4. mark published

    def _published(self, _: object, ep: str, packet_cnt: int) -> None:
        self.registry.mark_published(ep, packet_cnt)

    def _publish_failed(self, failure: Failure, ep: str, packet_cnt: int) -> None:
        # Not marked: the uplink is stored and published again at the next start.
        self.counters.publish_failures += 1
        self._publish_notes += 1
        if self._publish_notes <= 10 or self._publish_notes & (self._publish_notes - 1) == 0:
            self.log.warn("the bus did not take uplink {epEui}/{packetCnt} ({count} so far): {problem}", epEui=ep,
                          packetCnt=packet_cnt, count=self._publish_notes, problem=failure.getErrorMessage())

    # start and stop

    async def load(self) -> None:
        """At start: remember recent keys (late copies of uplinks published before the restart
        are still dropped), then publish what was stored but not published before the last stop."""
        registry = self.registry
        for ep, pc, rx_time in reversed(await registry.recent_keys(self.memory)):
            self.dedup.remember((ep, pc), rx_time)
        if self.clustered:
            return  # other hubs may be collecting those copies now: adopt_orphans takes them when due
        rows = await registry.unpublished()
        groups = group_copies(rows)
        for ep, copies in groups:
            self.publish((ep, copies[0].msg.packetCnt), copies, min(c.received for c in copies), replay=True)
        if groups:
            self.counters.replayed += len(groups)
            self.log.info("published {count} uplinks ({copies} copies) stored before the last stop",
                          count=len(groups), copies=len(rows))

    async def adopt_orphans(self, grace: float = ORPHAN_GRACE) -> int:
        """Cluster: publish the copies stored by any hub and left unpublished longer than the window
        and `grace` whose collecting hub is gone (while it runs, its mark may just lag); one hub takes each."""
        rows = await self.registry.unpublished(before=self.clock.seconds() - self.window - grace)
        adopted = 0
        for ep, copies in group_copies(rows):
            key = (ep, copies[0].msg.packetCnt)
            if await self.dedup.adopt(key):
                self.publish(key, copies, min(c.received for c in copies), replay=True)
                adopted += 1
        if adopted:
            self.counters.replayed += adopted
            self.log.info("published {count} uplinks another hub stored and did not publish", count=adopted)
        return adopted

    async def drain(self, wait: float) -> None:
        """Publish every open window now, then wait up to `wait` seconds for the bus to confirm
        them: confirmed now means not published twice after the restart."""
        self.dedup.flush()
        self.committing.flush()
        deadline = self.clock.seconds() + wait
        while self._unconfirmed and self.clock.seconds() < deadline:
            await task.deferLater(self.clock, 0.01, lambda: None)
        if self._unconfirmed:
            self.log.warn("{count} uplinks not confirmed by the bus; they are published again at the next start",
                          count=len(self._unconfirmed))
