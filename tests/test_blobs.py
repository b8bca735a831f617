"""The core blob store (bsscihub.blobs) on SQLite and on a real PostgreSQL database: parts written with their
listing in one transaction, read a part at a time, deleted, files of earlier versions moved in."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from bsscihub import blobs
from bsscihub.protocols.devices.schema import MIGRATIONS as DEVICE_MIGRATIONS
from bsscihub.store import Cursor, Store
from bsscihub.store.schema import CORE_MIGRATIONS

BIG = bytes(range(256)) * 2100 + b"tail"  # two whole parts and a short one


async def parts_of(store: Store, owner: str, blob_id: str) -> list[int]:
    rows = await store.fetchall("SELECT part FROM blob_parts WHERE owner = ? AND blob_id = ? ORDER BY part",
                                (owner, blob_id))
    return [int(r[0]) for r in rows]


@pytest_twisted.ensureDeferred
async def test_a_blob_is_written_with_its_listing_read_a_part_at_a_time_and_deleted(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    assert 2 * blobs.PART < len(BIG) < 3 * blobs.PART

    def write(cursor: Cursor) -> None:
        blobs.write(cursor, "a", "x", BIG)
        blobs.write(cursor, "b", "x", b"another owner's x")
        cursor.execute("INSERT INTO audit_log (time, actor, action) VALUES (0, 'test', 'listed')")

    await store.interaction(write)
    assert await blobs.stat(store, "a", "x") == (3, len(BIG))
    sizes = [len(part) async for part in blobs.read(store, "a", "x", len(BIG))]
    assert sizes == [blobs.PART, blobs.PART, len(BIG) - 2 * blobs.PART]
    assert await blobs.read_all(store, "a", "x", len(BIG)) == BIG
    assert await blobs.read_all(store, "b", "x", 17) == b"another owner's x"

    # Written again under its name: the parts it has stay (a blob's content never changes under its name).
    await store.interaction(blobs.write, "a", "x", BIG)
    assert await parts_of(store, "a", "x") == [0, 1, 2]

    await store.interaction(blobs.delete, "a", ["x"])
    assert await blobs.stat(store, "a", "x") == (0, 0)
    assert await blobs.read_all(store, "b", "x", 17) == b"another owner's x"


@pytest_twisted.ensureDeferred
async def test_reading_holds_about_a_part_in_memory_not_the_blob(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    size = 32 * blobs.PART  # 8 MiB
    await store.interaction(blobs.write_stream, "a", "big", io.BytesIO(os.urandom(size)))
    tracemalloc.start()
    try:
        read = 0
        async for part in blobs.read(store, "a", "big", size):
            read += len(part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == size
    assert peak < 3 * blobs.PART, f"{peak} bytes held while reading {size}"


@pytest_twisted.ensureDeferred
async def test_a_failed_transaction_leaves_no_part(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)

    def write_then_fail(cursor: Cursor) -> None:
        blobs.write(cursor, "a", "x", BIG)
        raise RuntimeError("the listing could not be written")

    with pytest.raises(RuntimeError):
        await store.interaction(write_then_fail)
    assert await blobs.stat(store, "a", "x") == (0, 0)


class Trickle(io.RawIOBase):
    """A source that returns at most 1000 bytes per read, as a socket may."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(size, 1000) if size >= 0 else 1000)


