"""Storage behind one async interface: SQLite (default, WAL) or PostgreSQL.

Every call runs on the store's own thread pool, so the reactor never waits on the database.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from bsscihub.contract import masked_url
from bsscihub.errors import DatabaseUnreachable

T = TypeVar("T")

_DIALECT_TOKENS = {
    "sqlite": {
        "{pk}": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "{blob}": "BLOB",
        "{bigint}": "INTEGER",
        "{real}": "REAL",
    },
    "postgresql": {
        "{pk}": "BIGSERIAL PRIMARY KEY",
        "{blob}": "BYTEA",
        "{bigint}": "BIGINT",
        "{real}": "DOUBLE PRECISION",
    },
}


ROWS_PER_STATEMENT = 128
DEADLOCK_RETRIES = 4  # tries of one transaction that PostgreSQL aborted for a deadlock


def row_statements(sql: str, rows: Sequence[Sequence[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """`sql` holding `{rows}` (e.g. `INSERT ... VALUES {rows}`) as statements of up to 128 rows each.

    For the hot-path writes instead of executemany(): SQLite runs each statement with the GIL
    released and must take it back afterwards, which waits on a busy reactor thread. Once per
    128 rows instead of once per row halved the writer's cost to the reactor (bench/README.md).
    Statements hold a power of two of rows, so that each `sql` compiles to at most 8 cached ones.
    """
    if not rows:
        return
    group = f"({', '.join('?' * len(rows[0]))})"
    start, size = 0, ROWS_PER_STATEMENT
    while start < len(rows):
        while start + size > len(rows):
            size //= 2
        chunk = rows[start : start + size]
        start += size
        yield sql.replace("{rows}", ", ".join([group] * size)), [value for row in chunk for value in row]


@attrs.frozen
class Migration:
    """One schema step of one component; `sql` may hold several statements and dialect tokens."""

    component: str
    version: int
    sql: str


class StoreError(Exception):
    pass


class Cursor:
    """A DB-API cursor that takes `?` placeholders on every backend."""

    __slots__ = ("_cursor", "_convert")

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._convert = dialect == "postgresql"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._convert else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cursor.execute(self._sql(sql), params)
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        self._cursor.executemany(self._sql(sql), list(rows))
        return self

    def execute_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        """Like executemany, many rows per statement: `sql` says where with `{rows}` (row_statements)."""
        for statement, params in row_statements(sql, rows):
            self._cursor.execute(self._sql(statement), params)
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone()  # type: ignore[no-any-return]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


LIKE_ESCAPE = "ESCAPE '\\'"
"""What follows `col LIKE ?` when the pattern comes from `like_pattern`."""


def like_pattern(text: str, *, anywhere: bool = True) -> str:
    """A LIKE pattern matching `text` literally (its `%`, `_` and `\\` too), anywhere or (anywhere=False) at the
    start; the statement says `LIKE ? ESCAPE '\\'` (LIKE_ESCAPE)."""
    literal = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{literal}%" if anywhere else f"{literal}%"


def page(cursor: Cursor, columns: str, source: str, where: str, params: Sequence[Any], order: str, limit: int,
         offset: int, *, counted: str | None = None) -> tuple[int, list[tuple[Any, ...]]]:
    """How many rows of `source` match `where`, and the page of them at `offset` in `order` (call it inside one
    transaction, so both agree).

    Every SQL fragment is the caller's own text; whatever came from a user goes in `params` only. `counted` is
    the source to count in when `source` joins tables that add no rows (default: `source`).
    """
    row = cursor.execute(f"SELECT COUNT(*) FROM {counted or source} WHERE {where}", params).fetchone()
    rows = cursor.execute(
        f"SELECT {columns} FROM {source} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset]
    ).fetchall()
    return (int(row[0]) if row else 0), rows


class _SQLiteBackend:
    dialect = "sqlite"
    threads = 1  # one writer; SQLite serialises writes anyway

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit that returned survives a power cut, not only a crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(Cursor(conn.cursor(), self.dialect), *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _PostgresBackend:
    dialect = "postgresql"
    threads = 4

    def __init__(self, url: str) -> None:
        import psycopg  # only needed for PostgreSQL: the `postgresql` extra

        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            # A SQL_ASCII database would hand text back as bytes; UTF8 on the
            # client makes psycopg decode it (the server then stores it as sent).
            try:
                conn = self._psycopg.connect(self.url, client_encoding="utf8")
            except self._psycopg.OperationalError as e:
                # libpq's reason spans lines (a hint below it): one line for the user
                reason = " ".join(str(e).split())
                raise DatabaseUnreachable(f"database = {masked_url(self.url)!r}: cannot connect: {reason}") from None
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(cursor, *args) in one transaction, run again when PostgreSQL rolled it back for a deadlock.

        Hubs sharing one database can lock the same rows in another order; PostgreSQL then aborts one
        transaction and its advice is to retry it. Transaction functions touch nothing but the database,
        so running one again is safe.
        """
        errors = self._psycopg.errors
        attempt = 1
        while True:
            conn = self.connection()
            try:
                with conn.transaction():
                    with conn.cursor() as cur:
                        return fn(Cursor(cur, self.dialect), *args)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == DEADLOCK_RETRIES:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * attempt)  # on a store thread; apart, not in step again
                attempt += 1

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class Store:
    """The hub's database: async calls, a private thread pool, migrations per component."""

    log = Logger()

    def __init__(self, backend: _SQLiteBackend | _PostgresBackend, reactor: Any) -> None:
        self._backend = backend
        self._reactor = reactor
        self.dialect = backend.dialect
        self._pool: ThreadPool | None = None
        self._batchers: list[BatchWriter] = []

    # -- lifecycle

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=self._backend.threads, name="bsscihub-store")
            self._pool.start()

    def stop(self) -> defer.Deferred[None]:
        """Flush pending batches, close connections, join the threads."""
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            for batcher in self._batchers:
                await batcher.flush()
            if self._pool is not None:
                await self._run(self._backend.close)
        finally:
            # Even when a flush or the close failed: the pool's threads would keep the process from exiting.
            if self._pool is not None:
                pool, self._pool = self._pool, None
                # Joining the threads is quick once they are idle; do it off the reactor.
                await threads.deferToThread(pool.stop)

    @property
    def running(self) -> bool:
        return self._pool is not None

    # -- queries

    def _run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        if self._pool is None:
            return defer.fail(StoreError("store is not running"))
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args)

    def interaction(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run fn(cursor, *args) in one transaction on the store's thread."""
        return self._run(self._backend.run, fn, *args)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> defer.Deferred[int]:
        return self.interaction(lambda c: c.execute(sql, params).rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> defer.Deferred[None]:
        rows = list(rows)
        return self.interaction(lambda c: (c.executemany(sql, rows), None)[1])

    def execute_rows(self, sql: str, rows: Iterable[Sequence[Any]]) -> defer.Deferred[None]:
        rows = list(rows)
        return self.interaction(lambda c: (c.execute_rows(sql, rows), None)[1])

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> defer.Deferred[list[tuple[Any, ...]]]:
        return self.interaction(lambda c: c.execute(sql, params).fetchall())

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> defer.Deferred[tuple[Any, ...] | None]:
        return self.interaction(lambda c: c.execute(sql, params).fetchone())

    def batch_writer(self, sql: str, *, delay: float = 0.002, max_rows: int = 2000) -> BatchWriter:
        """A group-commit writer for a hot-path `INSERT ... VALUES {rows}` (flushed on stop)."""
        batcher = BatchWriter(self, sql, self._reactor, delay=delay, max_rows=max_rows)
        self._batchers.append(batcher)
        return batcher

    # -- schema

    async def migrate(self, migrations: Sequence[Migration]) -> list[Migration]:
        """Apply every migration not applied yet, in (component, version) order."""
        tokens = _DIALECT_TOKENS[self.dialect]

        def apply(cursor: Cursor) -> list[Migration]:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at TEXT NOT NULL,"
                " PRIMARY KEY (component, version))"
            )
            done = set(cursor.execute("SELECT component, version FROM schema_migrations").fetchall())
            applied = []
            for m in sorted(migrations, key=lambda m: (m.component, m.version)):
                if (m.component, m.version) in done:
                    continue
                sql = m.sql
                for token, replacement in tokens.items():
                    sql = sql.replace(token, replacement)
                for statement in (s.strip() for s in sql.split(";")):
                    if statement:
                        cursor.execute(statement)
                cursor.execute(
                    "INSERT INTO schema_migrations (component, version, applied_at)"
                    " VALUES (?, ?, CURRENT_TIMESTAMP)",
                    (m.component, m.version),
                )
                applied.append(m)
            return applied

        applied = await self.interaction(apply)
        for m in applied:
            self.log.info("applied migration {component} v{version}", component=m.component, version=m.version)
        return applied


class BatchWriter:
    """Collects rows for one INSERT and commits them together every few milliseconds.

    `add()` returns a Deferred that fires once the row is committed: callers acknowledge
    to the outside world only then. With `idempotent=True` (rows nobody waits on, e.g. marks that
    may be written twice) rows go in with `add_nowait()`, a failed write keeps them for the next
    round, and each round waits `delay` (coalescing, not latency, is the point).
    The MQTT outbox batches on its own: its commit also deletes, numbers rows and retries forever.
    """

    log = Logger()

    def __init__(self, store: Store, sql: str, clock: IReactorTime, *, delay: float, max_rows: int,
                 idempotent: bool = False) -> None:
        self._store, self._sql, self._clock = store, sql, clock
        self._delay, self._max_rows, self._idempotent = delay, max_rows, idempotent
        self._rows: list[Sequence[Any]] = []
        self._waiting: list[defer.Deferred[None]] = []
        self._timer: Any = None
        self._in_flight: defer.Deferred[None] | None = None
        self.committed = 0
        self.failures = 0

    def add(self, row: Sequence[Any]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._rows.append(row)
        self._waiting.append(d)
        if len(self._rows) >= self._max_rows:
            self._kick()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._delay, self._kick)
        return d

    def add_nowait(self, row: Sequence[Any]) -> None:
        """A row for the next round that no one waits on."""
        self._rows.append(row)
        if len(self._rows) >= self._max_rows:
            self._kick()
        elif self._timer is None and self._in_flight is None:
            self._timer = self._clock.callLater(self._delay, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        # One commit at a time keeps rows in order; the next batch waits for this one.
        if self._in_flight is None and self._rows:
            self._commit()

    def _commit(self) -> None:
        rows, waiting = self._rows, self._waiting
        self._rows, self._waiting = [], []

        def done(result: Any) -> None:
            self._in_flight = None
            if isinstance(result, Failure):
                self.failures += 1
                if self._idempotent:
                    self.log.failure("batched write failed; {count} rows kept for a retry", result, count=len(rows))
                    self._rows[:0] = rows
                for d in waiting:
                    d.errback(result)
            else:
                self.committed += len(rows)
                for d in waiting:
                    d.callback(None)
            if not self._rows:
                return
            if not self._idempotent:
                self._kick()
            elif self._timer is None:
                self._timer = self._clock.callLater(self._delay, self._kick)

        d = self._store.execute_rows(self._sql, rows)
        self._in_flight = d
        d.addBoth(done)

    async def flush(self) -> None:
        failures = self.failures
        while self._rows or self._in_flight is not None:
            if self._idempotent and self.failures - failures >= 3:
                return  # a failing database must not hang the stop forever; the rows were logged
            self._kick()
            if self._in_flight is not None:
                await self._in_flight


def open_store(database: str, sqlite_path: Path | None, reactor: IReactorThreads) -> Store:
    """The store for a `database` URL; SQLite files live at `sqlite_path`."""
    scheme = urlsplit(database).scheme
    if scheme == "sqlite":
        assert sqlite_path is not None
        return Store(_SQLiteBackend(sqlite_path), reactor)
    if scheme in ("postgresql", "postgres"):
        return Store(_PostgresBackend(database), reactor)
    raise StoreError(f"unsupported database URL scheme {scheme!r}")
