"""The cluster parts on Redis, for several hubs sharing one PostgreSQL database: station ownership (the
newest claim wins everywhere), command routing (pub/sub per node), uplink dedup, a family's shared windows,
live-stream events, rate limits counted once for all hubs and leader leases."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import attrs
import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub.bus import Event
from bsscihub.cluster import (
    FIRST,
    LATE,
    MERGED,
    Cluster,
    ICommandRouter,
    IDedupStore,
    ILeaderLease,
    IStationOwnership,
    IWindowStore,
    LocalRouter,
    StationHandler,
    parse_redis_url,
)
from bsscihub.errors import CommandError, UserFacingError
from bsscihub.ratelimit import ILimiter, RateLimiter

__all__ = ["EventRelay", "RedisDedup", "RedisLease", "RedisLimiter", "RedisLink", "RedisOwnership", "RedisRouter",
           "RedisWindows", "parse_redis_url", "redis_cluster"]

_PREFIX = "bsscihub:"
OWNERS = _PREFIX + "owners"  # hash: family/station -> {"node", "seq"}
CLAIMS = _PREFIX + "claims"  # channel: every claim and release, in seq order
EVERY_HUB = _PREFIX + "every-hub"  # channel: commands for every hub (router.broadcast)
_SEQ = _PREFIX + "claim-seq"
# One atomic step: a claim's sequence number, the owners entry and the announcement share one order.
_CLAIM = """
local seq = redis.call('INCR', KEYS[2])
local value = cjson.encode({node = ARGV[2], seq = seq})
redis.call('HSET', KEYS[1], ARGV[1], value)
redis.call('PUBLISH', KEYS[3], cjson.encode({op = 'claim', station = ARGV[1], node = ARGV[2], seq = seq}))
return seq
"""
# Only the holder's release removes the entry: a newer claim elsewhere stands.
_RELEASE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value and cjson.decode(value).node == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', KEYS[2], cjson.encode({op = 'release', station = ARGV[1], node = ARGV[2]}))
  return 1
end
return 0
"""
ROUTE_TIMEOUT = 10.0
"""Seconds a routed command waits for the owning hub's answer."""
BROADCAST_TIMEOUT = 5.0
"""Seconds a broadcast waits for the other hubs' answers."""


def node_channel(node: str) -> str:
    return f"{_PREFIX}node:{node}"


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """Delivers messages to its link; subscribes again after every reconnection."""

    link: RedisLink

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.subscribe(sorted(self.factory.link.handlers)))
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.link.received(channel, message)


