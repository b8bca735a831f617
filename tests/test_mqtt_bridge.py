"""The MQTT bridge against real mosquitto brokers: the contract's topics and payloads both ways,
outages, a hub killed with -9, authentication and TLS, commands, MQTT 5 responses, 3.1.1. Command
validation and a family's layout, which are the bridge's own mappings, run on a broker in memory."""

from __future__ import annotations

import contextlib
import datetime
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import paho.mqtt.client as paho
import pytest
import pytest_twisted
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import generate_latest
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, formatEvent
from zope.interface import implementer

from bsscihub import pki
from bsscihub.bus import Event
from bsscihub.cluster import Cluster, LocalOwnership, LocalRouter
from bsscihub.errors import CommandError
from bsscihub.family import IMQTTLayout, IMQTTLayouts
from bsscihub.hub import make_hub
from bsscihub.mqtt.bridge import MQTTBridge, decode_command, install
from tests.broker import BrokerTLS, Mosquitto, Received, Subscriber
from tests.conftest import make_config
from tests.helpers import clean_env, until
from tests.memory_bridge import MemoryBroker

REPO = Path(__file__).resolve().parents[1]
EP = "0011223344556677"
BS = "70b3d59cd0000001"
BS2 = "70b3d59cd0000002"
FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "connect_timeout": 2.0}


def clustered(node: str) -> Cluster:
    """A hub's part in a cluster as its bridge sees it (shared subscriptions, no session), without Redis."""
    return Cluster(node=node, ownership=LocalOwnership(node), router=LocalRouter(), clustered=True)


# -- the contract's events, as the mioty family emits them ------------------------------


def uplink_payload(count: int = 7) -> dict[str, Any]:
    return {
        "epEui": EP,
        "packetCnt": count,
        "rxTime": 1_755_708_639_613_188_798,
        "time": "2025-08-20T16:50:39.613Z",
        "data": "0253016106",
        "format": 0,
        "dlOpen": False,
        "responseExp": False,
        "dlAck": False,
        "receivers": [
            {
                "bsEui": BS,
                "snr": 22.88,
                "rssi": -71.39,
                "eqSnr": 20.1,
                "rxTime": 1_755_708_639_613_188_798,
                "profile": "eu1",
                "mode": 0,
                "subpackets": {"snr": [22.1, 23.0], "rssi": [-71.0, -71.8]},
            },
            {
                "bsEui": BS2,
                "snr": 9.5,
                "rssi": -98.0,
                "eqSnr": 8.0,
                "rxTime": 1_755_708_639_613_190_001,
                "profile": "eu1",
                "mode": 0,
                "subpackets": None,
            },
        ],
    }


BS_STATE = {
    "state": "online",
    "vendor": "Acme",
    "model": "BS-1",
    "name": "roof",
    "swVersion": "1.2.3",
    "version": "1.0.0",
    "since": "2025-08-20T16:00:00.000Z",
}
BS_STATUS = {
    "code": 0,
    "memLoad": 0.33,
    "cpuLoad": 0.23,
    "dutyCycle": 0.0,
    "time": 1_755_706_414_392_137_804,
    "uptime": 1566,
    "temp": 41.5,
}
ATTACH = {"epEui": EP, "bsEui": BS, "shortAddr": "1234", "time": "2025-08-20T16:50:39.613Z"}

CONTRACT_EVENTS = [
    Event("mioty", "uplink", f"mioty/ep/{EP}/up", uplink_payload()),
    Event("mioty", "attach", f"mioty/ep/{EP}/event/attach", ATTACH),
    Event("mioty", "dl_result", f"mioty/ep/{EP}/event/dl_result", {"epEui": EP, "queId": 3, "result": "sent"}),
    Event("mioty", "state", f"mioty/bs/{BS}/state", BS_STATE, retain=True),
    Event("mioty", "status", f"mioty/bs/{BS}/status", {**BS_STATUS, "time": "2025-08-20T16:50:40.000Z"}, retain=True),
]


# -- a command handler shaped like the mioty family's ------------------------------------


