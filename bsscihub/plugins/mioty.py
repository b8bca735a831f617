"""The mioty device family: base stations over BSSCI (mutual TLS), sensors, uplinks, downlinks.

Kept light: the family's code is imported only when the hub builds its service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub.family import (
    EventSpec,
    ICertificateBindings,
    ICommandLine,
    IFamily,
    IMQTTLayouts,
    IReceivers,
    IWebRoutes,
)
from bsscihub.protocols.bssci.config import BSSCIConfig, MiotyConfig, ScaciConfig

if TYPE_CHECKING:
    from bsscihub.hub import Hub


@implementer(IPlugin, IFamily, IWebRoutes, IMQTTLayouts, ICommandLine, ICertificateBindings, IReceivers)
class MiotyFamily:
    name = "mioty"
    receiver_id = ("bsEui", "bs")
    """The base stations in uplinks', readings' and frames' `receivers` (mioty/bs/{bsEui}/...)."""
    mqtt_layouts = ("seed",)
    """`seed`: the layout of the open service center the hub replaces (protocols/bssci/seed.py)."""
    config_sections = {"bssci": BSSCIConfig, "mioty": MiotyConfig, "scaci": ScaciConfig}
    events = (
        EventSpec("uplink", "mioty/ep/{epEui}/up", False,
                  '{"epEui", "packetCnt", "rxTime", "time", "data", "format", "dlOpen", "responseExp", "dlAck", '
                  '"receivers": [{"bsEui", "snr", "rssi", "eqSnr", "rxTime", "profile", "mode", "subpackets"}], '
                  '"typeEui"?, "decoded"?, "decodeError"?} (the last three for a sensor with a Type EUI)'),
        *(EventSpec(kind, f"mioty/ep/{{epEui}}/event/{kind}", False, '{"epEui", "time", ...} (the fields of its kind)')
          for kind in ("attach", "detach", "att_rejected", "downlink", "dl_result", "dl_rx_status",
                       "inactivity_warning", "auto_detach")),
        EventSpec("state", "mioty/bs/{bsEui}/state", True,
                  '{"state": "online"|"offline", "vendor", "model", "name", "swVersion", "version", "since"}'),
        EventSpec("status", "mioty/bs/{bsEui}/status", True, "the station's last statusRsp fields plus time"),
        EventSpec("meter_reading", "mioty/meter/{meter}/reading", False,
                  '{"meter", "manufacturer", "meterId", "version", "deviceType", "medium", "function", "ci", "ell", '
                  '"afl", "accessNumber", "status", "alarms", "securityMode", "encrypted", "decrypted", "values", '
                  '"records", "manufacturerData", "data", "error", "time", "macType", "receivers"}'),
        EventSpec("registered", "mioty/meter/{meter}/event/registered", False,
                  '{"meter", "manufacturer", "meterId", "medium", "bsEui", "time"}'),
        EventSpec("dl_result", "mioty/meter/{meter}/event/dl_result", False,
                  '{"meter", "dlId", "bsEui", "result": "sent"|"refused", "error", "time"}'),
        EventSpec("vm_uplink", "mioty/vm/{macType}/up", False, '{"macType", "data", "error", "time", "receivers"}'),
        EventSpec("cmd_result", "mioty/{kind}/{id}/event/cmd_result", False, "answered by the MQTT bridge"),
    )

    @property
    def migrations(self) -> list[Any]:
        from bsscihub.protocols.bssci.blueprints import MIGRATIONS as BLUEPRINTS
        from bsscihub.protocols.bssci.meters import MIGRATIONS as METERS
        from bsscihub.protocols.bssci.schema import MIGRATIONS

        return [*MIGRATIONS, *METERS, *BLUEPRINTS]

    def make_service(self, hub: Hub) -> Any:
        from bsscihub.protocols.bssci.service import MiotyService

        return MiotyService(hub)

    def mqtt_layout(self, name: str, hub: Hub) -> Any:
        if name != "seed":
            return None
        from bsscihub.protocols.bssci.seed import SeedLayout

        return SeedLayout(hub, hub.config.mqtt.seed_base)

    def cli_commands(self) -> Any:
        from bsscihub.protocols.bssci.cli import COMMANDS

        return COMMANDS

    def certificate_bindings(self) -> Any:
        from bsscihub.protocols.bssci.identity import BINDINGS

        return BINDINGS

    def web_routes(self, hub: Hub) -> Any:
        from bsscihub.protocols.bssci.api import MiotyWeb

        return MiotyWeb(hub)


mioty = MiotyFamily()
