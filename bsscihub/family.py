"""The device-family plugin boundary: what a family provides and how the hub finds families.

Families are IFamily providers found with twisted.plugin.getPlugins in bsscihub.plugins.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from bsscihub.lifecycle import AsyncService

if TYPE_CHECKING:
    from bsscihub.config import HubConfig
    from bsscihub.hub import Hub


class IFamily(IPlugin):
    """A device family (mioty, ble, gate, devices, ...)."""

    name = Attribute("Short name: enables the family in `families`, roots its topics and routes.")
    config_sections = Attribute("Mapping of config section name to its attrs class (validated at start).")
    migrations = Attribute("Sequence of bsscihub.store.Migration for the family's tables.")

    def make_service(hub: Hub) -> IService:  # type: ignore[misc]
        """The family's ingress, timers and command handlers, started after storage is ready."""

    # Optional, for the MQTT side (see FamilyService, which wires both at start):
    # topic_root: str
    #     The first topic level under mqtt.prefix for the family's events and commands when it
    #     differs from `name` (the `devices` family publishes under {p}/dev/...).
    # events: Sequence[EventSpec]
    #     Every topic the family publishes under {p}/, for the docs, the tests and the admin UI.
    #
    # Optional interfaces an IFamily may provide as well: IWebRoutes, IMQTTLayouts, ICommandLine,
    # ICertificateBindings, IReceivers (below).


class IWebRoutes(Interface):
    """Optionally provided by an IFamily: its REST routes and admin pages."""

    def web_routes(hub: Hub) -> IWebExtension:  # type: ignore[misc]
        """The family's web extension for this hub (called once, when the web app is built; keep the
        import of the web module inside it). Its API routes are mounted under /api/v1/{name}/, its
        pages under /{name}/."""


class IWebExtension(Interface):
    """What `IWebRoutes.web_routes` returns: an object whose methods are declared with
    bsscihub.web.routing.api_route / page_route (role, schemas and audit action next to each handler).
    It may provide IDashboardSummary, ICertificateRevocation and IRootRoutes as well."""

    nav = Attribute("Sequence of bsscihub.web.pages.NavItem: the family's pages in the menu, in order.")
    templates = Attribute(
        "The directory of the family's page templates (a pathlib.Path or importlib.resources Traversable), by"
        " convention `templates/` inside the family's package, shipped as package data; None for none."
        " Name them `{family}/...html` inside it so that families never shadow each other or the core.")


class IDashboardSummary(Interface):
    """Optionally provided by an IWebExtension: counts for the dashboard."""

    async def summary() -> Mapping[str, Mapping[str, Any]]:  # type: ignore[misc]
        """{key: {"label", "value", "href"}} (href may be None); a failure is logged, not shown."""


class ICertificateRevocation(Interface):
    """Optionally provided by an IWebExtension whose family accepts client certificates."""

    async def certificate_revoked(serial: int, reason: str, actor: str) -> None:  # type: ignore[misc]
        """The web revoked certificate `serial`: refuse it from now on, drop the connections using it."""


class IRootRoutes(Interface):
    """Optionally provided by an IWebExtension: routes kept at paths outside /api/v1/{name}/ and
    /{name}/ (as earlier platforms had them)."""

    root_routes = Attribute("An object with route-declared methods, mounted at the root.")


class IMQTTLayout(Interface):
    """One MQTT layout spoken next to the hub's own contract (e.g. that of the system the hub replaces)."""

    def outbound(event: Any) -> Iterable[tuple[str, Any, bool]]:  # type: ignore[misc]
        """(absolute topic, JSON-serialisable payload, retain) of each message mirroring one of the
        family's bus events in this layout; usually none. Runs on the reactor thread for every event
        of the family, before it is acknowledged: keep it cheap."""

    def inbound() -> Mapping[str, Any]:  # type: ignore[misc]
        """Absolute topic filters this layout takes requests on, each with its `handler(topic,
        payload, properties)` (it may return a coroutine); the bridge subscribes them at start.
        A handler answers in its own layout (through `hub.mqtt.publish`) and never raises for bad input."""


class IMQTTLayouts(Interface):
    """Optionally provided by an IFamily: extra MQTT layouts it speaks, one chosen with `mqtt.layout`."""

    mqtt_layouts = Attribute("Names of the layouts the family speaks (values of mqtt.layout).")

    def mqtt_layout(name: str, hub: Hub) -> IMQTTLayout | None:  # type: ignore[misc]
        """The family's layout `name` for this hub, or None. Called once, when the MQTT bridge is built
        (before the family's service exists: reach it through `hub.services` when a request comes)."""


