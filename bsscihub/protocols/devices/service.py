"""The `devices` family at run time: telemetry and status in, commands and OTA offers out, all tracked.

The registry lives in memory (loaded at start, written back every few seconds); telemetry is group-committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from bsscihub import blobs, ingest, tokens
from bsscihub.bus import Event
from bsscihub.contract import finite_doc, opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import FamilyService
from bsscihub.health import ComponentHealth
from bsscihub.hub import Hub
from bsscihub.ingest import Rejected, errback
from bsscihub.mqtt.dynsec import DynsecError, NoProvisioning, make_client
from bsscihub.registry_sync import RegistryChanges, RegistryFull, SharedRegistry

TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
COMMAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VALUE_RANGE = (-1e12, 1e12)
STATE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
FLUSH_EVERY = 2.0
CLUSTER_LOAD_EVERY = 5.0
"""Seconds between looks for the devices other hubs of a cluster registered."""
CLUSTER_LOAD_MARGIN = 60.0
"""How far back each look reaches: registrations are written a little after they happen (group commit)."""
FIRMWARE_PART = blobs.PART
"""Bytes of a firmware image per database row: a download is read and sent a part at a time."""
FIRMWARE_BLOBS = "devices.firmware"
"""The images' owner in the core blob store (bsscihub.blobs), each named by its SHA-256."""
KEY_SCHEME = "bdk"
ORG_KEY_SCHEME = "bok"
# Keys minted before had no prefix of their own (`bdk_<secret>`, the prefix cut from the secret): still read.
DEVICE_KEYS = tokens.Scheme(KEY_SCHEME, unprefixed=True)
ORG_KEYS = tokens.Scheme(ORG_KEY_SCHEME, unprefixed=True)
RESERVED_IDS = frozenset({"firmware", "register", "org-keys"})
"""Path segments of the REST API next to /devices/{id}: no device may be called so."""
OTA_STATES = ("offered", "downloading", "installing", "done", "failed", "rejected", "timeout")
OTA_REPORTS = ("downloading", "installing", "done", "failed", "rejected")
# What devices of earlier platforms answer on OTA/{id}/response, as the states above.
OTA_ALIASES = {"success": "done", "succeeded": "done", "ok": "done", "completed": "done", "failure": "failed",
               "fail": "failed", "error": "failed"}
CHECKSUM = re.compile(r"^[A-Za-z0-9:+/=_-]{8,160}$")
OTA_FINAL = ("done", "failed", "rejected", "timeout")
OTA_OPEN = "('offered', 'downloading', 'installing')"
DEVICE_COLUMNS = ("id, name, first_seen, last_seen, registered_via, status, status_detail, status_time, firmware,"
                  " messages")


class DeviceError(CommandError):
    """A command or REST call about a device that cannot be done; `http_status` for the web layer."""

    def __init__(self, message: str, http_status: int = 409, code: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code or {404: "not_found", 409: "conflict", 503: "unavailable"}.get(http_status, "invalid")


def hash_device_key(device_id: str, secret: str) -> str:
    """HMAC-SHA256 of the key, keyed by the device id.

    A fast hash is enough: the key is 256 random bits, so there is nothing to guess, and a slow
    password hash would only cost CPU on every HTTPS ingestion. Keying by the device id binds a
    stored hash to its device (a row copied onto another device never verifies).
    """
    return "hmac-sha256:" + tokens.hmac_sha256_hex(device_id, secret)


@contextlib.contextmanager
def _from_device(device_id: str) -> Iterator[None]:
    """A message rejected inside is counted and logged against `device_id`."""
    try:
        yield
    except Rejected as e:
        e.source = device_id
        raise


def check_type(value: Any, name: str = "type") -> str:
    if not isinstance(value, str):
        raise Rejected(ingest.WRONG_TYPE, f"{name}: expected a string, got {ingest.type_name(value)}")
    if not TYPE.match(value):
        raise Rejected(ingest.IMPLAUSIBLE, f"{name}: {value[:70]!r} is not 1-64 letters, digits, '_', '.', '-'")
    return value


@attrs.define
class Device:
    id: str
    first_seen: float
    registered_via: str
    name: str = ""
    last_seen: float | None = None
    status: str = ""
    status_detail: dict[str, Any] = attrs.field(factory=dict)
    status_time: float | None = None
    firmware: str = ""
    messages: int = 0
    unsaved: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"deviceId": self.id, "name": self.name, "firstSeen": rfc3339(self.first_seen),
                "lastSeen": opt_time(self.last_seen), "registeredVia": self.registered_via, "status": self.status,
                "statusDetail": self.status_detail, "statusTime": opt_time(self.status_time),
                "firmware": self.firmware, "messages": self.messages}


@attrs.define
class Pending:
    """A command or OTA offer waiting for the device's answer."""

    id: str
    device: str
    name: str
    timer: Any = None
    firmware: int = 0
    version: str = ""


