"""Server-side sessions of the admin pages: a random id in an HttpOnly cookie, everything else in memory.

Sessions end after `web.session_idle` without a request and `web.session_max` after log-in (clock injected).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

COOKIE = "bsscihub_session"
SECURE_COOKIE = "__Host-bsscihub_session"
"""Under HTTPS the __Host- prefix makes the browser insist on Secure, Path=/ and no Domain."""


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

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken


def _key(session_id: str) -> str:
    # Kept by digest: a heap dump or debug listing never shows a usable cookie value.
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    def __init__(self, clock: IReactorTime, idle: float, max_age: float, limit: int = 10_000) -> None:
        self.clock, self.idle, self.max_age, self.limit = clock, idle, max_age, limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user_id: int, name: str, role: str, source: str) -> tuple[str, Session]:
        """A new session; returns the cookie value (only ever sent to the browser) and the session."""
        self._expire()
        while len(self._sessions) >= self.limit:
            self._sessions.popitem(last=False)  # the least recently used one goes first
        session_id = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        session = Session(user_id, name, role, secrets.token_urlsafe(32), now, now, source)
        self._sessions[_key(session_id)] = session
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
        if now - session.last_seen >= self.idle or now - session.created >= self.max_age:
            del self._sessions[key]
            return None
        session.last_seen = now
        self._sessions.move_to_end(key)
        return session

    def expires_at(self, session: Session) -> float:
        return min(session.last_seen + self.idle, session.created + self.max_age)

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_key(session_id), None)

    def drop_user(self, user_id: int, *, keep: Session | None = None) -> int:
        """End every session of a user (disabled, deleted, new password); returns how many."""
        doomed = [k for k, s in self._sessions.items() if s.user_id == user_id and s is not keep]
        for k in doomed:
            del self._sessions[k]
        return len(doomed)

    def set_role(self, user_id: int, role: str) -> None:
        for session in self._sessions.values():
            if session.user_id == user_id:
                session.role = role

    def _expire(self) -> None:
        now = self.clock.seconds()
        dead = [
            k for k, s in self._sessions.items() if now - s.last_seen >= self.idle or now - s.created >= self.max_age
        ]
        for k in dead:
            del self._sessions[k]

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"user": s.name, "role": s.role, "created": s.created, "lastSeen": s.last_seen, "source": s.source}
            for s in self._sessions.values()
        ]
