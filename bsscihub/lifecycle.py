"""Services whose start and stop are coroutines: the Deferred plumbing around them, written once.

`AsyncStop` runs `_stop` from stopService; `AsyncService` also runs `_start` from startService and says when it ended.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure


class AsyncStop(Service):
    """stopService returns the Deferred of the coroutine `_stop`, so the hub waits for it. Listed before MultiService
    in a class's bases it works for one too: the children's stops are under way by then, `_children_stopped` their
    Deferred."""

    _children_stopped: defer.Deferred[Any] | None = None

    def stopService(self) -> defer.Deferred[None]:
        stopping: Any = super().stopService()  # None for a Service, the children's stops for a MultiService
        self._children_stopped = stopping
        return defer.Deferred.fromCoroutine(self._stop_in_turn())

    async def _stop_in_turn(self) -> None:
        await self._stop()

    async def _stop(self) -> None:
        """What stopping takes; override."""


class AsyncService(AsyncStop):
    """startService runs the coroutine `_start` (after a MultiService's children started); `when_ready` says how it
    ended. A stop that comes while the start is under way waits for it to end, failed or not, before `_stop`."""

    _ready: defer.Deferred[None] | None = None  # fires once `_start` ended, never with a failure
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

    async def _stop_in_turn(self) -> None:
        if self._ready is not None and not self._ready.called:
            await self._ready  # `_stop` never tears down what a start still builds
        await self._stop()

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once `_start` ended (fails as it failed), each time it is asked."""
        if self._ready is None:
            return defer.fail(RuntimeError(f"{self.name} service not started"))
        d: defer.Deferred[None] = defer.Deferred()

        def settle(_: Any) -> None:
            d.errback(self._start_failure) if self._start_failure is not None else d.callback(None)

        self._ready.addCallback(settle)
        return d
