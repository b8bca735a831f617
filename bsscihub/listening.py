"""A listener as a service: binds its endpoint in startService and closes the port in stopService.

Unlike StreamServerEndpointService it says when the port is bound (or why not) through public API.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure


class ListenerService(Service):
    """Listens on `endpoint` with `factory` while running; `when_listening()` gives the port."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[None] | None = None
        self._failure: Failure | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        self.port, self._failure = None, None
        d = self.endpoint.listen(self.factory)
        self._listening = d.addCallbacks(self._bound, self._not_bound)

    def _bound(self, port: IListeningPort) -> None:
        self.port = port
        self._settle()

    def _not_bound(self, failure: Failure) -> None:
        self._failure = failure
        self._settle()

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._answer(d)

    def _answer(self, d: Deferred[IListeningPort]) -> None:
        if self.port is not None:
            d.callback(self.port)
        else:
            d.errback(self._failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the port once bound; fails with the reason (e.g. CannotListenError) if not."""
        if self.port is not None:
            return succeed(self.port)
        if self._failure is not None:
            return fail(self._failure)
        if not self.running:
            return fail(RuntimeError(f"listener {self.name} is not started"))
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    when_ready = when_listening

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is not None and not listening.called:
            listening.cancel()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
