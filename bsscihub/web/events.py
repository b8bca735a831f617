"""Bus events as the web sees them: channels (`family/kind`), redacted JSON, per-minute counts, the latest few.

The dashboard's chart and its list of latest events start from here; the live stream continues them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime

from bsscihub.bus import Event

_SECRET_KEYS = {"nwkey", "password", "secret", "token", "key", "apikey", "privatekey"}


def channel_of(event: Event) -> str:
    return f"{event.family}/{event.kind}"


def redact(value: Any) -> Any:
    """A copy with secret-looking fields masked: viewers see the stream, but never key material."""
    if isinstance(value, Mapping):
        return {k: ("***" if str(k).lower() in _SECRET_KEYS else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def event_json(event: Event, now: float) -> dict[str, Any]:
    return {"channel": channel_of(event), "topic": event.topic, "time": now, "payload": redact(event.payload)}


class EventStats:
    """A bus sink: counts events per channel per minute over the last hour, keeps the latest events."""

    def __init__(self, clock: IReactorTime, *, minutes: int = 60, keep: int = 50) -> None:
        self.clock, self.minutes = clock, minutes
        self._counts: dict[str, dict[int, int]] = {}
        # Raw events: redacting and copying only when the dashboard asks keeps this sink cheap
        # on the uplink hot path (it runs for every event, the page reads 50 of them).
        self._recent: deque[tuple[Event, float]] = deque(maxlen=keep)

    def __call__(self, event: Event) -> None:
        now = self.clock.seconds()
        minute = int(now // 60)
        counts = self._counts.setdefault(channel_of(event), {})
        counts[minute] = counts.get(minute, 0) + 1
        if len(counts) > self.minutes + 1:
            for old in [m for m in counts if m <= minute - self.minutes]:
                del counts[old]
        self._recent.append((event, now))

    def rates(self) -> dict[str, Any]:
        """Counts per minute for each channel, oldest first, the last entry being the current minute."""
        current = int(self.clock.seconds() // 60)
        first = current - self.minutes + 1
        series = {
            channel: [counts.get(m, 0) for m in range(first, current + 1)] for channel, counts in self._counts.items()
        }
        return {"start": first * 60, "step": 60, "series": dict(sorted(series.items()))}

    def recent(self) -> list[dict[str, Any]]:
        return [event_json(event, when) for event, when in reversed(self._recent)]
