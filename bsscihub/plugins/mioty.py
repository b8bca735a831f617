"""The mioty device family: base stations over BSSCI (mutual TLS), sensors, uplinks, downlinks.

Kept light: the family's code is imported only when the hub builds its service.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import ICommandLine, IFamily, IMQTTLayouts, IWebRoutes
from bsscihub.protocols.bssci.config import BSSCIConfig, MiotyConfig


@implementer(IPlugin, IFamily, IWebRoutes, IMQTTLayouts, ICommandLine)
class MiotyFamily:
    name = "mioty"
    mqtt_layouts = ("seed",)
    """`seed`: the layout of the open service center the hub replaces (protocols/bssci/seed.py)."""
    config_sections = {"bssci": BSSCIConfig, "mioty": MiotyConfig}

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.bssci.meters import MIGRATIONS as METERS
        from bsscihub.protocols.bssci.schema import MIGRATIONS

        return [*MIGRATIONS, *METERS]

    def make_service(self, hub: Any) -> Any:
        from bsscihub.protocols.bssci.service import MiotyService

        return MiotyService(hub)

    def mqtt_layout(self, name: str, hub: Any) -> Any:
        if name != "seed":
            return None
        from bsscihub.protocols.bssci.seed import SeedLayout

        return SeedLayout(hub, hub.config.mqtt.seed_base)

    def cli_commands(self) -> Any:
        from bsscihub.protocols.bssci.cli import COMMANDS

        return COMMANDS

    def web_routes(self, hub: Any) -> Any:
        from bsscihub.protocols.bssci.api import MiotyWeb

        return MiotyWeb(hub)


mioty = MiotyFamily()
