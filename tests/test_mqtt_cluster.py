"""The MQTT bridge of a cluster's hubs against a real mosquitto: each hub's own retained status and will,
and commands and device messages shared by the live hubs only, when one hub is killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from bsscihub.mqtt.bridge import MQTTBridge
from tests.broker import Mosquitto, Subscriber
from tests.helpers import clean_env
from tests.test_mqtt_bridge import EP, Commander, bridges, clustered, until

__all__ = ["bridges"]  # fixture

REPO = Path(__file__).resolve().parents[1]
COMMANDS = "bsscihub/+/+/+/cmd/+"
SHARED_COMMANDS = "$share/bsscihub/" + COMMANDS

# One hub of a cluster in a process of its own, to be killed with SIGKILL (the broker sees the
# connection drop without a DISCONNECT, as when a hub's machine dies).
CLUSTER_HUB = r"""
import os, sys
from twisted.internet import reactor
from bsscihub.cluster import Cluster, LocalOwnership, LocalRouter
from bsscihub.config import load_config
from bsscihub.hub import make_hub
from bsscihub.mqtt.bridge import MQTTBridge

node = sys.argv[1]
hub = make_hub(load_config(None, os.environ), reactor, {})
hub.cluster = Cluster(node=node, ownership=LocalOwnership(node), router=LocalRouter(), clustered=True)
hub.commands["mioty"] = lambda kind, ident, name, body: print("handled", name, flush=True) or {}
MQTTBridge(hub, settings_overrides={"backoff_min": 0.05, "backoff_max": 0.2}).startService()
reactor.run()
"""


def doc(payload: bytes) -> Any:
    return json.loads(payload)


@pytest.fixture
def cluster_bridge(bridges: Callable[..., MQTTBridge]) -> Callable[..., MQTTBridge]:
    """make(broker, node) -> a started bridge of a clustered hub (client id `bsscihub`); stopped at teardown."""
    return lambda broker, node, protocol="5": bridges(broker, client_id="bsscihub", protocol=protocol,
                                                      cluster=clustered(node))


@pytest.fixture
def killable_hub(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """start(broker, node, protocol) -> a clustered hub process with the bridge only; killed at teardown."""
    started: list[subprocess.Popen[str]] = []
    script = tmp_path / "cluster_hub.py"
    script.write_text(CLUSTER_HUB)

    def start(broker: Mosquitto, node: str, protocol: str = "5") -> subprocess.Popen[str]:
        env = clean_env(PYTHONPATH=str(REPO), BSSCIHUB_DATA_DIR=str(tmp_path / f"var-{node}"),
                        BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}", BSSCIHUB_MQTT_CLIENT_ID="bsscihub",
                        BSSCIHUB_MQTT_PROTOCOL=protocol)
        process = subprocess.Popen([sys.executable, str(script), node], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def retained(broker: Mosquitto, topic_filter: str, subscriber_factory: Callable[..., Subscriber],
             count: int) -> dict[str, bytes]:
    """What the broker holds retained under `topic_filter`, as a subscriber arriving now sees it."""
    late = subscriber_factory(broker, topic_filter)
    return {m.topic: m.payload for m in late.wait_for(lambda m: m.retain, count=count, timeout=5)}


# -- the broker's behaviour the cluster is built around ---------------------------------------------


def test_mosquitto_queues_a_share_groups_messages_for_a_member_whose_session_outlives_it(
    mosquitto: Mosquitto, subscriber_factory: Callable[..., Subscriber]
) -> None:
    """Why a cluster's hubs keep no MQTT session: a member of a share group that is gone, its session
    kept, still gets its turn; its messages wait for it (or are dropped when the session expires)."""
    live = subscriber_factory(mosquitto, "$share/g/cmd/#", client_id="live", persistent=True)
    gone = subscriber_factory(mosquitto, "$share/g/cmd/#", client_id="gone", persistent=True)
    gone.stop()  # its session (expiry 1 h) stays on the broker
    sender = Commander(mosquitto)
    try:
        for n in range(10):
            sender.send(f"cmd/{n}", b"{}")
        live.wait_for(lambda m: True, count=1)
        with pytest.raises(TimeoutError):
            live.wait_for(lambda m: True, count=10, timeout=1)
        assert 0 < len(live.messages) < 10
    finally:
        sender.stop()


# -- hub status -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_hub_of_a_cluster_has_its_own_retained_status_and_will(
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    cluster_bridge: Callable[..., MQTTBridge],
    killable_hub: Callable[..., subprocess.Popen[str]],
) -> None:
    # What one hub left before the network became a cluster: it would speak for every hub.
    stale = Commander(mosquitto)
    stale.client.publish("bsscihub/hub/status", b'{"state":"online"}', qos=1, retain=True).wait_for_publish(5)
    stale.stop()
    witness = subscriber_factory(mosquitto, "bsscihub/hub/#")
    killed = killable_hub(mosquitto, "hub1")
    alive = cluster_bridge(mosquitto, "hub2")
    await witness.when(lambda m: m.topic == "bsscihub/hub/hub1/status" and b"online" in m.payload)
    await witness.when(lambda m: m.topic == "bsscihub/hub/hub2/status" and b"online" in m.payload)
    # the cluster's hubs cleared the single hub's status
    await witness.when(lambda m: m.topic == "bsscihub/hub/status" and m.payload == b"")

    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [will] = await witness.when(lambda m: m.topic == "bsscihub/hub/hub1/status" and b"offline" in m.payload)
    assert will.retain and doc(will.payload) == {"state": "offline", "version": "0.1.0", "since": None,
                                                 "node": "hub1"}
    # Only its own topic: the other hub still says online, and nothing speaks for "the network".
    await deferLater(reactor, 0.3, lambda: None)
    assert not [m for m in witness.messages if m.topic != "bsscihub/hub/hub1/status" and b"offline" in m.payload]
    now = retained(mosquitto, "bsscihub/hub/#", subscriber_factory, count=2)
    assert sorted(now) == ["bsscihub/hub/hub1/status", "bsscihub/hub/hub2/status"]
    assert doc(now["bsscihub/hub/hub1/status"])["state"] == "offline"
    status = doc(now["bsscihub/hub/hub2/status"])
    assert (status["state"], status["node"]) == ("online", "hub2") and status["since"].endswith("Z")

    # a clean stop says offline on its own topic too, with the time it stopped
    await alive.stopService()
    [bye] = await witness.when(lambda m: m.topic == "bsscihub/hub/hub2/status" and b"offline" in m.payload)
    assert bye.retain and doc(bye.payload)["since"].endswith("Z")


# -- shared subscriptions when a hub dies -----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest_twisted.ensureDeferred
async def test_commands_and_device_messages_go_to_the_live_hubs_when_one_is_killed(
    protocol: str,
    mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    cluster_bridge: Callable[..., MQTTBridge],
    killable_hub: Callable[..., subprocess.Popen[str]],
) -> None:
    witness = subscriber_factory(mosquitto, "bsscihub/hub/#")
    killed = killable_hub(mosquitto, "hub1", protocol)
    alive = cluster_bridge(mosquitto, "hub2", protocol)
    ingested: list[str] = []
    alive.subscribe("devices/+/data", lambda topic, payload, properties: ingested.append(topic))
    await until(lambda: mosquitto.subscriptions("bsscihub-hub1", SHARED_COMMANDS) >= 1, timeout=20)
    await until(lambda: mosquitto.subscriptions("bsscihub-hub2", SHARED_COMMANDS) >= 1
                and mosquitto.subscriptions("bsscihub-hub2", "$share/bsscihub/devices/+/data") >= 1)

    killed.send_signal(signal.SIGKILL)
    killed.wait()
    await witness.when(lambda m: m.topic == "bsscihub/hub/hub1/status" and b"offline" in m.payload)
    sender = Commander(mosquitto)
    try:
        for n in range(20):
            sender.send(f"bsscihub/mioty/ep/{EP}/cmd/detach", b"{}")
            sender.send(f"devices/d{n}/data", b"{}")
        # every one to the hub that is alive, none left waiting for the dead hub's session
        await until(lambda: alive.commands_handled == 20 and len(ingested) == 20)
    finally:
        sender.stop()
    assert sorted(ingested) == sorted(f"devices/d{n}/data" for n in range(20))
