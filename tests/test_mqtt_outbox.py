"""The durable MQTT outbox: commit before acknowledge, order, resend, restart, paging and overflow.

Most tests drive it with a fake wire; the last ones go through the bridge to a real mosquitto.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent

from bsscihub.bus import Event
from bsscihub.hub import make_hub
from bsscihub.mqtt.bridge import MQTTBridge
from bsscihub.mqtt.client import ConnectionLost, PublishRefused
from bsscihub.mqtt.outbox import Outbox, OutboxDropped, OutboxFull
from tests.broker import Mosquitto, Subscriber
from tests.conftest import make_config
from tests.helpers import until


class Wire:
    """Stands in for the MQTT client: records what is sent, acks or fails it on demand."""

    def __init__(self, auto_ack: bool = False) -> None:
        self.sent: list[tuple[str, bytes, bool, bytes | None]] = []
        self.pending: list[Deferred[None]] = []
        self.auto_ack = auto_ack
        self.refuse: set[bytes] = set()

    def publish(self, topic: str, payload: bytes, retain: bool, correlation: bytes | None) -> Deferred[None]:
        self.sent.append((topic, payload, retain, correlation))
        d: Deferred[None] = Deferred()
        if payload in self.refuse:
            reactor.callLater(0, d.errback, PublishRefused("Not authorized"))
        elif self.auto_ack:
            reactor.callLater(0, d.callback, None)
        else:
            self.pending.append(d)
        return d

    def ack(self, count: int | None = None) -> None:
        count = len(self.pending) if count is None else count
        acked, self.pending = self.pending[:count], self.pending[count:]
        for d in acked:
            d.callback(None)

    def lose(self) -> None:
        lost, self.pending = self.pending, []
        for d in lost:
            d.errback(ConnectionLost("connection closed"))

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p, _, _ in self.sent]


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [b"m%05d" % i for i in range(start, start + count)]


@pytest.fixture
def outboxes(tmp_path: Path) -> Any:
    """make(**options) -> an open Outbox on tmp_path/outbox.sqlite; all closed at teardown."""
    made: list[Outbox] = []

    async def make(**options: Any) -> Outbox:
        options.setdefault("max_messages", 100_000)
        box = Outbox(tmp_path / "outbox.sqlite", reactor, **options)
        made.append(box)
        await box.open()
        return box

    yield make
    for box in made:
        pytest_twisted.blockon(box.close())


def rows_on_disk(path: Path) -> list[bytes]:
    with sqlite3.connect(path) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT payload FROM outbox ORDER BY id")]


@pytest_twisted.ensureDeferred
async def test_append_fires_once_committed_in_one_group_commit(outboxes: Any, tmp_path: Path) -> None:
    box = await outboxes()
    appended = [box.append("t/x", p, retain=(i == 0)) for i, p in enumerate(numbered(500))]
    assert not any(d.called for d in appended), "nothing is acknowledged before the commit"
    for d in appended:
        await d
    # every acknowledged message is on disk, in order, from another connection
    assert rows_on_disk(tmp_path / "outbox.sqlite") == numbered(500)
    assert box.commits <= 3, "appends in one reactor turn share a commit"
    assert box.depth == 500


@pytest_twisted.ensureDeferred
async def test_in_order_within_the_window_deleted_only_on_ack(outboxes: Any, tmp_path: Path) -> None:
    box = await outboxes(window=10, delete_delay=0.001)
    for p in numbered(25):
        box.append("t/x", p)
    wire = Wire()
    box.resume(wire.publish)
    await until(lambda: len(wire.sent) == 10)
    assert wire.payloads == numbered(10), "the window holds ten"

    wire.ack(4)
    assert wire.payloads == numbered(14), "each ack frees a slot"
    assert (box.depth, box.acked, box.inflight) == (21, 4, 10)
    await until(lambda: len(rows_on_disk(tmp_path / "outbox.sqlite")) == 21)

    # the connection drops: what was in flight goes out again, first, in order
    wire.lose()
    box.pause()
    wire.sent.clear()
    box.resume(wire.publish)
    assert wire.payloads == numbered(10, start=4)
    assert box.resent == 10
    wire.ack()
    assert len(wire.sent) == 20
    wire.ack()
    assert len(wire.sent) == 21
    wire.ack()
    assert wire.payloads == numbered(21, start=4)
    assert box.depth == 0
    await until(lambda: rows_on_disk(tmp_path / "outbox.sqlite") == [])


@pytest_twisted.ensureDeferred
async def test_a_restart_resends_what_was_not_acknowledged(outboxes: Any, tmp_path: Path) -> None:
    box = await outboxes(window=5, delete_delay=0.001)
    for p in numbered(12):
        await box.append("t/x", p, correlation=b"c" if p == b"m00011" else None)
    wire = Wire()
    box.resume(wire.publish)
    wire.ack(3)
    await box.close()  # a stop with five in flight and four never sent

    again = await outboxes()
    assert again.depth == 9
    wire2 = Wire(auto_ack=True)
    again.resume(wire2.publish)
    await until(lambda: again.depth == 0)
    assert wire2.payloads == numbered(9, start=3)
    assert wire2.sent[-1][3] == b"c", "correlation data survives the restart"


@pytest_twisted.ensureDeferred
async def test_a_long_outage_waits_on_disk_and_drains_in_order(outboxes: Any) -> None:
    box = await outboxes(window=7, memory_max=50, page=20)
    for p in numbered(300):
        box.append("t/x", p)
    await box.append("t/x", b"last before resume")
    assert len(box._queue) <= 50, "memory holds at most memory_max"

    wire = Wire(auto_ack=True)
    queue_sizes: list[int] = []
    original = wire.publish

    def publish(*args: Any) -> Deferred[None]:
        queue_sizes.append(len(box._queue))
        return original(*args)

    box.resume(publish)
    # appends while draining must queue up behind what waits on disk
    for p in numbered(30, start=1000):
        box.append("t/x", p)
    await until(lambda: box.depth == 0)
    assert wire.payloads == numbered(300) + [b"last before resume"] + numbered(30, start=1000)
    assert max(queue_sizes) <= 50


@pytest.mark.parametrize("memory_max", [100_000, 10], ids=["in memory", "mostly on disk"])
@pytest_twisted.ensureDeferred
async def test_drop_oldest_keeps_the_newest_and_logs_once(
    memory_max: int, outboxes: Any, logged: list[LogEvent]
) -> None:
    box = await outboxes(max_messages=30, memory_max=memory_max, page=5)
    appended = [box.append("t/x", p) for p in numbered(45)]
    for d in appended:
        await d  # drop_oldest accepts every new message
    assert (box.depth, box.dropped) == (30, 15)
    warnings = [e for e in logged if "outbox full" in e.get("log_format", "")]
    assert len(warnings) == 1, "rate-limited: one line for a burst of drops"

    wire = Wire(auto_ack=True)
    box.resume(wire.publish)
    await until(lambda: box.depth == 0)
    assert wire.payloads == numbered(30, start=15)


@pytest_twisted.ensureDeferred
async def test_drop_oldest_reaches_messages_on_disk(outboxes: Any) -> None:
    box = await outboxes(max_messages=20, memory_max=4, page=2)
    for p in numbered(20):
        await box.append("t/x", p)  # most of them spill to disk
    for p in numbered(10, start=100):
        box.append("t/x", p)
    wire = Wire(auto_ack=True)
    box.resume(wire.publish)
    await until(lambda: box.depth == 0)
    assert wire.payloads == numbered(10, start=10) + numbered(10, start=100)
    assert box.dropped == 10


@pytest_twisted.ensureDeferred
async def test_drop_new_refuses_new_messages(outboxes: Any) -> None:
    box = await outboxes(max_messages=10, overflow="drop_new")
    appended = [box.append("t/x", p) for p in numbered(15)]
    refused = []
    for d in appended:
        try:
            await d
        except OutboxFull:
            refused.append(d)
    assert len(refused) == 5 and box.dropped == 5 and box.depth == 10
    wire = Wire(auto_ack=True)
    box.resume(wire.publish)
    await until(lambda: box.depth == 0)
    assert wire.payloads == numbered(10)
    # room again
    await box.append("t/x", b"after")


@pytest_twisted.ensureDeferred
async def test_lowering_outbox_max_trims_on_open(outboxes: Any) -> None:
    box = await outboxes()
    for p in numbered(10):
        await box.append("t/x", p)
    await box.close()
    again = await outboxes(max_messages=4)
    assert (again.depth, again.dropped) == (4, 6)
    wire = Wire(auto_ack=True)
    again.resume(wire.publish)
    await until(lambda: again.depth == 0)
    assert wire.payloads == numbered(4, start=6)


@pytest_twisted.ensureDeferred
async def test_a_refused_message_is_dropped_not_retried(outboxes: Any, logged: list[LogEvent]) -> None:
    box = await outboxes()
    for p in numbered(5):
        box.append("t/x", p)
    acked = box.append("t/x", b"m00002-again", acked=True)
    wire = Wire(auto_ack=True)
    wire.refuse = {b"m00002", b"m00002-again"}
    box.resume(wire.publish)
    await until(lambda: box.depth == 0)
    assert wire.payloads == numbered(5) + [b"m00002-again"], "sent once each, no retry"
    assert box.refused == 2 and box.acked == 4
    with pytest.raises(OutboxDropped):
        await acked
    assert any("refused" in e.get("log_format", "") for e in logged)


@pytest_twisted.ensureDeferred
async def test_acked_waits_for_the_broker(outboxes: Any) -> None:
    box = await outboxes()
    d = box.append("t/x", b"x", acked=True)
    wire = Wire()
    box.resume(wire.publish)
    await until(lambda: len(wire.sent) == 1)
    assert not d.called
    wire.ack()
    await d


@pytest_twisted.ensureDeferred
async def test_topics_that_cannot_be_published_are_refused_at_once(outboxes: Any) -> None:
    box = await outboxes()
    for topic in ["", "a/+/b", "a/#", "a\0b", "x" * 70000, "\udc80"]:
        with pytest.raises(ValueError):
            await box.append(topic, b"x")
    assert box.depth == 0


class SteppedClock:
    """reactor's timers, but seconds() under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        return reactor.callLater(delay, f, *a, **kw)


