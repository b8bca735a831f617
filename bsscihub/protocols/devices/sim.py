"""`bsscihub sim devices`: simulated generic devices publishing to the broker as real ones do, to try the family
without hardware: SensorData messages, device/{id}/telemetry/{type} values and a slowly draining battery."""

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
        "Simulate generic MQTT devices against the hub's broker: each one publishes, in turn, a SensorData "
        "reading ({\"device_id\", \"type\", \"value\"}), a value on device/{id}/telemetry/{type} and now and "
        "then its battery level, which drains slowly. The hub registers them on first sight (devices.auto_register)."
    )
    fleet = parser.add_argument_group("devices")
    fleet.add_argument("--devices", type=int, default=10, metavar="N", help="simulated devices (default 10)")
    fleet.add_argument("--id-prefix", default="SimDevice", help="device ids are this plus 001, 002 ... (default"
                       " SimDevice)")
    fleet.add_argument("--form", choices=["mixed", "sensordata", "telemetry"], default="mixed",
                       help="which message forms to send (default mixed: both)")
    add_common_arguments(parser)


def messages(count: int, prefix: str, form: str, device_root: str, rng: random.Random) -> Iterator[Message]:
    ids = [f"{prefix}{n:03d}" for n in range(1, count + 1)]
    battery = {device: rng.uniform(60.0, 100.0) for device in ids}
    step = 0
    while True:
        for device in ids:
            phase = step / 30.0 + ids.index(device)
            temperature = round(21.0 + 3.0 * math.sin(phase) + rng.gauss(0, 0.2), 2)
            humidity = round(min(100.0, max(0.0, 50.0 + 10.0 * math.cos(phase) + rng.gauss(0, 1))), 1)
            if form in ("mixed", "sensordata"):
                yield "SensorData", {"device_id": device, "type": "Temperature", "value": temperature}
            if form in ("mixed", "telemetry"):
                yield f"{device_root}/{device}/telemetry/humidity", humidity
            if step % 10 == 0:
                battery[device] = max(0.0, battery[device] - rng.uniform(0.0, 0.5))
                yield "SensorData", {"device_id": device, "type": "battery", "value": round(battery[device], 1)}
        step += 1


def run(config: HubConfig, families: dict[str, IFamily], args: argparse.Namespace) -> int:
    if not 1 <= args.devices <= 100_000:
        raise UserFacingError("--devices must be between 1 and 100000")
    section: Any = config.sections.get("devices")
    root = section.device_root if section is not None else "device"
    return publish(config, args, f"{args.devices} devices",
                   messages(args.devices, args.id_prefix, args.form, root, random.Random(1)))
