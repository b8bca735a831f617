"""The files families keep (firmware images, gate unit files) as parts of 256 KiB in the database (`blob_parts`),
so every hub of a cluster serves them; written in one transaction, read and sent a part at a time.

A blob is named by its owner (a family's namespace, e.g. "devices.firmware") and an id within it; its content
never changes under that name (writing a name again keeps the parts it has). The caller keeps the listing (size,
hash, name) in its own table, written in the same transaction as the parts. The table: core migration `blobs` 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from bsscihub.store import Cursor, Store
from bsscihub.web.dispatch import attachment

PART = 256 << 10
"""Bytes per database row: what a download holds in memory at a time."""

_INSERT = ("INSERT INTO blob_parts (owner, blob_id, part, data) VALUES (?, ?, ?, ?)"
           " ON CONFLICT (owner, blob_id, part) DO NOTHING")

log = Logger()


class BlobMissing(Exception):
    """A part of a blob that its listing says is there is not in the database."""


class BlobMismatch(Exception):
    """Bytes written did not match the SHA-256 they were expected to have: nothing was written."""


def write(cursor: Cursor, owner: str, blob_id: str, data: bytes) -> None:
    """Within the caller's transaction: `data` as the parts of (owner, blob_id)."""
    cursor.executemany(_INSERT, [(owner, blob_id, n, data[offset:offset + PART])
                                 for n, offset in enumerate(range(0, len(data), PART))])


def write_stream(cursor: Cursor, owner: str, blob_id: str, source: BinaryIO, *, sha256: str | None = None
                 ) -> tuple[int, str]:
    """Within the caller's transaction (on the store's thread): the bytes of a file-like `source`, read a part
    at a time, as the parts of (owner, blob_id); returns (size, SHA-256 hex). With `sha256`, bytes that do not
    match raise BlobMismatch, which rolls the transaction back. A seekable `source` is read from its start: the
    store runs a transaction PostgreSQL aborted for a deadlock again, and the run before had read it."""
    if source.seekable():
        source.seek(0)
    digest = hashlib.sha256()
    size = n = 0
    while True:
        part = _read_part(source)
        if not part:
            break
        digest.update(part)
        cursor.execute(_INSERT, (owner, blob_id, n, part))
        size, n = size + len(part), n + 1
    if sha256 is not None and digest.hexdigest() != sha256:
        raise BlobMismatch(f"{owner} {blob_id}: SHA-256 {digest.hexdigest()}, expected {sha256}")
    return size, digest.hexdigest()


def _read_part(source: BinaryIO) -> bytes:
    # A file-like may return less than asked before its end (a pipe, a socket): fill the part.
    chunks, have = [], 0
    while have < PART:
        chunk = source.read(PART - have)
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def delete(cursor: Cursor, owner: str, blob_ids: Iterable[str]) -> None:
    """Within the caller's transaction: the parts of these blobs."""
    cursor.executemany("DELETE FROM blob_parts WHERE owner = ? AND blob_id = ?", [(owner, b) for b in blob_ids])


async def stat(store: Store, owner: str, blob_id: str) -> tuple[int, int]:
    """(parts, bytes) of a blob in the database; (0, 0) if it is not there."""
    row = await store.fetchone(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM blob_parts WHERE owner = ? AND blob_id = ?",
        (owner, blob_id))
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def read(store: Store, owner: str, blob_id: str, size: int) -> AsyncIterator[bytes]:
    """The `size` bytes of a blob, a part per query: one part is held in memory at a time."""
    for n in range(-(-size // PART)):
        row = await store.fetchone(
            "SELECT data FROM blob_parts WHERE owner = ? AND blob_id = ? AND part = ?", (owner, blob_id, n))
        if row is None:
            raise BlobMissing(f"{owner} {blob_id}: part {n} is missing")
        yield bytes(row[0])


async def read_all(store: Store, owner: str, blob_id: str, size: int) -> bytes:
    """The whole blob in memory, for small ones only; the hub itself streams them (`read`), tests compare them."""
    return b"".join([part async for part in read(store, owner, blob_id, size)])


async def move_files_in(store: Store, owner: str, files: Sequence[tuple[str, Path, str]], what: str) -> list[str]:
    """Files an earlier version kept in one hub's data_dir, as (blob id, path, expected SHA-256), go into the
    database, each in one transaction, then the file goes. A missing file is skipped (on another hub's disk,
    that hub moves it); a file whose hash is wrong stays and is logged. Returns the ids moved."""
    moved = []
    for blob_id, path, sha256 in files:

        def copy(cursor: Cursor, blob_id: str = blob_id, path: Path = path, sha256: str = sha256) -> None:
            with path.open("rb") as source:
                write_stream(cursor, owner, blob_id, source, sha256=sha256)

        try:
            await store.interaction(copy)
        except FileNotFoundError:
            continue
        except BlobMismatch:
            log.warn("{what} {path} does not match its SHA-256; left where it is", what=what, path=str(path))
            continue
        await threads.deferToThread(path.unlink, True)
        log.info("{what} {blob_id} moved into the database", what=what, blob_id=blob_id)
        moved.append(blob_id)
    return moved


class StreamedBlob(Resource):
    """A download written a part at a time as the parts come from the database (the whole blob is never held);
    a request that goes away stops the reading."""

    isLeaf = True

    def __init__(self, parts: AsyncIterator[bytes], size: int, filename: str) -> None:
        super().__init__()
        self.parts, self.size, self.filename = parts, size, filename

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(self.size).encode())
        request.setHeader(b"content-disposition", attachment(self.filename))
        request.setHeader(b"cache-control", b"no-store")
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        async def send() -> None:
            try:
                async for part in self.parts:
                    if gone:
                        return
                    request.write(part)
            except Exception:
                log.failure("a download from the database failed")
                if not gone:
                    request.loseConnection()  # short of its content-length: the client sees it failed
                return
            if not gone:
                request.finish()

        defer.Deferred.fromCoroutine(send())
        return NOT_DONE_YET
