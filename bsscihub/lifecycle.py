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
    """startService runs the coroutine `_start`; `when_ready` says how it ended, `_ready` fires once it did (never
    with a failure: a stop that waits for the start is not failed by it)."""

    _ready: defer.Deferred[None] | None = None
    _start_failure: Failure | None = None

    def startService(self) -> None:
        super().startService()
        self._start_failure = None
        self._ready = defer.Deferred.fromCoroutine(self._start())
        self._ready.addErrback(self._start_failed)

    async def _start(self) -> None:
        """What starting takes; override."""

    def _start_failed(self, failure: Failure) -> None:
        self._start_failure = failure  # told by when_ready, to every caller (the hub reports it)

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once `_start` ended (fails as it failed), each time it is asked."""
        assert self._ready is not None
        d: defer.Deferred[None] = defer.Deferred()

        def settle(_: Any) -> None:
            d.errback(self._start_failure) if self._start_failure is not None else d.callback(None)

        self._ready.addCallback(settle)
        return d
