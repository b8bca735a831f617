"""The gate family's storage: units, names, provisioning keys, status, commands, app access, shares, files.

Plain functions over the hub's Store; every change that must be all-or-nothing is one `interaction`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from bsscihub.contract import opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.store import LIKE_ESCAPE, Cursor, Store, like_pattern, page

LEVELS = ("user", "engineer")
"""App access levels, lowest first: each includes what the lower ones may do."""


def level_at_least(level: str, minimum: str) -> bool:
    return LEVELS.index(level) >= LEVELS.index(minimum)


class Refused(CommandError):
    """A request the gate family refuses: the web layer answers `http_status` with `code` and str()."""

    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status, self.code = http_status, code


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# -- units


@attrs.frozen
class Unit:
    id: int
    hardware_id: str
    controller_id: str
    firmware_version: str
    registered_at: float
    rotated_at: float
    last_seen: float | None
    online: bool
    online_since: float | None
    last_status: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "hardware_id": self.hardware_id,
            "controller_id": self.controller_id,
            "firmware_version": self.firmware_version,
            "registered_at": opt_time(self.registered_at),
            "credentials_rotated_at": opt_time(self.rotated_at),
            "last_seen": opt_time(self.last_seen),
            "online": self.online,
            "online_since": opt_time(self.online_since),
            "last_status": self.last_status,
        }


_UNIT = (
    "id, hardware_id, controller_id, firmware_version, registered_at, rotated_at, last_seen, online,"
    " online_since, last_status"
)


def _unit(row: Sequence[Any]) -> Unit:
    return Unit(
        int(row[0]), row[1], row[2], row[3], float(row[4]), float(row[5]), _f(row[6]), bool(row[7]), _f(row[8]),
        _loads(row[9]),
    )


def unit_where(c: Cursor, column: str, value: Any) -> Unit | None:
    assert column in ("id", "hardware_id", "controller_id", "key_hash")
    row = c.execute(f"SELECT {_UNIT} FROM gate_units WHERE {column} = ?", (value,)).fetchone()
    return None if row is None else _unit(row)


async def get_unit(store: Store, column: str, value: Any) -> Unit | None:
    return await store.interaction(unit_where, column, value)


async def list_units(store: Store, *, q: str = "", limit: int = 50, offset: int = 0) -> tuple[list[Unit], int]:
    where, params = "1 = 1", []
    if q:
        # LOWER on both sides: SQLite's LIKE ignores case, PostgreSQL's does not.
        where = f"(LOWER(controller_id) LIKE ? {LIKE_ESCAPE} OR LOWER(hardware_id) LIKE ? {LIKE_ESCAPE})"
        pattern = like_pattern(q.lower())
        params = [pattern, pattern]

    def run(c: Cursor) -> tuple[list[Unit], int]:
        total, rows = page(c, _UNIT, "gate_units", where, params, "controller_id", limit, offset)
        return [_unit(r) for r in rows], total

    return await store.interaction(run)


async def all_units(store: Store) -> list[Unit]:
    rows = await store.fetchall(f"SELECT {_UNIT} FROM gate_units")
    return [_unit(r) for r in rows]


def taken(controller_id: str, holder: Unit) -> Refused:
    return Refused(409, "controller_id_taken",
                   f"controller_id {controller_id} is held by another unit (hardware_id {holder.hardware_id})")


def _rename(c: Cursor, unit: Unit, new_id: str, now: float, actor: str) -> None:
    holder = unit_where(c, "controller_id", new_id)
    if holder is not None and holder.id != unit.id:
        raise taken(new_id, holder)
    c.execute("UPDATE gate_units SET controller_id = ? WHERE id = ?", (new_id, unit.id))
    c.execute("UPDATE gate_names SET ended_at = ? WHERE unit_id = ? AND ended_at IS NULL", (now, unit.id))
    c.execute(
        "INSERT INTO gate_names (unit_id, controller_id, started_at, actor) VALUES (?, ?, ?, ?)",
        (unit.id, new_id, now, actor),
    )


@attrs.frozen
class Registration:
    unit: Unit
    created: bool
    previous_controller_id: str | None  # set when the registration renamed the unit


async def register(
    store: Store,
    *,
    hardware_id: str,
    controller_id: str,
    firmware_version: str,
    key_hash: str,
    now: float,
    actor: str,
    provisioning_key_id: int | None,
) -> Registration:
    """Create the unit, or rotate its key, update its firmware and (if asked) rename it; and spend the key."""

    def run(c: Cursor) -> Registration:
        if provisioning_key_id is not None:
            spent = c.execute(
                "UPDATE gate_provisioning_keys SET uses = uses + 1, last_used_at = ? WHERE id = ?"
                " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) AND (single_use = 0 OR uses = 0)",
                (now, provisioning_key_id, now),
            ).rowcount
            if spent != 1:
                raise Refused(401, "provisioning_key_used", "the provisioning key was used or revoked meanwhile")
        existing = unit_where(c, "hardware_id", hardware_id)
        holder = unit_where(c, "controller_id", controller_id)
        if holder is not None and holder.hardware_id != hardware_id:
            raise taken(controller_id, holder)
        previous = None
        if existing is None:
            row = c.execute(
                "INSERT INTO gate_units (hardware_id, controller_id, firmware_version, key_hash, registered_at,"
                " rotated_at, provisioning_key_id) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (hardware_id, controller_id, firmware_version, key_hash, now, now, provisioning_key_id),
            ).fetchone()
            assert row is not None
            c.execute(
                "INSERT INTO gate_names (unit_id, controller_id, started_at, actor) VALUES (?, ?, ?, ?)",
                (int(row[0]), controller_id, now, actor),
            )
            unit = unit_where(c, "id", int(row[0]))
        else:
            c.execute(
                "UPDATE gate_units SET firmware_version = ?, key_hash = ?, rotated_at = ? WHERE id = ?",
                (firmware_version, key_hash, now, existing.id),
            )
            if existing.controller_id != controller_id:
                _rename(c, existing, controller_id, now, actor)
                previous = existing.controller_id
            unit = unit_where(c, "id", existing.id)
        assert unit is not None
        return Registration(unit, existing is None, previous)

    return await store.interaction(run)


async def rename(store: Store, unit: Unit, new_id: str, now: float, actor: str) -> Unit:
    def run(c: Cursor) -> Unit:
        current = unit_where(c, "id", unit.id)
        if current is None:
            raise Refused(404, "not_found", f"gate unit {unit.controller_id} not found")
        _rename(c, current, new_id, now, actor)
        renamed = unit_where(c, "id", unit.id)
        assert renamed is not None
        return renamed

    return await store.interaction(run)


async def delete_unit(store: Store, unit_id: int) -> bool:
    return await store.execute("DELETE FROM gate_units WHERE id = ?", (unit_id,)) > 0


@attrs.frozen
class Name:
    controller_id: str
    started_at: float
    ended_at: float | None
    actor: str

    def to_json(self) -> dict[str, Any]:
        return {"controller_id": self.controller_id, "started_at": opt_time(self.started_at),
                "ended_at": opt_time(self.ended_at), "actor": self.actor}


async def names(store: Store, unit_id: int) -> list[Name]:
    rows = await store.fetchall(
        "SELECT controller_id, started_at, ended_at, actor FROM gate_names WHERE unit_id = ? ORDER BY started_at, id",
        (unit_id,),
    )
    return [Name(r[0], float(r[1]), _f(r[2]), r[3]) for r in rows]


# -- status


async def record_status(store: Store, unit_id: int, now: float, payload: Any, keep: int) -> bool:
    """Store a status as the unit's last one and in its history (trimmed to `keep`); True if it came online."""
    came_online, _ = await record_status_change(store, unit_id, now, payload, keep)
    return came_online


