"""The seams a hub cluster replaces (dedup, shared windows, station ownership, command routing, rate limits, fenced
leader leases and their kept events), each one small interface; the local implementations here are one hub's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from bsscihub.bus import Event
from bsscihub.ratelimit import ILimiter, local_limiter

__all__ = [
    "FIRST",
    "LATE",
    "MERGED",
    "Cluster",
    "Fence",
    "ICommandRouter",
    "IDedupStore",
    "ILeaderLease",
    "IStationOwnership",
    "LeaseEvents",
    "IWindowStore",
    "LocalLease",
    "LocalOwnership",
    "LocalRouter",
    "NoRoute",
    "StaleLeader",
    "leader_write",
    "local_cluster",
    "parse_redis_url",
    "shared_windows",
]

# What a dedup store answers for one copy (the values mioty's Deduplicator has always used).
FIRST, MERGED, LATE = 0, 1, 2

StationHandler = Callable[[str, str, Any], Coroutine[Any, Any, Any]]
"""async handler(station, name, args) -> result: one family's station-bound command, run where the station is."""


class NoRoute(Exception):
    """A station-bound command found no hub to run it (no handler for the family)."""


class IDedupStore(Interface):
    """Collects the copies of one uplink for a window after the first, then emits them once.

    Built by `Cluster.make_dedup(clock, window, memory, emit)` (else the family's own, in memory);
    `emit(key, copies, first_received)` is called once per uplink, on the hub that publishes it.
    """

    pending = Attribute("Uplinks inside their window, not published yet (int).")
    remembered = Attribute("Published keys remembered to drop late copies (int).")

    def add(key: Any, copy: Any) -> int:
        """Take one stored copy; FIRST (opens a window), MERGED, or LATE (already published: dropped)."""

    def remember(key: Any, rx_time: int) -> None:
        """Mark a key as published (at start, from the stored uplink history)."""

    def sweep_due(now: float) -> None:
        """Emit the windows that have closed by `now` (called on every arriving copy)."""

    def flush() -> None:
        """Emit every open window now (the hub is stopping)."""

    def adopt(key: Any) -> defer.Deferred[bool]:
        """Whether this hub publishes an uplink stored but never published (its collecting hub died):
        True on exactly one hub of a cluster, and on none while the hub that collected it runs."""


class IWindowStore(Interface):
    """Collects the copies of one broadcast that several sources report (BLE gateways), across hubs:
    one hub collects each for a window from the first copy, the others hand it theirs; a source
    reporting again starts the next broadcast. Built by `shared_windows` (None for one hub).

    `emit(key, copies)` is called once per broadcast, on the hub collecting it, copies in arrival order."""

    pending = Attribute("Windows this hub collects, not emitted yet (int).")

    def add(key: str, source: str, copy: Any) -> None:
        """Take one copy of `key`'s current broadcast, reported by `source`."""

    def flush() -> defer.Deferred[None]:
        """Emit the windows this hub collects now (the hub is stopping); fires once they are emitted."""


class IStationOwnership(Interface):
    """Which hub holds each station's connection; the newest claim wins across the network."""

    node = Attribute("This hub's node name (str).")

    def claim(family: str, station: str, on_lost: Callable[[str], None]) -> None:
        """This hub holds `station`'s connection from now on. If another hub claims it later,
        `on_lost(node)` is called here with the newer hub's name (close the older connection)."""

    def release(family: str, station: str) -> None:
        """This hub no longer holds `station` (its connection ended); a later claim elsewhere stands."""

    def owner(family: str, station: str) -> str | None:
        """The node name of the hub that holds `station` now, if any hub does (as last known here)."""

    def watch(callback: Callable[[str, str, str], None]) -> None:
        """Call `callback(family, station, node)` whenever another hub claims a station from now on (this
        hub's own claims may be reported too): what a hub keeps for a station, e.g. its downlinks, moves with it."""


