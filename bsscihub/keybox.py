"""Sealing of secrets the hub must keep usable (meter keys, webhook signing secrets) under a key file in data_dir.

AES-256-GCM with a random nonce per seal; the owner's id is bound as associated data.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bsscihub.errors import CommandError

__all__ = ["KeyBox"]


class KeyBox:
    """Seals small secrets (meter keys, webhook secrets) with AES-256-GCM under a 32-byte secret in `path`
    (created mode 0600 on first use), their owner's id as associated data: a copy of the database alone
    does not reveal them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._aead: AESGCM | None = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            try:
                secret = self.path.read_bytes()
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                secret = os.urandom(32)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secret)
            if len(secret) != 32:
                raise CommandError(f"{self.path} must hold a 32-byte secret")
            self._aead = AESGCM(secret)
        return self._aead

    def seal(self, meter: str, key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._cipher().encrypt(nonce, key, meter.encode())

    def open(self, meter: str, sealed: bytes) -> bytes | None:
        """The key, or None when it does not open (another hub's secret, a damaged row)."""
        try:
            return self._cipher().decrypt(sealed[:12], sealed[12:], meter.encode())
        except (InvalidTag, ValueError):
            return None
