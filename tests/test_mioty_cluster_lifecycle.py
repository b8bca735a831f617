"""Two mioty hubs in one process on a real Redis and PostgreSQL: a silent sensor is warned about and
auto-detached once for the cluster (by the `mioty` lease holder, taken over when it dies), a
`sensors import` made while both run is reported once while both hubs' stations get the attPrp, and a
removal on one hub is reported once, by that hub."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from bsscihub import cluster_redis
from bsscihub.protocols.bssci.registry import attach_change
from tests.cluster import MiotyHubs, mioty_hubs
from tests.redis_server import redis_url
from tests.test_mioty_service import EP, KEY, A, B, Running, Station, heard, imported_elsewhere, pki, wait_for

__all__ = ["mioty_hubs", "pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

HOUR = 3600.0


async def _two_hubs(mioty_hubs: MiotyHubs) -> tuple[Running, Running]:
    """Both hubs, the lease holder first."""
    one, two = await mioty_hubs.two()
    await wait_for(lambda: one.service.lease.held != two.service.lease.held)
    return (one, two) if one.service.lease.held else (two, one)


async def _stations_with_ep(leader: Running, other: Running, attached_on: Running) -> tuple[Station, Station]:
    """bs-a on the leader, bs-b on the other hub, and EP attached on `attached_on`: both stations got its attPrp."""
    a = await leader.station("bs-a", A)
    b = await other.station("bs-b", B)
    await attached_on.service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    await a.expect("attPrp")
    await b.expect("attPrp")
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_silent_sensor_is_warned_about_and_detached_once_and_a_new_leader_takes_over(
    mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_redis, "LEASE_TTL", 1.5)
    leader, other = await _two_hubs(mioty_hubs)
    hubs = (leader, other)
    a, b = await _stations_with_ep(leader, other, attached_on=leader)
    # Only the other hub hears the end point (and writes it back); the leader's memory says it
    # heard nothing for 40 h: it reads what the other wrote before judging, so nothing is silent.
    await heard(other, b, cnt=301)
    await other.service.registry.flush_state()
    long_ago = reactor.seconds() - 40 * HOUR
    leader.service.started_at = leader.service.registry.sensors[EP].last_seen = long_ago
    for running in hubs:
        await running.service.check_lifecycle()
    assert not [e for r in hubs for e in r.events if e.kind in ("inactivity_warning", "auto_detach")]
    assert leader.service.registry.sensors[EP].last_seen > long_ago

    # 37 h of silence (warning at 36 h): both hubs look, one warning in the cluster, from the leader.
    for running in hubs:
        await running.service.check_lifecycle(reactor.seconds() + 37 * HOUR)
    assert [len(r.of("inactivity_warning")) for r in hubs] == [1, 0]
    assert leader.of("inactivity_warning")[0].payload["epEui"] == EP

    # The leader dies (no more renewals): the other hub holds the lease within its 1.5 s.
    leader.service.lease._loop.stop()
    await wait_for(lambda: other.service.lease.held, timeout=4)
    assert not leader.service.lease.held
    # The new leader knows that silence was warned about already: no second warning.
    for running in hubs:
        await running.service.check_lifecycle(reactor.seconds() + 38 * HOUR)
    assert [len(r.of("inactivity_warning")) for r in hubs] == [1, 0]

    # 73 h (auto-detach at 72 h): one auto_detach in the cluster, from the new leader; both hubs'
    # stations get the detPrp, and neither hub reports it again as an outside change.
    for running in hubs:
        await running.service.check_lifecycle(reactor.seconds() + 73 * HOUR)
    assert [len(r.of("auto_detach")) for r in hubs] == [0, 1]
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)
    assert (await b.expect("detPrp"))["epEui"] == int(EP, 16)
    for running in hubs:
        await running.service.sync()
        await running.service.check_lifecycle(reactor.seconds() + 74 * HOUR)
    assert not [e for r in hubs for e in r.of("detach")]
    assert [len(r.of("auto_detach")) for r in hubs] == [0, 1]
    assert not leader.service.registry.sensors[EP].attached


@pytest_twisted.ensureDeferred
async def test_a_sensors_import_while_two_hubs_run_is_reported_once_and_reaches_every_station(
    mioty_hubs: MiotyHubs
) -> None:

    leader, other = await _two_hubs(mioty_hubs)
    hubs = (leader, other)
    a = await leader.station("bs-a", A)
    b = await other.station("bs-b", B)
    # `bsscihub sensors import` in another process: same database, no hub of the cluster.
    second = "0011223344556678"
    doc = [{"eui": EP, "nwKey": KEY.hex(), "shortAddr": "0042", "bidi": False},
           {"eui": second, "nwKey": KEY.hex(), "shortAddr": "0043", "bidi": True}]
    assert (await imported_elsewhere(leader, doc))["created"] == 2
    for running in hubs:
        await running.service.sync()  # what each hub's flush_interval timer runs
    for station in (a, b):
        got = sorted([(await station.expect("attPrp"))["epEui"], (await station.expect("attPrp"))["epEui"]])
        assert got == sorted([int(EP, 16), int(second, 16)])
    attaches = [e for r in hubs for e in r.of("attach")]
    assert sorted(e.payload["epEui"] for e in attaches) == sorted([EP, second])
    assert {e.payload["source"] for e in attaches} == {"external"} and other.of("attach") == []
    # Later syncs see nothing new.
    for running in hubs:
        await running.service.sync()
    assert len([e for r in hubs for e in r.of("attach")]) == 2

    # Changed on the other hub, read by the leader's sync before that hub's broadcast reaches it:
    # the leader propagates it to its stations and leaves the report to the hub that made it.
    await other.service.registry.save_sensors({EP: attach_change(EP, KEY, 0x44, False, reactor.seconds())})
    await leader.service.sync()
    prp = await a.expect("attPrp")
    assert (prp["epEui"], prp["shAddr"]) == (int(EP, 16), 0x44)
    assert len([e for r in hubs for e in r.of("attach")]) == 2


@pytest_twisted.ensureDeferred
async def test_a_sensor_removed_on_one_hub_is_reported_once_though_the_leaders_sync_reads_it_first(
    mioty_hubs: MiotyHubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader, other = await _two_hubs(mioty_hubs)
    hubs = (leader, other)
    a, b = await _stations_with_ep(leader, other, attached_on=other)
    # The leader's sync (every flush_interval) reads the registry between the removal's write and the
    # removing hub's broadcast: made certain here by letting the broadcast wait for that sync.
    broadcast = other.service._propagate_everywhere

    async def leader_syncs_first(attach: bool, ep: str) -> list[str]:
        await leader.service.sync()
        return await broadcast(attach, ep)

    monkeypatch.setattr(other.service, "_propagate_everywhere", leader_syncs_first)
    answer = await other.service.remove_sensor(EP, actor="test")
    assert answer["removed"] is True
    assert (await a.expect("detPrp"))["epEui"] == int(EP, 16)  # the leader's station is detached all the same
    assert (await b.expect("detPrp"))["epEui"] == int(EP, 16)
    for running in hubs:
        await running.service.sync()
    detaches = [(r is other, e.payload["source"], e.payload["removed"]) for r in hubs for e in r.of("detach")]
    assert detaches == [(True, "api", True)], "one detach event, from the hub that removed the sensor"
    assert EP not in leader.service.registry.sensors
