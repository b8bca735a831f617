"""BLE in a cluster, on a real Redis and PostgreSQL: a beacon's copies whose gateways' messages went to
different hubs come out as one reading, on one hub, with every receiver; a gateway reporting again
starts the next reading, as on one hub; a new gateway or beacon is announced once and the caps hold for
the cluster."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from bsscihub.bus import Event
from bsscihub.cluster import IWindowStore
from bsscihub.hub import Hub
from bsscihub.protocols.ble import service as ble_service
from bsscihub.protocols.ble.service import BLEService
from tests.cluster import clustered_hub, stop_all, stop_hub
from tests.conftest import _reset_pg_schema
from tests.helpers import until
from tests.redis_server import redis_url

__all__ = ["redis_url"]  # fixture

MAC = "112233445566"
WINDOW = 0.3
GATEWAY_TIMEOUT = 1.0


@attrs.define
class BLEHub:
    node: str
    hub: Hub
    service: BLEService
    events: list[Event]

    async def heard(self, gateway: str, rssi: int, mac: str = "11:22:33:44:55:66", **values: Any) -> None:
        """A gateway's message, as the broker handed it to this hub; done once the hub took it (a new gateway
        or beacon waits for the shared database's decision)."""
        doc = {"gateway_id": gateway, "mac": mac, "rssi": rssi, **values}
        taking = self.service.on_message(f"BLEGatewayData/{gateway}", json.dumps(doc).encode())
        if taking is not None:
            await taking

    def readings(self) -> list[dict[str, Any]]:
        return [dict(e.payload) for e in self.events if e.kind == "up"]

    def refused(self) -> float:
        """Sightings dropped as `registration_limit`."""
        return self.hub.metrics.get_sample_value(
            "bsscihub_ingest_rejected_total", {"family": "ble", "reason": "registration_limit"}) or 0.0

    async def stop(self) -> None:
        await stop_hub(self.hub, self.service)


async def start(tmp: Path, database: str, redis: str, node: str, **ble: Any) -> BLEHub:
    hub = await clustered_hub(tmp, database, redis, node, ["ble"],
                              ble={"dedup_window": WINDOW, "gateway_timeout": GATEWAY_TIMEOUT, **ble})
    events: list[Event] = []
    hub.bus.subscribe(events.append)
    service = BLEService(hub)
    hub.services["ble"] = service
    service.startService()
    await service.when_ready()
    return BLEHub(node, hub, service, events)


@pytest_twisted.async_yield_fixture
async def two_hubs(tmp_path: Path, postgres_url: str, redis_url: str) -> AsyncIterator[tuple[BLEHub, BLEHub]]:
    _reset_pg_schema(postgres_url)
    one = await start(tmp_path / "one", postgres_url, redis_url, "hub-1")
    two = await start(tmp_path / "two", postgres_url, redis_url, "hub-2")
    yield one, two
    await stop_all((one, two))


@pytest.fixture
def looks_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hub looks at what the others wrote every second instead of every five (set before the hubs
    start), so a test of that look waits seconds, not several looks' worth; the look itself is the same."""
    monkeypatch.setattr(ble_service, "CLUSTER_LOAD_EVERY", 1.0)


def everywhere(*hubs: BLEHub) -> list[tuple[str, dict[str, Any]]]:
    return [(h.node, r) for h in hubs for r in h.readings()]


