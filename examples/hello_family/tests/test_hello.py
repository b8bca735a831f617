"""The hello family's own contract test: its interfaces as declared, and what it publishes
against its EventSpecs (bsscihub.contract.event_problems), without a broker."""

from __future__ import annotations

import json
from typing import Any

from hello_family import HelloConfig, HelloService
from zope.interface.verify import verifyObject

from bsscihub.bus import EventBus
from bsscihub.contract import event_problems
from bsscihub.family import ICommandLine, IFamily, IWebExtension, IWebRoutes, installed_families


def test_the_family_is_found_and_provides_what_it_declares() -> None:
    family = installed_families()["hello"]
    for interface in (IFamily, IWebRoutes, ICommandLine):
        assert verifyObject(interface, family)
    assert verifyObject(IWebExtension, family.web_routes(object()))


class Clock:
    def seconds(self) -> float:
        return 1_700_000_000.25


def test_a_hello_publishes_what_the_spec_declares() -> None:
    family = installed_families()["hello"]
    hub: Any = type("Hub", (), {})()
    hub.bus, hub.reactor, hub.metrics = EventBus(), Clock(), None
    hub.config = type("Config", (), {"section": staticmethod(lambda name: HelloConfig(greeting="hi"))})()
    published: list[Any] = []
    hub.bus.subscribe(published.append)
    service = HelloService(hub)
    service._ingest = type("Ingest", (), {"accepted": staticmethod(lambda: None)})()
    service.on_hello("hello/dev-1/in", json.dumps({}).encode(), None)
    [event] = published
    assert event.payload == {"id": "dev-1", "greeting": "hi", "time": "2023-11-14T22:13:20.250Z"}
    assert event_problems(event, family.events) == []