async def record_status_change(store: Store, unit_id: int, now: float, payload: Any, keep: int
                               ) -> tuple[bool, bool]:
    """`record_status`, saying whether the unit came online and whether it went offline (as the database
    knew it: in a cluster another hub may have heard the unit before)."""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    online = not (isinstance(payload, dict) and payload.get("online") is False)

    def run(c: Cursor) -> tuple[bool, bool]:
        row = c.execute("SELECT online, online_since FROM gate_units WHERE id = ?", (unit_id,)).fetchone()
        if row is None:
            return False, False
        was_online = bool(row[0])
        since = (row[1] if was_online else now) if online else None
        c.execute(
            "UPDATE gate_units SET last_seen = ?, last_status = ?, online = ?, online_since = ? WHERE id = ?",
            (now, text, int(online), since, unit_id),
        )
        c.execute("INSERT INTO gate_status (unit_id, time, payload) VALUES (?, ?, ?)", (unit_id, now, text))
        c.execute(
            "DELETE FROM gate_status WHERE unit_id = ? AND id <= (SELECT id FROM gate_status WHERE unit_id = ?"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (unit_id, unit_id, keep),
        )
        return online and not was_online, was_online and not online

    return await store.interaction(run)


async def set_offline(store: Store, unit_id: int, heard_before: float | None = None) -> bool:
    """Mark the unit offline; with `heard_before`, only if no status came since (another hub's, in a cluster)."""
    if heard_before is None:
        return await store.execute(
            "UPDATE gate_units SET online = 0, online_since = NULL WHERE id = ? AND online = 1", (unit_id,)
        ) > 0
    return await store.execute(
        "UPDATE gate_units SET online = 0, online_since = NULL WHERE id = ? AND online = 1"
        " AND (last_seen IS NULL OR last_seen <= ?)", (unit_id, heard_before)
    ) > 0


