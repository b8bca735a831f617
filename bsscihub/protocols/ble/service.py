"""The BLE family at run time: gateway messages in, registry and deduplicated readings out.

The registry lives in memory (loaded at start, written back every few seconds); readings are group-committed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from bsscihub import ingest
from bsscihub.bus import Event
from bsscihub.cluster import IWindowStore, shared_windows
from bsscihub.contract import non_finite_name, opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import FamilyService
from bsscihub.hub import Hub
from bsscihub.ingest import Rejected, errback
from bsscihub.registry_sync import RegistryChanges, RegistryFull, SharedRegistry

# Plausible ranges of the quantities beacons commonly report; other numeric fields are kept as
# they come, within GENERIC_RANGE, under a name that is safe in SQL rows and JSON paths.
QUANTITIES: dict[str, tuple[float, float]] = {
    "temperature": (-60.0, 150.0),
    "humidity": (0.0, 100.0),
    "pressure": (300.0, 1200.0),
    "battery": (0.0, 100.0),
    "voltage": (0.0, 60.0),
    "co2": (0.0, 100_000.0),
    "illuminance": (0.0, 200_000.0),
}
GENERIC_RANGE = (-1e9, 1e9)
RESERVED = {"gateway_id", "gatewayId", "mac", "rssi", "time", "timestamp", "type", "name", "tx_power", "txPower"}
QUANTITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_QUANTITIES = 16
MAX_BATCH = 1000
MAC = re.compile(r"^[0-9a-f]{12}$")
FLUSH_EVERY = 2.0
CLUSTER_LOAD_EVERY = 5.0
"""Seconds between looks for the gateways and beacons other hubs of a cluster registered."""
CLUSTER_LOAD_MARGIN = 60.0
"""How far back each look reaches: registrations are written a little after they happen (group commit)."""
GATEWAY_COLUMNS = ("id", "first_seen", "last_seen", "state", "since", "messages")
NODE_COLUMNS = ("mac", "first_seen", "last_seen", "gateway", "rssi", "readings", "last_values")


def normalize_mac(value: Any) -> str:
    """'11:22:33:44:55:66', '11-22-..', '1122.3344.5566' or '112233445566', any case -> '112233445566'."""
    if not isinstance(value, str):
        raise Rejected(ingest.WRONG_TYPE, f"mac: expected a string, got {ingest.type_name(value)}")
    digits = re.sub(r"[:.\-]", "", value.strip()).lower()
    if not MAC.match(digits):
        raise Rejected(ingest.IMPLAUSIBLE, f"mac: {value[:40]!r} is not a MAC address")
    return digits


def mac_text(mac: str) -> str:
    return ":".join(mac[i : i + 2] for i in range(0, 12, 2))


@attrs.frozen
class Sighting:
    """One gateway's report of one beacon broadcast, validated."""

    gateway: str
    mac: str
    rssi: int | None  # earlier platforms' gateways send none
    values: Mapping[str, float]
    invalid: Mapping[str, str] = attrs.field(factory=dict)  # quantities dropped as NaN/±Infinity


def parse_sighting(doc: Any, topic_gateway: str | None) -> Sighting:
    if not isinstance(doc, dict):
        raise Rejected(ingest.WRONG_TYPE, f"expected a JSON object, got {ingest.type_name(doc)}")
    if doc.get("gateway_id") is None and doc.get("gatewayId") is None and topic_gateway is not None:
        gateway = ingest.check_identifier(topic_gateway, "gateway_id (from the topic)")
    else:
        gateway = ingest.identifier(doc, "gatewayId" if "gatewayId" in doc else "gateway_id")
    mac = normalize_mac(ingest.require(doc, "mac"))
    rssi_value = ingest.number(doc, "rssi", -127, 0, required=False, integer=True)
    rssi = None if rssi_value is None else int(rssi_value)
    values: dict[str, float] = {}
    invalid: dict[str, str] = {}
    for key, value in doc.items():
        if key in RESERVED or isinstance(value, (str, bool, list, dict)) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value) and QUANTITY_NAME.match(key):
            invalid[key] = non_finite_name(value)  # JSON cannot carry it on: null with the reason
            continue
        if key in QUANTITIES:
            low, high = QUANTITIES[key]
        elif QUANTITY_NAME.match(key):
            low, high = GENERIC_RANGE
        else:
            raise Rejected(ingest.IMPLAUSIBLE, f"{key[:40]!r} is not a quantity name")
        values[key] = ingest.check_number(value, key, low, high)
    if len(values) > MAX_QUANTITIES:
        raise Rejected(ingest.IMPLAUSIBLE, f"{len(values)} quantities, more than {MAX_QUANTITIES}")
    return Sighting(gateway, mac, rssi, values, invalid)


