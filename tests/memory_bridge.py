"""An in-memory stand-in for the MQTT bridge's families API (subscribe, publish, topic), so family
behaviour is tested without a broker: `deliver` hands a device message to the matching handlers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from paho.mqtt.client import topic_matches_sub
from twisted.internet import defer


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
