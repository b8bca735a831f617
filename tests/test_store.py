"""The storage suite: the same tests on SQLite and on a real PostgreSQL database."""

from __future__ import annotations

import pytest
import pytest_twisted

from bsscihub.store import Cursor, Migration, Store, page
from bsscihub.store.schema import CORE_MIGRATIONS

SAMPLE = [
    Migration("sample", 1, "CREATE TABLE things (id {pk}, name TEXT NOT NULL, data {blob}, n {bigint})"),
    Migration("sample", 2, "ALTER TABLE things ADD COLUMN score {real}; CREATE INDEX things_name ON things (name)"),
]


@pytest_twisted.ensureDeferred
async def test_migrations_apply_once_in_order(store: Store) -> None:
    expected = sorted([(m.component, m.version) for m in CORE_MIGRATIONS] + [("sample", 1), ("sample", 2)])
    applied = await store.migrate(SAMPLE[::-1] + CORE_MIGRATIONS)
    assert [(m.component, m.version) for m in applied] == expected
    assert await store.migrate(CORE_MIGRATIONS + SAMPLE) == []
    rows = await store.fetchall("SELECT component, version FROM schema_migrations ORDER BY component, version")
    assert rows == expected


@pytest_twisted.ensureDeferred
async def test_later_migration_applies_on_existing_schema(store: Store) -> None:
    await store.migrate(SAMPLE[:1])
    await store.execute("INSERT INTO things (name, n) VALUES (?, ?)", ("a", 2**40))
    applied = await store.migrate(SAMPLE)
    assert [m.version for m in applied] == [2]
    assert await store.fetchall("SELECT name, n, score FROM things") == [("a", 2**40, None)]


@pytest_twisted.ensureDeferred
async def test_failed_migration_rolls_back(store: Store) -> None:
    bad = Migration("bad", 1, "CREATE TABLE ok_table (id {pk}); CREATE TABLE broken (")
    with pytest.raises(Exception, match="(?i)syntax|incomplete"):
        await store.migrate([bad])
    assert await store.migrate([Migration("bad", 1, "CREATE TABLE ok_table (id {pk})")]) != []


@pytest_twisted.ensureDeferred
async def test_interaction_is_one_transaction(store: Store) -> None:
    await store.migrate(SAMPLE)

    def fails(c: Cursor) -> None:
        c.execute("INSERT INTO things (name) VALUES (?)", ("lost",))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.interaction(fails)
    assert await store.fetchall("SELECT name FROM things") == []


@pytest_twisted.ensureDeferred
async def test_page_counts_every_match_and_returns_one_page_in_order(store: Store) -> None:
    await store.migrate(SAMPLE)
    await store.executemany("INSERT INTO things (name, n) VALUES (?, ?)", [(f"t{i}", i % 3) for i in range(10)])
    total, rows = await store.interaction(page, "name", "things", "n = ?", (1,), "name DESC", 2, 1)
    assert total == 3  # t1, t4, t7: the count ignores the page
    assert rows == [("t4",), ("t1",)]


@pytest_twisted.ensureDeferred
async def test_blob_and_returning(store: Store) -> None:
    await store.migrate(SAMPLE)
    row = await store.fetchone("INSERT INTO things (name, data) VALUES (?, ?) RETURNING id", ("x", b"\x00\xff"))
    assert row is not None and row[0] >= 1
    (data,) = await store.fetchone("SELECT data FROM things WHERE id = ?", (row[0],)) or (None,)
    assert bytes(data) == b"\x00\xff"


@pytest_twisted.ensureDeferred
async def test_batch_writer_commits_every_row_before_acknowledging(store: Store) -> None:
    await store.migrate(SAMPLE)
    writer = store.batch_writer("INSERT INTO things (name, n) VALUES {rows}", max_rows=50)
    acks = [writer.add((f"r{i}", i)) for i in range(120)]
    for d in acks:
        await d
    (count,) = await store.fetchone("SELECT COUNT(*) FROM things") or (0,)
    assert count == 120
    assert writer.committed == 120
    rows = await store.fetchall("SELECT n FROM things ORDER BY id")
    assert [r[0] for r in rows] == list(range(120))