async def status_history(store: Store, unit_id: int, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    def run(c: Cursor) -> tuple[list[dict[str, Any]], int]:
        total, rows = page(c, "time, payload", "gate_status", "unit_id = ?", (unit_id,), "id DESC", limit, offset)
        return [{"time": rfc3339(float(r[0])), "status": json.loads(r[1])} for r in rows], total

    return await store.interaction(run)


# -- provisioning keys


@attrs.frozen
class ProvisioningKey:
    id: int
    name: str
    prefix: str
    single_use: bool
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    uses: int
    last_used_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.single_use and self.uses > 0:
            return "used"
        return "active"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "prefix": self.prefix, "single_use": self.single_use,
            "created_at": opt_time(self.created_at), "created_by": self.created_by,
            "expires_at": opt_time(self.expires_at),
            "revoked_at": opt_time(self.revoked_at), "uses": self.uses, "last_used_at": opt_time(self.last_used_at),
            "state": self.state(now),
        }


_KEY = "id, name, prefix, single_use, created_at, created_by, expires_at, revoked_at, uses, last_used_at"


def _key(row: Sequence[Any]) -> ProvisioningKey:
    return ProvisioningKey(int(row[0]), row[1], row[2], bool(row[3]), float(row[4]), row[5], _f(row[6]), _f(row[7]),
                           int(row[8]), _f(row[9]))


async def create_key(store: Store, *, name: str, prefix: str, secret_hash: str, single_use: bool, now: float,
                     actor: str, expires_at: float | None) -> ProvisioningKey:
    row = await store.fetchone(
        "INSERT INTO gate_provisioning_keys (name, prefix, secret_hash, single_use, created_at, created_by, expires_at)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {_KEY}",
        (name, prefix, secret_hash, int(single_use), now, actor, expires_at),
    )
    assert row is not None
    return _key(row)


async def key_by_hash(store: Store, secret_hash: str) -> ProvisioningKey | None:
    row = await store.fetchone(f"SELECT {_KEY} FROM gate_provisioning_keys WHERE secret_hash = ?", (secret_hash,))
    return None if row is None else _key(row)


