"""Sustained ingest of `SensorData` from many devices: messages/s the hub stores and republishes,
against a bare paho subscriber on the same broker in the same run (the ratio is the hub's cost).

    .venv/bin/python bench/ingest_bench.py [--devices 10000] [--messages 100000] [--database sqlite|URL]
                                           [--protocol 5|3.1.1] [--profile FILE]

A private mosquitto (unlimited queues, so a slow consumer is measured, not dropped) serves three
consumers of the same publisher: the hub (devices family, real MQTT bridge and outbox, SQLite by
default), a bare paho subscriber on `SensorData/#`, and a paho witness of the hub's
`{p}/dev/device/+/up` events. Each consumer's rate is messages / (its last message - the
publisher's first). Phase 1 sends one message per device (first sight: every device registers);
phase 2 sends `--messages` more, round-robin over the same devices. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREFIX = "bench"


# -- the other processes (spawned: nothing of the hub's reactor is inherited)


def count_messages(port: int, topic: str, expected: int, timeout: float, ready: Any, out: Any) -> None:
    """A bare paho subscriber: counts `expected` messages on `topic`, reports when the last came."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"count": 0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        state["count"] += 1
        if state["count"] >= expected:
            state["last"] = time.time()
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-count-{uuid.uuid4().hex[:6]}")
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    subscribed.wait(10)
    ready.set()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    out.put((topic, state["count"], state["last"] or time.time()))


def publish(port: int, devices: int, count: int, start_index: int, out: Any) -> None:
    """The devices: `count` QoS 1 messages round-robin over `devices` ids, as fast as the broker takes them."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    first = time.time()
    info = None
    for n in range(count):
        i = (start_index + n) % devices
        device = f"dev-{i:05d}"
        body = json.dumps({"device_id": device, "type": "temperature", "value": 20 + (n % 100) / 10})
        info = client.publish(f"SensorData/{device}", body, qos=1)
        if n % 2000 == 1999:
            info.wait_for_publish(60)  # keep paho's own queue bounded
    if info is not None:
        info.wait_for_publish(120)
    last = time.time()
    client.disconnect()
    client.loop_stop()
    out.put(("publisher", first, last))


# -- the hub, in this process, on the real reactor


async def run(args: argparse.Namespace, reactor: Any) -> dict[str, Any]:
    from twisted.internet import defer, task

    from bsscihub.config import load_config
    from bsscihub.family import all_config_sections, enabled_families, installed_families
    from bsscihub.tap import build_service
    from tests.broker import Mosquitto

    work = Path(tempfile.mkdtemp(prefix="bsscihub-bench-"))
    broker = Mosquitto(directory=work / "mosquitto",
                       extra_config="max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 1000\n")
    broker.start()
    database = "sqlite:///hub.sqlite" if args.database == "sqlite" else args.database
    (work / "hub.yaml").write_text(json.dumps({
        "data_dir": str(work / "var"), "database": database, "families": ["devices"],
        "web": {"listen": "tcp:0:interface=127.0.0.1"}, "log": {"level": "warn"},
        "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}", "prefix": PREFIX, "client_id": "bench-hub",
                 "protocol": args.protocol},
    }))
    installed = installed_families()
    config = load_config(work / "hub.yaml", environ={}, family_sections=all_config_sections(installed))
    service = build_service(config, enabled_families(installed, ("devices",)), reactor)
    service.startService()
    await service.when_ready()
    hub = service.hub
    devices_service = hub.services["devices"]
    await devices_service.when_subscribed()
    while not hub.mqtt.connected:
        await task.deferLater(reactor, 0.05, lambda: None)

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"devices": args.devices, "messages": args.messages, "database": hub.store.dialect,
                               "hub_mqtt_protocol": args.protocol}
    try:
        offset = 0
        for phase, count in (("register", args.devices), ("sustained", args.messages)):
            out = ctx.Queue()
            readies = []
            consumers = []
            for topic in ("SensorData/#", f"{PREFIX}/dev/device/+/up"):
                ready = ctx.Event()
                proc = ctx.Process(target=count_messages, args=(broker.port, topic, count, args.timeout, ready, out))
                proc.start()
                consumers.append(proc)
                readies.append(ready)
            for ready in readies:
                while not ready.is_set():
                    await task.deferLater(reactor, 0.05, lambda: None)
            stored_before = devices_service.stored
            publisher = ctx.Process(target=publish, args=(broker.port, args.devices, count, offset, out))
            publisher.start()
            offset += count
            deadline = time.time() + args.timeout
            stored_at = None
            while time.time() < deadline:
                if devices_service.stored - stored_before >= count:
                    stored_at = time.time()
                    break
                await task.deferLater(reactor, 0.02, lambda: None)
            reports = {}
            for _ in range(3):
                got = await defer.Deferred.fromCoroutine(_get(out, args.timeout, reactor))
                reports[got[0]] = got
            for proc in (publisher, *consumers):
                proc.join(5)
            _, first, published_at = reports["publisher"]
            _, bare_count, bare_at = reports["SensorData/#"]
            _, up_count, up_at = reports[f"{PREFIX}/dev/device/+/up"]
            stored = devices_service.stored - stored_before

            def rate(n: int, at: float | None, first: float = first) -> float:
                return round(n / max(1e-6, (at or time.time()) - first), 1)

            results[phase] = {
                "published_per_s": rate(count, published_at),
                "bare_subscriber_per_s": rate(bare_count, bare_at),
                "hub_stored_per_s": rate(stored, stored_at),
                "hub_republished_per_s": rate(up_count, up_at),
                "stored": stored, "republished": up_count, "bare_received": bare_count,
            }
            results[phase]["ratio_stored_vs_bare"] = round(
                results[phase]["hub_stored_per_s"] / max(1e-6, results[phase]["bare_subscriber_per_s"]), 3)
            results[phase]["ratio_republished_vs_bare"] = round(
                results[phase]["hub_republished_per_s"] / max(1e-6, results[phase]["bare_subscriber_per_s"]), 3)
        results["registered"] = len(devices_service.devices)
        results["rejected"] = sum(
            s.value for m in hub.metrics.collect() if m.name == "bsscihub_ingest_rejected" for s in m.samples
            if s.name.endswith("_total"))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        await service.stopService()
        broker.stop()
    return results


async def _get(queue: Any, timeout: float, reactor: Any) -> Any:
    from twisted.internet import threads

    return await threads.deferToThread(queue.get, True, timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=100_000, help="messages in the sustained phase")
    parser.add_argument("--database", default="sqlite", help="sqlite, or a postgresql:// URL (an empty database)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a phase after this many seconds")
    parser.add_argument("--protocol", default="5", choices=["5", "3.1.1"], help="the hub's MQTT protocol")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the hub's process into FILE")
    args = parser.parse_args()

    from twisted.internet import defer, task

    async def go(reactor: Any) -> None:
        print(json.dumps(await run(args, reactor), indent=2))

    task.react(lambda r: defer.Deferred.fromCoroutine(go(r)))  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
