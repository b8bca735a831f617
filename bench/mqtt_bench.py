"""MQTT bridge benchmark: publish throughput through bus + outbox against a bare paho client, and outbox drain time.

Run from the repository root: ``.venv/bin/python bench/mqtt_bench.py [--messages N] [--drain N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from twisted.internet import defer, reactor, task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bsscihub.bus import Event  # noqa: E402
from bsscihub.hub import make_hub  # noqa: E402
from bsscihub.mqtt.bridge import MQTTBridge, to_json  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.test_mqtt_bridge import EP, uplink_payload  # noqa: E402

TOPIC = f"bsscihub/mioty/ep/{EP}/up"


def uplink(n: int) -> dict[str, Any]:
    """An uplink as the contract publishes it (about 450 bytes of JSON): the MQTT bridge tests' own, numbered, with
    no subpackets and a longer payload (the same bytes every earlier run of this benchmark published)."""
    base = uplink_payload(n)
    return {**base, "rxTime": base["rxTime"] + n, "data": "0253016106220403",
            "receivers": [{**receiver, "subpackets": None} for receiver in base["receivers"]]}


def bare_paho(broker: Mosquitto, payloads: list[bytes]) -> float:
    """Messages per second for plain paho: publish everything at QoS 1, run its loop until every PUBACK is in."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=MQTTProtocolVersion.MQTTv5)
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    while not client.is_connected():
        client.loop(0.01)
    started = time.perf_counter()
    for payload in payloads:
        client.publish(TOPIC, payload, qos=1)
    while acked < len(payloads):
        client.loop(0.01)
    elapsed = time.perf_counter() - started
    client.disconnect()
    return len(payloads) / elapsed


async def until(condition: Any, timeout: float = 600.0, step: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        await task.deferLater(reactor, step, lambda: None)


def make_bridge(directory: Path, broker: Mosquitto) -> MQTTBridge:
    directory.mkdir(parents=True, exist_ok=True)
    config = make_config(
        directory,
        families=[],
        mqtt={"url": f"mqtt://{broker.host}:{broker.port}", "client_id": f"bench-{directory.name}"},
    )
    hub = make_hub(config, reactor, {})
    return MQTTBridge(hub, settings_overrides={"backoff_min": 0.05, "backoff_max": 0.2})


async def bridge_round(bridge: MQTTBridge, docs: list[dict[str, Any]], chunk: int = 500) -> float:
    """Messages per second from bus.publish to the broker's last PUBACK (JSON encoding included)."""
    bus, outbox = bridge.hub.bus, bridge.outbox
    target = outbox.acked + len(docs)
    started = time.perf_counter()
    for i in range(0, len(docs), chunk):
        for payload in docs[i : i + chunk]:
            bus.publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", payload))
        # let the reactor send and read between chunks, as it would between base-station frames
        await task.deferLater(reactor, 0, lambda: None)
    await until(lambda: outbox.acked >= target, step=0.001)
    return len(docs) / (time.perf_counter() - started)


async def throughput(directory: Path, messages: int, rounds: int) -> dict[str, Any]:
    broker = Mosquitto(directory=directory / "broker")
    broker.start()
    bridge = make_bridge(directory / "hub", broker)
    try:
        bridge.startService()
        await until(lambda: bridge.connected)
        docs = [uplink(n) for n in range(messages)]
        payloads = [to_json(d) for d in docs]
        await bridge_round(bridge, docs[:2000])  # warm-up: SQLite file, JIT-less caches, the broker
        bare_paho(broker, payloads[:2000])
        bare, bridged = [], []
        for _ in range(rounds):
            bare.append(bare_paho(broker, payloads))  # blocks the reactor, which is idle meanwhile
            bridged.append(await bridge_round(bridge, docs))
        return {
            "messages": messages,
            "bare_paho_per_s": round(statistics.median(bare)),
            "bridge_per_s": round(statistics.median(bridged)),
            "ratio": round(statistics.median(bridged) / statistics.median(bare), 3),
            "all_bare": [round(x) for x in bare],
            "all_bridge": [round(x) for x in bridged],
            "commits": bridge.outbox.commits,
        }
    finally:
        await bridge.stopService()
        broker.stop()


async def drain(directory: Path, messages: int) -> dict[str, Any]:
    broker = Mosquitto(directory=directory / "broker")
    broker.start()
    broker.stop()  # the outage
    bridge = make_bridge(directory / "hub", broker)
    try:
        bridge.startService()
        started = time.perf_counter()
        pending = []
        for n in range(messages):
            pending.append(bridge.hub.bus.publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", uplink(n))))
            if len(pending) == 5000:
                await defer.gatherResults(pending)
                pending = []
        await defer.gatherResults(pending)
        stored = time.perf_counter() - started
        depth = bridge.outbox.depth
        size = sum(p.stat().st_size for p in (directory / "hub" / "var").glob("outbox.sqlite*"))

        broker.start()
        back = time.perf_counter()
        await until(lambda: bridge.connected, step=0.001)
        connected = time.perf_counter()
        await until(lambda: bridge.outbox.depth == 0, step=0.01)
        done = time.perf_counter()
        return {
            "messages": messages,
            "outbox_depth_during_outage": depth,
            "store_s": round(stored, 2),
            "outbox_file_mb": round(size / 1e6, 1),
            "drain_s": round(done - connected, 2),
            "drain_per_s": round(messages / (done - connected)),
            "reconnect_s": round(connected - back, 2),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    finally:
        await bridge.stopService()
        broker.stop()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as tmp:
        root = Path(tmp)
        results: dict[str, Any] = {}
        if args.messages:
            (root / "t").mkdir()
            results["throughput"] = await throughput(root / "t", args.messages, args.rounds)
            print(json.dumps({"throughput": results["throughput"]}), flush=True)
        if args.drain:
            (root / "d").mkdir()
            results["drain"] = await drain(root / "d", args.drain)
            print(json.dumps({"drain": results["drain"]}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per throughput round (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each; the median is reported")
    parser.add_argument("--drain", type=int, default=100_000, help="outbox size for the drain test (0: skip)")
    task.react(lambda _: defer.ensureDeferred(main(parser.parse_args())))
