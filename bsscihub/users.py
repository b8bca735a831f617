"""Hub users and their roles; passwords are stored only as Argon2id hashes.

Used by the CLI (`bsscihub user add`) and by the web layer's authentication.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.internet import threads

from bsscihub.contract import opt_time
from bsscihub.errors import UserFacingError
from bsscihub.store import LIKE_ESCAPE, Cursor, Store, like_pattern, page

ROLES = ("admin", "operator", "viewer")
RANK = {"viewer": 0, "operator": 1, "admin": 2}
"""Each role includes every lower one: an admin may do what an operator may."""

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; the cap only bounds the work per attempt

_hasher = PasswordHasher()  # argon2id with the library's recommended parameters


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


# Verified against when the user does not exist, so that a miss costs as much as a wrong password: the
# hasher's parameters with a random salt and digest, which no password matches. Built, not hashed, so
# importing this module (every CLI command, every hub start) does not spend an Argon2 round on it.
_DUMMY_HASH = (
    f"$argon2id$v=19$m={_hasher.memory_cost},t={_hasher.time_cost},p={_hasher.parallelism}"
    f"${_b64(secrets.token_bytes(_hasher.salt_len))}${_b64(secrets.token_bytes(_hasher.hash_len))}"
)


class UserError(UserFacingError):
    pass


class UserExists(UserError):
    pass


class LastAdmin(UserError):
    """The change would leave no enabled admin (nobody could manage the hub any more)."""


@attrs.frozen
class User:
    id: int
    name: str
    role: str
    created_at: float
    disabled: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "createdAt": opt_time(self.created_at), "disabled": self.disabled}


_COLUMNS = "id, name, role, created_at, disabled"


def _user(row: tuple[Any, ...]) -> User:
    return User(int(row[0]), row[1], row[2], float(row[3]), bool(row[4]))


def role_at_least(role: str, minimum: str) -> bool:
    return RANK.get(role, -1) >= RANK[minimum]


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    return secrets.token_urlsafe(15)


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '-', '@'")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"password too long: at most {MAX_PASSWORD} characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return role


async def add_user(store: Store, name: str, role: str, password: str) -> int:
    """Create a user; raises UserError if the name is taken or the role unknown."""
    check_name(name)
    check_role(role)
    check_password(password)
    # argon2 is slow on purpose: hash off the reactor thread, before the transaction.
    password_hash = await threads.deferToThread(hash_password, password)

    def insert(c: Cursor) -> int:
        if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise UserExists(f"user {name!r} exists already")
        row = c.execute(
            "INSERT INTO users (name, password_hash, role, created_at) VALUES (?, ?, ?, ?) RETURNING id",
            (name, password_hash, role, time.time()),
        ).fetchone()
        assert row is not None
        return int(row[0])

    return await store.interaction(insert)


async def user_exists(store: Store, name: str) -> bool:
    return await store.fetchone("SELECT 1 FROM users WHERE name = ?", (name,)) is not None


async def get_user(store: Store, name: str) -> User | None:
    row = await store.fetchone(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,))
    return None if row is None else _user(row)


async def get_user_by_id(store: Store, user_id: int) -> User | None:
    row = await store.fetchone(f"SELECT {_COLUMNS} FROM users WHERE id = ?", (user_id,))
    return None if row is None else _user(row)


async def authenticate(store: Store, name: str, password: str) -> User | None:
    """The user if the password is right and the account enabled; None otherwise.

    Takes as long for an unknown name as for a wrong password, so names cannot be probed.
    """
    row = await store.fetchone(f"SELECT {_COLUMNS}, password_hash FROM users WHERE name = ?", (name,))
    stored = row[5] if row is not None else _DUMMY_HASH
    ok = await threads.deferToThread(verify_password, stored, password[:MAX_PASSWORD])
    if row is None or not ok:
        return None
    user = _user(row)
    return None if user.disabled else user


async def list_users(
    store: Store, *, role: str | None = None, q: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[User], int]:
    """One page of users (by name) and the total matching the filters."""
    where, params = ["1 = 1"], []
    if role:
        where.append("role = ?")
        params.append(role)
    if q:
        where.append(f"LOWER(name) LIKE ? {LIKE_ESCAPE}")
        params.append(like_pattern(q.lower()))
    sql_where = " AND ".join(where)

    def query(c: Cursor) -> tuple[list[User], int]:
        total, rows = page(c, _COLUMNS, "users", sql_where, params, "name", limit, offset)
        return [_user(r) for r in rows], total

    return await store.interaction(query)


def _guard_last_admin(c: Cursor, name: str) -> None:
    """Refuse a change that would leave no enabled admin (nobody could manage the hub any more)."""
    row = c.execute(
        "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND name <> ?", (name,)
    ).fetchone()
    if not row or int(row[0]) == 0:
        raise LastAdmin(f"{name!r} is the last enabled admin")


async def update_user(
    store: Store,
    name: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    password: str | None = None,
) -> User | None:
    """Change role, enabled state or password; None if there is no such user."""
    if role is not None:
        check_role(role)
    password_hash = None
    if password is not None:
        check_password(password)
        password_hash = await threads.deferToThread(hash_password, password)

    def update(c: Cursor) -> User | None:
        row = c.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        user = _user(row)
        demoted = role is not None and role != "admin" and user.role == "admin"
        if (demoted or (disabled and user.role == "admin")) and not user.disabled:
            _guard_last_admin(c, name)
        if role is not None:
            c.execute("UPDATE users SET role = ? WHERE id = ?", (role, user.id))
        if disabled is not None:
            c.execute("UPDATE users SET disabled = ? WHERE id = ?", (1 if disabled else 0, user.id))
        if password_hash is not None:
            c.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user.id))
        return _user(c.execute(f"SELECT {_COLUMNS} FROM users WHERE id = ?", (user.id,)).fetchone() or row)

    return await store.interaction(update)


async def delete_user(store: Store, name: str) -> User | None:
    """Delete a user (and, by cascade, their API keys); None if there is no such user."""

    def delete(c: Cursor) -> User | None:
        row = c.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        user = _user(row)
        if user.role == "admin" and not user.disabled:
            _guard_last_admin(c, name)
        # Explicit, not only ON DELETE CASCADE: SQLite enforces it only with foreign_keys on.
        c.execute("DELETE FROM api_keys WHERE user_id = ?", (user.id,))
        c.execute("DELETE FROM users WHERE id = ?", (user.id,))
        return user

    return await store.interaction(delete)


async def check_current_password(store: Store, name: str, password: str) -> bool:
    return await authenticate(store, name, password) is not None
