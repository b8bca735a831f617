"""What every MQTT payload and REST body of the hub shares: RFC 3339 UTC times and JSON-safe numbers.

One copy for every family, so a drifting family cannot publish epoch floats or NaN where the contract says otherwise.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping
from typing import Any

_last_second: list[Any] = [None, ""]  # most events of one second format the same second


def rfc3339(seconds: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z."""
    whole = math.floor(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    if whole != _last_second[0]:
        _last_second[:] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_last_second[1]}.{millis:03d}Z"


def opt_time(seconds: float | None) -> str | None:
    """rfc3339, with None (never happened) kept as None."""
    return None if seconds is None else rfc3339(float(seconds))


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def nanoseconds_of(text: Any) -> int | None:
    """An RFC 3339 time (as rfc3339 writes it, or with an offset) as integer Unix nanoseconds,
    exactly; None when `text` is not one. A time without an offset is taken as UTC."""
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    delta = stamp - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def non_finite_name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def finite(value: Any, invalid: dict[str, str] | None = None, path: str = "") -> Any:
    """A copy of a decoded document in which every NaN/±Infinity is null, each recorded in `invalid`
    as {"dotted.path": "NaN" | "Infinity" | "-Infinity"}.

    The hub's one rule for numbers JSON cannot carry: a document keeps its other fields, the number
    becomes null and the event says why; so nothing is accepted that the bridge then cannot publish.
    Byte strings become hex, as everywhere in the contract.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if invalid is not None:
            invalid[path or "value"] = non_finite_name(value)
        return None
    if isinstance(value, Mapping):
        return {str(k): finite(v, invalid, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, invalid, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def finite_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`finite` for an event payload: when something was nulled, the payload says which and why
    under "invalid" ({"temp": "NaN"}); a clean payload is returned unchanged in shape."""
    invalid: dict[str, str] = {}
    cleaned: dict[str, Any] = finite(doc, invalid)
    if invalid:
        cleaned["invalid"] = invalid
    return cleaned
