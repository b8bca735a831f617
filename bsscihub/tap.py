"""twistd entry point: `Options` (--config) and `makeService(config, reactor)` building the hub.

A configuration mistake prints one line and exits 2; it never reaches makeService.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from bsscihub.config import ConfigError, HubConfig, load_config
from bsscihub.family import (
    UnknownFamily,
    all_config_sections,
    enabled_families,
    installed_families,
    layout_speakers,
)
from bsscihub.hub import Hub, HubService, assemble_hub
from bsscihub.logs import use_for_twistd


def load_hub_config(path: str | None, environ: Any = None) -> tuple[HubConfig, dict[str, Any]]:
    """Config plus enabled families; raises ConfigError for any user mistake."""
    installed = installed_families()
    config = load_config(path, environ, all_config_sections(installed))
    try:
        families = enabled_families(installed, config.families)
    except UnknownFamily as e:
        known = ", ".join(sorted(installed))
        raise ConfigError(
            "families", list(config.families or ()), f"unknown family {e.args[0]!r}; installed: {known}"
        ) from None
    if config.mqtt.layout != "standard" and not layout_speakers(families, config.mqtt.layout):
        raise ConfigError("mqtt.layout", config.mqtt.layout, "no enabled family speaks this layout")
    return config, families


def require_node_name(config: HubConfig) -> None:
    """A running hub of a cluster needs its node name; the CLI's commands (init, sim, certs) do not."""
    cluster = config.section("cluster")
    if cluster.redis and not cluster.node:
        raise ConfigError("cluster.node", "", "required with cluster.redis: this hub's name, unique in the cluster"
                          " and the same after a restart (its webhook queue is kept under it)")


log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = "Run the bsscihub IoT hub. Every config key can be overridden with BSSCIHUB_<SECTION>_<KEY>."
    optParameters = [
        ["config", "c", None, "YAML configuration file (e.g. etc/hub.yaml); defaults apply without one"],
    ]

    def postOptions(self) -> None:
        path = self["config"]
        if path is None and os.path.exists("etc/hub.yaml"):
            path = self["config"] = "etc/hub.yaml"
        try:
            self.hub_config, self.families = load_hub_config(path)
            require_node_name(self.hub_config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            raise SystemExit(2) from None
        # Unless twistd was given a logger, log as the config says: to standard output, or to the
        # --logfile (twistd.log when daemonized, as twistd would), escaped and scrubbed either way.
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            logfile = parent.get("logfile")
            if not logfile and not parent.get("nodaemon", True):
                logfile = "twistd.log"
            parent["logger"] = use_for_twistd(self.hub_config.log.level, self.hub_config.log.format,
                                              None if logfile in (None, "", "-") else logfile)


def build_service(
    config: HubConfig, families: dict[str, Any], reactor: Any, on_start_failure: Callable[[], None] | None = None,
    *, mqtt_client: Callable[..., Any] | None = None,
) -> HubService:
    """The whole hub as one service tree (used by twistd and by the tests).

    @param mqtt_client: the MQTT bridge's client factory (tests: a broker in memory).
    """
    from bsscihub.mqtt.bridge import install as install_mqtt_bridge
    from bsscihub.web.service import make_web_service

    hub = assemble_hub(config, reactor, families, mqtt_client=mqtt_client)
    service = HubService(hub, on_start_failure)
    install_mqtt_bridge(hub, service)  # first: it takes the families' events from the start, and stops last
    for family_service in hub.services.values():
        family_service.setServiceParent(service)
    install_integrations(hub, service)
    make_web_service(hub).setServiceParent(service)
    return service


def install_integrations(hub: Hub, service: HubService) -> None:
    """Alerts and webhooks: core parts fed by the bus, started after the families, stopped before them."""
    from bsscihub.alerts import AlertService
    from bsscihub.web.integrations import AlertsWeb, WebhooksWeb
    from bsscihub.webhooks import WebhookService

    alerts, webhooks = AlertService(hub), WebhookService(hub)
    alerts.setServiceParent(service)
    webhooks.setServiceParent(service)
    hub.extensions.extend([AlertsWeb(hub, alerts), WebhooksWeb(hub, webhooks)])


def makeService(options: Options, reactor: Any = None) -> HubService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    reactor.callWhenRunning(_exit_zero_on_signals, reactor)
    service = build_service(options.hub_config, options.families, reactor)
    service.when_ready().addCallbacks(lambda _: tune_gc(), lambda _: None)
    return service


# Young collections after 10,000 new container objects rather than CPython's 700: a busy hub
# makes short-lived Deferreds, frames and dicts by the hundred thousand a second.
GC_THRESHOLDS = (10_000, 20, 10)


def tune_gc() -> None:
    """Once the hub has started: freeze what start-up built and collect less often.

    With CPython's defaults, full collections walked every module, cache and registry
    object again and again, up to 110 ms each at 8,000 uplinks/s, which showed as the
    tail of the dedup latency. Frozen objects are never collected (nor scanned); start-up
    garbage is collected first so that it is not frozen with them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "garbage collector: {frozen} start-up objects frozen, thresholds {thresholds}",
        frozen=gc.get_freeze_count(),
        thresholds=GC_THRESHOLDS,
    )


def _exit_zero_on_signals(reactor: Any) -> None:
    """SIGTERM/SIGINT stop the hub cleanly with exit status 0.

    twistd's own handlers re-raise the signal after shutdown (exit status -15), which
    service managers and scripts read as a failure; a requested stop is not one.
    """

    from twisted.internet.error import ReactorNotRunning

    def stopping(name: str) -> None:
        log.info("received {signal}, stopping", signal=name)
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while stopping

    def stop(signum: int, frame: Any) -> None:
        # Runs between any two bytecodes of the reactor thread, maybe inside the log writer or the
        # reactor's timers: only hand over to the reactor (logging here could re-enter them).
        reactor.callFromThread(stopping, signal.Signals(signum).name)

    # Installed once the reactor runs, so it replaces the reactor's own handlers.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
