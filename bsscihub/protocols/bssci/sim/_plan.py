"""What a simulation run is: its options, the deterministic base-station and sensor identities,
and how base stations and sensors are split across worker processes."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs

__all__ = [
    "BS_EUI_BASE",
    "SENSOR_EUI_BASE",
    "SimOptions",
    "WorkerPlan",
    "bs_eui",
    "endpoints",
    "sensor_eui",
    "sensor_key",
    "sensor_short_addr",
    "split",
]

# Fixed prefixes, so a hub that served one run recognises the same sensors
# and base stations in the next (and `--write-endpoints` matches what is sent).
BS_EUI_BASE = 0x70B3D59CB0000000
SENSOR_EUI_BASE = 0x70B3D59CE0000000


def bs_eui(index: int) -> int:
    return BS_EUI_BASE + index


def sensor_eui(index: int) -> int:
    return SENSOR_EUI_BASE + index


def sensor_key(index: int) -> bytes:
    """A made-up but stable network session key: the simulator never encrypts anything."""
    return hashlib.sha256(b"bsscihub-sim-sensor-%d" % index).digest()[:16]


def sensor_short_addr(index: int) -> int:
    return index & 0xFFFF


def endpoints(count: int, *, bidi: bool = False) -> list[dict[str, Any]]:
    """The simulated sensors in the endpoints.json format `bsscihub sensors import` reads."""
    return [
        {
            "eui": f"{sensor_eui(i):016x}",
            "nwKey": sensor_key(i).hex(),
            "shortAddr": f"{sensor_short_addr(i):04x}",
            "bidi": bidi,
        }
        for i in range(count)
    ]


@attrs.frozen(kw_only=True)
class SimOptions:
    """Everything a run needs, resolved from the command line and the hub configuration."""

    host: str
    port: int
    base_stations: int
    sensors: int
    rate: float  # unique uplinks/s for the whole run; 0: as fast as the windows allow
    copies: int
    in_flight: int
    duration: float
    version: str = "1.0.0"
    vendor: str = "bsscihub"
    model: str = "sim"
    ca: str
    # One (cert, key) pair per base station, in base-station order.
    certs: tuple[tuple[str, str], ...]
    first_bs: int = 0
    processes: int = 1
    expect_att_prp: int | None = None  # per base station
    warmup_timeout: float = 300.0
    connect_timeout: float = 60.0
    drain_timeout: float = 10.0
    ping_idle: float = 30.0
    ping_timeout: float = 30.0
    payload_size: int = 10
    subpackets: int = 0
    first_packet_cnt: int = 0
    stack: str = "asyncio"
    seed: int = 1


@attrs.frozen(kw_only=True)
class WorkerPlan:
    """One worker process's share: a contiguous range of base stations and of sensors."""

    options: SimOptions
    worker: int
    bs_start: int  # index into options.certs; the EUI is first_bs + index
    bs_count: int
    sensor_start: int
    sensor_count: int
    rate: float
    start_at: float  # wall-clock time at which every worker starts connecting


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    size, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        count = size + (1 if i < extra else 0)
        out.append((start, count))
        start += count
    return out


def split(options: SimOptions, start_at: float) -> list[WorkerPlan]:
    """Split base stations, sensors and rate evenly: each sensor is heard only by base
    stations of its own worker, so no two workers ever send copies of one uplink."""
    parts = options.processes
    bs, sensors = _ranges(options.base_stations, parts), _ranges(options.sensors, parts)
    return [
        WorkerPlan(
            options=options,
            worker=i,
            bs_start=bs[i][0],
            bs_count=bs[i][1],
            sensor_start=sensors[i][0],
            sensor_count=sensors[i][1],
            rate=options.rate * sensors[i][1] / options.sensors if options.sensors else 0.0,
            start_at=start_at,
        )
        for i in range(parts)
    ]