@attrs.define
class FakeMioty:
    """Validates like the mioty family does; records what it carried out."""

    done: list[tuple[str, str, str, dict[str, Any]]] = attrs.field(factory=list)

    async def __call__(self, kind: str, ident: str, name: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        if kind == "ep":
            if ident != EP:
                raise CommandError(f"unknown end point {ident}")
            if name == "attach":
                for key, size in (("nwKey", 32), ("shortAddr", 4)):
                    value = payload.get(key)
                    if not isinstance(value, str) or len(value) != size or not _hex(value):
                        raise CommandError(f"{key}: expected {size} hex digits")
                if not isinstance(payload.get("bidi"), bool):
                    raise CommandError("bidi: expected true or false")
                self.done.append((kind, ident, name, payload))
                return {"registered": True}
            if name == "detach":
                self.done.append((kind, ident, name, payload))
                return None
            if name == "down":
                data = payload.get("data")
                if not isinstance(data, str) or not _hex(data):
                    raise CommandError("data: expected a hex string")
                self.done.append((kind, ident, name, payload))
                return {"queId": 1}
        elif kind == "bs":
            if ident != BS:
                raise CommandError(f"unknown base station {ident}")
            if name == "status":
                self.done.append((kind, ident, name, payload))
                return {"polled": True}
        raise CommandError(f"unknown command {name!r} for {kind}")


def _hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower() and len(text) % 2 == 0


async def crashing(kind: str, ident: str, name: str, payload: dict[str, Any]) -> None:
    raise RuntimeError("a bug in a family")


# -- helpers --------------------------------------------------------------------------------


async def subscribed(broker: Mosquitto, bridge: MQTTBridge, topic_filter: str | None = None, times: int = 1) -> None:
    """Until the broker has the bridge subscribed to ``topic_filter`` (default: the command
    filter) ``times`` times in all (once per connection), as its log says."""
    topic_filter = topic_filter or f"{bridge.prefix}/+/+/+/cmd/+"
    client_id = bridge.client.settings.client_id
    await until(lambda: broker.subscriptions(client_id, topic_filter) >= times)


def failures(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "log_failure" in e]


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Callable[..., MQTTBridge]]:
    """make(broker, **mqtt) -> a started bridge on a hub of its own; stopped at teardown."""
    made: list[MQTTBridge] = []

    def make(broker: Mosquitto | MemoryBroker | None, *, port: int | None = None, scheme: str = "mqtt",
             cluster: Any = None, **mqtt: Any) -> MQTTBridge:
        directory = tmp_path / f"hub{len(made)}"
        directory.mkdir()
        port = port or (broker.port if isinstance(broker, Mosquitto) else 1)
        values = {"url": f"{scheme}://127.0.0.1:{port}", "client_id": f"hub-{port}-{len(made)}"}
        values.update(mqtt)
        hub = make_hub(make_config(directory, families=[], mqtt=values), reactor, {})
        if cluster is not None:
            hub.cluster = cluster
        hub.commands["mioty"] = FakeMioty()
        hub.commands["test"] = crashing
        if isinstance(broker, MemoryBroker):
            bridge = MQTTBridge(hub, settings_overrides=FAST, client_factory=broker.client_factory)
        else:
            bridge = MQTTBridge(hub, settings_overrides=FAST)
        hub.mqtt = bridge  # as the hub has it
        made.append(bridge)
        bridge.startService()
        return bridge

    yield make
    for bridge in made:
        if bridge.running:
            pytest_twisted.blockon(bridge.stopService())


class Commander:
    """Another system sending commands: its own paho client on its own thread."""

    def __init__(self, broker: Mosquitto, protocol: int = 5) -> None:
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"commander-{broker.port}", protocol=version)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(
        self, topic: str, payload: bytes, response_topic: str | None = None, correlation: bytes | None = None
    ) -> None:
        properties = None
        if response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def commander() -> Iterator[Callable[..., Commander]]:
    made: list[Commander] = []

    def make(broker: Mosquitto, protocol: int = 5) -> Commander:
        made.append(Commander(broker, protocol))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def doc(message: Received) -> Any:
    return json.loads(message.payload)


def is_rfc3339(text: str) -> bool:
    return text.endswith("Z") and datetime.datetime.fromisoformat(text.replace("Z", "+00:00")) is not None


# -- the published side of the contract -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_published_topic_and_payload_of_the_contract(
    mosquitto: Mosquitto, subscriber_factory: Callable[..., Subscriber], bridges: Callable[..., MQTTBridge]
) -> None:
    witness = subscriber_factory(mosquitto, "bsscihub/#")
    bridge = bridges(mosquitto)
    [online] = await witness.when(lambda m: m.topic == "bsscihub/hub/status")
    assert online.retain and online.qos == 1
    status = doc(online)
    assert status["state"] == "online" and status["version"] == bridge.hub.version and is_rfc3339(status["since"])

    for event in CONTRACT_EVENTS:
        await bridge.hub.bus.publish(event)  # fires once committed to the outbox
    seen = await witness.when(lambda m: m.topic.startswith("bsscihub/mioty/"), count=len(CONTRACT_EVENTS))
    assert [(m.topic, doc(m), m.retain, m.qos) for m in seen] == [
        (f"bsscihub/{e.topic}", dict(e.payload), e.retain, 1) for e in CONTRACT_EVENTS
    ]

    # a subscriber that comes later gets what is retained, and only that
    late = subscriber_factory(mosquitto, "bsscihub/#")
    retained = await late.when(lambda m: True, count=3)
    assert sorted(m.topic for m in retained) == [
        "bsscihub/hub/status",
        f"bsscihub/mioty/bs/{BS}/state",
        f"bsscihub/mioty/bs/{BS}/status",
    ]
    assert all(m.retain for m in retained)

    await bridge.stopService()
    [offline] = await witness.when(lambda m: m.topic == "bsscihub/hub/status" and b"offline" in m.payload)
    assert offline.retain
    assert doc(offline)["state"] == "offline" and is_rfc3339(doc(offline)["since"])


