"""`bsscihub sim ble`: simulated BLE gateways publishing BLEGatewayData readings of simulated beacons, to try the
family without hardware; each beacon is heard by one or several gateways with their own RSSI."""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from typing import Any

from bsscihub.config import HubConfig
from bsscihub.errors import UserFacingError
from bsscihub.family import IFamily
from bsscihub.mqtt.simulate import Message, add_common_arguments
from bsscihub.mqtt.simulate import run as publish


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Simulate BLE gateways against the hub's broker: beacons (MACs 02:00:00:00:00:01 ...) send temperature, "
        "humidity and battery; each reading is published by --copies gateways on BLEGatewayData/{gateway} as "
        "{\"gateway_id\", \"mac\", \"rssi\", \"temperature\", \"humidity\", \"battery\"}."
    )
    fleet = parser.add_argument_group("gateways and beacons")
    fleet.add_argument("--gateways", type=int, default=2, metavar="G", help="simulated gateways (default 2)")
    fleet.add_argument("--nodes", type=int, default=10, metavar="K", help="simulated beacons (default 10)")
    fleet.add_argument("--copies", type=int, default=1, metavar="C",
                       help="gateways hearing each reading, each with its own RSSI (default 1)")
    fleet.add_argument("--id-prefix", default="SIMGW", help="gateway ids are this plus 01, 02 ... (default SIMGW)")
    add_common_arguments(parser)


def messages(gateways: int, nodes: int, copies: int, prefix: str, topic_root: str,
             rng: random.Random) -> Iterator[Message]:
    gateway_ids = [f"{prefix}{n:02d}" for n in range(1, gateways + 1)]
    macs = [":".join(f"{b:02x}" for b in (2, 0, 0, (n >> 16) & 255, (n >> 8) & 255, n & 255))
            for n in range(1, nodes + 1)]
    battery = {mac: rng.uniform(70.0, 100.0) for mac in macs}
    step = 0
    while True:
        for index, mac in enumerate(macs):
            phase = step / 20.0 + index
            reading = {"temperature": round(20.0 + 4.0 * math.sin(phase) + rng.gauss(0, 0.2), 2),
                       "humidity": round(min(100.0, max(0.0, 55.0 + 10.0 * math.cos(phase))), 1),
                       "battery": round(battery[mac], 1)}
            battery[mac] = max(0.0, battery[mac] - rng.uniform(0.0, 0.05))
            # The nearest gateway first; the others hear it weaker.
            first = index % gateways
            for copy in range(copies):
                gateway = gateway_ids[(first + copy) % gateways]
                rssi = int(-55 - 12 * copy - rng.uniform(0, 10))
                yield f"{topic_root}/{gateway}", {"gateway_id": gateway, "mac": mac, "rssi": rssi, **reading}
        step += 1


def run(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    if not 1 <= args.gateways <= 10_000 or not 1 <= args.nodes <= 1_000_000:
        raise UserFacingError("--gateways must be between 1 and 10000, --nodes between 1 and 1000000")
    if not 1 <= args.copies <= args.gateways:
        raise UserFacingError("--copies must be between 1 and --gateways")
    section: Any = config.sections.get("ble")
    topic_filter = section.topics[0] if section is not None and section.topics else "BLEGatewayData/#"
    root = topic_filter.split("/#")[0].split("/+")[0]
    return publish(config, args, f"{args.gateways} BLE gateways",
                   messages(args.gateways, args.nodes, args.copies, args.id_prefix, root, random.Random(1)))
