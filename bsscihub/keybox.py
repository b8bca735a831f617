"""The hub-wide key files in `keys_dir` (gate.key, meter-keys.secret, webhook-keys.secret) and the sealing of
stored secrets under them: one directory, shared by every hub of a cluster, so what one hub seals another opens.

Sealing is AES-256-GCM with a random nonce per seal; the owner's id is bound as associated data.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bsscihub.errors import UserFacingError

if TYPE_CHECKING:
    from bsscihub.config import HubConfig

__all__ = ["KEY_SIZE", "KeyBox", "KeyFileError", "load_key"]

KEY_SIZE = 32


class KeyFileError(UserFacingError):
    """A key file that cannot be read, made or used; str() names the file."""


def load_key(path: Path, size: int = KEY_SIZE, *, moved_from: Path | None = None) -> bytes:
    """The key in `path`, made (`size` random bytes, mode 0600) if there is none yet.

    Hubs sharing the directory may start at once: a new key is written whole to a private temporary
    file and linked into place, so a hub sees either no file or a complete one, and a hub that loses
    the race reads the winner's key instead of keeping its own. `moved_from` is where the file was
    before keys_dir was set: found there and not in `path`, it is refused rather than replaced.
    """
    try:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            if moved_from is not None and moved_from != path and moved_from.exists():
                # A new key would leave everything the old one sealed or hashed unusable.
                raise KeyFileError(f"key file {path} does not exist but {moved_from} does: move it into keys_dir"
                                   " (or restore keys_dir from the backup)") from None
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one keeps its mode
            _create(path, os.urandom(size))
            key = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"key file {path}: {e.strerror or e}") from None
    if len(key) < size:
        raise KeyFileError(f"key file {path} holds {len(key)} bytes, not {size}: restore it from the backup"
                           " (or the other hubs' keys_dir)")
    return key


def _create(path: Path, key: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)  # fails if another hub was first: its key is the one
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            _create_exclusively(path, key)  # a file system without hard links
    finally:
        os.unlink(temporary)


def _create_exclusively(path: Path, key: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(key)


class KeyBox:
    """Seals small secrets (meter keys, webhook secrets) with AES-256-GCM under the 32-byte key in `path`
    (see load_key), their owner's id as associated data: a copy of the database alone does not reveal them."""

    @classmethod
    def of_hub(cls, config: HubConfig, name: str) -> KeyBox:
        """The box sealing under keys_dir/`name`; a file left in data_dir by an older setting is not replaced."""
        return cls(Path(config.keys_dir) / name, moved_from=Path(config.data_dir) / name)

    def __init__(self, path: Path, *, moved_from: Path | None = None) -> None:
        self.path = path
        self.moved_from = moved_from
        self._aead: AESGCM | None = None

    def load(self) -> None:
        """Read (or make) the key file now: at start, so that a bad one stops the hub rather than a request."""
        self._cipher()

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            secret = load_key(self.path, moved_from=self.moved_from)
            if len(secret) != KEY_SIZE:
                raise KeyFileError(f"key file {self.path} must hold a {KEY_SIZE}-byte secret")
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