class RedisLink:
    """Two connections to one Redis: commands, and a subscriber that dispatches by channel."""

    log = Logger()

    def __init__(self, url: str, reactor: Any) -> None:
        self.host, self.port, self.db, self.password = parse_redis_url(url)
        self.reactor = reactor
        self.handlers: dict[str, Callable[[str], None]] = {}
        self.ready: list[Callable[[], Awaitable[None]]] = []
        """Run once connected, before the families start (what the parts must know first)."""
        self.redis: Any = None
        self._sub: Any = None

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call `handler(message)` for every message on `channel` (registered before start)."""
        self.handlers[channel] = handler

    async def start(self, timeout: float = 10.0) -> None:
        connecting = txredisapi.Connection(self.host, self.port, dbid=self.db, password=self.password,
                                           reconnect=True, connectTimeout=5, replyTimeout=5)
        try:
            self.redis = await connecting.addTimeout(timeout, self.reactor)
        except (defer.TimeoutError, txredisapi.ConnectionError) as e:
            raise UserFacingError(f"cluster.redis: Redis at {self.host}:{self.port} did not answer ({e})") from None
        factory = txredisapi.SubscriberFactory()
        factory.protocol = _Subscriber
        factory.password = self.password
        factory.link = self
        factory.startConnecting(HostnameEndpoint(self.reactor, self.host, self.port, timeout=5))
        self._sub = factory
        await factory.deferred
        for step in self.ready:
            await step()
        self.log.info("cluster: connected to Redis at {host}:{port}", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.disconnect()
        if self.redis is not None:
            await self.redis.disconnect()

    def received(self, channel: Any, message: Any) -> None:
        handler = self.handlers.get(channel.decode() if isinstance(channel, bytes) else channel)
        if handler is None:
            return
        try:
            handler(message.decode() if isinstance(message, bytes) else message)
        except Exception:
            self.log.failure("cluster: a message on {channel} could not be handled", channel=channel)

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        d: defer.Deferred[int] = self.redis.publish(channel, message)
        return d

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.redis.eval(script, keys, args)
        return d


@attrs.define
class _Held:
    on_lost: Callable[[str], None]
    seq: int | None = None  # None until Redis numbered the claim
    newer: tuple[int, str] | None = None  # another hub's claim seen meanwhile: (seq, node)


@implementer(IStationOwnership)
class RedisOwnership:
    """Claims numbered by Redis in one order: a hub that sees a higher-numbered claim of a station it
    holds gives the station up. Every hub keeps the owners it heard of, to route commands."""

    log = Logger()

    def __init__(self, node: str, link: RedisLink) -> None:
        self.node = node
        self.link = link
        self._held: dict[str, _Held] = {}
        self._owners: dict[str, tuple[str, int]] = {}  # family/station -> (node, seq)
        self._watchers: list[Callable[[str, str, str], None]] = []
        link.on(CLAIMS, self._announced)

    async def load(self) -> None:
        """The owners known before this hub started."""
        entries = await self.link.redis.hgetall(OWNERS)
        for field, value in (entries or {}).items():
            entry = json.loads(value)
            self._owners[field.decode() if isinstance(field, bytes) else field] = (entry["node"], int(entry["seq"]))

    def claim(self, family: str, station: str, on_lost: Callable[[str], None]) -> None:
        field = f"{family}/{station}"
        held = self._held[field] = _Held(on_lost)
        d = self.link.eval(_CLAIM, [OWNERS, _SEQ, CLAIMS], [field, self.node])
        d.addCallbacks(self._numbered, self._failed, (field, held), errbackArgs=(field,))

    def _numbered(self, seq: Any, field: str, held: _Held) -> None:
        held.seq = int(seq)
        self._note(field, self.node, held.seq)
        if held.newer is not None and held.newer[0] > held.seq and self._held.get(field) is held:
            self._lose(field, held.newer[1])

    def _failed(self, failure: Failure, field: str) -> None:
        # Held here all the same: the station is connected to this hub; others learn it at the next claim.
        self.log.warn("cluster: the claim of {station} did not reach Redis: {problem}", station=field,
                      problem=failure.getErrorMessage())

    def release(self, family: str, station: str) -> None:
        field = f"{family}/{station}"
        if self._held.pop(field, None) is None:
            return
        d = self.link.eval(_RELEASE, [OWNERS, CLAIMS], [field, self.node])
        d.addErrback(self._failed, field)

    def owner(self, family: str, station: str) -> str | None:
        field = f"{family}/{station}"
        if field in self._held:
            return self.node
        known = self._owners.get(field)
        return known[0] if known is not None else None

    def watch(self, callback: Callable[[str, str, str], None]) -> None:
        self._watchers.append(callback)

    def _note(self, field: str, node: str, seq: int) -> None:
        known = self._owners.get(field)
        if known is None or known[1] <= seq:
            self._owners[field] = (node, seq)

    def _announced(self, message: str) -> None:
        event = json.loads(message)
        field, node = event["station"], event["node"]
        if event["op"] == "release":
            if self._owners.get(field, ("",))[0] == node:
                del self._owners[field]
            return
        seq = int(event["seq"])
        self._note(field, node, seq)
        family, _, station = field.partition("/")
        for watcher in self._watchers:
            try:
                watcher(family, station, node)
            except Exception:
                self.log.failure("cluster: a watcher of the claim of {station} failed", station=field)
        held = self._held.get(field)
        if held is None or node == self.node:
            return
        if held.seq is None:
            if held.newer is None or held.newer[0] < seq:
                held.newer = (seq, node)
        elif seq > held.seq:
            self._lose(field, node)

    def _lose(self, field: str, node: str) -> None:
        held = self._held.pop(field)
        held.on_lost(node)


@implementer(ICommandRouter)
class RedisRouter:
    """A command for a station held by another hub goes to that hub's channel; its answer comes back
    on this hub's. A station no hub holds is answered here (the family says it is not connected).
    A broadcast goes to every hub's shared channel; each other hub answers on the asker's."""

    log = Logger()

    def __init__(self, node: str, link: RedisLink, ownership: IStationOwnership, clock: IReactorTime,
                 timeout: float = ROUTE_TIMEOUT) -> None:
        self.node = node
        self.link = link
        self.ownership = ownership
        self.clock = clock
        self.timeout = timeout
        self._local = LocalRouter()  # what runs here: the families' handlers, as on a single hub
        self._here = self._local.route
        self._waiting: dict[str, tuple[defer.Deferred[Any], IDelayedCall]] = {}
        self._gathering: dict[str, _Gathering] = {}
        link.on(node_channel(node), self._message)
        link.on(EVERY_HUB, self._every_hub)

    def register(self, family: str, handler: StationHandler) -> None:
        self._local.register(family, handler)

    def route(self, family: str, station: str, name: str, args: Any) -> defer.Deferred[Any]:
        owner = self.ownership.owner(family, station)
        if owner is None or owner == self.node:
            return self._here(family, station, name, args)
        return defer.ensureDeferred(self._remote(owner, family, station, name, args))

    def call(self, node: str, family: str, name: str, args: Any) -> defer.Deferred[Any]:
        if node == self.node:
            return self._here(family, "", name, args)
        return defer.ensureDeferred(self._remote(node, family, "", name, args))

    def alive(self, node: str) -> defer.Deferred[bool]:
        if node == self.node:
            return defer.succeed(True)
        d: defer.Deferred[Any] = self.link.redis.execute_command("PUBSUB", "NUMSUB", node_channel(node))
        d.addCallback(lambda answer: bool(answer and int(answer[1]) > 0))
        return d

    async def _remote(self, owner: str, family: str, station: str, name: str, args: Any) -> Any:
        request_id = uuid.uuid4().hex
        answer: defer.Deferred[Any] = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._timed_out, request_id, owner)
        self._waiting[request_id] = (answer, timer)
        request = {"op": "request", "id": request_id, "reply": self.node, "family": family, "station": station,
                   "name": name, "args": args}
        try:
            listeners = await self.link.publish(node_channel(owner), json.dumps(request))
        except Exception:
            self._forget(request_id)
            raise
        if not listeners:
            # The owning hub is gone (its claim outlived it): the station is not connected anywhere now.
            self._forget(request_id)
            return await self._here(family, station, name, args)
        return await answer

    def broadcast(self, family: str, name: str, args: Any) -> defer.Deferred[list[Any]]:
        return defer.ensureDeferred(self._broadcast(family, name, args))

    async def _broadcast(self, family: str, name: str, args: Any) -> list[Any]:
        request_id = uuid.uuid4().hex
        gathering = self._gathering[request_id] = _Gathering(name)
        request = {"op": "request", "id": request_id, "reply": self.node, "family": family, "station": "",
                   "name": name, "args": args}
        try:
            listeners = await self.link.publish(EVERY_HUB, json.dumps(request))
            gathering.expect(int(listeners) - 1, self.clock.callLater(BROADCAST_TIMEOUT, gathering.finish))
            return await gathering.done
        finally:
            self._gathering.pop(request_id, None)
            if gathering.silent():
                self.log.warn("cluster: {count} hubs did not answer {name} in {timeout:g} s", count=gathering.silent(),
                              name=name, timeout=BROADCAST_TIMEOUT)

    def _forget(self, request_id: str) -> None:
        _, timer = self._waiting.pop(request_id)
        if timer.active():
            timer.cancel()

    def _timed_out(self, request_id: str, owner: str) -> None:
        answer, _ = self._waiting.pop(request_id)
        answer.errback(CommandError(f"hub {owner}, which holds the station, did not answer in {self.timeout:g} s"))

    def _serve(self, body: dict[str, Any]) -> None:
        d = self._here(body["family"], body["station"], body["name"], body["args"])
        d.addCallbacks(lambda result: {"op": "answer", "id": body["id"], "node": self.node, "ok": True,
                                       "result": result},
                       lambda failure: {"op": "answer", "id": body["id"], "node": self.node, "ok": False,
                                        "error": failure.getErrorMessage()})
        d.addCallback(lambda reply: self.link.publish(node_channel(body["reply"]), json.dumps(reply)))
        d.addErrback(lambda failure: self.log.warn("cluster: an answer to hub {node} was lost: {problem}",
                                                   node=body["reply"], problem=failure.getErrorMessage()))

    def _every_hub(self, message: str) -> None:
        body = json.loads(message)
        if body["reply"] != self.node:
            self._serve(body)

    def _message(self, message: str) -> None:
        body = json.loads(message)
        if body["op"] == "request":
            self._serve(body)
            return
        gathering = self._gathering.get(body["id"])
        if gathering is not None:
            if not body["ok"]:
                self.log.warn("cluster: hub {node} failed {name}: {problem}", node=body.get("node"),
                              name=gathering.name, problem=body["error"])
            gathering.answered(body.get("result") if body["ok"] else _FAILED)
            return
        waiting = self._waiting.pop(body["id"], None)
        if waiting is None:
            return  # timed out meanwhile
        answer, timer = waiting
        if timer.active():
            timer.cancel()
        if body["ok"]:
            answer.callback(body["result"])
        else:
            answer.errback(CommandError(body["error"]))


_FAILED = object()


class _Gathering:
    """The answers to one broadcast, until as many came as other hubs listened, or the timeout."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.results: list[Any] = []
        self.count = 0
        self.expected: int | None = None
        self.timer: IDelayedCall | None = None
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def expect(self, count: int, timer: IDelayedCall) -> None:
        self.expected, self.timer = count, timer
        self._check()

    def answered(self, result: Any) -> None:
        self.count += 1
        if result is not _FAILED:
            self.results.append(result)
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.count >= self.expected:
            self.finish()

    def finish(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.done.called:
            self.done.callback(self.results)

    def silent(self) -> int:
        return max(0, (self.expected or 0) - self.count)


def redis_cluster(node: str, url: str, reactor: Any) -> Cluster:
    """The parts of one hub in a cluster; `await cluster.start()` before the families start."""
    link = RedisLink(url, reactor)
    ownership = RedisOwnership(node, link)
    link.ready.append(ownership.load)
    router = RedisRouter(node, link, ownership, reactor)
    cluster = Cluster(node=node, ownership=ownership, router=router, clustered=True, link=link)
    cluster.make_dedup = redis_dedup_factory(cluster)
    cluster.relay = EventRelay(node, link)
    cluster.make_limiter = lambda name, clock, **kw: RedisLimiter(link, name, clock, **kw)
    cluster.make_lease = lambda name, clock: RedisLease(link, node, name, clock)
    return cluster


# One step per copy: the first hub to ask collects the uplink; a later one forwards its copy to the
# collector's list, or hears that the uplink is already published (a late copy).
_DEDUP_ADD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'late' end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then return 'won' end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 'merged'
"""
# A further copy for the collector, unless it closed the window already: then it is late.
_DEDUP_FORWARD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
# The collector closes the window: the forwarded copies, and from now on every copy is late. The mark
# names the collector: until it expires, only that hub's death makes the uplink an orphan.
_DEDUP_CLOSE = """
local copies = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return copies
"""
# An uplink stored and not marked published is taken by one hub, and only if the hub that collected it
# (named by the published mark, else the window's lease) is gone: a live collector's mark may just lag.
_DEDUP_ADOPT = """
local by = redis.call('GET', KEYS[1]) or redis.call('GET', KEYS[2])
if by and by ~= '1' then
  if by == ARGV[1] or redis.call('PUBSUB', 'NUMSUB', ARGV[3] .. by)[2] > 0 then return 0 end
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
ORPHAN_LOCK = 60_000  # ms one hub keeps the right to publish an orphaned uplink


@attrs.define(eq=False)
class _Window:
    key: Any
    first: float
    copies: list[Any]
    timer: IDelayedCall | None = None
    mode: str = "asking"  # then "collect" (this hub publishes), "forward", "late" or "alone" (no Redis)
    due: bool = False  # the window's time is up, Redis has not answered yet


@implementer(IDedupStore)
class RedisDedup:
    """Dedup across hubs: the first hub to see an uplink collects it for the window; the others
    forward their copies through Redis, and the collector publishes once with every receiver.

    The copies themselves are stored in the shared database before they are acknowledged, so an
    uplink whose collector dies is published by `adopt` (once, by one hub) from there."""

    log = Logger()

    def __init__(self, link: RedisLink, node: str, clock: IReactorTime, window: float, memory: int,
                 emit: Callable[..., Any], late: Callable[[Any, Any], None],
                 codec: tuple[Callable[[Any], str], Callable[[str], Any]]) -> None:
        self.link, self.node, self.clock, self.window, self.memory = link, node, clock, window, memory
        self.emit, self.late = emit, late
        self.encode, self.decode = codec
        # Keys outlive the window by the spread within which a repeated counter is the same uplink.
        self.ttl_ms = int((window + 10.0) * 1000)
        self._open: dict[str, _Window] = {}
        self._published: OrderedDict[str, None] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._open)

    @property
    def remembered(self) -> int:
        return len(self._published)

    @staticmethod
    def _name(key: Any) -> str:
        return ":".join(map(str, key))

    def _keys(self, name: str) -> list[str]:
        return [f"{_PREFIX}dedup:{name}:lease", f"{_PREFIX}dedup:{name}:pub", f"{_PREFIX}dedup:{name}:copies"]

    def add(self, key: Any, copy: Any) -> int:
        name = self._name(key)
        window = self._open.get(name)
        if window is not None:
            window.copies.append(copy)
            if window.mode == "forward":
                self._forward(name, window, [copy])
            return MERGED
        if name in self._published:
            return LATE
        window = self._open[name] = _Window(key, copy.received, [copy])
        window.timer = self.clock.callLater(self.window, self._close, name)
        d = self.link.eval(_DEDUP_ADD, self._keys(name), [self.node, self.encode(copy), self.ttl_ms])
        d.addCallbacks(self._answered, self._no_answer, (name, window), errbackArgs=(name, window))
        return FIRST

    def _answered(self, answer: Any, name: str, window: _Window) -> None:
        answer = answer.decode() if isinstance(answer, bytes) else answer
        if self._open.get(name) is not window:
            return  # flushed meanwhile
        if answer == "won":
            window.mode = "collect"
        elif answer == "merged":
            window.mode = "forward"
            self._forward(name, window, window.copies[1:])  # the first went with the question
        else:
            window.mode = "late"
            del self._open[name]
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
            self._remember(name)
            for copy in window.copies:
                self.late(window.key, copy)
            return
        if window.due:
            self._close(name)

    def _no_answer(self, failure: Failure, name: str, window: _Window) -> None:
        self._unreachable(failure, name)
        if self._open.get(name) is window:
            window.mode = "alone"
            if window.due:
                self._close(name)

    def _unreachable(self, failure: Failure, name: str) -> None:
        # The window still closes: its copies are published from here rather than held back.
        self.log.warn("cluster: Redis did not take uplink {uplink} ({problem}); publishing what this hub heard",
                      uplink=name, problem=failure.getErrorMessage())

    def _unreachable_none(self, failure: Failure, name: str) -> list[Any]:
        self._unreachable(failure, name)
        return []

    def _forward(self, name: str, window: _Window, copies: list[Any]) -> None:
        if not copies:
            return
        _, pub, listed = self._keys(name)
        d = self.link.eval(_DEDUP_FORWARD, [listed, pub], [self.ttl_ms, *(self.encode(c) for c in copies)])
        d.addCallbacks(self._forwarded, self._unreachable, (window, copies), errbackArgs=(name,))

    def _forwarded(self, taken: Any, window: _Window, copies: list[Any]) -> None:
        if not int(taken):
            # Too late for the collector's uplink: marked published with it, never adopted and published again.
            for copy in copies:
                self.late(window.key, copy)

    def _close(self, name: str, now: bool = False) -> None:
        window = self._open[name]
        if window.mode == "asking" and not now:
            # Whether this hub or another one collects the uplink is Redis's answer: a busy hub runs its
            # timers before it reads that answer, and publishing without it would publish twice.
            window.due = True
            return
        del self._open[name]
        self._remember(name)
        if window.mode == "forward":
            return  # the collector publishes it
        lease, pub, listed = self._keys(name)
        if window.mode in ("asking", "alone") or now:
            if window.mode == "collect":
                # Stopping: publish what is here now, and tell the others the uplink is out (their copies
                # are late from here on, and marked with it) so none is adopted and published again.
                self.link.eval(_DEDUP_CLOSE, [listed, pub], [self.ttl_ms, self.node]).addErrback(
                    self._unreachable, name)
            self.emit(window.key, window.copies, window.first)
            return
        d = self.link.eval(_DEDUP_CLOSE, [listed, pub], [self.ttl_ms, self.node])
        d.addCallback(lambda rows: [self.decode(r.decode() if isinstance(r, bytes) else r) for r in rows or ()])
        d.addErrback(self._unreachable_none, name)
        d.addCallback(lambda remote: self.emit(window.key, [*window.copies, *remote], window.first))
        d.addErrback(lambda failure: self.log.failure("cluster: publishing uplink {uplink}", failure, uplink=name))

    def _remember(self, name: str) -> None:
        self._published[name] = None
        self._published.move_to_end(name)
        if len(self._published) > self.memory:
            self._published.popitem(last=False)

    def remember(self, key: Any, rx_time: int) -> None:
        self._remember(self._name(key))

    def sweep_due(self, now: float) -> None:
        """Nothing to do: each window has its own timer here (the cluster path, not the hot local one)."""

    def flush(self) -> None:
        for name in list(self._open):
            self._close(name, now=True)

    def adopt(self, key: Any) -> defer.Deferred[bool]:
        name = self._name(key)
        lease, pub, _ = self._keys(name)
        d = self.link.eval(_DEDUP_ADOPT, [pub, lease, f"{_PREFIX}dedup:{name}:orphan"],
                           [self.node, ORPHAN_LOCK, node_channel("")])
        d.addCallback(lambda won: int(won) == 1)
        return d


