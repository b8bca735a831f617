"""Coverage: which base stations heard which sensors and meters lately, with link quality.
Read from the stored uplink copies and meter readings; the network page and GET /mioty/network show it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_METER_READINGS", "coverage", "quality"]

MAX_METER_READINGS = 20_000  # newest meter readings read for one answer; older ones only age out of the window


def quality(snr: float | None) -> str:
    """A link's class by its mean SNR in dB (mioty decodes down to about -13 dB)."""
    if snr is None:
        return "none"
    if snr >= 10:
        return "good"
    if snr >= 0:
        return "fair"
    return "poor"


def _link(device: str, kind: str, bs: str, count: int, snr: float, rssi: float, best: float,
          last: float) -> dict[str, Any]:
    return {"device": device, "kind": kind, "bsEui": bs, "count": count, "snr": round(snr, 2),
            "rssi": round(rssi, 2), "bestSnr": round(best, 2), "lastHeard": last, "quality": quality(snr)}


async def coverage(service: Any, since: float) -> dict[str, Any]:
    """{"since", "baseStations": [{bsEui, name, state, devices}], "links": [{device, kind (sensor|meter), bsEui,
    count, snr and rssi (means), bestSnr, lastHeard (Unix s), quality (good|fair|poor)}]} for copies heard since
    `since` (Unix s); every copy of an uplink counts for the station that heard it."""
    store = service.registry.store
    links: list[dict[str, Any]] = []
    rows = await store.fetchall(
        "SELECT ep_eui, bs_eui, count(*), avg(snr), avg(rssi), max(snr), max(received) FROM mioty_uplinks"
        " WHERE received >= ? GROUP BY ep_eui, bs_eui", (since,))
    for ep, bs, count, snr, rssi, best, last in rows:
        links.append(_link(ep, "sensor", bs, int(count), float(snr), float(rssi), float(best), float(last)))
    heard: dict[tuple[str, str], list[float]] = {}  # (meter, bsEui) -> [count, snr sum, rssi sum, best, last]
    readings = await store.fetchall(
        "SELECT meter, received, payload FROM mioty_meter_readings WHERE received >= ? ORDER BY received DESC"
        " LIMIT ?", (since, MAX_METER_READINGS))
    for meter, received, payload in readings:
        try:
            receivers = json.loads(payload).get("receivers") or ()
        except (ValueError, AttributeError):
            continue
        for r in receivers:
            if not isinstance(r, dict) or not isinstance(r.get("bsEui"), str):
                continue
            snr, rssi = r.get("snr"), r.get("rssi")
            if not isinstance(snr, (int, float)) or not isinstance(rssi, (int, float)):
                continue
            acc = heard.setdefault((meter, r["bsEui"]), [0, 0.0, 0.0, float("-inf"), 0.0])
            acc[0] += 1
            acc[1] += snr
            acc[2] += rssi
            acc[3] = max(acc[3], snr)
            acc[4] = max(acc[4], float(received))
    for (meter, bs), (count, snr_sum, rssi_sum, best, last) in heard.items():
        links.append(_link(meter, "meter", bs, int(count), snr_sum / count, rssi_sum / count, best, last))
    links.sort(key=lambda link: (link["kind"] != "sensor", link["device"], -link["snr"]))
    devices: dict[str, set[str]] = {}
    for link in links:
        devices.setdefault(link["bsEui"], set()).add(link["device"])
    stations = []
    for eui in sorted(set(service.registry.base_stations) | set(devices)):
        bs = service.registry.base_stations.get(eui)
        stations.append({"bsEui": eui, "name": getattr(bs, "name", None),
                         "state": "online" if getattr(bs, "online", False) else "offline",
                         "devices": len(devices.get(eui, ()))})
    return {"since": since, "baseStations": stations, "links": links}
