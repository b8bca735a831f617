"""In-memory stand-ins for family tests: the MQTT bridge's families API (subscribe, publish, topic) and a
reactor whose time is a Clock, so family behaviour is tested without a broker and without sleeping."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paho.mqtt.client import topic_matches_sub
from twisted.internet import defer

from bsscihub.family import installed_families
from bsscihub.hub import Hub, make_hub
from tests.conftest import make_config
from tests.contract import ContractWitness


class MemoryBridge:
    """What FamilyService and the families use of bsscihub.mqtt.bridge.MQTTBridge, kept in memory."""

    connected = True

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.handlers: dict[str, list[Any]] = {}
        self.published: list[tuple[str, Any, bool]] = []

    def topic(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    def subscribe(self, topic_filter: str, handler: Any) -> defer.Deferred[Any]:
        self.handlers.setdefault(topic_filter, []).append(handler)
        return defer.succeed(0)

    def unsubscribe(self, topic_filter: str, handler: Any) -> None:
        if handler in self.handlers.get(topic_filter, []):
            self.handlers[topic_filter].remove(handler)

    def publish(self, topic: str, payload: Any, retain: bool = False, *, acked: bool = False) -> defer.Deferred[None]:
        self.published.append((topic, payload, retain))
        return defer.succeed(None)

    def deliver(self, topic: str, payload: bytes | str | Mapping[str, Any] | list[Any]) -> int:
        """A device's message, as the broker would hand it over; returns how many handlers took it."""
        if isinstance(payload, str):
            data = payload.encode()
        elif isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
        matched = [h for f, hs in self.handlers.items() if topic_matches_sub(f, topic) for h in hs]
        for handler in matched:
            handler(topic, data, None)
        return len(matched)


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
                         **sections: Any) -> tuple[Hub, MemoryBridge, ContractWitness]:
    """One family's service on a migrated SQLite store, fed by a MemoryBridge, its events checked
    against its EventSpecs as they are published; time from `clock` when given."""
    from twisted.internet import reactor

    families = installed_families()
    config = make_config(tmp_path, families=[family], **sections)
    hub = make_hub(config, reactor if clock is None else ClockedReactor(reactor, clock), {family: families[family]})
    bridge = MemoryBridge(config.mqtt.prefix)
    hub.mqtt = bridge  # type: ignore[assignment]
    witness = ContractWitness(hub.bus, family, families[family].events)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    service = families[family].make_service(hub)
    hub.services[family] = service
    service.startService()
    await service.when_subscribed()
    return hub, bridge, witness


async def stop_family(hub: Hub) -> None:
    for service in hub.services.values():
        await service.stopService()
    await hub.store.stop()


async def until(condition: Any, what: str) -> None:
    """Wait (on the real reactor: store writes finish on their thread) until `condition()`."""
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + 15
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)
