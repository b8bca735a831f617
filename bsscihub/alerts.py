"""Alerts on what devices of every family report: silence longer than X, back online, battery or signal low.

Reads the event bus only; each transition fires once; states are stored, so a restart neither re-fires nor forgets.
In a cluster every hub stores what it heard and one hub, the lease holder, evaluates the shared database's view."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from bsscihub.bus import Event
from bsscihub.cluster import Fence, HeldEvent, LeaseEvents
from bsscihub.contract import opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import EventSpec, receiver_ids
from bsscihub.lifecycle import AsyncService
from bsscihub.store import Migration, page

if TYPE_CHECKING:
    from bsscihub.hub import Hub

CONDITIONS = ("offline", "battery_below", "signal_below")
EVENTS = (  # what AlertService.payload publishes, declared as a family declares its events
    EventSpec("alert", "alerts/{family}/{kind}/{id}/{condition}", False,
              '{"ruleId", "rule", "family", "kind", "id", "condition", "state", "value", "threshold", "since",'
              ' "lastSeen", "time"}'),
)

MIGRATIONS = [
    Migration(
        "alerts",
        1,
        """
        CREATE TABLE alert_rules (
            id {pk},
            name TEXT NOT NULL,
            family TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT '',
            target TEXT NOT NULL DEFAULT '',
            condition TEXT NOT NULL,
            threshold {real},
            silence {real},
            hysteresis {real} NOT NULL DEFAULT 0,
            enabled INTEGER NOT NULL DEFAULT 1,
            created_at {real} NOT NULL,
            created_by TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE alert_targets (
            family TEXT NOT NULL,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            last_seen {real},
            reported TEXT,
            battery {real},
            signal {real},
            PRIMARY KEY (family, kind, target)
        );
        CREATE TABLE alert_states (
            rule_id {bigint} NOT NULL REFERENCES alert_rules(id) ON DELETE CASCADE,
            family TEXT NOT NULL,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            since {real} NOT NULL,
            value {real},
            PRIMARY KEY (rule_id, family, kind, target)
        );
        CREATE TABLE alert_history (
            id {pk},
            time {real} NOT NULL,
            rule_id {bigint} NOT NULL,
            rule_name TEXT NOT NULL,
            family TEXT NOT NULL,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            condition TEXT NOT NULL,
            state TEXT NOT NULL,
            value {real}
        );
        CREATE INDEX alert_history_time ON alert_history (time)
        """,
    ),
]

_LIFE_SIGNS = frozenset({"up", "status", "state", "reading"})
"""Last topic levels that mean the device itself was heard (not an answer the hub made up)."""


@attrs.frozen
class Rule:
    id: int
    name: str
    family: str
    condition: str
    kind: str = ""
    target: str = ""
    threshold: float | None = None
    after: float | None = None
    hysteresis: float = 0.0
    enabled: bool = True
    created_at: float = 0.0
    created_by: str = ""

    def covers(self, family: str, kind: str, target: str) -> bool:
        return (self.family == family and (not self.kind or self.kind == kind)
                and (not self.target or self.target == target))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "family": self.family, "kind": self.kind or None,
                "target": self.target or None, "condition": self.condition, "threshold": self.threshold,
                "after": self.after, "hysteresis": self.hysteresis, "enabled": self.enabled,
                "createdAt": rfc3339(self.created_at), "createdBy": self.created_by}


@attrs.define
class Target:
    """What the alerts know of one device: when it was last heard, what its family says, its last readings."""

    family: str
    kind: str
    id: str
    last_seen: float | None = None
    reported: str | None = None  # "online"/"offline" when the family says so
    battery: float | None = None
    signal: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.family, self.kind, self.id)


@attrs.define
class Active:
    since: float
    value: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def battery_of(payload: Mapping[str, Any]) -> float | None:
    """A battery level in the forms the families publish: a field, a value among `values`, a typed reading."""
    for key in ("battery", "batteryLevel", "battery_level"):
        if key in payload:
            return _number(payload[key])
    values = payload.get("values")
    if isinstance(values, Mapping) and "battery" in values:
        return _number(values["battery"])
    if str(payload.get("type", "")).lower() == "battery":
        return _number(payload.get("value"))
    return None


def signal_of(payload: Mapping[str, Any]) -> float | None:
    """RSSI in dBm: the payload's own, or the best of its receivers (mioty uplinks, BLE readings)."""
    receivers = payload.get("receivers")
    if isinstance(receivers, list) and receivers:
        found = [_number(r.get("rssi")) for r in receivers if isinstance(r, Mapping)]
        numbers = [n for n in found if n is not None]
        if numbers:
            return max(numbers)
    return _number(payload.get("rssi"))


def check_rule(body: Mapping[str, Any], families: Mapping[str, str]) -> dict[str, Any]:
    """Validate a rule body (after schema validation); raises CommandError with the reason."""
    family = body["family"]
    if family not in families:
        raise CommandError(f"family {family!r} is not enabled; enabled: {', '.join(sorted(families))}")
    condition = body["condition"]
    if condition == "offline":
        if body.get("threshold") is not None:
            raise CommandError("threshold is for battery_below and signal_below; offline takes after")
    elif body.get("threshold") is None:
        raise CommandError(f"{condition} needs a threshold")
    elif body.get("after") is not None:
        raise CommandError("after (a silence) is for the offline condition")
    return dict(body)


class AlertService(AsyncService):
    """Keeps targets and alert states in memory (the database holds the same), evaluates rules on each
    event and every `check_interval`, and publishes each transition on the bus as an `alerts` event.

    In a cluster (`hub.cluster.clustered`) each hub writes the targets it heard every round and reads
    back rules, targets and states from the shared database; only the holder of the `alerts` lease
    evaluates, so each transition fires once, from one hub, whichever hubs heard the device."""

    log = Logger()
    name = "alerts"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.config = hub.config.section("alerts")
        self.clock = hub.reactor
        self.clustered = hub.cluster.clustered
        self.lease = hub.cluster.lease("alerts", self.clock)
        self.lease_events = LeaseEvents(self.lease, hub.store, hub.bus, self.clock)  # a cluster's transitions
        self.rules: dict[int, Rule] = {}
        self.targets: dict[tuple[str, str, str], Target] = {}
        self.active: dict[tuple[int, str, str, str], Active] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._roots = {getattr(f, "topic_root", None) or n: n for n, f in hub.families.items()}
        self._receivers = receiver_ids(hub.families)
        self._by_family: dict[str, list[Rule]] = {}
        self._wants: dict[str, tuple[bool, bool]] = {}
        self._unsubscribe: Any = None
        self._loop: LoopingCall | None = None
        self._pending: set[defer.Deferred[Any]] = set()
        # The last write asked for each (rule, target), or a target's deletion: the next one waits for it
        # (removed once it is done).
        self._in_turn: dict[tuple[Any, ...], defer.Deferred[None]] = {}
        self._last_purge = 0.0
        self._changes = 0  # transitions made here: states read back from before one are stale
        self.started_at = self.clock.seconds()

    # -- lifecycle

    def startService(self) -> None:
        self.started_at = self.clock.seconds()
        super().startService()  # when_ready fires once rules, targets and states are loaded

    async def _start(self) -> None:
        store = self.hub.store
        for row in await store.fetchall(
                "SELECT id, name, family, kind, target, condition, threshold, silence, hysteresis, enabled,"
                " created_at, created_by FROM alert_rules"):
            rule = self._rule(row)
            self.rules[rule.id] = rule
        for family, kind, target, last_seen, reported, battery, signal in await store.fetchall(
                "SELECT family, kind, target, last_seen, reported, battery, signal FROM alert_targets"):
            t = Target(family, kind, target, last_seen, reported, battery, signal)
            self.targets[t.key] = t
        for rule_id, family, kind, target, since, value in await store.fetchall(
                "SELECT rule_id, family, kind, target, since, value FROM alert_states"):
            self.active[(int(rule_id), family, kind, target)] = Active(float(since), value)
        self._index()
        self._unsubscribe = self.hub.bus.subscribe(self.on_event)
        self.lease.start()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.config.check_interval, now=False).addErrback(
            lambda f: self.log.failure("alert checks stopped", f))

    async def _stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        await self._flush_targets()
        while self._pending:
            await defer.DeferredList(list(self._pending), consumeErrors=True)
        await self.lease.stop()

    @staticmethod
    def _rule(row: tuple[Any, ...]) -> Rule:
        (rule_id, name, family, kind, target, condition, threshold, after, hysteresis, enabled,
         created_at, created_by) = row
        return Rule(int(rule_id), name, family, condition, kind, target, threshold, after, float(hysteresis),
                    bool(enabled), float(created_at), created_by)

    def _index(self) -> None:
        by_family: dict[str, list[Rule]] = {}
        wants: dict[str, tuple[bool, bool]] = {}
        for rule in self.rules.values():
            if rule.enabled:
                by_family.setdefault(rule.family, []).append(rule)
                battery, signal = wants.get(rule.family, (False, False))
                wants[rule.family] = (battery or rule.condition == "battery_below",
                                      signal or rule.condition == "signal_below")
        self._by_family = by_family
        self._wants = wants

    # -- the bus side (runs for every event: keep it cheap)

    def on_event(self, event: Event) -> None:
        parts = event.topic.split("/")
        if len(parts) != 4:
            if len(parts) == 5 and parts[4] == "deleted" and parts[3] == "event" and parts[0] in self._roots:
                self._forget((self._roots[parts[0]], parts[1], parts[2]))
            return
        last = parts[3]
        family = self._roots.get(parts[0])
        if family is None or last not in _LIFE_SIGNS or event.family == "alerts":
            return
        key = (family, parts[1], parts[2])
        targets = self.targets
        target = targets.get(key)
        if target is None:
            target = targets[key] = Target(*key)
        payload = event.payload
        state = payload.get("state")
        dirty = self._dirty
        dirty.add(key)
        if state == "offline":
            target.reported = "offline"
            self._check(family, target)
            return
        now = self.clock.seconds()
        target.last_seen = now
        if state == "online" or last == "up" or last == "reading":
            target.reported = "online"
        # Readings are looked for only while a rule asks for them (a busy hub's uplinks pass here).
        wants = self._wants.get(family)
        if wants is not None:
            if wants[0]:
                battery = battery_of(payload)
                if battery is not None:
                    target.battery = battery
            if wants[1]:
                signal = signal_of(payload)
                if signal is not None:
                    target.signal = signal
            self._check(family, target)
        receivers = payload.get("receivers")
        named = self._receivers.get(family)
        if named is not None and receivers.__class__ is list:
            # The stations or gateways that heard a device were heard too; the family says how they are named.
            field, kind = named
            for receiver in receivers:
                if receiver.__class__ is not dict and not isinstance(receiver, Mapping):
                    continue
                heard = receiver.get(field)
                if heard.__class__ is not str or not heard:
                    continue
                by = (family, kind, heard)
                station = targets.get(by)
                if station is None:
                    station = targets[by] = Target(*by)
                elif station.last_seen is not None and now - station.last_seen < 1.0:
                    continue  # a busy station relays many uplinks a second: once a second is enough
                station.last_seen = now
                dirty.add(by)
                if wants is not None:
                    self._check(family, station)

    def _check(self, family: str, target: Target) -> None:
        rules = self._by_family.get(family)
        if rules and self.lease.held:
            now = self.clock.seconds()
            for rule in rules:
                if rule.covers(*target.key):
                    self._evaluate(rule, target, now)

    def _forget(self, key: tuple[str, str, str]) -> None:
        if self.targets.pop(key, None) is None:
            return
        self._dirty.discard(key)
        for state_key in [k for k in self.active if k[1:] == key]:
            del self.active[state_key]
        # After this target's transitions still being stored, else one of them would store its state again;
        # kept under the target's key too, so that the next transition of any rule waits for it.
        waiting = [k for k in self._in_turn if k[1:] == key]
        self._one_after_another([*waiting, key], lambda: self.hub.store.interaction(self._delete_target, key))

    @staticmethod
    def _delete_target(cursor: Any, key: tuple[str, str, str]) -> None:
        cursor.execute("DELETE FROM alert_targets WHERE family = ? AND kind = ? AND target = ?", key)
        cursor.execute("DELETE FROM alert_states WHERE family = ? AND kind = ? AND target = ?", key)

    # -- evaluation

    def _condition(self, rule: Rule, target: Target, now: float) -> tuple[bool, float | None]:
        """(is the condition met, the value it is about) for one target."""
        key = (rule.id, *target.key)
        firing = key in self.active
        if rule.condition == "offline":
            if rule.after is None:
                return target.reported == "offline", None
            # Hours the hub itself was down are not the device's silence.
            seen = max(target.last_seen or 0.0, self.started_at)
            silence = now - seen
            # In a cluster another hub may have heard the device and not stored it yet (it does every round).
            late = self.config.check_interval if self.clustered else 0.0
            return silence > rule.after + late, round(silence, 3)
        value = target.battery if rule.condition == "battery_below" else target.signal
        if value is None or rule.threshold is None:
            return firing, value
        if firing:
            return value < rule.threshold + rule.hysteresis, value
        return value < rule.threshold, value

    def _evaluate(self, rule: Rule, target: Target, now: float) -> None:
        met, value = self._condition(rule, target, now)
        key = (rule.id, *target.key)
        was = key in self.active
        if met == was:
            return
        if met:
            self.active[key] = Active(now, value)
        else:
            del self.active[key]
        self._changes += 1
        # Decided now, under this leadership and with this payload, even if stored after an earlier transition.
        fence = Fence(self.lease.name, self.lease.token)
        body = self.payload(rule, target, met, value, now)
        self._one_after_another([key], lambda: self._transition(rule, target, met, value, now, fence, body))

    def _one_after_another(self, keys: list[tuple[Any, ...]],
                           step: Callable[[], Awaitable[Any]]) -> None:
        """Run `step` once the writes asked for before on these keys are done: on PostgreSQL's several store
        threads a later write could otherwise commit first (a resolved alert stored as firing). Other keys'
        writes go on meanwhile."""
        before = [self._in_turn[k] for k in keys if k in self._in_turn]
        before += [self._in_turn[k[1:]] for k in keys if len(k) == 4 and k[1:] in self._in_turn]  # a deletion

        async def in_turn() -> None:
            for d in before:
                await d  # its failure was logged already (_track): it holds nothing up
            await step()

        done = defer.Deferred.fromCoroutine(in_turn())
        self._track(done)
        for k in keys:
            self._in_turn[k] = done

        def idle(_: object) -> None:
            for k in keys:
                if self._in_turn.get(k) is done:
                    del self._in_turn[k]

        done.addBoth(idle)

    def _track(self, d: defer.Deferred[Any]) -> None:
        self._pending.add(d)
        d.addErrback(lambda f: self.log.failure("alert bookkeeping failed", f))
        d.addBoth(lambda _: self._pending.discard(d))

    def payload(self, rule: Rule, target: Target, firing: bool, value: float | None, now: float,
                since: float | None = None) -> dict[str, Any]:
        condition = {"offline": "offline", "battery_below": "battery_low", "signal_below": "signal_low"}[
            rule.condition]
        return {"ruleId": rule.id, "rule": rule.name, "family": target.family, "kind": target.kind,
                "id": target.id, "condition": condition, "state": "firing" if firing else "resolved",
                "value": value, "threshold": rule.after if rule.condition == "offline" else rule.threshold,
                "since": rfc3339(since if since is not None else now), "lastSeen": opt_time(target.last_seen),
                "time": rfc3339(now)}

    async def _transition(self, rule: Rule, target: Target, firing: bool, value: float | None, now: float,
                          fence: Fence, body: dict[str, Any]) -> None:
        topic = f"alerts/{target.family}/{target.kind}/{target.id}/{body['condition']}"
        event = Event("alerts", "alert", topic, body)
        if not fence.token:
            # One hub: published (durably, through the outbox) before the state is stored, so a crash between
            # the two repeats the alert once rather than losing it.
            await self.hub.bus.publish(event)
        # A cluster: stored first, fenced, so a hub that still believes it leads after another took over stores
        # and publishes nothing; the event is kept with it until announced, so a crash between the two leaves it
        # to the next holder rather than losing it.
        held = self.lease_events.hold(event) if fence.token else None
        if not await self.lease_events.write([held] if held else [], lambda claim: self.hub.store.interaction(
                self._store_transition, claim, rule, target, firing, value, now, held), fence):
            return  # the next round reads the states the newer leader stored
        if held is not None:
            await self.lease_events.announce(held)
        if firing:
            self.log.info("alert {condition} firing for {family}/{kind}/{id} (rule {rule})",
                          condition=body["condition"], family=target.family, kind=target.kind, id=target.id,
                          rule=rule.name)

    @staticmethod
    def _store_transition(cursor: Any, fence: Fence, rule: Rule, target: Target, firing: bool, value: float | None,
                          now: float, held: HeldEvent | None = None) -> None:
        fence.check(cursor)
        key = (rule.id, target.family, target.kind, target.id)
        cursor.execute("DELETE FROM alert_states WHERE rule_id = ? AND family = ? AND kind = ? AND target = ?", key)
        if firing:
            cursor.execute("INSERT INTO alert_states (rule_id, family, kind, target, since, value)"
                           " VALUES (?, ?, ?, ?, ?, ?)", (*key, now, value))
        cursor.execute(
            "INSERT INTO alert_history (time, rule_id, rule_name, family, kind, target, condition, state, value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now, rule.id, rule.name, target.family, target.kind, target.id, rule.condition,
             "firing" if firing else "resolved", value))
        if held is not None:
            held.keep(cursor)

    async def _tick(self) -> None:
        try:
            await self._check_silences()
        except Exception:
            # A database hiccup must not end the checks for good: the next round tries again.
            self.log.failure("alert check round failed")

    async def _check_silences(self) -> None:
        if self.clustered:
            await self._share()
            await self.lease_events.announce_left()  # what a holder that died stored and did not publish
        now = self.clock.seconds()
        if self.lease.held:
            for rules in self._by_family.values():
                for rule in rules:
                    # In a cluster readings heard by other hubs arrive here, through the database.
                    if not self.clustered and (rule.condition != "offline" or rule.after is None):
                        continue
                    for target in list(self.targets.values()):
                        if rule.covers(*target.key):
                            self._evaluate(rule, target, now)
        await self._flush_targets()
        if now - self._last_purge > 3600:
            self._last_purge = now
            await self.hub.store.execute("DELETE FROM alert_history WHERE time < ?", (now - self.config.retention,))

    async def _share(self) -> None:
        """Cluster: store what this hub heard, then read what every hub stored (rules, targets, states)."""
        await self._flush_targets()
        while self._pending:  # this hub's transitions are stored before the states are read back
            await defer.DeferredList(list(self._pending), consumeErrors=True)
        store = self.hub.store
        changes = self._changes
        rules = {rule.id: rule for rule in map(self._rule, await store.fetchall(
            "SELECT id, name, family, kind, target, condition, threshold, silence, hysteresis, enabled,"
            " created_at, created_by FROM alert_rules"))}
        rows = await store.fetchall(
            "SELECT family, kind, target, last_seen, reported, battery, signal FROM alert_targets")
        states = await store.fetchall("SELECT rule_id, family, kind, target, since, value FROM alert_states")
        targets: dict[tuple[str, str, str], Target] = {}
        for family, kind, target_id, last_seen, reported, battery, signal in rows:
            stored = Target(family, kind, target_id, last_seen, reported, battery, signal)
            mine = self.targets.get(stored.key)
            if mine is not None and stored.key in self._dirty:
                # Heard here since the write above: this hub's news wins, the later time stays.
                if stored.last_seen is not None and (mine.last_seen is None or mine.last_seen < stored.last_seen):
                    mine.last_seen = stored.last_seen
                stored = mine
            targets[stored.key] = stored
        for key in self._dirty:  # heard here first, not stored yet
            if key not in targets and key in self.targets:
                targets[key] = self.targets[key]
        self.rules, self.targets = rules, targets
        if changes == self._changes:  # else the next round reads them, stored by then
            self.active = {(int(r), f, k, t): Active(float(since), value) for r, f, k, t, since, value in states}
        self._index()

    async def _flush_targets(self) -> None:
        if not self._dirty:
            return
        rows = []
        # In key order: hubs writing the same targets then lock their rows in one order, not into a deadlock.
        dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            t = self.targets.get(key)
            if t is not None:
                rows.append((t.family, t.kind, t.id, t.last_seen, t.reported, t.battery, t.signal))

        def write(cursor: Any) -> None:
            # One upsert per 128 rows: a hub with many sensors writes them all every round.
            cursor.execute_rows(
                "INSERT INTO alert_targets (family, kind, target, last_seen, reported, battery, signal) VALUES {rows}"
                # Several hubs write the same device: its last-heard time only moves forward.
                " ON CONFLICT (family, kind, target) DO UPDATE SET last_seen = CASE WHEN alert_targets.last_seen"
                " IS NULL OR excluded.last_seen > alert_targets.last_seen THEN excluded.last_seen"
                " ELSE alert_targets.last_seen END,"
                " reported = excluded.reported, battery = excluded.battery, signal = excluded.signal", rows)

        try:
            await self.hub.store.interaction(write)
        except BaseException:
            self._dirty |= dirty  # written next round
            raise

    # -- management (REST and pages)

    async def add_rule(self, body: Mapping[str, Any], actor: str) -> Rule:
        body = check_rule(body, self._roots_by_name())
        now = self.clock.seconds()
        values = (body["name"], body["family"], body.get("kind") or "", body.get("target") or "",
                  body["condition"], body.get("threshold"), body.get("after"), float(body.get("hysteresis") or 0),
                  1 if body.get("enabled", True) else 0, now, actor)

        def insert(cursor: Any) -> int:
            cursor.execute("INSERT INTO alert_rules (name, family, kind, target, condition, threshold, silence,"
                           " hysteresis, enabled, created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           values)
            row = cursor.execute("SELECT MAX(id) FROM alert_rules").fetchone()
            return int(row[0])

        rule_id = await self.hub.store.interaction(insert)
        rule = Rule(rule_id, values[0], values[1], values[4], values[2], values[3], values[5], values[6],
                    values[7], bool(values[8]), now, actor)
        self.rules[rule_id] = rule
        self._index()
        self._evaluate_rule(rule)
        return rule

    async def update_rule(self, rule_id: int, changes: Mapping[str, Any]) -> Rule | None:
        rule = self.rules.get(rule_id)
        if rule is None:
            return None
        merged = {**rule.to_json(), **changes}
        check_rule(merged, self._roots_by_name())
        updated = attrs.evolve(rule, name=merged["name"], threshold=merged.get("threshold"),
                               after=merged.get("after"), hysteresis=float(merged.get("hysteresis") or 0),
                               enabled=bool(merged["enabled"]))
        await self.hub.store.execute(
            "UPDATE alert_rules SET name = ?, threshold = ?, silence = ?, hysteresis = ?, enabled = ? WHERE id = ?",
            (updated.name, updated.threshold, updated.after, updated.hysteresis, int(updated.enabled), rule_id))
        self.rules[rule_id] = updated
        if not updated.enabled:
            await self._drop_states(rule_id)
        self._index()
        self._evaluate_rule(updated)
        return updated

    async def delete_rule(self, rule_id: int) -> bool:
        if self.rules.pop(rule_id, None) is None:
            return False
        self._index()
        await self._drop_states(rule_id)
        await self.hub.store.execute("DELETE FROM alert_rules WHERE id = ?", (rule_id,))
        return True

    async def _drop_states(self, rule_id: int) -> None:
        # A rule switched off or deleted ends its alerts without a "resolved": nothing was resolved.
        for key in [k for k in self.active if k[0] == rule_id]:
            del self.active[key]
        # After the rule's transitions still being stored, else one of them would store its state again.
        for stored in [d for k, d in list(self._in_turn.items()) if len(k) == 4 and k[0] == rule_id]:
            await stored  # its failure was logged already (_track)
        await self.hub.store.execute("DELETE FROM alert_states WHERE rule_id = ?", (rule_id,))

    def _evaluate_rule(self, rule: Rule) -> None:
        if not rule.enabled or not self.lease.held:
            return
        now = self.clock.seconds()
        for target in list(self.targets.values()):
            if rule.covers(*target.key):
                self._evaluate(rule, target, now)

    def _roots_by_name(self) -> dict[str, str]:
        return {name: name for name in self._roots.values()}

    def active_alerts(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        out = []
        for (rule_id, family, kind, target_id), state in self.active.items():
            rule = self.rules.get(rule_id)
            target = self.targets.get((family, kind, target_id))
            if rule is None or target is None:
                continue
            out.append(self.payload(rule, target, True, state.value, now, since=state.since))
        return sorted(out, key=lambda a: a["since"], reverse=True)

    async def history(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        total, rows = await self.hub.store.interaction(
            page, "time, rule_id, rule_name, family, kind, target, condition, state, value", "alert_history", "1 = 1",
            (), "id DESC", limit, offset)
        items = [{"time": rfc3339(float(t)), "ruleId": int(r), "rule": n, "family": f, "kind": k, "id": i,
                  "condition": c, "state": s, "value": v} for t, r, n, f, k, i, c, s, v in rows]
        return items, total
