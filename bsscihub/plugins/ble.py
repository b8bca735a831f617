"""The BLE family plugin: gateways scanning BLE beacons, publishing over MQTT (`BLEGatewayData/#`).

Kept light: the family's code is imported only when the hub builds its service or its web routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import CLICommand, EventSpec, ICommandLine, IFamily, IReceivers, IWebRoutes
from bsscihub.protocols.ble.config import BLEConfig

if TYPE_CHECKING:
    from bsscihub.hub import Hub


@implementer(IPlugin, IFamily, IWebRoutes, ICommandLine, IReceivers)
class BLEFamily:
    name = "ble"
    receiver_id = ("gatewayId", "gw")
    """The gateways in readings' `receivers` (ble/gw/{gatewayId}/...)."""
    config_sections = {"ble": BLEConfig}
    events = (
        EventSpec("up", "ble/node/{mac}/up", False,
                  '{"mac", "time", "values": {quantity: number}, "gatewayId", "rssi"|null, '
                  '"receivers": [{"gatewayId", "rssi"}], "invalid"?} (nearest gateway first)'),
        EventSpec("node_registered", "ble/node/{mac}/event/registered", False, '{"mac", "gatewayId", "time"}'),
        EventSpec("gateway_state", "ble/gw/{gatewayId}/state", True,
                  '{"gatewayId", "state": "online"|"offline", "since", "lastSeen"}'),
        EventSpec("gateway_registered", "ble/gw/{gatewayId}/event/registered", False, '{"gatewayId", "time"}'),
        EventSpec("cmd_result", "ble/{kind}/{id}/event/cmd_result", False, "answered by the MQTT bridge"),
    )

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.ble.schema import MIGRATIONS

        return MIGRATIONS

    def make_service(self, hub: Hub) -> Any:
        from bsscihub.protocols.ble.service import BLEService

        return BLEService(hub)

    def cli_commands(self) -> Any:
        from bsscihub.protocols.ble import sim

        return (CLICommand(
            ("sim", "ble"),
            "simulate BLE gateways and beacons against the hub's broker",
            sim.add_arguments, sim.run, needs_enabled=False),)

    def web_routes(self, hub: Hub) -> Any:
        from bsscihub.protocols.ble.web import BLEWeb

        return BLEWeb(hub)


ble = BLEFamily()
