"""The meter registry: wireless M-Bus meters heard through Variable MAC, their keys, readings and raw frames.
Meter keys are stored encrypted (AES-256-GCM) under keys_dir/meter-keys.secret, the same file on every hub."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import attrs

from bsscihub.errors import CommandError
from bsscihub.keybox import KeyBox
from bsscihub.protocols.bssci.registry import rfc3339
from bsscihub.store import LIKE_ESCAPE, Migration, Store, like_pattern, page

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = [
    "FRAME_COLUMNS", "MIGRATIONS", "KeyBox", "Meter", "MeterRegistry", "meter_key", "parse_aes_key", "registry_for",
]

MIGRATIONS = [
    Migration(
        "mioty_meters",
        1,
        """
        CREATE TABLE mioty_meters (
            id TEXT PRIMARY KEY,
            manufacturer TEXT NOT NULL,
            meter_id TEXT NOT NULL,
            version INTEGER,
            device_type INTEGER,
            name TEXT,
            key_box {blob},
            first_seen {real},
            last_seen {real},
            best_bs TEXT,
            best_rssi {real},
            best_snr {real},
            last_reading TEXT,
            created_at {real} NOT NULL
        );
        CREATE TABLE mioty_vm_frames (
            id {pk},
            bs_eui TEXT NOT NULL,
            received {real} NOT NULL,
            mac_type {bigint} NOT NULL,
            data {blob} NOT NULL,
            sys_time {bigint} NOT NULL,
            trx_time {bigint},
            freq_off {real},
            snr {real} NOT NULL,
            rssi {real} NOT NULL,
            eq_snr {real},
            subpackets TEXT,
            carr_space {bigint},
            patt_grp {bigint},
            patt_num {bigint},
            crc {blob},
            published INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX mioty_vm_frames_received ON mioty_vm_frames (received);
        CREATE INDEX mioty_vm_frames_unpublished ON mioty_vm_frames (id) WHERE published = 0;
        CREATE TABLE mioty_meter_readings (
            id {pk},
            meter TEXT NOT NULL,
            received {real} NOT NULL,
            payload TEXT NOT NULL
        );
        CREATE INDEX mioty_meter_readings_meter ON mioty_meter_readings (meter, received)
        """,
    ),
    Migration(
        "mioty_meters",
        2,
        # Frames queued for meters (vm.dlData), kept across a restart.
        """
        CREATE TABLE mioty_meter_downlinks (
            id {pk},
            meter TEXT NOT NULL,
            data {blob} NOT NULL,
            queued {real} NOT NULL,
            actor TEXT NOT NULL,
            status TEXT NOT NULL,
            bs_eui TEXT,
            error TEXT,
            updated {real} NOT NULL
        );
        CREATE INDEX mioty_meter_downlinks_meter ON mioty_meter_downlinks (meter, id)
        """,
    ),
]

FRAME_COLUMNS = (
    "bs_eui, received, mac_type, data, sys_time, trx_time, freq_off, snr, rssi, eq_snr, subpackets, carr_space,"
    " patt_grp, patt_num, crc"
)
_METER_ID = re.compile(r"([a-z]{3})-([0-9a-f]{8})")
_METER_COLUMNS = ("id, manufacturer, meter_id, version, device_type, name, key_box, first_seen, last_seen, best_bs,"
                  " best_rssi, best_snr, last_reading, created_at")


def meter_key(value: Any) -> str:
    """A meter's id in the hub, "dme-81795246" (manufacturer code, dash, 8-digit ID), from any case."""
    text = value.lower() if isinstance(value, str) else ""
    if _METER_ID.fullmatch(text) is None:
        raise CommandError(f"bad meter id {value!r}: expected the manufacturer code, a dash and the 8-digit meter ID,"
                           " e.g. dme-81795246")
    return text


def parse_aes_key(value: Any) -> bytes:
    """A meter's AES-128 key from 32 hex digits; the error never repeats the value."""
    if isinstance(value, str) and len(value) == 32 and value.isascii():
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise CommandError("key must be 32 hexadecimal digits (the meter's AES-128 key)")


@attrs.define
class Meter:
    """A meter as the registry knows it; `key_box` is the sealed key (never shown)."""

    id: str
    manufacturer: str
    meter_id: str
    created_at: float
    version: int | None = None
    device_type: int | None = None
    name: str | None = None
    key_box: bytes | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    best_bs: str | None = None
    best_rssi: float | None = None
    best_snr: float | None = None
    last_reading: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Meter:
        (id, manufacturer, meter_id, version, device_type, name, key_box, first_seen, last_seen, best_bs, best_rssi,
         best_snr, last_reading, created_at) = row  # fmt: skip
        return cls(id=id, manufacturer=manufacturer, meter_id=meter_id, version=version, device_type=device_type,
                   name=name, key_box=bytes(key_box) if key_box is not None else None, first_seen=first_seen,
                   last_seen=last_seen, best_bs=best_bs, best_rssi=best_rssi, best_snr=best_snr,
                   last_reading=json.loads(last_reading) if last_reading else None, created_at=created_at)

    def row(self) -> tuple[Any, ...]:
        return (self.id, self.manufacturer, self.meter_id, self.version, self.device_type, self.name, self.key_box,
                self.first_seen, self.last_seen, self.best_bs, self.best_rssi, self.best_snr,
                json.dumps(self.last_reading) if self.last_reading is not None else None, self.created_at)

    def to_json(self) -> dict[str, Any]:
        from bsscihub.protocols.wmbus import DEVICE_TYPES

        reading = self.last_reading or {}
        return {
            "meter": self.id, "manufacturer": self.manufacturer, "meterId": self.meter_id, "version": self.version,
            "deviceType": self.device_type,
            "medium": DEVICE_TYPES.get(self.device_type) if self.device_type is not None else None,
            "name": self.name, "hasKey": self.key_box is not None,
            "firstSeen": rfc3339(self.first_seen) if self.first_seen is not None else None,
            "lastSeen": rfc3339(self.last_seen) if self.last_seen is not None else None,
            "bestBs": self.best_bs, "bestRssi": self.best_rssi, "bestSnr": self.best_snr,
            "createdAt": rfc3339(self.created_at), "lastReading": reading or None,
        }  # fmt: skip


class MeterRegistry:
    """Meters, raw Variable-MAC frames and readings in the database. Every method reads or writes the
    database (meters are few and slow: no cache, so a key set from the command line applies at once)."""

    def __init__(self, store: Store, box: KeyBox) -> None:
        self.store = store
        self.box = box

    # -- frames (every vm.ulData copy, stored before it is acknowledged)

    def add_frame(self, row: tuple[Any, ...]) -> Any:
        """Insert one copy; fires with its row id once committed."""
        sql = f"INSERT INTO mioty_vm_frames ({FRAME_COLUMNS}) VALUES ({', '.join('?' * row.__len__())}) RETURNING id"
        return self.store.interaction(lambda c: int(c.execute(sql, row).fetchone()[0]))

    def mark_published(self, ids: list[int]) -> Any:
        return self.store.executemany("UPDATE mioty_vm_frames SET published = 1 WHERE id = ?", [(i,) for i in ids])

    def recently_published(self, since: float) -> Any:
        """(mac_type, data, sys_time) of the frames published and received after `since`."""
        return self.store.fetchall("SELECT mac_type, data, sys_time FROM mioty_vm_frames WHERE published = 1"
                                   " AND received > ?", (since,))

    def unpublished(self) -> Any:
        return self.store.fetchall(f"SELECT id, {FRAME_COLUMNS} FROM mioty_vm_frames WHERE published = 0 ORDER BY id")

    async def prune(self, before: float) -> None:
        """Forget published frames and readings received before `before` (never an unpublished frame)."""
        await self.store.execute("DELETE FROM mioty_vm_frames WHERE received < ? AND published = 1", (before,))
        await self.store.execute("DELETE FROM mioty_meter_readings WHERE received < ?", (before,))

    # -- meters

    async def get(self, meter: str) -> Meter | None:
        row = await self.store.fetchone(f"SELECT {_METER_COLUMNS} FROM mioty_meters WHERE id = ?", (meter,))
        return Meter.from_row(row) if row is not None else None

    async def find(self, needle: str = "", limit: int = 100, offset: int = 0) -> tuple[list[Meter], int]:
        pattern = like_pattern(needle.lower())
        where = f"id LIKE ? {LIKE_ESCAPE} OR lower(coalesce(name, '')) LIKE ? {LIKE_ESCAPE}"
        total, rows = await self.store.interaction(
            page, _METER_COLUMNS, "mioty_meters", where, (pattern, pattern), "id", limit, offset)
        return [Meter.from_row(r) for r in rows], total

    async def save(self, meter: Meter) -> None:
        columns = _METER_COLUMNS.split(", ")
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
        await self.store.execute(
            f"INSERT INTO mioty_meters ({_METER_COLUMNS}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (id) DO UPDATE SET {updates}", meter.row())

    async def delete(self, meter: str) -> bool:
        return bool(await self.store.execute("DELETE FROM mioty_meters WHERE id = ?", (meter,)))

    def key_of(self, meter: Meter) -> bytes | None:
        return self.box.open(meter.id, meter.key_box) if meter.key_box is not None else None

    async def set_key(self, meter_id: str, key: bytes | None, now: float, name: str | None = None) -> Meter:
        """Set (or, with None, clear) a meter's key; registers the meter when it was never heard."""
        meter = await self.get(meter_id)
        if meter is None:
            manufacturer, number = meter_id.split("-")
            meter = Meter(id=meter_id, manufacturer=manufacturer.upper(), meter_id=number, created_at=now)
        meter.key_box = self.box.seal(meter_id, key) if key is not None else None
        if name is not None:
            meter.name = name or None
        await self.save(meter)
        return meter

    # -- downlinks: queued -> sending -> sent | refused; "sending" at a start becomes "unconfirmed"

    def add_downlink(self, meter: str, data: bytes, queued: float, actor: str) -> Any:
        """Fires with the new downlink's id once committed."""
        sql = ("INSERT INTO mioty_meter_downlinks (meter, data, queued, actor, status, updated)"
               " VALUES (?, ?, ?, ?, 'queued', ?) RETURNING id")
        return self.store.interaction(lambda c: int(c.execute(sql, (meter, data, queued, actor, queued)).fetchone()[0]))

    def update_downlink(self, dl_id: int, status: str, now: float, bs_eui: str | None = None,
                        error: str | None = None) -> Any:
        return self.store.execute(
            "UPDATE mioty_meter_downlinks SET status = ?, bs_eui = coalesce(?, bs_eui), error = ?, updated = ?"
            " WHERE id = ?", (status, bs_eui, error, now, dl_id))

    async def queued_downlinks(self, now: float) -> list[tuple[int, str, bytes, float, str]]:
        """(id, meter, data, queued, actor) of the downlinks still queued, oldest first; those that were being
        sent when the hub stopped are marked unconfirmed (never sent twice)."""
        await self.store.execute("UPDATE mioty_meter_downlinks SET status = 'unconfirmed', updated = ?"
                                 " WHERE status = 'sending'", (now,))
        rows = await self.store.fetchall("SELECT id, meter, data, queued, actor FROM mioty_meter_downlinks"
                                         " WHERE status = 'queued' ORDER BY id")
        return [(int(i), meter, bytes(data), float(queued), actor) for i, meter, data, queued, actor in rows]

    async def downlinks(self, meter: str, limit: int = 100) -> list[dict[str, Any]]:
        """The meter's downlinks, newest first."""
        rows = await self.store.fetchall(
            "SELECT id, data, queued, actor, status, bs_eui, error, updated FROM mioty_meter_downlinks"
            " WHERE meter = ? ORDER BY id DESC LIMIT ?", (meter, limit))
        return [{"dlId": int(i), "data": bytes(data).hex(), "queued": rfc3339(queued), "actor": actor,
                 "status": status, "bsEui": bs, "error": error, "updated": rfc3339(updated)}
                for i, data, queued, actor, status, bs, error, updated in rows]

    # -- readings

    async def add_reading(self, meter: str, received: float, payload: dict[str, Any]) -> None:
        await self.store.execute("INSERT INTO mioty_meter_readings (meter, received, payload) VALUES (?, ?, ?)",
                                 (meter, received, json.dumps(payload)))

    async def readings(self, meter: str, limit: int = 100, before: float | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        rows = await self.store.fetchall(
            "SELECT payload FROM mioty_meter_readings WHERE meter = ? AND received < ? ORDER BY received DESC, id DESC"
            " LIMIT ?", (meter, before if before is not None else 1e18, limit))
        return [json.loads(r[0]) for r in rows]


KEY_FILE = "meter-keys.secret"
"""In keys_dir: seals the meter keys in the database."""


def registry_for(hub: Hub) -> MeterRegistry:
    """The hub's meter registry, its keys sealed under keys_dir (the service and the command line share it)."""
    return MeterRegistry(hub.store, KeyBox.of_hub(hub.config, KEY_FILE))
