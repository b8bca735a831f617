"""HTTP webhooks: bus events of chosen families and kinds POSTed as signed JSON to receivers, from a durable queue.

Each event is stored before the bus acknowledges it; each webhook delivers its queue in order, with backoff.
In a cluster each hub queues and delivers the events it handled, and reads the webhooks' changes from the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from bsscihub.bus import Event
from bsscihub.contract import masked_url, opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.keybox import KeyBox
from bsscihub.lifecycle import AsyncService
from bsscihub.store import Migration

if TYPE_CHECKING:
    from bsscihub.hub import Hub

SIGNATURE_HEADER = "X-Bsscihub-Signature-256"
KEY_FILE = "webhook-keys.secret"
"""In keys_dir: seals the webhooks' secrets in the database."""

MIGRATIONS = [
    Migration(
        "webhooks",
        1,
        """
        CREATE TABLE webhooks (
            id {pk},
            name TEXT NOT NULL,
            url TEXT NOT NULL,
            secret_box {blob} NOT NULL,
            families TEXT NOT NULL DEFAULT '',
            events TEXT NOT NULL DEFAULT '',
            enabled INTEGER NOT NULL DEFAULT 1,
            created_at {real} NOT NULL,
            created_by TEXT NOT NULL DEFAULT '',
            delivered {bigint} NOT NULL DEFAULT 0,
            failures {bigint} NOT NULL DEFAULT 0,
            last_attempt {real},
            last_success {real},
            last_status TEXT NOT NULL DEFAULT '',
            last_error TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE webhook_queue (
            id {pk},
            webhook_id {bigint} NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
            delivery TEXT NOT NULL,
            event TEXT NOT NULL,
            body {blob} NOT NULL,
            created {real} NOT NULL
        );
        CREATE INDEX webhook_queue_hook ON webhook_queue (webhook_id, id)
        """,
    ),
    # Hubs of a cluster share the database: each delivers the events it queued, in its own order.
    Migration(
        "webhooks",
        2,
        """
        ALTER TABLE webhook_queue ADD COLUMN node TEXT NOT NULL DEFAULT '';
        CREATE INDEX webhook_queue_node ON webhook_queue (webhook_id, node, id)
        """,
    ),
]

SYNC_INTERVAL = 5.0
"""Seconds within which a hub of a cluster uses a webhook made, changed or deleted on another hub."""

_RETRY_STATUSES = frozenset({408, 425, 429})
"""4xx answers that mean "later", not "never"."""


def check_url(url: Any) -> str:
    if not isinstance(url, str) or len(url) > 2048:
        raise CommandError("url must be an http:// or https:// URL of at most 2048 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise CommandError("url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise CommandError("url must be an http:// or https:// URL with a host")
    return url


def split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without user:password@ and the Basic authorization header for them (receivers such as
    Node-RED take them in the URL; HTTP clients send them as a header)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: sha256= and the hex HMAC-SHA256 of the body under the webhook's secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@attrs.define
class Webhook:
    id: int
    name: str
    url: str
    families: tuple[str, ...]
    events: tuple[str, ...]
    enabled: bool
    created_at: float
    created_by: str
    delivered: int = 0
    failures: int = 0
    last_attempt: float | None = None
    last_success: float | None = None
    last_status: str = ""
    last_error: str = ""
    queued: int = 0
    retry_at: float | None = None
    dropped: int = 0
    dropped_logged: float = float("-inf")
    unsaved: tuple[int, int] = (0, 0)  # deliveries and failures counted here, not added to the row yet

    def wants(self, event: Event) -> bool:
        return (self.enabled and (not self.families or event.family in self.families)
                and (not self.events or event.kind in self.events or f"{event.family}.{event.kind}" in self.events))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "url": masked_url(self.url), "families": list(self.families),
                "events": list(self.events), "enabled": self.enabled, "createdAt": rfc3339(self.created_at),
                "createdBy": self.created_by, "queued": self.queued, "delivered": self.delivered,
                "failures": self.failures, "lastAttempt": opt_time(self.last_attempt),
                "lastSuccess": opt_time(self.last_success), "lastStatus": self.last_status or None,
                "lastError": self.last_error or None, "nextRetry": opt_time(self.retry_at),
                "dropped": self.dropped}


