"""The web listener over real local sockets: HTTPS, and the live stream's auth, channels and slow clients.

The hub's bus is fed directly; WebSocket clients are autobahn's own client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger

from bsscihub import pki
from bsscihub.bus import Event
from bsscihub.hub import make_hub
from bsscihub.web.service import make_site, make_web_service
from tests.conftest import make_config
from tests.test_web_support import Harness, harness_fixture


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


@pytest.fixture
def port(harness: Harness) -> Iterator[int]:
    harness.web.start()
    listening = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        make_site(harness.web)))
    yield listening.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(listening.stopListening))


class Client(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.closed: defer.Deferred[tuple[bool, int | None]] = defer.Deferred()
        self.opened: defer.Deferred[None] = defer.Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason or "handshake refused"))
        if not self.closed.called:
            self.closed.callback((wasClean, code))

    def send_json(self, value: Any) -> None:
        self.sendMessage(json.dumps(value).encode())


async def connect(port: int, *, query: str = "", headers: dict[str, str] | None = None,
                  path: str = "/api/v1/stream") -> Client:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}{query}", headers=headers or {})
    factory.protocol = Client
    made: defer.Deferred[Client] = defer.Deferred()
    factory.buildProtocol = _capture(factory.buildProtocol, made)  # type: ignore[method-assign]
    connectWS(factory)
    client = await made
    await client.opened
    return client


def _capture(build: Any, made: defer.Deferred[Any]) -> Any:
    def wrapper(addr: Any) -> Any:
        protocol = build(addr)
        made.callback(protocol)
        return protocol

    return wrapper


async def next_message(client: Client, timeout: float = 15.0) -> Any:
    return await client.messages.get().addTimeout(timeout, reactor)


async def subscribe(client: Client, channels: list[str]) -> Any:
    client.send_json({"subscribe": channels})
    return await next_message(client)


def uplink(eui: str = "0011223344556677", n: int = 1) -> Event:
    return Event("mioty", "up", f"mioty/ep/{eui}/up", {"epEui": eui, "packetCnt": n})


@pytest_twisted.ensureDeferred
async def test_subscribed_channels_only(harness: Harness, port: int) -> None:
    client = await connect(port, headers={"Authorization": f"Bearer {harness.tokens['viewer']}"})
    hello = await next_message(client)
    assert hello == {"hello": {"user": "viewer", "role": "viewer"}}
    assert await subscribe(client, ["mioty/up"]) == {"subscribed": ["mioty/up"]}
    harness.hub.bus.publish(Event("ble", "adv", "ble/gw/1/adv", {"rssi": -50}))
    harness.hub.bus.publish(uplink(n=1))
    message = await next_message(client)
    assert message["event"]["channel"] == "mioty/up" and message["event"]["payload"]["packetCnt"] == 1
    assert await subscribe(client, ["ble"]) == {"subscribed": ["ble", "mioty/up"]}
    harness.hub.bus.publish(Event("ble", "adv", "ble/gw/1/adv", {"rssi": -50}))
    assert (await next_message(client))["event"]["topic"] == "ble/gw/1/adv"
    client.send_json({"subscribe": ["not a channel!"]})
    assert (await next_message(client))["error"]["field"] == "subscribe"
    client.sendClose()
    await client.closed
    assert harness.web.stream.clients == set()


@pytest_twisted.ensureDeferred
async def test_ws_channels_of_earlier_dashboards(harness: Harness, port: int) -> None:
    """/ws: the channels devices, gateways, sensor_data, ota, logs; {"type": channel, "data"} messages."""
    with pytest.raises(ConnectionError):
        await connect(port, path="/ws")  # anonymous: 401 before the upgrade
    client = await connect(port, path="/ws", headers={"Authorization": f"Bearer {harness.tokens['viewer']}"})
    hello = await next_message(client)
    assert hello["type"] == "hello" and hello["data"]["channels"] == ["devices", "gateways", "sensor_data", "ota"]
    client.send_json({"type": "subscribe", "channel": "sensor_data"})
    assert await next_message(client) == {"type": "subscribed", "channels": ["sensor_data"]}
    client.send_json({"action": "subscribe", "channels": ["gateways", "ota"]})
    assert (await next_message(client))["channels"] == ["gateways", "ota", "sensor_data"]
    client.send_json({"type": "subscribe", "channel": "logs"})
    assert (await next_message(client))["error"]["code"] == "forbidden"
    client.send_json({"type": "subscribe", "channel": "weather"})
    assert (await next_message(client))["error"]["code"] == "invalid_channel"
    client.send_json({"type": "ping"})
    assert await next_message(client) == {"type": "pong"}
    harness.hub.bus.publish(Event("devices", "registered", "dev/device/d1/event/registered", {"deviceId": "d1"}))
    harness.hub.bus.publish(Event("devices", "up", "dev/device/d1/up", {"deviceId": "d1", "value": 1.5}))
    message = await next_message(client)
    assert message["type"] == "sensor_data" and message["data"] == {"deviceId": "d1", "value": 1.5,
                                                                   "topic": "dev/device/d1/up"}
    assert message["time"].endswith("Z")
    harness.hub.bus.publish(Event("ble", "gateway_state", "ble/gw/G/state", {"gatewayId": "G", "state": "online"}))
    harness.hub.bus.publish(Event("devices", "ota", "dev/device/d1/event/ota", {"state": "done"}))
    assert [(await next_message(client))["type"] for _ in range(2)] == ["gateways", "ota"]
    client.send_json({"unsubscribe": ["sensor_data"]})
    assert (await next_message(client))["channels"] == ["gateways", "ota"]
    client.sendClose()
    await client.closed

    # Admins get the hub's log lines (scrubbed), access lines excepted.
    admin = await connect(port, path="/ws", headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
    await next_message(admin)
    admin.send_json({"type": "subscribe", "channels": ["logs", "devices"]})
    assert (await next_message(admin))["channels"] == ["devices", "logs"]
    Logger(namespace="test.fleets").warn("gateway {name} token=abc123 misbehaves", name="GW9")
    line = await next_message(admin)
    assert line["type"] == "logs" and line["data"]["level"] == "warn"
    assert "GW9" in line["data"]["text"] and "abc123" not in line["data"]["text"]
    admin.sendClose()
    await admin.closed


@pytest_twisted.ensureDeferred
async def test_stream_authentication(harness: Harness, port: int) -> None:
    with pytest.raises(ConnectionError):
        await connect(port)  # anonymous: 401 before the upgrade
    ticket = (await harness.request("POST", "/api/v1/auth/ticket", role="operator")).json()["ticket"]
    client = await connect(port, query=f"?ticket={ticket}")
    assert (await next_message(client))["hello"]["user"] == "operator"
    client.sendClose()
    with pytest.raises(ConnectionError):
        await connect(port, query=f"?ticket={ticket}")  # single use

    cookies, _ = await harness.login("viewer")
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    with pytest.raises(ConnectionError):
        await connect(port, headers={"Cookie": cookie, "Origin": "http://evil.example"})
    client = await connect(port, headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"})
    assert (await next_message(client))["hello"]["user"] == "viewer"
    client.sendClose()
    await client.closed


@pytest_twisted.ensureDeferred
async def test_a_slow_client_is_dropped_not_buffered(harness: Harness, port: int) -> None:
    stream = harness.web.stream
    stream.max_backlog, stream.max_backlog_bytes = 50, 1 << 20
    token = {"Authorization": f"Bearer {harness.tokens['viewer']}"}
    slow, fast = await connect(port, headers=token), await connect(port, headers=token)
    for client in (slow, fast):
        await next_message(client)
        await subscribe(client, ["*"])
    slow.transport.pauseProducing()  # stops reading: the hub's socket buffer fills up
    received = 0
    big = "ab" * 8000
    # Three 16 kB events per reactor turn: less than a reader takes in one turn (64 kB), so the
    # reading client keeps up, while the paused one's kernel buffers fill and then the hub's.
    for batch in range(3000):
        for n in range(3):
            harness.hub.bus.publish(Event("mioty", "up", "mioty/ep/x/up", {"n": batch * 3 + n, "data": big}))
        await task.deferLater(reactor, 0, lambda: None)
        while fast.messages.pending:
            fast.messages.pending.pop(0)
            received += 1
        if len(stream.clients) == 1:
            break
    assert len(stream.clients) == 1, "the slow client was never dropped"
    assert slow not in stream.clients
    slow.transport.resumeProducing()  # reading again, it finds the connection gone
    wasClean, _ = await slow.closed.addTimeout(5, reactor)
    assert not wasClean
    # The fast client keeps everything and keeps going.
    harness.hub.bus.publish(uplink(n=999_999))
    while True:
        message = await next_message(fast)
        received += 1
        if message["event"]["payload"].get("packetCnt") == 999_999:
            break
    assert received == (batch + 1) * 3 + 1
    metrics = (await harness.request("GET", "/api/v1/metrics", role="viewer")).body
    assert b"bsscihub_stream_slow_disconnects_total 1.0" in metrics
    fast.sendClose()


@pytest_twisted.ensureDeferred
async def test_https_listener(tmp_path: Path) -> None:
    import http.client
    import ssl

    from tests.broker import free_port

    certs, port = tmp_path / "certs", free_port()
    config = make_config(tmp_path, families=[], web={"listen": f"tcp:{port}:interface=127.0.0.1", "https": True},
                         tls={"ca": str(certs / "ca.pem"), "ca_key": str(certs / "ca.key"),
                              "cert": str(certs / "hub.pem"), "key": str(certs / "hub.key")})
    pki.create_ca(config.tls.ca, config.tls.ca_key)
    pki.issue_server_cert(config.tls.ca, config.tls.ca_key, config.tls.cert, config.tls.key)
    hub = make_hub(config, reactor, {})
    config.data_dir.mkdir(parents=True)
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    hub.health.started = True
    service = make_web_service(hub)
    service.startService()
    await service.when_listening()

    def get(path: str) -> tuple[int, dict[str, str]]:
        context = ssl.create_default_context(cafile=config.tls.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}

    try:
        status, headers = await threads.deferToThread(get, "/health")
        assert status == 200 and headers["strict-transport-security"].startswith("max-age=")
        status, headers = await threads.deferToThread(get, "/login")
        assert "secure" in headers["set-cookie"].lower()
    finally:
        await defer.maybeDeferred(service.stopService)
        await hub.store.stop()