EVENTS = _PREFIX + "events"  # channel: every hub's bus events, for the other hubs' live streams


class EventRelay:
    """Publishes this hub's bus events on Redis and hands the other hubs' to the sinks (live streams).
    Only to the sinks, never into this hub's bus: MQTT and webhooks stay with the hub that handled it."""

    log = Logger()

    def __init__(self, node: str, link: RedisLink) -> None:
        self.node = node
        self.link = link
        self.sinks: list[Callable[[Event], None]] = []
        self._lost = 0
        link.on(EVENTS, self._received)

    def __call__(self, bus: Any, sink: Callable[[Event], None]) -> Callable[[], None]:
        self.sinks.append(sink)
        unsubscribe = bus.subscribe(self._local) if len(self.sinks) == 1 else None

        def stop() -> None:
            self.sinks.remove(sink)
            if unsubscribe is not None:
                unsubscribe()

        return stop

    def _local(self, event: Event) -> None:
        try:
            text = json.dumps({"node": self.node, "family": event.family, "kind": event.kind, "topic": event.topic,
                               "payload": event.payload, "retain": event.retain}, allow_nan=False)
        except (TypeError, ValueError):
            return  # not plain JSON: the local stream has it, the others do without
        self.link.publish(EVENTS, text).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self._lost += 1
        if self._lost & (self._lost - 1) == 0:  # 1, 2, 4, ...: a Redis outage is not a flood of lines
            self.log.warn("cluster: {count} events not shared with the other hubs: {problem}", count=self._lost,
                          problem=failure.getErrorMessage())

    def _received(self, message: str) -> None:
        body = json.loads(message)
        if body["node"] == self.node:
            return
        event = Event(body["family"], body["kind"], body["topic"], body["payload"], bool(body["retain"]))
        for sink in list(self.sinks):
            sink(event)


