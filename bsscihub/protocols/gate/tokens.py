"""Secrets the gate family hands out (unit keys, provisioning keys, sharing tokens) and how it keeps them.

Only keyed hashes are stored: HMAC-SHA256 under the hub's gate key, which also derives the URL-signing key.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import attrs

from bsscihub import tokens
from bsscihub.keybox import load_key

# Why a fast hash is enough: every secret the hub issues carries 256 random bits, so no amount of
# guessing speed finds one; a slow KDF would only cost time on every device request. The hash is
# keyed (HMAC) so a stolen database alone cannot even confirm a guessed app token, the one kind of
# secret that the hub does not generate itself.

PROVISIONING = "gpk"
UNIT = "gtu"
SHARE = "gsh"
APP = "app"  # app tokens are the app's own; the prefix only separates their hashes from ours
SCHEMES = {kind: tokens.Scheme(kind) for kind in (PROVISIONING, UNIT, SHARE)}
KEY_FILE = "gate.key"
"""In keys_dir, unless gate.secret is set."""


def public_prefix(token: str) -> str:
    """The part of an issued token that is safe to show and log (empty for anything else)."""
    kind = token.partition("_")[0]
    return SCHEMES[kind].public(token) if kind in SCHEMES else ""


@attrs.frozen
class Keyring:
    """The gate key: hashes secrets for storage and derives the key that signs file URLs."""

    key: bytes = attrs.field(repr=False)

    def hash(self, kind: str, secret: str) -> str:
        return tokens.hmac_sha256_hex(self.key, f"{kind}\0{secret}")

    def mint(self, kind: str) -> tokens.Minted:
        """A new `kind_<8 hex>_<43 chars of 256 random bits>` and its hash (of the whole text) to store."""
        return SCHEMES[kind].mint(lambda t: self.hash(kind, t.text))

    def fingerprint(self, kind: str, secret: str) -> str:
        """A short, stable name for a secret (for lists and the audit log), not enough to find it."""
        return self.hash(kind + ":fp", secret)[:12]

    @property
    def url_key(self) -> bytes:
        return hmac.new(self.key, b"signed-url", hashlib.sha256).digest()

    @classmethod
    def load(cls, configured: str, keys_dir: Path, data_dir: Path | None = None) -> Keyring:
        """`gate.secret` if set, else `keys_dir/gate.key`, made (32 random bytes, mode 0600) if missing
        and not left in `data_dir` (where it was before keys_dir was set).

        Back the key file up with the database: without it, every stored hash is useless.
        """
        if configured:
            return cls(hashlib.sha256(configured.encode()).digest())
        return cls(load_key(keys_dir / KEY_FILE, moved_from=data_dir / KEY_FILE if data_dir is not None else None))
