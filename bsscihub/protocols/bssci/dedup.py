"""Uplink deduplication: the copies of one uplink (epEui, packetCnt) heard by several base stations
become one event listing every receiver, best SNR first; late copies are counted and dropped."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from bsscihub.bus import PlainJSON
from bsscihub.cluster import FIRST, LATE, MERGED, IDedupStore
from bsscihub.protocols.bssci.messages import Subpackets, UlData
from bsscihub.protocols.bssci.registry import rfc3339

__all__ = [
    "FIRST",
    "LATE",
    "MERGED",
    "Copy",
    "Deduplicator",
    "Committing",
    "receiver",
    "subpackets_json",
    "uplink_payload",
]

Key = tuple[str, int]  # (epEui as 16 hex digits, packetCnt)

# A copy of a published key whose rxTime lies further away than this is a new uplink whose
# counter repeats (the sensor restarted), not a late copy; base-station clocks are GPS-synced.
SAME_UPLINK_SPREAD_NS = 10_000_000_000
# Windows ending this close together are swept by one timer call: one DelayedCall per
# burst of uplinks instead of one per uplink, for at most this much extra latency.
SWEEP_SLACK = 0.005


class Copy(NamedTuple):
    """One base station's reception of one uplink, as it arrived (`received`: hub time).

    A NamedTuple rather than an attrs class: one is made per ulData, and this is the cheapest.
    """

    bs_eui: str
    received: float
    msg: UlData


class _Group:
    __slots__ = ("copies", "first")

    def __init__(self, first: float, copy: Copy) -> None:
        self.first = first
        self.copies = [copy]


@implementer(IDedupStore)
class Deduplicator:
    """One hub's dedup store, in memory (the default): collects copies per (epEui, packetCnt) for
    `window` seconds after the first, then calls `emit(key, copies, first_received)` once.

    Published keys are remembered (the newest `memory` of them) so a late copy is dropped
    instead of being published again. One DelayedCall serves all open windows: they close in
    arrival order, so a deque ordered by deadline is swept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window: float,
        memory: int,
        emit: Callable[[Key, list[Copy], float], Any],
    ) -> None:
        self._clock = clock
        self._window = window
        self._memory = memory
        self._emit = emit
        self._open: dict[Key, _Group] = {}
        self._deadlines: deque[tuple[float, Key]] = deque()
        self._published: OrderedDict[Key, int] = OrderedDict()  # key -> rxTime of the published uplink
        self._timer: IDelayedCall | None = None

    @property
    def pending(self) -> int:
        """Uplinks inside their window, not published yet."""
        return len(self._open)

    @property
    def remembered(self) -> int:
        return len(self._published)

    def add(self, key: Key, copy: Copy) -> int:
        """Take one copy; returns FIRST (opens a window), MERGED or LATE (already published: dropped)."""
        group = self._open.get(key)
        if group is not None:
            group.copies.append(copy)
            return MERGED
        published = self._published.get(key)
        if published is not None:
            if abs(copy.msg.rxTime - published) <= SAME_UPLINK_SPREAD_NS:
                return LATE
            del self._published[key]  # the counter repeats: a new uplink
        self._open[key] = _Group(copy.received, copy)
        deadline = copy.received + self._window
        self._deadlines.append((deadline, key))
        if self._timer is None:
            self._arm(deadline)
        return FIRST

    def remember(self, key: Key, rx_time: int) -> None:
        """Mark a key as published (after a restart, from the stored uplink history)."""
        self._published[key] = rx_time
        self._published.move_to_end(key)
        if len(self._published) > self._memory:
            self._published.popitem(last=False)

    def flush(self) -> None:
        """Publish every open window now (the service is stopping)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self._deadlines:
            self._close(self._deadlines.popleft()[1])

    def adopt(self, key: Key) -> defer.Deferred[bool]:
        """One hub: whatever it stored and did not publish is its own to publish."""
        return defer.succeed(True)

    def _arm(self, deadline: float) -> None:
        delay = max(0.0, deadline - self._clock.seconds()) + SWEEP_SLACK
        self._timer = self._clock.callLater(delay, self._sweep)

    def sweep_due(self, now: float) -> None:
        """Publish the windows that have closed by `now`. Called on every arriving copy: under
        load the reactor runs timers late (one iteration reads every busy connection first), and
        a window must not stay open longer because the hub is busy."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            self._close(deadlines.popleft()[1])

    def _sweep(self) -> None:
        self._timer = None
        self.sweep_due(self._clock.seconds())
        if self._deadlines:
            self._arm(self._deadlines[0][0])

    def _close(self, key: Key) -> None:
        group = self._open.pop(key)
        self.remember(key, group.copies[0].msg.rxTime)
        self._emit(key, group.copies, group.first)