@attrs.define
class Gateway:
    id: str
    first_seen: float
    last_seen: float
    state: str
    since: float
    messages: int = 0
    unsaved: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"gatewayId": self.id, "state": self.state, "since": rfc3339(self.since),
                "firstSeen": rfc3339(self.first_seen), "lastSeen": rfc3339(self.last_seen), "messages": self.messages}


@attrs.define
class Node:
    mac: str
    first_seen: float
    last_seen: float
    gateway: str
    rssi: int | None
    readings: int = 0
    values: dict[str, float] = attrs.field(factory=dict)
    unsaved: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"mac": mac_text(self.mac), "id": self.mac, "firstSeen": rfc3339(self.first_seen),
                "lastSeen": opt_time(self.last_seen), "gatewayId": self.gateway, "rssi": self.rssi,
                "readings": self.readings, "values": dict(self.values)}


@attrs.frozen
class Copy:
    """One gateway's copy of a broadcast on its way through the cluster's shared windows."""

    time: float
    gateway: str
    rssi: int | None
    values: Mapping[str, float]
    invalid: Mapping[str, str]


def encode_copy(copy: Copy) -> str:
    return json.dumps([copy.time, copy.gateway, copy.rssi, dict(copy.values), dict(copy.invalid)])


def decode_copy(text: str) -> Copy:
    time, gateway, rssi, values, invalid = json.loads(text)
    return Copy(time, gateway, rssi, values, invalid)


@attrs.define
class Window:
    """Copies of one beacon broadcast being collected, by gateway."""

    mac: str
    time: float
    values: dict[str, float]
    rssi: dict[str, int | None]
    invalid: dict[str, str] = attrs.field(factory=dict)
    timer: Any = None


def _registering(shared: SharedRegistry | None, key: str) -> bool:
    return shared is not None and shared.registering(key)


