"""Component health for /health: every part of the hub registers a check returning its state.

The hub is healthy when every component is up; /health answers 503 otherwise.
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

    def register(self, name: str, check: Callable[[], ComponentHealth]) -> None:
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(all up, JSON-ready document)."""
        components: dict[str, Any] = {}
        all_up = True
        for name, check in sorted(self._checks.items()):
            try:
                health = check()
            except Exception as e:  # a broken check is a down component, not a 500
                health = ComponentHealth(False, {"error": str(e)})
            all_up = all_up and health.up
            components[name] = {"up": health.up, **health.detail}
        return all_up, {"status": "ok" if all_up else "degraded", "components": components}
