"""bsscihub.lifecycle on its own and under FamilyService: a start says how it ended each time it is asked, and a stop
waits for a start still under way (a MultiService's children stop at once), never failed by it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet import defer

from bsscihub.family import FamilyService
from bsscihub.lifecycle import AsyncService


class Broken(AsyncService):
    def __init__(self) -> None:
        self.go_on: defer.Deferred[None] = defer.Deferred()
        self.stopped = False

    async def _start(self) -> None:
        await self.go_on
        raise OSError("the key file cannot be read")

    async def _stop(self) -> None:
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


class Slow(AsyncService):
    def __init__(self) -> None:
        self.go_on: defer.Deferred[None] = defer.Deferred()
        self.started = False
        self.started_when_stopped: list[bool] = []

    async def _start(self) -> None:
        await self.go_on
        self.started = True

    async def _stop(self) -> None:
        self.started_when_stopped.append(self.started)


@pytest_twisted.ensureDeferred
async def test_a_stop_during_the_start_runs_once_the_start_ended() -> None:
    service = Slow()
    service.startService()
    stopping = service.stopService()
    assert service.started_when_stopped == [] and not stopping.called  # `_stop` waits, it does not tear down
    service.go_on.callback(None)
    await stopping
    assert service.started_when_stopped == [True]
    await service.when_ready()


class Child(Service):
    def __init__(self) -> None:
        self.stopping: defer.Deferred[None] = defer.Deferred()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.stopping


class SlowFamily(FamilyService):
    family = "slowfam"

    def __init__(self, fails: bool = False) -> None:
        # Only what a FamilyService without command or subscriptions asks of its hub.
        super().__init__(cast(Any, SimpleNamespace(commands={}, mqtt=None)))
        self.fails = fails
        self.go_on: defer.Deferred[None] = defer.Deferred()
        self.child = Child()
        self.child.setServiceParent(self)
        self.drained = False

    async def prepare(self) -> None:
        await self.go_on
        if self.fails:
            raise OSError("the registry cannot be read")

    async def drain(self) -> None:
        self.drained = True

    async def command(self, kind: str, id: str, name: str, payload: Any) -> None:
        """Never called here."""


@pytest_twisted.ensureDeferred
async def test_a_family_stopped_during_its_start_stops_its_children_at_once_and_drains_once_the_start_ended() -> None:
    service = SlowFamily()
    service.startService()
    assert service.child.running  # children start before `prepare`
    stopping = service.stopService()
    assert not service.child.running  # cut at once, as before
    service.go_on.callback(None)
    await service.when_ready()
    assert not service.drained and not stopping.called  # the children's stops end first
    service.child.stopping.callback(None)
    await stopping
    assert service.drained


@pytest_twisted.ensureDeferred
async def test_a_family_whose_start_fails_during_its_stop_still_waits_for_its_children_and_drains() -> None:
    service = SlowFamily(fails=True)
    service.startService()
    stopping = service.stopService()
    service.go_on.callback(None)
    with pytest.raises(OSError, match="registry"):
        await service.when_ready()
    assert not stopping.called
    service.child.stopping.callback(None)
    await stopping  # the stop is not failed by the start
    assert service.drained  # as a stop that comes after a failed start always did


class CommandlessFamily(FamilyService):
    family = "quietfam"

    def __init__(self) -> None:
        super().__init__(cast(Any, SimpleNamespace(commands={}, mqtt=None)))


@pytest_twisted.ensureDeferred
async def test_a_family_without_a_command_starts_and_stops() -> None:
    service = CommandlessFamily()
    service.startService()
    await service.when_ready()
    assert service.hub.commands == {}
    await service.stopService()
    assert not service.running


@pytest_twisted.ensureDeferred
async def test_a_service_not_started_says_so() -> None:
    with pytest.raises(RuntimeError, match="slowfam service not started"):
        await SlowFamily().when_ready()