class ICommandRouter(Interface):
    """Runs a station-bound command (poll, downlink, revocation, ...) on the hub holding the station."""

    def register(family: str, handler: StationHandler) -> None:
        """The family's handler for commands routed to a station it holds on this hub."""

    def route(family: str, station: str, name: str, args: Any) -> defer.Deferred[Any]:
        """Run command `name` for `station` where the station is connected; fires with the
        handler's result or fails with its error (NoRoute: no handler for the family)."""

    def call(node: str, family: str, name: str, args: Any) -> defer.Deferred[Any]:
        """Run command `name` on hub `node` (station ""): there, or here if `node` is this hub or gone."""

    def broadcast(family: str, name: str, args: Any) -> defer.Deferred[list[Any]]:
        """Run command `name` (station "") on every other hub; fires with the results of those that
        answered in time (a hub that failed or stayed silent is left out and logged)."""

    def alive(node: str) -> defer.Deferred[bool]:
        """Whether hub `node` runs now (listens for its commands)."""


@implementer(IStationOwnership)
class LocalOwnership:
    """One hub: every station it holds is its own, and nothing claims them from elsewhere."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._held: dict[tuple[str, str], Callable[[str], None]] = {}

    def claim(self, family: str, station: str, on_lost: Callable[[str], None]) -> None:
        # A second connection to this same hub is the family's own business (it replaces the older one).
        self._held[(family, station)] = on_lost

    def release(self, family: str, station: str) -> None:
        self._held.pop((family, station), None)

    def owner(self, family: str, station: str) -> str | None:
        return self.node if (family, station) in self._held else None

    def watch(self, callback: Callable[[str, str, str], None]) -> None:
        """Nothing to watch: no other hub claims a station."""


@implementer(ICommandRouter)
class LocalRouter:
    """One hub: a station-bound command runs here (the family says when the station is not connected)."""

    def __init__(self) -> None:
        self._handlers: dict[str, StationHandler] = {}

    def register(self, family: str, handler: StationHandler) -> None:
        self._handlers[family] = handler

    def route(self, family: str, station: str, name: str, args: Any) -> defer.Deferred[Any]:
        handler = self._handlers.get(family)
        if handler is None:
            return defer.fail(NoRoute(f"no {family} handler for station commands on this hub"))
        return defer.ensureDeferred(handler(station, name, args))

    def call(self, node: str, family: str, name: str, args: Any) -> defer.Deferred[Any]:
        return self.route(family, "", name, args)

    def broadcast(self, family: str, name: str, args: Any) -> defer.Deferred[list[Any]]:
        return defer.succeed([])

    def alive(self, node: str) -> defer.Deferred[bool]:
        return defer.succeed(False)  # no other hub; nothing asks about this one


@attrs.define(eq=False)
class Cluster:
    """The cluster seams one hub uses (`hub.cluster`); families and the web never ask which kind."""

    node: str
    ownership: IStationOwnership
    router: ICommandRouter
    make_dedup: Callable[..., IDedupStore] | None = None
    """Builds a shared dedup store: (clock, window, memory, emit, *, late, codec); late(key, copy) takes a
    copy found late after `add` answered, codec = (encode, decode) a copy as text. None: each family
    keeps its own in-memory store (one hub)."""
    clustered: bool = False
    """True when shared by several hubs (then storage is PostgreSQL)."""
    link: Any = None
    """The connection the shared parts run on (with start and stop); None for one hub."""

    relay: Any = None
    """Shares bus events between hubs (`relay(bus, sink) -> stop`); None for one hub."""
    make_limiter: Callable[..., ILimiter] | None = None
    """Builds a rate limit counted once for all hubs: (name, clock, *, rate, burst, max_keys). None: in memory."""
    make_lease: Callable[[str, IReactorTime], ILeaderLease] | None = None
    """Builds a leader lease (name, clock): held by one hub at a time. None: always held here."""

    def limiter(self, name: str, clock: IReactorTime, *, rate: float, burst: int, max_keys: int = 100_000) -> ILimiter:
        """The rate limit `name` (same name on every hub: the same buckets); in memory on one hub."""
        make = self.make_limiter or local_limiter
        return make(name, clock, rate=rate, burst=burst, max_keys=max_keys)

    def lease(self, name: str, clock: IReactorTime) -> ILeaderLease:
        """The leader lease `name`: held by exactly one hub of the cluster at a time (always here on one hub)."""
        return self.make_lease(name, clock) if self.make_lease is not None else LocalLease(name)

    def relay_events(self, bus: Any, sink: Callable[[Any], None]) -> Callable[[], None]:
        """Feed `sink` (the live stream) the events the other hubs handle too; returns the stop.
        One hub: nothing to add, the sink has this hub's bus already."""
        if self.relay is None:
            return lambda: None
        stop: Callable[[], None] = self.relay(bus, sink)
        return stop

    async def start(self) -> None:
        if self.link is not None:
            await self.link.start()

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()


