"""Per-unit broker credentials: one Mosquitto dynamic-security client and role per gate unit.

`DynsecProvisioner` drives `$CONTROL/dynamic-security/v1` over its own MQTT connection; `NoProvisioning` does nothing.
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSES = CONTROL + "/response"


class DynsecError(Exception):
    """The broker refused a dynamic-security command, or did not answer in time."""


def unit_username(hardware_id: str) -> str:
    # Keyed by the immutable hardware id: a rename changes only the role's topics, never the login.
    return f"gate-{hardware_id}"


@attrs.frozen
class UnitTopics:
    status: str
    commands: str

    @classmethod
    def of(cls, root: str, controller_id: str) -> UnitTopics:
        return cls(f"{root}/{controller_id}/status", f"{root}/{controller_id}/commands")

    def acls(self) -> list[dict[str, Any]]:
        """Exactly this unit's topics: publish its status, subscribe to and receive its commands.

        The receive rule denies everything else explicitly: a subscription kept in a persistent
        session from before a rename must not deliver the old name's commands to this unit.
        """
        return [
            {"acltype": "publishClientSend", "topic": self.status, "priority": 10, "allow": True},
            {"acltype": "subscribeLiteral", "topic": self.commands, "priority": 10, "allow": True},
            {"acltype": "publishClientReceive", "topic": self.commands, "priority": 10, "allow": True},
            {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False},
        ]


class NoProvisioning:
    """`gate.broker_provisioning: none`: the operator manages broker accounts and ACLs."""

    enabled = False

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    @property
    def connected(self) -> bool:
        return True

    async def provision(self, username: str, password: str, topics: UnitTopics) -> None:
        pass

    async def move(self, username: str, topics: UnitTopics) -> None:
        pass

    async def remove(self, username: str) -> None:
        pass


class DynsecProvisioner:
    """Creates, re-keys, moves and deletes unit accounts through the dynamic-security plugin.

    It uses a dedicated MQTT connection, not the hub's bridge: the bridge's outbox would replay a
    control request after a restart (by then stale, and with a password in it on disk), requests need
    their answers matched and bounded by a timeout, and the dynsec admin credentials stay off the
    hub's main broker account. The connection is the hub's reactor-driven paho client.
    """

    log = Logger()
    enabled = True

    def __init__(self, settings: Any, reactor: Any, *, timeout: float = 10.0, client_factory: Any = None) -> None:
        from bsscihub.mqtt.client import ReactorMQTTClient

        self._clock: IReactorTime = reactor
        self.timeout = timeout
        self._pending: dict[str, tuple[defer.Deferred[list[dict[str, Any]]], dict[str, dict[str, Any] | None]]] = {}
        self._connect_waiters: list[defer.Deferred[None]] = []
        self._ids = itertools.count(1)
        self._session = secrets.token_hex(4)
        factory = client_factory or ReactorMQTTClient
        self.client = factory(
            settings, reactor, on_connect=self._connected, on_disconnect=self._disconnected,
            on_message=self._message,
        )

    # -- lifecycle

    def start(self) -> None:
        # Subscribed before connecting: the SUBSCRIBE then precedes any request on every connection.
        self.client.subscribe(RESPONSES, 1)
        self.client.start()

    def stop(self) -> defer.Deferred[None]:
        for d, _ in list(self._pending.values()):
            d.errback(DynsecError("the hub is stopping"))
        self._pending.clear()
        waiters, self._connect_waiters = self._connect_waiters, []
        for w in waiters:
            w.errback(DynsecError("the hub is stopping"))
        return self.client.stop()  # type: ignore[no-any-return]

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    def _connected(self) -> None:
        self.log.info("dynamic-security control connection up")
        waiters, self._connect_waiters = self._connect_waiters, []
        for w in waiters:
            w.callback(None)

    def _disconnected(self, reason: str) -> None:
        self.log.warn("dynamic-security control connection lost: {reason}", reason=reason)

    # -- requests

    async def _when_connected(self) -> None:
        if self.connected:
            return
        d: defer.Deferred[None] = defer.Deferred()
        self._connect_waiters.append(d)
        d.addTimeout(self.timeout, self._clock)
        try:
            await d
        except defer.TimeoutError:
            raise DynsecError(f"no connection to the broker's dynamic-security plugin within {self.timeout:g} s") \
                from None
        finally:
            if d in self._connect_waiters:
                self._connect_waiters.remove(d)

    async def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the commands as one request; their responses, in order (each may carry "error")."""
        await self._when_connected()
        batch = f"{self._session}-{next(self._ids)}"
        tagged = [{**cmd, "correlationData": f"{batch}:{i}"} for i, cmd in enumerate(commands)]
        answers: dict[str, dict[str, Any] | None] = {t["correlationData"]: None for t in tagged}
        d: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()
        self._pending[batch] = (d, answers)
        try:
            try:
                await self.client.publish(CONTROL, json.dumps({"commands": tagged}).encode(), qos=1)
            except Exception as e:
                raise DynsecError(f"the request did not reach the broker: {e}") from None
            d.addTimeout(self.timeout, self._clock)
            return await d
        except defer.TimeoutError:
            raise DynsecError(f"the broker's dynamic-security plugin did not answer within {self.timeout:g} s") \
                from None
        finally:
            self._pending.pop(batch, None)

    def _message(self, topic: str, payload: bytes, properties: Any) -> None:
        if topic != RESPONSES:
            return
        try:
            responses = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            self.log.warn("unreadable dynamic-security response ignored")
            return
        for response in responses if isinstance(responses, list) else ():
            tag = response.get("correlationData") if isinstance(response, dict) else None
            if not isinstance(tag, str):
                continue
            entry = self._pending.get(tag.rpartition(":")[0])
            if entry is None or tag not in entry[1]:
                continue  # another admin's request, or one we gave up on
            d, answers = entry
            answers[tag] = response
            if all(a is not None for a in answers.values()) and not d.called:
                d.callback([a for a in answers.values() if a is not None])

    @staticmethod
    def _check(responses: list[dict[str, Any]], tolerated: tuple[str, ...] = ()) -> None:
        for response in responses:
            error = response.get("error")
            if error and not any(t in str(error) for t in tolerated):
                raise DynsecError(f"{response.get('command')}: {error}")

    # -- what the gate family needs

    async def provision(self, username: str, password: str, topics: UnitTopics) -> None:
        """Create the unit's client and role, replacing any earlier ones (a rotation kicks the old session)."""
        responses = await self.run([
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": username},
            {"command": "createRole", "rolename": username, "textname": "gate unit", "acls": topics.acls()},
            {"command": "createClient", "username": username, "password": password, "clientid": username,
             "textname": "gate unit", "roles": [{"rolename": username, "priority": 0}]},
        ])
        self._check(responses[:2], tolerated=("not found",))
        self._check(responses[2:])
        self.log.info("broker account {username} provisioned for {topic}", username=username, topic=topics.status)

    async def move(self, username: str, topics: UnitTopics) -> None:
        """Point the unit's role at new topics (a rename) and end its session, so it reconnects to them.

        Changing a role does not disconnect its clients; changing the client does (Mosquitto 2.0).
        """
        self._check(await self.run([
            {"command": "modifyRole", "rolename": username, "acls": topics.acls()},
            {"command": "modifyClient", "username": username, "textname": f"gate unit {topics.status}"},
        ]))

    async def remove(self, username: str) -> None:
        responses = await self.run([
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": username},
        ])
        self._check(responses, tolerated=("not found",))