async def get_key(store: Store, key_id: int) -> ProvisioningKey | None:
    row = await store.fetchone(f"SELECT {_KEY} FROM gate_provisioning_keys WHERE id = ?", (key_id,))
    return None if row is None else _key(row)


async def list_keys(store: Store) -> list[ProvisioningKey]:
    rows = await store.fetchall(f"SELECT {_KEY} FROM gate_provisioning_keys ORDER BY created_at DESC, id DESC")
    return [_key(r) for r in rows]


async def revoke_key(store: Store, key_id: int, now: float) -> bool:
    return await store.execute(
        "UPDATE gate_provisioning_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
    ) > 0


# -- app access (tokens captured over BLE, or granted by a sharing token)


@attrs.frozen
class Access:
    id: int
    unit_id: int
    fingerprint: str
    level: str
    via: str
    share_id: int | None
    created_at: float
    revoked_at: float | None
    last_used_at: float | None
    controller_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "controller_id": self.controller_id, "fingerprint": self.fingerprint,
            "access_level": self.level, "via": self.via, "share_id": self.share_id,
            "created_at": opt_time(self.created_at),
            "revoked_at": opt_time(self.revoked_at), "last_used_at": opt_time(self.last_used_at),
            "state": "revoked" if self.revoked_at is not None else "active",
        }


_ACCESS = ("a.id, a.unit_id, a.fingerprint, a.level, a.via, a.share_id, a.created_at, a.revoked_at, a.last_used_at,"
           " u.controller_id")


def _access(row: Sequence[Any]) -> Access:
    return Access(int(row[0]), int(row[1]), row[2], row[3], row[4], None if row[5] is None else int(row[5]),
                  float(row[6]), _f(row[7]), _f(row[8]), row[9])


def grant(c: Cursor, unit_id: int, token_hash: str, fingerprint: str, level: str, via: str, now: float,
          share_id: int | None = None) -> Access:
    """Map an app token to a unit (again, after a revocation: the row is reused with the new level)."""
    found = c.execute("SELECT id FROM gate_app_access WHERE unit_id = ? AND token_hash = ?",
                      (unit_id, token_hash)).fetchone()
    if found is None:
        c.execute(
            "INSERT INTO gate_app_access (unit_id, token_hash, fingerprint, level, via, share_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (unit_id, token_hash, fingerprint, level, via, share_id, now),
        )
    else:
        c.execute(
            "UPDATE gate_app_access SET level = ?, via = ?, share_id = ?, created_at = ?, revoked_at = NULL"
            " WHERE id = ?",
            (level, via, share_id, now, int(found[0])),
        )
    row = c.execute(
        f"SELECT {_ACCESS} FROM gate_app_access a JOIN gate_units u ON u.id = a.unit_id"
        " WHERE a.unit_id = ? AND a.token_hash = ?",
        (unit_id, token_hash),
    ).fetchone()
    assert row is not None
    return _access(row)


async def grant_access(store: Store, unit_id: int, token_hash: str, fingerprint: str, level: str, via: str,
                       now: float) -> Access:
    return await store.interaction(grant, unit_id, token_hash, fingerprint, level, via, now)


async def access_for(store: Store, unit_id: int, token_hash: str) -> Access | None:
    row = await store.fetchone(
        f"SELECT {_ACCESS} FROM gate_app_access a JOIN gate_units u ON u.id = a.unit_id"
        " WHERE a.unit_id = ? AND a.token_hash = ? AND a.revoked_at IS NULL",
        (unit_id, token_hash),
    )
    return None if row is None else _access(row)


async def accesses_of_token(store: Store, token_hash: str) -> list[tuple[Access, Unit]]:
    """Every unit an app token may reach, with its level (the app's discovery)."""
    columns = ", ".join(f"u.{c.strip()}" for c in _UNIT.split(","))
    rows = await store.fetchall(
        f"SELECT {_ACCESS}, {columns} FROM gate_app_access a JOIN gate_units u ON u.id = a.unit_id"
        " WHERE a.token_hash = ? AND a.revoked_at IS NULL ORDER BY u.controller_id",
        (token_hash,),
    )
    return [(_access(r[:10]), _unit(r[10:])) for r in rows]


