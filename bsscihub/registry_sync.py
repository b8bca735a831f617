"""Registry edits every hub of a cluster must see: a family notes a rename, removal or other admin edit of a
row it keeps in memory, and each other hub re-reads the rows noted within seconds (one table for all families).

Additions go through SharedRegistry: the database decides which hub's insert made a row (that hub announces it)
and keeps a capped table within its cap for the whole cluster; each family loads the rows other hubs registered.
An edit is a (kind, key) the family re-reads from its tables: present, it takes the new values; gone, it drops
it from memory. The table is the core's migration `registry` 1 (bsscihub.store.schema).
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from bsscihub.hub import Hub
    from bsscihub.store import Cursor, Store

MARGIN = 60.0
"""How far back each look reaches: rows commit out of order and hubs' clocks differ a little."""
KEEP = 3600.0
"""Noted edits older than this are deleted (a hub started later loads the whole registry anyway)."""

Apply = Callable[[str, Sequence[str]], Awaitable[None]]
"""apply(kind, keys): re-read these rows of the family's registry into memory (dropping those gone)."""


def note_change(cursor: Cursor, family: str, kind: str, key: str, node: str, time: float) -> None:
    """Note an edit of row `key` made on hub `node`, inside the transaction that makes it: whoever sees the
    edit sees the note (e.g. mioty: a removal reported by the hub that made it is not reported again)."""
    cursor.execute("INSERT INTO registry_changes (family, kind, key, node, time) VALUES (?, ?, ?, ?, ?)",
                   (family, kind, key, node, time))


async def noted(store: Store, family: str, kind: str, keys: Sequence[str]) -> set[str]:
    """Which of `keys` a hub noted an edit of (within the notes kept, an hour)."""
    found: set[str] = set()
    for start in range(0, len(keys), 500):  # a bulk removal's keys, within any database's count of parameters
        chunk = keys[start:start + 500]
        rows = await store.fetchall(
            f"SELECT DISTINCT key FROM registry_changes WHERE family = ? AND kind = ? AND key IN"
            f" ({', '.join('?' * len(chunk))})", (family, kind, *chunk))
        found.update(key for key, in rows)
    return found


def prune_notes(cursor: Cursor, family: str, before: float) -> None:
    cursor.execute("DELETE FROM registry_changes WHERE family = ? AND time < ?", (family, before))


class RegistryChanges:
    """One family's edits: `note` them where they are made, `poll` (every few seconds) where they are not."""

    log = Logger()

    def __init__(self, hub: Hub, family: str, apply: Apply) -> None:
        self.hub, self.family, self._apply = hub, family, apply
        self._clock = hub.reactor
        self._since = self._clock.seconds()
        self._seen: dict[int, float] = {}
        self._pruned = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.hub.cluster.clustered)

    async def note(self, kind: str, key: str) -> None:
        """Record that row `key` of `kind` changed here (once it is written). Nothing for one hub."""
        if self.enabled:
            await self.hub.store.interaction(note_change, self.family, kind, key, self.hub.cluster.node,
                                             self._clock.seconds())

    async def poll(self) -> None:
        """Apply the edits other hubs noted since the last look, each once."""
        now = self._clock.seconds()
        since, self._since = self._since - MARGIN, now
        rows = await self.hub.store.fetchall(
            "SELECT id, kind, key, time FROM registry_changes WHERE family = ? AND time >= ? AND node <> ?"
            " ORDER BY id", (self.family, since, self.hub.cluster.node))
        fresh = [(int(i), kind, key, float(t)) for i, kind, key, t in rows if int(i) not in self._seen]
        kinds: dict[str, list[str]] = {}
        for _, kind, key, _ in fresh:
            if key not in kinds.setdefault(kind, []):
                kinds[kind].append(key)
        for kind, keys in kinds.items():
            await self._apply(kind, keys)
        self._seen.update((i, t) for i, _, _, t in fresh)
        self._seen = {i: t for i, t in self._seen.items() if t >= since - MARGIN}
        if now - self._pruned >= KEEP / 4:
            self._pruned = now
            await self.hub.store.interaction(prune_notes, self.family, now - KEEP)


class RegistryFull(Exception):
    """The table holds `cap` rows already, counted over every hub of the cluster."""


class SharedRegistry:
    """New rows of one registry table of a cluster, decided by the shared database.

    `insert` fires None when this hub's insert made the row (so this hub announces it), or the row another hub
    made (adopted silently), or fails with RegistryFull. With a cap, the count and the insert are one
    transaction, under a PostgreSQL advisory lock per table: hubs registering at once count one after the
    other, each seeing the rows the one before it added. Inserts of one key wait for the one in flight here.
    """

    def __init__(self, store: Store, table: str, key: str, columns: Sequence[str], cap: int,
                 stored: Sequence[str] | None = None) -> None:
        self._store, self.table, self.cap = store, table, cap
        self._insert = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                        f" ON CONFLICT ({key}) DO NOTHING")
        self._select = f"SELECT {', '.join(stored or columns)} FROM {table} WHERE {key} = ?"
        self._lock = zlib.crc32(f"bsscihub registry {table}".encode())
        self._pending: dict[str, list[defer.Deferred[Any]]] = {}

    def registering(self, key: str) -> bool:
        return key in self._pending

    async def settled(self) -> None:
        """Once no insert is in flight (a family's stop: what waits for one is taken before the last write)."""
        while self._pending:
            waiting: defer.Deferred[Any] = defer.Deferred()
            self._pending[next(iter(self._pending))].append(waiting)
            await defer.DeferredList([waiting], consumeErrors=True)

    def insert(self, key: str, row: Sequence[Any], *, capped: bool = True) -> defer.Deferred[tuple[Any, ...] | None]:
        waiting: defer.Deferred[tuple[Any, ...] | None] = defer.Deferred()
        if key in self._pending:
            self._pending[key].append(waiting)
            return waiting
        self._pending[key] = [waiting]
        self._store.interaction(self._decide, key, tuple(row), capped).addBoth(self._decided, key)
        return waiting

    def _decide(self, cursor: Cursor, key: str, row: tuple[Any, ...], capped: bool) -> tuple[Any, ...] | None:
        if capped and self.cap:
            if self._store.dialect == "postgresql":
                cursor.execute("SELECT pg_advisory_xact_lock(CAST(? AS BIGINT))", (self._lock,))
            stored = cursor.execute(self._select, (key,)).fetchone()
            if stored is not None:
                return stored
            (count,) = cursor.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone() or (0,)
            if count >= self.cap:
                raise RegistryFull(f"{self.table} holds {count} rows, the cap is {self.cap}")
        if cursor.execute(self._insert, row).rowcount:
            return None
        return cursor.execute(self._select, (key,)).fetchone()

    def _decided(self, result: Any, key: str) -> None:
        for waiting in self._pending.pop(key):
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)
