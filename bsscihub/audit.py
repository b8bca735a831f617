"""The audit log: who changed what, when, and from where — one row per change.

Every state-changing route, CLI command and MQTT command records through `record`.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bsscihub.contract import rfc3339
from bsscihub.ratelimit import ILimiter, local_limiter
from bsscihub.store import LIKE_ESCAPE, Cursor, Store, like_pattern, page


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
            "time": rfc3339(self.time),
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
            where.append(f"action LIKE ? {LIKE_ESCAPE}")
            params.append(like_pattern(action.rstrip("*"), anywhere=False))
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
        total, rows = page(c, "id, time, actor, action, target, detail, source", "audit_log", sql_where, params,
                           "time DESC, id DESC", limit, offset)
        entries = [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], _detail(r[5]), r[6]) for r in rows]
        return entries, total

    return await store.interaction(run)


async def purge(store: Store, older_than: float) -> int:
    """Delete entries older than `older_than` (seconds since 1970); returns how many."""
    return await store.execute("DELETE FROM audit_log WHERE time < ?", (older_than,))


@attrs.define
class _Repeats:
    first: float
    count: int = 0
    targets: list[str] = attrs.field(factory=list)
    last: Mapping[str, Any] = attrs.field(factory=dict)


class RefusalLog:
    """Refused requests in the audit log, aggregated so that a flood of them cannot fill it.

    Per (actor, action, source, error code), `burst` refusals per `interval` are written as they come
    (the hub's one rate limiter decides); the rest are counted, and `flush` (every interval) writes
    one entry per such group with `repeated` (how many), a few of their targets and the last detail.
    """

    log = Logger()
    SAMPLE = 10

    def __init__(self, store: Store, clock: IReactorTime, *, interval: float = 60.0, burst: int = 5,
                 max_keys: int = 10_000, limiter: Callable[..., ILimiter] = local_limiter) -> None:
        self.store, self.clock, self.interval, self.max_keys = store, clock, interval, max_keys
        # `Cluster.limiter`: in a cluster the burst is the cluster's, not each hub's.
        self._limiter = limiter("audit.refusals", clock, rate=burst / interval, burst=burst, max_keys=max_keys)
        self._held: OrderedDict[tuple[str, str, str, str], _Repeats] = OrderedDict()
        self.written = 0
        self.suppressed = 0

    async def record(self, actor: str, action: str, target: str = "", detail: Mapping[str, Any] | None = None,
                     source: str = "") -> None:
        code = str((detail or {}).get("code", ""))
        key = (actor, action, source, code)
        if await self._limiter.take(key) is None:
            self.written += 1
            await record(self.store, actor, action, target, detail, source)
            return
        self.suppressed += 1
        group = self._held.get(key)
        if group is None:
            if len(self._held) >= self.max_keys:
                # Too many distinct callers to follow one by one: the rest are counted together.
                key = ("*", action, "*", code)
                group = self._held.get(key)
            if group is None:
                group = self._held[key] = _Repeats(self.clock.seconds())
        group.count += 1
        if target and target not in group.targets and len(group.targets) < self.SAMPLE:
            group.targets.append(target)
        group.last = dict(detail or {})

    async def flush(self) -> None:
        """Write one entry per group of refusals held back since the last flush."""
        held, self._held = self._held, OrderedDict()
        for (actor, action, source, _), group in held.items():
            detail = {**group.last, "repeated": group.count, "targets": group.targets, "since": rfc3339(group.first)}
            try:
                self.written += 1
                await record(self.store, actor, action, group.targets[-1] if group.targets else "", detail, source)
            except Exception:
                self.log.failure("could not write aggregated refusals of {action}", action=action)