@implementer(IMQTTLayout)
class EchoLayout:
    """A family's extra layout as the bridge sees it: mirrors uplinks and answers requests, under `legacy/`."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def outbound(self, event: Event) -> list[tuple[str, Any, bool]]:
        if event.kind != "uplink":
            return []
        if event.payload.get("data") == "broken":
            raise RuntimeError("a bug in the layout")
        return [(f"legacy/{event.payload['epEui']}/ul", {"cnt": event.payload["packetCnt"]}, False)]

    def inbound(self) -> dict[str, Any]:
        return {"legacy/+/ping": self.ping}

    async def ping(self, topic: str, payload: bytes, properties: Any) -> None:
        await self.hub.mqtt.publish(topic.replace("/ping", "/pong"), {"got": payload.decode()})


@implementer(IMQTTLayouts)
@attrs.frozen
class EchoFamily:
    name: str = "echo"
    mqtt_layouts: tuple[str, ...] = ("seed",)

    def mqtt_layout(self, name: str, hub: Any) -> EchoLayout:
        return EchoLayout(hub)


@pytest_twisted.ensureDeferred
async def test_a_family_layout_is_spoken_both_ways_next_to_the_standard_one(tmp_path: Path) -> None:
    """The layout is the bridge's mapping, not the broker's: a broker in memory carries it (the seed
    layout's own test, test_mioty_seed, runs against a real one)."""
    broker = MemoryBroker()
    legacy = broker.witness("legacy/#")
    standard = broker.witness("bsscihub/echo/#")
    config = make_config(tmp_path, families=[], mqtt={"url": "mqtt://127.0.0.1:1883", "layout": "seed"})
    hub = make_hub(config, reactor, {"echo": EchoFamily()})  # type: ignore[dict-item]
    bridge = hub.mqtt = MQTTBridge(hub, settings_overrides=FAST, client_factory=broker.client_factory)
    bridge.startService()
    try:
        await until(lambda: bridge.connected)
        up = {**uplink_payload(), "epEui": EP}
        await hub.bus.publish(Event("echo", "uplink", f"echo/ep/{EP}/up", up))
        # a layout that fails on one event costs that event's mirror, not the event
        await hub.bus.publish(Event("echo", "uplink", f"echo/ep/{EP}/up", {**up, "data": "broken"}))
        await hub.bus.publish(Event("echo", "attach", f"echo/ep/{EP}/event/attach", ATTACH))
        seen = await standard.when(lambda m: True, count=3)
        assert [m.topic for m in seen] == [f"bsscihub/echo/ep/{EP}/up"] * 2 + [f"bsscihub/echo/ep/{EP}/event/attach"]
        [mirrored] = await legacy.when(lambda m: m.topic.endswith("/ul"))
        assert (mirrored.topic, doc(mirrored)) == (f"legacy/{EP}/ul", {"cnt": 7})
        await broker.device().publish(f"legacy/{EP}/ping", b"hello")
        [pong] = await legacy.when(lambda m: m.topic.endswith("/pong"))
        assert doc(pong) == {"got": "hello"}
        assert [m.topic for m in legacy.messages if m.topic.endswith("/ul")] == [f"legacy/{EP}/ul"]
    finally:
        await bridge.stopService()


def test_a_layout_no_family_speaks_is_a_config_error(tmp_path: Path) -> None:
    from bsscihub.config import ConfigError
    from bsscihub.tap import load_hub_config

    config = make_config(tmp_path, families=[], mqtt={"layout": "seed"})
    with pytest.raises(ConfigError, match="no enabled family speaks this layout"):
        MQTTBridge(make_hub(config, reactor, {}))
    (tmp_path / "bad.yaml").write_text("families: [ble]\nmqtt:\n  layout: seed\n")
    with pytest.raises(ConfigError) as raised:
        load_hub_config(str(tmp_path / "bad.yaml"), environ={})
    assert str(raised.value) == (
        "config error: mqtt.layout = 'seed': no enabled family speaks this layout"
    )


# -- commands ------------------------------------------------------------------------------------

NW_KEY = "00112233445566778899aabbccddeeff"
COMMANDS: list[tuple[str, bytes, str | None]] = [
    # (topic under the prefix, payload, None for ok or a fragment of the error)
    (f"mioty/ep/{EP}/cmd/attach", json.dumps({"nwKey": NW_KEY, "shortAddr": "1234", "bidi": True}).encode(), None),
    (
        f"mioty/ep/{EP}/cmd/attach",
        json.dumps({"nwKey": NW_KEY, "shortAddr": "1234", "bidi": "yes"}).encode(),
        "bidi: expected true or false",
    ),
    (
        f"mioty/ep/{EP}/cmd/attach",
        json.dumps({"nwKey": NW_KEY[:-1], "shortAddr": 1234, "bidi": True}).encode(),
        "nwKey: expected 32 hex digits",
    ),
    (f"mioty/ep/{EP}/cmd/attach", b'{"nwKey": ', "payload is not valid JSON: Expecting value at position 10"),
    (f"mioty/ep/{EP}/cmd/attach", b"[1, 2]", "payload must be a JSON object, not an array"),
    (f"mioty/ep/{EP}/cmd/attach", b'"attach"', "payload must be a JSON object, not a string"),
    (f"mioty/ep/{EP}/cmd/attach", b"\xff\xfe\x00", "payload is not UTF-8 JSON"),
    (f"mioty/ep/{EP}/cmd/down", b'{"data": "0102", "prio": 1}', None),
    (f"mioty/ep/{EP}/cmd/down", b'{"data": 5}', "data: expected a hex string"),
    (f"mioty/ep/{EP}/cmd/detach", b"{}", None),
    (f"mioty/ep/{EP}/cmd/reboot", b"{}", "unknown command 'reboot' for ep"),
    ("mioty/ep/ffffffffffffffff/cmd/detach", b"{}", "unknown end point ffffffffffffffff"),
    (f"mioty/bs/{BS}/cmd/status", b"", None),
    ("mioty/bs/70b3d59cd00000ff/cmd/status", b"{}", "unknown base station 70b3d59cd00000ff"),
    (f"zigbee/dev/{EP}/cmd/on", b"{}", "unknown family 'zigbee' (known: mioty, test)"),
    (f"test/dev/{EP}/cmd/anything", b"{}", "internal error"),
]


@pytest_twisted.ensureDeferred
async def test_in_a_cluster_each_command_and_device_message_is_handled_by_one_hub(
    mosquitto: Mosquitto,
    bridges: Callable[..., MQTTBridge],
    commander: Callable[..., Commander],
) -> None:
    one, two = (bridges(mosquitto, client_id="bsscihub", cluster=clustered(node)) for node in ("hub1", "hub2"))
    # One client id in the shared configuration, a session of its own per hub.
    assert (one.client.settings.client_id, two.client.settings.client_id) == ("bsscihub-hub1", "bsscihub-hub2")
    ingested: list[tuple[str, str]] = []
    for bridge, node in ((one, "hub1"), (two, "hub2")):
        bridge.subscribe("devices/+/data", lambda topic, payload, properties, node=node: ingested.append((node, topic)))
    await until(lambda: one.connected and two.connected)
    for bridge in (one, two):
        await until(lambda bridge=bridge: mosquitto.subscriptions(bridge.client.settings.client_id,
                                                                  "$share/bsscihub/bsscihub/+/+/+/cmd/+") >= 1)
        await until(lambda bridge=bridge: mosquitto.subscriptions(bridge.client.settings.client_id,
                                                                  "$share/bsscihub/devices/+/data") >= 1)
    sender = commander(mosquitto)
    for n in range(20):
        sender.send(f"bsscihub/mioty/ep/{EP}/cmd/detach", b"{}")
        sender.send(f"devices/d{n}/data", b"{}")
    await until(lambda: one.commands_handled + two.commands_handled >= 20 and len(ingested) >= 20)
    await deferLater(reactor, 0.5, lambda: None)
    # Each exactly once across the two hubs, whichever hub took it.
    assert one.commands_handled + two.commands_handled == 20
    assert sorted(topic for _, topic in ingested) == sorted(f"devices/d{n}/data" for n in range(20))


async def test_every_command_is_validated_and_answered(
    bridges: Callable[..., MQTTBridge], logged: list[LogEvent]
) -> None:
    """Validation and answers are the bridge's, not the broker's: a broker in memory carries them
    (test_mqtt5_response_topic_and_correlation_data sends commands through a real one)."""
    broker = MemoryBroker()
    results = broker.witness("bsscihub/+/+/+/event/cmd_result")
    bridge = bridges(broker)
    await until(lambda: bridge.connected)
    sender = broker.device()
    for topic, payload, _ in COMMANDS:
        await sender.publish(f"bsscihub/{topic}", payload)
    answers = await results.when(lambda m: True, count=len(COMMANDS), timeout=10)

    by_topic: dict[str, list[Any]] = {}
    for message in answers:
        by_topic.setdefault(message.topic, []).append(doc(message))
    for topic, _, expected in COMMANDS:
        answer = by_topic[f"bsscihub/{topic.rsplit('/cmd/', 1)[0]}/event/cmd_result"].pop(0)
        name = topic.rsplit("/", 1)[1]
        assert answer["command"] == name and answer["ok"] is (expected is None), (topic, answer)
        assert answer["error"] == expected if expected is None else expected in answer["error"], (topic, answer)
    first = [doc(m) for m in answers if m.topic.endswith(f"{EP}/event/cmd_result")][0]
    assert first == {"registered": True, "command": "attach", "ok": True, "error": None}

    rejected = sum(1 for *_, e in COMMANDS if e is not None)
    assert (bridge.commands_handled, bridge.commands_rejected) == (len(COMMANDS), rejected)
    assert bridge.client.connects == 1, "no command cost the connection"
    # only the family's own bug is a traceback; bad input is an answer and one info line
    assert [formatEvent(e) for e in failures(logged)] == [
        f"MQTT command anything on bsscihub/test/dev/{EP}/cmd/anything failed"
    ]
    assert [k for k, *_ in bridge.hub.commands["mioty"].done] == ["ep", "ep", "ep", "bs"]


@pytest_twisted.ensureDeferred
async def test_mqtt5_response_topic_and_correlation_data(
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    bridges: Callable[..., MQTTBridge],
    commander: Callable[..., Commander],
) -> None:
    replies = subscriber_factory(mosquitto, "replies/#")
    events = subscriber_factory(mosquitto, "bsscihub/+/+/+/event/cmd_result")
    bridge = bridges(mosquitto)
    await until(lambda: bridge.connected)
    await subscribed(mosquitto, bridge)
    sender = commander(mosquitto)
    sender.send(f"bsscihub/mioty/bs/{BS}/cmd/status", b"{}", "replies/ops-1", b"\x00\x01req-7")
    sender.send(f"bsscihub/mioty/ep/{EP}/cmd/detach", b"{", "replies/ops-1", b"req-8")
    sender.send(f"bsscihub/mioty/ep/{EP}/cmd/detach", b"{}", "replies/ops-2")  # no correlation data
    sender.send(f"bsscihub/mioty/ep/{EP}/cmd/detach", b"{}", "replies/+/bad")  # not a topic: ignored
    got = await replies.when(lambda m: True, count=3)
    assert [(m.topic, doc(m)["command"], doc(m)["ok"]) for m in got] == [
        ("replies/ops-1", "status", True),
        ("replies/ops-1", "detach", False),
        ("replies/ops-2", "detach", True),
    ]
    assert doc(got[0]) == {"polled": True, "command": "status", "ok": True, "error": None}
    assert [getattr(m.properties, "CorrelationData", None) for m in got] == [b"\x00\x01req-7", b"req-8", None]
    # every command is answered on cmd_result too, including the one with the unusable response topic
    assert len(await events.when(lambda m: True, count=4)) == 4
    assert not bridge.running or bridge.client.connects == 1


@pytest_twisted.ensureDeferred
async def test_mqtt_3_1_1(
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    bridges: Callable[..., MQTTBridge],
    commander: Callable[..., Commander],
) -> None:
    witness = subscriber_factory(mosquitto, "bsscihub/#", protocol=4)
    bridge = bridges(mosquitto, protocol="3.1.1")
    assert bridge.settings.protocol == 4
    await witness.when(lambda m: m.topic == "bsscihub/hub/status" and b"online" in m.payload)
    await bridge.hub.bus.publish(CONTRACT_EVENTS[0])
    commander(mosquitto, protocol=4).send(f"bsscihub/mioty/bs/{BS}/cmd/status", b"{}")
    seen = await witness.when(lambda m: "/mioty/" in m.topic and "/cmd/" not in m.topic, count=2)
    assert [m.topic for m in seen] == [f"bsscihub/mioty/ep/{EP}/up", f"bsscihub/mioty/bs/{BS}/event/cmd_result"]
    assert doc(seen[1]) == {"polled": True, "command": "status", "ok": True, "error": None}


# -- device-side topics (the families' API) --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_device_topics_are_subscribed_again_after_every_reconnect(
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    bridges: Callable[..., MQTTBridge],
    commander: Callable[..., Commander],
    logged: list[LogEvent],
) -> None:
    bridge = bridges(mosquitto)
    got: list[tuple[str, bytes]] = []

    def telemetry(topic: str, payload: bytes, properties: Any) -> None:
        got.append((topic, payload))

    async def broken(topic: str, payload: bytes, properties: Any) -> None:
        raise ValueError("a family's handler bug")

    granted = bridge.subscribe("device/+/telemetry/#", telemetry)
    bridge.subscribe("device/+/telemetry/#", broken)
    await granted
    commander(mosquitto).send("device/d1/telemetry/temp", b"21.5")
    await until(lambda: got == [("device/d1/telemetry/temp", b"21.5")])
    assert bridge.handler_errors == 1 and len(failures(logged)) == 1

    # the broker forgets every session when it restarts: the bridge subscribes again
    mosquitto.stop()
    mosquitto.start()
    await until(lambda: bridge.client.connects == 2)
    await subscribed(mosquitto, bridge, "device/+/telemetry/#", times=2)
    commander(mosquitto).send("device/d2/telemetry/rh", b"40")
    await until(lambda: len(got) == 2)

    witness = subscriber_factory(mosquitto, "OTA/#")
    await bridge.publish("OTA/d1/request", {"version": "2.0"}, acked=True)
    await bridge.publish("OTA/d1/raw", b"\x00\x01", retain=True)
    seen = await witness.when(lambda m: True, count=2)
    assert [(m.topic, m.payload, m.retain) for m in seen] == [
        ("OTA/d1/request", b'{"version":"2.0"}', False),
        ("OTA/d1/raw", b"\x00\x01", True),
    ]
    with pytest.raises(ValueError):
        bridge.publish("OTA/+/request", b"x")
    assert bridge.client.connects == 2


