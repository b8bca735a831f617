"""The live event stream: bus events fanned out over WebSocket (autobahn) to subscribed, authenticated clients.

Each event is encoded and framed once for all clients; a client that cannot keep up is disconnected.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from prometheus_client import Counter, Gauge
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from bsscihub.bus import Event, EventBus
from bsscihub.web.events import channel_of, event_json

_CHANNEL = re.compile(r"^(\*|[a-z0-9_-]{1,32}(/[a-z0-9_*-]{1,32})?)$")
MAX_SUBSCRIPTIONS = 32


@implementer(IPushProducer)
class StreamProtocol(WebSocketServerProtocol):
    """One client. Registered as the transport's producer, so it learns when the socket backs up."""

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.principal: Any = None
        self.subscriptions: set[str] = set()
        self._paused = False
        self._backlog: deque[Any] = deque()
        self._backlog_bytes = 0
        self._open = False

    # -- autobahn callbacks

    def onOpen(self) -> None:
        # The HTTP channel that parsed the upgrade request is still the transport's producer.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        self._open = True
        self.factory.hub.add(self)
        self.send_json({"hello": {"user": self.principal.name, "role": self.principal.role}})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.sendClose(1000, "text frames only")
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.send_json({"error": {"code": "bad_json", "message": "messages are JSON objects"}})
            return
        if not isinstance(message, dict) or not ({"subscribe", "unsubscribe"} & set(message)):
            self.send_json({"error": {"code": "invalid", "message": 'expected {"subscribe": [channels]}'}})
            return
        for verb in ("subscribe", "unsubscribe"):
            channels = message.get(verb)
            if channels is None:
                continue
            if not isinstance(channels, list) or not all(isinstance(c, str) and _CHANNEL.match(c) for c in channels):
                message = f'{verb}: expected a list of channels like "mioty/uplink", "mioty" or "*"'
                self.send_json({"error": {"code": "invalid_field", "field": verb, "message": message}})
                return
            wanted = self.subscriptions | set(channels) if verb == "subscribe" else self.subscriptions - set(channels)
            if len(wanted) > MAX_SUBSCRIPTIONS:
                self.send_json({"error": {"code": "invalid", "message": f"at most {MAX_SUBSCRIPTIONS} subscriptions"}})
                return
            self.factory.hub.resubscribe(self, wanted)
        self.send_json({"subscribed": sorted(self.subscriptions)})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._open:
            self._open = False
            self.factory.hub.remove(self)
        self._backlog.clear()

    # -- sending, with a bound on what waits for a slow client

    def send_json(self, message: dict[str, Any]) -> None:
        self.deliver(self.factory.prepareMessage(json.dumps(message, separators=(",", ":")).encode()))

    def deliver(self, prepared: Any) -> None:
        if not self._open:
            return
        if not self._paused and not self._backlog:
            self.sendPreparedMessage(prepared)
            return
        self._backlog.append(prepared)
        self._backlog_bytes += len(prepared.payloadHybi)
        hub = self.factory.hub
        if len(self._backlog) > hub.max_backlog or self._backlog_bytes > hub.max_backlog_bytes:
            hub.dropped_slow(self)
            self._open = False
            self._backlog.clear()
            # Abort: a close handshake would only queue behind the data it cannot send.
            self.dropConnection(abort=True)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._backlog and not self._paused and self._open:
            prepared = self._backlog.popleft()
            self._backlog_bytes -= len(prepared.payloadHybi)
            self.sendPreparedMessage(prepared)

    def stopProducing(self) -> None:
        self._backlog.clear()


class StreamFactory(WebSocketServerFactory):
    protocol = StreamProtocol

    def __init__(self, hub: StreamHub) -> None:
        super().__init__(server=None)
        self.hub = hub
        self.next_principal: Any = None
        # No compression: one framed copy of each event then serves every client.
        self.setProtocolOptions(
            autoPingInterval=30,
            autoPingTimeout=15,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            maxFramePayloadSize=16384,
            maxMessagePayloadSize=16384,
            perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr: Any) -> StreamProtocol:
        protocol = cast(StreamProtocol, super().buildProtocol(addr))
        protocol.principal, self.next_principal = self.next_principal, None
        return protocol


class _AuthorizedStream(WebSocketResource):
    """Hands one already authorized request over to the WebSocket protocol."""

    def __init__(self, factory: StreamFactory, principal: Any) -> None:
        super().__init__(factory)
        self._principal = principal

    def render(self, request: Any) -> Any:
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)  # the HTTP idle timer must not outlive the upgrade
        self._factory.next_principal = self._principal  # buildProtocol (inside render) takes it
        try:
            return super().render(request)
        finally:
            self._factory.next_principal = None


class StreamHub:
    """Fans bus events out to clients by subscription: "*" (all), a family ("mioty") or a channel ("mioty/uplink")."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        metrics: Any,
        *,
        max_clients: int = 5000,
        max_backlog: int = 1000,
        max_backlog_bytes: int = 4 << 20,
    ) -> None:
        self.clock = clock
        self.max_clients, self.max_backlog, self.max_backlog_bytes = max_clients, max_backlog, max_backlog_bytes
        self.factory = StreamFactory(self)
        self.clients: set[StreamProtocol] = set()
        self._index: dict[str, set[StreamProtocol]] = {}
        self._unsubscribe: Any = None
        self.delivered = 0
        self._clients_gauge = Gauge("bsscihub_stream_clients", "Connected live-stream clients", registry=metrics)
        self._clients_gauge.set_function(lambda: len(self.clients))
        self._slow = Counter(
            "bsscihub_stream_slow_disconnects", "Live-stream clients dropped for not keeping up", registry=metrics
        )

    def start(self, bus: EventBus) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = bus.subscribe(self.publish)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client in list(self.clients):
            client.sendClose(1000, "hub stopping")

    def full(self) -> bool:
        return len(self.clients) >= self.max_clients

    def resource_for(self, principal: Any) -> _AuthorizedStream:
        return _AuthorizedStream(self.factory, principal)

    def add(self, client: StreamProtocol) -> None:
        self.clients.add(client)

    def remove(self, client: StreamProtocol) -> None:
        self.clients.discard(client)
        self.resubscribe(client, set())

    def resubscribe(self, client: StreamProtocol, wanted: set[str]) -> None:
        for key in client.subscriptions - wanted:
            members = self._index.get(key)
            if members is not None:
                members.discard(client)
                if not members:
                    del self._index[key]
        for key in wanted - client.subscriptions:
            self._index.setdefault(key, set()).add(client)
        client.subscriptions = set(wanted)

    def dropped_slow(self, client: StreamProtocol) -> None:
        self._slow.inc()
        self.log.warn(
            "dropped live-stream client {user} at {peer}: more than {limit} messages waiting",
            user=client.principal.name if client.principal else "?",
            peer=client.peer,
            limit=self.max_backlog,
        )
        self.remove(client)

    def publish(self, event: Event) -> None:
        """The bus sink: encode and frame once, hand to every client subscribed."""
        if not self._index:
            return
        channel = channel_of(event)
        targets: set[StreamProtocol] = set()
        for key in ("*", event.family, channel, f"{event.family}/*"):
            members = self._index.get(key)
            if members:
                targets |= members
        if not targets:
            return
        data = json.dumps({"event": event_json(event, self.clock.seconds())}, separators=(",", ":"), default=str)
        prepared = self.factory.prepareMessage(data.encode())
        for client in targets:
            client.deliver(prepared)
        self.delivered += len(targets)