class DevicesService(FamilyService):
    """Generic MQTT devices: registry, telemetry, status, commands with results, device keys, OTA."""

    log = Logger()
    family = "devices"
    topic_root = "dev"

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.config = hub.config.section("devices")
        self.clock = hub.reactor
        self.devices: dict[str, Device] = {}
        self.commands: dict[str, Pending] = {}
        self.offers: dict[str, Pending] = {}
        # A device's answers are taken in arrival order even when one waits for the database (cluster).
        self._answering: dict[str, defer.DeferredLock] = {}
        self.stored = 0
        self.firmware_dir = Path(hub.config.data_dir) / "firmware"
        self._dirty: set[str] = set()
        self._inserts: set[defer.Deferred[Any]] = set()
        self._renames: set[defer.Deferred[Any]] = set()
        # Group-committed like telemetry: a fleet seen for the first time must not cost a commit per device.
        self._registrations = hub.store.batch_writer(
            "INSERT INTO dev_devices (id, name, first_seen, registered_via) VALUES {rows}"
            " ON CONFLICT (id) DO NOTHING"
        )
        self._key_used: dict[str, float] = {}
        self._telemetry = hub.store.batch_writer(
            "INSERT INTO dev_telemetry (device, type, time, value) VALUES {rows}"
        )
        self._limit = ingest.RegistrationLimit(self.clock, self.config.max_devices,
                                               self.config.registrations_per_minute,
                                               limiter=hub.cluster.limiter, name="devices.registrations")
        # In a cluster the shared database decides on each new device: within the cap for all hubs, and
        # announced by the hub whose insert made the row.
        self.shared = SharedRegistry(
            hub.store, "dev_devices", "id", ("id", "name", "first_seen", "registered_via"), self.config.max_devices,
            DEVICE_COLUMNS.split(", ")) if hub.cluster.clustered else None
        self.broker: Any = self._make_broker()
        self._flusher = self.looping(self._flush_registry, "writing the registry")
        self._pruner = self.looping(self.prune, "pruning old telemetry")
        self._silence = self.looping(self.check_silence, "marking silent devices offline")
        self._others = self.looping(self._load_others, "loading the other hubs' registrations")
        self._loaded_at = 0.0
        self.changes = RegistryChanges(hub, "devices", self._reload)

    def _make_broker(self) -> Any:
        if self.config.broker_provisioning != "dynsec":
            return NoProvisioning()
        return make_client(self.hub.config.mqtt, self.config.dynsec_url, self.config.dynsec_username,
                           self.config.dynsec_password, "devices", self.hub.reactor)

    # -- lifecycle

    async def _load_registry(self, since: float | None = None) -> None:
        """The registry's rows this hub does not hold yet (all, or those first seen since `since`)."""
        rows = await self.hub.store.fetchall(
            f"SELECT {DEVICE_COLUMNS} FROM dev_devices" + ("" if since is None else " WHERE first_seen >= ?"),
            () if since is None else (since,))
        for row in rows:
            if row[0] not in self.devices:
                self._adopt(row)

    async def _read_in(self, device_id: str) -> bool:
        """A cluster: a device another hub registered, taken in now rather than at this hub's next look."""
        row = await self.hub.store.fetchone(f"SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE id = ?", (device_id,))
        if row is not None and device_id not in self.devices:
            self._adopt(row)
        return device_id in self.devices

    def _adopt(self, row: Sequence[Any]) -> Device:
        """A device as stored (DEVICE_COLUMNS) into memory."""
        did, name, first, last, via, status, detail, status_time, firmware, messages = row
        device = self.devices[did] = Device(did, float(first), via, name, last, status, json.loads(detail),
                                            status_time, firmware, int(messages))
        return device

    async def _load_open(self, since: float | None = None) -> None:
        """Commands and offers open in the database and not held here (all, or those made since `since`),
        each with a timer for its deadline."""
        now = self.clock.seconds()
        after = "" if since is None else " AND created_at >= ?"
        params = () if since is None else (since,)
        for cid, device, name, deadline in await self.hub.store.fetchall(
            "SELECT id, device, name, deadline FROM dev_commands WHERE state = 'sent'" + after, params
        ):
            if cid not in self.commands:
                pending = self.commands[cid] = Pending(cid, device, name)
                pending.timer = self.clock.callLater(max(0.0, float(deadline) - now), self._command_timed_out, cid)
        for oid, device, firmware, deadline, version in await self.hub.store.fetchall(
            "SELECT o.id, o.device, o.firmware, o.deadline, COALESCE(o.version, f.version) FROM dev_ota o"
            f" LEFT JOIN dev_firmware f ON f.id = o.firmware WHERE o.state IN {OTA_OPEN}"
            + after.replace("created_at", "o.created_at"), params
        ):
            if oid not in self.offers:
                offer = self.offers[oid] = Pending(oid, device, "ota", firmware=int(firmware), version=version)
                offer.timer = self.clock.callLater(max(0.0, float(deadline) - now), self._offer_timed_out, oid)

    async def _load_others(self) -> None:
        """In a cluster: the devices the other hubs registered lately, so that this hub's API knows them, and
        the commands and offers they made, so that they time out here too if their hub dies (once: the first
        hub to settle one wins)."""
        since, self._loaded_at = self._loaded_at - CLUSTER_LOAD_MARGIN, self.clock.seconds()
        await self._load_registry(since)
        await self._load_open(since)
        await self.changes.poll()

    async def _reload(self, kind: str, ids: Sequence[str]) -> None:
        """Devices another hub of a cluster renamed or removed: their names from the database, or gone."""
        rows = await self.hub.store.fetchall(
            f"SELECT id, name FROM dev_devices WHERE id IN ({', '.join('?' * len(ids))})", tuple(ids))
        names = {did: name for did, name in rows}
        for did in ids:
            device = self.devices.get(did)
            if device is None:
                continue
            if did in names:
                device.name = names[did]
            else:
                self._drop(did)

    async def prepare(self) -> None:
        self._loaded_at = self.clock.seconds()
        await self._load_registry()
        if self.hub.cluster.clustered:
            self._others.start(CLUSTER_LOAD_EVERY, now=False).addErrback(
                errback(self.log, "devices: loading the other hubs' registrations stopped"))
        # Commands and offers still open when the hub stopped keep their deadlines.
        await self._load_open()
        await self._import_firmware_files()
        self._flusher.start(FLUSH_EVERY, now=False)
        self._pruner.start(3600.0, now=True)
        check = max(0.05, min(self.config.offline_after / 4, 15.0))
        self._silence.start(check, now=False).addErrback(errback(self.log, "devices: silence checker stopped"))
        if self.broker.enabled:
            self.hub.health.register(
                "devices_broker", lambda: ComponentHealth(self.broker.connected, {"provisioning": "dynsec"}),
                needed=False)
        self.broker.start()

    async def drain(self) -> None:
        for loop in (self._flusher, self._pruner, self._silence, self._others):
            if loop.running:
                loop.stop()
        for pending in (*self.commands.values(), *self.offers.values()):
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
        if self.shared is not None:
            await self.shared.settled()
        await self._flush_registry()
        if self._renames:
            await defer.DeferredList(list(self._renames))
        await self.broker.stop()

    def subscriptions(self) -> Mapping[str, Any]:
        root, ota = self.config.device_root, self.config.ota_root
        found: dict[str, Any] = {f: self.on_sensor_data for f in self.config.sensor_topics}
        found[f"{root}/+/telemetry/+"] = self.on_telemetry
        found[f"{root}/+/status"] = self.on_status
        found[f"{root}/+/commands/+/result"] = self.on_command_result
        found[f"{ota}/+/response"] = self.on_ota_response
        return found

    # -- ingress

    def on_sensor_data(self, topic: str, payload: bytes, properties: Any = None) -> defer.Deferred[None] | None:
        """`SensorData/...`: {"device_id", "type", "value", "time"?}."""
        doc = ingest.json_object(payload, self.config.max_payload)
        device_id = ingest.identifier(doc, "device_id")
        levels = topic.split("/")
        if self.broker.enabled and len(levels) == 2 and levels[1] != device_id:
            # The broker lets each device publish only SensorData/{its id}: the payload may not claim another.
            raise Rejected(ingest.BAD_TOPIC, f"device_id {device_id!r} on another device's topic", source=levels[1])
        with _from_device(device_id):
            kind = check_type(ingest.require(doc, "type"))
            value, when = self._reading(doc)
        return self._once_known(device_id, topic, lambda: self.record(
            device_id, kind, value, when, "mqtt", topic))  # type: ignore[arg-type]

    def on_telemetry(self, topic: str, payload: bytes, properties: Any = None) -> defer.Deferred[None] | None:
        """`device/{id}/telemetry/{type}`: a JSON number, or {"value", "time"?}."""
        levels = topic.split("/")
        device_id = self._topic_device(levels[1], topic)
        with _from_device(device_id):
            kind = check_type(levels[3], "type (topic)")
            doc = ingest.parse_json(payload, self.config.max_payload)
            if not isinstance(doc, dict):
                doc = {"value": doc}
            value, when = self._reading(doc)
        return self._once_known(device_id, topic, lambda: self.record(
            device_id, kind, value, when, "mqtt", topic))  # type: ignore[arg-type]

    def _reading(self, doc: Mapping[str, Any]) -> tuple[float | None, float]:
        """A telemetry document's value and the time it was measured (now when the device sends none)."""
        return ingest.number(doc, "value", *VALUE_RANGE), ingest.device_time(doc, "time", self.clock.seconds())

    def on_status(self, topic: str, payload: bytes, properties: Any = None) -> defer.Deferred[None] | None:
        """`device/{id}/status`: a JSON object ({"state"|"status", ...}), a JSON string, or a bare word
        such as `online` / `offline` (what most devices set as their MQTT will)."""
        device_id = self._topic_device(topic.split("/")[1], topic)
        with _from_device(device_id):
            state, detail = self._parse_status(payload)
            return self._once_known(device_id, topic, lambda: self._status(device_id, state, detail, topic))

    def _status(self, device_id: str, state: str, detail: dict[str, Any], topic: str) -> None:
        with _from_device(device_id):
            device = self._seen(device_id, "mqtt", topic, status=False)
        now = self.clock.seconds()
        device.status, device.status_detail, device.status_time = state, detail, now
        firmware = detail.get("firmware", detail.get("version"))
        if isinstance(firmware, str) and len(firmware) <= 64:
            device.firmware = firmware
        device.last_seen = now
        self._dirty.add(device_id)
        self.ingest.accepted()
        self._status_event(device)

    def _parse_status(self, payload: bytes) -> tuple[str, dict[str, Any]]:
        try:
            doc = ingest.parse_json(payload, self.config.max_payload)
        except Rejected as e:
            word = payload.decode("utf-8", "replace").strip()
            if e.reason == ingest.NOT_JSON and STATE.match(word):
                return word.lower(), {}
            raise
        if isinstance(doc, str):
            doc = {"state": doc}
        if isinstance(doc, dict):
            doc = finite_doc(doc)  # NaN/±Infinity: null, named under "invalid"
        if not isinstance(doc, dict):
            raise Rejected(ingest.WRONG_TYPE, f"status: expected an object or a word, got {ingest.type_name(doc)}")
        state = doc.get("state", doc.get("status", ""))
        if not isinstance(state, str):
            raise Rejected(ingest.WRONG_TYPE, f"state: expected a string, got {ingest.type_name(state)}")
        if state and not STATE.match(state):
            raise Rejected(ingest.IMPLAUSIBLE, f"state: {state[:40]!r} is not a short word")
        return state.lower(), doc

    def _topic_device(self, level: str, topic: str) -> str:
        try:
            return ingest.check_identifier(level, "device id (topic)")
        except Rejected as e:
            raise Rejected(ingest.BAD_TOPIC, e.detail) from None

    def record(self, device_id: str, kind: str, value: float, when: float, via: str, topic: str) -> None:
        """One telemetry value: registry, storage (group-committed), `{p}/dev/device/{id}/up`."""
        device = self._seen(device_id, via, topic)
        now = self.clock.seconds()
        device.last_seen = now
        device.messages += 1
        device.unsaved += 1
        self._dirty.add(device_id)
        self._telemetry.add((device_id, kind, when, value)).addCallbacks(
            self._stored, errback(self.log, "devices: storing telemetry failed"))
        self.ingest.accepted()
        self.emit("up", f"dev/device/{device_id}/up", {
            "deviceId": device_id, "type": kind, "value": value, "time": rfc3339(when), "via": via,
            "values": {kind: value},
        })

    def _stored(self, _: Any) -> None:
        self.stored += 1

    def _seen(self, device_id: str, via: str, topic: str, *, status: bool = True) -> Device:
        """The device a message comes from, registered if new (and allowed); a device that speaks is online,
        unless the message is its own status (which says so itself)."""
        device = self.devices.get(device_id)
        if device is None:
            device = self._auto_register(device_id, via, topic)
        if status and device.status != "online":
            device.status, device.status_detail = "online", {}
            device.status_time = self.clock.seconds()
            self._dirty.add(device_id)
            self._status_event(device)
        return device

    def _status_event(self, device: Device) -> None:
        self.emit("status", f"dev/device/{device.id}/status",
                  {"deviceId": device.id, "state": device.status, "detail": device.status_detail,
                   "time": opt_time(device.status_time)}, retain=True)

    def check_silence(self) -> defer.Deferred[None] | None:
        """Online devices silent for `devices.offline_after` go offline (one status event each)."""
        cutoff = self.clock.seconds() - self.config.offline_after
        silent = [d for d in self.devices.values()
                  if d.status == "online" and (d.last_seen or d.first_seen) < cutoff]
        if silent and self.hub.cluster.clustered:
            return defer.Deferred.fromCoroutine(self._silent_everywhere(silent))
        for device in silent:
            self._gone_silent(device)
        return None

    async def _silent_everywhere(self, silent: list[Device]) -> None:
        """In a cluster the other hubs may have heard these devices: their registry writes say when."""
        rows = await self.hub.store.fetchall(
            f"SELECT id, last_seen FROM dev_devices WHERE id IN ({', '.join('?' * len(silent))})",
            tuple(d.id for d in silent))
        heard = {did: float(last) for did, last in rows if last is not None}
        cutoff = self.clock.seconds() - self.config.offline_after
        for device in silent:
            last = max(device.last_seen or device.first_seen, heard.get(device.id, 0.0))
            if last > (device.last_seen or 0.0):
                device.last_seen = last
            if device.status == "online" and last < cutoff:
                self._gone_silent(device)

    def _gone_silent(self, device: Device) -> None:
        device.status, device.status_detail = "offline", {"reason": "silent"}
        device.status_time = self.clock.seconds()
        self._dirty.add(device.id)
        self.log.info("device {device} offline: silent for {seconds:g} s", device=device.id,
                      seconds=self.config.offline_after)
        self._status_event(device)

    def _once_known(self, device_id: str, topic: str, step: Callable[[], None]) -> defer.Deferred[None] | None:
        """step() now; in a cluster, a message from a device this hub does not know runs it once the shared
        database decided on registering the device (messages of a device being registered wait as well)."""
        if self.shared is None or device_id in self.devices:
            step()
            return None
        if not self.shared.registering(device_id):
            self._may_register(device_id, "mqtt", topic)
        decided = self.shared.insert(device_id, (device_id, "", self.clock.seconds(), "mqtt")).addCallbacks(
            self._decided, self._refused, (device_id, "mqtt"), errbackArgs=(device_id, topic))
        return decided.addCallback(lambda _: step())

    def _decided(self, stored: tuple[Any, ...] | None, device_id: str, via: str, name: str = "") -> Device:
        """A new device once the shared database decided: this hub's (announced) or another hub's (adopted)."""
        device = self.devices.get(device_id)
        if device is not None:  # an earlier message's decision, or the others' rows loaded meanwhile
            return device
        if stored is not None:
            return self._adopt(stored)
        return self._registered(device_id, via, name, self.clock.seconds())

    def _refused(self, failure: Any, device_id: str, topic: str) -> None:
        failure.trap(RegistryFull)
        raise self._limit.full(self._source("mqtt", topic), f"new device {device_id}")

    def _source(self, via: str, topic: str) -> str:
        # Per ingress path: which broker client sent a message is not known to a subscriber.
        return via if via != "mqtt" else "mqtt:" + topic.split("/")[0]

    def _auto_register(self, device_id: str, via: str, topic: str) -> Device:
        self._may_register(device_id, via, topic)
        return self._register(device_id, via)

    def _may_register(self, device_id: str, via: str, topic: str) -> None:
        """Raise Rejected unless a message may register this device (devices.auto_register, the limits)."""
        if not self.config.auto_register:
            # One event per device per minute: a flood from an unknown device must not flood subscribers.
            if self.ingest.reject_log.allow("event:" + device_id):
                self.emit("rejected", f"dev/device/{device_id}/event/rejected", {
                    "deviceId": device_id, "reason": "unknown device (auto_register is off)", "topic": topic,
                    "time": rfc3339(self.clock.seconds())})
            raise Rejected(ingest.UNKNOWN_DEVICE, "unknown device and devices.auto_register is off",
                           source=device_id)
        self._limit.check(self._source(via, topic), len(self.devices), f"new device {device_id}")

    def _register(self, device_id: str, via: str, name: str = "") -> Device:
        """One hub: a new device, its row group-committed."""
        now = self.clock.seconds()
        self._insert((device_id, name, now, via))
        return self._registered(device_id, via, name, now)

    async def _register_shared(self, device_id: str, via: str, name: str, capped: bool, source: str) -> Device:
        """A cluster: a new device if the shared database takes it; else 409 (another hub has it) or 429 (full)."""
        assert self.shared is not None
        try:
            stored = await self.shared.insert(device_id, (device_id, name, self.clock.seconds(), via), capped=capped)
        except RegistryFull:
            raise DeviceError(self._limit.full(source, f"new device {device_id}").detail, 429,
                              "registration_limit") from None
        if stored is not None or device_id in self.devices:
            if device_id not in self.devices:
                self._adopt(stored)  # type: ignore[arg-type]
            raise DeviceError(f"device {device_id} is already registered", 409)
        return self._registered(device_id, via, name, self.clock.seconds())

    def _registered(self, device_id: str, via: str, name: str, now: float) -> Device:
        device = self.devices[device_id] = Device(device_id, now, via, name)
        self.log.info("device {device} registered via {via}", device=device_id, via=via)
        self.emit("registered", f"dev/device/{device_id}/event/registered",
                  {"deviceId": device_id, "via": via, "time": rfc3339(now)})
        return device

    # -- registry (REST)

    async def register(self, device_id: str, name: str = "") -> Device:
        self.check_new_id(device_id)
        if self.shared is not None:  # no cap: an operator's registration
            return await self._register_shared(device_id, "api", name, False, "api")
        return self._register(device_id, "api", name)

    def get(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise DeviceError(f"device {device_id} not found", 404)
        return device

    def rename(self, device_id: str, name: str) -> Device:
        device = self.get(device_id)
        device.name = name
        # Written on its own, not with the registry's periodic write: in a cluster another hub writes the rows
        # of the devices it hears, with the name it knew.
        d = defer.Deferred.fromCoroutine(self._write_name(device_id, name))
        d.addErrback(errback(self.log, "devices: renaming {device} failed", device=device_id))
        self._renames.add(d)
        d.addBoth(lambda _: self._renames.discard(d))
        return device

    async def _write_name(self, device_id: str, name: str) -> None:
        if self._inserts:  # its registration may not have landed yet
            await defer.DeferredList(list(self._inserts))
        await self.hub.store.execute("UPDATE dev_devices SET name = ? WHERE id = ?", (name, device_id))
        await self.changes.note("device", device_id)

    async def forget(self, device_id: str) -> None:
        self.get(device_id)
        await self._remove_account(device_id)
        self._drop(device_id)

        if self._inserts:  # its registration may not have landed yet
            await defer.DeferredList(list(self._inserts))

        def delete(cursor: Any) -> None:
            for table, column in (("dev_telemetry", "device"), ("dev_commands", "device"), ("dev_keys", "device"),
                                  ("dev_ota", "device"), ("dev_devices", "id")):
                cursor.execute(f"DELETE FROM {table} WHERE {column} = ?", (device_id,))

        await self.hub.store.interaction(delete)
        await self.changes.note("device", device_id)
        # An empty retained message clears the status: subscribers no longer see a device that is gone.
        if self.hub.mqtt is not None:
            self.hub.mqtt.publish(self.hub.mqtt.topic(f"dev/device/{device_id}/status"), b"", retain=True).addErrback(
                errback(self.log, "devices: clearing the status of {device} failed", device=device_id))

    def _drop(self, device_id: str) -> None:
        """A removed device out of memory, with the timers of its open commands and offers."""
        self.devices.pop(device_id, None)
        self._dirty.discard(device_id)
        self._key_used.pop(device_id, None)
        for table in (self.commands, self.offers):
            for pending in [p for p in table.values() if p.device == device_id]:
                if pending.timer is not None and pending.timer.active():
                    pending.timer.cancel()
                del table[pending.id]

    # -- commands

    async def command(self, kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/dev/device/{id}/cmd/{name}` (forwarded to the device) and `{p}/dev/ota/{id}/cmd/start`."""
        if kind == "device":
            return await self.send_command(id, name, payload, "mqtt")
        if kind == "ota" and name == "start":
            if isinstance(payload, dict) and "firmware_url" in payload:
                return await self.offer_hosted(id, payload.get("firmware_version"), payload.get("firmware_url"),
                                               payload.get("checksum"), "mqtt")
            firmware = payload.get("firmware") if isinstance(payload, dict) else None
            if isinstance(firmware, bool) or not isinstance(firmware, int):
                raise DeviceError('expected {"firmware": id}', 400)
            return await self.offer(id, firmware, "mqtt")
        raise DeviceError(f"unknown command {kind}/{name}; expected device/<name> or ota/start", 400)

    async def send_command(self, device_id: str, name: str, args: Any, actor: str) -> dict[str, Any]:
        """Publish `device/{id}/commands/{name}` with {"id", "name", "args"}; the answer is tracked."""
        self.get(device_id)
        if not COMMAND.match(name):
            raise DeviceError(f"command name {name[:70]!r}: expected 1-64 letters, digits, '_', '.', '-'", 400)
        body = json.dumps({"id": "", "name": name, "args": args})
        if len(body) > self.config.max_payload:
            raise DeviceError(f"command arguments over {self.config.max_payload} bytes", 400)
        mqtt = self._mqtt()
        cid = secrets.token_hex(8)
        now = self.clock.seconds()
        deadline = now + self.config.command_timeout
        await self.hub.store.execute(
            "INSERT INTO dev_commands (id, device, name, args, state, created_at, deadline, actor)"
            " VALUES (?, ?, ?, ?, 'sent', ?, ?, ?)", (cid, device_id, name, json.dumps(args), now, deadline, actor))
        # Tracked before it is published: a quick device may answer before publish() returns.
        pending = self.commands[cid] = Pending(cid, device_id, name)
        pending.timer = self.clock.callLater(self.config.command_timeout, self._command_timed_out, cid)
        message = {"id": cid, "name": name, "args": args}
        try:
            await mqtt.publish(f"{self.config.device_root}/{device_id}/commands/{name}",
                               json.dumps(message).encode())
        except Exception as e:
            await self._finish_command(cid, "failed", None, f"not published: {e}")
            raise DeviceError(f"command not sent: {e}", 503) from None
        return {"commandId": cid, "deviceId": device_id, "command": name, "state": "sent",
                "deadline": rfc3339(deadline)}

    def on_command_result(self, topic: str, payload: bytes, properties: Any = None) -> Any:
        """`device/{id}/commands/{name}/result`: {"id", "ok"?, "result"?, "error"?}."""
        levels = topic.split("/")
        device_id = self._topic_device(levels[1], topic)
        with _from_device(device_id):
            doc = finite_doc(ingest.json_object(payload, self.config.max_payload))
            cid = ingest.text(doc, "id")
            ok = doc.get("ok", "error" not in doc)
            if not isinstance(ok, bool):
                raise Rejected(ingest.WRONG_TYPE, f"ok: expected true or false, got {ingest.type_name(ok)}")
            error = ingest.text(doc, "error", max_length=500, required=False)
        return self._in_order(device_id, lambda: defer.Deferred.fromCoroutine(
            self._command_answered(device_id, str(cid), "ok" if ok else "failed", doc.get("result"), error)))

    def _in_order(self, device_id: str, step: Any) -> defer.Deferred[None]:
        lock = self._answering.get(device_id)
        if lock is None:
            lock = self._answering[device_id] = defer.DeferredLock()

        def done(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._answering.get(device_id) is lock:
                del self._answering[device_id]
            return result

        d: defer.Deferred[None] = lock.run(step)
        return d.addBoth(done)

    async def _command_answered(self, device_id: str, cid: str, state: str, result: Any, error: str | None) -> None:
        pending = self.commands.get(cid)
        if pending is None:
            # In a cluster the answer may reach another hub than the one that sent the command.
            row = await self.hub.store.fetchone(
                "SELECT name FROM dev_commands WHERE id = ? AND device = ? AND state = 'sent'", (cid, device_id))
            pending = Pending(cid, device_id, row[0]) if row is not None else None
        if pending is None or pending.device != device_id:
            raise Rejected(ingest.UNKNOWN_COMMAND, f"no open command {cid!r} for this device", source=device_id)
        self.ingest.accepted()
        await self._finish_command(cid, state, result, error, pending)

    def _command_timed_out(self, cid: str) -> None:
        defer.Deferred.fromCoroutine(
            self._finish_command(cid, "timeout", None, f"no answer within {self.config.command_timeout:g} s")
        ).addErrback(errback(self.log, "devices: timing out command {cid} failed", cid=cid))

    async def _finish_command(self, cid: str, state: str, result: Any, error: str | None,
                              elsewhere: Pending | None = None) -> None:
        pending = self.commands.pop(cid, None) or elsewhere
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        now = self.clock.seconds()
        finished = await self.hub.store.execute(
            "UPDATE dev_commands SET state = ?, result = ?, error = ?, answered_at = ? WHERE id = ? AND state = 'sent'",
            (state, json.dumps(result) if result is not None else None, error, now, cid))
        if not finished:
            return  # another hub of the cluster took the answer first
        self.emit("command_result", f"dev/device/{pending.device}/event/command_result", {
            "commandId": cid, "deviceId": pending.device, "command": pending.name, "state": state,
            "ok": state == "ok", "result": result, "error": error, "time": rfc3339(now)})

    async def get_command(self, device_id: str, cid: str) -> dict[str, Any] | None:
        row = await self.hub.store.fetchone(
            "SELECT id, name, args, state, result, error, created_at, deadline, answered_at, actor"
            " FROM dev_commands WHERE device = ? AND id = ?", (device_id, cid))
        return _command_json(device_id, row) if row else None

    async def list_commands(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        rows = await self.hub.store.fetchall(
            "SELECT id, name, args, state, result, error, created_at, deadline, answered_at, actor"
            " FROM dev_commands WHERE device = ? ORDER BY created_at DESC LIMIT ?", (device_id, limit))
        return [_command_json(device_id, row) for row in rows]

    def _mqtt(self) -> Any:
        if self.hub.mqtt is None:
            raise DeviceError("the MQTT bridge is not running", 503)
        return self.hub.mqtt

    # -- device keys (HTTPS ingestion)

    async def create_key(self, device_id: str) -> dict[str, Any]:
        """A new key for the device (replacing any old one); the key itself is returned only here.

        With devices.broker_provisioning: dynsec it is also the device's broker password (username: the
        device id), limited to the device's own topics.
        """
        self.get(device_id)
        token, stored = DEVICE_KEYS.mint(lambda t: hash_device_key(device_id, t.secret))
        prefix, key = token.prefix, token.text
        try:
            await self.broker.set_account(device_id, key, self.device_acls(device_id), "device")
        except DynsecError as e:
            raise DeviceError(f"the broker account could not be provisioned: {e}", 503, "broker_unavailable") \
                from None
        now = self.clock.seconds()
        await self.hub.store.execute(
            "INSERT INTO dev_keys (device, prefix, secret_hash, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (device) DO UPDATE SET prefix = excluded.prefix, secret_hash = excluded.secret_hash,"
            " created_at = excluded.created_at, last_used_at = NULL",
            (device_id, prefix, stored, now))
        return {"deviceId": device_id, "key": key, "prefix": prefix, "createdAt": rfc3339(now),
                "mqtt": self.mqtt_credentials(device_id, key)}

    def device_acls(self, device_id: str) -> list[dict[str, Any]]:
        """Exactly the device's own topics: device/{id}/#, its OTA topics and SensorData/{id}; receiving
        anything else is denied explicitly (a subscription kept in a session must not leak)."""
        own, ota = f"{self.config.device_root}/{device_id}/#", f"{self.config.ota_root}/{device_id}"

        def rule(acltype: str, topic: str, allow: bool = True, priority: int = 10) -> dict[str, Any]:
            return {"acltype": acltype, "topic": topic, "priority": priority, "allow": allow}

        sensor = [rule("publishClientSend", f"{f[:-2]}/{device_id}") for f in self.config.sensor_topics
                  if f.endswith("/#")]
        return [rule("publishClientSend", own), rule("publishClientSend", f"{ota}/response"), *sensor,
                rule("subscribePattern", own), rule("subscribeLiteral", f"{ota}/update"),
                rule("publishClientReceive", own), rule("publishClientReceive", f"{ota}/update"),
                rule("publishClientReceive", "#", False, 0)]

    def mqtt_credentials(self, device_id: str, key: str) -> dict[str, Any]:
        """What a device needs to connect (shown once, with its key)."""
        from bsscihub.mqtt.client import MQTTSettings

        broker = MQTTSettings.from_url(self.config.device_mqtt_url or self.hub.config.mqtt.url)
        provisioned = bool(self.broker.enabled)
        root, ota = self.config.device_root, self.config.ota_root
        return {
            "url": f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}", "host": broker.host,
            "port": broker.port, "tls": broker.tls, "provisioned": provisioned,
            "username": device_id if provisioned else None, "password": key if provisioned else None,
            "client_id": device_id,
            "topics": {"publish": [f"{root}/{device_id}/telemetry/{{type}}", f"{root}/{device_id}/status",
                                   f"{ota}/{device_id}/response"],
                       "subscribe": [f"{root}/{device_id}/commands/+", f"{ota}/{device_id}/update"]},
        }

    # -- organisation keys: devices that register themselves

    async def create_org_key(self, name: str, actor: str) -> tuple[dict[str, Any], str]:
        token, stored = ORG_KEYS.mint(lambda t: hash_device_key(ORG_KEY_SCHEME, t.secret))
        now = self.clock.seconds()
        await self.hub.store.execute(
            "INSERT INTO dev_org_keys (name, prefix, secret_hash, created_at, created_by) VALUES (?, ?, ?, ?, ?)",
            (name, token.prefix, stored, now, actor))
        found = [k for k in await self.list_org_keys() if k["prefix"] == token.prefix]
        return found[0], token.text

    async def list_org_keys(self) -> list[dict[str, Any]]:
        rows = await self.hub.store.fetchall(
            "SELECT id, name, prefix, created_at, created_by, revoked_at, last_used_at, registrations"
            " FROM dev_org_keys ORDER BY id DESC")
        return [{"id": int(r[0]), "name": r[1], "prefix": r[2], "createdAt": opt_time(r[3]), "createdBy": r[4],
                 "revokedAt": opt_time(r[5]), "lastUsedAt": opt_time(r[6]), "registrations": int(r[7]),
                 "state": "revoked" if r[5] is not None else "active"} for r in rows]

    async def revoke_org_key(self, key_id: int) -> dict[str, Any]:
        done = await self.hub.store.execute(
            "UPDATE dev_org_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (self.clock.seconds(), key_id))
        found = [k for k in await self.list_org_keys() if k["id"] == key_id]
        if not found:
            raise DeviceError(f"organisation key {key_id} not found", 404)
        if not done:
            raise DeviceError(f"organisation key {key_id} is revoked already", 409)
        return found[0]

    async def self_register(self, org_key: str, device_id: str, name: str) -> dict[str, Any]:
        """A device registers itself with an organisation key: its own key and broker account come back."""
        token = ORG_KEYS.parse(org_key)
        row = None
        if token is not None:
            row = await self.hub.store.fetchone(
                "SELECT id, prefix FROM dev_org_keys WHERE secret_hash = ? AND revoked_at IS NULL",
                (hash_device_key(ORG_KEY_SCHEME, token.secret),))
        if row is None:
            raise DeviceError("missing, unknown or revoked organisation key", 401, "invalid_org_key")
        key_id, prefix = int(row[0]), row[1]
        self.check_new_id(device_id)
        try:
            self._limit.check(f"org-key:{prefix}", len(self.devices), f"new device {device_id}")
        except Rejected as e:
            raise DeviceError(e.detail, 429, "registration_limit") from None
        if self.shared is not None:
            await self._register_shared(device_id, "org-key", name, True, f"org-key:{prefix}")
        else:
            self._register(device_id, "org-key", name)
        try:
            created = await self.create_key(device_id)
        except DeviceError:
            with contextlib.suppress(DeviceError):
                await self.forget(device_id)  # no device without the account it was promised
            raise
        await self.hub.store.execute(
            "UPDATE dev_org_keys SET registrations = registrations + 1, last_used_at = ? WHERE id = ?",
            (self.clock.seconds(), key_id))
        return {**created, "name": name, "orgKey": prefix}

    def check_new_id(self, device_id: str) -> None:
        if device_id in RESERVED_IDS:
            raise DeviceError(f"device id {device_id!r} is reserved (a path of the API)", 400)
        if not ingest.IDENTIFIER.match(device_id):
            raise DeviceError("device id: expected 1-64 letters, digits, '_', '.', ':', '-'", 400)
        if device_id in self.devices:
            raise DeviceError(f"device {device_id} is already registered", 409)

    async def key_info(self, device_id: str) -> dict[str, Any] | None:
        row = await self.hub.store.fetchone(
            "SELECT prefix, created_at, last_used_at FROM dev_keys WHERE device = ?", (device_id,))
        return {"prefix": row[0], "createdAt": opt_time(row[1]), "lastUsedAt": opt_time(row[2])} if row else None

    async def revoke_key(self, device_id: str) -> bool:
        await self._remove_account(device_id)
        return bool(await self.hub.store.execute("DELETE FROM dev_keys WHERE device = ?", (device_id,)))

    async def _remove_account(self, device_id: str) -> None:
        # First, so that a key the hub no longer knows never keeps working at the broker.
        try:
            await self.broker.remove(device_id)
        except DynsecError as e:
            raise DeviceError(f"the broker account could not be removed: {e}", 503, "broker_unavailable") \
                from None

    async def check_key(self, device_id: str, key: str) -> bool:
        # A cluster: a device another hub registered since this hub's last look (every 5 s) has its key already.
        if DEVICE_KEYS.parse(key) is None or (device_id not in self.devices and self.shared is None):
            return False
        row = await self.hub.store.fetchone("SELECT secret_hash FROM dev_keys WHERE device = ?", (device_id,))
        stored = None if row is None else row[0]
        if DEVICE_KEYS.verify(key, stored, lambda t: hash_device_key(device_id, t.secret)) is None:
            return False
        if device_id not in self.devices and not await self._read_in(device_id):
            return False
        now = self.clock.seconds()
        # At most one write a minute per key: a write per request would cost more than the request.
        if now - self._key_used.get(device_id, 0.0) >= 60.0:
            self._key_used[device_id] = now
            await self.hub.store.execute("UPDATE dev_keys SET last_used_at = ? WHERE device = ?", (now, device_id))
        return True

    def http_telemetry(self, device_id: str, body: Any, topic: str) -> int:
        """`POST /api/v1/devices/{id}/telemetry`: {"type", "value", "time"?} or {"values": {type: value}, "time"?}.

        Validated like MQTT input (and counted the same way); returns how many values were stored.
        """
        try:
            if not isinstance(body, dict):
                raise Rejected(ingest.WRONG_TYPE, f"expected a JSON object, got {ingest.type_name(body)}")
            when = ingest.device_time(body, "time", self.clock.seconds())
            if "values" in body:
                values = body["values"]
                if not isinstance(values, dict) or not values:
                    raise Rejected(ingest.WRONG_TYPE, "values: expected an object of type: number")
                if len(values) > 100:
                    raise Rejected(ingest.IMPLAUSIBLE, "values: more than 100 types in one request")
                items = [(check_type(k), ingest.check_number(v, k, *VALUE_RANGE)) for k, v in values.items()]
            else:
                value = ingest.check_number(ingest.require(body, "value"), "value", *VALUE_RANGE)
                items = [(check_type(ingest.require(body, "type")), value)]
        except Rejected as e:
            e.source = device_id
            self.ingest.rejected(e, topic)
            raise
        for kind, value in items:
            self.record(device_id, kind, value, when, "http", topic)  # type: ignore[arg-type]
        return len(items)

    # -- telemetry queries

    async def telemetry(self, device_id: str, kind: str | None, since: float, until: float, limit: int
                        ) -> list[dict[str, Any]]:
        where, params = "device = ? AND time >= ? AND time < ?", [device_id, since, until]
        if kind:
            where += " AND type = ?"
            params.append(kind)
        rows = await self.hub.store.fetchall(
            f"SELECT type, time, value FROM dev_telemetry WHERE {where} ORDER BY time DESC LIMIT ?",
            (*params, limit))
        return [{"type": t, "time": rfc3339(float(tm)), "value": float(v)} for t, tm, v in rows]

    async def types(self, device_id: str) -> list[dict[str, Any]]:
        """Each telemetry type of a device with its latest value (index-only lookups, one per type)."""
        kinds = await self.hub.store.fetchall(
            "SELECT type, COUNT(*) FROM dev_telemetry WHERE device = ? GROUP BY type ORDER BY type", (device_id,))
        found = []
        for kind, count in kinds:
            row = await self.hub.store.fetchone(
                "SELECT time, value FROM dev_telemetry WHERE device = ? AND type = ? ORDER BY time DESC LIMIT 1",
                (device_id, kind))
            if row is not None:
                found.append({"type": kind, "count": int(count), "time": rfc3339(float(row[0])),
                              "value": float(row[1])})
        return found

    # -- firmware and OTA

    async def add_firmware(self, name: str, version: str, data: bytes, actor: str) -> dict[str, Any]:
        if not data:
            raise DeviceError("empty firmware image", 400)
        if len(data) > self.config.max_firmware:
            raise DeviceError(f"firmware over {self.config.max_firmware} bytes", 413)
        digest = hashlib.sha256(data).hexdigest()
        now = self.clock.seconds()

        def write(cursor: Any) -> None:
            # One transaction: the image is listed only once all its parts are in (whole or nothing).
            blobs.write(cursor, FIRMWARE_BLOBS, digest, data)
            cursor.execute(
                "INSERT INTO dev_firmware (name, version, sha256, size, created_at, actor) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sha256) DO NOTHING", (name, version, digest, len(data), now, actor))

        await self.hub.store.interaction(write)
        found = await self.get_firmware_by_hash(digest)
        assert found is not None
        return found

    async def firmware_parts(self, firmware: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """The image of a firmware row, read from the database a part at a time."""
        try:
            async for part in blobs.read(self.hub.store, FIRMWARE_BLOBS, firmware["sha256"], int(firmware["size"])):
                yield part
        except blobs.BlobMissing as e:
            raise DeviceError(f"firmware {firmware['id']}: {e}", 500) from None

    async def _import_firmware_files(self) -> None:
        """Images stored as files in data_dir/firmware by earlier versions go into the database (then the file
        goes): every hub of a cluster serves them from there. A file whose hash is wrong stays and is logged."""
        rows = await self.hub.store.fetchall(
            "SELECT f.sha256 FROM dev_firmware f WHERE NOT EXISTS (SELECT 1 FROM blob_parts p"
            " WHERE p.owner = ? AND p.blob_id = f.sha256)", (FIRMWARE_BLOBS,))
        await blobs.move_files_in(self.hub.store, FIRMWARE_BLOBS,
                                  [(d, self.firmware_dir / f"{d}.bin", d) for (d,) in rows], "devices: firmware image")

    async def get_firmware_by_hash(self, digest: str) -> dict[str, Any] | None:
        row = await self.hub.store.fetchone(
            "SELECT id, name, version, sha256, size, created_at, actor FROM dev_firmware WHERE sha256 = ?", (digest,))
        return _firmware_json(row) if row else None

    async def get_firmware(self, firmware_id: int) -> dict[str, Any] | None:
        row = await self.hub.store.fetchone(
            "SELECT id, name, version, sha256, size, created_at, actor FROM dev_firmware WHERE id = ?",
            (firmware_id,))
        return _firmware_json(row) if row else None

    async def list_firmware(self) -> list[dict[str, Any]]:
        rows = await self.hub.store.fetchall(
            "SELECT id, name, version, sha256, size, created_at, actor FROM dev_firmware ORDER BY created_at DESC")
        return [_firmware_json(row) for row in rows]

    async def delete_firmware(self, firmware_id: int) -> bool:
        firmware = await self.get_firmware(firmware_id)
        if firmware is None:
            return False
        # From the database: in a cluster the offer may be another hub's.
        if await self.hub.store.fetchone(
                f"SELECT 1 FROM dev_ota WHERE firmware = ? AND state IN {OTA_OPEN}", (firmware_id,)):
            raise DeviceError("this firmware is being offered to a device; wait for the update to end", 409)

        def delete(cursor: Any) -> None:
            cursor.execute("DELETE FROM dev_firmware WHERE id = ?", (firmware_id,))
            blobs.delete(cursor, FIRMWARE_BLOBS, [firmware["sha256"]])

        await self.hub.store.interaction(delete)
        return True

    async def offer(self, device_id: str, firmware_id: int, actor: str) -> dict[str, Any]:
        """Offer a firmware image on `OTA/{id}/update` with a download URL (a one-offer token) and its sha256."""
        self.get(device_id)
        firmware = await self.get_firmware(firmware_id)
        if firmware is None:
            raise DeviceError(f"firmware {firmware_id} not found", 404)
        if any(o.device == device_id for o in self.offers.values()):
            raise DeviceError(f"an update of {device_id} is already in progress", 409)
        mqtt = self._mqtt()
        oid, token = secrets.token_hex(8), tokens.new_secret()
        now = self.clock.seconds()
        deadline = now + self.config.ota_timeout
        await self.hub.store.execute(
            "INSERT INTO dev_ota (id, device, firmware, token_hash, state, created_at, updated_at, deadline, actor)"
            " VALUES (?, ?, ?, ?, 'offered', ?, ?, ?, ?)",
            (oid, device_id, firmware_id, hash_device_key(oid, token), now, now, deadline, actor))
        offer = self.offers[oid] = Pending(oid, device_id, "ota", firmware=firmware_id, version=firmware["version"])
        url = f"{self.config.ota_base_url}/api/v1/devices/{device_id}/ota/{oid}/firmware?token={token}"
        await self._send_offer(mqtt, offer, {"offerId": oid, "name": firmware["name"], "version": firmware["version"],
                                             "url": url, "sha256": firmware["sha256"], "size": firmware["size"]})
        return {"offerId": oid, "deviceId": device_id, "firmware": firmware_id, "version": firmware["version"],
                "state": "offered", "deadline": rfc3339(deadline)}

    async def offer_hosted(self, device_id: str, version: Any, url: Any, checksum: Any, actor: str
                           ) -> dict[str, Any]:
        """An update whose image is hosted elsewhere, as earlier platforms do it: `OTA/{id}/update` carries
        {"device_id", "firmware_version", "firmware_url", "checksum"?} (plus this hub's offerId, version, url)."""
        self.get(device_id)
        if not isinstance(version, str) or not 1 <= len(version) <= 32 or not STATE.match(version.replace("+", "")):
            raise DeviceError("firmware_version: expected 1-32 letters, digits, '.', '_', '-'", 400)
        if not isinstance(url, str) or len(url) > 2048 or urlsplit(url).scheme not in ("http", "https") \
                or not urlsplit(url).netloc:
            raise DeviceError("firmware_url: expected an http:// or https:// URL of at most 2048 characters", 400)
        if checksum is not None and (not isinstance(checksum, str) or not CHECKSUM.match(checksum)):
            raise DeviceError("checksum: expected a digest such as 64 hex digits (sha256)", 400)
        if any(o.device == device_id for o in self.offers.values()):
            raise DeviceError(f"an update of {device_id} is already in progress", 409)
        mqtt = self._mqtt()
        oid = secrets.token_hex(8)
        now = self.clock.seconds()
        deadline = now + self.config.ota_timeout
        await self.hub.store.execute(
            "INSERT INTO dev_ota (id, device, firmware, token_hash, state, created_at, updated_at, deadline, actor,"
            " url, version, checksum) VALUES (?, ?, 0, '', 'offered', ?, ?, ?, ?, ?, ?, ?)",
            (oid, device_id, now, now, deadline, actor, url, version, checksum))
        offer = self.offers[oid] = Pending(oid, device_id, "ota", firmware=0, version=version)
        message: dict[str, Any] = {"device_id": device_id, "firmware_version": version, "firmware_url": url,
                                   "offerId": oid, "version": version, "url": url}
        if checksum is not None:
            message["checksum"] = checksum
        await self._send_offer(mqtt, offer, message)
        return {"offerId": oid, "deviceId": device_id, "firmware": None, "version": version, "url": url,
                "checksum": checksum, "state": "offered", "deadline": rfc3339(deadline)}

    async def _send_offer(self, mqtt: Any, offer: Pending, message: Mapping[str, Any]) -> None:
        """Publish a stored offer on `OTA/{id}/update` and time it out after ota_timeout; if it cannot be
        published, it fails and the caller gets a 503."""
        offer.timer = self.clock.callLater(self.config.ota_timeout, self._offer_timed_out, offer.id)
        try:
            await mqtt.publish(f"{self.config.ota_root}/{offer.device}/update", json.dumps(message).encode())
        except Exception as e:
            await self._ota_state(offer.id, "failed", error=f"not published: {e}")
            raise DeviceError(f"update not offered: {e}", 503) from None
        self._ota_event(offer, "offered", 0, "")

    async def firmware_for_offer(self, device_id: str, oid: str, token: str
                                 ) -> tuple[dict[str, Any], str] | None:
        """The firmware row of an open offer whose token matches, with the download's file name (None otherwise:
        the same answer for every failure); `firmware_parts` reads its image."""
        # From the database: in a cluster the download may reach another hub than the one that offered it.
        row = await self.hub.store.fetchone(
            f"SELECT token_hash, firmware FROM dev_ota WHERE id = ? AND device = ? AND state IN {OTA_OPEN}",
            (oid, device_id))
        if row is None or not tokens.same(row[0], hash_device_key(oid, token)):
            return None
        firmware = await self.get_firmware(int(row[1]))
        if firmware is None:
            return None
        parts, size = await blobs.stat(self.hub.store, FIRMWARE_BLOBS, firmware["sha256"])
        if size != firmware["size"]:
            # an image an earlier version kept as a file on a hub that has not started this version yet
            self.log.warn("devices: firmware image {sha256} is not in the database ({parts} parts)",
                          sha256=firmware["sha256"], parts=int(parts))
            return None
        return firmware, f"{firmware['name']}-{firmware['version']}.bin"

    def on_ota_response(self, topic: str, payload: bytes, properties: Any = None) -> Any:
        """`OTA/{id}/response`: {"offerId"?, "status": downloading|installing|done|failed|rejected,
        "progress"?: 0-100, "error"?, "version"?}; earlier platforms' {"status": "success"|"failure",
        "firmware_version"?, "message"?} too."""
        device_id = self._topic_device(topic.split("/")[1], topic)
        with _from_device(device_id):
            doc = finite_doc(ingest.json_object(payload, self.config.max_payload))
            status = ingest.text(doc, "status", max_length=32)
            status = OTA_ALIASES.get(str(status).lower(), status)
            if status not in OTA_REPORTS:
                raise Rejected(ingest.IMPLAUSIBLE, f"status: {status!r} is not one of {', '.join(OTA_REPORTS)}")
            progress = ingest.number(doc, "progress", 0, 100, required=False)
            error = (ingest.text(doc, "error", max_length=500, required=False)
                     or ingest.text(doc, "message", max_length=500, required=False) or "")
            reported = ingest.text(doc, "firmware_version", max_length=32, required=False) \
                or ingest.text(doc, "version", max_length=32, required=False)
            oid = ingest.text(doc, "offerId", required=False)
        return self._in_order(device_id, lambda: defer.Deferred.fromCoroutine(
            self._ota_answered(device_id, oid, str(status), progress, error, reported)))

    async def _ota_answered(self, device_id: str, oid: str | None, status: str, progress: float | None, error: str,
                            reported: str | None) -> None:
        if oid is None:  # devices that do not echo the offer id answer about their open offer
            oid = next((o.id for o in self.offers.values() if o.device == device_id), None)
        offer = self.offers.get(oid) if oid else None
        if offer is None:
            # In a cluster the answer may reach another hub than the one that offered the update.
            row = await self.hub.store.fetchone(
                "SELECT o.id, o.firmware, COALESCE(o.version, f.version) FROM dev_ota o"
                f" LEFT JOIN dev_firmware f ON f.id = o.firmware WHERE o.device = ? AND o.state IN {OTA_OPEN}"
                + (" AND o.id = ?" if oid else "") + " ORDER BY o.created_at DESC",
                (device_id, oid) if oid else (device_id,))
            if row is not None:
                offer = Pending(row[0], device_id, "ota", firmware=int(row[1] or 0), version=row[2] or "")
        if offer is None or offer.device != device_id:
            raise Rejected(ingest.UNKNOWN_COMMAND, f"no open update offer {oid!r} for this device", source=device_id)
        self.ingest.accepted()
        if status == "done":
            progress = 100
            device = self.devices.get(device_id)
            if device is not None:
                # What the device says it runs now, else what it was offered.
                device.firmware = reported or offer.version
                self._dirty.add(device_id)
        await self._ota_state(offer.id, status, progress, error, offer)

    def _offer_timed_out(self, oid: str) -> None:
        defer.Deferred.fromCoroutine(self._ota_state(oid, "timeout", error="no final answer in time")).addErrback(
            errback(self.log, "devices: timing out offer {oid} failed", oid=oid))

    async def _ota_state(self, oid: str, state: str, progress: float | None = None, error: str = "",
                         elsewhere: Pending | None = None) -> None:
        offer = self.offers.get(oid) or elsewhere
        if offer is None:
            return
        if state in OTA_FINAL:
            self.offers.pop(oid, None)
            if offer.timer is not None and offer.timer.active():
                offer.timer.cancel()
        now = self.clock.seconds()
        percent = int(progress) if progress is not None else None
        changed = await self.hub.store.execute(
            "UPDATE dev_ota SET state = ?, progress = COALESCE(?, progress), error = ?, updated_at = ?"
            f" WHERE id = ? AND state IN {OTA_OPEN}", (state, percent, error, now, oid))
        if changed:  # else another hub of the cluster closed it first
            self._ota_event(offer, state, percent, error)

    def _ota_event(self, offer: Pending, state: str, progress: int | None, error: str) -> None:
        self.emit("ota", f"dev/device/{offer.device}/event/ota", {
            "deviceId": offer.device, "offerId": offer.id, "firmware": offer.firmware or None, "version": offer.version,
            "state": state, "progress": progress, "error": error, "time": rfc3339(self.clock.seconds())})

    async def list_offers(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self.hub.store.fetchall(
            "SELECT o.id, o.firmware, COALESCE(o.version, f.version), o.state, o.progress, o.error, o.created_at,"
            " o.updated_at, o.actor, o.url, o.checksum"
            " FROM dev_ota o LEFT JOIN dev_firmware f ON f.id = o.firmware WHERE o.device = ?"
            " ORDER BY o.created_at DESC LIMIT ?", (device_id, limit))
        return [{"offerId": r[0], "firmware": r[1] or None, "version": r[2], "state": r[3], "progress": r[4],
                 "error": r[5], "createdAt": opt_time(r[6]), "updatedAt": opt_time(r[7]), "actor": r[8],
                 "url": r[9], "checksum": r[10]} for r in rows]

    # -- events and writes

    def emit(self, kind: str, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.hub.bus.publish(Event("devices", kind, topic, payload, retain)).addErrback(
            errback(self.log, "devices: publishing {topic} failed", topic=topic))

    def _insert(self, row: tuple[Any, ...]) -> None:
        """A registry INSERT, not awaited by the message path, but before the next flush of that row."""
        d = self._registrations.add(row)
        self._inserts.add(d)
        d.addErrback(errback(self.log, "devices: registry insert failed"))
        d.addBoth(lambda _: self._inserts.discard(d))

    async def _flush_registry(self) -> None:
        # Rows are UPDATEd below: their INSERTs must have landed (PostgreSQL runs statements on several threads).
        if self._inserts:
            await defer.DeferredList(list(self._inserts))
        dirty, self._dirty = self._dirty, set()
        rows = []
        for did in sorted(dirty):  # one lock order on every hub sharing the database
            d = self.devices.get(did)
            if d is not None:
                rows.append((d.last_seen, d.status, json.dumps(d.status_detail), d.status_time, d.firmware,
                             d.unsaved, did))
                d.unsaved = 0
        if rows:
            await self.hub.store.executemany(
                "UPDATE dev_devices SET last_seen = ?, status = ?, status_detail = ?, status_time = ?,"
                " firmware = ?, messages = messages + ? WHERE id = ?", rows)

    async def prune(self) -> None:
        cutoff = self.clock.seconds() - self.config.retention
        await self.hub.store.execute("DELETE FROM dev_telemetry WHERE time < ?", (cutoff,))
        await self.hub.store.execute("DELETE FROM dev_commands WHERE created_at < ? AND state <> 'sent'", (cutoff,))


def _command_json(device_id: str, row: tuple[Any, ...]) -> dict[str, Any]:
    cid, name, args, state, result, error, created, deadline, answered, actor = row
    return {"commandId": cid, "deviceId": device_id, "command": name, "args": json.loads(args), "state": state,
            "result": json.loads(result) if result is not None else None, "error": error,
            "createdAt": opt_time(created), "deadline": opt_time(deadline), "answeredAt": opt_time(answered),
            "actor": actor}


def _firmware_json(row: tuple[Any, ...]) -> dict[str, Any]:
    fid, name, version, digest, size, created, actor = row
    return {"id": int(fid), "name": name, "version": version, "sha256": digest, "size": int(size),
            "createdAt": opt_time(created), "actor": actor}
