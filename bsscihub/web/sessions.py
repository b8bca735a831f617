"""Server-side sessions of the admin pages: a random id in an HttpOnly cookie, the session in the database.

Stored by the SHA-256 of the id (a database dump holds no usable cookie), kept in memory while the hub runs
and loaded at start, so log-ins survive a restart. They end after `web.session_idle` without a request and
`web.session_max` after log-in (clock injected).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bsscihub.store import Cursor, Store

COOKIE = "bsscihub_session"
SECURE_COOKIE = "__Host-bsscihub_session"
"""Under HTTPS the __Host- prefix makes the browser insist on Secure, Path=/ and no Domain."""

TOUCH_EVERY = 60.0
"""last_seen is written back at most this often per session (idle expiry after a restart is that coarse)."""

@attrs.define(eq=False)
class Session:
    user_id: int
    name: str
    role: str
    csrf: str
    created: float
    last_seen: float
    source: str
    flashes: list[tuple[str, str]] = attrs.field(factory=list)
    """(kind, text) messages shown once on the next page; kind is "ok", "error" or "secret"."""
    stored_seen: float = 0.0
    """The last_seen the database has."""
    stored: bool = False
    """Its row is committed (a session only in memory is not judged by what the database lacks)."""

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken


def _key(session_id: str) -> str:
    # Kept by digest: a heap dump, a debug listing or the database never shows a usable cookie value.
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    log = Logger()

    def __init__(self, clock: IReactorTime, idle: float, max_age: float, limit: int = 10_000,
                 store: Store | None = None) -> None:
        self.clock, self.idle, self.max_age, self.limit = clock, idle, max_age, limit
        self.store = store
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _live(self, session: Session, now: float) -> bool:
        return now - session.last_seen < self.idle and now - session.created < self.max_age

    # -- persistence

    def _delete_expired(self, c: Cursor, now: float) -> None:
        """Both at start and in housekeeping: rows idle or older than a session may live are gone."""
        c.execute("DELETE FROM web_sessions WHERE last_seen <= ? OR created <= ?",
                  (now - self.idle, now - self.max_age))

    async def load(self) -> int:
        """At start: forget expired sessions in the database, take the live ones (of enabled users)."""
        if self.store is None:
            return 0
        now = self.clock.seconds()

        def run(c: Cursor) -> list[tuple[Any, ...]]:
            self._delete_expired(c, now)
            return c.execute(
                "SELECT s.id_hash, s.user_id, u.name, u.role, s.csrf, s.created, s.last_seen, s.source"
                " FROM web_sessions s JOIN users u ON u.id = s.user_id WHERE u.disabled = 0"
                " ORDER BY s.last_seen",
            ).fetchall()

        rows = await self.store.interaction(run)
        for key, user_id, name, role, csrf, created, last_seen, source in rows[-self.limit:]:
            self._sessions[key] = Session(int(user_id), name, role, csrf, float(created), float(last_seen), source,
                                          stored_seen=float(last_seen), stored=True)
        return len(rows)

    async def purge(self) -> None:
        """Housekeeping: expired sessions leave memory and the database; changes made by another process
        (`bsscihub user disable|passwd` deletes a user's rows; `user role`) reach the sessions in memory."""
        self._expire()
        if self.store is None:
            return
        now = self.clock.seconds()
        # Only sessions whose row was committed before the read below can be missing from it.
        stored = {key for key, session in self._sessions.items() if session.stored}

        def run(c: Cursor) -> list[tuple[Any, ...]]:
            self._delete_expired(c, now)
            return c.execute("SELECT s.id_hash, u.role, u.disabled FROM web_sessions s"
                             " JOIN users u ON u.id = s.user_id").fetchall()

        present = {row[0]: (row[1], bool(row[2])) for row in await self.store.interaction(run)}
        for key in stored:
            session = self._sessions.get(key)
            if session is None:
                continue
            found = present.get(key)
            if found is None or found[1]:
                del self._sessions[key]
            else:
                session.role = found[0]

    def _write(self, sql: str, params: tuple[Any, ...]) -> defer.Deferred[Any]:
        if self.store is None or not self.store.running:
            return defer.succeed(None)
        d = self.store.execute(sql, params)
        d.addErrback(lambda f: self.log.failure("could not store a web session change", f))
        return d

    # -- sessions

    async def create(self, user_id: int, name: str, role: str, source: str) -> tuple[str, Session]:
        """A new session, stored; returns the cookie value (only ever sent to the browser) and the session."""
        self._expire()
        while len(self._sessions) >= self.limit:
            old, _ = self._sessions.popitem(last=False)  # the least recently used one goes first
            self._write("DELETE FROM web_sessions WHERE id_hash = ?", (old,))
        session_id = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        session = Session(user_id, name, role, secrets.token_urlsafe(32), now, now, source, stored_seen=now)
        key = _key(session_id)
        self._sessions[key] = session
        if self.store is not None:
            await self.store.execute(
                "INSERT INTO web_sessions (id_hash, user_id, csrf, created, last_seen, source)"
                " VALUES (?, ?, ?, ?, ?, ?)", (key, user_id, session.csrf, now, now, source[:100]))
            session.stored = True
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value (and mark it used), or None if unknown or expired."""
        if not session_id or len(session_id) > 128:
            return None
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock.seconds()
        if not self._live(session, now):
            del self._sessions[key]
            self._write("DELETE FROM web_sessions WHERE id_hash = ?", (key,))
            return None
        session.last_seen = now
        self._sessions.move_to_end(key)
        if now - session.stored_seen >= TOUCH_EVERY:
            # A write per page view would cost more than the page; once a minute is enough.
            session.stored_seen = now
            self._write("UPDATE web_sessions SET last_seen = ? WHERE id_hash = ?", (now, key))
        return session

    def expires_at(self, session: Session) -> float:
        return min(session.last_seen + self.idle, session.created + self.max_age)

    async def drop(self, session_id: str | None) -> None:
        if session_id:
            key = _key(session_id)
            self._sessions.pop(key, None)
            await self._write("DELETE FROM web_sessions WHERE id_hash = ?", (key,))

    async def drop_user(self, user_id: int, *, keep: Session | None = None) -> int:
        """End every session of a user (disabled, deleted, new password); returns how many."""
        doomed = [k for k, s in self._sessions.items() if s.user_id == user_id and s is not keep]
        for k in doomed:
            del self._sessions[k]
        kept = next((k for k, s in self._sessions.items() if s is keep), "") if keep is not None else ""
        await self._write("DELETE FROM web_sessions WHERE user_id = ? AND id_hash <> ?", (user_id, kept))
        return len(doomed)

    def set_role(self, user_id: int, role: str) -> None:
        # Memory only: the database has no role of its own (load() takes the user's).
        for session in self._sessions.values():
            if session.user_id == user_id:
                session.role = role

    def _expire(self) -> None:
        now = self.clock.seconds()
        for k in [k for k, s in self._sessions.items() if not self._live(s, now)]:
            del self._sessions[k]

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"user": s.name, "role": s.role, "created": s.created, "lastSeen": s.last_seen, "source": s.source}
            for s in self._sessions.values()
        ]