class Committing:
    """Copies received but not yet committed, so that a slow commit does not split an uplink.

    A copy reaches the deduplicator once committed, but its window is measured from when it
    arrived: with commits slower than the window (a loaded hub, a slow disk), a copy received
    well inside the window would otherwise be committed after the window was published, and
    counted late. Hand `emit` to the deduplicator in place of the real emit: a window closing
    while a copy received inside it is still being committed is held until that copy is in.

    `receiving(key, copy)` when a copy arrives; then `committed(key, copy)` (True: the copy
    joined a held window, do not give it to the deduplicator) or `failed(key, copy)`.
    """

    def __init__(self, window: float, emit: Callable[[Any, list[Copy], float], Any]) -> None:
        self._window = window
        self._emit = emit
        self._storing: dict[Any, list[Copy]] = {}
        self._held: dict[Any, tuple[list[Copy], float]] = {}

    def receiving(self, key: Any, copy: Copy) -> None:
        self._storing.setdefault(key, []).append(copy)

    def committed(self, key: Any, copy: Copy) -> bool:
        held = self._held.get(key)
        if held is not None:
            held[0].append(copy)
        self._done(key, copy)
        return held is not None

    def failed(self, key: Any, copy: Copy) -> None:
        self._done(key, copy)

    def emit(self, key: Any, copies: list[Copy], first: float) -> None:
        if self._in_window(key, first):
            self._held[key] = (copies, first)
        else:
            self._emit(key, copies, first)

    def flush(self) -> None:
        """Emit the held windows with the copies they have (the service is stopping)."""
        held, self._held = self._held, {}
        for key, (copies, first) in held.items():
            self._emit(key, copies, first)

    def _done(self, key: Any, copy: Copy) -> None:
        storing = self._storing[key]
        storing.remove(copy)
        if not storing:
            del self._storing[key]
        held = self._held.get(key)
        if held is not None and not self._in_window(key, held[1]):
            del self._held[key]
            self._emit(key, *held)

    def _in_window(self, key: Any, first: float) -> bool:
        return any(c.received <= first + self._window for c in self._storing.get(key, ()))


def subpackets_json(sub: Subpackets | None) -> dict[str, list[float]] | None:
    return None if sub is None else sub.as_lists()


def receiver(copy: Copy) -> dict[str, Any]:
    msg = copy.msg
    return {
        "bsEui": copy.bs_eui,
        "snr": msg.snr,
        "rssi": msg.rssi,
        "eqSnr": msg.eqSnr,
        "rxTime": msg.rxTime,
        "profile": msg.profile,
        "mode": msg.mode,
        "subpackets": subpackets_json(msg.subpackets),
    }


def uplink_payload(ep_eui: str, copies: Sequence[Copy], received: float) -> dict[str, Any]:
    """The `mioty/ep/{epEui}/up` payload of one uplink from all its copies.

    The uplink's own fields come from the best receiver (highest SNR), which is listed first;
    `time` is when the hub received the first copy.
    """
    ordered = sorted(copies, key=lambda c: c.msg.snr, reverse=True)
    best = ordered[0].msg
    # PlainJSON: every number here was checked finite and below 2**64 when the copy arrived
    # (MiotyService.uplink), so the MQTT bridge may encode it without the NaN check.
    return PlainJSON({
        "epEui": ep_eui,
        "packetCnt": best.packetCnt,
        "rxTime": best.rxTime,
        "time": rfc3339(received),
        "data": best.userData.hex(),
        "format": best.format or 0,
        "dlOpen": best.dlOpen,
        "responseExp": best.responseExp,
        "dlAck": best.dlAck,
        "receivers": [receiver(c) for c in ordered],
    })
