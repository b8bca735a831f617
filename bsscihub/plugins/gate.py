"""The gate-controller family plugin: gate units that register over REST and talk over MQTT (`gatetorio/...`).

Kept light: the family's code is imported only when the hub builds its service or its web routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import EventSpec, IFamily, IWebRoutes
from bsscihub.protocols.gate.config import GateConfig

if TYPE_CHECKING:
    from bsscihub.hub import Hub


@implementer(IPlugin, IFamily, IWebRoutes)
class GateFamily:
    name = "gate"
    config_sections = {"gate": GateConfig}
    events = (
        EventSpec("state", "gate/unit/{controllerId}/state", True,
                  '{"controllerId", "hardwareId", "firmwareVersion", "state": "online"|"offline", "since"}'),
        EventSpec("status", "gate/unit/{controllerId}/status", True,
                  "the unit's last status message as it sent it, plus controllerId and time"),
        EventSpec("registered", "gate/unit/{controllerId}/event/registered", False,
                  '{"controllerId", "hardwareId", "firmwareVersion", "time"}'),
        EventSpec("reregistered", "gate/unit/{controllerId}/event/reregistered", False,
                  '{"controllerId", "hardwareId", "firmwareVersion", "time"} (credentials rotated)'),
        EventSpec("renamed", "gate/unit/{controllerId}/event/renamed", False,
                  '{"controllerId", "hardwareId", "previousControllerId", "time"}'),
        EventSpec("deleted", "gate/unit/{controllerId}/event/deleted", False, '{"controllerId", "hardwareId", "time"}'),
        EventSpec("command", "gate/unit/{controllerId}/event/command", False,
                  '{"controllerId", "hardwareId", "id", "command", "via", "state": "succeeded"|"failed"|"timeout", '
                  '"ok", "result", "error", "time"} (every command, from REST, an app or MQTT)'),
        EventSpec("cmd_result", "gate/unit/{controllerId}/event/cmd_result", False,
                  "answered by the MQTT bridge to {p}/gate/unit/{controllerId}/cmd/{name}: "
                  '{"command", "ok", "error", "id", "result"}'),
        EventSpec("file_stored", "gate/unit/{controllerId}/event/file_stored", False,
                  '{"controllerId", "hardwareId", "fileId", "kind", "name", "size", "time"}'),
    )

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.gate.schema import MIGRATIONS

        return MIGRATIONS

    def make_service(self, hub: Hub) -> Any:
        from bsscihub.protocols.gate.service import GateService

        return GateService(hub)

    def web_routes(self, hub: Hub) -> Any:
        from bsscihub.protocols.gate.web import GateWeb

        return GateWeb(hub)


gate = GateFamily()