@pytest_twisted.ensureDeferred
async def test_a_stream_is_stored_in_whole_parts_and_checked(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    size, digest = await store.interaction(blobs.write_stream, "a", "x", Trickle(BIG))
    assert (size, digest) == (len(BIG), hashlib.sha256(BIG).hexdigest())
    assert await parts_of(store, "a", "x") == [0, 1, 2]
    assert await blobs.read_all(store, "a", "x", len(BIG)) == BIG
    # Bytes that do not match the expected SHA-256: nothing is kept.
    with pytest.raises(blobs.BlobMismatch):
        await store.interaction(lambda c: blobs.write_stream(c, "a", "y", io.BytesIO(BIG), sha256="0" * 64))
    assert await blobs.stat(store, "a", "y") == (0, 0)
    # An empty stream is an empty blob.
    assert await store.interaction(blobs.write_stream, "a", "z", io.BytesIO(b"")) == \
        (0, hashlib.sha256(b"").hexdigest())
    assert await blobs.read_all(store, "a", "z", 0) == b""


@pytest_twisted.ensureDeferred
async def test_a_stream_in_a_transaction_run_again_after_a_deadlock_is_stored_whole(
        two_pg_stores: list[Store]) -> None:
    # gate's upload streams the request body in its transaction: when PostgreSQL aborted it for a deadlock,
    # the run again read a stream already at its end and stored (and marked stored) an empty file.
    import threading

    from twisted.internet import defer

    from tests.helpers import cross_locks

    hubs = two_pg_stores
    await hubs[0].migrate(CORE_MIGRATIONS)
    await hubs[0].execute("CREATE TABLE things (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    await hubs[0].execute("INSERT INTO things (id, n) VALUES (1, 0), (2, 0)")
    both_hold_one = threading.Barrier(2, timeout=10)
    runs: list[int] = []

    def upload(c: Cursor, blob_id: str, source: io.BytesIO, first: int, second: int) -> int:
        size, _ = blobs.write_stream(c, "a", blob_id, source)
        cross_locks(c, runs, both_hold_one, first, second)
        return size

    sizes = await defer.gatherResults(
        [hubs[0].interaction(upload, "x", io.BytesIO(BIG), 1, 2),
         hubs[1].interaction(upload, "y", io.BytesIO(BIG), 2, 1)], consumeErrors=True)
    assert len(runs) == 3, "one of the two transactions was aborted and run again"
    assert sizes == [len(BIG), len(BIG)]
    for blob_id in ("x", "y"):
        assert await blobs.read_all(hubs[0], "a", blob_id, len(BIG)) == BIG


@pytest_twisted.ensureDeferred
async def test_a_missing_part_is_an_error_not_a_short_blob(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    await store.interaction(blobs.write, "a", "x", BIG)
    await store.execute("DELETE FROM blob_parts WHERE owner = 'a' AND blob_id = 'x' AND part = 1")
    got: list[int] = []
    with pytest.raises(blobs.BlobMissing, match="part 1"):
        async for part in blobs.read(store, "a", "x", len(BIG)):
            got.append(len(part))
    assert got == [blobs.PART]


@pytest_twisted.ensureDeferred
async def test_files_of_earlier_versions_are_moved_in_checked_then_deleted(store: Store, tmp_path: Path) -> None:
    await store.migrate(CORE_MIGRATIONS)
    good, bad, gone = tmp_path / "good", tmp_path / "bad", tmp_path / "gone"
    good.write_bytes(BIG)
    bad.write_bytes(b"changed on disk")
    files = [("good", good, hashlib.sha256(BIG).hexdigest()),
             ("bad", bad, hashlib.sha256(b"what was stored").hexdigest()),
             ("gone", gone, hashlib.sha256(b"on another hub").hexdigest())]
    assert await blobs.move_files_in(store, "a", files, "test file") == ["good"]
    assert not good.exists()
    assert await blobs.read_all(store, "a", "good", len(BIG)) == BIG
    assert bad.read_bytes() == b"changed on disk"
    assert await blobs.stat(store, "a", "bad") == (0, 0)
    assert await blobs.stat(store, "a", "gone") == (0, 0)


@pytest_twisted.ensureDeferred
async def test_firmware_parts_of_a_database_that_ran_devices_4_move_into_the_store(store: Store) -> None:
    before = [m for m in DEVICE_MIGRATIONS if m.version <= 4]
    await store.migrate([m for m in CORE_MIGRATIONS if m.component != "blobs"] + before)
    digest = hashlib.sha256(BIG).hexdigest()
    rows: list[Any] = [(digest, n, BIG[n * blobs.PART:(n + 1) * blobs.PART]) for n in range(3)]
    await store.executemany("INSERT INTO dev_firmware_parts (sha256, part, data) VALUES (?, ?, ?)", rows)

    applied = await store.migrate(CORE_MIGRATIONS + DEVICE_MIGRATIONS)
    assert [(m.component, m.version) for m in applied] == [("blobs", 1), ("devices", 5)]
    assert await blobs.read_all(store, "devices.firmware", digest, len(BIG)) == BIG
    with pytest.raises(Exception, match="(?i)dev_firmware_parts"):
        await store.fetchall("SELECT * FROM dev_firmware_parts")