async def controllers_of_fingerprint(store: Store, fingerprint: str) -> list[str]:
    """The units an app (by its token's fingerprint) may reach now: its broker account's topics."""
    rows = await store.fetchall(
        "SELECT u.controller_id FROM gate_app_access a JOIN gate_units u ON u.id = a.unit_id"
        " WHERE a.fingerprint = ? AND a.revoked_at IS NULL ORDER BY u.controller_id", (fingerprint,))
    return [r[0] for r in rows]


async def fingerprints_of_unit(store: Store, unit_id: int) -> list[str]:
    rows = await store.fetchall(
        "SELECT DISTINCT fingerprint FROM gate_app_access WHERE unit_id = ? AND revoked_at IS NULL", (unit_id,))
    return [r[0] for r in rows]


async def touch_access(store: Store, access_id: int, now: float) -> None:
    await store.execute("UPDATE gate_app_access SET last_used_at = ? WHERE id = ?", (now, access_id))


async def list_access(store: Store, unit_id: int) -> list[Access]:
    rows = await store.fetchall(
        f"SELECT {_ACCESS} FROM gate_app_access a JOIN gate_units u ON u.id = a.unit_id WHERE a.unit_id = ?"
        " ORDER BY a.created_at DESC, a.id DESC",
        (unit_id,),
    )
    return [_access(r) for r in rows]


async def revoke_access(store: Store, unit_id: int, *, now: float, access_id: int | None = None,
                        token_hash: str | None = None) -> bool:
    column, value = ("id", access_id) if access_id is not None else ("token_hash", token_hash)
    return await store.execute(
        f"UPDATE gate_app_access SET revoked_at = ? WHERE unit_id = ? AND {column} = ? AND revoked_at IS NULL",
        (now, unit_id, value),
    ) > 0


# -- sharing tokens


@attrs.frozen
class Share:
    id: int
    unit_id: int
    prefix: str
    level: str
    created_by: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    used_by: str | None
    used_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.used_at is not None:
            return "used"
        if now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "prefix": self.prefix, "access_level": self.level, "created_by": self.created_by,
            "created_at": opt_time(self.created_at), "expires_at": opt_time(self.expires_at),
            "revoked_at": opt_time(self.revoked_at), "used_by": self.used_by, "used_at": opt_time(self.used_at),
            "state": self.state(now),
        }


_SHARE = "id, unit_id, prefix, level, created_by, created_at, expires_at, revoked_at, used_by, used_at"


def _share(row: Sequence[Any]) -> Share:
    return Share(int(row[0]), int(row[1]), row[2], row[3], row[4], float(row[5]), float(row[6]), _f(row[7]), row[8],
                 _f(row[9]))


async def create_share(store: Store, *, unit_id: int, prefix: str, secret_hash: str, level: str, actor: str,
                       now: float, expires_at: float) -> Share:
    row = await store.fetchone(
        "INSERT INTO gate_shares (unit_id, prefix, secret_hash, level, created_by, created_at, expires_at)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {_SHARE}",
        (unit_id, prefix, secret_hash, level, actor, now, expires_at),
    )
    assert row is not None
    return _share(row)


async def list_shares(store: Store, unit_id: int) -> list[Share]:
    rows = await store.fetchall(
        f"SELECT {_SHARE} FROM gate_shares WHERE unit_id = ? ORDER BY created_at DESC, id DESC", (unit_id,)
    )
    return [_share(r) for r in rows]


async def get_share(store: Store, share_id: int) -> Share | None:
    row = await store.fetchone(f"SELECT {_SHARE} FROM gate_shares WHERE id = ?", (share_id,))
    return None if row is None else _share(row)


