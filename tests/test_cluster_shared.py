"""What a cluster's hubs count and decide once for all, on a real Redis and PostgreSQL: log-in and other
rate limits spread over two hubs, the leader lease (one holder, taken over when it dies), alerts fired by
one hub, webhook events delivered once by the hub that handled them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.web import server

from bsscihub import cluster_redis, users
from bsscihub.alerts import AlertService
from bsscihub.bus import Event
from bsscihub.cluster import Cluster
from bsscihub.cluster_redis import RedisLease, RedisLimiter, redis_cluster
from bsscihub.hub import Hub
from bsscihub.ingest import RegistrationLimit, Rejected
from bsscihub.web.app import WebApp
from bsscihub.web.auth import LoginLimiter
from bsscihub.webhooks import WebhookService, sign
from tests.broker import free_port
from tests.cluster import clustered_hub, nodes, stop_hub
from tests.conftest import _reset_pg_schema
from tests.helpers import until as wait_for
from tests.redis_server import redis_url
from tests.test_alerts import Receiver, transitions_stored_in_decided_order
from tests.test_web_support import PASSWORD, Harness, fast_hashing

__all__ = ["nodes", "redis_url"]  # fixtures


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_failed_logins_spread_over_two_hubs_count_once(nodes: list[Cluster]) -> None:
    one, two = (LoginLimiter(reactor, limiter=node.limiter, per_account_source=(3, 60), per_source=(5, 60),
                             slow_after=(6, 60)) for node in nodes)
    # Three wrong passwords from one address, two on one hub and one on the other: that address waits on both.
    await one.failed("10.0.0.1", "admin")
    await two.failed("10.0.0.1", "admin")
    assert await one.retry_after("10.0.0.1", "admin") is None
    await one.failed("10.0.0.1", "admin")
    for limiter in (one, two):
        assert await limiter.retry_after("10.0.0.1", "admin") == pytest.approx(20, abs=0.5)
        assert await limiter.retry_after("10.0.0.2", "admin") is None  # the account is not locked for others
    # The right password on one hub gives that address its attempts back on every hub.
    await two.succeeded("10.0.0.1", "admin")
    assert await one.retry_after("10.0.0.1", "admin") is None
    # Many addresses at one account, over both hubs: both slow it down.
    assert await one.delay("admin") == 0
    for n in range(3):
        await one.failed(f"10.1.0.{n}", "admin")
        await two.failed(f"10.2.0.{n}", "admin")
    assert await one.delay("admin") == one.slow_down == await two.delay("admin")


@pytest_twisted.ensureDeferred
async def test_a_shared_limit_refuses_without_spending_refills_and_leaves_nothing_behind(nodes: list[Cluster]) -> None:
    one, two = (node.limiter("test.api", reactor, rate=20.0, burst=2) for node in nodes)
    assert isinstance(one, RedisLimiter)
    assert await one.take(("user", 7)) is None
    assert await two.take(("user", 7)) is None
    wait = await one.take(("user", 7))
    assert wait is not None and 0 < wait <= 0.05 + 0.01
    assert await two.take(("user", 8)) is None  # another key has its own bucket
    # Refusals spend nothing: after one token's time, one request passes again.
    await sleep(0.06)
    assert await two.take(("user", 7)) is None
    assert await one.take(("user", 7)) is not None
    # A full bucket is no key at all in Redis.
    await sleep(0.15)
    assert await nodes[0].link.redis.keys("bsscihub:rate:test.api:*") == []


@pytest_twisted.ensureDeferred
async def test_a_shared_limit_counts_on_this_hub_while_redis_is_away(redis_url: str) -> None:
    node = redis_cluster("hub-1", redis_url, reactor)
    await node.start()
    limiter = node.limiter("test.away", reactor, rate=1.0, burst=2)
    assert await limiter.take("10.0.0.1") is None
    await node.stop()  # Redis unreachable from here on
    assert await limiter.take("10.0.0.1") is None  # the second of the burst, counted here
    assert await limiter.take("10.0.0.1") is not None  # limited per hub rather than not at all
    # Asked before the cluster connected: answered here too, not an error.
    early = redis_cluster("hub-2", redis_url, reactor).limiter("test.away", reactor, rate=1.0, burst=1)
    assert await early.take("10.0.0.1") is None
    assert await early.take("10.0.0.1") is not None
    await early.forget("10.0.0.1")
    assert await early.wait("10.0.0.1") is None


@pytest_twisted.ensureDeferred
async def test_auto_registrations_from_one_source_count_once_over_two_hubs(nodes: list[Cluster]) -> None:
    one, two = (RegistrationLimit(reactor, cap=0, per_minute=3, limiter=node.limiter, name="test.registrations")
                for node in nodes)
    # Three new ones a minute from gw1, spread over both hubs.
    for limit in (one, two, one):
        limit.check("gw1", 0, "new device")
        await sleep(0.05)  # the answer from Redis
    # Each hub lets the fourth through before it hears the budget is spent, then refuses gw1.
    for limit in (two, one):
        limit.check("gw1", 0, "new device")
        await sleep(0.05)
        with pytest.raises(Rejected, match="more than 3 new a minute") as caught:
            limit.check("gw1", 0, "new device")
        assert caught.value.source == "gw1"
    one.check("gw2", 0, "new device")  # another source has its own budget
    # Per hub, gw1 would have had three on each.
    await sleep(0.05)
    for limit in (one, two):
        with pytest.raises(Rejected):
            limit.check("gw1", 0, "new device")


@pytest_twisted.ensureDeferred
async def test_one_hub_holds_a_lease_and_another_takes_it_over_when_it_dies(nodes: list[Cluster]) -> None:
    one, two = (RedisLease(node.link, node.node, "test", reactor, ttl=1.0) for node in nodes)
    one.start()
    await wait_for(lambda: one.held)
    two.start()
    await sleep(1.5)  # longer than the lease: renewed by its holder, never taken by the other
    assert one.held and not two.held
    # The holder dies (stops renewing, gives nothing up): the other takes over once the lease expired.
    one._loop.stop()
    died = reactor.seconds()
    await wait_for(lambda: two.held)
    assert reactor.seconds() - died < 1.0 + 0.34 + 0.5  # expired, then the other's next try
    assert not one.held  # and the dead one no longer believes it leads
    # Given up on a clean stop: taken by the other at its next try.
    three = RedisLease(nodes[0].link, "hub-3", "test", reactor, ttl=1.0)
    three.start()
    await two.stop()
    await wait_for(lambda: three.held, timeout=0.5)  # its next try, well before the lease would expire
    await three.stop()


# -- alerts: evaluated by one hub from the shared database


async def alerting_hub(tmp: Path, database: str, redis: str, node: str,
                       check_interval: str = "200ms") -> tuple[Hub, AlertService, list[Event]]:
    """A hub of the cluster with the alerts running (every `check_interval`) and the alert events it published."""
    hub = await clustered_hub(tmp, database, redis, node, ["devices"], alerts={"check_interval": check_interval})
    fired: list[Event] = []
    hub.bus.subscribe(lambda e: fired.append(e) if e.family == "alerts" else None)
    service = AlertService(hub)
    service.startService()
    await service.when_ready()
    return hub, service, fired


def _heard(device: str) -> Event:
    return Event("devices", "up", f"dev/device/{device}/up", {"deviceId": device, "value": 1})


@pytest_twisted.ensureDeferred
async def test_alerts_fire_once_from_one_hub_on_what_every_hub_heard_and_move_when_it_dies(
        tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 1.5)
    _reset_pg_schema(postgres_url)
    hubs = [await alerting_hub(tmp_path / node, postgres_url, redis_url, node) for node in ("hub-1", "hub-2")]
    try:
        await wait_for(lambda: any(service.lease.held for _, service, _ in hubs))
        await sleep(0.3)
        leader, follower = sorted(hubs, key=lambda h: not h[1].lease.held)
        assert leader[1].lease.held and not follower[1].lease.held
        # A rule made on the hub that does not evaluate: the leader reads it from the database.
        await follower[1].add_rule({"name": "silent", "family": "devices", "kind": "device", "condition": "offline",
                                    "after": 2}, "tests")
        # Device001 talks to the leader, Device002 to the other hub: neither is silent for the cluster.
        for _ in range(12):
            await leader[0].bus.publish(_heard("Device001"))
            await follower[0].bus.publish(_heard("Device002"))
            await sleep(0.2)
        assert leader[2] == [] == follower[2]
        # Device002 goes quiet: one offline alert in the whole cluster, from the leader.
        for _ in range(22):
            await leader[0].bus.publish(_heard("Device001"))
            await sleep(0.2)
        assert [(e.topic, e.payload["state"]) for e in leader[2]] == [
            ("alerts/devices/device/Device002/offline", "firing")]
        assert follower[2] == []
        # The leader dies (no more renewals, no more rounds): the other hub takes the lease over and
        # resolves the alert it never fired when Device002 is back, once; Device001's silence fires there.
        leader[1].lease._loop.stop()
        leader[1]._loop.stop()
        await wait_for(lambda: follower[1].lease.held, timeout=4)
        await follower[0].bus.publish(_heard("Device002"))
        await wait_for(lambda: len(follower[2]) >= 1, timeout=4)
        for _ in range(18):
            await follower[0].bus.publish(_heard("Device002"))
            await sleep(0.2)
        assert sorted((e.topic, e.payload["state"]) for e in follower[2]) == [
            ("alerts/devices/device/Device001/offline", "firing"),
            ("alerts/devices/device/Device002/offline", "resolved")]
        assert len(leader[2]) == 1
        history, total = await follower[1].history(10, 0)
        assert total == 3
    finally:
        for hub, service, _ in hubs:
            await stop_hub(hub, service)


# -- webhooks: each event delivered once, by the hub that handled it


async def _webhook_hub(tmp: Path, database: str, redis: str, node: str) -> tuple[Hub, WebhookService, list[Event]]:
    # Every hub of a cluster signs with the same key file, in the keys_dir they share (docs/cluster.md).
    hub = await clustered_hub(tmp, database, redis, node, ["devices"], keys_dir=str(tmp.parent / "shared"),
                              webhooks={"retry_min": "100ms", "retry_max": "200ms", "timeout": "2s"})
    hub.config.data_dir.mkdir(parents=True, exist_ok=True)  # where a secret must not be written
    streamed: list[Event] = []
    hub.cluster.relay_events(hub.bus, streamed.append)  # as the live stream does
    service = WebhookService(hub)
    service.sync_interval = 0.1
    service.startService()
    await service.when_ready()
    return hub, service, streamed


@pytest_twisted.ensureDeferred
async def test_the_leaders_transitions_of_one_alert_are_stored_fenced_in_the_order_decided(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    _reset_pg_schema(postgres_url)
    # Checked seldom: the test's events decide the transitions, not a round.
    hub, service, fired = await alerting_hub(tmp_path / "hub-1", postgres_url, redis_url, "hub-1",
                                             check_interval="60s")
    try:
        await wait_for(lambda: service.lease.held, "the only hub holds the alerts lease")
        await transitions_stored_in_decided_order(service, fired)
        kept = await hub.store.fetchone("SELECT COUNT(*) FROM lease_events")
        assert kept == (0,)  # every transition's event was kept with it and announced
    finally:
        await stop_hub(hub, service)


@pytest_twisted.ensureDeferred
async def test_each_event_is_delivered_once_by_the_hub_that_handled_it_and_hubs_share_the_webhooks(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    _reset_pg_schema(postgres_url)
    one, two = [await _webhook_hub(tmp_path / node, postgres_url, redis_url, node) for node in ("hub-1", "hub-2")]
    port = free_port()
    receiver = Receiver()
    listening: Any = None
    try:
        hook, secret = await one[1].add({"name": "crm", "url": f"http://127.0.0.1:{port}/hook",
                                         "families": ["devices"]}, "tests")
        assert (tmp_path / "shared" / "webhook-keys.secret").exists()  # keys_dir, not data_dir
        assert not (one[0].config.data_dir / "webhook-keys.secret").exists()
        await wait_for(lambda: hook.id in two[1].hooks, what="hub-2 has the webhook")  # made on hub-1
        # Each hub's stream hears the other (its subscription is in place): a family no webhook wants.
        for hub, stream in ((one[0], two[2]), (two[0], one[2])):
            while not stream:
                await hub.bus.publish(Event("ble", "up", "ble/node/112233445566/up", {}))
                await sleep(0.05)
            stream.clear()
        # The receiver is away: each hub keeps the event it handled, under its own node name.
        await one[0].bus.publish(_heard("Device001"))
        await two[0].bus.publish(_heard("Device002"))
        await wait_for(lambda: len(one[2]) == 1 and len(two[2]) == 1, what="relayed")  # each has the other's
        rows = await one[0].store.fetchall("SELECT node, event FROM webhook_queue ORDER BY node")
        assert [tuple(r) for r in rows] == [("hub-1", "devices.up"), ("hub-2", "devices.up")]
        # Each hub has tried its own event and failed (the receiver is away) before the receiver comes up.
        await wait_for(lambda: one[1].hooks[hook.id].failures >= 1 and two[1].hooks[hook.id].failures >= 1,
                       what="a failed try on each hub")
        # The receiver comes up: two events, two deliveries (a relayed one is not queued again).
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(server.Site(receiver))
        await wait_for(lambda: len(receiver.received) >= 2, what="two deliveries")
        await sleep(0.5)
        devices = sorted(json.loads(body)["payload"]["deviceId"] for _, body in receiver.received)
        assert devices == ["Device001", "Device002"]
        for headers, body in receiver.received:
            assert headers["x-bsscihub-signature-256"] == sign(secret.encode(), body)
        # Both hubs' deliveries add up in the webhook's row; each hub's list shows them.
        await wait_for(lambda: one[1].hooks[hook.id].delivered == 2 == two[1].hooks[hook.id].delivered,
                       what="counters")
        assert await one[0].store.fetchone("SELECT delivered, failures > 0 FROM webhooks") in ((2, True), (2, 1))
        assert await one[0].store.fetchone("SELECT COUNT(*) FROM webhook_queue") in ((0,), [0])
        # Deleted on hub-2: hub-1 stops delivering.
        assert await two[1].delete(hook.id)
        await wait_for(lambda: hook.id not in one[1].hooks, what="deleted on hub-1")
        await one[0].bus.publish(_heard("Device001"))
        await sleep(0.3)
        assert len(receiver.received) == 2
    finally:
        for hub, service, _ in (one, two):
            await stop_hub(hub, service)
        if listening is not None:
            await listening.stopListening()


# -- the web app's log-in limit over two hubs, end to end


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_sent_to_two_hubs_add_up_to_one_limit(
        tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_hashing(monkeypatch)
    _reset_pg_schema(postgres_url)
    harnesses: list[Harness] = []
    try:
        for node in ("hub-1", "hub-2"):
            hub = await clustered_hub(tmp_path / node, postgres_url, redis_url, node, [])
            harnesses.append(Harness(hub, WebApp(hub, clock=Clock()), Clock()))
        await harnesses[0].hub.cluster.link.redis.flushdb()
        await users.add_user(harnesses[0].hub.store, "admin", "admin", PASSWORD)
        body = {"username": "admin", "password": "wrong-wrong"}
        # Five wrong passwords a quarter of an hour from one address (README), over both hubs.
        for h in (*harnesses, *harnesses, harnesses[0]):
            assert (await h.request("POST", "/api/v1/auth/token", json_body=body)).code == 401
        for h in harnesses:
            reply = await h.request("POST", "/api/v1/auth/token", json_body={**body, "password": PASSWORD})
            assert reply.code == 429 and int(reply.header("Retry-After") or 0) > 0
    finally:
        for h in harnesses:
            h.web.stop()
            await stop_hub(h.hub)
