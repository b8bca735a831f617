"""Downlinks to mioty end points between the REST/MQTT request and the base station's dlDataRes.
Held in memory while pending; every change is written to mioty_downlinks."""

from __future__ import annotations

import attrs

__all__ = ["Downlink"]


@attrs.define
class Downlink:
    """A queued downlink until a base station reports it sent (or every target reported)."""

    que_id: int
    ep_eui: str
    targets: list[str]
    results: dict[str, str] = attrs.field(factory=dict)