def local_cluster(node: str = "local") -> Cluster:
    """One hub, nothing shared: in-memory dedup, every station owned here, commands run here."""
    return Cluster(node=node, ownership=LocalOwnership(node), router=LocalRouter())


def parse_redis_url(url: str) -> tuple[str, int, int | None, str | None]:
    """host, port, database number and password of a redis://[:password@]host[:port][/db] URL."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("expected redis://[:password@]host[:port][/db]")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError("the database after the host must be a number, as in redis://host:6379/0")
    return parts.hostname, parts.port or 6379, int(db) if db else None, parts.password


class ILeaderLease(Interface):
    """Work that one hub of a cluster does for all (alert checks): the lease says whether it is this one.
    The holder renews it while it runs; when it dies the lease expires and another hub takes it over.

    A hub that stalls (GC, swap, SIGSTOP) may still believe it holds a lease another hub took over: every
    acquisition gets a higher `token`, and each leader-only write goes through `leader_write`, which the
    database refuses once a newer holder wrote (`Fence`)."""

    name = Attribute("The lease's name, the same on every hub (str).")
    held = Attribute("True while this hub holds the lease (bool).")
    token = Attribute(
        "The fencing token of this hub's current (or last) acquisition (int): each acquisition anywhere in the"
        " cluster gets a higher one. 0 on one hub: no other leader exists, its writes are not fenced.")

    def start() -> None:
        """Try to take the lease now and keep trying (or renewing) until `stop`."""

    def stop() -> defer.Deferred[None]:
        """Give the lease up (another hub may take it at once)."""

    def fenced(newer: int) -> None:
        """A write of this hub found `newer`, a later holder's token, in the database: this hub no longer
        holds the lease (until a renewal acquires it again, with a token above `newer`)."""


@implementer(ILeaderLease)
class LocalLease:
    """One hub: it is always the leader."""

    held = True
    token = 0

    def __init__(self, name: str = "local") -> None:
        self.name = name

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def fenced(self, newer: int) -> None:
        """Never called: token 0 is not fenced."""


class StaleLeader(Exception):
    """A leader-only write found a newer holder's token in the database: its transaction was abandoned."""

    def __init__(self, name: str, token: int, newer: int) -> None:
        super().__init__(f"lease {name}: token {token} is stale, the database has {newer}")
        self.newer = newer


@attrs.frozen
class Fence:
    """A leader-only write's claim: lease `name` was held with `token` when the hub decided the write."""

    name: str
    token: int

    def check(self, cursor: Any) -> None:
        """The first statement of the write's transaction: records the token as the lease's newest, or raises
        StaleLeader (the transaction is abandoned) when a newer holder wrote already. The row stays locked until
        the commit, so a newer holder's write waits for this one and the stale one, after it, fails."""
        if self.token == 0:
            return  # one hub (LocalLease): no other leader to fence out
        cursor.execute(
            "INSERT INTO lease_fences (name, token) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET token = excluded.token WHERE lease_fences.token <= excluded.token", (self.name, self.token))
        if cursor.rowcount == 0:
            row = cursor.execute("SELECT token FROM lease_fences WHERE name = ?", (self.name,)).fetchone()
            raise StaleLeader(self.name, self.token, int(row[0]) if row else 0)


async def leader_write(lease: ILeaderLease, write: Callable[[Fence], Awaitable[Any]],
                       fence: Fence | None = None) -> bool:
    """Run a leader-only write: `write(fence)` runs one transaction that calls `fence.check` first. True once it
    committed; False when a newer holder of the lease had written (nothing was written, and `lease.fenced`
    drops this hub's leadership). `fence` is the claim taken when the write was decided (default: now).
    What the write entails outside the database (events) goes out only after True."""
    if fence is None:
        fence = Fence(lease.name, lease.token)
    try:
        await write(fence)
    except StaleLeader as stale:
        lease.fenced(stale.newer)
        return False
    return True


ANNOUNCE_GRACE = 10.0
"""Seconds a kept event waits before a lease holder announces it in the stead of the hub that wrote it: that hub's own
announcement (right after its commit) has come by then, unless the hub died."""


