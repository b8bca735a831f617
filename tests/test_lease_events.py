"""A lease holder's events are at-least-once for the cluster, on a real Redis and PostgreSQL: an alert transition, an
inactivity warning or an auto-detach its holder stored and died before publishing goes out once from the next holder."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock

from bsscihub import cluster_redis
from bsscihub.bus import Event, EventBus
from bsscihub.cluster import ANNOUNCE_GRACE, LeaseEvents, LocalLease
from bsscihub.hub import Hub
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from tests.cluster import MiotyHubs, mioty_hubs, stop_hub
from tests.conftest import _reset_pg_schema
from tests.helpers import until
from tests.redis_server import redis_url
from tests.test_cluster_shared import alerting_hub
from tests.test_lease_fencing import _battery
from tests.test_mioty_cluster_lifecycle import HOUR, _stations_with_ep, _two_hubs
from tests.test_mioty_service import EP, KEY, A, B, imported_elsewhere, pki

__all__ = ["mioty_hubs", "pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

TAKEN_OVER = 60.0  # seconds for the other hub to take the lease (1.5 s) and announce after the grace (10 s), loaded


def dies_before_publishing(hub: Hub, kind: str) -> list[Event]:
    """From now on `hub` stores its `kind` events and never gets them out (as if it died right after the commit);
    returns the events it tried to publish."""
    attempted: list[Event] = []
    publish = hub.bus.publish

    def publish_or_die(event: Event) -> defer.Deferred[None]:
        if event.kind != kind:
            return publish(event)
        attempted.append(event)
        return defer.fail(ConnectionLost("the hub died before publishing"))

    hub.bus.publish = publish_or_die  # type: ignore[method-assign]
    return attempted


async def _kept(hub: Hub) -> int:
    row = await hub.store.fetchone("SELECT COUNT(*) FROM lease_events")
    assert row is not None
    return int(row[0])


async def _none_kept(hub: Hub) -> bool:
    return await _kept(hub) == 0


@pytest_twisted.ensureDeferred
async def test_a_kept_event_is_announced_by_the_holder_after_the_grace_and_once_and_never_while_under_way(
        store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    bus, clock, published = EventBus(), Clock(), []
    bus.subscribe(published.append)
    clock.advance(1000.0)
    dead = LeaseEvents(LocalLease("alerts"), store, EventBus(), clock)  # another hub: its bus gets nothing out
    lease = LocalLease("alerts")
    holder = LeaseEvents(lease, store, bus, clock)
    left = Event("alerts", "alert", "alerts/devices/device/D1/offline", {"id": "D1", "value": 1.5, "since": None})
    await store.interaction(dead.hold(left).keep)
    other = Event("mioty", "inactivity_warning", "mioty/ep/01/event/inactivity_warning", {"epEui": "01"})
    await store.interaction(LeaseEvents(LocalLease("mioty"), store, bus, clock).hold(other).keep)

    clock.advance(ANNOUNCE_GRACE - 0.5)
    assert await holder.announce_left() == 0  # its hub may still be announcing it
    lease.held = False
    clock.advance(1.0)
    assert await holder.announce_left() == 0  # not the holder
    lease.held = True
    assert await holder.announce_left() == 1
    assert published == [left]  # the other lease's event is its holder's to announce
    assert await holder.announce_left() == 0

    # The holder's own event, under way: never announced from the table meanwhile, however long it takes.
    mine = holder.hold(Event("alerts", "alert", "alerts/devices/device/D2/offline", {"id": "D2"}))
    await store.interaction(mine.keep)
    clock.advance(ANNOUNCE_GRACE * 3)
    assert await holder.announce_left() == 0
    await holder.announce(mine)
    assert published == [left, mine.event]
    assert await store.fetchall("SELECT lease FROM lease_events") == [("mioty",)]


@pytest_twisted.ensureDeferred
async def test_a_write_that_failed_though_it_committed_leaves_its_event_to_the_holders_round(store: Store) -> None:
    # The commit landed but its answer was lost (the connection broke): the event must not stay "under way" on
    # this hub for good, where the holder's round would never announce it.
    from bsscihub.cluster import Fence

    await store.migrate(CORE_MIGRATIONS)
    bus, clock, published = EventBus(), Clock(), []
    bus.subscribe(published.append)
    clock.advance(1000.0)
    lease = LocalLease("alerts")
    holder = LeaseEvents(lease, store, bus, clock)
    held = holder.hold(Event("alerts", "alert", "alerts/devices/device/D3/offline", {"id": "D3"}))

    async def committed_then_lost(claim: Fence) -> None:
        await store.interaction(held.keep)
        raise ConnectionLost("the answer to the commit was lost")

    with pytest.raises(ConnectionLost):
        await holder.write([held], committed_then_lost, Fence(lease.name, lease.token))
    clock.advance(ANNOUNCE_GRACE + 1)
    assert await holder.announce_left() == 1
    assert published == [held.event]


@pytest_twisted.ensureDeferred
async def test_an_alert_its_holder_stored_and_did_not_publish_goes_out_once_from_the_next_holder(
        tmp_path: Path, postgres_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 1.5)
    _reset_pg_schema(postgres_url)
    hubs = []
    try:
        hubs.append(await alerting_hub(tmp_path / "hub-1", postgres_url, redis_url, "hub-1"))
        dying_hub, dying, dying_fired = hubs[0]
        await until(lambda: dying.lease.held, "hub-1 holds the alerts lease")
        await dying.add_rule({"name": "battery", "family": "devices", "kind": "device", "condition": "battery_below",
                              "threshold": 20}, "tests")
        hubs.append(await alerting_hub(tmp_path / "hub-2", postgres_url, redis_url, "hub-2"))
        heir_hub, heir, heir_fired = hubs[1]

        # Routine: the holder stores and publishes Device001's alert; nothing of it stays kept.
        await dying_hub.bus.publish(_battery("Device001", 10))
        await until(lambda: dying_fired, "hub-1's alert for Device001")
        await until(lambda: not dying._pending, "its transition settled")
        assert await _kept(dying_hub) == 0

        # Device002's transition is stored, and the holder dies before publishing it.
        attempted = dies_before_publishing(dying_hub, "alert")
        await dying_hub.bus.publish(_battery("Device002", 5))
        await until(lambda: attempted and not dying._pending, "hub-1's transition for Device002 stored")
        assert await dying_hub.store.fetchall("SELECT target, state FROM alert_history ORDER BY id") == [
            ("Device001", "firing"), ("Device002", "firing")]
        await stop_hub(dying_hub, dying)
        hubs.pop(0)

        # hub-2 takes the lease over and publishes that alert, as hub-1 would have, once.
        await until(lambda: heir_fired, "hub-2 publishes the alert hub-1 left", timeout=TAKEN_OVER)
        assert heir.lease.held
        [left] = attempted
        assert [(e.topic, e.payload) for e in heir_fired] == [(left.topic, left.payload)]
        assert left.topic == "alerts/devices/device/Device002/battery_low" and left.payload["state"] == "firing"
        await until(lambda: _none_kept(heir_hub), "hub-2 no longer keeps it")
        assert await heir.lease_events.announce_left() == 0

        # Its own transitions go out once, as before.
        await heir_hub.bus.publish(_battery("Device003", 5))
        await until(lambda: len(heir_fired) == 2, "hub-2's own alert")
        await until(lambda: not heir._pending, "its transition settled")
        assert await _kept(heir_hub) == 0
        assert [e.payload["id"] for e in heir_fired] == ["Device002", "Device003"]
        assert [e.payload["id"] for e in dying_fired] == ["Device001"]
    finally:
        for hub, service, _ in hubs:
            await stop_hub(hub, service)


@pytest.mark.parametrize(("kind", "silence"), [("inactivity_warning", 37 * HOUR), ("auto_detach", 73 * HOUR)])
@pytest_twisted.ensureDeferred
async def test_a_mioty_event_its_holder_stored_and_did_not_publish_goes_out_once_from_the_next_holder(
        mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch, kind: str, silence: float) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 1.5)
    leader, other = await _two_hubs(mioty_hubs)
    await _stations_with_ep(leader, other, attached_on=leader)
    if kind == "auto_detach":  # routine first: the warning at 36 h goes out once, from the holder
        await leader.service.check_lifecycle(reactor.seconds() + 37 * HOUR)
        await until(lambda: not leader.service._writes, "the warning announced")
        assert [len(r.of("inactivity_warning")) for r in (leader, other)] == [1, 0]
        assert await _kept(leader.hub) == 0

    attempted = dies_before_publishing(leader.hub, kind)
    await leader.service.check_lifecycle(reactor.seconds() + silence)
    await until(lambda: attempted and not leader.service._writes, f"the holder's {kind} stored")
    assert leader.of(kind) == []
    await mioty_hubs.stop(leader)

    await until(lambda: other.of(kind), f"the new holder publishes the {kind} the dead one left", timeout=TAKEN_OVER)
    [left] = attempted
    assert [(e.topic, e.payload) for e in other.of(kind)] == [(left.topic, left.payload)]
    assert left.payload["epEui"] == EP and left.payload["silentFor"] >= silence - 60
    await until(lambda: _none_kept(other.hub), "the new holder no longer keeps it")
    # Neither announced again nor judged again: the stored warning or detach stands.
    await other.service.sync()
    await other.service.check_lifecycle(reactor.seconds() + silence + HOUR)
    assert len(other.of(kind)) == 1
    assert len([e for e in other.events if e.kind in ("inactivity_warning", "auto_detach")]) == 1


@pytest_twisted.ensureDeferred
async def test_an_outside_change_its_holder_stored_a_report_of_and_did_not_publish_is_reported_once_by_the_next(
        mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 1.5)
    leader, other = await _two_hubs(mioty_hubs)
    a = await leader.station("bs-a", A)
    b = await other.station("bs-b", B)
    attempted = dies_before_publishing(leader.hub, "attach")
    # `bsscihub sensors import` in another process; the holder's sync reports it, and it dies before publishing.
    doc = [{"eui": EP, "nwKey": KEY.hex(), "shortAddr": "0042", "bidi": False}]
    assert (await imported_elsewhere(leader, doc))["created"] == 1
    await leader.service.sync()
    await until(lambda: attempted and not leader.service._writes, "the holder's report stored")
    assert (await a.expect("attPrp"))["epEui"] == int(EP, 16)
    await other.service.sync()  # its 5 s sync: it takes the change in and leaves the report to the holder
    assert (await b.expect("attPrp"))["epEui"] == int(EP, 16)
    assert other.of("attach") == []
    await mioty_hubs.stop(leader)

    await until(lambda: other.of("attach"), "the new holder reports the change", timeout=TAKEN_OVER)
    [left] = attempted
    assert [(e.topic, e.payload) for e in other.of("attach")] == [(left.topic, left.payload)]
    assert left.payload["source"] == "external"
    await until(lambda: _none_kept(other.hub), "the new holder no longer keeps it")
    await other.service.sync()
    assert len(other.of("attach")) == 1
