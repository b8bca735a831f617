"""The one shape of every secret the hub hands out (API tokens, gate keys, device keys): `<kind>_<prefix>_<secret>`.

Minted, read back and checked here; what is stored is a hash of the owner's choosing, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import NamedTuple

import attrs

# Why a fast hash is enough for all of them: every secret carries 256 random bits, so no amount of
# guessing speed finds one; a slow password hash would only cost CPU on every request that shows one.
SECRET_BYTES = 32
SECRET_CHARS = 43  # token_urlsafe(32)
MAX_SECRET = 100  # longer is not ours; also bounds the work of hashing what a caller sends


# Any token of this shape, and the unprefixed `<kind>_<secret>` device keys were, as text may carry them:
# what log scrubbing replaces (keeping the public part of the prefixed ones).
TOKEN_TEXT = re.compile(r"\b([a-z]{2,8})_([0-9a-f]{8,16})_[A-Za-z0-9_-]+")
UNPREFIXED_TEXT = re.compile(r"\b([a-z]{3})_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def scrub(text: str) -> str:
    """`text` with every secret in it replaced: `kind_prefix_***` (or `kind_***`)."""
    return UNPREFIXED_TEXT.sub(r"\1_***", TOKEN_TEXT.sub(r"\1_\2_***", text))


def new_secret() -> str:
    """256 random bits, URL-safe (43 characters): for secrets without a kind, e.g. a one-offer download URL."""
    return secrets.token_urlsafe(SECRET_BYTES)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hmac_sha256_hex(key: bytes | str, text: str) -> str:
    return hmac.new(key.encode() if isinstance(key, str) else key, text.encode(), hashlib.sha256).hexdigest()


def same(stored: str | None, computed: str) -> bool:
    """A stored hash equals the one just computed, in constant time (a missing row never matches)."""
    return stored is not None and hmac.compare_digest(stored, computed)


@attrs.frozen
class Token:
    """A secret as read back: `public` (kind and prefix) is safe to show and log, `secret` is not."""

    kind: str
    prefix: str
    secret: str = attrs.field(repr=False)
    legacy: bool = False  # read in the earlier `<kind>_<secret>` form (device keys), the prefix cut from the secret

    @property
    def public(self) -> str:
        return f"{self.kind}_{self.prefix}"

    @property
    def text(self) -> str:
        return f"{self.kind}_{self.secret}" if self.legacy else f"{self.kind}_{self.prefix}_{self.secret}"


Digest = Callable[[Token], str]


class Minted(NamedTuple):
    token: Token  # token.text is shown once, token.public may be shown and logged
    stored: str  # the hash to keep


@attrs.frozen
class Scheme:
    """One kind of secret: `<kind>_<prefix_hex hex digits>_<43 characters of 256 random bits>`.

    `unprefixed` also reads `<kind>_<secret>` (what device keys were before), whose first 8 characters
    were its public prefix; a prefixed text is never read as one (its length differs).
    """

    kind: str
    prefix_hex: int = 8
    unprefixed: bool = False
    _shape: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)
    _old_shape: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        kind = re.escape(self.kind)
        object.__setattr__(self, "_shape", re.compile(
            rf"{kind}_([0-9a-f]{{{self.prefix_hex}}})_([A-Za-z0-9_-]{{1,{MAX_SECRET}}})"))
        object.__setattr__(self, "_old_shape", re.compile(rf"{kind}_([A-Za-z0-9_-]{{{SECRET_CHARS}}})"))

    def mint(self, digest: Digest) -> Minted:
        token = Token(self.kind, secrets.token_hex(self.prefix_hex // 2), new_secret())
        return Minted(token, digest(token))

    def parse(self, text: object) -> Token | None:
        """The token `text` is in this scheme, or None (not a string, other kind, bad prefix, secret too long)."""
        if not isinstance(text, str) or len(text) > len(self.kind) + self.prefix_hex + 2 + MAX_SECRET:
            return None
        if self.unprefixed and (old := self._old_shape.fullmatch(text)):
            return Token(self.kind, old[1][:8], old[1], legacy=True)
        found = self._shape.fullmatch(text)
        return Token(self.kind, found[1], found[2]) if found else None

    def public(self, text: object) -> str:
        """The part of `text` that is safe to show and log; empty when it is not one of these tokens."""
        token = self.parse(text)
        return token.public if token else ""

    def verify(self, text: object, stored: str | None, digest: Digest) -> Token | None:
        """The token when `text` parses and its hash is `stored` (compared in constant time), else None."""
        token = self.parse(text)
        return token if token is not None and same(stored, digest(token)) else None