@attrs.frozen
class HeldEvent:
    """An event a leader-only write entails, kept in `lease_events` by that write's transaction until announced."""

    key: str
    lease: str
    time: float
    event: Event

    def keep(self, cursor: Any) -> None:
        """In the fenced transaction, after its write: the event is stored as not yet announced."""
        event = self.event
        cursor.execute("INSERT INTO lease_events (key, lease, time, family, kind, topic, payload, retain)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (self.key, self.lease, self.time, event.family, event.kind, event.topic,
                        json.dumps(event.payload), int(event.retain)))


class LeaseEvents:
    """At-least-once for the events of a cluster's lease holder (the outbox way): each is kept in the database by the
    fenced write it follows from and dropped once the bus (the MQTT bridge's outbox, the webhooks) took it. A holder
    that died in between leaves it there; the lease's holder announces what is older than `grace` every round."""

    log = Logger()

    def __init__(self, lease: ILeaderLease, store: Any, bus: Any, clock: IReactorTime,
                 grace: float = ANNOUNCE_GRACE) -> None:
        self.lease, self.store, self.bus, self.clock, self.grace = lease, store, bus, clock, grace
        self._under_way: set[str] = set()  # kept here and being announced here: never announced twice by this hub

    def hold(self, event: Event) -> HeldEvent:
        """The event of a write about to be made: `keep` it in that write's transaction, then `announce` or `drop`."""
        held = HeldEvent(uuid.uuid4().hex, self.lease.name, self.clock.seconds(), event)
        self._under_way.add(held.key)
        return held

    def drop(self, held: HeldEvent) -> None:
        """Its write was refused (a newer holder wrote): nothing was kept, nothing goes out."""
        self._under_way.discard(held.key)

    async def write(self, held: Sequence[HeldEvent], write: Callable[[Fence], Awaitable[Any]], fence: Fence) -> bool:
        """`leader_write` of a write that keeps `held`; unless it committed they are dropped here. A write that
        failed yet did commit (the answer was lost) leaves its events to the holder's round, after the grace."""
        written = False
        try:
            written = await leader_write(self.lease, write, fence)
        finally:
            if not written:
                for event in held:
                    self.drop(event)
        return written

    async def announce(self, held: HeldEvent) -> None:
        """Publish a kept event once its write committed; it is no longer kept once the bus took it."""
        try:
            await self._publish(held.key, held.event)
        finally:
            self._under_way.discard(held.key)

    async def _publish(self, key: str, event: Event) -> None:
        await self.bus.publish(event)
        await self.store.execute("DELETE FROM lease_events WHERE key = ?", (key,))

    async def announce_left(self) -> int:
        """The holder's round: publish the events kept longer than `grace` (their hub died before announcing them),
        oldest first, each then dropped. Returns how many."""
        if not self.lease.held:
            return 0
        rows = await self.store.fetchall(
            "SELECT key, family, kind, topic, payload, retain FROM lease_events WHERE lease = ? AND time < ?"
            " ORDER BY time, key", (self.lease.name, self.clock.seconds() - self.grace))
        announced = 0
        for key, family, kind, topic, payload, retain in rows:
            if key in self._under_way or not self.lease.held:
                continue
            try:
                await self._publish(key, Event(family, kind, topic, json.loads(payload), bool(retain)))
            except Exception:
                # Kept: the next round tries again (the holder's other work of this round goes on).
                self.log.failure("lease {lease}: announcing a kept {topic} failed", lease=self.lease.name, topic=topic)
                break
            announced += 1
        if announced:
            self.log.info("lease {lease}: announced {count} events its holder had stored and not announced",
                          lease=self.lease.name, count=announced)
        return announced


def shared_windows(cluster: Cluster, name: str, clock: IReactorTime, window: float,
                   emit: Callable[[str, list[Any]], None],
                   codec: tuple[Callable[[Any], str], Callable[[str], Any]]) -> IWindowStore | None:
    """A family's windows shared by the hubs of `cluster` (`name` keeps families apart; codec = (encode,
    decode) a copy as text); None for one hub, which keeps its own windows in memory."""
    if cluster.link is None:
        return None
    from bsscihub.cluster_redis import RedisWindows

    return RedisWindows(cluster.link, cluster.node, name, clock, window, emit, codec)
