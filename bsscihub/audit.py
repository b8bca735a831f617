"""The audit log: who changed what, when, and from where — one row per change.

Every state-changing route, CLI command and MQTT command records through `record`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from bsscihub.store import Store


async def record(
    store: Store,
    actor: str,
    action: str,
    target: str = "",
    detail: Mapping[str, Any] | None = None,
    source: str = "",
) -> None:
    await store.execute(
        "INSERT INTO audit_log (time, actor, action, target, detail, source) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), actor, action, target, json.dumps(detail or {}, sort_keys=True), source),
    )
