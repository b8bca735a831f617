"""What the tests of a cluster share: hubs of one cluster started on one PostgreSQL database and a private Redis
(mioty services, whole hubs) and stopped after the test, HAProxy's path, a hub's readiness, a station's owner."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import reactor

from bsscihub.cluster import Cluster
from bsscihub.cluster_redis import redis_cluster
from bsscihub.family import installed_families
from bsscihub.hub import Hub, make_hub
from tests.conftest import _reset_pg_schema, make_config
from tests.memory_bridge import FollowingClock, MemoryBroker
from tests.test_families import RunningHub, start_hub
from tests.test_mioty_service import PKI, Running, start

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin")


def ready(web: int, host: str = "127.0.0.1") -> bool:
    """Whether the hub whose web server listens on `web` answers /health/ready with 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{web}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def owner(redis: str, eui: str) -> str:
    """The node holding base station `eui` (16 hex digits) in the cluster on `redis`, or ""."""
    port = redis.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-cli", "-p", port, "-n", "0", "HGET", "bsscihub:owners", f"mioty/{eui}"],
                         capture_output=True, text=True, timeout=5).stdout.strip()
    return str(json.loads(out)["node"]) if out else ""


@pytest_twisted.async_yield_fixture
async def nodes(redis_url: str) -> AsyncIterator[list[Cluster]]:
    """The shared parts (Redis link, ownership, router …) of hub-1 and hub-2, on the module's Redis emptied first."""
    started: list[Cluster] = []
    for node in ("hub-1", "hub-2"):
        cluster = redis_cluster(node, redis_url, reactor)
        await cluster.start()
        started.append(cluster)
    await started[0].link.redis.flushdb()  # no owners, counts or leases of an earlier test
    yield started
    await stop_all(started)


async def clustered_hub(tmp: Path, database: str, redis: str, node: str, families: list[str], **sections: Any) -> Hub:
    """A hub of the cluster with these families in `tmp` (made here), its schema migrated and its shared parts
    started; no service yet."""
    tmp.mkdir()
    config = make_config(tmp, database=database, cluster={"redis": redis, "node": node}, **sections)
    hub = make_hub(config, reactor, {name: installed_families()[name] for name in families})
    assert hub.cluster.clustered and hub.cluster.node == node
    hub.store.start()
    try:
        await hub.store.migrate(hub.migrations())
        await hub.cluster.start()
    except BaseException:
        await hub.store.stop()  # its threads would keep the test run alive
        raise
    return hub


async def stop_hub(hub: Hub, *services: Any) -> None:
    """In the hub's own order: its services, the cluster's shared parts, the store (even when one fails)."""
    try:
        for service in services:
            if service.running:
                await service.stopService()
    finally:
        try:
            await hub.cluster.stop()
        finally:
            await hub.store.stop()


async def stop_all(hubs: Any) -> None:
    """Stops every one of `hubs`, even when one fails to: a hub left running keeps the test run alive."""
    failed: BaseException | None = None
    for running in hubs:
        try:
            await running.stop()
        except BaseException as e:
            failed = failed or e
    if failed is not None:
        raise failed


@attrs.define
class MiotyHubs:
    """Starts mioty services of one cluster in this process (`mioty_hubs`); the fixture stops what still runs."""

    tmp: Path
    pki: PKI
    database: str
    redis: str
    running: list[Running] = attrs.Factory(list)

    async def start(self, node: str, **sections: Any) -> Running:
        """The hub `node` in tmp/<node>, with more config sections (scaci …)."""
        (self.tmp / node).mkdir()
        running = await start(self.tmp / node, self.pki,
                              sections={"database": self.database, "cluster": {"redis": self.redis, "node": node},
                                        **sections})
        assert running.hub.cluster.clustered and running.hub.cluster.node == node
        self.running.append(running)
        return running

    async def two(self, **sections: Any) -> tuple[Running, Running]:
        """hub-1, then hub-2."""
        return await self.start("hub-1", **sections), await self.start("hub-2", **sections)

    async def stop(self, *hubs: Running) -> None:
        """Stops these hubs now (as if they went away)."""
        for running in hubs:
            self.running.remove(running)
        await stop_all(hubs)


@pytest_twisted.async_yield_fixture
async def mioty_hubs(tmp_path: Path, pki: PKI, postgres_url: str, redis_url: str) -> AsyncIterator[MiotyHubs]:
    """Mioty hubs on an emptied PostgreSQL schema and the module's Redis, started by the test, stopped after it."""
    _reset_pg_schema(postgres_url)
    hubs = MiotyHubs(tmp_path, pki, postgres_url, redis_url)
    yield hubs
    await hubs.stop(*hubs.running)


@attrs.define
class FamilyHubs:
    """Starts whole hubs (web, bridge, families) of one cluster, each on its own broker (`family_hubs`)."""

    tmp: Path
    database: str
    redis: str
    running: list[RunningHub] = attrs.Factory(list)
    made: int = 0

    async def start(self, broker: MemoryBroker, families: list[str], clock: FollowingClock | None = None,
                    **overrides: Any) -> RunningHub:
        """The next hub, hub-<n> in tmp/hub<n> (n from 0)."""
        n, self.made = self.made, self.made + 1
        (self.tmp / f"hub{n}").mkdir()
        running = await start_hub(self.tmp / f"hub{n}", broker, families, clock, database=self.database,
                                  cluster={"redis": self.redis, "node": f"hub-{n}"}, **overrides)
        self.running.append(running)
        return running

    async def two(self, brokers: list[MemoryBroker], families: list[str],
                  clocks: list[FollowingClock] | None = None, **overrides: Any) -> tuple[RunningHub, RunningHub]:
        """hub-0 on brokers[0], then hub-1 on brokers[1]."""
        clock = clocks or [None, None]
        return (await self.start(brokers[0], families, clock[0], **overrides),
                await self.start(brokers[1], families, clock[1], **overrides))

    async def stop(self, *hubs: RunningHub) -> None:
        """Stops these hubs now (as if they went away)."""
        for running in hubs:
            self.running.remove(running)
        await stop_all(hubs)


@pytest_twisted.async_yield_fixture
async def family_hubs(tmp_path: Path, postgres_url: str, redis_url: str) -> AsyncIterator[FamilyHubs]:
    """Whole hubs on an emptied PostgreSQL schema and the module's Redis, started by the test, stopped after it."""
    _reset_pg_schema(postgres_url)
    hubs = FamilyHubs(tmp_path, postgres_url, redis_url)
    yield hubs
    await hubs.stop(*hubs.running)