def redis_dedup_factory(cluster: Cluster) -> Callable[..., IDedupStore]:
    def make(clock: IReactorTime, window: float, memory: int, emit: Callable[..., Any], *,
             late: Callable[[Any, Any], None], codec: tuple[Callable[[Any], str], Callable[[str], Any]]) -> IDedupStore:
        return RedisDedup(cluster.link, cluster.node, clock, window, memory, emit, late, codec)

    return make


# -- rate limits and leader leases (counted and held once for every hub)

# GCRA, as RateLimiter does it in memory: one number per key, the time at which its bucket is full again,
# on Redis's clock (the hubs' clocks may differ). The key expires when the bucket is full: no memory kept.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, window, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local over = tat + cost * interval - now - window
if ARGV[1] ~= 'spend' and over > 1e-9 then return string.format('%.6f', over) end
if ARGV[1] == 'wait' then return false end
local new = math.min(tat + cost * interval, now + window + interval)
redis.call('SET', KEYS[1], string.format('%.6f', new), 'PX', math.max(1, math.ceil((new - now) * 1000)))
return false
"""


@implementer(ILimiter)
class RedisLimiter:
    """A rate limit kept in Redis, so N attempts spread over the hubs count N once. If Redis does not
    answer, this hub's own bucket decides meanwhile (limited per hub rather than not at all)."""

    log = Logger()

    def __init__(self, link: RedisLink, name: str, clock: IReactorTime, *, rate: float, burst: int,
                 max_keys: int = 100_000) -> None:
        self.link, self.name = link, name
        self.local = RateLimiter(clock, rate=rate, burst=burst, max_keys=max_keys)  # checks rate and burst
        self._args = [repr(1.0 / rate), repr(burst / rate)]
        self._failed = 0

    def _key(self, key: Hashable) -> str:
        text = key if isinstance(key, str) else json.dumps(key, separators=(",", ":"), default=str)
        return f"{_PREFIX}rate:{self.name}:{text}"

    def _run(self, mode: str, key: Hashable, cost: float) -> defer.Deferred[float | None]:
        # Not connected yet (or any other trouble): a failure like Redis not answering, decided here.
        d = defer.maybeDeferred(self.link.eval, _RATE, [self._key(key)], [mode, *self._args, repr(float(cost))])
        d.addCallback(lambda over: None if over is None else float(over))
        # Spent here too: if Redis goes away, this hub's bucket already knows what it saw.
        if mode != "wait":
            d.addCallback(self._mirror, key, cost)
        d.addErrback(self._unreachable, mode, key, cost)
        return d

    def _mirror(self, over: float | None, key: Hashable, cost: float) -> float | None:
        if over is None:
            self.local.spend(key, cost)
        return over

    def _unreachable(self, failure: Failure, mode: str, key: Hashable, cost: float) -> float | None:
        self._failed += 1
        if self._failed & (self._failed - 1) == 0:  # 1, 2, 4, ...: an outage is not a flood of lines
            self.log.warn("cluster: rate limit {name} counted on this hub only ({count} times): {problem}",
                          name=self.name, count=self._failed, problem=failure.getErrorMessage())
        if mode == "wait":
            return self.local.wait(key, cost)
        if mode == "take":
            return self.local.take(key, cost)
        self.local.spend(key, cost)
        return None

    def wait(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        return self._run("wait", key, cost)

    def take(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        return self._run("take", key, cost)

    def spend(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[None]:
        return self._run("spend", key, cost).addCallback(lambda _: None)

    def forget(self, key: Hashable) -> defer.Deferred[None]:
        self.local.forget(key)
        d = defer.maybeDeferred(lambda: self.link.redis.delete([self._key(key)]))
        d.addCallback(lambda _: None)
        d.addErrback(self._unreachable, "forget", key, 0.0)
        return d.addCallback(lambda _: None)


# Take the lease if it is free, or renew it if it is this hub's; one step, so two hubs never both hold it. The
# value is "node#token": each acquisition takes the next token of the lease's counter (KEYS[2], kept without expiry),
# at least above ARGV[4], the newest token the database refused this hub's writes with (a Redis that lost its data
# counts again from 1). A holder named by this node with another token is an earlier run of this hub: taken over.
_LEASE = """
local mine = ARGV[1] .. '#' .. ARGV[3]
local current = redis.call('GET', KEYS[1])
if current == mine and tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[3])
end
if current and string.sub(current, 1, #ARGV[1] + 1) ~= ARGV[1] .. '#' then return 0 end
if (tonumber(redis.call('GET', KEYS[2])) or 0) < tonumber(ARGV[4]) then redis.call('SET', KEYS[2], ARGV[4]) end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. token, 'PX', ARGV[2])
return token
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
LEASE_TTL = 15.0
"""Seconds a leader lease lasts unless renewed (renewed every third of it): a dead leader's work
moves to another hub within this time."""


@implementer(ILeaderLease)
class RedisLease:
    """A lease in Redis (`SET NX PX`, renewed while held). `held` is only believed until the lease
    would expire counting from when the last renewal was sent, so a hub cut off from Redis stops
    acting as leader before another one can take over. Each acquisition gets a higher `token` (the
    fence of the leader's writes: a hub that stalled past that moment has its writes refused)."""

    log = Logger()

    def __init__(self, link: RedisLink, node: str, name: str, clock: IReactorTime, ttl: float | None = None) -> None:
        self.link, self.node, self.name, self.clock = link, node, name, clock
        self.ttl = LEASE_TTL if ttl is None else ttl
        self.key = f"{_PREFIX}lease:{name}"
        self.token = 0
        self._refused = 0  # the newest token the database refused a write of this hub's with
        self._until = float("-inf")
        self._loop: LoopingCall | None = None
        self._renewing: defer.Deferred[None] | None = None

    @property
    def held(self) -> bool:
        return self.clock.seconds() < self._until

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.ttl / 3, now=True).addErrback(
            lambda f: self.log.failure("cluster: lease {lease} stopped", f, lease=self.key))

    def _tick(self) -> defer.Deferred[None]:
        self._renewing = defer.Deferred.fromCoroutine(self._renew())
        return self._renewing

    async def _renew(self) -> None:
        sent = self.clock.seconds()
        try:
            got = int(await self.link.eval(_LEASE, [self.key, self.key + ":token"],
                                           [self.node, int(self.ttl * 1000), self.token, self._refused]))
        except Exception as e:
            self._until = float("-inf")
            self.log.warn("cluster: lease {lease} not renewed: {problem}", lease=self.key, problem=str(e))
            return
        was = self.held
        if got:
            self.token = got
        # A margin of a tenth for clock drift between this hub and Redis.
        self._until = sent + self.ttl * 0.9 if got else float("-inf")
        if self.held != was:
            self.log.info("cluster: {what} lease {lease} (fence {fence})", what="holding" if self.held else "lost",
                          lease=self.key, fence=self.token)

    def fenced(self, newer: int) -> None:
        if newer <= self.token:
            return  # this hub's own later acquisition wrote it: only the write decided before was stale
        self._refused = max(self._refused, newer)
        if self.held:
            self._until = float("-inf")
            self.log.warn("cluster: lease {lease} lost: the database has token {newer} from a newer holder, this"
                          " hub's {fence} is stale; its write was not made", lease=self.key, newer=newer,
                          fence=self.token)

    def stop(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._renewing is not None and not self._renewing.called:
            await self._renewing  # its answer may be the lease: given up below, not left to expire
        if self._until > float("-inf"):
            self._until = float("-inf")
            try:
                await self.link.eval(_LEASE_RELEASE, [self.key], [f"{self.node}#{self.token}"])
            except Exception as e:
                self.log.warn("cluster: lease {lease} not given up (it expires): {problem}", lease=self.key,
                              problem=str(e))


# One step per copy of a broadcast several sources report (BLE): it joins the window open for the key,
# unless its source is in that window already (its next broadcast): then, or with no window, it opens one.
_WINDOW_ADD = """
local current = redis.call('GET', KEYS[1])
if current and redis.call('SADD', KEYS[1] .. ':' .. current .. ':sources', ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[1] .. ':' .. current .. ':copies', ARGV[3])
  return 'joined'
end
local sources, copies = KEYS[1] .. ':' .. ARGV[2] .. ':sources', KEYS[1] .. ':' .. ARGV[2] .. ':copies'
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
redis.call('SADD', sources, ARGV[1])
redis.call('RPUSH', copies, ARGV[3])
redis.call('PEXPIRE', sources, ARGV[5])
redis.call('PEXPIRE', copies, ARGV[5])
return 'opened'
"""
# The collector closes its window: its copies, and the next copy opens a new one.
_WINDOW_CLOSE = """
local copies = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return copies
"""


@implementer(IWindowStore)
class RedisWindows:
    """Windows of a broadcast shared by the hubs: the hub whose copy opens a window collects it for
    `window` seconds and emits every hub's copies once; the others only add theirs in Redis.
    A collector that dies takes its window with it (its keys expire 10 s after the window)."""

    log = Logger()

    def __init__(self, link: RedisLink, node: str, name: str, clock: IReactorTime, window: float,
                 emit: Callable[[str, list[Any]], None],
                 codec: tuple[Callable[[Any], str], Callable[[str], Any]]) -> None:
        self.link, self.node, self.clock, self.window, self.emit = link, node, clock, window, emit
        self.encode, self.decode = codec
        self._prefix = f"{_PREFIX}window:{name}:"
        self._window_ms = max(1, int(window * 1000))
        self._keep_ms = self._window_ms + 10_000
        self._open: dict[tuple[str, str], IDelayedCall] = {}
        self._asking: set[defer.Deferred[None]] = set()
        self._lost = 0

    @property
    def pending(self) -> int:
        return len(self._open)

    def add(self, key: str, source: str, copy: Any) -> None:
        window_id = uuid.uuid4().hex[:16]
        d = self.link.eval(_WINDOW_ADD, [self._prefix + key],
                           [source, window_id, self.encode(copy), self._window_ms, self._keep_ms])
        d.addCallbacks(self._answered, self._unreachable, (key, window_id), errbackArgs=(key, copy))
        self._asking.add(d)
        d.addBoth(lambda _: self._asking.discard(d))

    def _answered(self, answer: Any, key: str, window_id: str) -> None:
        if (answer.decode() if isinstance(answer, bytes) else answer) == "opened":
            self._open[(key, window_id)] = self.clock.callLater(self.window, self._close, key, window_id)

    def _unreachable(self, failure: Failure, key: str, copy: Any) -> None:
        # Better published alone than not at all.
        self._lost += 1
        if self._lost & (self._lost - 1) == 0:  # 1, 2, 4, ...: a Redis outage is not a flood of lines
            self.log.warn("cluster: Redis did not take {count} copies ({problem}); each is published alone",
                          count=self._lost, problem=failure.getErrorMessage())
        self.emit(key, [copy])

    def _close(self, key: str, window_id: str) -> defer.Deferred[None]:
        timer = self._open.pop((key, window_id))
        if timer.active():
            timer.cancel()
        base = self._prefix + key
        d = self.link.eval(_WINDOW_CLOSE, [base, f"{base}:{window_id}:copies", f"{base}:{window_id}:sources"],
                           [window_id])
        d.addCallback(lambda rows: [self.decode(r.decode() if isinstance(r, bytes) else r) for r in rows or ()])
        d.addCallback(lambda copies: self.emit(key, copies) if copies else None)
        d.addErrback(lambda failure: self.log.failure("cluster: closing the window of {uplink}", failure, uplink=key))
        return d

    def flush(self) -> defer.Deferred[None]:
        """Emit every window this hub collects now (once Redis answered the copies on their way);
        fires once they are emitted."""
        d: defer.Deferred[Any] = defer.DeferredList(list(self._asking))
        d.addCallback(lambda _: defer.DeferredList([self._close(*window) for window in list(self._open)]))
        return d.addCallback(lambda _: None)
