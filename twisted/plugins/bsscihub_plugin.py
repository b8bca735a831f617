"""twistd plugin for bsscihub: `twistd -n bsscihub --config etc/hub.yaml`.

Lazy on purpose: importing this module must never import the hub itself.
"""

from twisted.application.service import ServiceMaker

bsscihub = ServiceMaker(
    "bsscihub",
    "bsscihub.tap",
    "IoT hub: mioty BSSCI service center, MQTT bridge, web admin and REST API",
    "bsscihub",
)