async def revoke_share(store: Store, share_id: int, now: float) -> bool:
    return await store.execute(
        "UPDATE gate_shares SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL AND used_at IS NULL",
        (now, share_id),
    ) > 0


async def redeem_share(store: Store, *, secret_hash: str, token_hash: str, fingerprint: str, used_by: str,
                       now: float) -> tuple[Share, Access]:
    """Spend a sharing token once and grant its level to the redeeming app, in one transaction."""

    def run(c: Cursor) -> tuple[Share, Access]:
        row = c.execute(f"SELECT {_SHARE} FROM gate_shares WHERE secret_hash = ?", (secret_hash,)).fetchone()
        if row is None:
            raise Refused(404, "share_unknown", "unknown sharing token")
        share = _share(row)
        state = share.state(now)
        if state == "revoked":
            raise Refused(410, "share_revoked", "this sharing token was revoked")
        if state == "used":
            raise Refused(409, "share_used", "this sharing token was already redeemed")
        if state == "expired":
            raise Refused(410, "share_expired", "this sharing token has expired")
        # The condition repeats the checks so that two redemptions racing cannot both win.
        spent = c.execute(
            "UPDATE gate_shares SET used_by = ?, used_at = ? WHERE id = ? AND used_at IS NULL AND revoked_at IS NULL",
            (used_by, now, share.id),
        ).rowcount
        if spent != 1:
            raise Refused(409, "share_used", "this sharing token was already redeemed")
        existing = c.execute(
            "SELECT level FROM gate_app_access WHERE unit_id = ? AND token_hash = ? AND revoked_at IS NULL",
            (share.unit_id, token_hash),
        ).fetchone()
        level = share.level
        if existing is not None and level_at_least(existing[0], level):
            level = existing[0]  # a share never lowers access the app already has
        access = grant(c, share.unit_id, token_hash, fingerprint, level, "share", now, share.id)
        return attrs.evolve(share, used_by=used_by, used_at=now), access

    return await store.interaction(run)


# -- commands


@attrs.frozen
class Command:
    id: str
    unit_id: int
    command: str
    args: Any
    actor: str
    via: str
    created_at: float
    deadline: float
    state: str  # pending, succeeded, failed, timeout
    result: Any
    error: str | None
    completed_at: float | None
    relayed_at: float | None = None  # None: still waiting in the hub for the unit (or the broker)

    @property
    def done(self) -> bool:
        return self.state != "pending"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "command": self.command, "args": self.args, "actor": self.actor, "via": self.via,
            "created_at": opt_time(self.created_at), "deadline": opt_time(self.deadline), "state": self.state,
            "result": self.result,
            "error": self.error, "completed_at": opt_time(self.completed_at), "relayed_at": opt_time(self.relayed_at),
        }


_COMMAND = ("id, unit_id, command, args, actor, via, created_at, deadline, state, result, error, completed_at,"
            " relayed_at")


def _command(row: Sequence[Any]) -> Command:
    return Command(row[0], int(row[1]), row[2], json.loads(row[3]), row[4], row[5], float(row[6]), float(row[7]),
                   row[8], _loads(row[9]), row[10], _f(row[11]), _f(row[12]))


async def insert_command(store: Store, command: Command) -> None:
    await store.execute(
        f"INSERT INTO gate_commands ({_COMMAND}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (command.id, command.unit_id, command.command, json.dumps(command.args), command.actor, command.via,
         command.created_at, command.deadline, command.state, None, None, None, command.relayed_at),
    )


async def mark_relayed(store: Store, command_id: str, now: float) -> bool:
    """True if this call marked it (in a cluster, the hub that does relays it; the others do not)."""
    return await store.execute("UPDATE gate_commands SET relayed_at = ? WHERE id = ? AND relayed_at IS NULL",
                               (now, command_id)) > 0


