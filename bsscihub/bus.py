"""The hub's event bus: families publish normalized events, sinks (outbox, stream, metrics) consume them.

Sinks run synchronously in publish order; a sink may return a Deferred to say when it has the event durably.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger


@attrs.frozen
class Event:
    """One normalized event, exactly as the MQTT contract publishes it.

    `topic` is relative to `mqtt.prefix` (e.g. "mioty/ep/0011223344556677/up");
    `payload` is the JSON-ready mapping published there.
    """

    family: str
    kind: str
    topic: str
    payload: Mapping[str, Any]
    retain: bool = False


class PlainJSON(dict):  # type: ignore[type-arg]
    """An event payload its producer guarantees to be plain JSON: str keys; str, int (64-bit),
    finite float, bool, None, list and dict values only (e.g. the mioty uplink, whose numbers
    are checked at the edge).

    A marker, nothing more: a sink may encode such a payload with a fast encoder that does not
    check for NaN (orjson writes NaN as null, where the standard encoder refuses it).
    """

    __slots__ = ()


Sink = Callable[[Event], "defer.Deferred[Any] | None"]


class EventBus:
    log = Logger()

    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self.published = 0

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Add a sink; returns the function that removes it."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink) if sink in self._sinks else None

    def publish(self, event: Event) -> defer.Deferred[None]:
        """Hand the event to every sink; the result fires once every sink has it."""
        self.published += 1
        pending: list[defer.Deferred[Any]] = []
        for sink in list(self._sinks):
            try:
                result = sink(event)
            except Exception:
                self.log.failure("event sink {sink!r} failed on {topic}", sink=sink, topic=event.topic)
                continue
            if isinstance(result, defer.Deferred):
                pending.append(result)
        if not pending:
            return defer.succeed(None)
        if len(pending) == 1:
            return pending[0].addCallback(lambda _: None)
        return defer.gatherResults(pending, consumeErrors=True).addCallback(lambda _: None)
