"""A minimal third-party bsscihub family: devices say hello on `hello/{id}/in` and the hub greets them.

What it shows: a config section, an MQTT topic in and out, a command, REST routes, a page, a CLI command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub import ingest
from bsscihub.bus import Event
from bsscihub.config import _str, setting
from bsscihub.contract import rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import (
    CLICommand,
    EventSpec,
    FamilyService,
    ICommandLine,
    IDashboardSummary,
    IFamily,
    IWebExtension,
    IWebRoutes,
)
from bsscihub.web.routing import Call, NavItem, Page, api_route, page_route
from bsscihub.web.schema import obj

NAME = "hello"


@attrs.frozen
class HelloConfig:
    greeting: str = setting("hello", _str, "what the hub answers a device that says hello")


class HelloService(FamilyService):
    family = NAME

    def __init__(self, hub: Any) -> None:
        super().__init__(hub)
        self.seen: dict[str, float] = {}

    def subscriptions(self) -> dict[str, Any]:
        return {"hello/+/in": self.on_hello}

    def on_hello(self, topic: str, payload: bytes, properties: Any) -> Any:
        ident = ingest.check_identifier(topic.split("/")[1], "id")
        ingest.json_object(payload, 1024)  # bad input is counted and dropped by the guard
        self.ingest.accepted()
        now = self.hub.reactor.seconds()
        self.seen[ident] = now
        greeting = self.hub.config.section(NAME).greeting
        return self.hub.bus.publish(Event(NAME, "greeted", f"{NAME}/thing/{ident}/greeted",
                                          {"id": ident, "greeting": greeting, "time": rfc3339(now)}))

    async def command(self, kind: str, id: str, name: str, payload: Any) -> dict[str, Any]:
        if name != "ping":
            raise CommandError(f"unknown command {name!r}: ping only")
        return {"pong": id}


THING = obj({"id": {"type": "string"}, "lastSeen": {"type": "string"}}, ("id", "lastSeen"))


@implementer(IWebExtension, IDashboardSummary)
class HelloWeb:
    nav = [NavItem("Hello", f"/{NAME}", "viewer", "sensor")]
    templates = Path(__file__).parent / "templates"

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def _things(self) -> list[dict[str, str]]:
        service = self.hub.services[NAME]
        return [{"id": k, "lastSeen": rfc3339(v)} for k, v in sorted(service.seen.items())]

    async def summary(self) -> dict[str, Any]:
        return {"hello": {"label": "Hello devices", "value": len(self.hub.services[NAME].seen), "href": f"/{NAME}"}}

    @api_route("GET", "/things", role="viewer", summary="Devices that said hello", tag=NAME,
               response=obj({"items": {"type": "array", "items": THING}}, ("items",)))
    def things(self, call: Call) -> Any:
        return {"items": self._things()}

    @page_route("GET", "", role="viewer", summary="Devices that said hello")
    def overview(self, call: Call) -> Any:
        return Page(f"{NAME}/index.html", {"title": "Hello", "things": self._things(),
                                           "greeting": self.hub.config.section(NAME).greeting})


def _greet_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="whom to greet")


def _greet(config: Any, families: Any, args: argparse.Namespace) -> int:
    print(f"{config.section(NAME).greeting}, {args.name}")
    return 0


@implementer(IPlugin, IFamily, IWebRoutes, ICommandLine)
class HelloFamily:
    name = NAME
    config_sections = {NAME: HelloConfig}
    migrations: list[Any] = []
    events = (
        EventSpec("greeted", f"{NAME}/thing/{{id}}/greeted", False, '{"id", "greeting", "time"}'),
        EventSpec("cmd_result", f"{NAME}/{{kind}}/{{id}}/event/cmd_result", False, "answered by the MQTT bridge"),
    )

    def make_service(self, hub: Any) -> HelloService:
        return HelloService(hub)

    def web_routes(self, hub: Any) -> HelloWeb:
        return HelloWeb(hub)

    def cli_commands(self) -> list[CLICommand]:
        return [CLICommand((NAME,), "greet someone as the hello family would", _greet_arguments, _greet,
                           needs_enabled=False)]
