"""Per-unit broker accounts in a real Mosquitto with the dynamic-security plugin (gate.broker_provisioning: dynsec).

A provisioned unit reaches exactly its own topics; renames move them; re-registration and deletion lock it out.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import pytest_twisted
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from twisted.internet import threads

from tests.broker import DYNSEC_PLUGIN, MOSQUITTO_CTRL, Mosquitto
from tests.test_families import eventually
from tests.test_gate import APP_A, APP_B, GATES, error, new_key, register, start_gate_hub

pytestmark = pytest.mark.skipif(DYNSEC_PLUGIN is None or MOSQUITTO_CTRL is None,
                                reason="needs mosquitto's dynamic-security plugin and mosquitto_ctrl")

ADMIN = ("dynsec-admin", "dynsec-admin-password")
HUB = ("hub", "hub-password")


class Probe:
    """One MQTT connection as a unit would make it (paho on its own thread); blocking calls, run in a thread."""

    def __init__(self, broker: Mosquitto, username: str, password: str, client_id: str) -> None:
        self.broker = broker
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(username, password)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.connack: Any = None
        self.disconnected = threading.Event()
        self._events: dict[str, threading.Event] = {"connack": threading.Event()}
        self._answers: dict[int, Any] = {}
        self._lock = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnected.set()
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._answer(mid, codes)
        self.client.on_publish = lambda c, u, mid, reason, p: self._answer(mid, reason)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = reason
        self._events["connack"].set()

    def _answer(self, mid: int, value: Any) -> None:
        with self._lock:
            self._answers[mid] = value
            self._lock.notify_all()

    def _wait(self, mid: int) -> Any:
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._answers, 5), "no answer from the broker"
            return self._answers.pop(mid)

    def _connect(self) -> bool:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self._events["connack"].wait(5), "no CONNACK"
        return not self.connack.is_failure

    async def connect(self) -> bool:
        """True if the broker accepted the credentials."""
        return await threads.deferToThread(self._connect)  # type: ignore[no-any-return]

    async def subscribe(self, topic: str) -> bool:
        """True if the broker granted the subscription."""
        _, mid = self.client.subscribe(topic, 1)
        codes = await threads.deferToThread(self._wait, mid)
        return not codes[0].is_failure

    async def publish(self, topic: str, doc: dict[str, Any]) -> bool:
        """True if the broker accepted the message (its PUBACK's reason code)."""
        info = self.client.publish(topic, json.dumps(doc), qos=1)
        reason = await threads.deferToThread(self._wait, info.mid)
        return not reason.is_failure

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _hub_account(broker: Mosquitto) -> None:
    # The hub's own broker account: the bridge publishes events and commands and reads unit status.
    broker.ctrl("createClient", HUB[0], "-p", HUB[1])
    broker.ctrl("createRole", "hub")
    for acl in ("publishClientSend", "subscribePattern"):
        broker.ctrl("addRoleACL", "hub", acl, "#", "allow")
    broker.ctrl("addClientRole", HUB[0], "hub")


@pytest_twisted.ensureDeferred
async def test_units_get_exactly_their_topics(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker: Mosquitto = mosquitto_factory(dynsec=ADMIN)
    await threads.deferToThread(_hub_account, broker)
    running = await start_gate_hub(tmp_path, broker, mqtt={"username": HUB[0], "password": HUB[1]},
                                   broker_provisioning="dynsec", dynsec_username=ADMIN[0], dynsec_password=ADMIN[1],
                                   command_timeout="5s")
    probes: list[Probe] = []

    def probe(credentials: dict[str, Any], password: str | None = None) -> Probe:
        p = Probe(broker, credentials["username"], password or credentials["password"], credentials["client_id"])
        probes.append(p)
        return p

    try:
        key = await new_key(running)
        code, one = await register(running, key, "hw-1", "gate-1")
        assert code == 201
        creds = one["mqtt"]
        assert creds["provisioned"] is True and creds["username"] == "gate-hw-1"
        assert creds["password"] == one["unit_key"] and creds["port"] == broker.port
        code, two = await register(running, key, "hw-2", "gate-2")

        # The unit reads its commands and publishes its status; the hub sees it.
        unit = probe(creds)
        assert await unit.connect()
        assert await unit.subscribe("gatetorio/gate-1/commands")
        assert await unit.publish("gatetorio/gate-1/status", {"state": "closed"})
        await eventually(lambda: _unit(running, "gate-1", lambda u: u["online"]), what="gate-1 online")
        code, sent = await running.api("POST", f"{GATES}/gate-1/commands", {"command": "open"})
        await eventually(lambda: any(t == "gatetorio/gate-1/commands" and d["id"] == sent["id"]
                                     for t, d in unit.messages), what="the command at the unit")
        assert await unit.publish("gatetorio/gate-1/status", {"state": "open", "command_id": sent["id"],
                                                               "ok": True})
        code, done = await running.api("GET", f"{GATES}/gate-1/commands/{sent['id']}?wait=5")
        assert done["state"] == "succeeded"

        # ... and nothing else: another unit's topics, wildcards, the hub's own topics.
        assert not await unit.subscribe("gatetorio/gate-2/commands")
        assert not await unit.subscribe("gatetorio/#")
        assert not await unit.subscribe("hubtest/#")
        assert not await unit.publish("gatetorio/gate-2/status", {"state": "forged"})
        assert not await unit.publish("gatetorio/gate-1/commands", {"command": "open"})
        code, other = await running.api("GET", f"{GATES}/gate-2")
        assert other["last_status"] is None
        intruder = probe({**creds, "client_id": "someone-else"})
        assert not await intruder.connect(), "the account is bound to the unit's client id"

        # A rename moves the permissions: the unit is told, disconnected, and now has the new topics only.
        code, _ = await running.api("PATCH", f"{GATES}/gate-1", {"controller_id": "gate-north"})
        assert code == 200
        await eventually(lambda: any(d.get("command") == "renamed" for _, d in unit.messages), what="rename notice")
        [notice] = [d for _, d in unit.messages if d.get("command") == "renamed"]
        assert notice["args"]["topics"]["publish"] == "gatetorio/gate-north/status"
        await threads.deferToThread(unit.disconnected.wait, 5)
        assert unit.disconnected.is_set(), "the broker ends the session when its role changes"
        unit.stop()
        moved = probe(creds)
        assert await moved.connect()
        assert not await moved.subscribe("gatetorio/gate-1/commands")
        assert await moved.subscribe("gatetorio/gate-north/commands")
        assert not await moved.publish("gatetorio/gate-1/status", {"state": "old name"})
        assert await moved.publish("gatetorio/gate-north/status", {"state": "renamed"})
        await eventually(lambda: _unit(running, "gate-north", lambda u: (u["last_status"] or {}).get("state")
                                       == "renamed"), what="status under the new name")
        moved.stop()

        # Re-registration rotates the password: the old one is refused.
        code, again = await register(running, key, "hw-1", "gate-north")
        assert code == 200
        assert not await probe(creds).connect()
        fresh = probe(again["mqtt"])
        assert await fresh.connect()
        fresh.stop()

        # Deletion removes the account.
        code, _ = await running.api("DELETE", f"{GATES}/gate-north")
        assert code == 204
        assert not await probe(again["mqtt"]).connect()
        out = await threads.deferToThread(broker.ctrl, "listClients")
        assert "gate-hw-1" not in out and "gate-hw-2" in out
        assert two["mqtt"]["username"] == "gate-hw-2"
    finally:
        for p in probes:
            p.stop()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_registration_fails_cleanly_without_the_dynsec_plugin(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # A broker without the plugin never answers $CONTROL requests: 503 after the timeout, nothing registered.
    running = await start_gate_hub(tmp_path, mosquitto, broker_provisioning="dynsec", dynsec_username=ADMIN[0],
                                   dynsec_password=ADMIN[1])
    try:
        running.hub.services["gate"].broker.timeout = 0.5
        code, doc = await register(running, await new_key(running), "hw-1", "gate-1")
        assert code == 503 and error(doc)[0] == "broker_unavailable"
        assert "did not answer" in error(doc)[1]
        code, _ = await running.api("GET", f"{GATES}/gate-1")
        assert code == 404
    finally:
        await running.stop()


async def _unit(running: Any, controller_id: str, check: Any) -> bool:
    code, doc = await running.api("GET", f"{GATES}/{controller_id}")
    return code == 200 and bool(check(doc))


@pytest_twisted.ensureDeferred
async def test_apps_publish_commands_directly_to_the_units_they_may_reach(tmp_path: Path,
                                                                         mosquitto_factory: Any) -> None:
    """As in the original design, an app publishes to gatetorio/{controller_id}/commands itself; its broker
    account (password: its token) reaches exactly the units it has access to, and follows grants, revocations
    and renames."""
    broker: Mosquitto = mosquitto_factory(dynsec=ADMIN)
    await threads.deferToThread(_hub_account, broker)
    running = await start_gate_hub(tmp_path, broker, mqtt={"username": HUB[0], "password": HUB[1]},
                                   broker_provisioning="dynsec", dynsec_username=ADMIN[0], dynsec_password=ADMIN[1])
    probes: list[Probe] = []

    def probe(username: str, password: str, client_id: str) -> Probe:
        p = Probe(broker, username, password, client_id)
        probes.append(p)
        return p

    try:
        key = await new_key(running)
        code, one = await register(running, key, "hw-1", "gate-1")
        code, two = await register(running, key, "hw-2", "gate-2")
        unit = probe(one["mqtt"]["username"], one["mqtt"]["password"], one["mqtt"]["client_id"])
        assert await unit.connect() and await unit.subscribe("gatetorio/gate-1/commands")

        # The unit pairs the app (user level) on gate-1 only.
        code, _ = await running.api("POST", f"{GATES}/gate-1/user-tokens", {"user_token": APP_A,
                                                                            "access_level": "user"},
                                    headers={"X-Unit-Key": one["unit_key"]}, token=None)
        assert code == 201
        code, mine = await running.api("GET", f"{GATES}/mine", headers={"X-App-Token": APP_A}, token=None)
        account = mine["mqtt"]
        assert account["topics"] == {"publish": ["gatetorio/gate-1/commands"],
                                     "subscribe": ["gatetorio/gate-1/status"]}
        app = probe(account["username"], APP_A, "phone-1")
        assert await app.connect()
        assert not await probe(account["username"], APP_B, "phone-x").connect(), "its own token only"
        assert await app.publish("gatetorio/gate-1/commands", {"id": "c1", "command": "open", "user_token": APP_A})
        await eventually(lambda: any(d.get("id") == "c1" for _, d in unit.messages), what="the app's command")
        assert not await app.publish("gatetorio/gate-2/commands", {"id": "c2", "command": "open"})
        assert not await app.publish("gatetorio/gate-1/status", {"state": "forged"})
        assert await app.subscribe("gatetorio/gate-1/status") and not await app.subscribe("gatetorio/#")

        # Access to gate-2 as well (the other unit pairs it): both, after a reconnect.
        code, _ = await running.api("POST", f"{GATES}/gate-2/user-tokens", {"user_token": APP_A,
                                                                            "access_level": "user"},
                                    headers={"X-Unit-Key": two["unit_key"]}, token=None)
        assert code == 201
        app.stop()
        app = probe(account["username"], APP_A, "phone-1")
        assert await app.connect()
        assert await app.publish("gatetorio/gate-2/commands", {"id": "c3", "command": "open"})

        # A rename moves it along; a revocation takes gate-1 away; the last one, the account.
        code, _ = await running.api("PATCH", f"{GATES}/gate-2", {"controller_id": "gate-south"})
        assert code == 200
        app.stop()
        app = probe(account["username"], APP_A, "phone-1")
        assert await app.connect()
        assert await app.publish("gatetorio/gate-south/commands", {"id": "c4", "command": "open"})
        assert not await app.publish("gatetorio/gate-2/commands", {"id": "c5", "command": "open"})
        code, _ = await running.api("POST", f"{GATES}/gate-1/user-tokens/revoke", {"user_token": APP_A},
                                    headers={"X-Unit-Key": one["unit_key"]}, token=None)
        assert code in (200, 204)
        app.stop()
        app = probe(account["username"], APP_A, "phone-1")
        assert await app.connect()
        assert not await app.publish("gatetorio/gate-1/commands", {"id": "c6", "command": "open"})
        code, listed = await running.api("GET", f"{GATES}/gate-south/user-tokens")
        [access] = [a for a in listed["items"] if a["state"] == "active"]
        assert (await running.api("DELETE", f"{GATES}/gate-south/user-tokens/{access['id']}"))[0] in (200, 204)
        assert not await probe(account["username"], APP_A, "phone-2").connect(), "no access left: no account"
    finally:
        for p in probes:
            p.stop()
        await running.stop()
