"""The `devices` family plugin: generic MQTT devices (SensorData/#, device/{id}/..., OTA/{id}/...).

Kept light: the family's code is imported only when the hub builds its service or its web routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import CLICommand, EventSpec, ICommandLine, IFamily, IWebRoutes
from bsscihub.protocols.devices.config import DevicesConfig

if TYPE_CHECKING:
    from bsscihub.hub import Hub


@implementer(IPlugin, IFamily, IWebRoutes, ICommandLine)
class DevicesFamily:
    name = "devices"
    topic_root = "dev"
    config_sections = {"devices": DevicesConfig}
    events = (
        EventSpec("up", "dev/device/{id}/up", False,
                  '{"deviceId", "type", "value", "time", "via": "mqtt"|"http", "values": {type: value}}'),
        EventSpec("status", "dev/device/{id}/status", True,
                  '{"deviceId", "state": "online" (when heard)|"offline" (silent)|the device\'s own, "detail": {...},'
                  ' "time"}'),
        EventSpec("registered", "dev/device/{id}/event/registered", False, '{"deviceId", "via", "time"}'),
        EventSpec("rejected", "dev/device/{id}/event/rejected", False,
                  '{"deviceId", "reason", "topic", "time"} (unknown device, auto_register off; once a minute)'),
        EventSpec("command_result", "dev/device/{id}/event/command_result", False,
                  '{"commandId", "deviceId", "command", "state": "ok"|"failed"|"timeout", "ok", "result", "error",'
                  ' "time"}'),
        EventSpec("ota", "dev/device/{id}/event/ota", False,
                  '{"deviceId", "offerId", "firmware"|null (hosted elsewhere), "version", "state", "progress", "error",'
                  ' "time"}'),
        EventSpec("cmd_result", "dev/{kind}/{id}/event/cmd_result", False, "answered by the MQTT bridge"),
    )

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.devices.schema import MIGRATIONS

        return MIGRATIONS

    def make_service(self, hub: Hub) -> Any:
        from bsscihub.protocols.devices.service import DevicesService

        return DevicesService(hub)

    def cli_commands(self) -> Any:
        from bsscihub.protocols.devices import sim

        return (CLICommand(
            ("sim", "devices"),
            "simulate generic MQTT devices against the hub's broker",
            sim.add_arguments, sim.run, needs_enabled=False),)

    def web_routes(self, hub: Hub) -> Any:
        from bsscihub.protocols.devices.web import DevicesWeb

        return DevicesWeb(hub)


devices = DevicesFamily()
