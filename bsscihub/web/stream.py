"""The live event stream: bus events fanned out over WebSocket (autobahn) to subscribed, authenticated clients.

Each event is encoded and framed once for all clients; a client that cannot keep up is disconnected.
Two flavours: /api/v1/stream (channels `family/kind`) and /ws, the channels of the dashboards of earlier
platforms (devices, gateways, sensor_data, ota, logs) with their {"type", "data"} messages.
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
from bsscihub.contract import rfc3339
from bsscihub.web.errors import ApiError
from bsscihub.web.events import channel_of, event_json, redact
from bsscihub.web.logring import ACCESS
from bsscihub.web.routing import Call, api_route

_CHANNEL = re.compile(r"^(\*|[a-z0-9_-]{1,32}(/[a-z0-9_*-]{1,32})?)$")
MAX_SUBSCRIPTIONS = 32

WS_CHANNELS = ("devices", "gateways", "sensor_data", "ota", "logs")
"""The /ws channels; `logs` (the hub's log lines, scrubbed) is for admins only, like GET /api/v1/logs."""
_WS_VERBS = ("subscribe", "unsubscribe")


def ws_channel(event: Event) -> str:
    """The /ws channel of a bus event: readings, firmware updates, gateways (BLE gateways and mioty base
    stations), or else the devices channel (registrations, states, statuses, commands of every family)."""
    kind = event.kind
    if kind in ("up", "uplink"):
        return "sensor_data"
    if kind == "ota":
        return "ota"
    if (event.family == "ble" and kind.startswith("gateway_")) or (event.family == "mioty" and kind in (
            "state", "status")):
        return "gateways"
    return "devices"


def _ws_request(message: Any) -> tuple[str, list[Any]] | None:
    """(verb, channels) of a /ws control message in any of the shapes dashboards send:
    {"subscribe": [..]}, {"type"|"action": "subscribe", "channel": ".."} or {.., "channels": [..]}."""
    if not isinstance(message, dict):
        return None
    for verb in _WS_VERBS:
        if verb in message:
            value = message[verb]
            return verb, value if isinstance(value, list) else [value]
    named = message.get("type", message.get("action"))
    if named not in _WS_VERBS:
        return None
    if "channels" in message:
        value = message["channels"]
        return named, value if isinstance(value, list) else [value]
    return named, [message.get("channel")]


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
        self.flavor = "stream"  # or "ws"

    # -- autobahn callbacks

    def onOpen(self) -> None:
        # The HTTP channel that parsed the upgrade request is still the transport's producer.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        self._open = True
        self.factory.hub.add(self)
        hello = {"user": self.principal.name, "role": self.principal.role}
        if self.flavor == "ws":
            self.send_json({"type": "hello", "data": {**hello, "channels": list(self.allowed_ws_channels())}})
        else:
            self.send_json({"hello": hello})

    def allowed_ws_channels(self) -> tuple[str, ...]:
        admin = getattr(self.principal, "role", None) == "admin"
        return tuple(c for c in WS_CHANNELS if c != "logs" or admin)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.sendClose(1000, "text frames only")
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.send_json({"error": {"code": "bad_json", "message": "messages are JSON objects"}})
            return
        if self.flavor == "ws":
            self._ws_message(message)
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

    def _ws_message(self, message: Any) -> None:
        def error(code: str, text: str) -> None:
            self.send_json({"type": "error", "error": {"code": code, "message": text}})

        if isinstance(message, dict) and message.get("type", message.get("action")) == "ping":
            self.send_json({"type": "pong"})
            return
        request = _ws_request(message)
        if request is None:
            error("invalid", 'expected {"type": "subscribe", "channels": [...]} (or "channel", or "unsubscribe")')
            return
        verb, channels = request
        allowed = self.allowed_ws_channels()
        if channels == ["*"]:
            channels = list(allowed)
        unknown = [c for c in channels if c not in WS_CHANNELS]
        if unknown:
            error("invalid_channel", f"unknown channel {str(unknown[0])[:40]!r}; channels: {', '.join(WS_CHANNELS)}")
            return
        forbidden = [c for c in channels if c not in allowed]
        if forbidden and verb == "subscribe":
            error("forbidden", f"the {forbidden[0]} channel needs the admin role")
            return
        wanted = self.subscriptions | set(channels) if verb == "subscribe" else self.subscriptions - set(channels)
        self.factory.hub.resubscribe(self, wanted)
        self.send_json({"type": "subscribed", "channels": sorted(self.subscriptions)})

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
        self.next_flavor = "stream"
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
        protocol.flavor, self.next_flavor = self.next_flavor, "stream"
        return protocol


class _AuthorizedStream(WebSocketResource):
    """Hands one already authorized request over to the WebSocket protocol."""

    def __init__(self, factory: StreamFactory, principal: Any, flavor: str = "stream") -> None:
        super().__init__(factory)
        self._principal = principal
        self._flavor = flavor

    def render(self, request: Any) -> Any:
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)  # the HTTP idle timer must not outlive the upgrade
        self._factory.next_principal = self._principal  # buildProtocol (inside render) takes it
        self._factory.next_flavor = self._flavor
        try:
            return super().render(request)
        finally:
            self._factory.next_principal = None
            self._factory.next_flavor = "stream"


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
        self._ws_index: dict[str, set[StreamProtocol]] = {}  # /ws clients by /ws channel
        self._in_log = False
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

    def resource_for(self, principal: Any, flavor: str = "stream") -> _AuthorizedStream:
        return _AuthorizedStream(self.factory, principal, flavor)

    def add(self, client: StreamProtocol) -> None:
        self.clients.add(client)

    def remove(self, client: StreamProtocol) -> None:
        self.clients.discard(client)
        self.resubscribe(client, set())

    def resubscribe(self, client: StreamProtocol, wanted: set[str]) -> None:
        index = self._ws_index if client.flavor == "ws" else self._index
        for key in client.subscriptions - wanted:
            members = index.get(key)
            if members is not None:
                members.discard(client)
                if not members:
                    del index[key]
        for key in wanted - client.subscriptions:
            index.setdefault(key, set()).add(client)
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
        if self._ws_index:
            members = self._ws_index.get(ws_channel(event))
            if members:
                self._deliver_ws(members, ws_channel(event), {**redact(event.payload), "topic": event.topic})
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

    def _deliver_ws(self, members: set[StreamProtocol], channel: str, data: dict[str, Any]) -> None:
        message = {"type": channel, "data": data, "time": rfc3339(self.clock.seconds())}
        prepared = self.factory.prepareMessage(json.dumps(message, separators=(",", ":"), default=str).encode())
        for client in list(members):
            client.deliver(prepared)
        self.delivered += len(members)

    def log_line(self, line: dict[str, Any]) -> None:
        """A LogRing listener: the hub's (scrubbed) log lines to /ws `logs` subscribers (admins)."""
        members = self._ws_index.get("logs")
        if not members or self._in_log or line.get("namespace") == ACCESS:
            return
        self._in_log = True  # delivering may log (a slow client dropped): that line is not streamed
        try:
            self._deliver_ws(members, "logs", {**line, "time": rfc3339(line["time"])})
        finally:
            self._in_log = False


