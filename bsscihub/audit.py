"""The audit log: who changed what, when, and from where — one row per change.

Every state-changing route, CLI command and MQTT command records through `record`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from bsscihub.store import Cursor, Store


@attrs.frozen
class AuditEntry:
    id: int
    time: float
    actor: str
    action: str
    target: str
    detail: Mapping[str, Any]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": dict(self.detail),
            "source": self.source,
        }


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


def _detail(text: str) -> Mapping[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


async def query(
    store: Store,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[AuditEntry], int]:
    """Newest first. `action` ending in '.' or '*' matches a prefix ("user." finds user.add, user.delete)."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if actor:
        where.append("actor = ?")
        params.append(actor)
    if action:
        if action.endswith(("*", ".")):
            where.append("action LIKE ?")
            params.append(action.rstrip("*").replace("%", "").replace("_", "\\_") + "%")
            where[-1] += " ESCAPE '\\'"
        else:
            where.append("action = ?")
            params.append(action)
    if target:
        where.append("target = ?")
        params.append(target)
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    if until is not None:
        where.append("time < ?")
        params.append(until)
    sql_where = " AND ".join(where)

    def run(c: Cursor) -> tuple[list[AuditEntry], int]:
        total = c.execute(f"SELECT COUNT(*) FROM audit_log WHERE {sql_where}", params).fetchone()
        rows = c.execute(
            "SELECT id, time, actor, action, target, detail, source FROM audit_log"
            f" WHERE {sql_where} ORDER BY time DESC, id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        entries = [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], _detail(r[5]), r[6]) for r in rows]
        return entries, int(total[0]) if total else 0

    return await store.interaction(run)