async def complete_command(store: Store, command_id: str, unit_id: int, state: str, result: Any, error: str | None,
                           now: float) -> Command | None:
    """Settle a pending command of this unit; None if it is unknown, another unit's, or settled already."""

    def run(c: Cursor) -> Command | None:
        done = c.execute(
            "UPDATE gate_commands SET state = ?, result = ?, error = ?, completed_at = ?"
            " WHERE id = ? AND unit_id = ? AND state = 'pending'",
            (state, None if result is None else json.dumps(result), error, now, command_id, unit_id),
        ).rowcount
        if done != 1:
            return None
        row = c.execute(f"SELECT {_COMMAND} FROM gate_commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else _command(row)

    return await store.interaction(run)


async def get_command(store: Store, command_id: str) -> Command | None:
    row = await store.fetchone(f"SELECT {_COMMAND} FROM gate_commands WHERE id = ?", (command_id,))
    return None if row is None else _command(row)


async def pending_commands(store: Store) -> list[Command]:
    rows = await store.fetchall(f"SELECT {_COMMAND} FROM gate_commands WHERE state = 'pending' ORDER BY created_at")
    return [_command(r) for r in rows]


async def list_commands(store: Store, unit_id: int, limit: int, offset: int) -> tuple[list[Command], int]:
    def run(c: Cursor) -> tuple[list[Command], int]:
        total, rows = page(c, _COMMAND, "gate_commands", "unit_id = ?", (unit_id,), "created_at DESC, id", limit,
                           offset)
        return [_command(r) for r in rows], total

    return await store.interaction(run)


# -- files


@attrs.frozen
class FileRecord:
    id: str
    unit_id: int
    direction: str  # up: from the unit; down: to the unit
    kind: str
    name: str
    max_size: int
    size: int | None
    sha256: str | None
    created_at: float
    created_by: str
    stored_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "direction": self.direction, "kind": self.kind, "name": self.name,
            "max_size": self.max_size, "size": self.size, "sha256": self.sha256,
            "created_at": opt_time(self.created_at), "created_by": self.created_by,
            "stored_at": opt_time(self.stored_at),
            "state": "stored" if self.stored_at is not None else "awaiting upload",
        }


_FILE = "id, unit_id, direction, kind, name, max_size, size, sha256, created_at, created_by, stored_at"


def _file(row: Sequence[Any]) -> FileRecord:
    return FileRecord(row[0], int(row[1]), row[2], row[3], row[4], int(row[5]),
                      None if row[6] is None else int(row[6]), row[7], float(row[8]), row[9], _f(row[10]))


async def create_file(store: Store, record: FileRecord) -> None:
    await store.interaction(insert_file, record)


def insert_file(cursor: Cursor, record: FileRecord) -> None:
    """Within the caller's transaction (with the file's parts, when it comes with them)."""
    cursor.execute(
        f"INSERT INTO gate_files ({_FILE}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.id, record.unit_id, record.direction, record.kind, record.name, record.max_size, record.size,
         record.sha256, record.created_at, record.created_by, record.stored_at),
    )


async def get_file(store: Store, file_id: str) -> FileRecord | None:
    row = await store.fetchone(f"SELECT {_FILE} FROM gate_files WHERE id = ?", (file_id,))
    return None if row is None else _file(row)


def mark_stored(cursor: Cursor, file_id: str, size: int, sha256: str, now: float) -> bool:
    """Within the caller's transaction (with the file's parts): mark an upload done; False if it was done
    already (a URL uploads once)."""
    return cursor.execute(
        "UPDATE gate_files SET size = ?, sha256 = ?, stored_at = ? WHERE id = ? AND stored_at IS NULL",
        (size, sha256, now, file_id),
    ).rowcount > 0


async def list_files(store: Store, unit_id: int) -> list[FileRecord]:
    rows = await store.fetchall(
        f"SELECT {_FILE} FROM gate_files WHERE unit_id = ? ORDER BY created_at DESC, id", (unit_id,)
    )
    return [_file(r) for r in rows]
