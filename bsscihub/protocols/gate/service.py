"""The gate family at run time: registration, status in, commands out, app access, sharing, signed files.

Everything the REST routes and MQTT commands do goes through `GateService`; the web module only authenticates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from bsscihub import blobs, ingest
from bsscihub.bus import Event
from bsscihub.contract import finite_doc, rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import FamilyService
from bsscihub.health import ComponentHealth
from bsscihub.hub import Hub
from bsscihub.ingest import Rejected
from bsscihub.protocols.gate import registry
from bsscihub.protocols.gate.dynsec import DynsecError, DynsecProvisioner, NoProvisioning, UnitTopics, unit_username
from bsscihub.protocols.gate.registry import (
    Access,
    Command,
    FileRecord,
    ProvisioningKey,
    Refused,
    Registration,
    Share,
    Unit,
    level_at_least,
)
from bsscihub.protocols.gate.signed import DOWN, UP, BadURL, URLSigner
from bsscihub.protocols.gate.tokens import APP, PROVISIONING, SHARE, UNIT, Keyring
from bsscihub.registry_sync import RegistryChanges

if TYPE_CHECKING:
    from bsscihub.mqtt.bridge import MQTTBridge

FAMILY = "gate"
FILES_PATH = "/api/v1/gates/files/"
"""Where the web layer serves signed file URLs (the service builds the URLs)."""
FILE_BLOBS = "gate.files"
"""The unit files' owner in the core blob store (bsscihub.blobs), each named by its file id."""

COMMAND_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CLUSTER_POLL = 0.5
CLUSTER_LOAD_EVERY = 5.0
"""Seconds between looks, in a cluster, for the units and commands the other hubs took or opened."""
"""Seconds between looks in the database for a command another hub of a cluster settled."""
USER_COMMANDS = frozenset({"open", "close", "stop", "status"})
"""What an app with `user` access may send; every other command needs `engineer`."""

RESERVED_IDS = frozenset({"register", "mine", "shares", "files", "provisioning-keys"})
"""Path segments of the REST API next to /gates/{controller_id}: no unit may be called so."""

RENAME_NOTICE_WAIT = 5.0

EXPIRED = "expired before it could be relayed: the unit was offline until the command's deadline"


def check_controller_id(value: str) -> str:
    if not ingest.IDENTIFIER.match(value) or value in RESERVED_IDS:
        raise Refused(400, "invalid_controller_id",
                      f"controller_id {value[:70]!r} must be 1-64 letters, digits, '_', '.', ':', '-' and not one of "
                      + ", ".join(sorted(RESERVED_IDS)))
    return value


def command_level(name: str) -> str:
    return "user" if name in USER_COMMANDS else "engineer"


@attrs.frozen
class Caller:
    """Who is acting, for the audit log and for limits: a hub user, an app (with its level), a unit, MQTT."""

    actor: str
    kind: str  # "user", "app", "unit", "key", "mqtt", "url", "anonymous"
    level: str | None = None  # an app's access level on the unit at hand