def test_row_statements_use_few_distinct_sizes() -> None:
    from bsscihub.store import row_statements

    statements = list(row_statements("INSERT INTO t (a, b) VALUES {rows}", [(i, -i) for i in range(250)]))
    assert [len(params) // 2 for _, params in statements] == [128, 64, 32, 16, 8, 2]
    assert statements[-1] == ("INSERT INTO t (a, b) VALUES (?, ?), (?, ?)", [248, -248, 249, -249])


@pytest_twisted.ensureDeferred
async def test_execute_rows_writes_many_rows_per_statement_in_order(store: Store) -> None:
    await store.migrate(SAMPLE)
    await store.execute_rows("INSERT INTO things (name, n) VALUES {rows}", [(f"r{i}", i) for i in range(250)])
    rows = await store.fetchall("SELECT name, n FROM things ORDER BY id")
    assert rows == [(f"r{i}", i) for i in range(250)], "statements of 128, 64, 32, 16, 8 and 2 rows, every row once"
    # the same placeholder in an UPDATE ... FROM (VALUES ...), as the published marks use it
    await store.execute_rows(
        "UPDATE things SET n = -1 FROM (VALUES {rows}) AS v WHERE things.name = v.column1",
        [(f"r{i}",) for i in range(0, 250, 2)],
    )
    (marked,) = await store.fetchone("SELECT COUNT(*) FROM things WHERE n = -1") or (0,)
    assert marked == 125


@pytest_twisted.ensureDeferred
async def test_batch_writer_failure_reaches_every_waiter(store: Store) -> None:
    await store.migrate(SAMPLE)
    writer = store.batch_writer("INSERT INTO nowhere (x) VALUES {rows}")
    results = []
    for i in range(3):
        d = writer.add((i,))
        d.addErrback(lambda f: results.append(f.type))
    await writer.flush()
    assert len(results) == 3


@pytest_twisted.ensureDeferred
async def test_idempotent_batch_writer_keeps_failed_rows_for_the_next_round(store: Store) -> None:
    from twisted.internet import reactor

    from bsscihub.store import BatchWriter

    # The table does not exist yet: every write fails, and nothing may be lost for it.
    writer = BatchWriter(store, "INSERT INTO things (name) VALUES {rows}", reactor, delay=0.001, max_rows=100,
                         idempotent=True)
    writer.add_nowait(("a",))
    writer.add_nowait(("b",))
    await writer.flush()
    assert writer.failures == 3, "a flush on a failing database gives up after three rounds instead of hanging"
    assert writer.committed == 0
    await store.migrate(SAMPLE)
    writer.add_nowait(("c",))
    await writer.flush()
    assert writer.committed == 3
    assert await store.fetchall("SELECT name FROM things ORDER BY id") == [("a",), ("b",), ("c",)]


@pytest_twisted.ensureDeferred
async def test_stop_flushes_pending_batches(database_url: str, tmp_path) -> None:
    from twisted.internet import reactor

    from bsscihub.store import open_store

    s = open_store(database_url, tmp_path / "hub.sqlite", reactor)
    s.start()
    await s.migrate(SAMPLE)
    writer = s.batch_writer("INSERT INTO things (name) VALUES {rows}", delay=10.0)
    writer.add(("pending",))
    await s.stop()
    s2 = open_store(database_url, tmp_path / "hub.sqlite", reactor)
    s2.start()
    try:
        assert await s2.fetchall("SELECT name FROM things") == [("pending",)]
    finally:
        await s2.stop()


@pytest_twisted.ensureDeferred
async def test_stop_joins_the_threads_even_when_closing_fails(database_url: str, tmp_path) -> None:
    # A pool thread left running keeps the process from exiting: a hub that never stops after SIGTERM.
    from twisted.internet import reactor

    from bsscihub.store import open_store

    s = open_store(database_url, tmp_path / "hub.sqlite", reactor)
    s.start()
    pool = s._pool
    assert pool is not None and pool.started

    def refuse() -> None:
        raise OSError("the connection broke while closing")

    s._backend.close = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await s.stop()
    assert not s.running, "the store still counts as running"
    assert pool.joined, "the pool's threads were not joined"


@pytest_twisted.ensureDeferred
async def test_sql_ascii_database_reads_text_as_text(postgres_url: str, tmp_path) -> None:
    # a SQL_ASCII database makes psycopg return bytes unless the client asks for UTF8:
    # applied migrations went unrecognised and the second start re-created tables
    import uuid

    from twisted.internet import reactor

    from bsscihub.store import open_store
    from tests.conftest import _pg_admin

    name = f"bsscihub_test_ascii_{uuid.uuid4().hex[:12]}"
    _pg_admin(f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0")
    url = f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    try:
        for expected in (len(CORE_MIGRATIONS + SAMPLE), 0):
            s = open_store(url, tmp_path / "unused.sqlite", reactor)
            s.start()
            try:
                assert len(await s.migrate(CORE_MIGRATIONS + SAMPLE)) == expected
                if expected:
                    await s.execute("INSERT INTO things (name) VALUES (?)", ("Zähler",))
                assert await s.fetchall("SELECT name FROM things") == [("Zähler",)]
            finally:
                await s.stop()
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_twisted.ensureDeferred
async def test_a_transaction_postgresql_aborts_for_a_deadlock_runs_again(two_pg_stores: list[Store]) -> None:
    # Two hubs on one database upserting the same rows in another order: PostgreSQL aborts one of the two
    # transactions (a hub logged the traceback and lost its write); the store runs the aborted one again.
    import threading

    from twisted.internet import defer

    from tests.helpers import cross_locks

    hubs = two_pg_stores
    await hubs[0].migrate(SAMPLE)
    await hubs[0].execute_rows("INSERT INTO things (id, name, n) VALUES {rows}", [(1, "a", 0), (2, "b", 0)])
    both_hold_one = threading.Barrier(2, timeout=10)
    runs: list[int] = []
    await defer.gatherResults([hubs[i].interaction(cross_locks, runs, both_hold_one, *rows)
                               for i, rows in enumerate([(1, 2), (2, 1)])], consumeErrors=True)
    assert len(runs) == 3, "one of the two transactions was aborted and run again"
    assert await hubs[0].fetchall("SELECT id, n FROM things ORDER BY id") == [(1, 2), (2, 2)]


@pytest_twisted.ensureDeferred
async def test_a_search_matches_its_text_literally_underscores_and_percent_signs_too(store: Store) -> None:
    # A user "field_ops" searched as "field_ops" was not found: the search dropped its "_" (and "%").
    from bsscihub import users
    from bsscihub.store import LIKE_ESCAPE, like_pattern

    await store.migrate(SAMPLE + CORE_MIGRATIONS)
    names = ["a_b", "axb", "50%", "5000", "c\\d", "cxd"]
    await store.execute_rows("INSERT INTO things (name) VALUES {rows}", [(n,) for n in names])

    async def matching(text: str, anywhere: bool = True) -> list[str]:
        rows = await store.fetchall(f"SELECT name FROM things WHERE name LIKE ? {LIKE_ESCAPE} ORDER BY name",
                                    (like_pattern(text, anywhere=anywhere),))
        return [r[0] for r in rows]

    assert await matching("a_b") == ["a_b"]
    assert await matching("0%") == ["50%"]
    assert await matching("c\\d") == ["c\\d"]
    assert await matching("50", anywhere=False) == ["50%", "5000"]
    for name in ("field_ops", "fieldxops"):
        await users.add_user(store, name, "viewer", "correct horse 0123")
    found, total = await users.list_users(store, q="FIELD_OPS")
    assert [u.name for u in found] == ["field_ops"] and total == 1
