"""Variable MAC (the BSSCI `vm.` sub-channel): MAC types activated per base station, vm.ulData stored, deduplicated
and published as meter readings (wireless M-Bus) or raw frames, and vm.dlData downlinks sent with a meter's next uplink.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from bsscihub.bus import Event
from bsscihub.errors import CommandError
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.dedup import (
    LATE,
    MERGED,
    SAME_UPLINK_SPREAD_NS,
    Committing,
    Copy,
    Deduplicator,
    subpackets_json,
)
from bsscihub.protocols.bssci.downlinks import hex_or_bytes
from bsscihub.protocols.bssci.meters import Meter, meter_key, parse_aes_key, registry_for
from bsscihub.protocols.bssci.registry import rfc3339
from bsscihub.protocols.bssci.session import (
    EINVAL,
    ENOSYS,
    OperationFailed,
    OperationTimedOut,
    Refused,
    Session,
    SessionClosed,
)
from bsscihub.protocols.bssci.uplinks import untrack
from bsscihub.protocols.wmbus import WMBusError, manufacturer_code, parse_telegram

if TYPE_CHECKING:
    from bsscihub.protocols.bssci.service import MiotyService

__all__ = ["MAX_FRAME", "VariableMac", "frame_meter", "reading_payload"]

MAX_FRAME = 512  # a wM-Bus frame is at most 256 bytes, plus CRCs
_MAX_DOWNLINK = 255
_I64_MAX = (1 << 63) - 1
_DEDUP_MEMORY = 20_000
_QUEUED_PER_METER = 8
_LATE_MEMORY = 120.0  # seconds of published frames remembered across a restart, to drop their late copies


def frame_meter(data: bytes) -> str | None:
    """The meter id ("dme-81795246") from a wM-Bus frame's link layer, without decoding the rest."""
    if len(data) < 10:
        return None
    return f"{manufacturer_code(data[2:4]).lower()}-{data[4:8][::-1].hex()}"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _receiver(copy: Copy) -> dict[str, Any]:
    msg: m.VmUlData = copy.msg  # type: ignore[assignment]
    return {
        "bsEui": copy.bs_eui, "snr": msg.snr, "rssi": msg.rssi, "eqSnr": msg.eqSnr, "sysTime": msg.sysTime,
        "trxTime": msg.trxTime, "freqOff": msg.freqOff, "carrSpace": msg.carrSpace, "pattGrp": msg.pattGrp,
        "pattNum": msg.pattNum, "subpackets": subpackets_json(msg.subpackets),
    }  # fmt: skip


def reading_payload(telegram: Any, mac_type: int, receivers: list[dict[str, Any]], received: float) -> dict[str, Any]:
    """The `mioty/meter/{meter}/reading` payload: the telegram (see Telegram.to_json), `time`, `macType`,
    `data` (the frame as received, hex) and `receivers`, best SNR first."""
    out = telegram.to_json()
    out["data"] = out.pop("frame")
    return {**out, "time": rfc3339(received), "macType": mac_type, "receivers": receivers}


@attrs.define
class _Downlink:
    id: int
    data: bytes
    queued: float
    actor: str


