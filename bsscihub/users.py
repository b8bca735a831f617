"""Hub users and their roles; passwords are stored only as Argon2id hashes.

Used by the CLI (`bsscihub user add`) and by the web layer's authentication.
"""

from __future__ import annotations

import secrets
import time

from argon2 import PasswordHasher
from twisted.internet import threads
from argon2.exceptions import InvalidHashError, VerificationError

from bsscihub.errors import UserFacingError
from bsscihub.store import Cursor, Store

ROLES = ("admin", "operator", "viewer")

_hasher = PasswordHasher()  # argon2id with the library's recommended parameters


class UserError(UserFacingError):
    pass


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


async def add_user(store: Store, name: str, role: str, password: str) -> int:
    """Create a user; raises UserError if the name is taken or the role unknown."""
    check_name(name)
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise UserError("password too short: at least 8 characters")
    # argon2 is slow on purpose: hash off the reactor thread, before the transaction.
    password_hash = await threads.deferToThread(hash_password, password)

    def insert(c: Cursor) -> int:
        if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise UserError(f"user {name!r} exists already")
        row = c.execute(
            "INSERT INTO users (name, password_hash, role, created_at) VALUES (?, ?, ?, ?) RETURNING id",
            (name, password_hash, role, time.time()),
        ).fetchone()
        assert row is not None
        return int(row[0])

    return await store.interaction(insert)


async def user_exists(store: Store, name: str) -> bool:
    return await store.fetchone("SELECT 1 FROM users WHERE name = ?", (name,)) is not None
