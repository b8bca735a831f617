"""What every MQTT payload and REST body of the hub shares: RFC 3339 UTC times and JSON-safe numbers.

One copy for every family, so a drifting family cannot publish epoch floats or NaN where the contract says otherwise.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import attrs

if TYPE_CHECKING:
    from bsscihub.bus import Event
    from bsscihub.family import EventSpec

_last_second: list[Any] = [None, ""]  # most events of one second format the same second


def rfc3339(seconds: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z."""
    whole = math.floor(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    if whole != _last_second[0]:
        _last_second[:] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_last_second[1]}.{millis:03d}Z"


_HEX16 = re.compile(r"[0-9a-fA-F]{16}")


def eui64(value: Any) -> str | None:
    """An EUI-64 as the contract writes it (16 lower-case hex digits) from 16 hex digits in any case or
    an integer below 2**64; None when `value` is neither (each caller raises its own kind of error)."""
    if type(value) is int:
        return f"{value:016x}" if 0 <= value < 1 << 64 else None
    if isinstance(value, str) and _HEX16.fullmatch(value):
        return value.lower()
    return None


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


# -- checking events against a family's EventSpecs (the hub's contract test and third-party families' own)

TIME_KEYS = frozenset({"time", "since", "lastSeen"})
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@attrs.frozen
class Shape:
    """The top-level keys an object payload has: `required` always, `optional` (written "key"?) sometimes."""

    required: frozenset[str]
    optional: frozenset[str]
    open: bool = False
    """Written with `...`: other keys may follow (the fields of an event's kind)."""

    def mismatch(self, keys: Iterable[str]) -> tuple[list[str], list[str]]:
        """The required keys a payload with `keys` lacks, and the keys it has that the shape does not name."""
        present = set(keys)
        extra = [] if self.open else sorted(present - self.required - self.optional)
        return sorted(self.required - present), extra


def shape_of(text: str) -> Shape | None:
    """The keys of a payload written as the docs and EventSpecs write it, e.g.
    `{"mac", "time", "values": {quantity: number}, "invalid"?} (note)`; None for a prose description."""
    text = text.strip().strip("`").strip()
    if not text.startswith("{"):
        return None
    required: set[str] = set()
    optional: set[str] = set()
    depth, i, expecting_key, is_open = 0, 0, False, False
    while i < len(text):
        ch = text[i]
        if text.startswith("...", i) and depth == 1:
            is_open, i = True, i + 3
            continue
        if ch in "{[":
            depth += 1
            expecting_key = depth == 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                break
        elif ch == "," and depth == 1:
            expecting_key = True
        elif ch == '"':
            end = text.index('"', i + 1)
            if depth == 1 and expecting_key:
                rest = text[end + 1:].lstrip()
                (optional if rest.startswith("?") else required).add(text[i + 1:end])
                expecting_key = False
            i = end
        elif not ch.isspace() and depth == 1:
            expecting_key = False
        i += 1
    return Shape(frozenset(required), frozenset(optional), is_open)


def topic_pattern(spec_topic: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(spec_topic)) + "$")


def event_problems(event: Event, specs: Iterable[EventSpec]) -> list[str]:
    """What is wrong with `event` against the family's specs (empty: it conforms)."""
    candidates = [s for s in specs if s.kind == event.kind]
    if not candidates:
        return [f"{event.family}: kind {event.kind!r} ({event.topic}) is declared by no EventSpec"]
    problems: list[str] = []
    for spec in candidates:
        problems = []
        if not topic_pattern(spec.topic).match(event.topic):
            problems.append(f"topic {event.topic} does not match {spec.topic}")
        if spec.retained != event.retain:
            problems.append(f"{event.topic}: retain {event.retain}, declared {spec.retained}")
        shape = shape_of(spec.payload)
        if shape is not None:
            missing, extra = shape.mismatch(event.payload)
            if missing:
                problems.append(f"{event.topic}: missing {missing}")
            if extra:
                problems.append(f"{event.topic}: undeclared {extra}")
        problems += time_problems(event.topic, event.payload)
        if not problems:
            return []
    return problems


def time_problems(where: str, payload: Mapping[str, Any]) -> list[str]:
    """Times in a payload are RFC 3339 strings (or null), never epoch numbers."""
    return [
        f"{where}: {key} = {payload[key]!r} is not RFC 3339"
        for key in TIME_KEYS & set(payload)
        if payload[key] is not None and not (isinstance(payload[key], str) and RFC3339.match(payload[key]))
    ]


def masked_url(url: str) -> str:
    """The URL as shown to people and logs: a password in it replaced by ***; a URL that does not parse as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))
