"""The MQTT bridge's durable outbox: every message goes to disk before the broker sees it.

Messages leave in order, a window at a time, and are deleted only once the broker acknowledged them.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from bsscihub.mqtt.client import ConnectionLost, PublishRefused
from bsscihub.store import row_statements

__all__ = ["Outbox", "OutboxClosed", "OutboxDropped", "OutboxFull", "Publish", "check_topic"]

Publish = Callable[[str, bytes, bool, "bytes | None"], "defer.Deferred[None]"]
"""publish(topic, payload, retain, correlation) -> Deferred firing on the broker's acknowledgement."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    correlation BLOB,
    created REAL NOT NULL
)
"""
_INSERT = "INSERT INTO outbox (id, topic, payload, retain, correlation, created) VALUES {rows}"
_SELECT = "SELECT id, topic, payload, retain, correlation, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?"

_LOG_EVERY = 10.0
"""Seconds between two log lines about dropped or refused messages."""


def check_topic(topic: str) -> None:
    """Raise ValueError unless ``topic`` can be published to (no wildcards, UTF-8, at most 65535 bytes)."""
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"not a topic one can publish to: {topic!r}")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"topic is not valid UTF-8: {topic!r}") from None
    if size > 65535:
        raise ValueError(f"topic longer than 65535 bytes: {topic[:40]!r}...")


class OutboxFull(Exception):
    """The outbox holds `outbox_max` messages and the policy is drop_new: this one was not stored."""


class OutboxDropped(Exception):
    """The message was stored, then dropped (overflow policy or refused by the broker) before delivery."""


class OutboxClosed(Exception):
    """append() after close()."""


class _Message:
    __slots__ = (
        "id",
        "topic",
        "payload",
        "retain",
        "correlation",
        "created",
        "committed",
        "dropped",
        "spill",
        "d",
        "acked",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        retain: bool,
        correlation: bytes | None,
        created: float,
        d: defer.Deferred[None] | None,
        msg_id: int = 0,
    ) -> None:
        self.id = msg_id
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.correlation = correlation
        self.created = created
        self.committed = msg_id != 0
        self.dropped = False
        # committed to disk only; loaded back into memory later
        self.spill = False
        self.d = d
        # fired on the broker's acknowledgement, for callers that asked for it
        self.acked: defer.Deferred[None] | None = None


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ids, so that acknowledgements in order cost one DELETE per batch."""
    ids.sort()
    out: list[tuple[int, int]] = []
    start = prev = ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            out.append((start, prev))
            start = i
        prev = i
    out.append((start, prev))
    return out


