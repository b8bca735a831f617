"""Who is calling: session cookies, bearer tokens and named API keys, WebSocket tickets, login rate limits.

Tokens are `bsh_<prefix>_<secret>`: the prefix finds the row, the 256-bit secret is stored as its SHA-256.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from bsscihub import tokens
from bsscihub.contract import opt_time
from bsscihub.ratelimit import ILimiter, local_limiter
from bsscihub.store import Cursor, Store, page
from bsscihub.users import RANK, User
from bsscihub.web.errors import unauthorized
from bsscihub.web.proxy import client_of
from bsscihub.web.sessions import COOKIE, SECURE_COOKIE, Session, SessionStore

# A fast hash is right here, unlike for passwords: a secret of 256 random bits cannot be
# guessed however fast each guess is, so Argon2 would only cost ~50 ms on every API request.
TOKEN_SCHEME = "bsh"
TOKENS = tokens.Scheme(TOKEN_SCHEME, prefix_hex=12)
TICKET_TTL = 30.0
KEY_CACHE_TTL = 5.0


@attrs.frozen
class Principal:
    """An authenticated caller; `role` is the effective one (a key never exceeds its user)."""

    user_id: int
    name: str
    role: str
    via: str  # "session", "token", "key" or "ticket"
    key_id: int | None = None
    session: Session | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class ApiKey:
    id: int
    name: str
    user: str
    prefix: str
    role: str
    kind: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "user": self.user,
            "prefix": f"{TOKEN_SCHEME}_{self.prefix}",
            "role": self.role,
            "kind": self.kind,
            "createdAt": opt_time(self.created_at),
            "expiresAt": opt_time(self.expires_at),
            "revokedAt": opt_time(self.revoked_at),
            "lastUsedAt": opt_time(self.last_used_at),
            "state": self.state(now),
        }


def hash_secret(token: tokens.Token) -> str:
    """What api_keys.secret_hash holds: the SHA-256 of the secret part alone."""
    return "sha256:" + tokens.sha256_hex(token.secret)


_KEY_COLUMNS = (
    "k.id, k.name, u.name, k.prefix, k.role, k.kind, k.created_at, k.expires_at, k.revoked_at, k.last_used_at"
)


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(
        int(row[0]), row[1], row[2], row[3], row[4], row[5], float(row[6]),
        None if row[7] is None else float(row[7]),
        None if row[8] is None else float(row[8]),
        None if row[9] is None else float(row[9]),
    )


async def create_key(
    store: Store, user: User, name: str, role: str, kind: str, now: float, expires_at: float | None
) -> tuple[ApiKey, str]:
    """Store a new key or login token; returns it and the token text (never stored, shown once)."""
    token, secret_hash = TOKENS.mint(hash_secret)

    def insert(c: Cursor) -> ApiKey:
        row = c.execute(
            "INSERT INTO api_keys (name, user_id, prefix, secret_hash, role, created_at, expires_at, kind)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (name, user.id, token.prefix, secret_hash, role, now, expires_at, kind),
        ).fetchone()
        assert row is not None
        return ApiKey(int(row[0]), name, user.name, token.prefix, role, kind, now, expires_at, None, None)

    return await store.interaction(insert), token.text


async def list_keys(
    store: Store, *, user_id: int | None, kind: str = "key", limit: int = 50, offset: int = 0
) -> tuple[list[ApiKey], int]:
    where, params = ["k.kind = ?"], [kind]
    if user_id is not None:
        where.append("k.user_id = ?")
        params.append(user_id)  # type: ignore[arg-type]
    sql_where = " AND ".join(where)

    def run(c: Cursor) -> tuple[list[ApiKey], int]:
        total, rows = page(c, _KEY_COLUMNS, "api_keys k JOIN users u ON u.id = k.user_id", sql_where, params,
                           "k.created_at DESC, k.id DESC", limit, offset, counted="api_keys k")
        return [_key(r) for r in rows], total

    return await store.interaction(run)


async def get_key(store: Store, key_id: int) -> ApiKey | None:
    row = await store.fetchone(
        f"SELECT {_KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.id = ?", (key_id,)
    )
    return None if row is None else _key(row)


async def revoke_key(store: Store, key_id: int, now: float) -> bool:
    """Mark a key revoked (the row stays for the record); False if it was revoked already."""
    count = await store.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
    )
    return count > 0


async def revoke_user_tokens(store: Store, user_id: int, now: float, *, keys_too: bool = False) -> int:
    kinds = "" if keys_too else " AND kind = 'token'"
    return await store.execute(
        f"UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL{kinds}", (now, user_id)
    )


class LoginLimiter:
    """Wrong passwords counted per account *and* client address, and per address; never per account alone.

    So nobody can lock an account out for others: five wrong passwords from one address make that
    address wait, while the right password from anywhere else still gets in. Guessing one account
    from many addresses is slowed down instead (each attempt answered after a delay), not locked.
    The limits come from `limiter` (`Cluster.limiter`): in a cluster every hub counts the same attempts.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        limiter: Callable[..., ILimiter] = local_limiter,
        per_account_source: tuple[int, float] = (5, 900.0),
        per_source: tuple[int, float] = (20, 300.0),
        slow_after: tuple[int, float] = (20, 900.0),
        slow_down: float = 2.0,
        max_keys: int = 100_000,
    ) -> None:
        def limit(name: str, limit: tuple[int, float]) -> ILimiter:
            count, window = limit
            return limiter(name, clock, rate=count / window, burst=count, max_keys=max_keys)

        self.per_account_source = limit("login.account-source", per_account_source)
        self.per_source = limit("login.source", per_source)
        self.per_account = limit("login.account", slow_after)
        self.slow_down = slow_down

    async def retry_after(self, source: str, account: str) -> float | None:
        """Seconds until this address may try this account again, or None if it may now."""
        waits = [w for w in (await self.per_account_source.wait((account.lower(), source)),
                             await self.per_source.wait(source)) if w is not None]
        return max(waits) if waits else None

    async def delay(self, account: str) -> float:
        """How long to hold an attempt on an account many addresses are guessing at (0: none)."""
        return self.slow_down if await self.per_account.wait(account.lower()) is not None else 0.0

    async def failed(self, source: str, account: str) -> None:
        await self.per_account_source.spend((account.lower(), source))
        await self.per_source.spend(source)
        await self.per_account.spend(account.lower())

    async def succeeded(self, source: str, account: str) -> None:
        await self.per_account_source.forget((account.lower(), source))