# -- outages -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_cluster", [False, True], ids=["one hub", "a cluster's hub (no session)"])
@pytest_twisted.ensureDeferred
async def test_broker_stopped_during_a_stream_of_uplinks_loses_none(
    in_cluster: bool,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
    bridges: Callable[..., MQTTBridge],
) -> None:
    # The hub's duty ends at the broker's PUBACK. A broker stopped mid-stream may have
    # acknowledged messages it had not yet handed to a subscriber; with persistence (as in
    # production) it keeps them for a subscriber's session over the restart, without it
    # they are gone from the broker and the witness would blame the hub.
    mosquitto = mosquitto_factory(persistence=True)
    before = subscriber_factory(mosquitto, "bsscihub/mioty/#", persistent=True)
    # A cluster's hub keeps no MQTT session: the outbox alone makes publishing lose nothing.
    bridge = bridges(mosquitto, cluster=clustered("hub1") if in_cluster else None)
    assert bridge.settings.session_expiry == (0 if in_cluster else 3600)
    await until(lambda: bridge.connected)
    total, outage_at, back_at = 900, 300, 600
    for n in range(total):
        if n == outage_at:
            mosquitto.stop()
        elif n == back_at:
            health = bridge.health()
            assert not health.up and health.detail["state"] in ("waiting", "connecting")
            assert health.detail["outbox_depth"] >= back_at - outage_at
            assert health.detail["oldest_pending_age"] > 0
            # the reactor is blocked here, so the witness is in place before the bridge is back
            mosquitto.start()
            after = subscriber_factory(mosquitto, "bsscihub/mioty/#")
        d = bridge.hub.bus.publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", uplink_payload(n)))
        if n % 30 == 29:
            await d
            await deferLater(reactor, 0.01, lambda: None)
    await until(lambda: bridge.outbox.depth == 0, timeout=20)

    def received() -> set[int]:
        return {doc(m)["packetCnt"] for m in before.messages + after.messages}

    # Acked by the broker is not yet delivered to the subscriber's thread: give it time
    # (the persistent one also reconnects and is handed what the broker kept for it).
    with contextlib.suppress(TimeoutError):
        await until(lambda: received() == set(range(total)), timeout=30)
    counts = received()
    assert counts == set(range(total)), f"missing: {sorted(set(range(total)) - counts)[:20]}"
    # the broker received them in order: first appearances ascend on each side of the outage
    later = [doc(m)["packetCnt"] for m in after.messages]
    firsts = list(dict.fromkeys(later))
    assert firsts == sorted(firsts)
    assert bridge.client.connects == 2 and bridge.health().up


