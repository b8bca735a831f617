"""Services whose start and stop are coroutines: the Deferred plumbing around them, written once.

`AsyncStop` runs `_stop` from stopService; `AsyncService` also runs `_start` from startService and says when it ended.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure


class AsyncStop(Service):
    """stopService returns the Deferred of the coroutine `_stop`, so the hub waits for it."""

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """What stopping takes; override."""


class AsyncService(AsyncStop):
    """startService runs the coroutine `_start`; `when_ready` fires once it ended, `_ready` is its Deferred."""

    _ready: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._ready = defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        """What starting takes; override."""

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once `_start` ended (fails as it failed)."""
        assert self._ready is not None
        d: defer.Deferred[None] = defer.Deferred()

        def settle(result: Any) -> None:
            d.errback(result) if isinstance(result, Failure) else d.callback(None)

        self._ready.addBoth(settle)
        return d