@attrs.frozen
class CLICommand:
    """One subcommand of the `bsscihub` command contributed by a family.

    `path` is ("sensors",) for a top-level command or ("certs", "issue-bs") for one inside a core
    group; `add_arguments(parser, common)` declares its arguments (`common` carries --config, for
    nested subparsers); `run(config, families, args)` returns the exit status and raises
    bsscihub.errors.UserFacingError for a user mistake (printed as one line, status 1).
    """

    path: tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser, argparse.ArgumentParser], None]
    run: Callable[[HubConfig, dict[str, IFamily], argparse.Namespace], int]
    needs_enabled: bool = True
    """Refused with one line when the family is not enabled in `families` (False: e.g. a simulator)."""


class ICommandLine(Interface):
    """Optionally provided by an IFamily: subcommands of the `bsscihub` command.

    Every installed family's commands are offered (the configuration is read only once a command
    runs); keep the module that provides them light and import the work inside `run`."""

    def cli_commands() -> Sequence[CLICommand]:  # type: ignore[misc]
        """The family's subcommands."""


class ICertificateBindings(Interface):
    """Optionally provided by an IFamily whose devices present client certificates of the hub's CA:
    what such a certificate may be bound to. The web issues, lists and searches certificates by these."""

    def certificate_bindings() -> Sequence[Any]:  # type: ignore[misc]
        """The family's bsscihub.pki.BindingKind list (names prefixed with the family's protocol, e.g.
        "bssci.station"); keep the plugin module light and import them inside."""


class IReceivers(Interface):
    """Optionally provided by an IFamily whose events list the stations or gateways that heard a device
    (`receivers`: a list of objects): how such a receiver names itself, so the core (the alerts) knows it
    was heard too without knowing the family's words."""

    receiver_id = Attribute(
        "(field, kind): the field naming a receiver in an event's `receivers` entries and the kind of target it"
        " is, that of the family's own topics for it: e.g. (\"gatewayId\", \"gw\") for {root}/gw/{gatewayId}/...")


def receiver_ids(families: Mapping[str, IFamily]) -> dict[str, tuple[str, str]]:
    """(field, kind) naming a receiver in each family's `receivers` lists, for the families that declare one."""
    return {
        name: tuple(family.receiver_id) for name, family in families.items()
        if IReceivers.providedBy(family)
    }  # fmt: skip


def binding_kinds(families: Mapping[str, IFamily]) -> dict[str, Any]:
    """Every BindingKind the families declare, by name (bsscihub.pki.check_kinds: no two alike)."""
    from bsscihub.pki import check_kinds

    return check_kinds(
        kind for family in families.values() if ICertificateBindings.providedBy(family)
        for kind in family.certificate_bindings()
    )  # fmt: skip


def layout_speakers(families: Mapping[str, IFamily], layout: str) -> list[str]:
    """The families (by name) that speak MQTT layout `layout`."""
    return [
        name for name, family in families.items()
        if IMQTTLayouts.providedBy(family) and layout in family.mqtt_layouts
    ]  # fmt: skip


class UnknownFamily(Exception):
    pass


def installed_families() -> dict[str, IFamily]:
    """Every family plugin installed, by name."""
    import bsscihub.plugins

    found: dict[str, IFamily] = {}
    for family in getPlugins(IFamily, bsscihub.plugins):
        found.setdefault(family.name, family)
    return found


def all_config_sections(families: Mapping[str, IFamily]) -> dict[str, type]:
    sections: dict[str, type] = {}
    for family in families.values():
        sections.update(family.config_sections)
    return sections


def enabled_families(installed: Mapping[str, IFamily], names: tuple[str, ...] | None) -> dict[str, IFamily]:
    """The families named in the config (all installed ones when it names none)."""
    if names is None:
        return dict(sorted(installed.items()))
    unknown = [n for n in names if n not in installed]
    if unknown:
        raise UnknownFamily(unknown[0])
    return {n: installed[n] for n in names}


# -- the running side of a family (added for the MQTT families; ingress, commands, events)


