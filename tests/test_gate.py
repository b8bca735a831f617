"""Gate controllers end to end: a whole hub on real HTTP, units and apps as clients; one test on a real
Mosquitto, the others on a broker in memory (tests.memory_bridge).

Registration and renames, status and commands, app access, sharing tokens, signed file URLs, the admin pages.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import paho.mqtt.client as paho
import pytest
import pytest_twisted
import treq
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from twisted.internet import reactor, task, threads

from bsscihub import audit, blobs
from bsscihub.protocols.gate.service import FILE_BLOBS
from tests.broker import Mosquitto, Subscriber
from tests.memory_bridge import FollowingClock, MemoryBroker, MemoryWitness, until
from tests.test_families import PREFIX, RunningHub, eventually, start_hub

GATES = "/api/v1/gates"
APP_A = "app-token-alice-" + "a" * 24
APP_B = "app-token-bob---" + "b" * 24
APP_C = "app-token-carol-" + "c" * 24


class GateUnit:
    """A gate unit that reads its commands and answers them: its own paho client (on paho's thread) on a
    real broker, or a device subscription on a MemoryBroker.

    `reply(command) -> status document or None` decides the answer; None leaves the command unanswered.
    """

    def __init__(self, broker: Mosquitto | MemoryBroker, controller_id: str, *, username: str | None = None,
                 password: str | None = None, client_id: str | None = None,
                 reply: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> None:
        self.controller_id = controller_id
        self.commands: list[dict[str, Any]] = []
        self.reply = reply if reply is not None else (lambda c: {"state": "open", "command_id": c["id"],
                                                                "ok": True, "result": {"done": c["command"]}})
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self.granted: list[Any] = []
        self._broker = broker
        self._unlisten: Callable[[], Any] | None = None
        if isinstance(broker, MemoryBroker):
            return
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"unit-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda client, userdata, message: self._message(bytes(message.payload))
        self.client.on_subscribe = lambda c, u, mid, granted, p: (self.granted.extend(granted),
                                                                  self._subscribed.set())

    def _start(self, topic: str) -> None:
        self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert self._subscribed.wait(5), "no SUBACK"

    async def start(self) -> GateUnit:
        topic = f"gatetorio/{self.controller_id}/commands"
        if isinstance(self._broker, MemoryBroker):
            self._unlisten = self._broker.listen(topic, lambda _, payload: self._message(payload))
        else:
            await threads.deferToThread(self._start, topic)
        return self

    def _message(self, payload: bytes) -> None:
        command = json.loads(payload)
        with self._condition:
            self.commands.append(command)
            self._condition.notify_all()
        if isinstance(self._broker, MemoryBroker):
            # the unit's own code, off the reactor as on a real unit (a reply may fetch from the hub)
            threads.deferToThread(self.reply, command).addCallback(self._answer)
        else:
            self._answer(self.reply(command))

    def _answer(self, answer: dict[str, Any] | None) -> None:
        if answer is not None:
            self._send(f"gatetorio/{self.controller_id}/status", json.dumps(answer).encode())

    def _send(self, topic: str, data: bytes) -> Any:
        if isinstance(self._broker, MemoryBroker):
            self._broker.route(topic, data, False)
            return None
        return self.client.publish(topic, data, qos=1)

    async def publish(self, topic: str, doc: Any) -> None:
        info = self._send(topic, json.dumps(doc).encode())
        if info is not None:
            await threads.deferToThread(info.wait_for_publish, 5)

    async def status(self, doc: dict[str, Any]) -> None:
        await self.publish(f"gatetorio/{self.controller_id}/status", doc)

    def _wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        with self._condition:
            ok = self._condition.wait_for(lambda: any(predicate(c) for c in self.commands), timeout)
            assert ok, f"no such command; got {self.commands}"
            return next(c for c in self.commands if predicate(c))

    async def command(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        if isinstance(self._broker, MemoryBroker):
            await until(lambda: any(predicate(c) for c in self.commands), f"a command; got {self.commands}", timeout)
            return next(c for c in self.commands if predicate(c))
        return await threads.deferToThread(self._wait, predicate, timeout)

    def stop(self) -> None:
        if isinstance(self._broker, MemoryBroker):
            if self._unlisten is not None:
                self._unlisten()
            return
        self.client.disconnect()
        self.client.loop_stop()


async def refusals(running: RunningHub, action: str) -> list[tuple[str, str, int, str]]:
    """(actor, target, status, code) of every refusal of `action` in the audit log, oldest first."""
    entries, _ = await audit.query(running.hub.store, action=f"{action}.refused", limit=200)
    return [(e.actor, e.target, e.detail["status"], e.detail["code"]) for e in reversed(entries)]


async def new_key(running: RunningHub, **options: Any) -> str:
    code, doc = await running.api("POST", f"{GATES}/provisioning-keys", {"name": "installer", **options})
    assert code == 201, doc
    assert doc["key"].startswith(doc["prefix"] + "_")
    return str(doc["key"])


async def register(running: RunningHub, key: str | None, hardware_id: str, controller_id: str,
                   firmware: str = "1.0.0", *, unit_key: str | None = None) -> tuple[int, Any]:
    headers = {}
    if key is not None:
        headers["X-Provisioning-Key"] = key
    if unit_key is not None:
        headers["X-Unit-Key"] = unit_key
    return await running.api("POST", f"{GATES}/register", {
        "hardware_id": hardware_id, "controller_id": controller_id, "firmware_version": firmware,
    }, headers=headers, token=None)


def error(doc: Any) -> tuple[str, str]:
    return doc["error"]["code"], doc["error"]["message"]


async def start_gate_hub(tmp_path: Path, broker: Mosquitto | MemoryBroker, clock: FollowingClock | None = None, *,
                         mqtt: dict[str, Any] | None = None, **gate: Any) -> RunningHub:
    """`start_hub` with only the gate family, and broker credentials when `mqtt` has them."""
    if not mqtt:
        return await start_hub(tmp_path, broker, ["gate"], clock, gate=gate)
    # start_hub builds mqtt.url from the broker's host and port: the credentials go in front of the host.
    user, password = quote(mqtt["username"], safe=""), quote(mqtt["password"], safe="")
    address = SimpleNamespace(host=f"{user}:{password}@{broker.host}", port=broker.port)
    return await start_hub(tmp_path, address, ["gate"], gate=gate)  # type: ignore[arg-type]


# -- registration, identity, renames


@pytest_twisted.ensureDeferred
async def test_register_rename_and_reregister(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_gate_hub(tmp_path, broker)
    try:
        key = await new_key(running)

        code, doc = await register(running, None, "hw-1", "gate-1")
        assert (code, error(doc)[0]) == (401, "provisioning_key_required")
        code, doc = await register(running, "gpk_00000000_" + "x" * 43, "hw-1", "gate-1")
        assert (code, error(doc)) == (401, ("invalid_provisioning_key", "unknown provisioning key"))

        code, first = await register(running, key, "hw-1", "gate-1", "1.0.0")
        assert code == 201, first
        assert first["controller_id"] == "gate-1" and first["hardware_id"] == "hw-1"
        assert first["mqtt"]["topics"] == {"subscribe": "gatetorio/gate-1/commands",
                                           "publish": "gatetorio/gate-1/status"}
        assert first["mqtt"]["provisioned"] is False and first["mqtt"]["password"] is None
        assert first["unit_key"].startswith("gtu_")

        # The name is taken by hw-1: another unit is refused, and the refusal is audited.
        code, doc = await register(running, key, "hw-2", "gate-1")
        assert code == 409 and error(doc)[0] == "controller_id_taken"
        assert "hw-1" in error(doc)[1]

        # Rename: history kept, old name freed, a held name refused.
        code, renamed = await running.api("PATCH", f"{GATES}/gate-1", {"controller_id": "gate-north"})
        assert code == 200 and renamed["controller_id"] == "gate-north"
        code, _ = await running.api("GET", f"{GATES}/gate-1")
        assert code == 404
        code, second = await register(running, key, "hw-2", "gate-1")
        assert code == 201 and second["controller_id"] == "gate-1"
        code, doc = await running.api("PATCH", f"{GATES}/gate-north", {"controller_id": "gate-1"})
        assert code == 409 and error(doc)[0] == "controller_id_taken"
        code, unit = await running.api("GET", f"{GATES}/gate-north")
        assert [n["controller_id"] for n in unit["names"]] == ["gate-1", "gate-north"]
        assert unit["names"][0]["ended_at"] is not None and unit["names"][1]["ended_at"] is None
        assert unit["topics"]["publish"] == "gatetorio/gate-north/status"

        # Re-registration: a new key (the old one stops working), the firmware updated, the name kept.
        code, again = await register(running, key, "hw-1", "gate-1", "1.1.0")
        assert code == 200, again
        assert again["controller_id"] == "gate-north" and again["firmware_version"] == "1.1.0"
        assert "gate-north" in again["note"]
        assert again["unit_key"] != first["unit_key"]
        code, doc = await running.api("POST", f"{GATES}/gate-north/user-tokens",
                                      {"user_token": APP_A, "access_level": "user"},
                                      headers={"X-Unit-Key": first["unit_key"]}, token=None)
        assert (code, error(doc)[0]) == (401, "invalid_unit_key")
        # ... and a unit may re-register with its own key, but not as another unit.
        code, own = await register(running, None, "hw-1", "gate-north", "1.2.0", unit_key=again["unit_key"])
        assert code == 200 and own["firmware_version"] == "1.2.0"
        code, doc = await register(running, None, "hw-2", "gate-1", unit_key=own["unit_key"])
        assert (code, error(doc)[0]) == (403, "wrong_unit")

        # Single-use and revoked keys.
        once = await new_key(running, single_use=True)
        code, _ = await register(running, once, "hw-3", "gate-3")
        assert code == 201
        code, doc = await register(running, once, "hw-4", "gate-4")
        assert (code, error(doc)[0]) == (401, "provisioning_key_used")
        code, keys = await running.api("GET", f"{GATES}/provisioning-keys")
        [spent] = [k for k in keys["items"] if k["single_use"]]
        assert spent["state"] == "used" and spent["uses"] == 1 and "key" not in spent
        [reusable] = [k for k in keys["items"] if not k["single_use"]]
        code, _ = await running.api("DELETE", f"{GATES}/provisioning-keys/{reusable['id']}")
        assert code == 204
        code, doc = await register(running, key, "hw-4", "gate-4")
        assert (code, error(doc)) == (401, ("provisioning_key_revoked", "the provisioning key was revoked"))
        code, doc = await register(running, key, "hw-4", "register")  # a reserved path segment
        assert code == 401  # the key is checked first: nothing is learned without one

        code, listed = await running.api("GET", f"{GATES}?q=gate")
        assert [u["controller_id"] for u in listed["items"]] == ["gate-1", "gate-3", "gate-north"]

        prefix = key[:12]  # gpk_ and 8 hex digits: the public part
        assert await refusals(running, "gate.register") == [
            ("anonymous", "gate-1", 401, "provisioning_key_required"),
            ("gate-key:gpk_00000000", "gate-1", 401, "invalid_provisioning_key"),
            (f"gate-key:{prefix}", "gate-1", 409, "controller_id_taken"),
            ("gate-unit:hw-1", "gate-1", 403, "wrong_unit"),
            (f"gate-key:{once[:12]}", "gate-4", 401, "provisioning_key_used"),
            (f"gate-key:{prefix}", "gate-4", 401, "provisioning_key_revoked"),
            (f"gate-key:{prefix}", "register", 401, "provisioning_key_revoked"),
        ]
        assert await refusals(running, "gate.rename") == [("admin", "gate-north", 409, "controller_id_taken")]
        assert await refusals(running, "gate.app.grant") == [("anonymous", "gate-north", 401, "invalid_unit_key")]
        entries, _ = await audit.query(running.hub.store, action="gate.register")
        assert {e.target for e in entries} == {"gate-1", "gate-north", "gate-3"}
        assert all(first["unit_key"] not in json.dumps(e.detail) for e in entries), "no secret in the audit log"
    finally:
        await running.stop()


async def registered(running: RunningHub, hardware_id: str, controller_id: str) -> dict[str, Any]:
    code, doc = await register(running, await new_key(running), hardware_id, controller_id)
    assert code == 201, doc
    return doc  # type: ignore[no-any-return]


def on(subscriber: Subscriber | MemoryWitness, topic: str) -> Callable[[Any], bool]:
    return lambda m: m.topic == topic


# -- status, online state, commands


@pytest_twisted.ensureDeferred
async def test_status_commands_results_and_timeouts(tmp_path: Path) -> None:
    broker = MemoryBroker()
    witness = broker.witness(f"{PREFIX}/gate/#")
    clock = FollowingClock().start()  # moved past command deadlines and silence instead of waiting for them
    running = await start_gate_hub(tmp_path, broker, clock, offline_after="1500ms", command_timeout="1s")
    unit = quiet = None
    try:
        await registered(running, "hw-1", "gate-1")
        unit = await GateUnit(broker, "gate-1").start()

        # Status: last status, history, online (retained state), the status event.
        await unit.status({"state": "closed", "battery": 87})
        state_topic = f"{PREFIX}/gate/unit/gate-1/state"
        [online] = await witness.when(on(witness, state_topic))
        assert online.retain and json.loads(online.payload)["state"] == "online"
        [status] = await witness.when(on(witness, f"{PREFIX}/gate/unit/gate-1/status"))
        assert json.loads(status.payload)["battery"] == 87 and status.retain
        code, doc = await running.api("GET", f"{GATES}/gate-1")
        assert doc["online"] is True and doc["last_status"] == {"state": "closed", "battery": 87}
        await unit.status({"state": "open", "battery": 86})
        history = await eventually(lambda: _history(running, "gate-1", 2), what="two status messages")
        assert [h["status"]["state"] for h in history] == ["open", "closed"]

        # A command from REST: out on the unit's topic with an id, completed by the status answering it.
        code, done = await running.api("POST", f"{GATES}/gate-1/commands?wait=5", {"command": "open", "args": {"s": 1}})
        assert code == 200, json.dumps(done)
        assert done["state"] == "succeeded" and done["result"] == {"done": "open"}
        sent = await unit.command(lambda c: c["id"] == done["id"])
        assert sent["command"] == "open" and sent["args"] == {"s": 1} and sent["expires"].endswith("Z")
        [event] = await witness.when(on(witness, f"{PREFIX}/gate/unit/gate-1/event/command"))
        assert json.loads(event.payload)["id"] == done["id"] and json.loads(event.payload)["ok"] is True

        # A unit that reports a failure fails the command; one that does not answer times it out.
        unit.reply = lambda c: {"state": "jammed", "command_id": c["id"], "ok": False, "error": "obstacle"}
        code, failed = await running.api("POST", f"{GATES}/gate-1/commands?wait=5", {"command": "close"})
        assert (code, failed["state"], failed["error"]) == (200, "failed", "obstacle")
        unit.reply = lambda c: None
        code, pending = await running.api("POST", f"{GATES}/gate-1/commands", {"command": "close"})
        assert code == 202 and pending["state"] == "pending"
        clock.advance(1.1)
        code, later = await running.api("GET", f"{GATES}/gate-1/commands/{pending['id']}?wait=5")
        assert code == 200 and later["state"] == "timeout" and "deadline" in later["error"]
        code, listed = await running.api("GET", f"{GATES}/gate-1/commands")
        assert [c["state"] for c in listed["items"]] == ["timeout", "failed", "succeeded"]

        # An answer to another unit's command is ignored: a unit cannot settle what it was not sent.
        await registered(running, "hw-2", "gate-2")
        quiet = await GateUnit(broker, "gate-2", reply=lambda c: None).start()
        code, theirs = await running.api("POST", f"{GATES}/gate-2/commands", {"command": "open", "timeout": 2})
        await unit.status({"command_id": theirs["id"], "ok": True, "result": "forged"})
        clock.advance(2.1)
        code, still = await running.api("GET", f"{GATES}/gate-2/commands/{theirs['id']}?wait=3")
        # gate-2 never reported a status (offline): the command waited in the hub and expired there.
        assert still["state"] == "failed" and still["result"] is None and "expired" in still["error"]

        # The same from MQTT: {p}/gate/unit/{id}/cmd/{name}, answered on cmd_result once the unit answered.
        unit.reply = GateUnit(broker, "x").reply
        await unit.status({"state": "open"})  # a heartbeat: gate-1 was silent longer than offline_after
        await unit.publish(f"{PREFIX}/gate/unit/gate-1/cmd/stop", {"fast": True})
        [answer] = await witness.when(on(witness, f"{PREFIX}/gate/unit/gate-1/event/cmd_result"))
        doc = json.loads(answer.payload)
        assert doc["ok"] is True and doc["result"] == {"done": "stop"}

        # Offline after silence (the retained state says so), online again with the next status.
        witness.clear()
        unit.stop()
        unit = None
        clock.advance(2)
        await witness.when(lambda m: m.topic == state_topic and json.loads(m.payload)["state"] == "offline",
                           timeout=6)
        code, doc = await running.api("GET", f"{GATES}/gate-1")
        assert doc["online"] is False and doc["online_since"] is None
    finally:
        for u in (unit, quiet):
            if u is not None:
                u.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_commands_to_an_offline_unit_wait_bounded_and_are_never_relayed_late(tmp_path: Path) -> None:
    """Each command carries when it was issued and when it expires; an offline unit gets what did not expire
    when it is back, the rest fails with the reason and is never sent; at most max_queued_commands wait."""
    broker = MemoryBroker()
    witness = broker.witness(f"{PREFIX}/gate/#")
    clock = FollowingClock().start()  # moved past the short command's deadline instead of waiting for it
    running = await start_gate_hub(tmp_path, broker, clock, command_timeout="30s", max_queued_commands=2)
    unit = None
    try:
        await registered(running, "hw-1", "gate-1")
        unit = await GateUnit(broker, "gate-1", reply=lambda c: None).start()
        # Never heard from yet: offline. Three commands wait; the first (oldest) fails at once, unsent.
        ids = []
        for name, timeout in (("open", 30), ("close", 1), ("stop", 30)):
            code, doc = await running.api("POST", f"{GATES}/gate-1/commands", {"command": name, "timeout": timeout})
            assert code == 202 and doc["state"] == "pending" and doc["relayed_at"] is None
            ids.append(doc["id"])
        code, dropped = await running.api("GET", f"{GATES}/gate-1/commands/{ids[0]}")
        assert dropped["state"] == "failed" and "more than 2 commands were waiting" in dropped["error"]
        # The short one expires while waiting: failed with that reason.
        clock.advance(1.1)
        code, expired = await running.api("GET", f"{GATES}/gate-1/commands/{ids[1]}?wait=3")
        assert expired["state"] == "failed" and expired["error"].startswith("expired before it could be relayed")
        [event] = [json.loads(m.payload) for m in await witness.when(
            lambda m: m.topic == f"{PREFIX}/gate/unit/gate-1/event/command" and ids[1].encode() in m.payload)]
        assert event["state"] == "failed" and "expired" in event["error"]
        # The unit comes online: only the live command reaches it, with issued-at and expiry.
        await unit.status({"state": "closed"})
        sent = await unit.command(lambda c: c["id"] == ids[2])
        assert sent["command"] == "stop" and sent["time"].endswith("Z") and sent["expires"].endswith("Z")
        assert sent["time"] < sent["expires"]
        await task.deferLater(reactor, 0.3, lambda: None)
        assert [c["id"] for c in unit.commands] == [ids[2]], "nothing expired or dropped was sent"
        code, relayed = await running.api("GET", f"{GATES}/gate-1/commands/{ids[2]}")
        assert relayed["state"] == "pending" and relayed["relayed_at"] is not None
        # Online now: a new command goes out at once.
        code, direct = await running.api("POST", f"{GATES}/gate-1/commands", {"command": "open"})
        assert direct["relayed_at"] is not None
        await unit.command(lambda c: c["id"] == direct["id"])
    finally:
        if unit is not None:
            unit.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_commands_waiting_for_a_unit_survive_a_hub_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_gate_hub(tmp_path, mosquitto)
    unit = None
    try:
        await registered(running, "hw-1", "gate-1")
        code, waiting = await running.api("POST", f"{GATES}/gate-1/commands", {"command": "open", "timeout": 60})
        assert code == 202 and waiting["relayed_at"] is None
        await running.stop()
        running = await start_gate_hub(tmp_path, mosquitto)
        unit = await GateUnit(mosquitto, "gate-1", reply=lambda c: None).start()
        await unit.status({"state": "closed"})
        sent = await unit.command(lambda c: c["id"] == waiting["id"])
        assert sent["command"] == "open" and sent["expires"] == waiting["deadline"]
    finally:
        if unit is not None:
            unit.stop()
        await running.stop()


async def _history(running: RunningHub, controller_id: str, count: int) -> list[dict[str, Any]] | None:
    code, doc = await running.api("GET", f"{GATES}/{controller_id}/status")
    return doc["items"] if code == 200 and len(doc["items"]) >= count else None


# -- app access (tokens captured over BLE) and sharing tokens


async def as_app(running: RunningHub, token: str | None, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await running.api(method, path, body, headers={"X-App-Token": token} if token else {}, token=None)


@pytest_twisted.ensureDeferred
async def test_app_access_levels_and_discovery(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_gate_hub(tmp_path, broker, command_timeout="3s")
    unit = None
    try:
        first = await registered(running, "hw-1", "gate-1")
        other = await registered(running, "hw-2", "gate-2")
        unit = await GateUnit(broker, "gate-1").start()
        await unit.status({"state": "closed"})  # online: commands are relayed at once

        async def grant(key: str, controller_id: str, token: str, level: str) -> tuple[int, Any]:
            return await running.api("POST", f"{GATES}/{controller_id}/user-tokens",
                                     {"user_token": token, "access_level": level},
                                     headers={"X-Unit-Key": key}, token=None)

        # Only the unit itself maps tokens to itself.
        code, doc = await grant(other["unit_key"], "gate-1", APP_A, "user")
        assert (code, error(doc)[0]) == (403, "wrong_unit")
        code, doc = await running.api("POST", f"{GATES}/gate-1/user-tokens", {"user_token": APP_A,
                                                                              "access_level": "user"}, token=None)
        assert (code, error(doc)[0]) == (401, "unit_key_required")
        code, access = await grant(first["unit_key"], "gate-1", APP_A, "user")
        assert code == 201 and access["access_level"] == "user" and APP_A not in json.dumps(access)
        code, _ = await grant(first["unit_key"], "gate-1", APP_B, "engineer")
        code, _ = await grant(other["unit_key"], "gate-2", APP_B, "user")
        assert code == 201

        # Discovery: each app sees the units it may reach, with its level there.
        code, mine = await as_app(running, APP_A, "GET", f"{GATES}/mine")
        assert [(u["controller_id"], u["access_level"]) for u in mine["items"]] == [("gate-1", "user")]
        code, mine = await as_app(running, APP_B, "GET", f"{GATES}/mine")
        assert [(u["controller_id"], u["access_level"]) for u in mine["items"]] == [("gate-1", "engineer"),
                                                                                   ("gate-2", "user")]
        code, doc = await as_app(running, None, "GET", f"{GATES}/mine")
        assert (code, error(doc)[0]) == (401, "app_token_required")

        # Commands limited by level: user opens and closes, only an engineer configures.
        code, done = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/commands?wait=5", {"command": "open"})
        assert code == 200 and done["state"] == "succeeded" and done["via"] == "app"
        code, doc = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/commands", {"command": "configure"})
        assert code == 403 and error(doc) == ("access_level", "configure needs engineer access; this app has user")
        code, done = await as_app(running, APP_B, "POST", f"{GATES}/gate-1/commands?wait=5",
                                  {"command": "configure", "args": {"close_after": 30}})
        assert code == 200 and done["result"] == {"done": "configure"}
        code, doc = await as_app(running, APP_C, "POST", f"{GATES}/gate-1/commands", {"command": "open"})
        assert (code, error(doc)[0]) == (403, "no_access")
        code, doc = await as_app(running, APP_A, "POST", f"{GATES}/gate-9/commands", {"command": "open"})
        assert (code, error(doc)) == (403, ("no_access", "this app has no access to gate unit gate-9"))
        code, doc = await as_app(running, None, "POST", f"{GATES}/gate-1/commands", {"command": "open"})
        assert (code, error(doc)[0]) == (401, "unauthorized")

        # An app reads its own commands only.
        code, mine_again = await as_app(running, APP_B, "GET", f"{GATES}/gate-1/commands/{done['id']}")
        assert code == 200 and mine_again["state"] == "succeeded"
        code, doc = await as_app(running, APP_A, "GET", f"{GATES}/gate-1/commands/{done['id']}")
        assert code == 404

        # Revocation: by the unit (unpaired over BLE) or by an operator; the token then reaches nothing there.
        code, _ = await running.api("POST", f"{GATES}/gate-1/user-tokens/revoke", {"user_token": APP_A},
                                    headers={"X-Unit-Key": first["unit_key"]}, token=None)
        assert code == 204
        code, doc = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/commands", {"command": "open"})
        assert (code, error(doc)[0]) == (403, "no_access")
        code, listed = await running.api("GET", f"{GATES}/gate-1/user-tokens")
        by_level = {a["access_level"]: a for a in listed["items"]}
        assert by_level["user"]["state"] == "revoked" and by_level["engineer"]["state"] == "active"
        code, _ = await running.api("DELETE", f"{GATES}/gate-1/user-tokens/{by_level['engineer']['id']}")
        assert code == 204
        code, mine = await as_app(running, APP_B, "GET", f"{GATES}/mine")
        assert [u["controller_id"] for u in mine["items"]] == ["gate-2"]

        app_a = running.hub.services["gate"].app_actor(APP_A)
        app_c = running.hub.services["gate"].app_actor(APP_C)
        assert await refusals(running, "gate.app.grant") == [
            ("gate-unit:hw-2", "gate-1", 403, "wrong_unit"), ("anonymous", "gate-1", 401, "unit_key_required")]
        assert await refusals(running, "gate.command") == [
            (app_a, "gate-1", 403, "access_level"), (app_c, "gate-1", 403, "no_access"),
            (app_a, "gate-9", 403, "no_access"), ("anonymous", "gate-1", 401, "unauthorized"),
            (app_a, "gate-1", 403, "no_access")]
        assert await refusals(running, "gate.command.read") == [(app_a, "gate-1", 404, "not_found")]
    finally:
        if unit is not None:
            unit.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_sharing_tokens_are_redeemed_once(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_gate_hub(tmp_path, broker, share_max_ttl="2d")
    try:
        first = await registered(running, "hw-1", "gate-1")
        for token, level in ((APP_A, "engineer"), (APP_B, "user")):
            code, _ = await running.api("POST", f"{GATES}/gate-1/user-tokens",
                                        {"user_token": token, "access_level": level},
                                        headers={"X-Unit-Key": first["unit_key"]}, token=None)
            assert code == 201
        service = running.hub.services["gate"]

        # An engineer hands over engineer access; a user may not share more than user access.
        code, share = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/shares",
                                   {"access_level": "engineer", "expires_in": 3600})
        assert code == 201 and share["share_token"].startswith(share["prefix"] + "_")
        code, doc = await as_app(running, APP_B, "POST", f"{GATES}/gate-1/shares",
                                 {"access_level": "engineer", "expires_in": 3600})
        assert (code, error(doc)[0]) == (403, "access_level")
        code, doc = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/shares",
                                 {"access_level": "user", "expires_in": 3 * 86400})
        assert (code, error(doc)[0]) == (400, "expiry_too_long")

        # Redeemed once: the redeeming app gets the level; used_by and the time are recorded.
        code, redeemed = await as_app(running, APP_C, "POST", f"{GATES}/shares/redeem",
                                      {"share_token": share["share_token"]})
        assert code == 200 and redeemed == {"controller_id": "gate-1", "access_level": "engineer",
                                            "share_id": share["id"]}
        code, mine = await as_app(running, APP_C, "GET", f"{GATES}/mine")
        assert [(u["controller_id"], u["access_level"], u["via"]) for u in mine["items"]] == [
            ("gate-1", "engineer", "share")]
        code, listed = await running.api("GET", f"{GATES}/gate-1/shares")
        [used] = listed["items"]
        assert used["state"] == "used" and used["used_by"] == service.app_actor(APP_C) and used["used_at"]
        assert "share_token" not in used

        # Every refusal, with a clear error: reused, expired, revoked, unknown.
        code, doc = await as_app(running, APP_B, "POST", f"{GATES}/shares/redeem",
                                 {"share_token": share["share_token"]})
        assert (code, error(doc)) == (409, ("share_used", "this sharing token was already redeemed"))

        code, short = await running.api("POST", f"{GATES}/gate-1/shares", {"access_level": "user", "expires_in": 60})
        assert code == 201 and short["created_by"] == "admin"
        real_now = service.now
        service.now = lambda: real_now() + 61
        try:
            code, doc = await as_app(running, APP_B, "POST", f"{GATES}/shares/redeem",
                                     {"share_token": short["share_token"]})
        finally:
            service.now = real_now
        assert (code, error(doc)) == (410, ("share_expired", "this sharing token has expired"))

        code, revoked = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/shares",
                                     {"access_level": "user", "expires_in": 600})
        code, doc = await as_app(running, APP_B, "DELETE", f"{GATES}/gate-1/shares/{revoked['id']}")
        assert (code, error(doc)[0]) == (403, "not_creator")
        code, _ = await as_app(running, APP_A, "DELETE", f"{GATES}/gate-1/shares/{revoked['id']}")
        assert code == 204
        code, doc = await as_app(running, APP_B, "POST", f"{GATES}/shares/redeem",
                                 {"share_token": revoked["share_token"]})
        assert (code, error(doc)) == (410, ("share_revoked", "this sharing token was revoked"))
        code, doc = await running.api("DELETE", f"{GATES}/gate-1/shares/{share['id']}")
        assert (code, error(doc)[0]) == (409, "share_used")

        code, doc = await as_app(running, APP_B, "POST", f"{GATES}/shares/redeem", {"share_token": "gsh_nope"})
        assert (code, error(doc)) == (404, ("share_unknown", "unknown sharing token"))
        code, doc = await as_app(running, None, "POST", f"{GATES}/shares/redeem", {"share_token": "gsh_nope"})
        assert (code, error(doc)[0]) == (401, "app_token_required")

        app_a, app_b = service.app_actor(APP_A), service.app_actor(APP_B)
        assert await refusals(running, "gate.share.redeem") == [
            (app_b, share["prefix"], 409, "share_used"), (app_b, short["prefix"], 410, "share_expired"),
            (app_b, revoked["prefix"], 410, "share_revoked"), (app_b, "unknown", 404, "share_unknown"),
            ("anonymous", "", 401, "app_token_required")]
        assert await refusals(running, "gate.share.create") == [
            (app_b, "gate-1", 403, "access_level"), (app_a, "gate-1", 400, "expiry_too_long")]
        assert await refusals(running, "gate.share.revoke") == [
            (app_b, "gate-1", 403, "not_creator"), ("admin", "gate-1", 409, "share_used")]
        entries, _ = await audit.query(running.hub.store, action="gate.share.redeem")
        assert [(e.actor, e.target, e.detail["access_level"]) for e in entries] == [
            (service.app_actor(APP_C), "gate-1", "engineer")]
    finally:
        await running.stop()


# -- files by signed URL


def tampered(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


async def fetch(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    response = await treq.request(method, url, data=data)
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_files_by_signed_urls(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_gate_hub(tmp_path, broker, url_ttl="10m", command_timeout="5s")
    unit = None
    try:
        first = await registered(running, "hw-1", "gate-1")
        other = await registered(running, "hw-2", "gate-2")
        service = running.hub.services["gate"]
        as_unit = {"X-Unit-Key": first["unit_key"]}

        # The unit asks for an upload URL for its logs and PUTs them there, once.
        code, doc = await running.api("POST", f"{GATES}/gate-1/files/upload-url",
                                      {"name": "gate.log", "size": 2000, "kind": "log"},
                                      headers={"X-Unit-Key": other["unit_key"]}, token=None)
        assert (code, error(doc)[0]) == (403, "wrong_unit")
        code, upload = await running.api("POST", f"{GATES}/gate-1/files/upload-url",
                                         {"name": "gate.log", "size": 2000, "kind": "log"}, headers=as_unit, token=None)
        assert code == 201 and upload["method"] == "PUT" and upload["max_size"] == 2000
        url, file_id = upload["url"], upload["file"]["id"]
        assert url.startswith(running.base + f"{GATES}/files/{file_id}?")
        log = b"boot ok\n" * 200
        code, body = await fetch("PUT", tampered(url, max="100000"), log)
        assert (code, json.loads(body)["error"]["code"]) == (403, "bad_signature")
        code, body = await fetch("PUT", url.replace(file_id, "f" * 32), log)
        assert (code, json.loads(body)["error"]["code"]) == (403, "bad_signature")
        code, body = await fetch("PUT", url, log + b"x" * 1000)
        assert (code, json.loads(body)["error"]["code"]) == (413, "too_large")
        code, body = await fetch("GET", url)
        assert (code, json.loads(body)["error"]) == (403, {"code": "wrong_direction",
                                                           "message": "this URL is for upload only"})
        code, body = await fetch("PUT", url, log)
        assert code == 201 and json.loads(body)["sha256"] == hashlib.sha256(log).hexdigest()
        code, body = await fetch("PUT", url, log)
        assert (code, json.loads(body)["error"]["code"]) == (409, "already_uploaded")
        # In the database (every hub of a cluster serves it), not on this hub's disk.
        assert await blobs.read_all(running.hub.store, FILE_BLOBS, file_id, len(log)) == log
        assert not (tmp_path / "var" / "gate" / "files").exists()

        # An operator, or an engineer app, gets a download URL; a user-level app does not.
        code, down = await running.api("POST", f"{GATES}/gate-1/files/{file_id}/download-url")
        assert code == 200 and down["method"] == "GET"
        assert await fetch("GET", down["url"]) == (200, log)
        code, body = await fetch("PUT", down["url"], b"overwrite")
        assert (code, json.loads(body)["error"]["code"]) == (403, "wrong_direction")
        for token, level in ((APP_A, "user"), (APP_B, "engineer")):
            await running.api("POST", f"{GATES}/gate-1/user-tokens", {"user_token": token, "access_level": level},
                              headers=as_unit, token=None)
        code, doc = await as_app(running, APP_A, "POST", f"{GATES}/gate-1/files/{file_id}/download-url")
        assert (code, error(doc)[0]) == (403, "access_level")
        code, by_app = await as_app(running, APP_B, "POST", f"{GATES}/gate-1/files/{file_id}/download-url")
        assert code == 200 and await fetch("GET", by_app["url"]) == (200, log)
        code, doc = await as_app(running, APP_B, "POST", f"{GATES}/gate-2/files/{file_id}/download-url")
        assert (code, error(doc)[0]) == (403, "no_access")

        # URLs expire.
        real_now = service.now
        service.now = lambda: real_now() + 601
        try:
            code, body = await fetch("GET", down["url"])
        finally:
            service.now = real_now
        assert (code, json.loads(body)["error"]["code"]) == (403, "url_expired")

        # A new config goes to the unit as an MQTT command carrying a download URL; the unit fetches it.
        fetched: list[bytes] = []

        def reply(command: dict[str, Any]) -> dict[str, Any]:
            response = __import__("urllib.request").request.urlopen(command["args"]["url"], timeout=5)
            fetched.append(response.read())
            return {"command_id": command["id"], "ok": True, "result": {"applied": command["args"]["sha256"]}}

        unit = await GateUnit(broker, "gate-1", reply=reply).start()
        await unit.status({"state": "closed"})  # online: commands are relayed at once
        config = b'{"close_after": 45, "light": "on"}'
        code, pushed = await running.api("POST", f"{GATES}/gate-1/config?name=gate.json", raw=config,
                                         headers={"Content-Type": "application/octet-stream"})
        assert code == 202, pushed
        sent = await unit.command(lambda c: c["command"] == "config_update")
        assert sent["args"]["size"] == len(config) and sent["args"]["name"] == "gate.json"
        code, done = await running.api("GET", f"{GATES}/gate-1/commands/{pushed['command']['id']}?wait=5")
        assert done["state"] == "succeeded" and done["result"] == {"applied": hashlib.sha256(config).hexdigest()}
        assert fetched == [config]
        code, files = await running.api("GET", f"{GATES}/gate-1/files")
        assert [(f["name"], f["direction"], f["state"]) for f in files["items"]] == [
            ("gate.json", "down", "stored"), ("gate.log", "up", "stored")]

        # Deleting the unit deletes its files too: its URLs find nothing any more.
        code, _ = await running.api("DELETE", f"{GATES}/gate-1")
        assert code == 204
        assert await running.hub.store.fetchall("SELECT blob_id FROM blob_parts WHERE owner = ?", (FILE_BLOBS,)) == []
        code, body = await fetch("GET", by_app["url"])
        assert (code, json.loads(body)["error"]["code"]) == (404, "not_found")

        assert [r[3] for r in await refusals(running, "gate.file.upload")] == [
            "bad_signature", "bad_signature", "too_large", "already_uploaded", "wrong_direction"]
        assert [r[3] for r in await refusals(running, "gate.file.download")] == [
            "wrong_direction", "url_expired", "not_found"]
        assert [r[3] for r in await refusals(running, "gate.file.download_url")] == ["access_level", "no_access"]
    finally:
        if unit is not None:
            unit.stop()
        await running.stop()


# -- admin pages and the API document


@pytest_twisted.ensureDeferred
async def test_admin_pages_and_openapi(tmp_path: Path) -> None:
    broker = MemoryBroker()
    running = await start_gate_hub(tmp_path, broker, command_timeout="5s")
    unit = None
    try:
        first = await registered(running, "hw-1", "gate-1")
        await running.api("POST", f"{GATES}/gate-1/user-tokens", {"user_token": APP_A, "access_level": "user"},
                          headers={"X-Unit-Key": first["unit_key"]}, token=None)
        unit = await GateUnit(broker, "gate-1").start()
        await unit.status({"state": "closed"})

        # Provisioning keys: created on the page, shown once.
        code, location = await running.form("/gates/keys", {"name": "van 7", "single_use": "on",
                                                            "expires_in_days": "30"})
        assert (code, location) == (303, "/gates")
        code, html = await running.page("/gates")
        assert code == 200 and "van 7" in html and "Shown only now" in html
        code, keys = await running.api("GET", f"{GATES}/provisioning-keys")
        [key] = [k for k in keys["items"] if k["name"] == "van 7"]
        assert key["single_use"] and key["expires_at"] and f"{key['prefix']}_" in html
        code, html = await running.page("/gates")
        assert "Shown only now" not in html and "gate-1" in html and "hw-1" in html

        # A unit's page: commands sent from it, with their results; app access; a sharing token shown once.
        code, location = await running.form("/gates/gate-1/commands", {"command": "open", "args": '{"s": 2}'})
        assert (code, location) == (303, "/gates/gate-1")
        await eventually(lambda: _command_states(running, "gate-1", ["succeeded"]), what="the command's result")
        code, location = await running.form("/gates/gate-1/commands", {"command": "open", "args": "{nope"})
        assert code == 303
        code, location = await running.form("/gates/gate-1/shares", {"access_level": "user", "expires_in_hours": "2"})
        assert (code, location) == (303, "/gates/gate-1")
        code, html = await running.page("/gates/gate-1")
        assert code == 200
        fingerprint = running.hub.services["gate"].app_actor(APP_A).split(":")[1]
        for text in ("gate-1", "hw-1", "Last status", '"state": "open"', '"closed"', "succeeded", "done",
                     "Shown only now", "gsh_", fingerprint, "arguments: not valid JSON"):
            assert text in html, text

        # A config pushed from the page (a file upload) reaches the unit as config_update.
        cookies, csrf = await running._login()
        response = await treq.post(running.base + "/gates/gate-1/config", data={"_csrf": csrf, "name": "gate.json"},
                                   files={"file": ("gate.json", "application/json", __import__("io").BytesIO(b"{}"))},
                                   cookies=cookies, allow_redirects=False)
        assert response.code == 303, await response.text()
        pushed = await unit.command(lambda c: c["command"] == "config_update")
        assert pushed["args"]["name"] == "gate.json" and pushed["args"]["size"] == 2

        # Rename from the page; a taken name comes back as an error on the page, and in the audit log.
        await registered(running, "hw-2", "gate-2")
        code, location = await running.form("/gates/gate-1/rename", {"controller_id": "gate-2"})
        assert (code, location) == (303, "/gates/gate-1")
        code, location = await running.form("/gates/gate-1/rename", {"controller_id": "gate-east"})
        assert (code, location) == (303, "/gates/gate-east")
        assert await refusals(running, "gate.rename") == [("admin", "gate-1", 409, "controller_id_taken")]

        code, html = await running.page("/")
        assert code == 200 and "Gate units online" in html and 'href="/gates"' in html

        # The OpenAPI document lists the routes at the paths units and apps call, with their roles.
        code, document = await running.api("GET", "/api/v1/openapi.json", token=None)
        paths = document["paths"]
        assert paths["/gates/register"]["post"]["x-required-role"] == "none"
        assert "X-Provisioning-Key" in paths["/gates/register"]["post"]["description"]
        assert paths["/gates/{controller_id}"]["patch"]["x-required-role"] == "operator"
        assert paths["/gates/provisioning-keys"]["post"]["x-required-role"] == "admin"
        assert {"/gates/{controller_id}/commands", "/gates/{controller_id}/user-tokens", "/gates/mine",
                "/gates/shares/redeem", "/gates/files/{file_id}"} <= set(paths)
    finally:
        if unit is not None:
            unit.stop()
        await running.stop()


async def _command_states(running: RunningHub, controller_id: str, states: list[str]) -> bool:
    code, doc = await running.api("GET", f"{GATES}/{controller_id}/commands")
    return [c["state"] for c in doc["items"]] == states


@pytest_twisted.ensureDeferred
async def test_a_command_is_refused_503_when_the_hub_has_no_mqtt_bridge(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an MQTT bridge nothing can reach a unit: a command is refused (503 mqtt_unavailable), not stored."""
    from bsscihub.family import installed_families
    from tests.test_web_support import build_harness, fast_hashing

    fast_hashing(monkeypatch)
    h = await build_harness(tmp_path, families=("gate",))  # the parts of a hub, no bridge among them
    service = h.hub.services["gate"] = installed_families()["gate"].make_service(h.hub)
    service.startService()
    try:
        await service.when_ready()
        assert h.hub.mqtt is None
        reply = await h.request("POST", f"{GATES}/provisioning-keys", role="admin", json_body={"name": "installer"})
        assert reply.code == 201, reply.body
        reply = await h.request("POST", f"{GATES}/register", headers={"X-Provisioning-Key": reply.json()["key"]},
                                json_body={"hardware_id": "hw-1", "controller_id": "gate-1",
                                           "firmware_version": "1.0.0"})
        assert reply.code in (200, 201), reply.body
        reply = await h.request("POST", f"{GATES}/gate-1/commands", role="admin", json_body={"command": "open"})
        assert (reply.code, reply.error["code"]) == (503, "mqtt_unavailable")
        listed = await h.request("GET", f"{GATES}/gate-1/commands", role="admin")
        assert listed.json()["total"] == 0
    finally:
        await service.stopService()
        h.web.stop()
        await h.hub.store.stop()
