"""The mioty family's actions and queries for the REST and MQTT layers (attach, downlinks, revocation ...).
Mixed into MiotyService; each validates its input at the edge and raises CommandError with a one-line reason."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bsscihub.contract import eui64
from bsscihub.errors import CommandError
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.dedup import uplink_payload
from bsscihub.protocols.bssci.downlinks import Downlink, Downlinks, DownlinkState, hex_or_bytes
from bsscihub.protocols.bssci.registry import BaseStation, ImportCounts, Registry, Sensor, attach_change, rfc3339
from bsscihub.protocols.bssci.session import OperationFailed, OperationTimedOut, Session, SessionClosed, State
from bsscihub.protocols.bssci.uplinks import group_copies

if TYPE_CHECKING:
    from bsscihub.cluster import Cluster
    from bsscihub.protocols.bssci.blueprints import BlueprintBook

__all__ = ["MiotyActions", "UnknownDevice"]

_MAX_DOWNLINK = 1024


def _outcome(dl: Downlink) -> dict[str, Any]:
    """What queueing a downlink answers, wherever it was dispatched."""
    holder = [dl.holder.bs_hex] if dl.holder is not None else []
    return {"queId": dl.que_id, "status": dl.state.value, "baseStations": holder, "error": dl.error}


class UnknownDevice(CommandError):
    """No such end point or base station (the REST layer answers 404)."""


def _eui(value: Any, what: str = "EUI") -> str:
    """16 lower-case hex digits from a hex string (any case) or an integer."""
    eui = eui64(value)
    if eui is not None:
        return eui
    raise CommandError(f"bad {what} {value!r}: expected 16 hexadecimal digits")


def _nw_key(value: Any) -> bytes:
    # The key itself never goes into an error message.
    if isinstance(value, bytes) and len(value) == 16:
        return value
    if isinstance(value, str) and len(value) == 32 and value.isascii():
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise CommandError("nwKey must be 32 hexadecimal digits (the AES-128 network key)")


def _short_addr(value: Any) -> int:
    if type(value) is int and 0 <= value <= 0xFFFF:
        return value
    if isinstance(value, str) and len(value) == 4 and value.isascii():
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise CommandError(f"shortAddr must be 4 hexadecimal digits, got {value!r}")


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise CommandError(f"{name} must be true or false, got {value!r}")
    return value


def _fields(payload: Mapping[str, Any], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    required, optional = tuple(required), tuple(optional)
    missing = [k for k in required if k not in payload]
    if missing:
        raise CommandError(f"missing field {missing[0]!r}")
    unknown = sorted(set(payload) - set(required) - set(optional))
    if unknown:
        known = ", ".join(chain(required, optional)) or "none"
        raise CommandError(f"unknown field {unknown[0]!r} (known: {known})")



class MiotyActions:
    """What the REST and MQTT layers call on `hub.services["mioty"]` (see MiotyService)."""

    if TYPE_CHECKING:  # provided by MiotyService, the class this is mixed into
        log: Logger
        clock: IReactorTime
        registry: Registry
        sessions: dict[str, Session]
        downlink_queue: Downlinks
        cluster: Cluster
        blueprints: BlueprintBook

        def _propagate(self, attach: bool, ep: str, exclude: Session | None = None) -> list[str]: ...
        def _background(self, work: Any, what: str) -> None: ...
        remote_waiting: dict[str, str]
        def _ep_event(self, ep: str, kind: str, fields: Mapping[str, Any]) -> Any: ...
        def _established(self) -> list[Session]: ...
        def _announce_change(self, sensor: Sensor, old: Sensor | None, source: str) -> list[str]: ...
        async def _save_attached(self, eui: str, attached: bool) -> Sensor: ...
        async def _audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any],
                         source: str) -> None: ...

    async def attach(
        self,
        ep_eui: str,
        nw_key: str | bytes,
        short_addr: str | int,
        bidi: bool,
        *,
        actor: str = "system",
        source: str = "api",
    ) -> dict[str, Any]:
        """Register the end point (or change it) and attach it: attPrp to every connected base
        station. `nw_key`: 32 hex digits or 16 bytes; `short_addr`: 4 hex digits or an int.
        Returns {"epEui", "attached": true, "baseStations": [bsEui the attPrp was queued on]}."""
        eui, key, addr = _eui(ep_eui, "end point EUI"), _nw_key(nw_key), _short_addr(short_addr)
        bidi = _bool(bidi, "bidi")
        _, changed = await self.registry.save_sensors(
            {eui: attach_change(eui, key, addr, bidi, self.clock.seconds())}
        )
        sensor = self.registry.sensors[eui]
        # Attaching again re-propagates even if nothing changed: the operator asked for it.
        targets = await self._propagate_everywhere(True, eui)
        self._ep_event(eui, "attach", {"source": source, "shortAddr": f"{sensor.short_addr:04x}", "bidi": bidi})
        self.log.info("end point {epEui} attached by {actor}; attPrp to {count} base stations", epEui=eui,
                      actor=actor, count=len(targets))
        return {"epEui": eui, "attached": True, "changed": bool(changed), "baseStations": targets}

    async def detach(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        """Detach the end point: detPrp to every connected base station (it stays registered).
        Returns {"epEui", "attached": false, "baseStations": [...]}."""
        eui = self._known_sensor(ep_eui).eui
        await self._save_attached(eui, False)
        targets = await self._propagate_everywhere(False, eui)
        self._ep_event(eui, "detach", {"source": source})
        self.log.info("end point {epEui} detached by {actor}", epEui=eui, actor=actor)
        return {"epEui": eui, "attached": False, "baseStations": targets}

    async def remove_sensor(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        """Detach the end point and delete it from the registry (its uplink history stays)."""
        sensor = self._known_sensor(ep_eui)
        await self.registry.delete_sensor(sensor.eui)
        targets = await self._propagate_everywhere(False, sensor.eui)
        self._ep_event(sensor.eui, "detach", {"source": source, "removed": True})
        self.log.info("end point {epEui} removed by {actor}", epEui=sensor.eui, actor=actor)
        return {"epEui": sensor.eui, "removed": True, "baseStations": targets}

    async def import_sensors(self, entries: Iterable[tuple[str, bytes, int, bool]], *,
                             source: str = "import") -> ImportCounts:
        """Register and attach (eui, nwKey, shortAddr, bidi) entries, validated beforehand;
        changed ones are propagated at once. Used by endpoints.import_endpoints."""
        now = self.clock.seconds()
        changes = {eui: attach_change(eui, key, addr, bidi, now) for eui, key, addr, bidi in entries}
        counts, changed = await self.registry.save_sensors(changes)
        for new, stored in changed:
            self._announce_change(new, stored, source)
        return counts

    async def queue_downlink(
        self,
        ep_eui: str,
        data: bytes | str,
        *,
        format: int | None = None,
        prio: float | None = None,
        response_exp: bool | None = None,
        actor: str = "system",
    ) -> dict[str, Any]:
        """Queue a downlink for the end point. It goes (dlDataQue) to the end point's serving base
        station, the best bidirectional receiver of its last uplink; if that station is connected
        this waits for its dlDataQueRsp, otherwise the downlink waits for the station or for the
        end point's next dlOpen uplink. Every change of its state is a `downlink` event; the
        station's report comes as a dl_result event. Returns {"epEui", "queId", "status" (queued,
        dispatched or accepted), "baseStations" (the station holding it, if any)}."""
        sensor = self._known_sensor(ep_eui)
        data = hex_or_bytes(data)
        if not isinstance(data, bytes) or len(data) > _MAX_DOWNLINK:
            raise CommandError(f"data must be at most {_MAX_DOWNLINK} bytes")
        if format is not None and (type(format) is not int or not 0 <= format <= 255):
            raise CommandError(f"format must be an integer 0..255, got {format!r}")
        if prio is not None and (type(prio) not in (int, float) or not math.isfinite(prio) or prio < 0):
            raise CommandError(f"prio must be a non-negative number, got {prio!r}")
        if response_exp is not None:
            _bool(response_exp, "responseExp")
        if not sensor.attached:
            raise CommandError(f"end point {sensor.eui} is detached")
        if not sensor.bidi:
            raise CommandError(f"end point {sensor.eui} is not bidirectional (bidi is false)")
        serving = await self._serving_anywhere(sensor)
        owner = self.cluster.ownership.owner("mioty", serving) if serving is not None else None
        if owner is None or owner == self.cluster.node:
            dl = await self.downlink_queue.add(sensor.eui, data, format, prio, response_exp, actor)
            outcome = _outcome(dl)
        else:
            # Its serving station is on another hub: that hub keeps it and dispatches it.
            dl = await self.downlink_queue.add(sensor.eui, data, format, prio, response_exp, actor, keep=False)
            args = {"queIds": [dl.que_id], "from": self.cluster.node}
            assert serving is not None
            try:
                [outcome] = await self.cluster.router.route("mioty", serving, "dl_take", args)
            except CommandError as e:
                self.log.warn("downlink {queId}: hub {node} did not take it ({problem}); kept here", queId=dl.que_id,
                              node=owner, problem=str(e))
                [outcome] = await self._take_here(args)
        if outcome["status"] == DownlinkState.REJECTED.value:
            raise CommandError(f"downlink {dl.que_id} not queued: {outcome['error']}")
        self.log.info("downlink {queId} for {epEui} ({size} bytes) by {actor}: {state} {bsEuis}", queId=dl.que_id,
                      epEui=sensor.eui, size=len(data), actor=actor, state=outcome["status"],
                      bsEuis=",".join(outcome["baseStations"]))
        return {"epEui": sensor.eui, "queId": dl.que_id, "status": outcome["status"],
                "baseStations": outcome["baseStations"]}

    def _rx_status_targets(self, sensor: Sensor) -> list[Session]:
        for bs in sensor.paths or ((sensor.best_bs,) if sensor.best_bs else ()):
            session = self.sessions.get(bs)
            if session is not None and session.state is State.ESTABLISHED and session.bidi:
                return [session]
        return [s for s in self._established() if s.bidi]

    async def revoke_downlink(self, ep_eui: str, que_id: int, *, actor: str = "system") -> dict[str, Any]:
        """Withdraw a pending downlink (dlDataRev to the base station holding it, if any)."""
        sensor = self._known_sensor(ep_eui)
        dl = self.downlink_queue.pending.get(que_id) if type(que_id) is int else None
        if dl is None and type(que_id) is int and self.cluster.clustered:
            found = await self.registry.pending_downlinks([que_id])
            row = found[0] if found else None
            keeper = row[10] if row is not None and row[1] == sensor.eui else None
            if keeper is not None and keeper != self.cluster.node and await self.cluster.router.alive(keeper):
                args = {"epEui": sensor.eui, "queId": que_id, "actor": actor}
                result: dict[str, Any] = await self.cluster.router.call(keeper, "mioty", "dl_revoke", args)
                return result
            if row is not None and row[1] == sensor.eui:
                await self.downlink_queue.take([row], f"revoked by {actor} on hub {self.cluster.node}")
                dl = self.downlink_queue.pending.get(que_id)
        return await self._revoke_here(sensor.eui, que_id, dl, actor)

    async def _revoke_here(self, ep: str, que_id: Any, dl: Downlink | None, actor: str) -> dict[str, Any]:
        if dl is None or dl.ep_eui != ep:
            raise CommandError(f"no pending downlink {que_id!r} for end point {ep}")
        problems = await self.downlink_queue.revoke(dl, actor)
        self.log.info("downlink {queId} for {epEui} revoked by {actor}", queId=que_id, epEui=ep, actor=actor)
        return {"epEui": ep, "queId": que_id, "status": "revoked", "problems": problems}

    async def query_dl_rx_status(self, ep_eui: str) -> dict[str, Any]:
        """Ask the base stations on the end point's path for its downlink reception status
        (dlRxStatQry); the answers arrive as dl_rx_status events."""
        sensor = self._known_sensor(ep_eui)
        serving = await self._serving_anywhere(sensor) if self.cluster.clustered else None
        owner = self.cluster.ownership.owner("mioty", serving) if serving is not None else None
        if serving is not None and owner is not None and owner != self.cluster.node:
            # The end point's serving station is on another hub: that hub asks it.
            asked: list[str] = await self.cluster.router.route("mioty", serving, "dl_rx_status", sensor.eui)
            if asked:
                return {"epEui": sensor.eui, "baseStations": asked}
        targets = self._rx_status_targets(sensor)
        results = await defer.DeferredList(
            [s.request(lambda op: m.DlRxStatQry(opId=op, epEui=int(sensor.eui, 16))) for s in targets],
            consumeErrors=True,
        )
        asked = [s.bs_hex for s, (ok, _) in zip(targets, results, strict=True) if ok]
        return {"epEui": sensor.eui, "baseStations": asked}

    async def poll_status(self, bs_eui: str) -> dict[str, Any]:
        """Poll a connected base station's status now; returns the `mioty/bs/{bsEui}/status` payload.
        Runs on the hub that holds the station's connection."""
        eui = _eui(bs_eui, "base-station EUI")
        result: dict[str, Any] = await self.cluster.router.route("mioty", eui, "poll_status", None)
        return result

    async def _poll_status_here(self, eui: str) -> dict[str, Any]:
        session = self.sessions.get(eui)
        if session is None or session.state is not State.ESTABLISHED:
            if eui not in self.registry.base_stations:
                raise UnknownDevice(f"unknown base station {eui}")
            raise CommandError(f"base station {eui} is not connected")
        try:
            await session.poll_status()
        except (OperationFailed, OperationTimedOut, SessionClosed) as e:
            raise CommandError(str(e)) from None
        bs = self.registry.base_stations[eui]
        return {"bsEui": eui, **(bs.last_status or {})}

    async def _close_here(self, eui: str, reason: str) -> None:
        session = self.sessions.get(eui)
        if session is not None:
            session.close(reason)

    async def station_command(self, station: str, name: str, args: Any) -> Any:
        """A station-bound command routed to this hub (it holds `station`'s connection)."""
        if name == "poll_status":
            return await self._poll_status_here(station)
        if name == "close":
            return await self._close_here(station, args)
        if name == "dl_take":
            return await self._take_here(args)
        if name == "dl_revoke":
            ep, que_id = args["epEui"], args["queId"]
            return await self._revoke_here(ep, que_id, self.downlink_queue.pending.get(que_id), args["actor"])
        if name == "dl_rx_status":
            session = self.sessions.get(station)
            if session is None or session.state is not State.ESTABLISHED or not session.bidi:
                return []
            await session.request(lambda op: m.DlRxStatQry(opId=op, epEui=int(args, 16)))
            return [station]
        if name == "dl_waiting":
            if args["waiting"]:
                self.remote_waiting[args["epEui"]] = args["node"]
            elif self.remote_waiting.get(args["epEui"]) == args["node"]:
                del self.remote_waiting[args["epEui"]]
            return None
        if name == "dl_waiting_list":
            return {"node": self.cluster.node, "eps": sorted(self.downlink_queue.waiting)}
        if name == "dl_open":
            return await self._dl_open_here(args)
        if name == "dl_serving":
            known = self.registry.sensors.get(args)
            return [self.downlink_queue.serving(args), known.last_seen] if known is not None else [None, None]
        if name == "propagate":
            # Another hub changed the end point: its configuration from the database, then this hub's stations.
            await self.registry.reload_sensor(args["epEui"])
            return self._propagate(args["attach"], args["epEui"])
        raise CommandError(f"unknown station command {name!r}")

    # -- the cluster: attach, detach and downlinks reach every hub's stations

    async def _propagate_everywhere(self, attach: bool, ep: str) -> list[str]:
        """attPrp/detPrp of one end point to the connected stations of this hub and of every other one."""
        targets = self._propagate(attach, ep)
        if self.cluster.clustered:
            for elsewhere in await self.cluster.router.broadcast("mioty", "propagate", {"attach": attach, "epEui": ep}):
                targets.extend(elsewhere)
        return sorted(targets)

    def _propagate_elsewhere(self, attach: bool, ep: str) -> None:
        """attPrp/detPrp on the other hubs' stations, not waited for (an over-the-air attach or detach)."""
        if self.cluster.clustered:
            self._background(self.cluster.router.broadcast("mioty", "propagate", {"attach": attach, "epEui": ep}),
                             f"propagating end point {ep} on the other hubs")

    async def _serving_anywhere(self, sensor: Sensor) -> str | None:
        """The end point's serving station as the hub that heard its last uplink knows it."""
        serving = self.downlink_queue.serving(sensor.eui)
        if not self.cluster.clustered:
            return serving
        seen = sensor.last_seen if serving is not None and sensor.last_seen is not None else -math.inf
        for other, last_seen in await self.cluster.router.broadcast("mioty", "dl_serving", sensor.eui):
            if other is not None and last_seen is not None and last_seen > seen:
                serving, seen = other, last_seen
        return serving if serving is not None else await self.registry.stored_best_bs(sensor.eui)

    async def _take_here(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Keep downlinks another hub queued (its serving station is here) and dispatch them."""
        que_ids = [q for q in args["queIds"] if type(q) is int]
        rows = await self.registry.pending_downlinks(que_ids)
        dispatches = await self.downlink_queue.take(rows, None, {q: args["from"] for q in que_ids})
        await defer.DeferredList(dispatches)
        outcomes = []
        for que_id in que_ids:
            dl = self.downlink_queue.pending.get(que_id)
            if dl is not None:
                outcomes.append(_outcome(dl))
                continue
            found = await self.registry.downlinks(que_id=que_id)
            status = found[0]["status"] if found else "unknown"
            outcomes.append({"queId": que_id, "status": status, "baseStations": found[0]["bsEuis"] if found else [],
                             "error": found[0]["error"] if found else None})
        return outcomes

    def _station_claimed(self, family: str, station: str, node: str) -> None:
        """A station was claimed by a hub: another one takes the downlinks this hub kept for it."""
        if family != "mioty" or node == self.cluster.node:
            return
        gone = self.downlink_queue.let_go(station)
        if gone:
            # Their last states first (written while this hub still keeps them), then nobody keeps them.
            written = defer.DeferredList([self.downlink_queue.durable(dl) for dl in gone], consumeErrors=True)
            release = partial(self.registry.release_downlinks, self.cluster.node, [dl.que_id for dl in gone])
            self._background(written.addCallback(lambda _: defer.ensureDeferred(release())),
                             f"handing the downlinks of base station {station} to hub {node}")

    async def take_downlinks(self, station: str) -> int:
        """`station` is on this hub now: keep what it held on any hub, and what waits for it and nobody
        (or a hub that is gone) keeps; dispatch them. Returns how many were taken."""
        node = self.cluster.node
        rows = []
        for row in await self.registry.pending_downlinks():
            if row[0] in self.downlink_queue.pending or row[10] == node:
                continue
            if station in json.loads(row[9] or "[]"):
                rows.append(row)  # its station forgot it with its old session
            elif (row[7] == DownlinkState.QUEUED.value and station in (self.downlink_queue.serving(row[1]), row[11])
                  and (row[10] is None or not await self.cluster.router.alive(row[10]))):
                rows.append(row)
        before = len(self.downlink_queue.pending)
        await self.downlink_queue.take(rows, f"base station {station} is on hub {node} now")
        return len(self.downlink_queue.pending) - before

    def _waiting_changed(self, ep: str, waiting: bool) -> None:
        """Tell the other hubs that this one waits (or no longer) for the end point's next dlOpen uplink."""
        args = {"epEui": ep, "node": self.cluster.node, "waiting": waiting}
        self._background(self.cluster.router.broadcast("mioty", "dl_waiting", args),
                         f"telling the other hubs about the downlinks waiting for {ep}")

    async def learn_waiting(self) -> None:
        """The end points other hubs keep queued downlinks for (once, at the start)."""
        for answer in await self.cluster.router.broadcast("mioty", "dl_waiting_list", None):
            for ep in answer["eps"]:
                self.remote_waiting.setdefault(ep, answer["node"])

    def _uplink_for_downlinks(self, ep: str, packet_cnt: int, payload: dict[str, Any]) -> None:
        """The uplink pipeline's hook: this hub's downlinks, then a dlOpen for a downlink another hub keeps."""
        self.downlink_queue.uplink(ep, packet_cnt, payload)
        node = self.remote_waiting.get(ep)
        if node is None or not payload["dlOpen"] or ep in self.downlink_queue.waiting:
            return
        args = {"epEui": ep, "receivers": [r["bsEui"] for r in payload["receivers"]]}
        d = self.cluster.router.call(node, "mioty", "dl_open", args)

        def answered(answer: Any) -> None:
            if answer.get("node") != node and self.remote_waiting.get(ep) == node:
                del self.remote_waiting[ep]  # that hub is gone (this one answered): its downlinks are adopted

        self._background(d.addCallback(answered), f"telling hub {node} that {ep} opened a downlink window")

    async def _dl_open_here(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Another hub published a dlOpen uplink of an end point whose downlinks wait here: its receivers
        serve it now; offer them, or hand them to the hub holding the serving station."""
        ep, receivers = args["epEui"], tuple(args["receivers"])
        sensor = self.registry.sensors.get(ep)
        offered = 0
        if sensor is not None and ep in self.downlink_queue.waiting and receivers:
            sensor.paths = receivers
            offered = len(self.downlink_queue.offer(ep))
            if not offered:
                offered = await self.hand_over_downlinks()
        return {"node": self.cluster.node, "offered": offered}

    async def hand_over_downlinks(self) -> int:
        """Hand the queued downlinks whose serving station is on another hub now to that hub (the end
        point moved there while they waited). Returns how many went."""
        node, handed = self.cluster.node, 0
        for ep in sorted(self.downlink_queue.waiting):
            serving = self.downlink_queue.serving(ep)
            owner = self.cluster.ownership.owner("mioty", serving) if serving is not None else None
            if serving is None or owner is None or owner == node or not await self.cluster.router.alive(owner):
                continue
            queued = self.downlink_queue.queued_for(ep)
            for dl in queued:
                self.downlink_queue.forget(dl)  # not dispatched from here while the other hub takes it
            args = {"queIds": [dl.que_id for dl in queued], "from": node}
            try:
                await self.cluster.router.route("mioty", serving, "dl_take", args)
            except Exception as e:
                self.log.warn("hub {node} did not take the downlinks of {epEui} ({problem}); kept here", node=owner,
                              epEui=ep, problem=str(e))
                await self._take_here(args)
                continue
            handed += len(queued)
        return handed

    async def adopt_downlinks(self) -> int:
        """Keep the pending downlinks no running hub keeps, unless their station is on another hub
        (which takes them). Returns how many were taken here."""
        node = self.cluster.node
        alive: dict[str, bool] = {node: True}

        async def running(other: str | None) -> bool:
            if other is None:
                return False
            if other not in alive:
                alive[other] = await self.cluster.router.alive(other)
            return alive[other]

        rows = []
        for row in await self.registry.pending_downlinks():
            if row[0] in self.downlink_queue.pending or await running(row[10]):
                continue
            held = json.loads(row[9] or "[]")
            station = held[0] if held else self.downlink_queue.serving(row[1]) or row[11]
            owner = self.cluster.ownership.owner("mioty", station) if station else None
            if owner is None or owner == node or not await running(owner):
                rows.append(row)
        before = len(self.downlink_queue.pending)
        await self.downlink_queue.take(rows, f"the hub that kept it is gone; hub {node} keeps it")
        return len(self.downlink_queue.pending) - before

    async def revoke_base_station(self, bs_eui: str, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        """Revoke a base station: close its connection, refuse its bsEui at `con` and the serial of
        the certificate it last used in the TLS handshake, from now on."""
        eui = _eui(bs_eui, "base-station EUI")
        bs = self.registry.base_stations.get(eui)
        if bs is None:
            raise UnknownDevice(f"unknown base station {eui}")
        if not isinstance(reason, str):
            raise CommandError("reason must be a string")
        now = self.clock.seconds()
        bs.revoked, bs.revoked_reason, bs.revoked_at = True, reason or None, now
        await self.registry.save_base_station(bs)
        session = self.sessions.get(eui)
        serials = {int(bs.cert_serial, 16)} if bs.cert_serial else set()
        if session is not None and session.certificate is not None:
            serials.add(session.certificate.serial_number)
        for serial in serials:
            await self.registry.revoke_certificate(serial, reason or f"base station {eui} revoked", actor, now)
        self.log.warn("base station {bsEui} revoked by {actor}: {reason}", bsEui=eui, actor=actor,
                      reason=reason or "no reason given")
        await self.cluster.router.route("mioty", eui, "close", f"revoked by {actor}")
        return {**bs.to_json(), "revokedSerials": [f"{s:#x}" for s in sorted(serials)]}

    async def revoke_certificate(self, serial: int, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        """Refuse a client certificate by serial number (in every future TLS handshake)."""
        if type(serial) is not int or serial <= 0:
            raise CommandError(f"bad certificate serial {serial!r}")
        await self.registry.revoke_certificate(serial, reason or "revoked", actor, self.clock.seconds())
        for session in list(self.sessions.values()):
            if session.certificate is not None and session.certificate.serial_number == serial:
                session.close(f"certificate revoked by {actor}")
        self.log.warn("certificate serial {serial} revoked by {actor}", serial=f"{serial:#x}", actor=actor)
        return {"serial": f"{serial:#x}", "revoked": True}

    def _known_sensor(self, ep_eui: str) -> Sensor:
        eui = _eui(ep_eui, "end point EUI")
        sensor = self.registry.sensors.get(eui)
        if sensor is None:
            raise UnknownDevice(f"unknown end point {eui}")
        return sensor

    # -- queries (REST)

    async def list_base_stations(self) -> list[dict[str, Any]]:
        """Every base station that ever connected, by EUI (see get_base_station for the fields)."""
        return [self._bs_json(bs) for _, bs in sorted(self.registry.base_stations.items())]

    async def get_base_station(self, bs_eui: str) -> dict[str, Any] | None:
        """One base station, or None: bsEui, state ("online"/"offline"), vendor, model, name,
        swVersion, version, since, bidi, geoLocation, peer, certSerial, certSubject, firstSeen,
        lastSeen, status (the last status payload), revoked, revokedReason, revokedAt, and while
        connected: connectedSince, propagationPending."""
        bs = self.registry.base_stations.get(_eui(bs_eui, "base-station EUI"))
        return None if bs is None else self._bs_json(bs)

    def _bs_json(self, bs: BaseStation) -> dict[str, Any]:
        out = bs.to_json()
        session = self.sessions.get(bs.eui)
        if session is not None and session.established_at is not None:
            out["connectedSince"] = rfc3339(session.established_at)
            out["propagationPending"] = session.propagation_pending
        return out

    async def list_sensors(self, filter: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """Sensors by EUI, those whose EUI contains `filter` (hex, any case):
        {"items": [sensor as in get_sensor], "total", "limit", "offset"}."""
        needle = (filter or "").lower()
        found = sorted(eui for eui in self.registry.sensors if needle in eui)
        page = found[offset : offset + limit] if limit > 0 else []
        return {"items": [self._sensor_json(self.registry.sensors[eui]) for eui in page], "total": len(found),
                "limit": limit, "offset": offset}

    async def get_sensor(self, ep_eui: str) -> dict[str, Any] | None:
        """One sensor, or None: epEui, shortAddr (4 hex), bidi, dualChan, repetition,
        wideCarrOff, longBlkDist, epClass, syncBurst, attached, attachedAt, attachCnt,
        otaSession (attached over the air: attPrp carries the derived session key), lastPacketCnt,
        lastSeen, bestBs, bestSnr, createdAt, typeEui (its blueprint's type, or null). Never a key."""
        sensor = self.registry.sensors.get(_eui(ep_eui, "end point EUI"))
        return None if sensor is None else self._sensor_json(sensor)

    def _sensor_json(self, sensor: Sensor) -> dict[str, Any]:
        return {**sensor.to_json(), "typeEui": self.blueprints.types.get(sensor.eui)}

    async def uplink_history(self, ep_eui: str, limit: int = 100, before: float | None = None) -> dict[str, Any]:
        """The sensor's stored uplinks, newest first, received before `before` (Unix seconds):
        {"items": [uplink event payload + "received" (Unix s of the first copy)]}."""
        eui = _eui(ep_eui, "end point EUI")
        limit = max(1, min(int(limit), 1000))
        row_limit = limit * 8 + 8
        rows = await self.registry.uplink_rows(eui, row_limit, before)
        groups = group_copies(rows)
        if len(rows) == row_limit and len(groups) > 1:
            groups.pop()  # its other copies may lie beyond the rows read
        items = []
        for ep, copies in groups[:limit]:
            first = min(c.received for c in copies)
            items.append({**uplink_payload(ep, copies, first), "received": first})
        self.blueprints.annotate_all(items)  # decoded with the blueprint the sensor has now
        return {"items": items}

    async def downlinks(self, ep_eui: str) -> dict[str, Any]:
        """The end point's downlinks, newest first: {"items": [{queId, epEui, data, format, prio,
        responseExp, created, actor, bsEuis (the station holding it), status (see
        downlinks.DownlinkState: queued, dispatched, accepted, expiring; sent, expired, invalid,
        rejected, revoked), resultBs, txTime, packetCnt, error, acked, updated, attempts}]}."""
        return {"items": await self.registry.downlinks(_eui(ep_eui, "end point EUI"))}

    async def downlink(self, ep_eui: str, que_id: int) -> dict[str, Any] | None:
        """One downlink of the end point (as in `downlinks`), or None."""
        found = await self.registry.downlinks(_eui(ep_eui, "end point EUI"), que_id=que_id)
        return found[0] if found else None

    # -- MQTT commands

    async def command(self, kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/mioty/{kind}/{id}/cmd/{name}`: ep attach/detach/down/revoke_down/dl_rx_status, bs status,
        meter down."""
        if kind == "meter":
            return await self.vm.command(id, name, payload)  # type: ignore[attr-defined]
        names = {"ep": ("attach", "detach", "down", "revoke_down", "dl_rx_status"), "bs": ("status",)}.get(kind)
        if names is None:
            raise CommandError(f"unknown target {kind!r}: use ep (end point), bs (base station) or meter")
        if name not in names:
            raise CommandError(f"unknown {kind} command {name!r} (known: {', '.join(names)})")
        eui = _eui(id, "end point EUI" if kind == "ep" else "base-station EUI")
        if not isinstance(payload, Mapping):
            raise CommandError("the payload must be a JSON object")
        if kind == "bs":
            _fields(payload, ())
            return await self.poll_status(eui)
        if name == "attach":
            _fields(payload, ("nwKey", "shortAddr", "bidi"))
            result = await self.attach(eui, payload["nwKey"], payload["shortAddr"], payload["bidi"], actor="mqtt",
                                       source="mqtt")
            detail = {"shortAddr": f"{_short_addr(payload['shortAddr']):04x}", "bidi": payload["bidi"]}
            await self._audit("mqtt", "mioty.sensor.attach", eui, detail, "mqtt")
            return result
        if name == "detach":
            _fields(payload, ())
            result = await self.detach(eui, actor="mqtt", source="mqtt")
            await self._audit("mqtt", "mioty.sensor.detach", eui, {}, "mqtt")
            return result
        if name == "revoke_down":
            _fields(payload, ("queId",))
            result = await self.revoke_downlink(eui, payload["queId"], actor="mqtt")
            await self._audit("mqtt", "mioty.sensor.downlink_revoke", eui, {"queId": payload["queId"]}, "mqtt")
            return result
        if name == "dl_rx_status":
            _fields(payload, ())
            return await self.query_dl_rx_status(eui)
        _fields(payload, ("data",), ("format", "prio", "responseExp"))
        data = payload["data"]
        if not isinstance(data, str):
            raise CommandError("data must be a string of hexadecimal digits")
        result = await self.queue_downlink(eui, data, format=payload.get("format"), prio=payload.get("prio"),
                                           response_exp=payload.get("responseExp"), actor="mqtt")
        await self._audit("mqtt", "mioty.sensor.downlink", eui, {"queId": result["queId"], "bytes": len(data) // 2},
                          "mqtt")
        return result