class _Disk:
    """The SQLite side, used only from the outbox's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def open(self, limit: int, overflow: str) -> tuple[int, int, int, int]:
        """Schema, then trim to `limit` by the policy; returns (count, first id, last id, trimmed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned survives a power cut; the bus acknowledges only then
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SCHEMA)
        self.conn = conn
        count, first, last = conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM outbox").fetchone()
        trimmed = 0
        if count > limit:
            # outbox_max was lowered since the last run
            trimmed = count - limit
            order = "ASC" if overflow == "drop_oldest" else "DESC"
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id {order} LIMIT ?)", (trimmed,)
            )
            conn.execute("COMMIT")
            count, first, last = conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM outbox").fetchone()
        return count, first or 0, last or 0, trimmed

    def write(self, rows: list[tuple[Any, ...]], deletes: list[tuple[int, int]]) -> None:
        conn = self.conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement, params in row_statements(_INSERT, rows):
                conn.execute(statement, params)
            if deletes:
                conn.executemany("DELETE FROM outbox WHERE id BETWEEN ? AND ?", deletes)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def load(self, after: int, skip: int, limit: int) -> tuple[int, list[tuple[Any, ...]], float | None]:
        """Drop the first `skip` rows after `after`, return the next `limit` and the age of the one after."""
        conn = self.conn
        assert conn is not None
        rows = conn.execute(_SELECT, (after, skip + limit + 1)).fetchall()
        skipped = rows[:skip]
        if skipped:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?", (skipped[0][0], skipped[-1][0]))
            conn.execute("COMMIT")
        page = rows[skip : skip + limit]
        following = rows[skip + limit][5] if len(rows) > skip + limit else None
        return len(skipped), page, following

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Outbox:
    """Messages on their way to the broker, on disk from append() until the broker's PUBACK.

    - `append` returns a Deferred that fires once the message is committed (a group commit
      every `commit_delay` seconds, or as soon as the previous commit is done).
    - While `resume`d, committed messages are handed to `publish` in append order, at most
      `window` at a time; each is deleted (deletes are batched too) when its Deferred fires.
      When it fails with `ConnectionLost`, the message goes back to the head of the line and
      is sent again, in order, after the next `resume`. After a restart, whatever is still on
      disk is sent first.
    - At most `max_messages` are kept. When full, ``drop_oldest`` drops the oldest message not
      yet handed to the broker to make room; ``drop_new`` refuses the new one (its Deferred
      fails with `OutboxFull`). Either way `dropped` counts it and a log line says so, at most
      every ten seconds.
    - Only `memory_max` messages are held in memory; the rest wait on disk and are read back
      a page at a time as the line moves, so a long broker outage costs disk, not memory.

    The SQLite file is used from one thread of the outbox's own, so the reactor never waits on it.
    Its group commit is not store.BatchWriter's: one write also deletes what the broker acknowledged,
    numbers the messages and, failing, keeps everything and retries while the appenders wait.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        reactor: IReactorThreads,
        *,
        max_messages: int,
        overflow: str = "drop_oldest",
        clock: IReactorTime | None = None,
        window: int = 1000,
        memory_max: int = 20_000,
        page: int = 5_000,
        commit_delay: float = 0.002,
        delete_delay: float = 0.05,
    ) -> None:
        if overflow not in ("drop_oldest", "drop_new"):
            raise ValueError(f"overflow must be drop_oldest or drop_new, not {overflow!r}")
        if max_messages < 1 or window < 1 or memory_max < 1:
            raise ValueError("max_messages, window and memory_max must be positive")
        self.path = Path(path)
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.max_messages = max_messages
        self.overflow = overflow
        self._window = window
        self._memory_max = memory_max
        self._page = max(1, min(page, memory_max // 2 or 1))
        self._commit_delay = commit_delay
        self._delete_delay = delete_delay

        self._disk = _Disk(self.path)
        self._pool: ThreadPool | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        self._publish: Publish | None = None
        self._online = False

        self._next_id = 1
        # unsent messages in memory, in order; the uncommitted ones are at the end
        self._queue: deque[_Message] = deque()
        self._inflight: dict[int, _Message] = {}
        # failed with ConnectionLost, waiting to go back to the head of the queue
        self._returned: list[_Message] = []
        # appended, not yet handed to a write
        self._batch: list[_Message] = []
        self._deletes: list[int] = []
        self._writing: defer.Deferred[None] | None = None
        self._write_timer: IDelayedCall | None = None
        self._write_delay = 0.0
        # the disk-only part of the line: ids > _loaded_upto, read back by _load
        self._loaded_upto = 0
        self._unloaded = 0
        self._skip = 0
        self._loading = False
        self._unloaded_oldest: float | None = None
        # spilled messages appended but not committed yet, in order
        self._spill_pending: deque[_Message] = deque()
        self._idle_waiters: list[defer.Deferred[None]] = []

        self.depth = 0
        """Messages in the outbox: not yet acknowledged by the broker, not dropped."""
        self.appended = 0
        self.acked = 0
        self.dropped = 0
        self.refused = 0
        self.resent = 0
        self.commits = 0
        self._unreported_drops = 0
        self._unreported_refusals = 0
        self._last_drop_log: float | None = None
        self._last_refusal_log: float | None = None

    # -- lifecycle --------------------------------------------------------------

    def open(self) -> defer.Deferred[None]:
        """Start the thread, create or reopen the file; what it holds is sent first."""
        return defer.Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="bsscihub-outbox")
            self._pool.start()
        count, first, last, trimmed = await self._run(self._disk.open, self.max_messages, self.overflow)
        if trimmed:
            self.dropped += trimmed
            self.log.warn(  # noqa: G010
                "MQTT outbox held more than outbox_max={limit} messages; dropped {count} ({policy})",
                limit=self.max_messages,
                count=trimmed,
                policy=self.overflow,
            )
        self._next_id = last + 1
        self._loaded_upto = first - 1 if count else last
        self._unloaded = count
        self.depth += count
        self._opened = True
        if count:
            self.log.info(
                "MQTT outbox {path} holds {count} unacknowledged messages; they are sent first",
                path=str(self.path),
                count=count,
            )
        # appends made before the file was open are in _batch (all spilled), not acknowledged yet
        while self.depth > self.max_messages and self.overflow == "drop_oldest" and self._dropOldest():
            pass
        while self.depth > self.max_messages and self.overflow == "drop_new" and self._batch:
            msg = self._batch.pop()
            self._spill_pending.pop()
            self.depth -= 1
            self.appended -= 1
            self._countDrop(1)
            full = OutboxFull(f"the MQTT outbox holds outbox_max={self.max_messages} messages")
            for d in (msg.d, msg.acked):
                if d is not None:
                    d.errback(full)
        self._scheduleWrite(0.0)
        self._maybeLoad()

    def close(self) -> defer.Deferred[None]:
        """Commit what was appended, delete what was acknowledged, release the file and the thread."""
        return defer.Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        self._closing = True
        self.pause()
        if self._opened:
            while True:
                if self._writing is not None:
                    await self._writing
                elif self._loading:
                    # the file is closed on the same thread, after the read; just let it finish
                    await self._wait(0.001)
                elif self._batch or self._deletes:
                    self._cancelTimer()
                    self._write()
                else:
                    break
        else:
            for msg in self._batch:
                if msg.d is not None:
                    msg.d.errback(OutboxClosed("the outbox was closed before it was opened"))
            self._batch = []
        self._cancelTimer()
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await threads.deferToThreadPool(self._reactor, pool, self._disk.close)  # type: ignore[arg-type]
            # joining an idle thread is quick, but still not for the reactor thread
            await threads.deferToThread(pool.stop)

    def _wait(self, seconds: float) -> defer.Deferred[None]:
        from twisted.internet.task import deferLater

        return deferLater(self._clock, seconds, lambda: None)  # type: ignore[arg-type]

    # -- appending ----------------------------------------------------------------

    def append(
        self,
        topic: str,
        payload: bytes,
        retain: bool = False,
        correlation: bytes | None = None,
        *,
        acked: bool = False,
    ) -> defer.Deferred[None]:
        """Store a message for the broker; the Deferred fires once it is committed to disk.

        With ``acked=True`` it fires on the broker's acknowledgement instead (and fails with
        `OutboxDropped` if the message is dropped before that).
        """
        if self._closing:
            return defer.fail(OutboxClosed("the MQTT outbox is closed"))
        try:
            check_topic(topic)
        except ValueError as e:
            # refused here: on the wire it would cost the connection, on every reconnect
            return defer.fail(e)
        d: defer.Deferred[None] = defer.Deferred()
        if self._opened and self.depth >= self.max_messages:
            if self.overflow == "drop_new" or not self._dropOldest():
                self._countDrop(1)
                d.errback(OutboxFull(f"the MQTT outbox holds outbox_max={self.max_messages} messages"))
                return d
        msg = _Message(topic, payload, bool(retain), correlation, self._clock.seconds(), None if acked else d)
        if acked:
            msg.acked = d
        self.appended += 1
        self.depth += 1
        # once anything waits on disk only, later messages must too, or they would overtake it
        if not self._opened or self._unloaded or self._spill_pending or len(self._queue) >= self._memory_max:
            msg.spill = True
            self._spill_pending.append(msg)
        else:
            self._queue.append(msg)
        self._batch.append(msg)
        self._scheduleWrite(self._commit_delay)
        return d

    def _scheduleWrite(self, delay: float) -> None:
        if self._writing is not None or not self._opened or self._closed:
            return  # the write in progress schedules the next one
        if self._write_timer is not None and delay >= self._write_delay:
            return  # one already comes as soon or sooner (the common case: one check per ack)
        if not self._batch and not self._deletes:
            return
        self._cancelTimer()
        self._write_delay = delay
        self._write_timer = self._clock.callLater(delay, self._write)

    def _cancelTimer(self) -> None:
        if self._write_timer is not None and self._write_timer.active():
            self._write_timer.cancel()
        self._write_timer = None

    def _write(self) -> None:
        self._write_timer = None
        if self._writing is not None or (not self._batch and not self._deletes):
            return
        batch, self._batch = self._batch, []
        deletes, self._deletes = self._deletes, []
        rows = []
        for msg in batch:
            if msg.id == 0:
                msg.id = self._next_id
                self._next_id += 1
                if not msg.spill:
                    self._loaded_upto = msg.id
            if not msg.dropped:
                rows.append((msg.id, msg.topic, msg.payload, int(msg.retain), msg.correlation, msg.created))
        d = self._run(self._disk.write, rows, _ranges(deletes) if deletes else [])
        self._writing = d
        d.addBoth(self._written, batch, deletes)

    def _written(self, result: Any, batch: list[_Message], deletes: list[int]) -> None:
        self._writing = None
        if isinstance(result, Failure):
            # nothing was committed: keep everything for the next attempt, in order
            self.log.failure("MQTT outbox: writing {path} failed; retrying", result, path=str(self.path))
            self._batch[:0] = batch
            self._deletes.extend(deletes)
            if not self._closing:
                self._scheduleWrite(1.0)
            else:
                # closing: the caller must not wait forever on a broken disk
                for msg in batch:
                    if msg.d is not None:
                        msg.d.errback(result)
                self._batch = []
                self._deletes = []
            return
        self.commits += 1
        spilled = 0
        for msg in batch:
            if msg.dropped:
                self._deletes.append(msg.id)
            else:
                msg.committed = True
                if msg.spill:
                    if not self._unloaded and not spilled:
                        self._unloaded_oldest = msg.created
                    spilled += 1
            d, msg.d = msg.d, None
            if d is not None:
                d.callback(None)
        self._unloaded += spilled
        pending = self._spill_pending
        while pending and (pending[0].committed or pending[0].dropped):
            pending.popleft()
        self._scheduleWrite(self._commit_delay if self._batch else self._delete_delay)
        self._maybeLoad()
        self._pump()

    # -- reading back what waits on disk -------------------------------------------

    def _maybeLoad(self) -> None:
        if self._loading or not self._opened or self._closed:
            return
        if self._unloaded - self._skip <= 0 and not self._skip:
            return
        if len(self._queue) + self._page > self._memory_max:
            return
        if self._skip == 0 and len(self._queue) >= self._page:
            return
        self._loading = True
        skip = min(self._skip, self._unloaded)
        d = self._run(self._disk.load, self._loaded_upto, skip, self._page)
        d.addBoth(self._loaded)

    def _loaded(self, result: Any) -> None:
        self._loading = False
        if isinstance(result, Failure):
            self.log.failure("MQTT outbox: reading {path} failed; retrying", result, path=str(self.path))
            self._clock.callLater(1.0, self._maybeLoad)
            return
        skipped, rows, following = result
        self._skip -= skipped
        self._unloaded -= skipped + len(rows)
        queue = self._queue
        for row_id, topic, payload, retain, correlation, created in rows:
            queue.append(_Message(topic, payload, bool(retain), correlation, created, None, row_id))
        if rows:
            self._loaded_upto = rows[-1][0]
        # drops asked for while this page was read were meant for its oldest rows
        while self._skip and queue:
            victim = queue.popleft()
            self._skip -= 1
            self._deletes.append(victim.id)
            self._scheduleWrite(self._delete_delay)
        self._unloaded_oldest = following if self._unloaded else None
        self._maybeLoad()
        self._pump()

    # -- sending ----------------------------------------------------------------

    def resume(self, publish: Publish) -> None:
        """The broker is reachable: send through ``publish`` from the oldest unacknowledged message on."""
        self._publish = publish
        self._online = True
        self._pump()

    def pause(self) -> None:
        """The connection is gone: stop sending (what was in flight comes back when it fails)."""
        self._online = False
        self._requeue()
        self._notifyIdle()

    def _requeue(self) -> None:
        returned = self._returned
        if returned:
            self._returned = []
            returned.sort(key=lambda m: m.id)
            self.resent += len(returned)
            self._queue.extendleft(reversed(returned))

    def _pump(self) -> None:
        if self._returned:
            self._requeue()
        if not self._online or self._publish is None:
            self._maybeLoad()
            self._notifyIdle()
            return
        queue, inflight, publish, window = self._queue, self._inflight, self._publish, self._window
        while queue and len(inflight) < window:
            msg = queue[0]
            if not msg.committed:
                break
            queue.popleft()
            inflight[msg.id] = msg
            try:
                d = publish(msg.topic, msg.payload, msg.retain, msg.correlation)
            except ValueError as e:
                # the topic or payload itself is unacceptable: resending cannot help
                del inflight[msg.id]
                self._refused(msg, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - e.g. NotConnected: wait for the next resume()
                del inflight[msg.id]
                queue.appendleft(msg)
                self._online = False
                self.log.debug("MQTT outbox paused: {error}", error=str(e))
                break
            d.addCallbacks(self._acked, self._failed, callbackArgs=(msg,), errbackArgs=(msg,))
        self._maybeLoad()
        self._notifyIdle()

    def _notifyIdle(self) -> None:
        if not self._inflight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _acked(self, _: Any, msg: _Message) -> None:
        if self._inflight.pop(msg.id, None) is None:
            return
        self.acked += 1
        self.depth -= 1
        self._deletes.append(msg.id)
        self._scheduleWrite(self._delete_delay)
        if msg.acked is not None:
            msg.acked.callback(None)
        self._pump()

    def _failed(self, failure: Failure, msg: _Message) -> None:
        if self._inflight.pop(msg.id, None) is None:
            return
        if failure.check(PublishRefused):
            self._refused(msg, failure.getErrorMessage())
            self._pump()
            return
        if not failure.check(ConnectionLost):
            self.log.failure("MQTT outbox: publishing to {topic} failed; it will be resent", failure, topic=msg.topic)
        self._returned.append(msg)

    def _refused(self, msg: _Message, reason: str) -> None:
        """The broker (or paho) will never take this message: forget it, say so."""
        self.depth -= 1
        self.refused += 1
        self._deletes.append(msg.id)
        self._scheduleWrite(self._delete_delay)
        if msg.acked is not None:
            msg.acked.errback(OutboxDropped(f"refused: {reason}"))
        self._unreported_refusals += 1
        now = self._clock.seconds()
        if self._last_refusal_log is None or now - self._last_refusal_log >= _LOG_EVERY:
            self.log.warn(  # noqa: G010
                "MQTT broker refused {count} message(s), dropped; last: {topic}: {reason}",
                count=self._unreported_refusals,
                topic=msg.topic,
                reason=reason,
            )
            self._unreported_refusals = 0
            self._last_refusal_log = now

    # -- overflow -----------------------------------------------------------------

    def _dropOldest(self) -> bool:
        """Make room by dropping the oldest message not handed to the broker; False if there is none."""
        victim: _Message | None = None
        if self._queue:
            victim = self._queue.popleft()
        elif self._unloaded - self._skip > 0:
            # still on disk: the next read deletes it instead of loading it
            self._skip += 1
            self._unloaded_oldest = None
            self._maybeLoad()
        else:
            while self._spill_pending:
                candidate = self._spill_pending.popleft()
                if not candidate.dropped and not candidate.committed:
                    victim = candidate
                    break
            if victim is None:
                return False
        if victim is not None:
            victim.dropped = True
            if victim.committed:
                self._deletes.append(victim.id)
                self._scheduleWrite(self._delete_delay)
            if victim.acked is not None:
                victim.acked.errback(OutboxDropped("dropped by the drop_oldest overflow policy"))
        self.depth -= 1
        self._countDrop(1)
        return True

    def _countDrop(self, count: int) -> None:
        self.dropped += count
        self._unreported_drops += count
        now = self._clock.seconds()
        if self._last_drop_log is None or now - self._last_drop_log >= _LOG_EVERY:
            self.log.warn(  # noqa: G010
                "MQTT outbox full (outbox_max={limit}): dropped {count} message(s) ({policy})",
                limit=self.max_messages,
                count=self._unreported_drops,
                policy=self.overflow,
            )
            self._unreported_drops = 0
            self._last_drop_log = now

    # -- figures ----------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def oldest_age(self) -> float | None:
        """Seconds the oldest unacknowledged message has waited, or None when the outbox is empty."""
        if not self.depth:
            return None
        created: float | None = None
        for msg in self._inflight.values():
            created = msg.created
            break
        if created is None:
            for msg in self._returned:
                created = msg.created if created is None else min(created, msg.created)
        if created is None and self._queue:
            created = self._queue[0].created
        if created is None:
            created = self._unloaded_oldest
        if created is None and self._spill_pending:
            created = self._spill_pending[0].created
        if created is None:
            return None
        return max(0.0, self._clock.seconds() - created)

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once nothing is in flight (at once if nothing is)."""
        if not self._inflight:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # -- the thread ---------------------------------------------------------------

    def _run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._pool is None:
            return defer.fail(OutboxClosed("the MQTT outbox is not open"))
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args)  # type: ignore[arg-type]