@pytest_twisted.ensureDeferred
async def test_copies_on_two_hubs_make_one_reading_with_every_receiver(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    assert verifyObject(IWindowStore, one.service.shared)
    await one.heard("GW1", -71, temperature=22)
    await two.heard("GW2", -60, temperature=22, humidity=65)
    await until(lambda: len(everywhere(one, two)) == 1)
    await deferLater(reactor, WINDOW * 2, lambda: None)  # a second reading would be out by now
    [(node, reading)] = everywhere(one, two)
    assert node == "hub-1"  # the hub whose copy opened the window publishes it
    assert reading["receivers"] == [{"gatewayId": "GW2", "rssi": -60}, {"gatewayId": "GW1", "rssi": -71}]
    assert (reading["mac"], reading["gatewayId"], reading["rssi"]) == ("11:22:33:44:55:66", "GW2", -60)
    assert reading["values"] == {"temperature": 22.0, "humidity": 65.0}
    # stored once, in the shared database
    await until(lambda: one.service.readings_stored >= 1)
    rows = await one.hub.store.fetchall("SELECT mac, receivers FROM ble_readings")
    assert [(mac, len(json.loads(receivers))) for mac, receivers in rows] == [(MAC, 2)]
    assert two.service.readings_stored == 0


@pytest_twisted.ensureDeferred
async def test_a_gateway_reporting_again_starts_the_next_reading_on_any_hub(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await one.heard("GW1", -70, temperature=23)
    await until(lambda: one.service.shared is not None and one.service.shared.pending == 1)
    await two.heard("GW1", -69, temperature=24)  # the same gateway: the next broadcast, on the other hub
    await two.heard("GW2", -80, temperature=24)
    await until(lambda: len(everywhere(one, two)) == 2)
    await deferLater(reactor, WINDOW * 2, lambda: None)
    found = sorted(everywhere(one, two), key=lambda item: item[1]["values"]["temperature"])
    assert [(node, r["values"]["temperature"], [g["gatewayId"] for g in r["receivers"]]) for node, r in found] == [
        ("hub-1", 23.0, ["GW1"]),
        ("hub-2", 24.0, ["GW1", "GW2"]),
    ]


@pytest_twisted.ensureDeferred
async def test_a_hub_stopping_publishes_the_windows_it_collects(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await one.heard("GW1", -70, temperature=21)
    await until(lambda: one.service.shared is not None and one.service.shared.pending == 1)
    await two.heard("GW2", -75, temperature=21)
    await until(lambda: not two.service.shared._asking)  # type: ignore[union-attr]  # in Redis
    await one.service.stopService()  # inside the window
    [(node, reading)] = everywhere(one, two)
    assert node == "hub-1"
    assert reading["receivers"] == [{"gatewayId": "GW1", "rssi": -70}, {"gatewayId": "GW2", "rssi": -75}]
    await deferLater(reactor, WINDOW * 2, lambda: None)
    assert len(everywhere(one, two)) == 1


@pytest_twisted.ensureDeferred
async def test_a_gateway_heard_by_another_hub_is_not_called_offline(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await one.heard("GW1", -70)
    await until(lambda: [e.payload["state"] for e in one.events if e.kind == "gateway_state"] == ["online"])
    await deferLater(reactor, GATEWAY_TIMEOUT * 0.6, lambda: None)
    await two.heard("GW1", -70)  # its messages reach the other hub now
    await two.service._flush_registry()  # the registry write (every 2 s) that tells the other hubs
    await deferLater(reactor, GATEWAY_TIMEOUT * 0.9, lambda: None)  # past hub-1's timeout: it checked meanwhile
    assert "offline" not in [e.payload["state"] for h in (one, two) for e in h.events if e.kind == "gateway_state"]
    # Silent everywhere: offline.
    await until(lambda: [e.payload["state"] for e in one.events if e.kind == "gateway_state"] == ["online", "offline"],
                timeout=GATEWAY_TIMEOUT * 4)


@pytest.mark.usefixtures("looks_every_second")  # before two_hubs starts them
@pytest_twisted.ensureDeferred
async def test_what_another_hub_registered_is_known_within_seconds(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await one.heard("GW9", -70)
    assert "GW9" not in two.service.gateways
    await until(lambda: "GW9" in two.service.gateways and MAC in two.service.nodes, timeout=10)
    assert two.service.nodes[MAC].gateway == "GW9"


@pytest_twisted.ensureDeferred
async def test_without_redis_each_copy_is_published_alone(two_hubs: tuple[BLEHub, BLEHub],
                                                         logged: list[Any]) -> None:
    one, _ = two_hubs
    await one.hub.cluster.link.redis.disconnect()  # Redis is gone for hub-1's commands
    for n in range(3):
        await one.heard(f"GW{n}", -70 - n, temperature=20)
    await until(lambda: len(one.readings()) == 3)
    assert [[g["gatewayId"] for g in r["receivers"]] for r in one.readings()] == [["GW0"], ["GW1"], ["GW2"]]
    warnings = [e for e in logged if "Redis did not take" in e.get("log_format", "")]
    assert [e["count"] for e in warnings] == [1, 2]  # 1, 2, 4, ...: not a line per copy


@pytest.mark.usefixtures("looks_every_second")  # before two_hubs starts them
@pytest_twisted.ensureDeferred
async def test_what_another_hub_forgot_is_gone_within_seconds(two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await one.heard("GW8", -70)
    await until(lambda: "GW8" in two.service.gateways and MAC in two.service.nodes, timeout=10)
    assert await one.service.forget_gateway("GW8") and await one.service.forget_node(MAC)
    await until(lambda: "GW8" not in two.service.gateways and MAC not in two.service.nodes, timeout=10)
    await two.service._flush_registry()
    assert await two.hub.store.fetchall("SELECT id FROM ble_gateways") == []


def at_once(*taking: Any) -> defer.Deferred[Any]:
    """Messages handed to the hubs in one reactor turn (as a shared subscription spreads them): none is taken
    before all are in."""
    return defer.gatherResults([defer.Deferred.fromCoroutine(t) for t in taking])


async def flushed(*hubs: BLEHub) -> None:
    """Each hub's registry writes done (a hub alone group-commits its new rows)."""
    for running in hubs:
        await running.service._flush_registry()


def announced(*hubs: BLEHub) -> list[str]:
    return sorted(e.kind for h in hubs for e in h.events if e.kind in ("gateway_registered", "node_registered",
                                                                       "gateway_state"))


@pytest_twisted.ensureDeferred
async def test_a_gateway_and_a_beacon_two_hubs_hear_first_at_once_are_announced_once(
        two_hubs: tuple[BLEHub, BLEHub]) -> None:
    one, two = two_hubs
    await at_once(one.heard("GW5", -70), two.heard("GW5", -71))
    # One hub's inserts made the rows: it announced them; the other took them silently.
    assert announced(one, two) == ["gateway_registered", "gateway_state", "node_registered"]
    assert all("GW5" in h.service.gateways and MAC in h.service.nodes for h in (one, two))
    assert [h.refused() for h in (one, two)] == [0, 0]


@pytest_twisted.ensureDeferred
async def test_two_hubs_registering_at_once_stay_within_one_cap(tmp_path: Path, postgres_url: str,
                                                                 redis_url: str) -> None:
    _reset_pg_schema(postgres_url)
    caps = {"max_gateways": 1, "max_nodes": 2, "registrations_per_minute": 0}
    hubs = one, two = (await start(tmp_path / "one", postgres_url, redis_url, "hub-1", **caps),
                       await start(tmp_path / "two", postgres_url, redis_url, "hub-2", **caps))
    try:
        # A new gateway on each hub at once: room for one in the cluster.
        await at_once(one.heard("GWa", -70, mac="00:00:00:00:00:01"), two.heard("GWb", -70, mac="00:00:00:00:00:02"))
        await flushed(*hubs)
        assert await one.hub.store.fetchall("SELECT COUNT(*) FROM ble_gateways") == [(1,)]
        [gateway] = [e.payload["gatewayId"] for h in hubs for e in h.events if e.kind == "gateway_registered"]
        assert sum(h.refused() for h in hubs) == 1
        # Four new beacons through that gateway, two on each hub at once: room for one more.
        await at_once(*(hubs[n % 2].heard(gateway, -70, mac=f"00:00:00:00:01:0{n}") for n in range(4)))
        await flushed(*hubs)
        assert await one.hub.store.fetchall("SELECT COUNT(*) FROM ble_nodes") == [(2,)]
        assert announced(*hubs) == ["gateway_registered", "gateway_state", "node_registered", "node_registered"]
        assert sum(h.refused() for h in hubs) == 4
    finally:
        await stop_all(hubs)
