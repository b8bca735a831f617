"""The cluster parts on a real Redis (a private redis-server): station ownership across hubs, newest
claim wins, and station commands routed to the hub that holds the station, with its answer or error."""

from __future__ import annotations

import json
import uuid
from collections import namedtuple
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater

from bsscihub.bus import Event
from bsscihub.cluster import FIRST, Cluster
from bsscihub.cluster_redis import RedisDedup, parse_redis_url, redis_cluster
from bsscihub.errors import CommandError
from tests.cluster import MiotyHubs, mioty_hubs, nodes
from tests.helpers import until as wait_for
from tests.redis_server import redis_url
from tests.test_mioty_service import EP, A, B, Running, pki

__all__ = ["mioty_hubs", "nodes", "pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

BS = A


Copy = namedtuple("Copy", "bs_eui received")
CODEC = (lambda c: json.dumps(list(c)), lambda text: Copy(*json.loads(text)))


@attrs.define
class DedupNodes:
    """Shared dedup stores of hubs on one Redis, each on a link of its own; what they publish and find late is
    recorded with their node."""

    redis: str
    emitted: list[tuple[str, list[str]]] = attrs.Factory(list)
    late: list[tuple[str, str]] = attrs.Factory(list)
    clusters: list[Cluster] = attrs.Factory(list)

    async def store(self, node: str, clock: IReactorTime = reactor, window: float = 0.3) -> RedisDedup:
        cluster = redis_cluster(node, self.redis, reactor)
        await cluster.start()
        self.clusters.append(cluster)
        return RedisDedup(cluster.link, node, clock, window, 100,
                          lambda key, copies, first: self.emitted.append((node, [c.bs_eui for c in copies])),
                          lambda key, copy: self.late.append((node, copy.bs_eui)), CODEC)


@pytest_twisted.async_yield_fixture
async def dedup(redis_url: str) -> AsyncIterator[DedupNodes]:
    nodes = DedupNodes(redis_url)
    yield nodes
    for cluster in nodes.clusters:
        await cluster.stop()


def test_redis_urls_are_checked() -> None:
    assert parse_redis_url("redis://:secret@redis.example:6380/2") == ("redis.example", 6380, 2, "secret")
    assert parse_redis_url("redis://127.0.0.1") == ("127.0.0.1", 6379, None, None)
    for bad in ("http://host", "redis://", "redis://host/x"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@pytest_twisted.ensureDeferred
async def test_the_newest_claim_wins_on_every_hub(nodes: list[Cluster]) -> None:
    one, two = nodes
    lost: list[tuple[str, str]] = []
    one.ownership.claim("mioty", BS, lambda node: lost.append(("hub-1", node)))
    await wait_for(lambda: two.ownership.owner("mioty", BS) == "hub-1")
    two.ownership.claim("mioty", BS, lambda node: lost.append(("hub-2", node)))
    # hub-1 gives the station up to hub-2, and both say hub-2 holds it.
    await wait_for(lambda: lost == [("hub-1", "hub-2")])
    assert one.ownership.owner("mioty", BS) == "hub-2" == two.ownership.owner("mioty", BS)
    # hub-1's late release does not undo hub-2's claim.
    one.ownership.release("mioty", BS)
    await deferLater(reactor, 0.1, lambda: None)
    assert one.ownership.owner("mioty", BS) == "hub-2"
    two.ownership.release("mioty", BS)
    await wait_for(lambda: one.ownership.owner("mioty", BS) is None)
    assert lost == [("hub-1", "hub-2")]


@pytest_twisted.ensureDeferred
async def test_a_hub_started_later_knows_the_owners(nodes: list[Cluster], redis_url: str) -> None:
    nodes[0].ownership.claim("mioty", BS, lambda node: None)
    await wait_for(lambda: nodes[1].ownership.owner("mioty", BS) == "hub-1")
    late = redis_cluster("hub-3", redis_url, reactor)
    await late.start()
    try:
        assert late.ownership.owner("mioty", BS) == "hub-1"
    finally:
        await late.stop()


@pytest_twisted.ensureDeferred
async def test_a_station_command_runs_on_the_hub_that_holds_the_station(nodes: list[Cluster]) -> None:
    one, two = nodes
    ran: list[tuple[str, str, str, Any]] = []

    def handler(node: str) -> Any:
        async def handle(station: str, name: str, args: Any) -> Any:
            ran.append((node, station, name, args))
            if name == "fail":
                raise CommandError(f"base station {station} is not connected")
            return {"bsEui": station, "on": node}

        return handle

    one.router.register("mioty", handler("hub-1"))
    two.router.register("mioty", handler("hub-2"))
    two.ownership.claim("mioty", BS, lambda node: None)
    await wait_for(lambda: one.ownership.owner("mioty", BS) == "hub-2")
    assert await one.router.route("mioty", BS, "poll_status", None) == {"bsEui": BS, "on": "hub-2"}
    assert ran == [("hub-2", BS, "poll_status", None)]
    # The owner's error comes back with its reason.
    with pytest.raises(CommandError, match="is not connected"):
        await one.router.route("mioty", BS, "fail", "why")
    # A station nobody holds is answered here.
    assert await one.router.route("mioty", "00000000000000bb", "poll_status", None) == {
        "bsEui": "00000000000000bb", "on": "hub-1"}


@pytest_twisted.ensureDeferred
async def test_a_command_for_a_hub_that_is_gone_is_answered_here(nodes: list[Cluster], redis_url: str) -> None:
    one = nodes[0]

    async def here(station: str, name: str, args: Any) -> str:
        return "answered on hub-1"

    one.router.register("mioty", here)
    gone = redis_cluster("hub-9", redis_url, reactor)
    await gone.start()
    gone.ownership.claim("mioty", BS, lambda node: None)
    await wait_for(lambda: one.ownership.owner("mioty", BS) == "hub-9")
    await gone.stop()  # as if killed: its claim stays in Redis, nobody listens on its channel
    assert await one.router.route("mioty", BS, "poll_status", None) == "answered on hub-1"


async def all_marked_published(running: Running) -> None:
    """Every stored copy of an uplink is marked published, whichever hub stored it (soon: the marks are written
    after the publish)."""

    async def none_left() -> bool:
        return await running.service.registry.unpublished() == []

    await wait_for(none_left, "every stored uplink marked published")


@pytest_twisted.ensureDeferred
async def test_two_hubs_share_their_stations_over_redis_and_postgresql(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    first = await one.station("bs-a", A)
    await wait_for(lambda: two.hub.cluster.ownership.owner("mioty", A) == "hub-1")
    # Asked on hub-2, answered by the station on hub-1.
    polls = len([m for m in first.seen if m["command"] == "status"])
    status = await two.service.poll_status(A)
    assert status["bsEui"] == A and status["code"] == 0
    assert len([m for m in first.seen if m["command"] == "status"]) > polls
    # The station connects to hub-2 now: newest wins, hub-1 closes its older connection.
    second = await two.station("bs-a", A)
    await first.lost
    await wait_for(lambda: A not in one.service.sessions)
    assert one.hub.cluster.ownership.owner("mioty", A) == "hub-2" == two.hub.cluster.ownership.owner("mioty", A)
    assert A in two.service.sessions and not second.lost.called
    # A revocation on hub-1 closes the connection held by hub-2.
    await one.service.revoke_base_station(A, "stolen", actor="test")
    await second.lost
    await wait_for(lambda: A not in two.service.sessions)


@pytest_twisted.ensureDeferred
async def test_copies_of_one_uplink_on_two_hubs_are_published_once_with_both_receivers(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    a = await one.station("bs-a", A)
    b = await two.station("bs-b", B)
    for cnt in (1, 2, 3):
        # A hears it first on hub-1 (it collects), B's copy on hub-2 is forwarded to it.
        op_a = a.uplink(cnt=cnt, snr=3.0)
        assert (await a.expect("ulDataRsp"))["opId"] == op_a
        op_b = b.uplink(cnt=cnt, snr=9.0)
        assert (await b.expect("ulDataRsp"))["opId"] == op_b
    await wait_for(lambda: len(one.of("uplink")) + len(two.of("uplink")) >= 3)
    await deferLater(reactor, 0.5, lambda: None)
    events = one.of("uplink") + two.of("uplink")
    assert sorted(e.payload["packetCnt"] for e in events) == [1, 2, 3]
    for event in events:
        assert [r["bsEui"] for r in event.payload["receivers"]] == [B, A]
    # Every stored copy is marked published, whichever hub stored it.
    await all_marked_published(one)
    # A late copy on hub-2, after the uplink went out: dropped there, not published again.
    op_c = b.uplink(cnt=1, snr=1.0)
    assert (await b.expect("ulDataRsp"))["opId"] == op_c
    await wait_for(lambda: two.service.counters.late + one.service.counters.late >= 1)
    assert len(one.of("uplink") + two.of("uplink")) == 3


@pytest_twisted.ensureDeferred
async def test_an_uplink_its_collector_never_published_is_adopted_by_one_hub(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    # As a hub that died inside the window leaves it: stored (acknowledged), never published.
    stale = reactor.seconds() - 30
    await one.service.registry.add_uplink(
        (EP, 7, A, stale, 1_700_000_000_000_000_007, None, 4.0, -90.0, None, None, None, None, b"\x01\x02", 0,
         1, 0, 0))  # fmt: skip
    adopted = await defer.gatherResults([
        defer.ensureDeferred(one.service.uplinks.adopt_orphans()),
        defer.ensureDeferred(two.service.uplinks.adopt_orphans()),
    ])
    assert sorted(adopted) == [0, 1]
    await wait_for(lambda: len(one.of("uplink") + two.of("uplink")) == 1)
    [event] = one.of("uplink") + two.of("uplink")
    assert event.payload["packetCnt"] == 7 and event.payload["receivers"][0]["bsEui"] == A
    await all_marked_published(one)


@pytest_twisted.ensureDeferred
async def test_an_uplink_whose_live_collector_has_not_marked_it_yet_is_not_adopted(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    # hub-1 collects and publishes the uplink; its published mark lags (a busy database), as under load.
    one.service.registry.mark_published = lambda ep, packet_cnt: None  # type: ignore[method-assign]
    a = await one.station("bs-a", A)
    op = a.uplink(cnt=5)
    assert (await a.expect("ulDataRsp"))["opId"] == op
    await wait_for(lambda: len(one.of("uplink")) == 1)
    await deferLater(reactor, 0.3, lambda: None)  # older than the window: a candidate for the sweep
    assert len(await two.service.registry.unpublished()) == 1
    # Its collector runs: no hub publishes it again, hub-1 itself neither.
    for _ in range(2):
        assert await two.service.uplinks.adopt_orphans(grace=0) == 0
        assert await one.service.uplinks.adopt_orphans(grace=0) == 0
    assert len(one.of("uplink")) == 1 and two.of("uplink") == []
    # hub-1 goes away before its mark was written: now hub-2 publishes it (at least once after a crash).
    await mioty_hubs.stop(one)
    await two.service.uplinks.adopt_orphans(grace=0)  # or hub-2's own sweep, if the test ran slow
    await wait_for(lambda: len(two.of("uplink")) == 1)
    await deferLater(reactor, 0.3, lambda: None)
    assert [e.payload["packetCnt"] for e in two.of("uplink")] == [5]
    assert two.service.counters.replayed == 1


@pytest_twisted.ensureDeferred
async def test_a_window_that_closes_before_redis_answered_waits_for_the_answer(dedup: DedupNodes) -> None:
    busy = Clock()  # hub-2's timers: it runs them before it reads Redis's answer, as a loaded hub does
    one, two = await dedup.store("hub-1"), await dedup.store("hub-2", busy)
    key = (f"{uuid.uuid4().hex[:16]}", 3)
    one.add(key, Copy(A, reactor.seconds()))
    await wait_for(lambda: one._open[one._name(key)].mode == "collect")
    two.add(key, Copy(B, reactor.seconds()))
    busy.advance(0.3)  # hub-2's window is up before Redis said who collects
    assert dedup.emitted == []
    # Redis says hub-1 collects: hub-2 leaves it, hub-1 publishes both copies once.
    await wait_for(lambda: dedup.emitted == [("hub-1", [A, B])])
    await deferLater(reactor, 0.2, lambda: None)
    assert dedup.emitted == [("hub-1", [A, B])] and two.pending == 0 and one.pending == 0


@pytest_twisted.ensureDeferred
async def test_without_redis_a_window_is_published_by_the_hub_that_heard_it(dedup: DedupNodes) -> None:
    clock = Clock()
    store = await dedup.store("hub-1", clock)
    await store.link.redis.disconnect()  # Redis gone: the question fails
    store.add((f"{uuid.uuid4().hex[:16]}", 1), Copy(A, 0.0))
    await deferLater(reactor, 0.05, lambda: None)
    assert dedup.emitted == []  # still inside its window
    clock.advance(0.3)
    assert dedup.emitted == [("hub-1", [A])] and store.pending == 0


@pytest_twisted.ensureDeferred
async def test_a_copy_forwarded_after_the_collector_closed_is_late(dedup: DedupNodes) -> None:
    slow = Clock()  # hub-2's window is still open when hub-1 has published
    one, two = await dedup.store("hub-1"), await dedup.store("hub-2", slow)
    key = (f"{uuid.uuid4().hex[:16]}", 4)
    one.add(key, Copy(A, reactor.seconds()))
    await wait_for(lambda: one._open[one._name(key)].mode == "collect")
    two.add(key, Copy(B, reactor.seconds()))
    await wait_for(lambda: two._open[two._name(key)].mode == "forward")
    await wait_for(lambda: dedup.emitted == [("hub-1", [A, B])])
    # Another station's copy reaches hub-2 after hub-1 published: late (marked with the uplink),
    # not pushed to a list nobody reads and left for the orphan sweep to publish again.
    two.add(key, Copy("00000000000000cc", reactor.seconds()))
    await wait_for(lambda: dedup.late == [("hub-2", "00000000000000cc")])
    assert dedup.emitted == [("hub-1", [A, B])]
    assert not await one.link.redis.exists(f"bsscihub:dedup:{one._name(key)}:copies")


@pytest_twisted.ensureDeferred
async def test_the_live_stream_of_each_hub_gets_the_events_of_the_others(nodes: list[Cluster]) -> None:
    from bsscihub.bus import EventBus

    one, two = nodes
    buses = [EventBus(), EventBus()]
    seen: list[list[Event]] = [[], []]
    stops = [cluster.relay_events(bus, into.append) for cluster, bus, into in zip(nodes, buses, seen, strict=True)]
    await buses[0].publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", {"packetCnt": 1, "data": "01"}))
    await buses[1].publish(Event("ble", "reading", "ble/node/aa/reading", {"rssi": None}, retain=True))
    await wait_for(lambda: len(seen[0]) == 1 and len(seen[1]) == 1)
    await deferLater(reactor, 0.1, lambda: None)
    # Each hub's sink gets the other's event once (its own comes from its own bus, not through Redis).
    assert seen[1] == [Event("mioty", "uplink", f"mioty/ep/{EP}/up", {"packetCnt": 1, "data": "01"})]
    assert seen[0] == [Event("ble", "reading", "ble/node/aa/reading", {"rssi": None}, retain=True)]
    for stop in stops:
        stop()
    await buses[0].publish(Event("mioty", "uplink", f"mioty/ep/{EP}/up", {"packetCnt": 2}))
    await deferLater(reactor, 0.2, lambda: None)
    assert len(seen[1]) == 1


@pytest_twisted.ensureDeferred
async def test_a_hub_stopping_inside_a_window_publishes_once_and_later_copies_are_late(dedup: DedupNodes) -> None:
    stores = [await dedup.store(node, window=0.5) for node in ("hub-1", "hub-2", "hub-3")]
    key = (f"{uuid.uuid4().hex[:16]}", 9)
    assert stores[0].add(key, Copy(A, reactor.seconds())) == FIRST
    await wait_for(lambda: stores[0]._open[stores[0]._name(key)].mode == "collect")
    stores[1].add(key, Copy(B, reactor.seconds()))
    await wait_for(lambda: stores[1]._open[stores[1]._name(key)].mode == "forward")
    stores[0].flush()  # hub-1 stops inside the window
    assert dedup.emitted == [("hub-1", [A])]
    await deferLater(reactor, 0.7, lambda: None)  # hub-2's window closes: it forwarded, it does not publish
    assert dedup.emitted == [("hub-1", [A])]
    stores[2].add(key, Copy("00000000000000cc", reactor.seconds()))
    await wait_for(lambda: dedup.late == [("hub-3", "00000000000000cc")])
    assert dedup.emitted == [("hub-1", [A])]


@pytest_twisted.ensureDeferred
async def test_a_command_for_one_hub_or_every_hub_and_who_is_alive(nodes: list[Cluster], redis_url: str) -> None:
    one, two = nodes
    three = redis_cluster("hub-3", redis_url, reactor)
    await three.start()
    ran: list[tuple[str, str, str, Any]] = []

    def handler(node: str) -> Any:
        async def handle(station: str, name: str, args: Any) -> Any:
            ran.append((node, station, name, args))
            if node == "hub-3" and name == "count":
                raise CommandError("hub-3 cannot count")
            return [node, args]

        return handle

    # A family of its own: a hub of an earlier test still disconnecting has no handler for it (left out).
    for cluster in (one, two, three):
        cluster.router.register("probe", handler(cluster.node))
    running = True
    try:
        # call: on the named hub, with no station.
        assert await one.router.call("hub-2", "probe", "which", 1) == ["hub-2", 1]
        assert await one.router.call("hub-1", "probe", "which", 2) == ["hub-1", 2]
        # broadcast: every other hub, each once; a hub's failure is left out of the results.
        assert sorted(await one.router.broadcast("probe", "which", 3)) == [["hub-2", 3], ["hub-3", 3]]
        assert await one.router.broadcast("probe", "count", 4) == [["hub-2", 4]]
        assert sorted(r for r in ran if r[3] == 3) == [("hub-2", "", "which", 3), ("hub-3", "", "which", 3)]
        assert await one.router.alive("hub-2") and await one.router.alive("hub-1")
        # A hub that is gone: not alive, left out of broadcasts, and a call to it runs here.
        await three.stop()
        running = False
        # Redis drops a closed connection's subscriptions as it reads the close, a moment after stop().

        async def hub_3_gone() -> bool:
            return not await one.router.alive("hub-3")

        await wait_for(hub_3_gone, what="hub-3 no longer alive", timeout=5)
        assert await one.router.broadcast("probe", "which", 5) == [["hub-2", 5]]
        assert await one.router.call("hub-3", "probe", "which", 6) == ["hub-1", 6]
    finally:
        if running:
            await three.stop()


@pytest_twisted.ensureDeferred
async def test_every_hub_hears_every_claim(nodes: list[Cluster]) -> None:
    one, two = nodes
    heard: list[tuple[str, str, str, str]] = []
    one.ownership.watch(lambda family, station, node: heard.append(("hub-1", family, station, node)))
    two.ownership.watch(lambda family, station, node: heard.append(("hub-2", family, station, node)))
    two.ownership.claim("mioty", BS, lambda node: None)
    await wait_for(lambda: len(heard) == 2)
    assert sorted(heard) == [("hub-1", "mioty", BS, "hub-2"), ("hub-2", "mioty", BS, "hub-2")]