class IFamilyService(IService):  # type: ignore[misc]
    """What `IFamily.make_service` returns: a service whose ingress and commands the hub can reach.

    Listeners (endpoint services) are its children; MQTT ingress is `subscriptions()`, made through
    the hub's MQTT bridge; events go on `hub.bus` as `bsscihub.bus.Event`s.
    """

    family = Attribute("The family's name.")

    def subscriptions() -> Mapping[str, Any]:  # type: ignore[misc]
        """Device-side topic filters (outside mqtt.prefix) and their `handler(topic, payload, properties)`."""

    async def command(kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:  # type: ignore[misc]
        """Carry out `{p}/{topic_root}/{kind}/{id}/cmd/{name}` (or the same from REST); raise CommandError."""


@attrs.frozen
class EventSpec:
    """One topic a family publishes, relative to mqtt.prefix, with `{placeholders}` for the ids."""

    kind: str
    topic: str
    retained: bool
    payload: str


@implementer(IFamilyService)
class FamilyService(AsyncService, MultiService):
    """A base for family services: on start, `prepare()` (e.g. load the registry), then registers
    `command` in `hub.commands` and subscribes `subscriptions()` through `hub.mqtt`, each handler
    guarded by bsscihub.ingest (bad input is counted, logged once per source and dropped; a handler
    never raises into the bridge). On stop, ingress is cut first, then `drain()` flushes."""

    log = Logger()
    family = ""
    topic_root: str | None = None
    command: Any = None  # a subclass defines `async def command(self, kind, id, name, payload)`

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub
        self.setName(self.family)
        self._ingest: Any = None
        self._subscribed: list[Deferred[Any]] = []

    @property
    def ingest(self) -> Any:
        if self._ingest is None:
            from bsscihub.ingest import Ingest

            self._ingest = Ingest(self.family, self.hub.metrics, self.hub.reactor)
        return self._ingest

    async def prepare(self) -> None:
        """Runs at start, before any message or command is taken (storage is migrated by then)."""

    async def drain(self) -> None:
        """Runs at stop, after ingress is cut: flush what is pending while storage is still up."""

    def subscriptions(self) -> Mapping[str, Any]:
        return {}

    def looping(self, fn: Any, what: str) -> LoopingCall:
        """A LoopingCall on the hub's clock that survives a failed round (a database hiccup must
        not end a timer for good); `fn` may be async."""

        def run() -> Deferred[Any]:
            d = maybeDeferred(fn)
            d.addCallback(lambda r: Deferred.fromCoroutine(r) if inspect.iscoroutine(r) else r)
            d.addErrback(lambda f: self.log.failure("{family}: {what} failed", f, family=self.family, what=what))
            return d

        loop = LoopingCall(run)
        loop.clock = self.hub.reactor
        return loop

    def _command_keys(self) -> set[str]:
        return {self.family, self.topic_root or self.family}

    def _start_failed(self, failure: Failure) -> None:
        super()._start_failed(failure)
        # The hub reports the failure once, when it waits for its families to be ready.
        self.log.debug("{family} failed to start: {reason}", family=self.family, reason=failure.getErrorMessage())

    async def _start(self) -> None:
        await self.prepare()
        if not self.running:
            return
        if self.command is not None:
            for key in self._command_keys():
                self.hub.commands[key] = self.command
        subscriptions = self.subscriptions()
        bridge = self.hub.mqtt
        if subscriptions and bridge is None:
            self.log.warn("{family}: no MQTT bridge, not subscribing to {filters}", family=self.family,
                          filters=", ".join(subscriptions))
            return
        for topic_filter, handler in subscriptions.items():
            assert bridge is not None
            result = bridge.subscribe(topic_filter, self.ingest.guard(handler, lambda: self.running))
            if isinstance(result, Deferred):
                result.addErrback(self._subscribe_failed, topic_filter)
                self._subscribed.append(result)

    def _subscribe_failed(self, failure: Failure, topic_filter: str) -> None:
        self.log.failure("{family}: subscribing to {filter} failed", failure, family=self.family, filter=topic_filter)

    async def when_subscribed(self) -> None:
        """Once ready and the broker has acknowledged every subscription (it may never, while it is away)."""
        await self.when_ready()
        for d in list(self._subscribed):
            waiter: Deferred[None] = Deferred()

            def passed(result: Any, waiter: Deferred[None] = waiter) -> Any:
                waiter.callback(None)
                return result

            d.addBoth(passed)
            await waiter

    def stopService(self) -> Deferred[None]:
        # Messages still arriving are dropped by the guard once `running` is false.
        for key in self._command_keys():
            if self.command is not None and self.hub.commands.get(key) == self.command:  # optional: None is no entry
                del self.hub.commands[key]
        return super().stopService()  # stops the children, then `_stop` once the start ended

    async def _stop(self) -> None:
        assert self._children_stopped is not None  # a MultiService's stopService gives its children's stops
        await self._children_stopped
        await self.drain()
        if self._ingest is not None:
            self._ingest.reject_log.flush()  # what was dropped since the last line is said before the stop