class GateService(FamilyService):
    """Keeps the gate registry, relays commands to units and their answers back, and hands out secrets."""

    log = Logger()
    family = FAMILY

    def __init__(self, hub: Hub, *, provisioner: Any = None) -> None:
        super().__init__(hub)
        self.config = hub.config.section("gate")
        self.clock = hub.reactor
        self.root = self.config.topic_root
        # Where earlier versions kept the files (one hub's disk): moved into the database on start.
        self.files_dir = Path(hub.config.data_dir) / "gate" / "files"
        self.keyring: Keyring | None = None
        self.signer: URLSigner | None = None
        self.broker = provisioner if provisioner is not None else self._make_provisioner()
        self._by_controller: dict[str, int] = {}
        self._offline_timers: dict[int, IDelayedCall] = {}
        self._command_timers: dict[str, IDelayedCall] = {}
        self._waiters: dict[str, list[defer.Deferred[Command]]] = {}
        # Commands not yet relayed, per unit id, oldest first: the unit is offline (or the broker away).
        self._queues: dict[int, deque[str]] = {}
        # Registrations, renames and deletions touch the broker and the database: one at a time.
        self._lock = defer.DeferredLock()
        self._others = self.looping(self._load_others, "loading what the other hubs opened")
        self.changes = RegistryChanges(hub, "gate", self._reload)

    def _make_provisioner(self) -> Any:
        if self.config.broker_provisioning != "dynsec":
            return NoProvisioning()
        from bsscihub.mqtt.client import MQTTSettings

        core = self.hub.config.mqtt
        settings = MQTTSettings.from_url(
            self.config.dynsec_url or core.url,
            username=self.config.dynsec_username or None,
            password=self.config.dynsec_password or None,
            client_id=f"bsscihub-gate-dynsec-{uuid.uuid4().hex[:8]}",
            session_expiry=0,
            keepalive=core.keepalive,
            ca_file=core.ca or None,
        )
        return DynsecProvisioner(settings, self.hub.reactor)

    # -- lifecycle

    async def prepare(self) -> None:
        self.keyring = Keyring.load(self.config.secret, Path(self.hub.config.keys_dir), Path(self.hub.config.data_dir))
        self.signer = URLSigner(self.keyring.url_key)
        await self._arm_from_store()
        await self._move_files_in()
        if self.hub.cluster.clustered:
            self._others.start(CLUSTER_LOAD_EVERY, now=False).addErrback(
                lambda f: self.log.failure("gate: loading what the other hubs opened stopped", f))
        if self.broker.enabled:
            self.hub.health.register(
                "gate_broker", lambda: ComponentHealth(self.broker.connected, {"provisioning": "dynsec"}), needed=False
            )
        self.broker.start()

    async def _arm_from_store(self) -> None:
        """Timers for the online units' silence and the pending commands' deadlines this hub does not hold yet
        (at start; in a cluster every few seconds too, so that what a dead hub opened still ends)."""
        now = self.now()
        for unit in await registry.all_units(self.hub.store):
            self._by_controller[unit.controller_id] = unit.id
            if unit.online and unit.id not in self._offline_timers:
                silent = now - (unit.last_seen or now)
                self._arm_offline(unit.id, max(0.0, self.config.offline_after - silent))
        for command in await registry.pending_commands(self.hub.store):
            if command.id in self._command_timers:
                continue
            self._arm_timeout(command.id, command.unit_id, max(0.0, command.deadline - now))
            if command.relayed_at is None:
                queue = self._queues.setdefault(command.unit_id, deque())
                if command.id not in queue:
                    queue.append(command.id)

    async def _load_others(self) -> None:
        await self._arm_from_store()
        await self.changes.poll()

    async def _reload(self, kind: str, ids: Sequence[str]) -> None:
        """Units another hub of a cluster renamed or removed: this hub's name map, timers and queue follow."""
        for key in ids:
            unit_id = int(key)
            unit = await registry.get_unit(self.hub.store, "id", unit_id)
            for name in [n for n, i in self._by_controller.items() if i == unit_id]:
                del self._by_controller[name]
            if unit is not None:
                self._by_controller[unit.controller_id] = unit_id
                continue
            self._queues.pop(unit_id, None)
            timer = self._offline_timers.pop(unit_id, None)
            if timer is not None and timer.active():
                timer.cancel()

    async def drain(self) -> None:
        if self._others.running:
            self._others.stop()
        for timer in [*self._offline_timers.values(), *self._command_timers.values()]:
            if timer.active():
                timer.cancel()
        self._offline_timers.clear()
        self._command_timers.clear()
        self._queues.clear()
        waiters, self._waiters = self._waiters, {}
        for ds in waiters.values():
            for d in ds:
                d.cancel()
        await self.broker.stop()

    def subscriptions(self) -> Mapping[str, Any]:
        return {f"{self.root}/+/status": self.on_status}

    # -- small helpers

    def now(self) -> float:
        return float(self.clock.seconds())

    def topics(self, controller_id: str) -> UnitTopics:
        return UnitTopics.of(self.root, controller_id)

    def _keys(self) -> Keyring:
        if self.keyring is None:
            raise Refused(503, "unavailable", "the gate service is not started")
        return self.keyring

    def emit(self, kind: str, topic: str, payload: Mapping[str, Any], retain: bool = False) -> None:
        d = self.hub.bus.publish(Event(FAMILY, kind, f"{FAMILY}/{topic}", payload, retain))
        d.addErrback(lambda f: self.log.failure("gate: publishing {topic} failed", f, topic=topic))

    def _unit_event(self, unit: Unit, kind: str, /, **fields: Any) -> None:
        payload = {"controllerId": unit.controller_id, "hardwareId": unit.hardware_id, "time": rfc3339(self.now()),
                   **fields}
        self.emit(kind, f"unit/{unit.controller_id}/event/{kind}", payload)

    def _state_event(self, unit: Unit, online: bool, since: float) -> None:
        self.emit("state", f"unit/{unit.controller_id}/state", {
            "controllerId": unit.controller_id, "hardwareId": unit.hardware_id,
            "firmwareVersion": unit.firmware_version, "state": "online" if online else "offline",
            "since": rfc3339(since),
        }, retain=True)

    def _publish_device(self, topic: str, payload: Mapping[str, Any], *, acked: bool = False) -> Any:
        """Through the bridge's outbox; `acked`: the Deferred waits for the broker, not only the disk."""
        mqtt = self._mqtt()
        return mqtt.publish(topic, json.dumps(payload, separators=(",", ":")).encode(), acked=acked)

    def _mqtt(self) -> MQTTBridge:
        """The bridge, without which no unit can be reached: 503 when the hub runs without one."""
        if self.hub.mqtt is None:
            raise Refused(503, "mqtt_unavailable", "the hub has no MQTT bridge: nothing can reach the units")
        return self.hub.mqtt

    def _clear_retained(self, controller_id: str) -> None:
        """After a rename or deletion, nothing stays retained under a name that is free again."""
        if self.hub.mqtt is None:
            return
        prefix = self.hub.config.mqtt.prefix
        for suffix in ("state", "status"):
            d = self.hub.mqtt.publish(f"{prefix}/{FAMILY}/unit/{controller_id}/{suffix}", b"", retain=True)
            if isinstance(d, defer.Deferred):
                d.addErrback(lambda f: self.log.failure("gate: clearing retained topics failed", f))

    async def unit_or_none(self, controller_id: str) -> Unit | None:
        return await registry.get_unit(self.hub.store, "controller_id", controller_id)

    async def unit(self, controller_id: str) -> Unit:
        found = await self.unit_or_none(controller_id)
        if found is None:
            raise Refused(404, "not_found", f"gate unit {controller_id} not found")
        return found

    # -- reads for the API and the pages

    async def list_units(self, q: str, limit: int, offset: int) -> tuple[list[Unit], int]:
        return await registry.list_units(self.hub.store, q=q, limit=limit, offset=offset)

    async def names(self, unit: Unit) -> list[dict[str, Any]]:
        return [n.to_json() for n in await registry.names(self.hub.store, unit.id)]

    async def status_history(self, unit: Unit, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        return await registry.status_history(self.hub.store, unit.id, limit, offset)

    async def commands(self, unit: Unit, limit: int, offset: int) -> tuple[list[Command], int]:
        return await registry.list_commands(self.hub.store, unit.id, limit, offset)

    async def access_list(self, unit: Unit) -> list[Access]:
        return await registry.list_access(self.hub.store, unit.id)

    async def shares(self, unit: Unit) -> list[Share]:
        return await registry.list_shares(self.hub.store, unit.id)

    async def files(self, unit: Unit) -> list[FileRecord]:
        return await registry.list_files(self.hub.store, unit.id)

    async def provisioning_keys(self) -> list[ProvisioningKey]:
        return await registry.list_keys(self.hub.store)

    # -- provisioning keys

    async def create_provisioning_key(self, *, name: str, single_use: bool, expires_in: float | None,
                                      actor: str) -> tuple[ProvisioningKey, str]:
        token, stored = self._keys().mint(PROVISIONING)
        now = self.now()
        key = await registry.create_key(
            self.hub.store, name=name, prefix=token.public, secret_hash=stored,
            single_use=single_use, now=now, actor=actor, expires_at=None if expires_in is None else now + expires_in,
        )
        return key, token.text

    async def check_provisioning_key(self, token: str) -> ProvisioningKey:
        key = await registry.key_by_hash(self.hub.store, self._keys().hash(PROVISIONING, token))
        if key is None:
            raise Refused(401, "invalid_provisioning_key", "unknown provisioning key")
        state = key.state(self.now())
        if state != "active":
            messages = {"revoked": "the provisioning key was revoked", "expired": "the provisioning key has expired",
                        "used": "the single-use provisioning key was used already"}
            raise Refused(401, f"provisioning_key_{state}", messages[state])
        return key

    async def revoke_provisioning_key(self, key_id: int) -> ProvisioningKey:
        if not await registry.revoke_key(self.hub.store, key_id, self.now()):
            key = await registry.get_key(self.hub.store, key_id)
            if key is None:
                raise Refused(404, "not_found", f"provisioning key {key_id} not found")
            raise Refused(409, "already_revoked", f"provisioning key {key_id} is revoked already")
        key = await registry.get_key(self.hub.store, key_id)
        assert key is not None
        return key

    # -- units

    async def unit_by_key(self, unit_key: str) -> Unit | None:
        return await registry.get_unit(self.hub.store, "key_hash", self._keys().hash(UNIT, unit_key))

    async def register(self, *, hardware_id: str, controller_id: str, firmware_version: str, actor: str,
                       provisioning_key: ProvisioningKey | None = None,
                       as_unit: Unit | None = None) -> tuple[Registration, str]:
        """Register a new unit or re-register a known one (new key, new firmware); returns the unit key.

        A known unit keeps its controller_id: only an operator renames. The answer names the current
        one, which is how a unit that missed a rename learns its topics.
        """
        keys = self._keys()
        async with self._lock:
            existing = await registry.get_unit(self.hub.store, "hardware_id", hardware_id)
            if as_unit is not None and (existing is None or existing.id != as_unit.id):
                raise Refused(403, "wrong_unit", "a unit key may only re-register its own unit")
            if existing is None:
                check_controller_id(controller_id)
                holder = await registry.get_unit(self.hub.store, "controller_id", controller_id)
                if holder is not None:
                    raise registry.taken(controller_id, holder)
            else:
                controller_id = existing.controller_id
            minted = keys.mint(UNIT)
            unit_key = minted.token.text
            await self._provision(hardware_id, unit_key, controller_id)
            try:
                registration = await registry.register(
                    self.hub.store, hardware_id=hardware_id, controller_id=controller_id,
                    firmware_version=firmware_version, key_hash=minted.stored, now=self.now(),
                    actor=actor, provisioning_key_id=provisioning_key.id if provisioning_key is not None else None,
                )
            except Exception:
                if existing is None:  # no account may outlive a registration that did not happen
                    await self.broker.remove(unit_username(hardware_id))
                raise
        unit = registration.unit
        self._by_controller[unit.controller_id] = unit.id
        self._unit_event(unit, "registered" if registration.created else "reregistered",
                         firmwareVersion=unit.firmware_version)
        self.log.info("gate unit {controller_id} ({hardware_id}) {what}, firmware {firmware}",
                      controller_id=unit.controller_id, hardware_id=unit.hardware_id,
                      what="registered" if registration.created else "re-registered", firmware=unit.firmware_version)
        return registration, unit_key

    async def _provision(self, hardware_id: str, unit_key: str, controller_id: str) -> None:
        try:
            await self.broker.provision(unit_username(hardware_id), unit_key, self.topics(controller_id))
        except DynsecError as e:
            raise Refused(503, "broker_unavailable", f"the broker account could not be provisioned: {e}") from None

    def credentials(self, unit: Unit, unit_key: str) -> dict[str, Any]:
        """What a unit needs to connect: shown once, in the registration answer."""
        from bsscihub.mqtt.client import MQTTSettings

        url = self.config.unit_mqtt_url or self.hub.config.mqtt.url
        broker = MQTTSettings.from_url(url)
        topics = self.topics(unit.controller_id)
        provisioned = self.broker.enabled
        return {
            "url": f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}",
            "host": broker.host,
            "port": broker.port,
            "tls": broker.tls,
            "username": unit_username(unit.hardware_id) if provisioned else None,
            "password": unit_key if provisioned else None,
            "client_id": unit_username(unit.hardware_id),
            "provisioned": provisioned,
            "topics": {"subscribe": topics.commands, "publish": topics.status},
        }

    async def rename(self, controller_id: str, new_id: str, actor: str) -> Unit:
        check_controller_id(new_id)
        async with self._lock:
            unit = await self.unit(controller_id)
            if new_id == unit.controller_id:
                return unit
            holder = await registry.get_unit(self.hub.store, "controller_id", new_id)
            if holder is not None:
                raise registry.taken(new_id, holder)
            await self._notify_rename(unit, new_id)
            try:
                await self.broker.move(unit_username(unit.hardware_id), self.topics(new_id))
            except DynsecError as e:
                raise Refused(503, "broker_unavailable", f"the broker permissions could not be moved: {e}") from None
            renamed = await registry.rename(self.hub.store, unit, new_id, self.now(), actor)
            await self.changes.note("unit", str(unit.id))
            for fingerprint in await registry.fingerprints_of_unit(self.hub.store, unit.id):
                await self._app_account(fingerprint, None, strict=False)  # the apps follow the new name
        self._by_controller.pop(controller_id, None)
        self._by_controller[new_id] = unit.id
        self._clear_retained(controller_id)
        self._unit_event(renamed, "renamed", previousControllerId=controller_id)
        self._state_event(renamed, renamed.online, renamed.online_since or self.now())
        self.log.info("gate unit {old} renamed to {new}", old=controller_id, new=new_id)
        return renamed

    async def _notify_rename(self, unit: Unit, new_id: str) -> None:
        """Tell the unit its new topics on its old command topic, before the broker moves its permissions."""
        if self.hub.mqtt is None:
            return
        topics = self.topics(new_id)
        notice = {"id": uuid.uuid4().hex, "command": "renamed", "time": rfc3339(self.now()),
                  "args": {"controller_id": new_id, "topics": {"subscribe": topics.commands, "publish": topics.status}}}
        d = self._publish_device(self.topics(unit.controller_id).commands, notice, acked=True)
        if isinstance(d, defer.Deferred):
            # Best effort and bounded: a unit that misses it learns its name by re-registering.
            d.addTimeout(RENAME_NOTICE_WAIT, self.clock)
            try:
                await d
            except Exception:
                self.log.warn("gate: rename notice to {controller_id} not confirmed", controller_id=unit.controller_id)

    async def delete(self, controller_id: str) -> Unit:
        async with self._lock:
            unit = await self.unit(controller_id)
            try:
                await self.broker.remove(unit_username(unit.hardware_id))
            except DynsecError as e:
                raise Refused(503, "broker_unavailable", f"the broker account could not be removed: {e}") from None
            files = await registry.list_files(self.hub.store, unit.id)
            apps = await registry.fingerprints_of_unit(self.hub.store, unit.id)
            await registry.delete_unit(self.hub.store, unit.id)
            await self.hub.store.interaction(lambda c: blobs.delete(c, FILE_BLOBS, [f.id for f in files]))
            await self.changes.note("unit", str(unit.id))
            for fingerprint in apps:
                await self._app_account(fingerprint, None, strict=False)
        self._by_controller.pop(unit.controller_id, None)
        self._queues.pop(unit.id, None)
        timer = self._offline_timers.pop(unit.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._clear_retained(unit.controller_id)
        self._unit_event(unit, "deleted")
        return unit

    # -- status and online state

    async def on_status(self, topic: str, payload: bytes, properties: Any = None) -> None:
        controller_id = topic[len(self.root) + 1:].rpartition("/")[0]
        ingest.check_identifier(controller_id, "controller_id (from the topic)")
        unit_id = self._by_controller.get(controller_id)
        if self.hub.cluster.clustered:
            # Registrations, renames and removals made on another hub are in the database, not in this map.
            known = await registry.get_unit(self.hub.store, "controller_id", controller_id)
            unit_id = None if known is None else known.id
        if unit_id is None:
            raise Rejected(ingest.UNKNOWN_DEVICE, f"no gate unit is called {controller_id}", source=controller_id)
        # NaN/±Infinity (or a number beyond a double) become null, named under "invalid": stored and
        # published alike, never accepted and then unpublishable.
        doc = finite_doc(ingest.json_object(payload, self.config.max_status_bytes))
        now = self.now()
        came_online, went_offline = await registry.record_status_change(
            self.hub.store, unit_id, now, doc, self.config.status_history)
        self.ingest.accepted()
        unit = await registry.get_unit(self.hub.store, "id", unit_id)
        if unit is None:
            return
        if unit.online:
            self._arm_offline(unit_id, self.config.offline_after)
            if came_online:
                self._state_event(unit, True, now)
            if self._queues.get(unit_id) or (came_online and self.hub.cluster.clustered):
                await self._flush(unit)
        else:
            self._went_offline(unit, went_offline)
        self.emit("status", f"unit/{unit.controller_id}/status",
                  {**doc, "controllerId": unit.controller_id, "time": rfc3339(now)}, retain=True)
        command_id = doc.get("command_id")
        if isinstance(command_id, str):
            await self._answered(unit, command_id, doc, now)

    def _arm_offline(self, unit_id: int, delay: float) -> None:
        timer = self._offline_timers.get(unit_id)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._offline_timers[unit_id] = self.clock.callLater(delay, self._silent, unit_id)

    def _silent(self, unit_id: int) -> None:
        self._offline_timers.pop(unit_id, None)

        async def mark() -> None:
            # In a cluster another hub may have heard the unit since: silence counts from its last status anywhere.
            unit = await registry.get_unit(self.hub.store, "id", unit_id)
            if unit is None or not unit.online:
                return
            left = (unit.last_seen or 0.0) + self.config.offline_after - self.now()
            if left > 0:
                self._arm_offline(unit_id, left)
                return
            if await registry.set_offline(self.hub.store, unit_id, heard_before=self.now() - self.config.offline_after):
                unit = await registry.get_unit(self.hub.store, "id", unit_id)
                if unit is not None:
                    self._state_event(unit, False, self.now())
                    self.log.info("gate unit {controller_id} is offline (silent for {seconds:g} s)",
                                  controller_id=unit.controller_id, seconds=self.config.offline_after)

        defer.Deferred.fromCoroutine(mark()).addErrback(
            lambda f: self.log.failure("gate: marking a unit offline failed", f))

    def _went_offline(self, unit: Unit, changed: bool) -> None:
        """The unit said so itself (its MQTT will: {"online": false}); `changed`: it was online until now."""
        timer = self._offline_timers.pop(unit.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        if changed:  # in a cluster the hub that hears the will may not be the one that heard it come online
            self._state_event(unit, False, self.now())

    # -- commands

    async def send_command(self, unit: Unit, name: str, args: Any, *, caller: Caller, via: str,
                           timeout: float | None = None) -> Command:
        if not COMMAND_NAME.match(name):
            raise Refused(400, "invalid_command", f"command {name[:40]!r} must be 1-32 of a-z, 0-9, '_'")
        if caller.kind == "app":
            needed = command_level(name)
            if caller.level is None or not level_at_least(caller.level, needed):
                raise Refused(403, "access_level", f"{name} needs {needed} access; this app has {caller.level}")
        mqtt = self._mqtt()
        now = self.now()
        timeout = timeout or self.config.command_timeout
        command = Command(uuid.uuid4().hex, unit.id, name, args if args is not None else {}, caller.actor, via, now,
                          now + timeout, "pending", None, None, None)
        await registry.insert_command(self.hub.store, command)
        self._arm_timeout(command.id, unit.id, timeout)
        self.log.info("gate command {command} {id} to {controller_id} by {actor}", command=name, id=command.id,
                      controller_id=unit.controller_id, actor=caller.actor)
        if unit.online and mqtt.connected and not self._queues.get(unit.id):
            await self._relay(unit, command)
            return attrs.evolve(command, relayed_at=self.now())
        await self._enqueue(unit, command)
        return command

    async def _relay(self, unit: Unit, command: Command) -> None:
        """Hand a command to the broker for the unit; it carries when it was issued and when it expires."""
        if not await registry.mark_relayed(self.hub.store, command.id, self.now()):
            return  # relayed already, by another hub of the cluster
        message = {"id": command.id, "command": command.command, "args": command.args,
                   "time": rfc3339(command.created_at), "expires": rfc3339(command.deadline)}
        d = self._publish_device(self.topics(unit.controller_id).commands, message)
        if isinstance(d, defer.Deferred):
            # The outbox keeps it until the broker has it; the unit drops it after `expires`.
            d.addErrback(lambda f: self.log.failure("gate: command {id} not handed to the broker", f, id=command.id))

    async def _enqueue(self, unit: Unit, command: Command) -> None:
        """Keep a command for an offline unit (bounded: the oldest waiting one fails first)."""
        queue = self._queues.setdefault(unit.id, deque())
        queue.append(command.id)
        self.log.info("gate command {id} kept for {controller_id}: the unit is offline", id=command.id,
                      controller_id=unit.controller_id)
        while len(queue) > self.config.max_queued_commands:
            oldest = queue.popleft()
            self._cancel_timeout(oldest)
            await self._settle(oldest, unit.id, "failed", None,
                               f"not relayed: more than {self.config.max_queued_commands} commands were waiting"
                               " for the offline unit (oldest dropped first)")

    async def _flush(self, unit: Unit) -> None:
        """The unit is back: relay what waited for it, except what expired meanwhile (failed, never sent)."""
        queue = self._queues.pop(unit.id, deque())
        if self.hub.cluster.clustered:
            # Each hub queues in memory what it was asked: the unit may come back on any of them.
            queue = deque(c.id for c in await registry.pending_commands(self.hub.store)
                          if c.unit_id == unit.id and c.relayed_at is None)
        while queue:
            command = await registry.get_command(self.hub.store, queue.popleft())
            if command is None or command.done or command.relayed_at is not None:
                continue
            if command.deadline <= self.now():
                self._cancel_timeout(command.id)
                await self._settle(command.id, unit.id, "failed", None, EXPIRED)
            else:
                await self._relay(unit, command)

    def _cancel_timeout(self, command_id: str) -> None:
        timer = self._command_timers.pop(command_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_timeout(self, command_id: str, unit_id: int, delay: float) -> None:
        self._command_timers[command_id] = self.clock.callLater(delay, self._timed_out, command_id, unit_id)

    def _timed_out(self, command_id: str, unit_id: int) -> None:
        self._command_timers.pop(command_id, None)
        queue = self._queues.get(unit_id)
        if queue is not None and command_id in queue:
            queue.remove(command_id)  # never sent: it expired waiting for the unit
            outcome = self._settle(command_id, unit_id, "failed", None, EXPIRED)
        else:
            outcome = self._settle(command_id, unit_id, "timeout", None,
                                   "the unit did not answer before the command's deadline")
        d = defer.Deferred.fromCoroutine(outcome)
        d.addErrback(lambda f: self.log.failure("gate: timing out command {id} failed", f, id=command_id))

    async def _answered(self, unit: Unit, command_id: str, doc: Mapping[str, Any], now: float) -> None:
        error = doc.get("error")
        ok = doc.get("ok", error is None) is True
        state = "succeeded" if ok else "failed"
        text = None if ok else (str(error)[:500] if error is not None else "the unit reported a failure")
        timer = self._command_timers.get(command_id)
        settled = await self._settle(command_id, unit.id, state, doc.get("result"), text)
        if settled is not None and timer is not None:
            self._command_timers.pop(command_id, None)
            if timer.active():
                timer.cancel()

    async def _settle(self, command_id: str, unit_id: int, state: str, result: Any, error: str | None
                      ) -> Command | None:
        command = await registry.complete_command(self.hub.store, command_id, unit_id, state, result, error,
                                                  self.now())
        if command is None:
            return None  # unknown, another unit's, or settled already: a unit cannot answer for another
        unit = await registry.get_unit(self.hub.store, "id", unit_id)
        if unit is not None:
            self._unit_event(unit, "command", id=command.id, command=command.command, via=command.via, state=state,
                             ok=state == "succeeded", result=result, error=error)
        for waiter in self._waiters.pop(command_id, []):
            waiter.callback(command)
        return command

    async def wait_command(self, command_id: str, wait: float) -> Command:
        """The command once settled, or as it is after `wait` seconds."""
        command = await registry.get_command(self.hub.store, command_id)
        if command is None:
            raise Refused(404, "not_found", f"command {command_id} not found")
        if command.done or wait <= 0:
            return command
        until = self.now() + wait
        while True:
            d: defer.Deferred[Command] = defer.Deferred()
            self._waiters.setdefault(command_id, []).append(d)
            # In a cluster the answer may reach another hub, which settles it in the database: look there too.
            d.addTimeout(min(wait, CLUSTER_POLL) if self.hub.cluster.clustered else wait, self.clock)
            try:
                return await d
            except defer.TimeoutError:
                waiting = self._waiters.get(command_id, [])
                if d in waiting:
                    waiting.remove(d)
                if not waiting:
                    self._waiters.pop(command_id, None)
                latest = await registry.get_command(self.hub.store, command_id)
                assert latest is not None
                wait = until - self.now()
                if latest.done or wait <= 0:
                    return latest

    async def command(self, kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/gate/unit/{controller_id}/cmd/{name}` from MQTT: relayed, and answered once the unit answers."""
        if kind != "unit":
            raise CommandError(f"unknown kind {kind!r}; gate commands go to unit/{{controller_id}}/cmd/{{name}}")
        try:
            unit = await self.unit(id)
            sent = await self.send_command(unit, name, payload, caller=Caller("mqtt", "mqtt"), via="mqtt")
        except Refused as e:
            raise CommandError(str(e)) from None
        done = await self.wait_command(sent.id, sent.deadline - self.now() + 1.0)
        if done.state != "succeeded":
            raise CommandError(done.error or f"command {done.state}")
        return {"id": done.id, "result": done.result}

    # -- app access

    def app_actor(self, app_token: str) -> str:
        return f"gate-app:{self._keys().fingerprint(APP, app_token)}"

    async def grant_app(self, unit: Unit, user_token: str, level: str) -> Access:
        keys = self._keys()
        access = await registry.grant_access(self.hub.store, unit.id, keys.hash(APP, user_token),
                                             keys.fingerprint(APP, user_token), level, "ble", self.now())
        await self._app_account(access.fingerprint, user_token, strict=False)
        return access

    async def revoke_app_token(self, unit: Unit, user_token: str) -> bool:
        fingerprint = self._keys().fingerprint(APP, user_token)
        # The broker first: an app the hub no longer admits must not keep reaching the unit there.
        await self._app_account(fingerprint, None, without=unit.controller_id)
        return await registry.revoke_access(self.hub.store, unit.id, now=self.now(),
                                            token_hash=self._keys().hash(APP, user_token))

    async def revoke_access(self, unit: Unit, access_id: int) -> None:
        found = [a for a in await registry.list_access(self.hub.store, unit.id)
                 if a.id == access_id and a.revoked_at is None]
        if not found:
            raise Refused(404, "not_found", f"no active app access {access_id} on {unit.controller_id}")
        await self._app_account(found[0].fingerprint, None, without=unit.controller_id)
        if not await registry.revoke_access(self.hub.store, unit.id, now=self.now(), access_id=access_id):
            raise Refused(404, "not_found", f"no active app access {access_id} on {unit.controller_id}")

    # -- apps' own broker accounts (dynsec): publish commands to the units they may reach, directly

    @staticmethod
    def app_username(fingerprint: str) -> str:
        return f"gate-app-{fingerprint}"

    def app_acls(self, controllers: list[str]) -> list[dict[str, Any]]:
        """Per unit the app may reach: publish its commands, read its status; receiving anything else is denied."""
        acls: list[dict[str, Any]] = []
        for controller_id in controllers:
            topics = self.topics(controller_id)
            acls += [
                {"acltype": "publishClientSend", "topic": topics.commands, "priority": 10, "allow": True},
                {"acltype": "subscribeLiteral", "topic": topics.status, "priority": 10, "allow": True},
                {"acltype": "publishClientReceive", "topic": topics.status, "priority": 10, "allow": True},
            ]
        return [*acls, {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False}]

    async def _app_account(self, fingerprint: str, token: str | None, *, without: str | None = None,
                           strict: bool = True) -> None:
        """Bring the app's broker account in line with its access (`token` known: create or re-key it;
        `without`: as it will be once that unit's access is revoked). No access left: no account."""
        if not self.broker.enabled:
            return
        controllers = [c for c in await registry.controllers_of_fingerprint(self.hub.store, fingerprint)
                       if c != without]
        username = self.app_username(fingerprint)
        try:
            if not controllers:
                await self.broker.remove(username)
            elif token is not None:
                await self.broker.set_account(username, token, self.app_acls(controllers), "gate app",
                                              bind_client_id=False)
            else:
                await self.broker.set_role(username, self.app_acls(controllers), "gate app")
        except DynsecError as e:
            if token is None and "not found" in str(e):
                return  # an app that never had an account (granted before dynsec): nothing to narrow
            if strict:
                raise Refused(503, "broker_unavailable", f"the app's broker account could not be updated: {e}") \
                    from None
            self.log.warn("gate: broker account of app {fingerprint} not updated: {error}", fingerprint=fingerprint,
                          error=str(e))

    async def app_access(self, unit: Unit, app_token: str) -> Access | None:
        access = await registry.access_for(self.hub.store, unit.id, self._keys().hash(APP, app_token))
        if access is not None:
            await registry.touch_access(self.hub.store, access.id, self.now())
        return access

    async def app_units(self, app_token: str) -> list[tuple[Access, Unit]]:
        return await registry.accesses_of_token(self.hub.store, self._keys().hash(APP, app_token))

    # -- sharing tokens

    async def create_share(self, unit: Unit, level: str, expires_in: float, caller: Caller) -> tuple[Share, str]:
        if expires_in > self.config.share_max_ttl:
            raise Refused(400, "expiry_too_long",
                          f"a sharing token may last at most {self.config.share_max_ttl:g} s")
        if caller.kind == "app" and (caller.level is None or not level_at_least(caller.level, level)):
            raise Refused(403, "access_level", f"an app with {caller.level} access cannot share {level} access")
        token, stored = self._keys().mint(SHARE)
        now = self.now()
        share = await registry.create_share(
            self.hub.store, unit_id=unit.id, prefix=token.public, secret_hash=stored, level=level,
            actor=caller.actor, now=now, expires_at=now + expires_in,
        )
        return share, token.text

    async def redeem_share(self, share_token: str, app_token: str) -> tuple[Share, Access]:
        keys = self._keys()
        share, access = await registry.redeem_share(
            self.hub.store, secret_hash=keys.hash(SHARE, share_token), token_hash=keys.hash(APP, app_token),
            fingerprint=keys.fingerprint(APP, app_token), used_by=self.app_actor(app_token), now=self.now(),
        )
        await self._app_account(access.fingerprint, app_token, strict=False)
        return share, access

    async def revoke_share(self, unit: Unit, share_id: int, caller: Caller) -> Share:
        share = await registry.get_share(self.hub.store, share_id)
        if share is None or share.unit_id != unit.id:
            raise Refused(404, "not_found", f"sharing token {share_id} not found on {unit.controller_id}")
        if caller.kind == "app" and share.created_by != caller.actor:
            raise Refused(403, "not_creator", "an app may revoke only the sharing tokens it created")
        if not await registry.revoke_share(self.hub.store, share_id, self.now()):
            raise Refused(409, f"share_{share.state(self.now())}",
                          f"sharing token {share_id} is {share.state(self.now())} and cannot be revoked")
        return attrs.evolve(share, revoked_at=self.now())

    # -- files

    def file_url(self, base_url: str, file_id: str, direction: str, max_size: int) -> tuple[str, int]:
        assert self.signer is not None
        expires = int(self.now() + self.config.url_ttl)
        query = self.signer.query(file_id, direction, expires, max_size)
        return f"{self.config.public_url or base_url}{FILES_PATH}{file_id}?{query}", expires

    async def _move_files_in(self) -> None:
        """Files stored in data_dir/gate/files by earlier versions go into the database (then the file goes):
        every hub of a cluster serves them from there. A file whose hash is wrong stays and is logged."""
        if not self.files_dir.is_dir():
            return
        rows = await self.hub.store.fetchall(
            "SELECT f.id, f.sha256 FROM gate_files f WHERE f.stored_at IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM blob_parts p WHERE p.owner = ? AND p.blob_id = f.id)", (FILE_BLOBS,))
        await blobs.move_files_in(self.hub.store, FILE_BLOBS, [(i, self.files_dir / i, d) for i, d in rows],
                                  "gate: file")

    def _check_size(self, size: int) -> None:
        if size > self.config.max_file_size:
            raise Refused(413, "too_large", f"{size} bytes; files may have at most {self.config.max_file_size}")

    async def upload_url(self, unit: Unit, *, name: str, size: int, kind: str, base_url: str,
                         actor: str) -> tuple[FileRecord, str, int]:
        self._check_size(size)
        record = FileRecord(uuid.uuid4().hex, unit.id, UP, kind, name, size, None, None, self.now(), actor, None)
        await registry.create_file(self.hub.store, record)
        url, expires = self.file_url(base_url, record.id, UP, size)
        return record, url, expires

    async def download_url(self, unit: Unit, file_id: str, base_url: str) -> tuple[FileRecord, str, int]:
        record = await registry.get_file(self.hub.store, file_id)
        if record is None or record.unit_id != unit.id:
            raise Refused(404, "not_found", f"file {file_id} not found on {unit.controller_id}")
        if record.stored_at is None:
            raise Refused(409, "not_uploaded", f"file {file_id} has not been uploaded yet")
        url, expires = self.file_url(base_url, record.id, DOWN, int(record.size or 0))
        return record, url, expires

    def _verify(self, file_id: str, direction: str, args: dict[str, str]) -> int:
        assert self.signer is not None
        try:
            return self.signer.verify(file_id, direction, args, self.now())
        except BadURL as e:
            raise Refused(403, e.code, e.message) from None

    async def receive_upload(self, file_id: str, args: dict[str, str], content: Any) -> FileRecord:
        """Store the body of a PUT to a signed upload URL (a URL uploads once, at most its size)."""
        limit = self._verify(file_id, UP, args)
        record = await registry.get_file(self.hub.store, file_id)
        if record is None or record.direction != UP:
            raise Refused(404, "not_found", f"file {file_id} not found")
        if record.stored_at is not None:
            raise Refused(409, "already_uploaded", f"file {file_id} was uploaded already; ask for a new URL")
        content.seek(0, os.SEEK_END)
        size = content.tell()
        if size > min(limit, record.max_size):
            raise Refused(413, "too_large", f"{size} bytes; this URL takes at most {min(limit, record.max_size)}")
        content.seek(0)
        now = self.now()

        def store(cursor: Any) -> bool:
            # One transaction: the file is marked stored only with all its parts in (whole or nothing).
            size, digest = blobs.write_stream(cursor, FILE_BLOBS, file_id, content)
            return registry.mark_stored(cursor, file_id, size, digest, now)

        if not await self.hub.store.interaction(store):
            raise Refused(409, "already_uploaded", f"file {file_id} was uploaded already; ask for a new URL")
        stored = await registry.get_file(self.hub.store, file_id)
        assert stored is not None
        unit = await registry.get_unit(self.hub.store, "id", stored.unit_id)
        if unit is not None:
            self._unit_event(unit, "file_stored", fileId=file_id, kind=stored.kind, name=stored.name, size=size)
        return stored

    async def _stored(self, record: FileRecord) -> AsyncIterator[bytes]:
        """The bytes of a stored file, read from the database a part at a time (404 if they are not there)."""
        size = int(record.size or 0)
        if (await blobs.stat(self.hub.store, FILE_BLOBS, record.id))[1] != size:
            # a file an earlier version kept on a hub that has not started this version yet
            self.log.warn("gate: file {file_id} is not in the database", file_id=record.id)
            raise Refused(404, "not_found", f"file {record.id} not found")
        return blobs.read(self.hub.store, FILE_BLOBS, record.id, size)

    async def read_download(self, file_id: str, args: dict[str, str]) -> tuple[FileRecord, AsyncIterator[bytes]]:
        limit = self._verify(file_id, DOWN, args)
        record = await registry.get_file(self.hub.store, file_id)
        if record is None or record.stored_at is None:
            raise Refused(404, "not_found", f"file {file_id} not found")
        if (record.size or 0) > limit:
            raise Refused(403, "bad_signature", "the URL was signed for another version of this file")
        return record, await self._stored(record)

    async def read_file(self, unit: Unit, file_id: str) -> tuple[FileRecord, AsyncIterator[bytes]]:
        """For operators (already authorized): the stored bytes of one of the unit's files."""
        record = await registry.get_file(self.hub.store, file_id)
        if record is None or record.unit_id != unit.id or record.stored_at is None:
            raise Refused(404, "not_found", f"file {file_id} not found on {unit.controller_id}")
        return record, await self._stored(record)

    async def push_config(self, unit: Unit, data: bytes, *, name: str, base_url: str, caller: Caller,
                          via: str) -> tuple[FileRecord, Command]:
        """Store a config file and tell the unit where to fetch it: a `config_update` command with a signed URL."""
        self._check_size(len(data))
        self._mqtt()  # refused before the file is stored: no unit could be told to fetch it
        now = self.now()
        file_id = uuid.uuid4().hex
        digest = hashlib.sha256(data).hexdigest()
        record = FileRecord(file_id, unit.id, DOWN, "config", name, len(data), len(data), digest, now, caller.actor,
                            now)

        def store(cursor: Any) -> None:
            blobs.write(cursor, FILE_BLOBS, file_id, data)
            registry.insert_file(cursor, record)

        await self.hub.store.interaction(store)
        url, expires = self.file_url(base_url, file_id, DOWN, len(data))
        args = {"file_id": file_id, "name": name, "size": len(data), "sha256": digest, "url": url,
                "url_expires": rfc3339(expires)}
        command = await self.send_command(unit, "config_update", args, caller=caller, via=via,
                                          timeout=max(self.config.command_timeout, self.config.url_ttl))
        return record, command

    # -- the dashboard

    async def summary(self) -> dict[str, Any]:
        row = await self.hub.store.fetchone("SELECT COUNT(*), COALESCE(SUM(online), 0) FROM gate_units")
        total, online = (int(row[0]), int(row[1])) if row else (0, 0)
        return {"gate_units": {"label": "Gate units online", "value": f"{online} / {total}", "href": "/gates"}}
