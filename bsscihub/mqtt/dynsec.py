"""Broker accounts made by the hub: Mosquitto's dynamic-security plugin, driven for any family that needs them.

`DynsecClient` drives `$CONTROL/dynamic-security/v1` over its own MQTT connection; `NoProvisioning` does nothing.
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSES = CONTROL + "/response"


class DynsecError(Exception):
    """The broker refused a dynamic-security command, or did not answer in time."""


class NoProvisioning:
    """`broker_provisioning: none`: the operator manages broker accounts and ACLs."""

    enabled = False

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    @property
    def connected(self) -> bool:
        return True

    async def set_account(self, username: str, password: str, acls: list[dict[str, Any]], textname: str, *,
                          bind_client_id: bool = True) -> None:
        pass

    async def set_role(self, username: str, acls: list[dict[str, Any]], textname: str) -> None:
        pass

    async def remove(self, username: str) -> None:
        pass


class DynsecClient:
    """Creates, re-keys, re-scopes and deletes broker accounts (a client and a role of the same name, the
    client bound to that client id) through the dynamic-security plugin.

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

    # -- accounts: one client and one role of the same name

    async def set_account(self, username: str, password: str, acls: list[dict[str, Any]], textname: str, *,
                          bind_client_id: bool = True) -> None:
        """Create the account, replacing any earlier one of the same kind (a new password ends the old session);
        `bind_client_id`: it may connect only with client id = username.

        An existing account of another kind (its textname does not start with `textname`: the hub's own,
        the dynsec admin, another family's) is never replaced: DynsecError.
        """
        [found] = await self.run([{"command": "getClient", "username": username}])
        client = (found.get("data") or {}).get("client") if not found.get("error") else None
        if isinstance(client, dict) and not str(client.get("textname") or "").startswith(textname):
            raise DynsecError(f"a broker account {username!r} exists and is not a {textname}'s; choose another name")
        responses = await self.run([
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": username},
            {"command": "createRole", "rolename": username, "textname": textname, "acls": acls},
            {"command": "createClient", "username": username, "password": password,
             **({"clientid": username} if bind_client_id else {}),
             "textname": textname, "roles": [{"rolename": username, "priority": 0}]},
        ])
        self._check(responses[:2], tolerated=("not found",))
        self._check(responses[2:])
        self.log.info("broker account {username} provisioned ({what})", username=username, what=textname)

    async def set_role(self, username: str, acls: list[dict[str, Any]], textname: str) -> None:
        """New permissions for an account, and its session ended so that it reconnects under them.

        Changing a role does not disconnect its clients; changing the client does (Mosquitto 2.0).
        """
        self._check(await self.run([
            {"command": "modifyRole", "rolename": username, "acls": acls},
            {"command": "modifyClient", "username": username, "textname": textname},
        ]))

    async def remove(self, username: str) -> None:
        responses = await self.run([
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": username},
        ])
        self._check(responses, tolerated=("not found",))


def make_client(core: Any, url: str, username: str, password: str, name: str, reactor: Any) -> DynsecClient:
    """A DynsecClient on `url` (empty: the hub's mqtt.url) as the dynsec admin, with the hub's TLS CA."""
    import uuid

    from bsscihub.mqtt.client import MQTTSettings

    settings = MQTTSettings.from_url(
        url or core.url, username=username or None, password=password or None,
        client_id=f"bsscihub-{name}-dynsec-{uuid.uuid4().hex[:8]}", session_expiry=0, keepalive=core.keepalive,
        ca_file=core.ca or None,
    )
    return DynsecClient(settings, reactor)