class WSRoute:
    """`/ws`: the live stream as the dashboards of earlier platforms open it (mounted outside /api/v1)."""

    def __init__(self, web: Any) -> None:
        self.web = web

    @api_route("GET", "/ws", role="viewer", summary="Live stream with the channels devices, gateways, sensor_data,"
               " ota, logs (WebSocket)", tag="stream", ticket_auth=True, errors=(426, 503),
               description='Send {"type": "subscribe", "channels": ["sensor_data", ...]} (also "channel": "..", '
                           'or {"subscribe": [...]}); receive {"type": channel, "data": payload with its "topic", '
                           '"time"}. logs is for admins. Authenticated like /api/v1/stream.')
    def ws(self, call: Call) -> Any:
        return upgrade(self.web, call, "ws")


def upgrade(web: Any, call: Call, flavor: str) -> Any:
    """The checks before a stream's WebSocket upgrade; the resource that performs it."""
    request = call.request
    if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
        raise ApiError(426, "upgrade_required", "this is a WebSocket endpoint", headers={"Upgrade": "websocket"})
    if call.principal.via == "session" and not web.same_origin(request):
        raise ApiError(403, "forbidden", "cross-origin WebSocket with a session cookie")
    if web.stream.full():
        raise ApiError(503, "unavailable", "too many stream clients")
    return web.stream.resource_for(call.principal, flavor)
