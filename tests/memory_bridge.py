"""In-memory stand-ins for family tests: a broker in memory behind the hub's real MQTT bridge, and a reactor
whose time is a Clock, so family behaviour is tested without a broker process and without sleeping."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from paho.mqtt.client import topic_matches_sub
from twisted.internet import defer
from twisted.internet.task import Clock, LoopingCall

from bsscihub.family import installed_families
from bsscihub.hub import Hub, assemble_hub
from tests.conftest import make_config
from tests.contract import ContractWitness
from tests.helpers import until


class Devices:
    """Devices and gateways publishing to a family's hub through a MemoryBroker, handed over at once."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def deliver(self, topic: str, payload: bytes | str | Mapping[str, Any] | list[Any]) -> int:
        """A device's message, as the broker hands it to the hub's MQTT client (synchronously here, so
        that a test moving a Clock right after sees it handled); returns how many subscriptions took it."""
        if isinstance(payload, str):
            data = payload.encode()
        elif isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
        taken = 0
        for client in self.broker.clients:
            matched = [f for f in client.subscriptions if topic_matches_sub(f, topic)]
            if client.connected and matched:
                taken += len(matched)
                client.on_message(topic, data, None)
        return taken


class ClockedReactor:
    """The real reactor for threads and I/O (the store's thread pool), a Clock for time: family timers
    (dedup windows, silence checks, LoopingCalls) run when the test advances `clock`, not by sleeping."""

    def __init__(self, reactor: Any, clock: Any) -> None:
        self._reactor, self.clock = reactor, clock

    def seconds(self) -> float:
        return float(self.clock.seconds())

    def callLater(self, delay: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, fn, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


async def running_family(tmp_path: Path, family: str, clock: Any = None,
                         **sections: Any) -> tuple[Hub, Devices, ContractWitness]:
    """One family's hub (its service and the real MQTT bridge, on a MemoryBroker) on a migrated SQLite
    store, its events checked against its EventSpecs as they are published; time from `clock` when given."""
    from twisted.internet import reactor

    families = installed_families()
    config = make_config(tmp_path, families=[family], **sections)
    broker = MemoryBroker()
    hub = assemble_hub(config, reactor if clock is None else ClockedReactor(reactor, clock),
                       {family: families[family]}, mqtt_client=broker.client_factory)
    assert hub.mqtt is not None
    witness = ContractWitness(hub.bus, family, families[family].events)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    hub.mqtt.startService()
    await until(lambda: hub.mqtt is not None and hub.mqtt.connected, "the MQTT bridge connected")
    service = hub.services[family]
    service.startService()
    await service.when_subscribed()
    return hub, Devices(broker), witness


async def stop_family(hub: Hub) -> None:
    for service in hub.services.values():
        await service.stopService()
    if hub.mqtt is not None:
        await hub.mqtt.stopService()
    await hub.store.stop()


# -- a whole hub (real MQTTBridge, outbox, commands, web) whose MQTT client talks to a broker in memory


@attrs.frozen
class Message:
    """One message as a witness of the in-memory broker saw it (the fields tests.broker.Received has)."""

    topic: str
    payload: bytes
    retain: bool
    properties: Any = None


class MemoryBroker:
    """A broker in memory: what the hub's client and the devices publish reaches every matching
    subscription (the hub's and the witnesses') at once, in order; no socket, no thread."""

    host, port = "memory", 0

    def __init__(self) -> None:
        self.clients: list[MemoryMQTTClient] = []
        self.witnesses: list[MemoryWitness] = []
        self.listeners: list[tuple[str, Any]] = []
        self._pending: list[tuple[str, bytes, Any]] = []
        self._drain: Any = None

    def client_factory(self, settings: Any, reactor: Any, *, on_connect: Any, on_disconnect: Any,
                       on_message: Any) -> MemoryMQTTClient:
        client = MemoryMQTTClient(self, on_connect, on_disconnect, on_message)
        self.clients.append(client)
        return client

    def route(self, topic: str, payload: bytes, retain: bool, properties: Any = None) -> None:
        """Publish: witnesses see it at once; subscribed clients get it on the next reactor turn, in
        publish order, as over a socket (a handler never runs inside the publisher's call)."""
        from twisted.internet import reactor

        for witness in self.witnesses:
            if any(topic_matches_sub(f, topic) for f in witness.topic_filters):
                witness.messages.append(Message(topic, payload, retain, properties))
        self._pending.append((topic, payload, properties))
        if self._drain is None:
            self._drain = reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._drain = None
        pending, self._pending = self._pending, []
        for topic, payload, properties in pending:
            for client in list(self.clients):
                if client.connected and any(topic_matches_sub(f, topic) for f in client.subscriptions):
                    client.on_message(topic, payload, properties)
            for topic_filter, listener in list(self.listeners):
                if topic_matches_sub(topic_filter, topic):
                    listener(topic, payload)

    def listen(self, topic_filter: str, listener: Any) -> Any:
        """A device's subscription: `listener(topic, payload)` for each message; returns the unsubscribe."""
        entry = (topic_filter, listener)
        self.listeners.append(entry)
        return lambda: self.listeners.remove(entry) if entry in self.listeners else None

    def witness(self, *topic_filters: str) -> MemoryWitness:
        witness = MemoryWitness(list(topic_filters or ("#",)))
        self.witnesses.append(witness)
        return witness

    def device(self) -> MemoryDevice:
        return MemoryDevice(self)


class MemoryMQTTClient:
    """What MQTTBridge uses of bsscihub.mqtt.client.ReactorMQTTClient, connected to a MemoryBroker."""

    state = "connected"
    current_backoff = None
    failures = 0

    def __init__(self, broker: MemoryBroker, on_connect: Any, on_disconnect: Any, on_message: Any) -> None:
        self.broker, self.on_connect, self.on_disconnect, self.on_message = (broker, on_connect, on_disconnect,
                                                                             on_message)
        self.subscriptions: set[str] = set()
        self.connected = False
        self.connects = 0

    def start(self) -> None:
        self.connected = True
        self.connects += 1
        self.on_connect()

    def stop(self) -> defer.Deferred[None]:
        self.connected = False
        return defer.succeed(None)

    def subscribe(self, topic_filter: str, qos: int = 1) -> defer.Deferred[Any]:
        if topic_filter.startswith("$share/"):  # a shared subscription (a cluster's hubs): one client here
            topic_filter = topic_filter.split("/", 2)[2]
        self.subscriptions.add(topic_filter)
        return defer.succeed(qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Any = None) -> defer.Deferred[None]:
        self.broker.route(topic, payload, retain, properties)
        return defer.succeed(None)


class MemoryDevice:
    """A device or gateway publishing to the MemoryBroker (tests.test_families.DeviceClient's API)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def publish(self, topic: str, payload: Any, properties: Any = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.broker.route(topic, data, False, properties)

    def stop(self) -> None:
        pass


class MemoryWitness:
    """Everything published to the MemoryBroker under `topic_filters` (tests.broker.Subscriber's API)."""

    def __init__(self, topic_filters: list[str]) -> None:
        self.topic_filters = topic_filters
        self.messages: list[Message] = []

    def clear(self) -> None:
        self.messages.clear()

    async def when(self, predicate: Any, timeout: float = 15.0, count: int = 1) -> list[Message]:
        """Once `count` messages satisfy `predicate` (the hub's outbox writes finish on their thread)."""
        await until(lambda: len([m for m in self.messages if predicate(m)]) >= count,
                    f"{count} matching messages; last seen {[(m.topic, m.payload[:60]) for m in self.messages[-10:]]}",
                    timeout)
        return [m for m in self.messages if predicate(m)]


class FollowingClock(Clock):
    """A Clock that keeps pace with the real reactor while started (so the hub's own short timers still
    run) and that a test moves ahead at once with `advance`, where it would otherwise sleep."""

    def __init__(self) -> None:
        super().__init__()
        self._loop: LoopingCall | None = None
        self._last = 0.0

    def start(self) -> FollowingClock:
        from twisted.internet import reactor

        self._last = reactor.seconds()
        self.advance(self._last)
        self._loop = LoopingCall(self._follow)
        self._loop.start(0.005, now=False)
        return self

    def seconds(self) -> float:
        if self._loop is None or not self._loop.running:
            return float(self.rightNow)
        from twisted.internet import reactor

        # between two steps too, as the real clock does: two readings a millisecond apart differ in time
        return float(self.rightNow) + max(0.0, reactor.seconds() - self._last)

    def _follow(self) -> None:
        from twisted.internet import reactor

        now = reactor.seconds()
        step, self._last = now - self._last, now
        self.advance(step)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
