"""The hub's shared parts (config, store, bus, health, metrics) and the service that starts them in order.

Storage is migrated before any listener binds; on stop, listeners close before pending writes are flushed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from bsscihub import __version__
from bsscihub.audit import RefusalLog
from bsscihub.bus import EventBus
from bsscihub.cluster import Cluster, local_cluster
from bsscihub.config import HubConfig
from bsscihub.errors import DatabaseUnreachable, UserFacingError
from bsscihub.family import EventSpec, IFamily, IFamilyService
from bsscihub.health import ComponentHealth, HealthRegistry
from bsscihub.metrics import register_standard_collectors
from bsscihub.store import Migration, Store, open_store
from bsscihub.store.schema import CORE_MIGRATIONS

if TYPE_CHECKING:
    from bsscihub.mqtt.bridge import MQTTBridge

CommandHandler = Callable[[str, str, str, Any], Awaitable[Mapping[str, Any] | None]]
"""async handler(kind, id, name, payload) -> optional result; raises CommandError with the reason."""


@attrs.define(eq=False)
class Hub:
    """What every component of one running hub shares."""

    config: HubConfig
    reactor: Any
    store: Store
    bus: EventBus
    health: HealthRegistry
    metrics: CollectorRegistry
    families: dict[str, IFamily]
    refusals: RefusalLog
    """The audit log's aggregated refusals: every refused request is recorded through it."""
    version: str = __version__
    started_at: float = attrs.field(factory=time.time)
    mqtt: MQTTBridge | None = None
    """The MQTT bridge (made by assemble_hub before any family service; None in the CLI's short-lived
    hubs). Families subscribe to device topics through it."""
    services: dict[str, IFamilyService] = attrs.field(factory=dict)
    """Each enabled family's service, by family name (REST routes and commands reach it here); made by
    assemble_hub, before anything starts."""
    commands: dict[str, CommandHandler] = attrs.field(factory=dict)
    """Command handlers by family name, for `{prefix}/{family}/{kind}/{id}/cmd/{name}`."""
    extensions: list[Any] = attrs.field(factory=list)
    """Core parts with web routes of their own (alerts, webhooks), mounted like a family's under /api/v1 and /."""
    cluster: Cluster = attrs.field(factory=local_cluster)
    """Dedup store, station ownership and command routing (local: one hub, the default)."""

    def migrations(self) -> list[Migration]:
        found = list(CORE_MIGRATIONS)
        for family in self.families.values():
            found.extend(family.migrations)
        from bsscihub.alerts import MIGRATIONS as ALERTS
        from bsscihub.webhooks import MIGRATIONS as WEBHOOKS

        return found + ALERTS + WEBHOOKS


def core_events() -> tuple[EventSpec, ...]:
    """What the core publishes beside the families (hub presence, alerts), each declared next to its payload."""
    from bsscihub.alerts import EVENTS as ALERTS
    from bsscihub.mqtt.bridge import STATUS_EVENTS

    return STATUS_EVENTS + ALERTS


def make_hub(config: HubConfig, reactor: Any, families: dict[str, IFamily]) -> Hub:
    store = open_store(config.database, config.sqlite_path, reactor)
    settings = config.sections.get("cluster")
    cluster = (_redis_cluster(settings.node, settings.redis, reactor) if settings is not None and settings.redis
               else local_cluster())
    hub = Hub(
        config=config,
        reactor=reactor,
        store=store,
        bus=EventBus(),
        health=HealthRegistry(),
        metrics=CollectorRegistry(),
        families=families,
        refusals=RefusalLog(store, reactor, limiter=cluster.limiter),
        cluster=cluster,
    )
    hub.health.register("storage", lambda: ComponentHealth(store.running, {"backend": store.dialect}))
    register_standard_collectors(hub.metrics, hub.version)
    return hub