KILLED_HUB = r"""
import os, sys
from twisted.internet import defer, reactor
from bsscihub.bus import Event
from bsscihub.config import load_config
from bsscihub.hub import make_hub
from bsscihub.mqtt.bridge import MQTTBridge

hub = make_hub(load_config(None, os.environ), reactor, {})
bridge = MQTTBridge(hub, settings_overrides={"backoff_min": 0.05, "backoff_max": 0.2})
bridge.startService()
if sys.argv[1] == "publish":
    count = int(sys.argv[2])
    done = [hub.bus.publish(Event("mioty", "uplink", "mioty/ep/0011223344556677/up", {"packetCnt": n}))
            for n in range(count)]
    # "committed" is what the mioty family waits for before acknowledging to the base station
    defer.gatherResults(done).addCallback(lambda _: print("committed", count, flush=True))
reactor.run()
"""


def run_hub(script: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_line_with(process: subprocess.Popen[str], text: str, timeout: float = 15.0) -> str:
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise TimeoutError(f"no {text!r} from the hub; it said: {''.join(lines)[-2000:]}")
    return lines[-1]


@pytest_twisted.ensureDeferred
async def test_hub_killed_hard_with_a_full_outbox_loses_nothing(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], subscriber_factory: Callable[..., Subscriber]
) -> None:
    # unlimited: by default mosquitto drops what a slow subscriber has not taken beyond 1000
    broker = mosquitto_factory(extra_config="max_queued_messages 0")
    broker.stop()  # the broker is away while the hub takes uplinks
    script = tmp_path / "hub.py"
    script.write_text(KILLED_HUB)
    env = clean_env(PYTHONPATH=str(REPO), BSSCIHUB_DATA_DIR=str(tmp_path / "var"),
                    BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}", BSSCIHUB_MQTT_CLIENT_ID="killed-hub")
    count = 2000
    first = run_hub(script, env, "publish", str(count))
    try:
        await threads.deferToThread(read_line_with, first, f"committed {count}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL

    broker.start()
    witness = subscriber_factory(broker, "bsscihub/#")
    second = run_hub(script, env, "run")
    try:
        seen = await witness.when(lambda m: m.topic.endswith("/up"), count=count, timeout=20)
        assert sorted({doc(m)["packetCnt"] for m in seen}) == list(range(count))
        assert [doc(m)["packetCnt"] for m in seen][:count] == list(range(count)), "resent in order"
        # killed again: the broker publishes the will
        second.send_signal(signal.SIGKILL)
        second.wait()
        [will] = await witness.when(lambda m: m.topic == "bsscihub/hub/status" and b"offline" in m.payload)
        assert will.retain and doc(will) == {"state": "offline", "version": "0.1.0", "since": None}
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()


# -- authentication and TLS -------------------------------------------------------------------


@attrs.frozen
class Certs:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("mqtt-pki")
    pki.create_ca(d / "ca.pem", d / "ca.key")
    pki.create_ca(d / "other-ca.pem", d / "other-ca.key", common_name="someone else's CA")
    pki.issue_server_cert(d / "ca.pem", d / "ca.key", d / "broker.pem", d / "broker.key")
    return Certs(d / "ca.pem", d / "other-ca.pem", d / "broker.pem", d / "broker.key")


def retries(events: list[LogEvent]) -> list[str]:
    return [e["reason"] for e in events if "reason" in e and "retry" in e.get("log_format", "")]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "MQTT broker refused the connection: "),
        ("wrong CA", "TLS: the MQTT broker's certificate was rejected: "),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_connections_are_logged_and_retried_not_fatal(
    case: str,
    expected: str,
    certs: Certs,
    mosquitto_factory: Callable[..., Mosquitto],
    bridges: Callable[..., MQTTBridge],
    logged: list[LogEvent],
) -> None:
    broker = mosquitto_factory(users={"hub": "right-pw"}, tls=BrokerTLS(certs.ca, certs.cert, certs.key))
    if case == "wrong password":
        bridge = bridges(broker, username="hub", password="s3cret-wrong")
    else:
        bridge = bridges(
            None, port=broker.tls_port, scheme="mqtts", ca=str(certs.other_ca), username="hub", password="right-pw"
        )
    await until(lambda: bridge.client.failures >= 3)
    reasons = retries(logged)
    assert len(reasons) >= 3 and all(r.startswith(expected) for r in reasons), reasons
    health = bridge.health()
    assert not health.up and health.detail["connects"] == 0
    assert not failures(logged), "a clear line, no traceback"
    everything = " ".join(formatEvent(e) for e in logged) + json.dumps(health.detail)
    assert "s3cret-wrong" not in everything and "right-pw" not in everything