@attrs.frozen
class _Ticket:
    principal: Principal
    expires: float


class Authenticator:
    """Turns a request's credentials into a Principal, or refuses with 401."""

    def __init__(self, store: Store, sessions: SessionStore, clock: IReactorTime, *, secure: bool) -> None:
        self.store, self.sessions, self.clock, self.secure = store, sessions, clock, secure
        self._tickets: dict[str, _Ticket] = {}
        self._last_used: dict[int, float] = {}
        self._keys: dict[str, tuple[float, tuple[Any, ...]]] = {}

    # -- sessions

    def is_secure(self, request: Any) -> bool:
        """HTTPS here, or at a trusted reverse proxy in front (X-Forwarded-Proto / Forwarded proto)."""
        return self.secure or client_of(request).https

    def cookie_name(self, request: Any) -> str:
        return SECURE_COOKIE if self.is_secure(request) else COOKIE

    def session_cookie(self, request: Any) -> str | None:
        value = request.getCookie(self.cookie_name(request).encode())
        return value.decode("ascii", "replace") if value else None

    def session_principal(self, request: Any) -> Principal | None:
        session = self.sessions.get(self.session_cookie(request))
        if session is None:
            return None
        return Principal(session.user_id, session.name, session.role, "session", session=session)

    def set_session_cookie(self, request: Any, session_id: str) -> None:
        request.addCookie(
            self.cookie_name(request),
            session_id,
            path="/",
            httpOnly=True,
            secure=self.is_secure(request),
            sameSite="strict",
        )

    def clear_session_cookie(self, request: Any) -> None:
        secure = self.is_secure(request)
        request.addCookie(
            self.cookie_name(request), "", path="/", httpOnly=True, secure=secure, sameSite="strict", max_age="0"
        )

    # -- bearer tokens and API keys

    async def bearer_principal(self, token: str) -> Principal:
        parsed = TOKENS.parse(token)
        if parsed is None:
            raise unauthorized("malformed bearer token")
        now = self.clock.seconds()
        row = await self._key_row(parsed.prefix, now)
        # The same refusal whatever failed: a caller learns nothing about which part was wrong.
        if row is None or not tokens.same(row[1], hash_secret(parsed)):
            raise unauthorized("invalid or expired token")
        key_id, _, key_role, kind, expires_at, revoked_at, user_id, name, user_role, disabled = row
        if revoked_at is not None or disabled or (expires_at is not None and now >= float(expires_at)):
            raise unauthorized("invalid or expired token")
        role = key_role if RANK.get(key_role, -1) <= RANK.get(user_role, -1) else user_role
        await self._touch(int(key_id), now)
        return Principal(int(user_id), name, role, "key" if kind == "key" else "token", key_id=int(key_id))

    async def _key_row(self, prefix: str, now: float) -> tuple[Any, ...] | None:
        """The key and its user, remembered for KEY_CACHE_TTL seconds: a store round trip per API call
        would queue behind uplink writes. Every change made here calls forget(), so a revocation
        applies at once; one made by another process on the same database within the TTL."""
        cached = self._keys.get(prefix)
        if cached is not None and now - cached[0] < KEY_CACHE_TTL:
            return cached[1]
        row = await self.store.fetchone(
            "SELECT k.id, k.secret_hash, k.role, k.kind, k.expires_at, k.revoked_at,"
            " u.id, u.name, u.role, u.disabled FROM api_keys k JOIN users u ON u.id = k.user_id"
            " WHERE k.prefix = ?",
            (prefix,),
        )
        if row is not None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            self._keys[prefix] = (now, tuple(row))
        return row

    def forget(self) -> None:
        """Drop remembered keys: call after revoking a key or changing, disabling or deleting a user."""
        self._keys.clear()

    async def _touch(self, key_id: int, now: float) -> None:
        # At most once a minute per key: a write per API request would cost more than the request.
        if now - self._last_used.get(key_id, 0.0) < 60.0:
            return
        self._last_used[key_id] = now
        if len(self._last_used) > 10_000:
            self._last_used.clear()
        await self.store.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))

    # -- WebSocket tickets

    def issue_ticket(self, principal: Principal) -> str:
        now = self.clock.seconds()
        for t in [t for t, v in self._tickets.items() if v.expires <= now]:
            del self._tickets[t]
        ticket = tokens.new_secret()
        self._tickets[ticket] = _Ticket(attrs.evolve(principal, via="ticket", session=None), now + TICKET_TTL)
        return ticket

    def redeem_ticket(self, ticket: str) -> Principal | None:
        """A ticket works once, within TICKET_TTL seconds of being issued."""
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry.expires <= self.clock.seconds():
            return None
        return entry.principal

    # -- the one entry point

    async def authenticate(self, request: Any, *, allow_ticket: bool = False) -> Principal | None:
        """The caller, None if the request carries no credentials; 401 if it carries bad ones."""
        header = request.getHeader(b"authorization")
        if header:
            scheme, _, token = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized("expected Authorization: Bearer <token>")
            return await self.bearer_principal(token.strip())
        if allow_ticket:
            values = request.args.get(b"ticket")
            if values:
                principal = self.redeem_ticket(values[0].decode("ascii", "replace"))
                if principal is None:
                    raise unauthorized("invalid or expired ticket")
                return principal
        return self.session_principal(request)