class BLEService(FamilyService):
    """Subscribes to the gateways' topics; registers gateways and nodes; stores and publishes readings."""

    log = Logger()
    family = "ble"

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.config = hub.config.section("ble")
        self.clock = hub.reactor
        self.gateways: dict[str, Gateway] = {}
        self.nodes: dict[str, Node] = {}
        self.windows: dict[str, Window] = {}
        self.shared: IWindowStore | None = None
        """In a cluster, the windows shared by the hubs (a gateway's messages may go to any of them)."""
        self.readings_stored = 0
        self._dirty_gateways: set[str] = set()
        self._dirty_nodes: set[str] = set()
        self._inserts: set[defer.Deferred[Any]] = set()
        # Group-committed: many beacons seen for the first time must not cost a commit each.
        self._new_nodes = hub.store.batch_writer(
            "INSERT INTO ble_nodes (mac, first_seen, last_seen, gateway, rssi) VALUES {rows}"
            " ON CONFLICT (mac) DO NOTHING")
        self._new_gateways = hub.store.batch_writer(
            "INSERT INTO ble_gateways (id, first_seen, last_seen, state, since) VALUES {rows}"
            " ON CONFLICT (id) DO NOTHING")
        self._readings = hub.store.batch_writer(
            "INSERT INTO ble_readings (mac, time, receivers, data) VALUES {rows}"
        )
        self._samples = hub.store.batch_writer(
            "INSERT INTO ble_samples (mac, quantity, time, value) VALUES {rows}"
        )
        self._gateway_limit = ingest.RegistrationLimit(
            self.clock, self.config.max_gateways, self.config.registrations_per_minute,
            limiter=hub.cluster.limiter, name="ble.gateways")
        self._node_limit = ingest.RegistrationLimit(
            self.clock, self.config.max_nodes, self.config.registrations_per_minute,
            limiter=hub.cluster.limiter, name="ble.nodes")
        # In a cluster the shared database decides on each new gateway and beacon: within the caps for all hubs,
        # and announced by the hub whose insert made the row.
        self.shared_gateways: SharedRegistry | None = None
        self.shared_nodes: SharedRegistry | None = None
        if hub.cluster.clustered:
            self.shared_gateways = SharedRegistry(hub.store, "ble_gateways", "id", GATEWAY_COLUMNS[:5],
                                                  self.config.max_gateways, GATEWAY_COLUMNS)
            self.shared_nodes = SharedRegistry(hub.store, "ble_nodes", "mac", NODE_COLUMNS[:5], self.config.max_nodes,
                                               NODE_COLUMNS)
        self._flusher = self.looping(self._flush_registry, "writing the registry")
        self._checker = self.looping(self.check_gateways, "checking gateways")
        self._pruner = self.looping(self.prune, "pruning old readings")
        self._others = self.looping(self._load_others, "loading the other hubs' registrations")
        self._loaded_at = 0.0
        self.changes = RegistryChanges(hub, "ble", self._reload)


    # -- lifecycle

    async def prepare(self) -> None:
        self.shared = shared_windows(self.hub.cluster, "ble", self.clock, self.config.dedup_window,
                                     self._shared_closed, (encode_copy, decode_copy))
        self._loaded_at = self.clock.seconds()
        await self._load_registry()
        if self.shared is not None:
            self._others.start(CLUSTER_LOAD_EVERY, now=False).addErrback(
                errback(self.log, "ble: loading the other hubs' registrations stopped"))
        self._flusher.start(FLUSH_EVERY, now=False).addErrback(errback(self.log, "ble: registry writer stopped"))
        check = max(0.05, min(self.config.gateway_timeout / 4, 15.0))
        self._checker.start(check, now=False).addErrback(errback(self.log, "ble: gateway checker stopped"))
        self._pruner.start(3600.0, now=True).addErrback(errback(self.log, "ble: pruning stopped"))

    async def _load_registry(self, since: float | None = None) -> None:
        """The registry's rows this hub does not hold yet (all, or those first seen since `since`)."""
        where, params = ("", ()) if since is None else (" WHERE first_seen >= ?", (since,))
        rows = await self.hub.store.fetchall(f"SELECT {', '.join(GATEWAY_COLUMNS)} FROM ble_gateways" + where, params)
        for row in rows:
            if row[0] not in self.gateways:
                self._adopt_gateway(row)
        rows = await self.hub.store.fetchall(f"SELECT {', '.join(NODE_COLUMNS)} FROM ble_nodes" + where, params)
        for row in rows:
            if row[0] not in self.nodes:
                self._adopt_node(row)

    def _adopt_gateway(self, row: Sequence[Any]) -> None:
        """A gateway as stored (GATEWAY_COLUMNS) into memory."""
        gid, first, last, state, since, messages = row
        self.gateways[gid] = Gateway(gid, float(first), float(last), state, float(since), int(messages))

    def _adopt_node(self, row: Sequence[Any]) -> None:
        """A beacon as stored (NODE_COLUMNS) into memory."""
        mac, first, last, gateway, rssi, readings, values = row
        self.nodes[mac] = Node(mac, float(first), float(last), gateway, rssi, int(readings), json.loads(values))

    async def _load_others(self) -> None:
        """In a cluster: the gateways and beacons the other hubs registered lately, for this hub's API."""
        since, self._loaded_at = self._loaded_at - CLUSTER_LOAD_MARGIN, self.clock.seconds()
        await self._load_registry(since)
        await self.changes.poll()

    async def _reload(self, kind: str, keys: Sequence[str]) -> None:
        """Gateways or beacons another hub of a cluster removed: out of this hub's memory too."""
        table, column = ("ble_gateways", "id") if kind == "gateway" else ("ble_nodes", "mac")
        rows = await self.hub.store.fetchall(
            f"SELECT {column} FROM {table} WHERE {column} IN ({', '.join('?' * len(keys))})", tuple(keys))
        kept = {key for key, in rows}
        drop = self._drop_gateway if kind == "gateway" else self._drop_node
        for key in keys:
            if key not in kept:
                drop(key)

    def _drop_gateway(self, gid: str) -> bool:
        self._dirty_gateways.discard(gid)
        return self.gateways.pop(gid, None) is not None

    def _drop_node(self, mac: str) -> bool:
        self._dirty_nodes.discard(mac)
        window = self.windows.pop(mac, None)
        if window is not None and window.timer is not None and window.timer.active():
            window.timer.cancel()
        return self.nodes.pop(mac, None) is not None

    def subscriptions(self) -> Mapping[str, Any]:
        return {topic_filter: self.on_message for topic_filter in self.config.topics}

    async def drain(self) -> None:
        for loop in (self._flusher, self._checker, self._pruner, self._others):
            if loop.running:
                loop.stop()
        for shared in (self.shared_gateways, self.shared_nodes):
            if shared is not None:
                await shared.settled()
        for mac in list(self.windows):
            self._close_window(mac)
        if self.shared is not None:
            await self.shared.flush()
        await self._flush_registry()

    # -- ingress

    def on_message(self, topic: str, payload: bytes, properties: Any = None) -> defer.Deferred[None] | None:
        doc = ingest.parse_json(payload, self.config.max_payload)
        items = doc if isinstance(doc, list) else [doc]
        waiting: list[defer.Deferred[None]] = []
        if len(items) > MAX_BATCH:
            raise Rejected(ingest.IMPLAUSIBLE, f"{len(items)} readings in one message, more than {MAX_BATCH}")
        levels = topic.split("/")
        topic_gateway = levels[1] if len(levels) == 2 and levels[1] else None
        for item in items:
            # One bad entry of a gateway's batch drops that entry, not its neighbours.
            try:
                sighting = parse_sighting(item, topic_gateway)
                self._check_registration(sighting, levels[0])
            except Rejected as e:
                if e.source is None and isinstance(item, dict) and isinstance(item.get("gateway_id"), str):
                    e.source = item["gateway_id"][:64]
                self.ingest.rejected(e, topic)
                continue
            if self.shared_nodes is not None and (sighting.gateway not in self.gateways
                                                  or sighting.mac not in self.nodes):
                waiting.append(defer.Deferred.fromCoroutine(self._sighted_once_registered(sighting, topic)))
                continue
            self.sighted(sighting)
            self.ingest.accepted()
        return defer.gatherResults(waiting, consumeErrors=True).addCallback(lambda _: None) if waiting else None

    def _check_registration(self, s: Sighting, topic_root: str) -> None:
        """Before anything changes: may this sighting register a gateway or a beacon? (A gateway or beacon being
        registered in a cluster was checked for the sighting that started it.)"""
        if s.gateway not in self.gateways and not _registering(self.shared_gateways, s.gateway):
            self._gateway_limit.check(self._gateway_source(topic_root), len(self.gateways), f"new gateway {s.gateway}")
        if s.mac not in self.nodes and not _registering(self.shared_nodes, s.mac):
            self._node_limit.check(s.gateway, len(self.nodes), f"new beacon {mac_text(s.mac)}")

    @staticmethod
    def _gateway_source(topic_root: str) -> str:
        return f"topic:{topic_root}"

    async def _sighted_once_registered(self, s: Sighting, topic: str) -> None:
        """A cluster: a sighting of a gateway or beacon this hub does not know, taken once the shared database
        decided on registering it (the gateway first); sightings of one being registered wait for that decision."""
        assert self.shared_gateways is not None and self.shared_nodes is not None
        try:
            if s.gateway not in self.gateways:
                now = self.clock.seconds()
                try:
                    stored = await self.shared_gateways.insert(s.gateway, (s.gateway, now, now, "online", now))
                except RegistryFull:
                    raise self._gateway_limit.full(self._gateway_source(topic.split("/")[0]),
                                                   f"new gateway {s.gateway}") from None
                self._gateway_decided(s.gateway, stored, now)
            if s.mac not in self.nodes:
                now = self.clock.seconds()
                try:
                    stored = await self.shared_nodes.insert(s.mac, (s.mac, now, now, s.gateway, s.rssi))
                except RegistryFull:
                    raise self._node_limit.full(s.gateway, f"new beacon {mac_text(s.mac)}") from None
                self._node_decided(s, stored, now)
        except Rejected as e:
            self.ingest.rejected(e, topic)
            return
        self.sighted(s)
        self.ingest.accepted()

    def _gateway_decided(self, gid: str, stored: tuple[Any, ...] | None, now: float) -> None:
        """This hub's new gateway (announced) or another hub's (taken silently)."""
        if gid in self.gateways:  # decided for an earlier sighting, or loaded meanwhile
            return
        if stored is not None:
            self._adopt_gateway(stored)
            return
        gateway = self.gateways[gid] = Gateway(gid, now, now, "online", now)
        self._gateway_announce(gateway)

    def _node_decided(self, s: Sighting, stored: tuple[Any, ...] | None, now: float) -> None:
        """This hub's new beacon (announced) or another hub's (taken silently)."""
        if s.mac in self.nodes:
            return
        if stored is not None:
            self._adopt_node(stored)
            return
        self.nodes[s.mac] = Node(s.mac, now, now, s.gateway, s.rssi)
        self._node_announce(s, now)

    def sighted(self, s: Sighting) -> None:
        now = self.clock.seconds()
        self._gateway_heard(s.gateway, now)
        if s.mac not in self.nodes:
            self.nodes[s.mac] = Node(s.mac, now, now, s.gateway, s.rssi)
            self._write(self._new_nodes, (s.mac, now, now, s.gateway, s.rssi))
            self._node_announce(s, now)
        if self.shared is not None:
            # the other hubs hold the other gateways' copies: one hub collects them all
            self.shared.add(s.mac, s.gateway, Copy(now, s.gateway, s.rssi, s.values, s.invalid))
            return
        window = self.windows.get(s.mac)
        if window is not None and s.gateway in window.rssi:
            # The same gateway again: a new broadcast, so the one being collected is complete.
            self._close_window(s.mac)
            window = None
        if window is None:
            window = Window(s.mac, now, dict(s.values), {s.gateway: s.rssi}, dict(s.invalid))
            window.timer = self.clock.callLater(self.config.dedup_window, self._close_window, s.mac)
            self.windows[s.mac] = window
        else:
            window.rssi[s.gateway] = s.rssi
            for key, value in s.values.items():
                window.values.setdefault(key, value)
            for key, why in s.invalid.items():
                window.invalid.setdefault(key, why)

    def _gateway_heard(self, gid: str, now: float) -> None:
        gateway = self.gateways.get(gid)
        if gateway is None:
            gateway = self.gateways[gid] = Gateway(gid, now, now, "online", now)
            self._write(self._new_gateways, (gid, now, now, "online", now))
            self._gateway_announce(gateway)
        elif gateway.state != "online":
            gateway.state, gateway.since = "online", now
            self._gateway_state(gateway)
        gateway.last_seen = now
        gateway.messages += 1
        gateway.unsaved += 1
        self._dirty_gateways.add(gid)

    def _gateway_announce(self, gateway: Gateway) -> None:
        self.emit("gateway_registered", f"ble/gw/{gateway.id}/event/registered",
                  {"gatewayId": gateway.id, "time": rfc3339(gateway.first_seen)})
        self._gateway_state(gateway)

    def _node_announce(self, s: Sighting, now: float) -> None:
        self.emit("node_registered", f"ble/node/{s.mac}/event/registered",
                  {"mac": mac_text(s.mac), "gatewayId": s.gateway, "time": rfc3339(now)})

    def _shared_closed(self, mac: str, copies: list[Copy]) -> None:
        """A window collected across the hubs, copies in arrival order."""
        first = copies[0]
        window = Window(mac, first.time, dict(first.values), {first.gateway: first.rssi}, dict(first.invalid))
        for copy in copies[1:]:
            window.rssi.setdefault(copy.gateway, copy.rssi)
            for key, value in copy.values.items():
                window.values.setdefault(key, value)
            for key, why in copy.invalid.items():
                window.invalid.setdefault(key, why)
        if mac in self.nodes:  # else forgotten meanwhile
            self._publish(window)

    def _close_window(self, mac: str) -> None:
        window = self.windows.pop(mac, None)
        if window is None:
            return
        if window.timer is not None and window.timer.active():
            window.timer.cancel()
        self._publish(window)

    def _publish(self, window: Window) -> None:
        mac = window.mac
        # Nearest first: the strongest signal (gateways that give none last); ties by gateway id, so the
        # order is stable.
        receivers = sorted(window.rssi.items(),
                           key=lambda item: (item[1] is None, -(item[1] or 0), item[0]))
        nearest, rssi = receivers[0]
        node = self.nodes[mac]
        node.last_seen, node.gateway, node.rssi = window.time, nearest, rssi
        node.values.update(window.values)
        node.readings += 1
        node.unsaved += 1
        self._dirty_nodes.add(mac)
        receivers_json = [{"gatewayId": g, "rssi": r} for g, r in receivers]
        self._store(self._readings.add((mac, window.time, json.dumps(receivers_json), json.dumps(window.values))))
        for quantity, value in window.values.items():
            self._store(self._samples.add((mac, quantity, window.time, value)))
        up: dict[str, Any] = {
            "mac": mac_text(mac), "time": rfc3339(window.time), "values": dict(window.values),
            "gatewayId": nearest, "rssi": rssi, "receivers": receivers_json,
        }
        if window.invalid:
            up["invalid"] = dict(window.invalid)
        self.emit("up", f"ble/node/{mac}/up", up)

    def _store(self, d: defer.Deferred[None]) -> None:
        def stored(_: Any) -> None:
            self.readings_stored += 1

        d.addCallbacks(stored, errback(self.log, "ble: storing a reading failed"))

    # -- gateways going silent

    def check_gateways(self) -> defer.Deferred[None] | None:
        now = self.clock.seconds()
        silent = [g for g in self.gateways.values()
                  if g.state == "online" and now - g.last_seen > self.config.gateway_timeout]
        if silent and self.shared is not None:
            return defer.Deferred.fromCoroutine(self._silent_everywhere(silent))
        for gateway in silent:
            self._gone_silent(gateway, now)
        return None

    async def _silent_everywhere(self, silent: list[Gateway]) -> None:
        """In a cluster the other hubs may have heard these gateways: their registry writes say when."""
        rows = await self.hub.store.fetchall(
            f"SELECT id, last_seen FROM ble_gateways WHERE id IN ({', '.join('?' * len(silent))})",
            tuple(g.id for g in silent))
        heard = {gid: float(last) for gid, last in rows}
        now = self.clock.seconds()
        for gateway in silent:
            gateway.last_seen = max(gateway.last_seen, heard.get(gateway.id, gateway.last_seen))
            if gateway.state == "online" and now - gateway.last_seen > self.config.gateway_timeout:
                self._gone_silent(gateway, now)

    def _gone_silent(self, gateway: Gateway, now: float) -> None:
        gateway.state, gateway.since = "offline", now
        self._dirty_gateways.add(gateway.id)
        self.log.info("ble gateway {gateway} offline: silent since {last_seen}", gateway=gateway.id,
                      last_seen=gateway.last_seen)
        self._gateway_state(gateway)

    def _gateway_state(self, gateway: Gateway) -> None:
        self.emit("gateway_state", f"ble/gw/{gateway.id}/state", {
            "gatewayId": gateway.id, "state": gateway.state, "since": rfc3339(gateway.since),
            "lastSeen": rfc3339(gateway.last_seen),
        }, retain=True)

    # -- events and writes

    def emit(self, kind: str, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.hub.bus.publish(Event("ble", kind, topic, payload, retain)).addErrback(
            errback(self.log, "ble: publishing {topic} failed", topic=topic)
        )

    def _write(self, writer: Any, row: tuple[Any, ...]) -> None:
        """A registry INSERT, not awaited by the message path, but before the next flush of that row."""
        d = writer.add(row)
        self._inserts.add(d)
        d.addErrback(errback(self.log, "ble: registry insert failed"))
        d.addBoth(lambda _: self._inserts.discard(d))

    async def _flush_registry(self) -> None:
        """Write back what changed since the last flush: one UPDATE per dirty row, in one transaction."""
        # Rows are UPDATEd below: their INSERTs must have landed (PostgreSQL runs statements on several threads).
        if self._inserts:
            await defer.DeferredList(list(self._inserts))
        gateways, self._dirty_gateways = self._dirty_gateways, set()
        nodes, self._dirty_nodes = self._dirty_nodes, set()
        gw_rows, node_rows = [], []
        # Sorted: hubs updating the same rows lock them in one order (no deadlock between them).
        for gid in sorted(gateways):
            g = self.gateways.get(gid)
            if g is not None:
                gw_rows.append((g.last_seen, g.state, g.since, g.unsaved, gid))
                g.unsaved = 0
        for mac in sorted(nodes):
            n = self.nodes.get(mac)
            if n is not None:
                node_rows.append((n.last_seen, n.gateway, n.rssi, n.unsaved, json.dumps(n.values), mac))
                n.unsaved = 0
        if not gw_rows and not node_rows:
            return

        def write(cursor: Any) -> None:
            if gw_rows:
                cursor.executemany("UPDATE ble_gateways SET last_seen = ?, state = ?, since = ?,"
                                   " messages = messages + ? WHERE id = ?", gw_rows)
            if node_rows:
                cursor.executemany("UPDATE ble_nodes SET last_seen = ?, gateway = ?, rssi = ?,"
                                   " readings = readings + ?, last_values = ? WHERE mac = ?", node_rows)

        await self.hub.store.interaction(write)

    async def prune(self) -> None:
        cutoff = self.clock.seconds() - self.config.retention
        await self.hub.store.execute("DELETE FROM ble_samples WHERE time < ?", (cutoff,))
        await self.hub.store.execute("DELETE FROM ble_readings WHERE time < ?", (cutoff,))

    # -- registry changes (REST and MQTT commands)

    async def forget_gateway(self, gid: str) -> bool:
        if not self._drop_gateway(gid):
            return False
        if self._inserts:  # its registration may not have landed yet
            await defer.DeferredList(list(self._inserts))
        await self.hub.store.execute("DELETE FROM ble_gateways WHERE id = ?", (gid,))
        await self.changes.note("gateway", gid)
        # An empty retained message clears the state: subscribers no longer see a gateway that is gone.
        if self.hub.mqtt is not None:
            self.hub.mqtt.publish(self.hub.mqtt.topic(f"ble/gw/{gid}/state"), b"", retain=True).addErrback(
                errback(self.log, "ble: clearing the state of {gateway} failed", gateway=gid))
        return True

    async def forget_node(self, mac: str) -> bool:
        if not self._drop_node(mac):
            return False
        if self._inserts:  # its registration may not have landed yet
            await defer.DeferredList(list(self._inserts))

        def delete(cursor: Any) -> None:
            for table in ("ble_samples", "ble_readings", "ble_nodes"):
                cursor.execute(f"DELETE FROM {table} WHERE mac = ?", (mac,))

        await self.hub.store.interaction(delete)
        await self.changes.note("node", mac)
        return True

    async def command(self, kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/ble/gw/{id}/cmd/forget` and `{p}/ble/node/{mac}/cmd/forget`: drop from the registry."""
        if name != "forget":
            raise CommandError(f"unknown command {name!r}; the ble family takes: forget")
        if kind == "gw":
            found = await self.forget_gateway(id)
        elif kind == "node":
            try:
                mac = normalize_mac(id)
            except Rejected as e:
                raise CommandError(e.detail) from None
            found = await self.forget_node(mac)
        else:
            raise CommandError(f"unknown kind {kind!r}; expected gw or node")
        if not found:
            raise CommandError(f"no such {kind} {id}")
        return {"forgotten": id}