@pytest_twisted.ensureDeferred
async def test_tls_with_authentication(
    certs: Certs,
    mosquitto_factory: Callable[..., Mosquitto],
    subscriber_factory: Callable[..., Subscriber],
    bridges: Callable[..., MQTTBridge],
) -> None:
    broker = mosquitto_factory(
        users={"hub": "p@ss:word", "reader": "r"}, tls=BrokerTLS(certs.ca, certs.cert, certs.key)
    )
    witness = subscriber_factory(broker, "bsscihub/#", username="reader", password="r")
    # user and password in the URL, percent-encoded
    bridge = bridges(None, url=f"mqtts://hub:p%40ss%3Aword@localhost:{broker.tls_port}", ca=str(certs.ca))
    await until(lambda: bridge.connected)
    await bridge.hub.bus.publish(CONTRACT_EVENTS[0])
    seen = await witness.when(lambda m: m.topic.endswith("/up"))
    assert doc(seen[0]) == CONTRACT_EVENTS[0].payload


# -- health, metrics, decoding, wiring ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_and_metrics(mosquitto: Mosquitto, bridges: Callable[..., MQTTBridge]) -> None:
    bridge = bridges(mosquitto)
    await until(lambda: bridge.connected)
    for n in range(20):
        await bridge.hub.bus.publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", {"packetCnt": n}))
    await until(lambda: bridge.outbox.depth == 0)
    all_up, report = bridge.hub.health.report()
    mqtt = report["components"]["mqtt"]
    assert mqtt["up"] and mqtt["connected"] and mqtt["state"] == "connected"
    assert mqtt["outbox_depth"] == 0 and mqtt["oldest_pending_age"] is None and mqtt["publish_rate"] > 0
    assert {"backoff", "commands_handled", "commands_rejected", "outbox_dropped"} <= set(mqtt)
    text = generate_latest(bridge.hub.metrics).decode()
    assert "bsscihub_mqtt_connected 1.0" in text
    assert "bsscihub_mqtt_published_total 20.0" in text
    assert 'bsscihub_mqtt_outbox_dropped_total{policy="drop_oldest"} 0.0' in text
    assert 'bsscihub_mqtt_commands_total{result="rejected"} 0.0' in text

    mosquitto.stop()
    await until(lambda: not bridge.connected)
    await bridge.hub.bus.publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", {"packetCnt": 99}))
    await until(lambda: bridge.client.current_backoff is not None)
    health = bridge.health()
    assert not health.up and health.detail["outbox_depth"] == 1 and health.detail["backoff"] > 0
    assert "bsscihub_mqtt_connected 0.0" in generate_latest(bridge.hub.metrics).decode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", {}),
        (b"  \n", {}),
        (b'{"a": [1]}', {"a": [1]}),
        (b"null", "not null"),
        (b"1e999", "beyond what a number can hold"),
        (b"[" * 60_000, "not valid JSON"),
        (b"{" + b" " * 70_000 + b"}", "larger than"),
    ],
)
def test_decode_command(payload: bytes, expected: Any) -> None:
    if isinstance(expected, dict):
        assert decode_command(payload) == expected
    else:
        with pytest.raises(CommandError, match=expected):
            decode_command(payload)


