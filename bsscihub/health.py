"""Component health for /health and the probes: every part of the hub registers a check returning its state.

The hub is ready when it has started and every component needed to serve is up; a component registered
with `needed=False` (the MQTT broker: the outbox covers its outages) is reported but never makes it unready.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs


@attrs.frozen
class ComponentHealth:
    up: bool
    detail: Mapping[str, Any] = attrs.field(factory=dict)


class HealthRegistry:
    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], ComponentHealth]] = {}
        self._optional: set[str] = set()
        self.started = False
        """Set by the hub service once storage is migrated and every service has started."""

    def register(self, name: str, check: Callable[[], ComponentHealth], *, needed: bool = True) -> None:
        self._checks[name] = check
        if needed:
            self._optional.discard(name)
        else:
            self._optional.add(name)

    def check(self) -> dict[str, ComponentHealth]:
        out: dict[str, ComponentHealth] = {}
        for name, check in sorted(self._checks.items()):
            try:
                out[name] = check()
            except Exception as e:  # a broken check is a down component, not a 500
                out[name] = ComponentHealth(False, {"error": str(e)})
        return out

    def not_ready(self, checked: Mapping[str, ComponentHealth] | None = None) -> list[str]:
        """Why the hub is not ready (empty when it is): names of needed components that are down."""
        checked = self.check() if checked is None else checked
        reasons = [] if self.started else ["starting"]
        reasons += [name for name, health in checked.items() if not health.up and name not in self._optional]
        return reasons

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON-ready document): status ok (all up), degraded (ready, something optional down)
        or unavailable (not ready)."""
        checked = self.check()
        reasons = self.not_ready(checked)
        components = {name: {"up": h.up, **({"needed": False} if name in self._optional else {}), **h.detail}
                      for name, h in checked.items()}
        all_up = all(h.up for h in checked.values())
        status = "unavailable" if reasons else "ok" if all_up else "degraded"
        doc: dict[str, Any] = {"status": status, "components": components}
        if reasons:
            doc["notReady"] = reasons
        return not reasons, doc
