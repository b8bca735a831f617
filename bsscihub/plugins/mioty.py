"""The mioty device family: base stations over BSSCI (mutual TLS), sensors, uplinks, downlinks.

Kept light: the family's code is imported only when the hub builds its service.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import IFamily
from bsscihub.protocols.bssci.config import BSSCIConfig, MiotyConfig


@implementer(IPlugin, IFamily)
class MiotyFamily:
    name = "mioty"
    config_sections = {"bssci": BSSCIConfig, "mioty": MiotyConfig}

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.bssci.schema import MIGRATIONS

        return MIGRATIONS

    def make_service(self, hub: Any) -> Any:
        from bsscihub.protocols.bssci.service import MiotyService

        return MiotyService(hub)

    def web_routes(self, hub: Any) -> Any:
        from bsscihub.protocols.bssci.api import MiotyWeb

        return MiotyWeb(hub)


mioty = MiotyFamily()