def test_install_makes_the_bridge_the_first_child(tmp_path: Path) -> None:
    from bsscihub.hub import HubService, assemble_hub

    hub = assemble_hub(make_config(tmp_path, families=[]), reactor, {})
    assert hub.mqtt is not None, "the Hub comes complete, before any service exists"
    service = HubService(hub)
    bridge = install(hub, service)
    assert list(service) == [bridge] and hub.mqtt is bridge and service.getServiceNamed("mqtt") is bridge
    assert bridge.settings.will is not None and bridge.settings.will.topic == "bsscihub/hub/status"
    with pytest.raises(RuntimeError):
        install(hub, service)
    with pytest.raises(RuntimeError, match="no MQTT bridge"):
        install(make_hub(make_config(tmp_path, families=[]), reactor, {}), HubService(hub))


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_the_real_mioty_family_answers_through_the_bridge(
    tmp_path: Path,
    certs: Certs,
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    commander: Callable[..., Commander],
    logged: list[LogEvent],
) -> None:
    from bsscihub.family import installed_families
    from bsscihub.hub import HubService, assemble_hub

    results = subscriber_factory(mosquitto, "bsscihub/+/+/+/event/#")
    config = make_config(
        tmp_path,
        families=["mioty"],
        tls={
            "ca": str(certs.ca),
            "ca_key": str(certs.ca.with_suffix(".key")),
            "cert": str(certs.cert),
            "key": str(certs.key),
        },
        mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": "hub-with-mioty"},
    )
    family = installed_families()["mioty"]
    hub = assemble_hub(config, reactor, {"mioty": family})
    service = HubService(hub)
    bridge = install(hub, service)  # what tap.build_service does, before the families
    hub.services["mioty"].setServiceParent(service)
    service.startService()
    try:
        await service.when_ready()
        await until(lambda: bridge.connected)
        await subscribed(mosquitto, bridge)
        sender = commander(mosquitto)
        attach = {"nwKey": NW_KEY, "shortAddr": "12ab", "bidi": False}
        sends = [
            (f"mioty/ep/{EP}/cmd/attach", json.dumps(attach).encode(), True),
            (f"mioty/ep/{EP}/cmd/attach", json.dumps({**attach, "bidi": "no"}).encode(), False),
            (f"mioty/ep/{EP}/cmd/down", b'{"data": "zz"}', False),
            ("mioty/ep/ffffffffffffffff/cmd/detach", b"{}", False),
            ("mioty/ep/not-an-eui/cmd/detach", b"{}", False),
            (f"mioty/ep/{EP}/cmd/detach", b"{", False),
            (f"mioty/bs/{BS}/cmd/status", b"{}", False),  # not connected
            (f"mioty/ep/{EP}/cmd/detach", b"{}", True),
        ]
        for topic, payload, _ in sends:
            sender.send(f"bsscihub/{topic}", payload)
        answers = await results.when(lambda m: m.topic.endswith("/cmd_result"), count=len(sends), timeout=10)
        by_topic: dict[str, list[Any]] = {}
        for message in answers:
            by_topic.setdefault(message.topic, []).append(doc(message))
        for topic, _, ok in sends:
            answer = by_topic[f"bsscihub/{topic.rsplit('/cmd/', 1)[0]}/event/cmd_result"].pop(0)
            assert answer["ok"] is ok and (answer["error"] is None) is ok, (topic, answer)
            assert answer["command"] == topic.rsplit("/", 1)[1]
        # the family's own events went out through the same outbox
        kinds = [m.topic.rsplit("/", 1)[1] for m in results.messages if "/event/" in m.topic]
        assert "attach" in kinds and "detach" in kinds
        assert bridge.client.connects == 1 and not failures(logged)
    finally:
        await service.stopService()