class VariableMac:
    """The Variable-MAC side of the mioty service (`service.vm`).

    Per base station, at `session_ready`: `vm.status`, then `vm.activate` for each configured MAC
    type that is not active and `vm.deactivate` for each active one that is not configured (a
    station without Variable MAC answers error 38: nothing more is asked). Every `vm.ulData` copy is
    stored before `vm.ulDataRsp` (`store`), copies of one frame heard by several stations are merged
    for `mioty.dedup_window` (key: MAC type and frame bytes), then published once; frames still
    unpublished at a stop are published at the next start.
    """

    log = Logger()

    def __init__(self, service: MiotyService) -> None:
        self.service = service
        self.hub = service.hub
        self.clock = service.clock
        self.mac_types: Mapping[int, str] = service.settings.vm_mac_types
        self.meters = registry_for(self.hub)
        # a copy received inside the window joins it however long its commit takes
        self.committing = Committing(service.settings.dedup_window, self._publish)
        self.dedup = Deduplicator(self.clock, service.settings.dedup_window, _DEDUP_MEMORY, self.committing.emit)
        self.active: dict[str, tuple[int, ...]] = {}
        """bsEui -> the MAC types active there after activation (absent: no Variable MAC)."""
        self.counters = {"frames": 0, "merged": 0, "late": 0, "published": 0, "undecoded": 0}
        self._ids: dict[tuple[str, int], list[int]] = {}
        self._downlinks: dict[str, list[_Downlink]] = {}
        self._work: set[defer.Deferred[Any]] = set()
        retention = service.settings.uplink_retention
        self._pruning = service.looping(self.prune, "pruning meter history")
        self._prune_every = min(3600.0, retention / 4)
        self.hub.metrics.register(_Metrics(self))

    # -- start and stop

    async def prepare(self) -> None:
        """Publish the frames stored (and acknowledged) but not published before the last stop."""
        self.meters.box.load()  # a key file that cannot be read or made stops the start, naming it
        # Late copies of frames published just before the restart must still be dropped.
        for mac_type, data, sys_time in await self.meters.recently_published(self.clock.seconds() - _LATE_MEMORY):
            self.dedup.remember((_digest(bytes(data)), int(mac_type)), int(sys_time))
        for dl_id, meter, data, queued, actor in await self.meters.queued_downlinks(self.clock.seconds()):
            self._downlinks.setdefault(meter, []).append(_Downlink(dl_id, data, queued, actor))
        rows = await self.meters.unpublished()
        groups: list[tuple[tuple[str, int], list[Copy], list[int]]] = []
        by_key: dict[tuple[str, int], list[tuple[list[Copy], list[int]]]] = {}
        for row in rows:
            frame_id, copy = _copy_from_row(row)
            msg: m.VmUlData = copy.msg  # type: ignore[assignment]
            key = (_digest(msg.userData), msg.macType)
            for copies, ids in by_key.setdefault(key, []):
                if abs(copies[0].msg.rxTime - msg.rxTime) <= SAME_UPLINK_SPREAD_NS:
                    copies.append(copy)
                    ids.append(frame_id)
                    break
            else:
                group: tuple[list[Copy], list[int]] = ([copy], [frame_id])
                by_key[key].append(group)
                groups.append((key, *group))
        for key, copies, ids in groups:
            self.dedup.remember(key, copies[0].msg.rxTime)
            await self._emit(key, copies, min(c.received for c in copies), ids)
        if groups:
            self.log.info("published {count} Variable-MAC frames stored before the last stop", count=len(groups))
        self._pruning.start(self._prune_every, now=False)

    async def prune(self) -> None:
        """Forget published frames and readings older than mioty.uplink_retention."""
        await self.meters.prune(self.clock.seconds() - self.service.settings.uplink_retention)

    async def drain(self) -> None:
        if self._pruning.running:
            self._pruning.stop()
        self.dedup.flush()
        self.committing.flush()
        while self._work:
            await defer.DeferredList(list(self._work), consumeErrors=True)

    # -- activation

    def session_ready(self, session: Session) -> None:
        self._track(defer.Deferred.fromCoroutine(self._activate(session)))

    async def _activate(self, session: Session) -> None:
        bs = session.bs_hex
        try:
            status = await session.request(lambda op: m.VmStatus(opId=op))
        except OperationFailed as e:
            if e.code == ENOSYS:
                self.log.info("base station {bsEui} has no Variable MAC (vm.status: error 38)", bsEui=bs)
            else:
                self.log.warn("base station {bsEui} refused vm.status: {problem}", bsEui=bs, problem=str(e))
            return
        except (OperationTimedOut, SessionClosed):
            return
        active = set(status.macTypes)
        for mac_type in sorted(set(self.mac_types) - active):
            done = await self._switch(session, m.VmActivate, mac_type)
            if done is None:
                return
            if done:
                active.add(mac_type)
        for mac_type in sorted(active - set(self.mac_types)):
            done = await self._switch(session, m.VmDeactivate, mac_type)
            if done is None:
                return
            if done:
                active.discard(mac_type)
        self.active[bs] = tuple(sorted(active))
        self.log.info("base station {bsEui}: Variable-MAC types active: {types}", bsEui=bs,
                      types=", ".join(map(str, sorted(active))) or "none")

    async def _switch(
        self, session: Session, cls: type[m.VmActivate] | type[m.VmDeactivate], mac_type: int
    ) -> bool | None:
        """Ask for vm.activate or vm.deactivate of one type: True when done, False when refused
        (logged), None when the session is gone."""
        try:
            await session.request(_maker(cls, mac_type))
        except OperationFailed as e:
            verb = "activate" if cls is m.VmActivate else "deactivate"
            self.log.warn("base station {bsEui} does not {verb} Variable-MAC type {macType}: {problem}",
                          bsEui=session.bs_hex, verb=verb, macType=mac_type, problem=e.message)
            return False
        except (OperationTimedOut, SessionClosed):
            return None
        return True

    def session_closed(self, session: Session) -> None:
        self.active.pop(session.bs_hex, None)

    # -- uplinks: store, dedup, publish

    def store(self, session: Session, msg: m.VmUlData) -> defer.Deferred[None]:
        """Validate one copy and store it; fires once committed (then vm.ulDataRsp goes out)."""
        numbers = (msg.snr, msg.rssi, msg.eqSnr, msg.freqOff)
        if not all(v is None or math.isfinite(v) for v in numbers):
            raise Refused(EINVAL, "vm.ulData: snr, rssi, eqSnr and freqOff must be finite numbers")
        if max(msg.sysTime, msg.trxTime or 0, msg.macType, msg.carrSpace or 0, msg.pattGrp or 0,
               msg.pattNum or 0) > _I64_MAX:
            raise Refused(EINVAL, "vm.ulData: macType, sysTime, trxTime, carrSpace, pattGrp and pattNum must be"
                          " below 2**63")
        if not msg.userData or len(msg.userData) > MAX_FRAME:
            raise Refused(EINVAL, f"vm.ulData: userData must hold 1 to {MAX_FRAME} bytes")
        sub = msg.subpackets
        if sub is not None and not all(map(math.isfinite, (*sub.snr, *sub.rssi, *sub.frequency, *(sub.phase or ())))):
            raise Refused(EINVAL, "vm.ulData: subpackets must hold finite numbers")
        bs = session.bs_hex
        now = self.clock.seconds()
        self.dedup.sweep_due(now)
        self.counters["frames"] += 1
        row = (bs, now, msg.macType, msg.userData, msg.sysTime, msg.trxTime, msg.freqOff, msg.snr, msg.rssi,
               msg.eqSnr, json.dumps(subpackets_json(sub)) if sub is not None else None, msg.carrSpace, msg.pattGrp,
               msg.pattNum, msg.crc)  # fmt: skip
        stored: defer.Deferred[Any] = self.meters.add_frame(row)
        copy = Copy(bs, now, msg)  # type: ignore[arg-type]
        key = (_digest(msg.userData), msg.macType)
        self.committing.receiving(key, copy)
        stored.addCallbacks(
            self._stored, self._store_failed, callbackArgs=(key, copy, session), errbackArgs=(key, copy)
        )
        return stored

    def _store_failed(self, failure: Failure, key: tuple[str, int], copy: Copy) -> Failure:
        self.committing.failed(key, copy)
        return failure

    def _stored(self, frame_id: int, key: tuple[str, int], copy: Copy, session: Session) -> None:
        msg: m.VmUlData = copy.msg  # type: ignore[assignment]
        self._ids.setdefault(key, []).append(frame_id)
        if self.committing.committed(key, copy):
            self.counters["merged"] += 1  # into a window held for it
            return
        outcome = self.dedup.add(key, copy)
        if outcome == MERGED:
            self.counters["merged"] += 1
        elif outcome == LATE:
            self.counters["late"] += 1
            self._ids.pop(key, None)
            self._track(self.meters.mark_published([frame_id]))
        elif self.mac_types.get(msg.macType) == "wmbus":
            self._send_downlink(session, msg)

    def _publish(self, key: tuple[str, int], copies: list[Copy], first: float) -> None:
        self._track(defer.Deferred.fromCoroutine(self._emit(key, copies, first, self._ids.pop(key, []))))

    async def _emit(self, key: tuple[str, int], copies: list[Copy], first: float, ids: list[int]) -> None:
        ordered = sorted(copies, key=lambda c: c.msg.snr, reverse=True)
        best: m.VmUlData = ordered[0].msg  # type: ignore[assignment]
        receivers = [_receiver(c) for c in ordered]
        kind = self.mac_types.get(best.macType, "raw")
        payload: dict[str, Any] | None = None
        error = f"Variable-MAC type {best.macType} is not decoded (mioty.vm_mac_types)"
        if kind == "wmbus":
            try:
                payload = await self._reading(best, receivers, first)
            except WMBusError as e:
                error = f"not a wireless M-Bus frame: {e}"
            except Exception:
                # Published raw all the same: a frame that trips a bug must not be lost or retried forever.
                self.log.failure("decoding a Variable-MAC frame from {bsEui} failed", bsEui=receivers[0]["bsEui"])
                error = "the hub could not decode this frame (an internal error, logged)"
        if payload is None:
            self.counters["undecoded"] += 1
            topic, event = f"mioty/vm/{best.macType}/up", "vm_uplink"
            payload = {"macType": best.macType, "data": best.userData.hex(), "error": error,
                       "time": rfc3339(first), "receivers": receivers}
        else:
            topic, event = f"mioty/meter/{payload['meter']}/reading", "meter_reading"
        await self.hub.bus.publish(Event("mioty", event, topic, payload))
        self.counters["published"] += 1
        if ids:
            await self.meters.mark_published(ids)

    async def _reading(self, msg: m.VmUlData, receivers: list[dict[str, Any]], first: float) -> dict[str, Any]:
        telegram = parse_telegram(msg.userData)
        meter = await self.meters.get(telegram.key)
        registered = meter is None
        if meter is None:
            meter = Meter(id=telegram.key, manufacturer=telegram.manufacturer, meter_id=telegram.meter_id,
                          created_at=self.clock.seconds())
        if telegram.encrypted and meter.key_box is not None:
            key = self.meters.key_of(meter)
            if key is None:
                telegram = attrs.evolve(telegram, error="the stored key of this meter does not open with this hub's"
                                        " secret (meter-keys.secret); set the key again")
            else:
                telegram = parse_telegram(msg.userData, key)
        payload = reading_payload(telegram, msg.macType, receivers, first)
        if meter.last_seen is None or first >= meter.last_seen:
            meter.version, meter.device_type = telegram.version, telegram.device_type
            meter.first_seen = meter.first_seen if meter.first_seen is not None else first
            meter.last_seen, meter.best_bs = first, receivers[0]["bsEui"]
            meter.best_rssi, meter.best_snr = receivers[0]["rssi"], receivers[0]["snr"]
            meter.last_reading = {k: payload[k] for k in ("time", "values", "records", "alarms", "error", "encrypted",
                                                           "decrypted", "securityMode", "accessNumber")}
        await self.meters.save(meter)
        await self.meters.add_reading(meter.id, first, payload)
        if registered:
            self.log.info("new meter {meter} ({medium}) heard through base station {bsEui}", meter=meter.id,
                          medium=telegram.medium, bsEui=receivers[0]["bsEui"])
            self.service._event("registered", f"mioty/meter/{meter.id}/event/registered", {
                "meter": meter.id, "manufacturer": meter.manufacturer, "meterId": meter.meter_id,
                "medium": telegram.medium, "bsEui": receivers[0]["bsEui"], "time": rfc3339(first)})  # fmt: skip
        return payload

    # -- downlinks

    async def queue_downlink(self, meter: str, data: Any, *, actor: str = "system") -> dict[str, Any]:
        """Queue a frame for the meter: it goes out as vm.dlData through the base station that hears the
        meter's next uplink, timed against that uplink; the outcome comes as a dl_result event."""
        found = await self._known(meter)
        data = hex_or_bytes(data)
        if not isinstance(data, bytes) or not 1 <= len(data) <= _MAX_DOWNLINK:
            raise CommandError(f"data must be 1 to {_MAX_DOWNLINK} bytes")
        queue = self._downlinks.setdefault(found.id, [])
        if len(queue) >= _QUEUED_PER_METER:
            raise CommandError(f"meter {found.id} has {len(queue)} downlinks waiting already")
        now = self.clock.seconds()
        entry = _Downlink(await self.meters.add_downlink(found.id, data, now, actor), data, now, actor)
        queue.append(entry)
        return {"meter": found.id, "dlId": entry.id, "status": "queued", "waiting": len(queue)}

    async def downlinks(self, meter: str) -> dict[str, Any]:
        """The meter's downlinks, newest first: {"items": [{dlId, data, queued, actor, status (queued, sending,
        sent, refused, unconfirmed), bsEui, error, updated}]}."""
        found = await self._known(meter)
        return {"items": await self.meters.downlinks(found.id)}

    def pending_downlinks(self, meter: str) -> list[dict[str, Any]]:
        return [{"dlId": d.id, "data": d.data.hex(), "queued": rfc3339(d.queued), "actor": d.actor}
                for d in self._downlinks.get(meter, ())]

    def _send_downlink(self, session: Session, msg: m.VmUlData) -> None:
        meter = frame_meter(msg.userData)
        queue = self._downlinks.get(meter or "")
        if not queue or meter is None:
            return
        entry = queue.pop(0)
        if not queue:
            del self._downlinks[meter]
        dl = m.VmDlData(opId=0, macType=msg.macType, userData=entry.data, trxTime=msg.trxTime, sysTime=msg.sysTime,
                        freqOff=msg.freqOff, ulSnr=msg.snr, ulRssi=msg.rssi, carrSpace=msg.carrSpace, ulCrc=msg.crc)
        self._track(defer.Deferred.fromCoroutine(self._deliver(session, meter, entry, dl)))

    async def _deliver(self, session: Session, meter: str, entry: _Downlink, dl: m.VmDlData) -> None:
        bs = session.bs_hex
        # Sent at once (the station times it against the uplink); the state is written alongside, in order.
        sending = self.meters.update_downlink(entry.id, "sending", self.clock.seconds(), bs)
        result, error = "sent", None
        try:
            await session.request(lambda op: attrs.evolve(dl, opId=op))
        except (OperationFailed, OperationTimedOut, SessionClosed) as e:
            result, error = "refused", str(e)
        await sending
        await self.meters.update_downlink(entry.id, result, self.clock.seconds(), bs, error)
        self.service._event("dl_result", f"mioty/meter/{meter}/event/dl_result", {
            "meter": meter, "dlId": entry.id, "bsEui": bs, "result": result, "error": error,
            "time": rfc3339(self.clock.seconds())})  # fmt: skip

    # -- meters (REST, MQTT, command line go through these)

    async def _known(self, meter: str) -> Meter:
        from bsscihub.protocols.bssci.actions import UnknownDevice

        found = await self.meters.get(meter_key(meter))
        if found is None:
            raise UnknownDevice(f"unknown meter {meter_key(meter)}")
        return found

    async def list_meters(self, filter: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """{"items": [meter as in get_meter], "total", "limit", "offset"}; `filter`: part of the id or name."""
        items, total = await self.meters.find(filter or "", max(0, limit), max(0, offset))
        return {"items": [x.to_json() for x in items], "total": total, "limit": limit, "offset": offset}

    async def get_meter(self, meter: str) -> dict[str, Any] | None:
        """meter, manufacturer, meterId, version, deviceType, medium, name, hasKey, firstSeen, lastSeen,
        bestBs, bestRssi, bestSnr, createdAt, lastReading, pendingDownlinks. Never the key."""
        found = await self.meters.get(meter_key(meter))
        if found is None:
            return None
        return {**found.to_json(), "pendingDownlinks": self.pending_downlinks(found.id)}

    async def set_meter_key(self, meter: str, key: Any, *, name: str | None = None) -> dict[str, Any]:
        """Set the meter's AES key (32 hex digits), or clear it with None; registers an unknown meter."""
        ident = meter_key(meter)
        raw = None if key is None else parse_aes_key(key)
        found = await self.meters.set_key(ident, raw, self.clock.seconds(), name)
        self.log.info("key of meter {meter} {what}", meter=ident, what="set" if raw is not None else "cleared")
        return found.to_json()

    async def remove_meter(self, meter: str) -> bool:
        return await self.meters.delete(meter_key(meter))

    async def readings(self, meter: str, limit: int = 100, before: float | None = None) -> dict[str, Any]:
        """The meter's readings, newest first: {"items": [reading payload]}."""
        found = await self._known(meter)
        return {"items": await self.meters.readings(found.id, max(1, min(int(limit), 1000)), before)}

    async def command(self, meter: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/mioty/meter/{meter}/cmd/down` with {"data": hex}."""
        if name != "down":
            raise CommandError(f"unknown meter command {name!r} (known: down)")
        if not isinstance(payload, Mapping):
            raise CommandError("the payload must be a JSON object")
        unknown = sorted(set(payload) - {"data"})
        if "data" not in payload or unknown:
            raise CommandError("a meter downlink takes exactly one field, data (hex)")
        if not isinstance(payload["data"], str):
            raise CommandError("data must be a string of hexadecimal digits")
        result = await self.queue_downlink(meter, payload["data"], actor="mqtt")
        await self.service._audit("mqtt", "mioty.meter.downlink", result["meter"],
                                  {"dlId": result["dlId"], "bytes": len(payload["data"]) // 2}, "mqtt")
        return result

    def _track(self, d: defer.Deferred[Any]) -> None:
        d.addErrback(lambda f: self.log.failure("Variable MAC: {problem}", f, problem=f.getErrorMessage()))
        if not d.called:
            self._work.add(d)
            d.addBoth(untrack, d, self._work)


class _Metrics:
    """The Variable-MAC counters for Prometheus, read at scrape time."""

    def __init__(self, vm: VariableMac) -> None:
        self._vm = vm

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self._vm.counters
        p = "bsscihub_mioty_vm_"
        yield CounterMetricFamily(p + "frames", "vm.ulData copies stored (each acknowledged after commit)",
                                  value=c["frames"])
        yield CounterMetricFamily(p + "duplicate_frames", "copies merged into a frame inside its dedup window",
                                  value=c["merged"])
        yield CounterMetricFamily(p + "late_frames", "copies arriving after their frame was published: dropped",
                                  value=c["late"])
        yield CounterMetricFamily(p + "published", "frames published (meter readings and raw frames)",
                                  value=c["published"])
        yield CounterMetricFamily(p + "undecoded", "frames published raw: not wireless M-Bus or a raw MAC type",
                                  value=c["undecoded"])
        yield GaugeMetricFamily(p + "base_stations", "connected base stations with Variable MAC active",
                                value=len(self._vm.active))


def _maker(cls: type[m.VmActivate] | type[m.VmDeactivate], mac_type: int) -> Callable[[int], m.Message]:
    return lambda op: cls(opId=op, macType=mac_type)


def _copy_from_row(row: Iterable[Any]) -> tuple[int, Copy]:
    (frame_id, bs, received, mac_type, data, sys_time, trx_time, freq_off, snr, rssi, eq_snr, sub, carr_space,
     patt_grp, patt_num, crc) = row  # fmt: skip
    subpackets = m.Subpackets.from_lists(json.loads(sub)) if sub else None
    msg = m.VmUlData(opId=0, macType=int(mac_type), userData=bytes(data), sysTime=int(sys_time),
                     trxTime=None if trx_time is None else int(trx_time), freqOff=freq_off, snr=float(snr),
                     rssi=float(rssi), eqSnr=eq_snr, subpackets=subpackets, carrSpace=carr_space, pattGrp=patt_grp,
                     pattNum=patt_num, crc=None if crc is None else bytes(crc))
    return int(frame_id), Copy(bs, float(received), msg)  # type: ignore[arg-type]

