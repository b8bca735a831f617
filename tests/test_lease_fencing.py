"""Fencing tokens of the leader leases, on a real Redis and PostgreSQL: every acquisition gets a higher token, and a
hub that still believes it leads after another took the lease over (a stall) has its leader-only writes refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from bsscihub.cluster import Cluster, Fence, StaleLeader, leader_write
from bsscihub.cluster_redis import RedisLease, redis_cluster
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from tests.redis_server import redis_url

__all__ = ["redis_url"]  # fixtures


@pytest_twisted.async_yield_fixture
async def nodes(redis_url: str) -> AsyncIterator[list[Cluster]]:
    started: list[Cluster] = []
    for node in ("hub-1", "hub-2"):
        cluster = redis_cluster(node, redis_url, reactor)
        await cluster.start()
        started.append(cluster)
    await started[0].link.redis.flushdb()
    yield started
    for cluster in started:
        await cluster.stop()


async def _take_over(stale: RedisLease, newer: RedisLease) -> None:
    """`stale` stalls while holding the lease (no renewals: it still believes it holds it until its time runs out)
    and the lease expires in Redis meanwhile; `newer` acquires it at its next try."""
    assert stale._loop is not None
    stale._loop.stop()
    await stale.link.redis.delete([stale.key])
    await newer._renew()
    assert stale.held and newer.held  # two leaders for a moment: what the fence is for
    assert newer.token > stale.token


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
