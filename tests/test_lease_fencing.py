"""Fencing tokens of the leader leases, on a real Redis and PostgreSQL: every acquisition gets a higher token, and a
hub that still believes it leads after another took the lease over (a stall) has its leader-only writes refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent

from bsscihub import cluster_redis
from bsscihub.bus import Event
from bsscihub.cluster import Cluster, Fence, StaleLeader, leader_write
from bsscihub.cluster_redis import RedisLease
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from tests.cluster import MiotyHubs, mioty_hubs, nodes, stop_hub
from tests.conftest import _reset_pg_schema
from tests.helpers import until
from tests.redis_server import redis_url
from tests.test_cluster_shared import alerting_hub
from tests.test_mioty_cluster_lifecycle import HOUR, _stations_with_ep, _two_hubs
from tests.test_mioty_service import EP, KEY, A, imported_elsewhere, pki

__all__ = ["mioty_hubs", "nodes", "pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


async def _take_over(stale: RedisLease, newer: RedisLease) -> None:
    """`stale` stalls while holding the lease (no renewals: it still believes it holds it until its time runs out)
    and the lease expires in Redis meanwhile; `newer` acquires it at its next try."""
    assert stale._loop is not None
    stale._loop.stop()
    await stale.link.redis.delete([stale.key])
    await newer._renew()
    assert stale.held and newer.held  # two leaders for a moment: what the fence is for
    assert newer.token > stale.token


def _lines(logged: list[LogEvent], text: str) -> list[str]:
    return [line for line in (formatEvent(e) or "" for e in logged) if text in line]


@pytest_twisted.ensureDeferred
async def test_a_lease_stopped_while_its_first_renewal_is_under_way_is_given_up(nodes: list[Cluster]) -> None:
    # The answer came after the stop: the hub believed it held the lease after stopping, and the lease stayed
    # taken in Redis until it expired (other hubs waited out its ttl).
    lease = RedisLease(nodes[0].link, nodes[0].node, "test", reactor, ttl=30.0)
    lease.start()  # the first renewal is sent now; its answer comes on a later turn of the reactor
    await lease.stop()
    assert not lease.held
    assert await nodes[0].link.redis.get(lease.key) is None


@pytest_twisted.ensureDeferred
async def test_every_acquisition_of_a_lease_gets_a_higher_token_and_a_renewal_keeps_it(nodes: list[Cluster]) -> None:
    one, two = (RedisLease(node.link, node.node, "test", reactor, ttl=30.0) for node in nodes)
    tokens = []
    await one._renew()
    assert one.held
    tokens.append(one.token)
    await one._renew()  # a renewal: the same acquisition
    assert one.token == tokens[-1]
    await two._renew()
    assert not two.held  # held by the other
    await one.stop()  # given up: the other acquires
    await two._renew()
    assert two.held
    tokens.append(two.token)
    # An earlier run of hub-2 still named in Redis (killed, restarted): the new run takes over, with a new token.
    again = RedisLease(nodes[1].link, "hub-2", "test", reactor, ttl=30.0)
    await again._renew()
    assert again.held
    tokens.append(again.token)
    await nodes[0].link.redis.delete([again.key])  # expired
    await one._renew()
    tokens.append(one.token)
    assert tokens == sorted(set(tokens)) and len(tokens) == 4, tokens
    await one.stop()


@pytest_twisted.ensureDeferred
async def test_the_fence_takes_the_newest_token_and_refuses_an_older_one_with_its_write(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)

    def write(cursor: Any, fence: Fence, note: str) -> None:
        fence.check(cursor)
        cursor.execute("INSERT INTO registry_changes (family, kind, key, node, time) VALUES ('t', 'k', ?, 'n', 0)",
                       (note,))

    await store.interaction(write, Fence("alerts", 2), "first")
    await store.interaction(write, Fence("alerts", 2), "same holder again")
    with pytest.raises(StaleLeader) as refused:
        await store.interaction(write, Fence("alerts", 1), "stale")
    assert refused.value.newer == 2
    await store.interaction(write, Fence("mioty", 1), "another lease has its own tokens")
    await store.interaction(write, Fence("alerts", 3), "newer")
    await store.interaction(write, Fence("alerts", 0), "one hub: not fenced")
    assert [row[0] for row in await store.fetchall("SELECT key FROM registry_changes ORDER BY id")] == [
        "first", "same holder again", "another lease has its own tokens", "newer", "one hub: not fenced"]
    assert await store.fetchall("SELECT name, token FROM lease_fences ORDER BY name") == [("alerts", 3), ("mioty", 1)]


@pytest_twisted.ensureDeferred
async def test_a_lease_counted_from_1_again_by_a_redis_that_lost_its_data_gets_above_the_database_s_token(
        nodes: list[Cluster], store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    earlier = RedisLease(nodes[1].link, "hub-2", "test", reactor, ttl=30.0)
    await earlier._renew()
    await earlier.stop()
    lease = RedisLease(nodes[0].link, "hub-1", "test", reactor, ttl=30.0)
    await lease._renew()
    assert lease.token == 2

    async def write(fence: Fence) -> None:
        await store.interaction(fence.check)

    assert await leader_write(lease, write)
    await nodes[0].link.redis.flushdb()  # Redis restarted without its data
    await lease._renew()
    assert lease.held and lease.token == 1
    assert not await leader_write(lease, write)  # refused: the database has 2
    assert not lease.held
    await lease._renew()  # acquired again, above what the database has
    assert lease.held and lease.token == 3
    assert await leader_write(lease, write)
    assert await store.fetchall("SELECT token FROM lease_fences WHERE name = 'test'") == [(3,)]
    await lease.stop()


# -- alerts


NO_ROUNDS = "1h"  # the alerts' check interval: no rounds during a test, it drives the evaluations itself


def _battery(device: str, level: float) -> Event:
    return Event("devices", "up", f"dev/device/{device}/up", {"deviceId": device, "battery": level})


@pytest_twisted.ensureDeferred
async def test_a_stale_alerts_leader_stores_and_publishes_no_transition_and_the_new_one_does(
        tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        logged: list[LogEvent]) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 60.0)  # the stalled hub believes it leads for the whole test
    _reset_pg_schema(postgres_url)
    hubs = []
    try:
        hubs.append(await alerting_hub(tmp_path / "hub-1", postgres_url, redis_url, "hub-1", NO_ROUNDS))
        stale_hub, stale, stale_fired = hubs[0]
        await until(lambda: stale.lease.held, "hub-1 holds the alerts lease")
        await stale.add_rule({"name": "battery", "family": "devices", "kind": "device", "condition": "battery_below",
                              "threshold": 20}, "tests")
        hubs.append(await alerting_hub(tmp_path / "hub-2", postgres_url, redis_url, "hub-2", NO_ROUNDS))
        new_hub, new, new_fired = hubs[1]
        await _take_over(stale.lease, new.lease)

        # The new leader stores and publishes its transition (its token goes into the fence).
        await new_hub.bus.publish(_battery("Device001", 10))
        await until(lambda: new_fired, "the new leader's alert")
        assert [(e.topic, e.payload["state"]) for e in new_fired] == [("alerts/devices/device/Device001/battery_low",
                                                                      "firing")]
        # The stalled hub wakes up and judges Device002 low: the database refuses its write, nothing goes out.
        await stale_hub.bus.publish(_battery("Device002", 5))
        assert stale._pending  # its transition, under way
        await until(lambda: not stale._pending, "the stale leader's write settles")
        assert stale_fired == []
        store = new_hub.store
        assert await store.fetchall("SELECT target FROM alert_states") == [("Device001",)]
        assert await store.fetchall("SELECT target, state FROM alert_history") == [("Device001", "firing")]
        assert not stale.lease.held
        assert len(_lines(logged, "is stale; its write was not made")) == 1
        # Its next renewal finds the lease taken: it stays a follower.
        await stale.lease._renew()
        assert not stale.lease.held and new.lease.held

        # The new leader judges Device002 as usual.
        await new_hub.bus.publish(_battery("Device002", 5))
        await until(lambda: len(new_fired) == 2, "the new leader's second alert")
        assert sorted(row[0] for row in await store.fetchall("SELECT target FROM alert_states")) == [
            "Device001", "Device002"]
        assert stale_fired == []
    finally:
        for hub, service, _ in hubs:
            await stop_hub(hub, service)


# -- mioty


@pytest_twisted.ensureDeferred
async def test_a_stale_mioty_leader_cannot_detach_a_silent_sensor_and_the_new_one_can(
        mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch, logged: list[LogEvent]) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 60.0)
    stale, new = await _two_hubs(mioty_hubs)
    hubs = (stale, new)
    a, b = await _stations_with_ep(stale, new, attached_on=stale)
    await _take_over(stale.service.lease, new.service.lease)

    # The new leader warns about 37 h of silence (a fenced write: its token is the database's newest).
    await new.service.check_lifecycle(reactor.seconds() + 37 * HOUR)
    assert len(new.of("inactivity_warning")) == 1
    # The stalled hub wakes up and judges 73 h of silence: its auto-detach is refused, nothing goes out.
    await stale.service.check_lifecycle(reactor.seconds() + 73 * HOUR)
    assert [len(r.of(kind)) for r in hubs for kind in ("inactivity_warning", "auto_detach")] == [0, 0, 1, 0]
    stored = await new.hub.store.fetchone("SELECT attached FROM mioty_sensors WHERE eui = ?", (EP,))
    assert stored is not None and stored[0]
    assert stale.service.registry.sensors[EP].attached
    assert not stale.service.lease.held
    assert len(_lines(logged, "is stale; its write was not made")) == 1

    # The new leader detaches it: stored, reported once, a detPrp on both hubs' stations.
    await new.service.check_lifecycle(reactor.seconds() + 73 * HOUR)
    assert [len(r.of("auto_detach")) for r in hubs] == [0, 1]
    stored = await new.hub.store.fetchone("SELECT attached FROM mioty_sensors WHERE eui = ?", (EP,))
    assert stored is not None and not stored[0]
    assert (await b.expect("detPrp"))["epEui"] == int(EP, 16)
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)


@pytest_twisted.ensureDeferred
async def test_a_stale_mioty_leader_does_not_report_an_outside_change_the_new_one_reported(
        mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 60.0)
    stale, new = await _two_hubs(mioty_hubs)
    a = await stale.station("bs-a", A)
    await _take_over(stale.service.lease, new.service.lease)
    # `bsscihub sensors import` in another process while the two hubs both believe they lead.
    doc = [{"eui": EP, "nwKey": KEY.hex(), "shortAddr": "0042", "bidi": False}]
    assert (await imported_elsewhere(stale, doc))["created"] == 1
    await new.service.sync()
    assert [e.payload["epEui"] for e in new.of("attach")] == [EP]
    # The stalled hub's sync still brings the change to its stations, and reports nothing.
    await stale.service.sync()
    assert (await a.expect("attPrp"))["epEui"] == int(EP, 16)
    assert stale.of("attach") == []
    assert not stale.service.lease.held
