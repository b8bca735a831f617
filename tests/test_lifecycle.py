"""bsscihub.lifecycle on its own: a service whose start is a coroutine says how the start ended each time it is
asked, and a start that failed does not fail the stop."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from bsscihub.lifecycle import AsyncService


class Broken(AsyncService):
    def __init__(self) -> None:
        self.go_on: defer.Deferred[None] = defer.Deferred()
        self.stopped = False

    async def _start(self) -> None:
        await self.go_on
        raise OSError("the key file cannot be read")

    async def _stop(self) -> None:
        if self._ready is not None and not self._ready.called:
            await self._ready  # as the alerts and webhooks services do: a stop waits for the start
        self.stopped = True


@pytest_twisted.ensureDeferred
async def test_a_failed_start_is_told_to_every_caller_and_the_stop_still_runs() -> None:
    service = Broken()
    service.startService()
    first = service.when_ready()
    stopping = service.stopService()  # the hub stops while the start is under way
    service.go_on.callback(None)
    for asked in (first, service.when_ready(), service.when_ready()):
        with pytest.raises(OSError, match="key file"):
            await asked
    await stopping
    assert service.stopped