def assemble_hub(config: HubConfig, reactor: Any, families: dict[str, IFamily], *,
                 mqtt_client: Callable[..., Any] | None = None) -> Hub:
    """A running hub's Hub, complete before any service starts: its MQTT bridge (made from the Hub's bus,
    health and metrics, so right after them) and then each enabled family's service, which may use it.

    @param mqtt_client: the bridge's client factory (tests: a broker in memory).
    """
    from bsscihub.mqtt.bridge import MQTTBridge

    hub = make_hub(config, reactor, families)
    hub.mqtt = MQTTBridge(hub) if mqtt_client is None else MQTTBridge(hub, client_factory=mqtt_client)
    for name, family in families.items():
        hub.services[name] = IFamilyService(family.make_service(hub))  # TypeError if it is not one
    return hub


def _redis_cluster(node: str, url: str, reactor: Any) -> Cluster:
    try:
        from bsscihub.cluster_redis import redis_cluster
    except ImportError as e:
        raise UserFacingError(f"cluster.redis needs the cluster extra (pip install 'bsscihub[cluster]'): {e}") from None
    return redis_cluster(node, url, reactor)


class HubService(MultiService):
    """Starts storage (with migrations) first, then its children; stops them in reverse, then storage."""

    log = Logger()

    def __init__(self, hub: Hub, on_start_failure: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.hub = hub
        self._on_start_failure = on_start_failure or self._exit_process
        self._starting: defer.Deferred[None] | None = None
        self._outcome: Any = None  # None while starting, then True or the Failure
        self._waiters: list[defer.Deferred[None]] = []

    def when_ready(self) -> defer.Deferred[None]:
        """Fires once storage is migrated and every child has started (fails if the start failed)."""
        if self._outcome is True:
            return defer.succeed(None)
        if self._outcome is not None:
            return defer.fail(self._outcome)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None) if outcome is True else d.errback(outcome)

    def startService(self) -> None:
        # Service.startService, not MultiService's: children wait for storage.
        Service.startService(self)
        self._starting = defer.Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._failed)

    async def _start(self) -> None:
        hub = self.hub
        hub.config.data_dir.mkdir(parents=True, exist_ok=True)
        hub.store.start()
        await hub.store.migrate(hub.migrations())
        await hub.cluster.start()  # the shared parts answer before any station or client arrives
        if hub.cluster.clustered and hub.config.keys_dir == hub.config.data_dir:
            # Not refused: the files may have been copied to every hub. Said, since a key made here is this hub's.
            self.log.warn("keys_dir is this hub's data_dir ({path}): every hub of the cluster must hold the same"
                          " key files; set keys_dir to one directory all hubs share (docs/cluster.md)",
                          path=str(hub.config.keys_dir))
        for child in self:
            child.startService()
        # A family that cannot start (certificates missing, port taken) fails the hub's start.
        for child in self:
            when_ready = getattr(child, "when_ready", None)
            if when_ready is not None:
                await when_ready()
        self.log.info(
            "bsscihub {version} started: families {families}, data in {data_dir}, database {backend}",
            version=hub.version,
            families=",".join(hub.families) or "none",
            data_dir=str(hub.config.data_dir),
            backend=hub.store.dialect,
        )
        hub.health.started = True
        self._settle(True)

    def _failed(self, failure: Any) -> None:
        if failure.check(UserFacingError, CannotListenError, DatabaseUnreachable):
            # A setup mistake (missing certificates, port taken): one line, no traceback.
            self.log.critical("hub failed to start: {reason}", reason=failure.getErrorMessage())
        else:
            self.log.failure("hub failed to start", failure)
        self._settle(failure)
        self._on_start_failure()

    def _exit_process(self) -> None:
        # twistd has no exit status of its own; a hub that could not start must not exit 0.
        self.hub.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.hub.reactor.callWhenRunning(self.hub.reactor.stop)

    async def _stop(self) -> None:
        self.hub.health.started = False  # not ready while draining: load balancers stop sending
        if self._starting is not None and not self._starting.called:
            await self._starting
        # One part failing to stop must not keep the others running: the store's threads, left
        # unjoined, would keep the process alive after the reactor has stopped.
        try:
            for child in reversed(list(self)):
                if child.running:
                    try:
                        await defer.maybeDeferred(child.stopService)
                    except Exception:
                        self.log.failure("stopping {part} failed", part=child.name or type(child).__name__)
            await self.hub.cluster.stop()
        finally:
            await self.hub.store.stop()
        self.log.info("bsscihub stopped")

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop())