@pytest_twisted.ensureDeferred
async def test_oldest_pending_age(outboxes: Any) -> None:
    clock = SteppedClock()
    box = await outboxes(clock=clock)
    assert box.oldest_age() is None
    await box.append("t/x", b"first")
    clock.now += 5
    await box.append("t/x", b"second")
    clock.now += 2
    assert box.oldest_age() == 7.0
    wire = Wire()
    box.resume(wire.publish)
    await until(lambda: len(wire.sent) == 2)
    assert box.oldest_age() == 7.0, "in flight still counts"
    wire.ack(1)
    assert box.oldest_age() == 2.0
    wire.ack()
    assert box.oldest_age() is None


# ---------------------------------------------------------------------------
# Through the bridge, to a real broker.
# ---------------------------------------------------------------------------


def uplink(n: int) -> Event:
    return Event("mioty", "uplink", "mioty/ep/0011223344556677/up", {"packetCnt": n, "data": "00"})


async def bridge_with(tmp_path: Path, broker: Mosquitto, **mqtt: Any) -> MQTTBridge:
    config = make_config(
        tmp_path,
        families=[],
        mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "client_id": f"outbox-{broker.port}", **mqtt},
    )
    hub = make_hub(config, reactor, {})
    bridge = MQTTBridge(hub, settings_overrides={"backoff_min": 0.05, "backoff_max": 0.2, "connect_timeout": 2.0})
    bridge.startService()
    return bridge


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_new"])
@pytest_twisted.ensureDeferred
async def test_overflow_policy_against_the_broker(
    policy: str,
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    broker = mosquitto_factory()
    broker.stop()
    bridge = await bridge_with(tmp_path, broker, outbox_max=50, outbox_overflow=policy)
    try:
        results = [bridge.hub.bus.publish(uplink(n)) for n in range(80)]
        outcomes = []
        for d in results:
            try:
                await d
                outcomes.append(True)
            except OutboxFull:
                outcomes.append(False)
        expected = list(range(30, 80)) if policy == "drop_oldest" else list(range(50))
        assert outcomes == ([True] * 80 if policy == "drop_oldest" else [True] * 50 + [False] * 30)

        broker.start()
        witness = subscriber_factory(broker, "bsscihub/mioty/#")
        seen = await witness.when(lambda m: True, timeout=10, count=50)
        assert [int(m.payload.split(b":")[1].split(b",")[0]) for m in seen] == expected
        await until(lambda: bridge.outbox.depth == 0)
        assert bridge.outbox.dropped == 30
        metrics = bridge.hub.metrics.get_sample_value("bsscihub_mqtt_outbox_dropped_total", {"policy": policy})
        assert metrics == 30
    finally:
        await bridge.stopService()
