"""Temporary file URLs: an HMAC over (file, direction, expiry, size limit), checked before any byte moves.

A URL is good for one file, one direction (up = PUT, down = GET), until its expiry, and for at most `max` bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlencode

import attrs

UP = "up"
DOWN = "down"


class BadURL(Exception):
    """A refused URL; `code` is stable (bad_signature, url_expired, wrong_direction)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@attrs.frozen
class URLSigner:
    key: bytes = attrs.field(repr=False)

    def signature(self, file_id: str, direction: str, expires: int, max_size: int) -> str:
        message = f"gate-file\n{file_id}\n{direction}\n{expires}\n{max_size}".encode("utf-8", "surrogatepass")
        return _b64(hmac.new(self.key, message, hashlib.sha256).digest())

    def query(self, file_id: str, direction: str, expires: int, max_size: int) -> str:
        sig = self.signature(file_id, direction, expires, max_size)
        return urlencode({"op": direction, "exp": expires, "max": max_size, "sig": sig})

    def verify(self, file_id: str, direction: str, args: dict[str, str], now: float) -> int:
        """The size limit the URL grants; raises BadURL. The signature is checked before anything else."""
        try:
            op, expires, max_size, sig = args["op"], int(args["exp"]), int(args["max"]), args["sig"]
        except (KeyError, ValueError):
            raise BadURL("bad_signature", "the URL is incomplete or malformed") from None
        # As bytes: compare_digest refuses str with non-ASCII characters, and a query may carry any.
        expected = self.signature(file_id, op, expires, max_size).encode()
        if not hmac.compare_digest(expected, sig.encode("utf-8", "surrogatepass")):
            raise BadURL("bad_signature", "the URL's signature does not match")
        if op != direction:
            raise BadURL("wrong_direction", f"this URL is for {'upload' if op == UP else 'download'} only")
        if now >= expires:
            raise BadURL("url_expired", "the URL has expired; ask for a new one")
        return max_size
