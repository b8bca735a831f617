"""Tests for the reactor-driven MQTT client: its state machine in memory, with a fake
socket and a MemoryReactorClock, then against real mosquitto brokers (tests.broker)."""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure

from bsscihub.mqtt.client import (
    ConnectionLost,
    MQTTSettings,
    NotConnected,
    PublishRefused,
    QueueFull,
    ReactorMQTTClient,
    Will,
)
from tests.broker import BrokerTLS, Mosquitto, Subscriber
from tests.helpers import until

reactor: Any = _reactor


def messages(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def retries(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "attempt" in e and "delay" in e]


# ---------------------------------------------------------------------------
# In memory: MemoryReactorClock, a fake socket, MQTT packets by hand.
# ---------------------------------------------------------------------------

CONNACK_V5 = b"\x20\x03\x00\x00\x00"
CONNACK_V311 = b"\x20\x02\x00\x00"
BAD_PASSWORD_V5 = b"\x20\x03\x00\x86\x00"
BAD_PASSWORD_V311 = b"\x20\x02\x00\x04"
EOF = b""


def connack_v5_receive_maximum(n: int) -> bytes:
    # properties: Receive Maximum (0x21), two bytes
    return b"\x20\x06\x00\x00\x03\x21" + n.to_bytes(2, "big")


def puback(mid: int, reason: int = 0) -> bytes:
    if reason:
        return b"\x40\x03" + mid.to_bytes(2, "big") + bytes([reason])
    return b"\x40\x02" + mid.to_bytes(2, "big")


def suback_v5(mid: int, granted: int = 1) -> bytes:
    return b"\x90\x04" + mid.to_bytes(2, "big") + b"\x00" + bytes([granted])


def publish_v5(topic: str, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    return b"\x30" + bytes([len(body)]) + body


@attrs.frozen
class Packet:
    kind: int  # the high nibble of the first byte: 1 CONNECT, 3 PUBLISH, 8 SUBSCRIBE, 14 DISCONNECT
    flags: int
    body: bytes

    @property
    def mid(self) -> int:
        """Packet id of a QoS 1 PUBLISH or of a SUBSCRIBE."""
        offset = 2 + int.from_bytes(self.body[:2], "big") if self.kind == 3 else 0
        return int.from_bytes(self.body[offset : offset + 2], "big")


def parse(data: bytes) -> list[Packet]:
    packets, i = [], 0
    while i < len(data):
        first, i = data[i], i + 1
        length, shift = 0, 0
        while True:
            byte, i = data[i], i + 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        packets.append(Packet(first >> 4, first & 0x0F, data[i : i + length]))
        i += length
    return packets


class FakeSocket:
    """What paho needs of a socket; the test plays the broker through feed()/sent."""

    _next_fd = 100

    def __init__(self) -> None:
        FakeSocket._next_fd += 1
        self._fd = FakeSocket._next_fd
        self.inbound = bytearray()
        self.sent = bytearray()
        self.closed = False
        self.eof = False
        self.blocked = False
        self.sends = 0
        self.recvs = 0

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def setblocking(self, flag: bool) -> None:
        pass

    def send(self, data: bytes) -> int:
        if self.closed:
            raise OSError("closed")
        if self.blocked:
            raise BlockingIOError()
        self.sends += 1
        self.sent += data
        return len(data)

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        if self.inbound:
            chunk = bytes(self.inbound[:n])
            del self.inbound[:n]
            return chunk
        if self.eof:
            return b""
        raise BlockingIOError()

    def close(self) -> None:
        self.closed = True

    def packets(self) -> list[Packet]:
        return parse(bytes(self.sent))

    def kinds(self) -> list[int]:
        return [p.kind for p in self.packets()]


def backoff(h: Harness) -> float:
    assert h.client.current_backoff is not None, "not waiting"
    return h.client.current_backoff


class Harness:
    """A client on a MemoryReactorClock whose sockets the test hands out."""

    def __init__(self, protocol: int = 5, random: float = 0.5, **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.random_values: list[float] = []
        self.default_random = random
        self.openings: list[Deferred[Any]] = []
        self.events: list[Any] = []
        self.client = ReactorMQTTClient(
            MQTTSettings(client_id="unit", protocol=protocol, **settings),
            self.reactor,
            on_connect=lambda: self.events.append("connect"),
            on_disconnect=lambda reason: self.events.append(("disconnect", reason)),
            on_message=lambda topic, payload, props: self.events.append(("message", topic, payload, props)),
            random=self._random,
            open_socket=self._open,
        )
        self.connack = CONNACK_V5 if protocol == 5 else CONNACK_V311

    def _random(self) -> float:
        return self.random_values.pop(0) if self.random_values else self.default_random

    def _open(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.openings.append(d)
        return d

    def give_socket(self) -> FakeSocket:
        sock = FakeSocket()
        self.openings[-1].callback(sock)
        return sock

    def refuse(self) -> None:
        self.openings[-1].errback(ConnectionRefusedError(111, "Connection refused"))

    @property
    def descriptor(self) -> Any:
        (descriptor,) = self.reactor.readers
        return descriptor

    def flush(self) -> None:
        """Let the reactor write whatever paho asked to write."""
        for writer in list(self.reactor.writers):
            writer.doWrite()

    def receive(self, sock: FakeSocket, data: bytes) -> None:
        if data:
            sock.inbound += data
        else:
            sock.eof = True
        self.descriptor.doRead()

    def connect(self) -> FakeSocket:
        if self.client.state == "stopped":
            self.client.start()
        sock = self.give_socket()
        self.flush()
        self.receive(sock, self.connack)
        assert self.client.state == "connected"
        return sock

    def fails(self, d: Deferred[Any]) -> Failure:
        results: list[Any] = []
        d.addBoth(results.append)
        assert len(results) == 1 and isinstance(results[0], Failure), results
        failure: Failure = results[0]
        return failure

    def succeeds(self, d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        assert len(results) == 1 and not isinstance(results[0], Failure), results
        return results[0]


def test_settings_from_url() -> None:
    s = MQTTSettings.from_url("mqtt://hub:p%40ss@broker.example:1884", client_id="x")
    assert (s.host, s.port, s.tls, s.username, s.password) == (
        "broker.example",
        1884,
        False,
        "hub",
        "p@ss",
    )
    s = MQTTSettings.from_url("mqtts://broker.example", username="other")
    assert (s.port, s.tls, s.username, s.password) == (8883, True, "other", None)
    assert MQTTSettings.from_url("mqtt://[::1]").host == "::1"
    with pytest.raises(ValueError, match="scheme"):
        MQTTSettings.from_url("http://broker.example")
    with pytest.raises(ValueError, match="protocol"):
        MQTTSettings(protocol=3)


def test_reader_and_writer_follow_paho_socket() -> None:
    h = Harness()
    h.client.start()
    assert h.client.state == "connecting"
    assert not h.reactor.readers and not h.reactor.writers

    sock = h.give_socket()
    assert h.descriptor.fileno() == sock.fileno()
    assert h.reactor.writers == {h.descriptor}, "CONNECT waits to be written"
    h.flush()
    assert h.reactor.writers == set()
    assert sock.kinds() == [1]

    h.receive(sock, CONNACK_V5)
    assert h.client.state == "connected" and h.client.connected
    assert h.events == ["connect"] and h.client.connects == 1
    assert h.reactor.readers == {h.descriptor}

    h.client.publish("t", b"x")
    assert h.reactor.writers == {h.descriptor}
    h.flush()
    assert h.reactor.writers == set()

    h.receive(sock, EOF)
    assert h.reactor.readers == set() and h.reactor.writers == set()
    assert sock.closed
    assert h.client.state == "waiting" and not h.client.connected


def test_keepalive_loop_runs_only_with_a_socket() -> None:
    h = Harness()
    h.client.start()
    assert [c.getTime() for c in h.reactor.getDelayedCalls()] == [5.0], "only the connect timeout"
    sock = h.connect()
    assert [c.getTime() for c in h.reactor.getDelayedCalls()] == [1.0], "loop_misc every second"
    h.reactor.advance(1)
    assert [c.getTime() for c in h.reactor.getDelayedCalls()] == [2.0]
    h.receive(sock, EOF)
    (retry,) = h.reactor.getDelayedCalls()
    assert retry.getTime() == h.reactor.seconds() + backoff(h)


@pytest.mark.parametrize(("protocol", "refusal"), [(5, BAD_PASSWORD_V5), (4, BAD_PASSWORD_V311)])
def test_refused_connack_is_logged_and_retried(protocol: int, refusal: bytes, logged: list[LogEvent]) -> None:
    h = Harness(protocol=protocol, username="hub", password="wrong")
    h.client.start()
    sock = h.give_socket()
    h.flush()
    h.receive(sock, refusal)

    assert h.client.state == "waiting" and h.client.failures == 1
    assert h.events == [], "neither on_connect nor on_disconnect"
    assert sock.closed and not h.reactor.readers
    (retry,) = retries(logged)
    assert formatEvent(retry).startswith("MQTT broker refused the connection: Bad user name or password; retry 1 in ")
    assert not [e for e in logged if "log_failure" in e]

    h.reactor.advance(backoff(h))
    assert h.client.state == "connecting" and len(h.openings) == 2


def test_backoff_grows_exponentially_with_full_jitter_and_resets(
    logged: list[LogEvent],
) -> None:
    h = Harness(backoff_min=0.5, backoff_max=8.0, random=1.0)
    h.client.start()
    delays = []
    for _ in range(7):
        h.refuse()
        delays.append(backoff(h))
        (timer,) = h.reactor.getDelayedCalls()
        assert timer.getTime() == h.reactor.seconds() + delays[-1]
        h.reactor.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [(e["attempt"], e["delay"]) for e in retries(logged)] == list(zip(range(1, 8), delays, strict=True))
    assert all("Connection refused" in e["reason"] for e in retries(logged))

    # the jitter is the injected random, scaled to the current ceiling
    h.random_values = [0.25]
    h.refuse()
    assert h.client.current_backoff == 0.25 * 8.0
    h.reactor.advance(2.0)

    # a CONNACK resets it: the next loss starts again from backoff_min
    sock = h.connect()
    assert h.client.current_backoff is None and h.client.failures == 8
    h.random_values = [0.5]
    h.receive(sock, EOF)
    assert h.client.current_backoff == 0.25
    assert h.events == ["connect", ("disconnect", "connection closed")]


def test_no_connack_within_connect_timeout(logged: list[LogEvent]) -> None:
    h = Harness(connect_timeout=3.0)
    h.client.start()
    sock = h.give_socket()
    h.flush()
    h.reactor.advance(3.0)
    assert sock.closed and not h.reactor.readers and not h.reactor.writers
    assert h.client.state == "waiting" and h.client.failures == 1
    assert "no CONNACK from the MQTT broker within 3 s" in retries(logged)[0]["reason"]


def test_socket_that_opens_too_late_is_closed(logged: list[LogEvent]) -> None:
    h = Harness(connect_timeout=3.0)
    h.client.start()
    late = h.openings[0]
    h.reactor.advance(3.0)
    assert h.client.state == "waiting"
    assert "took longer than 3 s" in retries(logged)[0]["reason"]

    sock = FakeSocket()
    late.callback(sock)
    assert sock.closed and not h.reactor.readers


def test_publish_acks_and_connection_loss() -> None:
    h = Harness()
    sock = h.connect()
    first = h.client.publish("a", b"1")
    second = h.client.publish("b", b"2", qos=1, retain=True)
    fire_and_forget = h.client.publish("c", b"3", qos=0)
    h.flush()
    published = [p for p in sock.packets() if p.kind == 3]
    assert [p.flags for p in published] == [0b0010, 0b0011, 0b0000]
    assert h.succeeds(fire_and_forget) is None, "QoS 0 completes once written"
    assert not first.called

    h.receive(sock, puback(published[0].mid))
    assert h.succeeds(first) is None
    assert (h.client.published, h.client.acked) == (3, 2)

    h.receive(sock, EOF)
    assert h.fails(second).check(ConnectionLost)
    assert h.events[-1] == ("disconnect", "connection closed")
    with pytest.raises(NotConnected):
        h.client.publish("a", b"too late")
    with pytest.raises(ValueError, match="QoS"):
        h.client.publish("a", b"exactly once?", qos=2)

    # after the reconnect paho must not resend "b" behind the caller's back
    h.reactor.advance(backoff(h))
    sock = h.connect()
    h.flush()
    assert sock.kinds() == [1]


def test_packets_are_sent_and_read_in_batches() -> None:
    h = Harness()
    sock = h.connect()
    sends = sock.sends
    ds = [h.client.publish(f"t/{i}", b"x") for i in range(5)]
    h.flush()
    sent = [p for p in sock.packets() if p.kind == 3]
    assert len(sent) == 5 and sock.sends == sends + 1, "five PUBLISHes in one send()"

    sock.inbound += b"".join(puback(p.mid) for p in sent)
    recvs = sock.recvs
    h.descriptor.doRead()
    assert all(d.called for d in ds), "every PUBACK of one read is handled in that read"
    assert sock.recvs - recvs <= 2, "paho's byte-sized reads are served from one recv()"


def test_a_full_socket_keeps_the_batch_until_it_drains() -> None:
    h = Harness()
    sock = h.connect()
    sock.blocked = True
    h.client.publish("t/1", b"x")
    h.client.publish("t/2", b"y")
    h.flush()
    assert [p for p in sock.packets() if p.kind == 3] == []
    assert h.reactor.writers, "still waiting to write"
    sock.blocked = False
    h.flush()
    assert [p.body[2:5] for p in sock.packets() if p.kind == 3] == [b"t/1", b"t/2"]
    assert not h.reactor.writers


def test_publish_refused_by_broker() -> None:
    h = Harness()
    sock = h.connect()
    d = h.client.publish("forbidden", b"x")
    h.flush()
    (packet,) = [p for p in sock.packets() if p.kind == 3]
    h.receive(sock, puback(packet.mid, reason=0x87))
    failure = h.fails(d)
    assert failure.check(PublishRefused) and str(failure.value) == "Not authorized"


def test_inflight_window_and_queue() -> None:
    h = Harness(max_inflight=2, max_queued=2)
    sock = h.connect()
    ds = [h.client.publish(f"t/{i}", b"x") for i in range(4)]
    with pytest.raises(QueueFull):
        h.client.publish("t/overflow", b"x")
    h.flush()
    sent = [p for p in sock.packets() if p.kind == 3]
    assert len(sent) == 2, "only max_inflight on the wire"

    h.receive(sock, puback(sent[0].mid))
    h.flush()
    sent = [p for p in sock.packets() if p.kind == 3]
    assert len(sent) == 3 and ds[0].called and not ds[2].called

    h.receive(sock, EOF)
    assert all(h.fails(d).check(ConnectionLost) for d in ds[1:])


def test_broker_receive_maximum_lowers_the_window() -> None:
    h = Harness(max_inflight=100)
    h.client.start()
    sock = h.give_socket()
    h.flush()
    h.receive(sock, connack_v5_receive_maximum(1))
    h.client.publish("a", b"1")
    h.client.publish("b", b"2")
    h.flush()
    assert [p.kind for p in sock.packets()] == [1, 3]


def test_subscriptions_are_renewed_on_every_connect() -> None:
    h = Harness()
    granted = h.client.subscribe("cmd/#")
    sock = h.connect()
    h.flush()
    (subscribe,) = [p for p in sock.packets() if p.kind == 8]
    h.receive(sock, suback_v5(subscribe.mid))
    reason = h.succeeds(granted)
    assert isinstance(reason, ReasonCode) and reason.value == 1

    h.receive(sock, publish_v5("cmd/x", b"go"))
    assert h.events[-1][:3] == ("message", "cmd/x", b"go")
    assert isinstance(h.events[-1][3], Properties)

    h.receive(sock, EOF)
    h.reactor.advance(backoff(h))
    sock = h.connect()
    h.flush()
    assert sock.kinds() == [1, 8]


def test_failing_callback_is_logged_not_raised(logged: list[LogEvent]) -> None:
    h = Harness()
    sock = h.connect()

    def boom(topic: str, payload: bytes, props: Properties | None) -> None:
        raise RuntimeError("caller bug")

    h.client._on_message = boom
    h.receive(sock, publish_v5("a", b"x"))
    assert h.client.connected
    (failure,) = [e["log_failure"] for e in logged if "log_failure" in e]
    assert failure.value.args == ("caller bug",)


def test_reactor_dropping_the_descriptor_counts_as_loss() -> None:
    h = Harness()
    sock = h.connect()
    d = h.client.publish("a", b"x")
    h.descriptor.connectionLost(Failure(ConnectionDone()))
    assert sock.closed and h.client.state == "waiting"
    assert h.fails(d).check(ConnectionLost)


def test_stop_when_connected_disconnects_cleanly() -> None:
    h = Harness()
    sock = h.connect()
    pending = h.client.publish("a", b"x")
    stopped = h.client.stop()
    assert not stopped.called and h.client.state == "stopping"
    h.flush()
    assert sock.kinds()[-1] == 14, "DISCONNECT, so the broker drops the will"
    assert sock.closed and h.succeeds(stopped) is None
    assert h.client.state == "stopped"
    assert h.fails(pending).check(ConnectionLost)
    assert h.events[-1] == ("disconnect", "client stopped")
    assert not h.reactor.readers and not h.reactor.writers
    assert h.reactor.getDelayedCalls() == []


def test_stop_gives_up_on_a_broker_that_does_not_read() -> None:
    h = Harness(connect_timeout=2.0)
    sock = h.connect()
    sock.blocked = True
    stopped = h.client.stop()
    h.flush()
    assert not stopped.called
    h.reactor.advance(2.0)
    assert h.succeeds(stopped) is None and sock.closed
    assert not h.reactor.readers and not h.reactor.writers
    assert h.reactor.getDelayedCalls() == []


@pytest.mark.parametrize("where", ["waiting", "opening", "awaiting-connack", "stopped"])
def test_stop_cancels_everything(where: str) -> None:
    h = Harness()
    sock = None
    if where != "stopped":
        h.client.start()
    if where == "waiting":
        h.refuse()
    elif where == "awaiting-connack":
        sock = h.give_socket()
    stopped = h.client.stop()
    if where == "opening":
        assert not stopped.called, "waits for the connect thread"
        sock = h.give_socket()
    h.flush()
    assert h.succeeds(stopped) is None
    assert h.client.state == "stopped" and h.client.current_backoff is None
    assert sock is None or sock.closed
    assert not h.reactor.readers and not h.reactor.writers
    assert h.reactor.getDelayedCalls() == []
    assert h.events == []

    # and it can start again
    h.connect()


# ---------------------------------------------------------------------------
# Against real mosquitto brokers, on the real reactor.
# ---------------------------------------------------------------------------


class Recorder:
    """The client's callbacks, recorded; `until` polls without blocking the reactor."""

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects: list[str] = []
        self.received: list[tuple[str, bytes, Properties | None]] = []

    def on_connect(self) -> None:
        self.connects += 1

    def on_disconnect(self, reason: str) -> None:
        self.disconnects.append(reason)

    def on_message(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        self.received.append((topic, payload, properties))

    def client(self, settings: MQTTSettings) -> ReactorMQTTClient:
        return ReactorMQTTClient(
            settings,
            reactor,
            on_connect=self.on_connect,
            on_disconnect=self.on_disconnect,
            on_message=self.on_message,
        )


def settings_for(broker: Mosquitto, **kw: Any) -> MQTTSettings:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": f"hub-under-test-{broker.port}",
        "backoff_min": 0.05,
        "backoff_max": 0.4,
    }
    values.update(kw)
    return MQTTSettings(**values)


@pytest.mark.parametrize("protocol", [5, 4])
@pytest_twisted.ensureDeferred
async def test_publish_subscribe_roundtrip(
    protocol: int,
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    witness = subscriber_factory(mosquitto, "bsscihub/#")
    recorder = Recorder()
    client = recorder.client(settings_for(mosquitto, protocol=protocol))
    client.start()
    try:
        await until(lambda: client.connected)
        granted = await client.subscribe("bsscihub/echo")
        assert not granted.is_failure

        await client.publish("bsscihub/echo", b"hello", qos=1)
        assert (client.published, client.acked, client.connects) == (1, 1, 1)
        await client.publish("bsscihub/hub/status", b'{"state":"online"}', retain=True)
        await client.publish("bsscihub/qos0", b"fast", qos=0)

        seen = await witness.when(lambda m: m.topic.startswith("bsscihub/"), count=3)
        assert [(m.topic, m.payload, m.retain) for m in seen] == [
            ("bsscihub/echo", b"hello", False),
            ("bsscihub/hub/status", b'{"state":"online"}', True),
            ("bsscihub/qos0", b"fast", False),
        ]
        await until(lambda: len(recorder.received) == 1)
        topic, payload, properties = recorder.received[0]
        assert (topic, payload) == ("bsscihub/echo", b"hello")
        assert (properties is None) == (protocol == 4)
    finally:
        await client.stop()
    assert client.state == "stopped"
    assert recorder.disconnects == ["client stopped"]


@pytest_twisted.ensureDeferred
async def test_many_messages_in_flight(mosquitto: Mosquitto) -> None:
    client = Recorder().client(settings_for(mosquitto, protocol=4))
    client.start()
    try:
        await until(lambda: client.connected)
        await gatherResults([client.publish(f"bulk/{i % 7}", b"x" * 64) for i in range(5000)])
        assert client.acked == 5000
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_broker_outage_fails_pending_and_reconnects(
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    logged: list[LogEvent],
) -> None:
    recorder = Recorder()
    client = recorder.client(settings_for(mosquitto))
    client.start()
    try:
        await until(lambda: client.connected)
        pending = [client.publish("lost/x", b"%d" % i) for i in range(10)]
        # stopped within this reactor turn: nothing was written, so nothing can be acked
        mosquitto.stop()
        results: list[Any] = []
        for d in pending:
            d.addBoth(results.append)
        await until(lambda: len(results) == len(pending))
        assert all(isinstance(r, Failure) and r.check(ConnectionLost) for r in results)
        await until(lambda: bool(recorder.disconnects))
        assert client.state in ("waiting", "connecting")
        await until(lambda: client.failures >= 2)

        await deferToThread(mosquitto.start)
        await until(lambda: recorder.connects == 2)
        witness = subscriber_factory(mosquitto, "lost/#", "found/#")
        await client.publish("found/x", b"after")
        seen = await witness.when(lambda m: m.topic == "found/x")
        assert seen[0].payload == b"after"
        await deferLater(reactor, 0.2, lambda: None)
        assert [m.topic for m in witness.messages] == ["found/x"], "nothing was resent"
    finally:
        await client.stop()
    attempts = [e["attempt"] for e in retries(logged)]
    assert attempts[:3] == [1, 2, 3] and client.current_backoff is None
    assert retries(logged)[0]["reason"].startswith("MQTT connection lost: ")


@pytest.mark.parametrize("protocol", [5, 4])
@pytest_twisted.ensureDeferred
async def test_wrong_password_is_logged_and_retried(
    protocol: int,
    mosquitto_factory: Callable[..., Mosquitto],
    logged: list[LogEvent],
) -> None:
    broker = mosquitto_factory(users={"hub": "right"})
    client = Recorder().client(settings_for(broker, protocol=protocol, username="hub", password="wrong"))
    client.start()
    try:
        await until(lambda: client.failures >= 2)
    finally:
        await client.stop()
    assert client.connects == 0
    lines = [formatEvent(e) for e in retries(logged)]
    # mosquitto 2.0 answers a bad password with "Not authorized" (MQTT 5 code 0x87 /
    # MQTT 3.1.1 code 5); other brokers say "Bad user name or password"
    assert re.match(
        r"MQTT broker refused the connection: (Not authorized|Bad user name or password);"
        r" retry 1 in ",
        lines[0],
    ), lines[0]
    assert not [e for e in logged if "log_failure" in e], "no traceback"

    good = Recorder().client(settings_for(broker, protocol=protocol, username="hub", password="right"))
    good.start()
    try:
        await until(lambda: good.connected)
    finally:
        await good.stop()


@pytest_twisted.ensureDeferred
async def test_clean_stop_sends_no_will_but_a_lost_connection_does(
    mosquitto: Mosquitto, subscriber_factory: Callable[..., Subscriber]
) -> None:
    witness = subscriber_factory(mosquitto, "hub/status")
    will = Will("hub/status", b'{"state":"offline"}', qos=1, retain=True)
    client = Recorder().client(settings_for(mosquitto, will=will, client_id="will-test"))
    client.start()
    await until(lambda: client.connected)
    await client.stop()
    await deferLater(reactor, 0.2, lambda: None)
    assert witness.messages == []

    client.start()
    await until(lambda: client.connected)
    # cut the TCP connection under paho: the broker sees no DISCONNECT
    assert client._descriptor is not None
    sock = client._descriptor.sock.raw
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    seen = await witness.when(lambda m: m.topic == "hub/status")
    assert seen[0].payload == b'{"state":"offline"}' and seen[0].retain
    await client.stop()


# -- TLS -----------------------------------------------------------------------


@attrs.frozen
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a broker certificate for 127.0.0.1 and localhost, plus an
    unrelated CA to verify with when the test wants verification to fail."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("bsscihub test CA")
    _, other_ca = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mosquitto"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Pki(
        ca=directory / "ca.pem",
        cert=directory / "broker.pem",
        key=directory / "broker.key",
        other_ca=directory / "other-ca.pem",
    )
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.other_ca.write_bytes(other_ca.public_bytes(pem))
    paths.cert.write_bytes(cert.public_bytes(pem))
    paths.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_tls_with_the_right_ca(host: str, pki: Pki, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(tls=BrokerTLS(ca=pki.ca, cert=pki.cert, key=pki.key))
    assert broker.tls_port is not None
    client = Recorder().client(settings_for(broker, host=host, port=broker.tls_port, tls=True, ca_file=str(pki.ca)))
    client.start()
    try:
        await until(lambda: client.connected)
        await client.subscribe("tls/#")
        await client.publish("tls/x", b"secret")
        assert client.acked == 1
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_tls_with_a_wrong_ca_is_logged_and_retried(
    pki: Pki, mosquitto_factory: Callable[..., Mosquitto], logged: list[LogEvent]
) -> None:
    broker = mosquitto_factory(tls=BrokerTLS(ca=pki.ca, cert=pki.cert, key=pki.key))
    assert broker.tls_port is not None
    client = Recorder().client(settings_for(broker, port=broker.tls_port, tls=True, ca_file=str(pki.other_ca)))
    client.start()
    try:
        await until(lambda: client.failures >= 2)
    finally:
        await client.stop()
    assert client.connects == 0
    reasons = [e["reason"] for e in retries(logged)]
    assert reasons[0].startswith("TLS: the MQTT broker's certificate was rejected: ")
    # OpenSSL's verify message; which one depends on whether the broker sends its CA
    assert re.search(
        r"self-signed certificate in certificate chain|unable to get local issuer",
        reasons[0],
    )
    assert not [e for e in logged if "log_failure" in e], "no traceback"