class _Delivered(Exception):
    pass


class WebhookService(AsyncService):
    """Queues matching events (committed before the bus acknowledges them) and runs one delivery loop per webhook."""

    log = Logger()
    name = "webhooks"

    def __init__(self, hub: Hub, http: Any = None) -> None:
        self.hub = hub
        self.config = hub.config.section("webhooks")
        self.clock = hub.reactor
        # In a cluster every hub signs every webhook's events: one key file for all, in the shared keys_dir.
        self.box = KeyBox.of_hub(hub.config, KEY_FILE)
        self.hooks: dict[int, Webhook] = {}
        self._http = http
        self._writer: Any = None
        self._loops: dict[int, defer.Deferred[None]] = {}
        self._wake: dict[int, defer.Deferred[None]] = {}
        self._unsubscribe: Any = None
        self._stopping = False
        # In a cluster each hub delivers the events it queued, under its node name (required: it survives
        # a restart, so a hub delivers after it what it queued before it).
        self.node = hub.cluster.node if hub.cluster.clustered else ""
        self.sync_interval = SYNC_INTERVAL if hub.cluster.clustered else None
        self._sync: task.LoopingCall | None = None

    @property
    def http(self) -> Any:
        if self._http is None:
            import treq

            self._http = treq
        return self._http

    # -- lifecycle

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    async def _start(self) -> None:
        self.box.load()  # a key file that cannot be read or made stops the start, naming it
        store = self.hub.store
        self._writer = store.batch_writer(
            "INSERT INTO webhook_queue (webhook_id, delivery, event, body, created, node) VALUES {rows}",
            delay=0.005)
        for row in await store.fetchall(
                "SELECT id, name, url, families, events, enabled, created_at, created_by, delivered, failures,"
                " last_attempt, last_success, last_status, last_error FROM webhooks"):
            hook = self._hook(row)
            self.hooks[hook.id] = hook
        for hook_id, count in await store.fetchall(
                "SELECT webhook_id, COUNT(*) FROM webhook_queue WHERE node = ? GROUP BY webhook_id", (self.node,)):
            if int(hook_id) in self.hooks:
                self.hooks[int(hook_id)].queued = int(count)
        self._unsubscribe = self.hub.bus.subscribe(self.on_event)
        for hook in self.hooks.values():
            self._run(hook.id)
        if self.sync_interval is not None:
            self._sync = task.LoopingCall(self._synced)
            self._sync.clock = self.clock
            self._sync.start(self.sync_interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        self._stopping = True  # at once: a start still under way starts no delivery loop
        return super().stopService()

    async def _stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._sync is not None and self._sync.running:
            self._sync.stop()
        loops = list(self._loops.values())
        for d in loops:
            d.cancel()  # an unacknowledged delivery stays queued and goes out again after the restart
        await defer.DeferredList(loops, consumeErrors=True)
        if self._writer is not None:
            await self._writer.flush()

    @staticmethod
    def _hook(row: Sequence[Any]) -> Webhook:
        (hook_id, name, url, families, events, enabled, created_at, created_by, delivered, failures,
         last_attempt, last_success, last_status, last_error) = row
        return Webhook(int(hook_id), name, url, tuple(f for f in families.split(",") if f),
                       tuple(e for e in events.split(",") if e), bool(enabled), float(created_at), created_by,
                       int(delivered), int(failures), last_attempt, last_success, last_status, last_error)

    async def _synced(self) -> None:
        try:
            await self.sync()
        except Exception:
            self.log.failure("could not read the webhooks from the database")  # tried again next round

    async def sync(self) -> None:
        """Take up the webhooks as the database has them: made, changed or deleted on another hub."""
        rows = await self.hub.store.fetchall(
            "SELECT id, name, url, families, events, enabled, created_at, created_by, delivered, failures,"
            " last_attempt, last_success, last_status, last_error FROM webhooks")
        stored = {hook.id: hook for hook in map(self._hook, rows)}
        for hook_id in [h for h in self.hooks if h not in stored]:
            self._discard(hook_id)
        for hook_id, fresh in stored.items():
            hook = self.hooks.get(hook_id)
            if hook is None:
                self.hooks[hook_id] = fresh
                self._run(hook_id)
                continue
            woke = fresh.enabled and not hook.enabled
            hook.name, hook.url, hook.families, hook.events, hook.enabled = (
                fresh.name, fresh.url, fresh.families, fresh.events, fresh.enabled)
            hook.delivered, hook.failures = fresh.delivered + hook.unsaved[0], fresh.failures + hook.unsaved[1]
            if fresh.last_attempt is not None and (hook.last_attempt is None or fresh.last_attempt > hook.last_attempt):
                hook.last_attempt, hook.last_success, hook.last_status, hook.last_error = (
                    fresh.last_attempt, fresh.last_success, fresh.last_status, fresh.last_error)
            if woke:
                self._poke(hook_id)

    # -- the bus side

    def on_event(self, event: Event) -> defer.Deferred[None] | None:
        wanted = [hook for hook in self.hooks.values() if hook.wants(event)]
        if not wanted:
            return None
        now = self.clock.seconds()
        pending = []
        for hook in wanted:
            if hook.queued >= self.config.max_queue:
                self._drop(hook, now)
                continue
            delivery = uuid.uuid4().hex
            body = json.dumps({"id": delivery, "webhook": hook.id, "family": event.family, "event": event.kind,
                               "topic": event.topic, "time": rfc3339(now), "payload": event.payload},
                              separators=(",", ":"), allow_nan=False).encode()
            hook.queued += 1
            d = self._writer.add((hook.id, delivery, f"{event.family}.{event.kind}", body, now, self.node))
            d.addCallback(lambda _, hook_id=hook.id: self._poke(hook_id))
            pending.append(d)
        if not pending:
            return None
        if len(pending) == 1:
            return pending[0]
        return defer.gatherResults(pending, consumeErrors=True).addCallback(lambda _: None)

    def _drop(self, hook: Webhook, now: float) -> None:
        hook.dropped += 1
        if now - hook.dropped_logged >= 60:
            hook.dropped_logged = now
            self.log.warn("webhook {name}: {queued} events wait for {url} (webhooks.max_queue); new ones are dropped"
                          " ({dropped} so far)", name=hook.name, queued=hook.queued, url=_safe_url(hook.url),
                          dropped=hook.dropped)

    # -- delivery

    def _poke(self, hook_id: int) -> None:
        waiter = self._wake.pop(hook_id, None)
        if waiter is not None:
            waiter.callback(None)
        elif hook_id not in self._loops:
            self._run(hook_id)

    def _run(self, hook_id: int) -> None:
        if self._stopping or hook_id in self._loops:
            return
        d = defer.Deferred.fromCoroutine(self._deliver_loop(hook_id))
        self._loops[hook_id] = d

        def ended(result: Any) -> None:
            self._loops.pop(hook_id, None)
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.log.failure("webhook {id} delivery loop failed", result, id=hook_id)

        d.addBoth(ended)

    async def _deliver_loop(self, hook_id: int) -> None:
        store = self.hub.store
        failures = 0
        while not self._stopping:
            hook = self.hooks.get(hook_id)
            if hook is None or not hook.enabled:
                return
            rows = await store.fetchall(
                "SELECT id, delivery, event, body FROM webhook_queue WHERE webhook_id = ? AND node = ?"
                " ORDER BY id LIMIT 50", (hook_id, self.node))
            if not rows:
                waiter: defer.Deferred[None] = defer.Deferred()
                self._wake[hook_id] = waiter
                await waiter
                continue
            secret = self.box.open(f"webhook:{hook_id}", await self._sealed(hook_id))
            if secret is None:
                # Another hub's key file, or a damaged row: nothing can be signed; say so where operators look.
                self.log.error("webhook {name}: its secret does not open with {path}; not delivering",
                               name=hook.name, path=str(self.box.path))
                await self._record(hook, self.clock.seconds(), "error", "the secret does not open with this hub's"
                                   " webhook key file (keys_dir/webhook-keys.secret); delete the webhook and create"
                                   " it again",
                                   delivered=False, failed=True)
                return
            done: int | None = None  # the last row delivered and not yet deleted
            try:
                for row_id, delivery, kind, body in rows:
                    body = bytes(body)
                    while True:
                        hook = self.hooks.get(hook_id)
                        if hook is None or not hook.enabled or self._stopping:
                            return
                        outcome = await self._post(hook, secret, delivery, kind, body, failures)
                        if outcome is None:
                            failures = 0
                            break
                        failures += 1
                        await self._done(hook, done)
                        done = None
                        pause = min(self.config.retry_max, self.config.retry_min * 2 ** min(failures - 1, 30))
                        hook.retry_at = self.clock.seconds() + pause
                        try:
                            await task.deferLater(self.clock, pause, lambda: None)
                        finally:
                            hook.retry_at = None
                    done = row_id
                    hook.queued = max(0, hook.queued - 1)
            finally:
                # Rows and counters are written once per batch, not per delivery (two commits each
                # would cap a webhook near 170 deliveries/s); a crash before this sends them again.
                if hook is not None:
                    await self._done(hook, done)

    async def _done(self, hook: Webhook, upto: int | None) -> None:
        """Delete this webhook's delivered rows (up to `upto`: delivery is in order) and store its counters."""
        if upto is not None:
            await self._store_counters(hook, upto)

    async def _sealed(self, hook_id: int) -> bytes:
        row = await self.hub.store.fetchone("SELECT secret_box FROM webhooks WHERE id = ?", (hook_id,))
        return bytes(row[0]) if row else b""

    async def _post(self, hook: Webhook, secret: bytes, delivery: str, kind: str, body: bytes,
                    failures: int) -> str | None:
        """One try; None once the receiver took it (or refused it for good), else the error."""
        now = self.clock.seconds()
        headers = {"Content-Type": ["application/json"], "User-Agent": [f"bsscihub/{self.hub.version}"],
                   "X-Bsscihub-Event": [kind], "X-Bsscihub-Delivery": [delivery],
                   SIGNATURE_HEADER: [sign(secret, body)]}
        url, authorization = split_credentials(hook.url)
        if authorization is not None:
            headers["Authorization"] = [authorization]
        error = ""
        status = ""
        try:
            response = await self.http.post(url, data=body, headers=headers, timeout=self.config.timeout,
                                            reactor=self.clock)
            code = response.code
            await response.content()
            status = str(code)
            if 200 <= code < 300:
                error = ""
            elif 400 <= code < 500 and code not in _RETRY_STATUSES:
                # The receiver refuses this body for good: retrying would block every later event.
                error = f"refused with HTTP {code}; event {delivery} dropped"
                self.log.warn("webhook {name}: {url} refused delivery {delivery} with HTTP {code}; dropped",
                              name=hook.name, url=_safe_url(hook.url), delivery=delivery, code=code)
                await self._record(hook, now, status, error, delivered=False, failed=True)
                return None
            else:
                error = f"HTTP {code}"
        except defer.CancelledError:
            raise
        except Exception as e:
            status = "error"
            error = _describe(e)
        if not error:
            await self._record(hook, now, status, "", delivered=True, failed=False)
            return None
        if failures == 0:
            self.log.warn("webhook {name}: delivery to {url} failed ({error}); retrying with backoff",
                          name=hook.name, url=_safe_url(hook.url), error=error)
        await self._record(hook, now, status, error, delivered=False, failed=True)
        return error

    async def _record(self, hook: Webhook, now: float, status: str, error: str, *, delivered: bool,
                      failed: bool) -> None:
        hook.last_attempt, hook.last_status = now, status
        if delivered:
            hook.delivered += 1
            hook.last_success = now
        if failed:
            hook.failures += 1
            hook.last_error = error
        hook.unsaved = (hook.unsaved[0] + delivered, hook.unsaved[1] + failed)
        if delivered:
            return  # stored with the batch (_done)
        await self._store_counters(hook)

    async def _store_counters(self, hook: Webhook, upto: int | None = None) -> None:
        """Add what this hub counted to the row (several hubs deliver for one webhook), set the last try
        and delete this hub's delivered rows up to `upto`: one transaction."""
        added, hook.unsaved = hook.unsaved, (0, 0)
        last = (hook.last_attempt, hook.last_success, hook.last_status, hook.last_error)
        node = self.node

        def write(cursor: Any) -> None:
            if upto is not None:
                cursor.execute("DELETE FROM webhook_queue WHERE webhook_id = ? AND node = ? AND id <= ?",
                               (hook.id, node, upto))
            cursor.execute(
                "UPDATE webhooks SET delivered = delivered + ?, failures = failures + ?, last_attempt = ?,"
                " last_success = ?, last_status = ?, last_error = ? WHERE id = ?", (*added, *last, hook.id))

        try:
            await self.hub.store.interaction(write)
        except BaseException:
            hook.unsaved = (hook.unsaved[0] + added[0], hook.unsaved[1] + added[1])  # added next time
            raise

    # -- management (REST and pages)

    def _check_filters(self, families: Any, events: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        known = set(self.hub.families) | {"alerts"}
        families = tuple(families or ())
        for family in families:
            if family not in known:
                raise CommandError(f"unknown family {family!r}; one of {', '.join(sorted(known))}")
        events = tuple(events or ())
        for name in events:
            if not name or "," in name:
                raise CommandError(f"not an event kind: {name!r}")
        return families, events

    async def add(self, body: Mapping[str, Any], actor: str) -> tuple[Webhook, str]:
        """A new webhook and its secret (shown once; generated when the body has none)."""
        url = check_url(body["url"])
        families, events = self._check_filters(body.get("families"), body.get("events"))
        secret_text = body.get("secret") or secrets.token_hex(32)
        now = self.clock.seconds()
        values = (body["name"], url, families, events, bool(body.get("enabled", True)), now, actor)

        def insert(cursor: Any) -> int:
            cursor.execute("INSERT INTO webhooks (name, url, secret_box, families, events, enabled, created_at,"
                           " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (values[0], url, b"", ",".join(families), ",".join(events), int(values[4]), now, actor))
            hook_id = int(cursor.execute("SELECT MAX(id) FROM webhooks").fetchone()[0])
            # Sealed with the row's id as associated data: a sealed secret copied to another row does not open.
            sealed = self.box.seal(f"webhook:{hook_id}", secret_text.encode())
            cursor.execute("UPDATE webhooks SET secret_box = ? WHERE id = ?", (sealed, hook_id))
            return hook_id

        hook_id = await self.hub.store.interaction(insert)
        hook = Webhook(hook_id, values[0], url, families, events, values[4], now, actor)
        self.hooks[hook_id] = hook
        self._run(hook_id)
        return hook, secret_text

    async def update(self, hook_id: int, changes: Mapping[str, Any]) -> Webhook | None:
        hook = self.hooks.get(hook_id)
        if hook is None:
            return None
        url = check_url(changes["url"]) if "url" in changes else hook.url
        families, events = self._check_filters(changes.get("families", hook.families), changes.get("events",
                                                                                                    hook.events))
        name = changes.get("name", hook.name)
        enabled = bool(changes.get("enabled", hook.enabled))
        await self.hub.store.execute(
            "UPDATE webhooks SET name = ?, url = ?, families = ?, events = ?, enabled = ? WHERE id = ?",
            (name, url, ",".join(families), ",".join(events), int(enabled), hook_id))
        hook.name, hook.url, hook.families, hook.events, hook.enabled = name, url, families, events, enabled
        if enabled:
            self._poke(hook_id)
        return hook

    def _discard(self, hook_id: int) -> Webhook | None:
        """Forget a webhook here and stop its delivery."""
        hook = self.hooks.pop(hook_id, None)
        loop = self._loops.get(hook_id)
        if loop is not None:
            loop.cancel()
        waiter = self._wake.pop(hook_id, None)
        if waiter is not None and not waiter.called:
            waiter.cancel()
        return hook

    async def delete(self, hook_id: int) -> bool:
        if self._discard(hook_id) is None:
            return False

        def delete(cursor: Any) -> None:
            cursor.execute("DELETE FROM webhook_queue WHERE webhook_id = ?", (hook_id,))
            cursor.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,))

        await self.hub.store.interaction(delete)
        return True


def _safe_url(url: str) -> str:
    """The URL without credentials or query (which may carry a token): for log lines."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300] if text else type(error).__name__
