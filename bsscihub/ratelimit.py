"""The hub's one rate limiter: a token bucket per key (client address, account, API key), clock injected.

Used for log-in attempts, anonymous endpoints, the per-client API limit; memory is bounded by `max_keys`.
`ILimiter` is the seam a cluster replaces: the same limit, counted once for all hubs (`Cluster.limiter`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer


class RateLimiter:
    """Allows `burst` events at once per key, refilled at `rate` per second (GCRA: one float per key).

    `take` spends a token if one is there and otherwise says how long to wait; nothing is spent
    on a refusal, so a client that keeps hammering is not punished beyond the limit itself.
    """

    def __init__(self, clock: IReactorTime, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.clock, self.rate, self.burst, self.max_keys = clock, rate, burst, max_keys
        self._interval = 1.0 / rate
        self._window = burst * self._interval
        # key -> theoretical arrival time: when the bucket would be full again. Oldest use first.
        self._tat: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tat)

    def wait(self, key: Hashable, cost: float = 1.0) -> float | None:
        """Seconds until `cost` tokens are there, or None if they are there now (nothing is spent)."""
        now = self.clock.seconds()
        tat = max(self._tat.get(key, now), now)
        over = tat + cost * self._interval - now - self._window
        return over if over > 1e-9 else None

    def take(self, key: Hashable, cost: float = 1.0) -> float | None:
        """Spend `cost` tokens: None if allowed, else seconds to wait (and nothing is spent)."""
        wait = self.wait(key, cost)
        if wait is None:
            self.spend(key, cost)
        return wait

    def spend(self, key: Hashable, cost: float = 1.0) -> None:
        """Spend tokens whatever the bucket holds (e.g. a failed log-in counted after the fact)."""
        now = self.clock.seconds()
        tat = max(self._tat.get(key, now), now)
        # An empty bucket stays empty: owing more than one window would lock a key out for longer.
        self._tat[key] = min(tat + cost * self._interval, now + self._window + self._interval)
        self._tat.move_to_end(key)
        while len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        """A full bucket again (e.g. the right password)."""
        self._tat.pop(key, None)

    def used(self, key: Hashable) -> float:
        """Tokens spent and not yet refilled (0 for a full bucket)."""
        tat = self._tat.get(key)
        if tat is None:
            return 0.0
        return max(0.0, tat - self.clock.seconds()) / self._interval


class ILimiter(Interface):
    """One named limit as the hub's parts use it, answers as Deferreds: in memory on one hub
    (`LocalLimiter`, answered at once), or kept in Redis and counted once for every hub of a cluster."""

    def wait(key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        """Seconds until `cost` tokens are there, or None if they are there now (nothing is spent)."""

    def take(key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        """Spend `cost` tokens: None if allowed, else seconds to wait (and nothing is spent)."""

    def spend(key: Hashable, cost: float = 1.0) -> defer.Deferred[None]:
        """Spend tokens whatever the bucket holds."""

    def forget(key: Hashable) -> defer.Deferred[None]:
        """A full bucket again."""


@implementer(ILimiter)
class LocalLimiter:
    """One hub's limit: a RateLimiter, its answers already fired (awaiting them does not wait)."""

    def __init__(self, bucket: RateLimiter) -> None:
        self.bucket = bucket

    def wait(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        return defer.succeed(self.bucket.wait(key, cost))

    def take(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[float | None]:
        return defer.succeed(self.bucket.take(key, cost))

    def spend(self, key: Hashable, cost: float = 1.0) -> defer.Deferred[None]:
        self.bucket.spend(key, cost)
        return defer.succeed(None)

    def forget(self, key: Hashable) -> defer.Deferred[None]:
        self.bucket.forget(key)
        return defer.succeed(None)


def local_limiter(name: str, clock: IReactorTime, *, rate: float, burst: int, max_keys: int = 100_000) -> ILimiter:
    """The default `Cluster.limiter`: `name` does not matter on one hub."""
    return LocalLimiter(RateLimiter(clock, rate=rate, burst=burst, max_keys=max_keys))
