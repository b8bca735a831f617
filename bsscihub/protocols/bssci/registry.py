"""The mioty registry: base stations, sensors, uplink copies and downlinks in storage, cached in memory.
The hot path only touches memory: sensor state is written back in batches, uplink copies by group commit."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bsscihub.cluster import Fence
from bsscihub.contract import opt_time, rfc3339
from bsscihub.registry_sync import KEEP as NOTES_KEPT
from bsscihub.registry_sync import note_change, noted, prune_notes
from bsscihub.store import BatchWriter, Cursor, Store

__all__ = [
    "BaseStation",
    "Registry",
    "Sensor",
    "UPLINK_COLUMNS",
    "attach_change",
    "rfc3339",
]

# Oldest first; the row order of add_uplink and of every uplink query.
UPLINK_COLUMNS = (
    "ep_eui, packet_cnt, bs_eui, received, rx_time, rx_duration, snr, rssi, eq_snr,"
    " profile, mode, subpackets, data, format, dl_open, response_exp, dl_ack"
)
_INSERT_UPLINK = f"INSERT INTO mioty_uplinks ({UPLINK_COLUMNS}) VALUES {{rows}}"
# Marks an uplink's copies published, per dialect. SQLite probes the partial index per key.
# PostgreSQL, given 100 keys or more, would read the whole partial index instead (a hash join),
# and with it every entry of a copy marked since the last vacuum (these updates are never HOT):
# the LATERAL subquery, kept apart by OFFSET 0, makes it one index probe per key, and the copies
# found are then updated by their ctid (a copy another hub marked meanwhile has a new ctid and is
# skipped). Measured in bench/README.md, "Marking uplinks published".
_MARK_PUBLISHED = {
    "sqlite": (
        "UPDATE mioty_uplinks SET published = 1 FROM (VALUES {rows}) AS marked"
        " WHERE mioty_uplinks.published = 0 AND mioty_uplinks.ep_eui = marked.column1"
        " AND mioty_uplinks.packet_cnt = marked.column2"
    ),
    "postgresql": (
        "UPDATE mioty_uplinks SET published = 1 WHERE ctid = ANY(ARRAY("
        "SELECT copy.ctid FROM (VALUES {rows}) AS marked CROSS JOIN LATERAL ("
        "SELECT ctid FROM mioty_uplinks WHERE published = 0 AND ep_eui = marked.column1"
        " AND packet_cnt = marked.column2 OFFSET 0) AS copy))"
    ),
}
_SENSOR_COLUMNS = (
    "eui, nw_key, short_addr, bidi, dual_chan, repetition, wide_carr_off, long_blk_dist, ep_class,"
    " sync_burst, attached, attached_at, attach_cnt, last_packet_cnt, last_seen, best_bs, best_snr,"
    " created_at, config_rev, sn_key"
)
# What save_sensors writes: the configuration, never the hot state a running hub owns.
_SENSOR_CONFIG_COLUMNS = (
    "eui, nw_key, short_addr, bidi, dual_chan, repetition, wide_carr_off, long_blk_dist, ep_class,"
    " sync_burst, attached, attached_at, attach_cnt, sn_key, created_at, config_rev"
)
_BS_COLUMNS = (
    "eui, vendor, model, name, sw_version, version, bidi, geo, peer, cert_serial, cert_subject,"
    " first_seen, last_seen, online, since, last_status, status_time, revoked, revoked_reason, revoked_at"
)
# Downlinks not ended yet (see downlinks.DownlinkState).
_PENDING_STATES = "('queued', 'dispatched', 'accepted', 'expiring')"
# How long sensor hot state and published marks wait in memory before one batched write.
MARK_DELAY = 0.05
_PRUNE_CHUNK = 5000


_opt_time = opt_time


def _flag(value: Any) -> bool:
    return bool(value)


def _opt_flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@attrs.define(eq=False)
class Sensor:
    """One mioty end point; `nw_key` and `sn_key` never appear in a repr, a log line or `to_json`."""

    eui: str
    nw_key: bytes = attrs.field(repr=False)
    short_addr: int
    bidi: bool
    dual_chan: bool = False
    repetition: bool = False
    wide_carr_off: bool = False
    long_blk_dist: bool = False
    ep_class: str | None = None
    sync_burst: bool | None = None
    attached: bool = True
    attached_at: float | None = None
    attach_cnt: int | None = None
    last_packet_cnt: int | None = None
    last_seen: float | None = None
    best_bs: str | None = None
    best_snr: float | None = None
    created_at: float = 0.0
    config_rev: int = 0
    # The network session key of the current over-the-air attachment (None: provisioned, the
    # base stations get nw_key); set by an `att`, cleared by a detach or a new nw_key.
    sn_key: bytes | None = attrs.field(default=None, repr=False)
    # Memory only: the receivers of the last uplink, best SNR first (downlink routing).
    paths: tuple[str, ...] = ()
    warned: bool = False
    # The hub that wrote this configuration, as sensor_changes read it (None: no hub, e.g. the CLI).
    writer: str | None = None

    def config(self) -> tuple[Any, ...]:
        """What an attachment propagates; two sensors with equal configs need no new attPrp."""
        return (
            self.nw_key,
            self.short_addr,
            self.bidi,
            self.dual_chan,
            self.repetition,
            self.wide_carr_off,
            self.long_blk_dist,
            self.ep_class,
            self.sync_burst,
            self.attached,
            self.sn_key,
        )

    @property
    def session_key(self) -> bytes:
        """The key attPrp propagates: the over-the-air session's, else the provisioned one."""
        return self.sn_key if self.sn_key is not None else self.nw_key

    def to_json(self) -> dict[str, Any]:
        return {
            "epEui": self.eui,
            "shortAddr": f"{self.short_addr:04x}",
            "bidi": self.bidi,
            "dualChan": self.dual_chan,
            "repetition": self.repetition,
            "wideCarrOff": self.wide_carr_off,
            "longBlkDist": self.long_blk_dist,
            "epClass": self.ep_class,
            "syncBurst": self.sync_burst,
            "attached": self.attached,
            "attachedAt": _opt_time(self.attached_at),
            "attachCnt": self.attach_cnt,
            "otaSession": self.sn_key is not None,
            "lastPacketCnt": self.last_packet_cnt,
            "lastSeen": _opt_time(self.last_seen),
            "bestBs": self.best_bs,
            "bestSnr": self.best_snr,
            "createdAt": rfc3339(self.created_at),
        }

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Sensor:
        return cls(
            eui=row[0],
            nw_key=bytes(row[1]),
            short_addr=int(row[2]),
            bidi=_flag(row[3]),
            dual_chan=_flag(row[4]),
            repetition=_flag(row[5]),
            wide_carr_off=_flag(row[6]),
            long_blk_dist=_flag(row[7]),
            ep_class=row[8],
            sync_burst=_opt_flag(row[9]),
            attached=_flag(row[10]),
            attached_at=_opt_float(row[11]),
            attach_cnt=_opt_int(row[12]),
            last_packet_cnt=_opt_int(row[13]),
            last_seen=_opt_float(row[14]),
            best_bs=row[15],
            best_snr=_opt_float(row[16]),
            created_at=float(row[17]),
            config_rev=int(row[18]),
            sn_key=None if row[19] is None else bytes(row[19]),
        )

    def config_row(self) -> tuple[Any, ...]:
        return (
            self.eui,
            self.nw_key,
            self.short_addr,
            int(self.bidi),
            int(self.dual_chan),
            int(self.repetition),
            int(self.wide_carr_off),
            int(self.long_blk_dist),
            self.ep_class,
            None if self.sync_burst is None else int(self.sync_burst),
            int(self.attached),
            self.attached_at,
            self.attach_cnt,
            self.sn_key,
            self.created_at,
        )


def _stored(sensor: Sensor) -> tuple[Any, ...]:
    """What save_sensors compares: the configuration plus the over-the-air attach counter."""
    return (*sensor.config(), sensor.attach_cnt)


def attach_change(eui: str, key: bytes, short_addr: int, bidi: bool, now: float) -> Callable[[Sensor | None], Sensor]:
    """The save_sensors change that registers an end point, or re-configures it, attached."""

    def make(old: Sensor | None) -> Sensor:
        if old is None:
            return Sensor(eui, key, short_addr, bidi, attached=True, attached_at=now, created_at=now)
        # A new pre-shared key ends the over-the-air session derived from the old one.
        return attrs.evolve(old, nw_key=key, short_addr=short_addr, bidi=bidi, attached=True,
                            attached_at=old.attached_at if old.attached else now,
                            sn_key=old.sn_key if old.nw_key == key else None)

    return make


@attrs.define(eq=False)
class BaseStation:
    """One base station that connected at least once."""

    eui: str
    first_seen: float
    last_seen: float
    since: float
    vendor: str | None = None
    model: str | None = None
    name: str | None = None
    sw_version: str | None = None
    version: str | None = None
    bidi: bool = False
    geo: list[float] | None = None
    peer: str | None = None
    cert_serial: str | None = None
    cert_subject: str | None = None
    online: bool = False
    last_status: dict[str, Any] | None = None
    status_time: float | None = None
    revoked: bool = False
    revoked_reason: str | None = None
    revoked_at: float | None = None

    def state_payload(self) -> dict[str, Any]:
        """The retained `mioty/bs/{bsEui}/state` payload."""
        return {
            "state": "online" if self.online else "offline",
            "vendor": self.vendor,
            "model": self.model,
            "name": self.name,
            "swVersion": self.sw_version,
            "version": self.version,
            "since": rfc3339(self.since),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "bsEui": self.eui,
            **self.state_payload(),
            "bidi": self.bidi,
            "geoLocation": self.geo,
            "peer": self.peer,
            "certSerial": self.cert_serial,
            "certSubject": self.cert_subject,
            "firstSeen": rfc3339(self.first_seen),
            "lastSeen": rfc3339(self.last_seen),
            "status": self.last_status,
            "revoked": self.revoked,
            "revokedReason": self.revoked_reason,
            "revokedAt": _opt_time(self.revoked_at),
        }

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> BaseStation:
        return cls(
            eui=row[0],
            vendor=row[1],
            model=row[2],
            name=row[3],
            sw_version=row[4],
            version=row[5],
            bidi=_flag(row[6]),
            geo=json.loads(row[7]) if row[7] else None,
            peer=row[8],
            cert_serial=row[9],
            cert_subject=row[10],
            first_seen=float(row[11]),
            last_seen=float(row[12]),
            online=_flag(row[13]),
            since=float(row[14]),
            last_status=json.loads(row[15]) if row[15] else None,
            status_time=_opt_float(row[16]),
            revoked=_flag(row[17]),
            revoked_reason=row[18],
            revoked_at=_opt_float(row[19]),
        )

    def row(self) -> tuple[Any, ...]:
        return (
            self.eui,
            self.vendor,
            self.model,
            self.name,
            self.sw_version,
            self.version,
            int(self.bidi),
            None if self.geo is None else json.dumps(self.geo),
            self.peer,
            self.cert_serial,
            self.cert_subject,
            self.first_seen,
            self.last_seen,
            int(self.online),
            self.since,
            None if self.last_status is None else json.dumps(self.last_status),
            self.status_time,
            int(self.revoked),
            self.revoked_reason,
            self.revoked_at,
        )


@attrs.frozen
class ImportCounts:
    created: int
    updated: int
    unchanged: int


class Registry:
    """Storage of the mioty family plus its in-memory cache (`sensors`, `base_stations`, revocations).

    `load()` fills the cache; the service mutates Sensor hot state (last seen, packet counter, best
    path) in memory and calls `dirty()`; `flush_state()` writes those back in one transaction.
    """

    log = Logger()

    def __init__(self, store: Store, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock
        self.sensors: dict[str, Sensor] = {}
        self.base_stations: dict[str, BaseStation] = {}
        self.revoked_serials: dict[int, str] = {}
        """Revoked certificate serials, with the reason: checked on the reactor thread in every handshake."""
        self.sensor_rev = 0
        """Highest sensor config revision seen; later ones came from elsewhere (e.g. `sensors import`)."""
        self.node: str | None = None
        """The hub (a cluster) stored with each configuration change it writes; None: no hub (the CLI)."""
        self._dirty: set[str] = set()
        self._uplinks = store.batch_writer(_INSERT_UPLINK)
        self._marks = BatchWriter(
            store, _MARK_PUBLISHED[store.dialect], clock, delay=MARK_DELAY, max_rows=5000, idempotent=True
        )

    # -- loading

    async def load(self) -> None:
        def read(c: Cursor) -> tuple[Any, ...]:
            sensors = c.execute(f"SELECT {_SENSOR_COLUMNS} FROM mioty_sensors").fetchall()
            stations = c.execute(f"SELECT {_BS_COLUMNS} FROM mioty_base_stations").fetchall()
            # The hub's one record of revoked serials, shared with the web's certificate pages.
            certs = c.execute("SELECT serial, reason FROM revoked_certs").fetchall()
            rev = c.execute("SELECT value FROM mioty_meta WHERE name = 'sensor_rev'").fetchone()
            return sensors, stations, certs, rev

        sensors, stations, certs, rev = await self.store.interaction(read)
        self.sensors = {row[0]: Sensor.from_row(row) for row in sensors}
        self.base_stations = {row[0]: BaseStation.from_row(row) for row in stations}
        self.revoked_serials = {int(serial, 16): reason for serial, reason in certs}
        self.sensor_rev = int(rev[0]) if rev else 0

    # -- sensors

    async def save_sensors(
        self, changes: Mapping[str, Callable[[Sensor | None], Sensor]], fence: Fence | None = None,
        keep: Callable[[Cursor], None] | None = None,
    ) -> tuple[ImportCounts, list[tuple[Sensor, Sensor | None]]]:
        """Insert or update sensors in one transaction: `changes[eui](stored or None)` returns the
        wanted sensor (a pure function: it runs on the database thread, given the stored row).
        A leader-only write passes its `fence`: checked first (StaleLeader: nothing written), and may `keep(cursor)`
        more in the same transaction (the event it entails).

        Only changed rows are written, with a new config revision; hot state (last seen, packet
        counter, best path) is never overwritten. Returns the counts and (new, old) per change.
        """

        def write(c: Cursor) -> tuple[list[tuple[Sensor, Sensor | None]], int]:
            if fence is not None:
                fence.check(c)
            if keep is not None:
                keep(c)
            existing: dict[str, Sensor] = {}
            euis = list(changes)
            for start in range(0, len(euis), 500):
                chunk = euis[start : start + 500]
                rows = c.execute(
                    f"SELECT {_SENSOR_COLUMNS} FROM mioty_sensors WHERE eui IN ({', '.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                existing.update((row[0], Sensor.from_row(row)) for row in rows)
            changed = []
            for eui, make in changes.items():
                old = existing.get(eui)
                new = make(old)
                if old is None or _stored(old) != _stored(new):
                    changed.append((new, old))
            if not changed:
                return changed, 0
            # The row lock serialises writers: revisions are unique and become visible in order.
            (rev,) = c.execute(
                "UPDATE mioty_meta SET value = value + 1 WHERE name = 'sensor_rev' RETURNING value"
            ).fetchone() or (0,)
            c.executemany(
                f"INSERT INTO mioty_sensors ({_SENSOR_CONFIG_COLUMNS}, config_node) VALUES ({', '.join('?' * 17)})"
                " ON CONFLICT (eui) DO UPDATE SET nw_key = excluded.nw_key, short_addr = excluded.short_addr,"
                " bidi = excluded.bidi, dual_chan = excluded.dual_chan, repetition = excluded.repetition,"
                " wide_carr_off = excluded.wide_carr_off, long_blk_dist = excluded.long_blk_dist,"
                " ep_class = excluded.ep_class, sync_burst = excluded.sync_burst, attached = excluded.attached,"
                " attached_at = excluded.attached_at, attach_cnt = excluded.attach_cnt,"
                " sn_key = excluded.sn_key, config_rev = excluded.config_rev, config_node = excluded.config_node",
                [(*new.config_row(), rev, self.node) for new, _ in changed],
            )
            return changed, int(rev)

        changed, rev = await self.store.interaction(write)
        for new, old in changed:
            new.config_rev = rev
            self.adopt(new, old)
        created = sum(1 for _, old in changed if old is None)
        counts = ImportCounts(created, len(changed) - created, len(changes) - len(changed))
        return counts, changed

    def adopt(self, sensor: Sensor, stored: Sensor | None = None) -> Sensor | None:
        """Put a sensor with a new configuration into the cache, keeping the hot state of the
        cached one (newest) or else of the stored one. Returns the one it replaced."""
        old = self.sensors.get(sensor.eui)
        source = old or stored
        if source is not None:
            sensor.created_at = source.created_at
            sensor.last_packet_cnt, sensor.last_seen = source.last_packet_cnt, source.last_seen
            sensor.best_bs, sensor.best_snr, sensor.paths = source.best_bs, source.best_snr, source.paths
        self.sensors[sensor.eui] = sensor
        return old

    async def reload_sensor(self, eui: str) -> Sensor | None:
        """Read one sensor's configuration again (another hub changed it): cached, or dropped if deleted."""
        row = await self.store.fetchone(f"SELECT {_SENSOR_COLUMNS} FROM mioty_sensors WHERE eui = ?", (eui,))
        if row is None:
            self.sensors.pop(eui, None)
            return None
        sensor = Sensor.from_row(row)
        self.adopt(sensor)
        return sensor

    async def stored_best_bs(self, eui: str) -> str | None:
        """The end point's best receiver as last written back (by whichever hub heard it)."""
        row = await self.store.fetchone("SELECT best_bs FROM mioty_sensors WHERE eui = ?", (eui,))
        return None if row is None or row[0] is None else str(row[0])

    async def delete_sensor(self, eui: str) -> bool:
        now = self.clock.seconds()

        def delete(c: Cursor) -> int:
            c.execute("UPDATE mioty_meta SET value = value + 1 WHERE name = 'sensor_rev'")
            deleted = c.execute("DELETE FROM mioty_sensors WHERE eui = ?", (eui,)).rowcount
            if deleted and self.node is not None:
                # A lease holder's sync that sees the row gone sees that this hub removed it (and reports it).
                note_change(c, "mioty", "sensor", eui, self.node, now)
                prune_notes(c, "mioty", now - NOTES_KEPT)
            return deleted

        deleted = await self.store.interaction(delete)
        self.sensors.pop(eui, None)
        self._dirty.discard(eui)
        return bool(deleted)

    async def all_sensors(self) -> list[Sensor]:
        """Every sensor straight from the database (for the CLI, which has no loaded cache)."""
        rows = await self.store.fetchall(f"SELECT {_SENSOR_COLUMNS} FROM mioty_sensors ORDER BY eui")
        return [Sensor.from_row(row) for row in rows]

    async def sensor_changes(self) -> tuple[list[Sensor], set[str]]:
        """Sensors whose configuration another writer changed since the last call (e.g. `sensors
        import` in another process), and EUIs deleted meanwhile; advances `sensor_rev`."""
        since = self.sensor_rev

        def read(c: Cursor) -> tuple[list[tuple[Any, ...]], set[str] | None, int]:
            (rev,) = c.execute("SELECT value FROM mioty_meta WHERE name = 'sensor_rev'").fetchone() or (0,)
            if rev == since:
                return [], None, int(rev)
            rows = c.execute(f"SELECT {_SENSOR_COLUMNS}, config_node FROM mioty_sensors WHERE config_rev > ?",
                             (since,)).fetchall()
            # A deletion leaves no row behind: compare the EUIs, only when something changed.
            present = {r[0] for r in c.execute("SELECT eui FROM mioty_sensors").fetchall()}
            return rows, present, int(rev)

        rows, present, rev = await self.store.interaction(read)
        self.sensor_rev = max(self.sensor_rev, rev)
        changed = []
        for row in rows:
            sensor = Sensor.from_row(row)
            sensor.writer = row[-1]
            cached = self.sensors.get(sensor.eui)
            # This process may have written a newer revision after the read.
            if cached is None or cached.config_rev < sensor.config_rev:
                changed.append(sensor)
        deleted: set[str] = set()
        if present is not None:
            deleted = {eui for eui, s in self.sensors.items() if eui not in present and s.config_rev <= rev}
        return changed, deleted

    async def removed_by_hubs(self, euis: Sequence[str]) -> set[str]:
        """Which of these deleted sensors a hub of the cluster removed (that hub reported the removal)."""
        return await noted(self.store, "mioty", "sensor", euis)

    def dirty(self, eui: str) -> None:
        self._dirty.add(eui)

    async def flush_state(self) -> int:
        """Write the hot state of every sensor touched since the last flush; returns the count."""
        if not self._dirty:
            return 0
        euis, self._dirty = self._dirty, set()
        rows = [
            (s.last_packet_cnt, s.last_seen, s.best_bs, s.best_snr, s.eui, s.last_seen)
            for s in (self.sensors.get(eui) for eui in sorted(euis))  # one lock order on every hub
            if s is not None
        ]
        try:
            # Never older over newer: in a cluster another hub may have heard a later uplink.
            await self.store.executemany(
                "UPDATE mioty_sensors SET last_packet_cnt = ?, last_seen = ?, best_bs = ?, best_snr = ?"
                " WHERE eui = ? AND (last_seen IS NULL OR last_seen <= ?)",
                rows,
            )
        except Exception:
            self._dirty |= euis
            raise
        return len(rows)

    async def refresh_state(self) -> int:
        """Take the hot state other hubs wrote back where it is newer than this hub's (a cluster: the
        packet counter an attPrp carries, the best path); returns how many sensors changed."""
        rows = await self.store.fetchall(
            "SELECT eui, last_packet_cnt, last_seen, best_bs, best_snr FROM mioty_sensors WHERE last_seen IS NOT NULL"
        )
        changed = 0
        for eui, packet_cnt, last_seen, best_bs, best_snr in rows:
            sensor = self.sensors.get(eui)
            if sensor is not None and (sensor.last_seen is None or float(last_seen) > sensor.last_seen):
                sensor.last_packet_cnt, sensor.last_seen = _opt_int(packet_cnt), float(last_seen)
                # The receivers this hub heard last are older than that uplink's best one.
                sensor.best_bs, sensor.best_snr, sensor.paths = best_bs, _opt_float(best_snr), ()
                changed += 1
        return changed

    async def warnings(self) -> dict[str, float]:
        """When each sensor's silence was last warned about (a cluster's lease holders write it)."""
        rows = await self.store.fetchall("SELECT eui, warned_at FROM mioty_sensors WHERE warned_at IS NOT NULL")
        return {eui: float(at) for eui, at in rows}

    async def save_warning(self, eui: str, at: float, fence: Fence, *, keep: Callable[[Cursor], None]) -> None:
        """A lease holder warned about a silence (fenced: not written by one another hub took over from); `keep(cursor)`
        stores the warning's event in the same transaction."""

        def write(c: Cursor) -> None:
            fence.check(c)
            c.execute("UPDATE mioty_sensors SET warned_at = ? WHERE eui = ?", (at, eui))
            keep(c)

        await self.store.interaction(write)

    # -- base stations

    async def save_base_station(self, bs: BaseStation) -> None:
        self.base_stations[bs.eui] = bs
        columns = _BS_COLUMNS.split(", ")
        updates = ", ".join(f"{col} = excluded.{col}" for col in columns[1:] if col != "first_seen")
        await self.store.execute(
            f"INSERT INTO mioty_base_stations ({_BS_COLUMNS}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (eui) DO UPDATE SET {updates}",
            bs.row(),
        )

    async def mark_all_offline(self, now: float) -> list[BaseStation]:
        """After a crash the database may still say online; returns the stations that did."""
        stale = [bs for bs in self.base_stations.values() if bs.online]
        for bs in stale:
            bs.online, bs.since = False, now
        if stale:
            await self.store.execute(
                "UPDATE mioty_base_stations SET online = 0, since = ? WHERE online = 1", (now,)
            )
        return stale

    async def touch_base_stations(self, euis: Sequence[str], now: float) -> None:
        for eui in euis:
            bs = self.base_stations.get(eui)
            if bs is not None:
                bs.last_seen = now
        if euis:
            await self.store.executemany(
                "UPDATE mioty_base_stations SET last_seen = ? WHERE eui = ?", [(now, eui) for eui in sorted(euis)]
            )

    async def revoke_certificate(self, serial: int, reason: str, actor: str, now: float) -> None:
        """Refuse `serial` from now on; a serial revoked already keeps its first reason."""
        self.revoked_serials.setdefault(serial, reason)
        await self.store.execute(
            "INSERT INTO revoked_certs (serial, reason, revoked_at, actor) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (serial) DO NOTHING",
            (format(serial, "x"), reason, now, actor),
        )

    # -- uplinks

    def add_uplink(self, row: Sequence[Any]) -> defer.Deferred[None]:
        """Queue one copy (UPLINK_COLUMNS order) for the next group commit; fires once committed."""
        return self._uplinks.add(row)

    def mark_published(self, ep_eui: str, packet_cnt: int) -> None:
        """Record (batched) that an uplink's copies need no re-emission after a restart."""
        self._marks.add_nowait((ep_eui, packet_cnt))

    async def flush(self) -> None:
        """Write everything held in memory: uplink copies, published marks, sensor hot state."""
        await self._uplinks.flush()
        await self._marks.flush()
        await self.flush_state()

    async def unpublished(self, before: float | None = None) -> list[tuple[Any, ...]]:
        """Every stored copy not marked published (received before `before`, if given), oldest first
        (id + UPLINK_COLUMNS)."""
        rows: list[tuple[Any, ...]] = []
        last = 0
        cutoff = "" if before is None else " AND received < ?"
        while True:
            chunk = await self.store.fetchall(
                f"SELECT id, {UPLINK_COLUMNS} FROM mioty_uplinks WHERE published = 0 AND id > ?{cutoff}"
                " ORDER BY id LIMIT ?",
                (last, _PRUNE_CHUNK) if before is None else (last, before, _PRUNE_CHUNK),
            )
            rows.extend(chunk)
            if len(chunk) < _PRUNE_CHUNK:
                return rows
            last = chunk[-1][0]

    async def recent_keys(self, limit: int) -> list[tuple[str, int, int]]:
        """(epEui, packetCnt, rxTime) of the newest copies, newest first: seeds duplicate detection."""
        rows = await self.store.fetchall(
            "SELECT ep_eui, packet_cnt, rx_time FROM mioty_uplinks ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    async def uplink_rows(self, ep_eui: str, limit: int, before: float | None) -> list[tuple[Any, ...]]:
        """Copies of one sensor's uplinks received before `before` (Unix s), newest first."""
        if before is None:
            return await self.store.fetchall(
                f"SELECT id, {UPLINK_COLUMNS} FROM mioty_uplinks WHERE ep_eui = ?"
                " ORDER BY received DESC, id DESC LIMIT ?",
                (ep_eui, limit),
            )
        return await self.store.fetchall(
            f"SELECT id, {UPLINK_COLUMNS} FROM mioty_uplinks WHERE ep_eui = ? AND received < ?"
            " ORDER BY received DESC, id DESC LIMIT ?",
            (ep_eui, before, limit),
        )

    async def prune_uplinks(self, cutoff: float) -> int:
        """Delete published copies received before `cutoff`, in chunks; returns how many."""
        total = 0
        while True:
            deleted = await self.store.execute(
                "DELETE FROM mioty_uplinks WHERE id IN (SELECT id FROM mioty_uplinks"
                " WHERE received < ? AND published = 1 ORDER BY received LIMIT ?)",
                (cutoff, _PRUNE_CHUNK),
            )
            total += deleted
            if deleted < _PRUNE_CHUNK:
                return total

    # -- downlinks

    async def add_downlink(
        self,
        ep_eui: str,
        data: bytes,
        fmt: int | None,
        prio: float | None,
        response_exp: bool | None,
        actor: str,
        targets: Sequence[str],
        now: float,
        node: str | None = None,
    ) -> int:
        """Store a new downlink as `queued`, kept by hub `node`; its id is the queId."""
        row = await self.store.fetchone(
            "INSERT INTO mioty_downlinks (ep_eui, data, format, prio, response_exp, created, actor, targets,"
            " status, updated, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?) RETURNING id",
            (
                ep_eui,
                data,
                fmt,
                prio,
                None if response_exp is None else int(response_exp),
                now,
                actor,
                json.dumps(list(targets)),
                now,
                node,
            ),
        )
        assert row is not None
        return int(row[0])

    async def update_downlink(self, que_id: int, now: float, *, node: str | None = None, **fields: Any) -> int:
        """Set columns of one downlink (status, result_bs, tx_time, packet_cnt, error, acked, targets, attempts);
        with `node`, only while that hub keeps it. Returns the rows written (0: another hub keeps it)."""
        allowed = {"status", "result_bs", "tx_time", "packet_cnt", "error", "acked", "targets", "attempts"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown downlink columns {sorted(unknown)}")
        values = [json.dumps(v) if k == "targets" else int(v) if k == "acked" else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        guard, params = ("", ()) if node is None else (" AND node = ?", (node,))
        return int(await self.store.execute(
            f"UPDATE mioty_downlinks SET {sets}, updated = ? WHERE id = ?{guard}", (*values, now, que_id, *params)
        ))

    async def ack_downlink(self, ep_eui: str, packet_cnt: int, now: float) -> int | None:
        """Mark the end point's downlink sent with `packet_cnt` acknowledged, if one is and is not yet;
        returns its queId."""
        row = await self.store.fetchone(
            "UPDATE mioty_downlinks SET acked = 1, updated = ? WHERE id = (SELECT id FROM mioty_downlinks"
            " WHERE ep_eui = ? AND status = 'sent' AND packet_cnt = ? AND acked = 0 ORDER BY id DESC LIMIT 1)"
            " RETURNING id", (now, ep_eui, packet_cnt))
        return None if row is None else int(row[0])

    async def keep_downlinks(self, node: str, claims: Sequence[tuple[int, str | None]]) -> list[int]:
        """Hub `node` keeps each (queId, keeper) from now on if it is pending and `keeper` (None: nobody)
        still keeps it: one conditional write each, so of two hubs taking one downlink one wins."""

        def write(c: Cursor) -> list[int]:
            taken = []
            for que_id, keeper in claims:
                guard = "node IS NULL" if keeper is None else "node = ?"
                params = (node, que_id) if keeper is None else (node, que_id, keeper)
                if c.execute(f"UPDATE mioty_downlinks SET node = ? WHERE id = ? AND status IN {_PENDING_STATES}"
                             f" AND {guard}", params).rowcount:
                    taken.append(que_id)
            return taken

        return await self.store.interaction(write) if claims else []

    async def release_downlinks(self, node: str, que_ids: Sequence[int]) -> None:
        """Hub `node` keeps these downlinks no longer (unless another hub took them meanwhile)."""
        await self.store.executemany("UPDATE mioty_downlinks SET node = NULL WHERE id = ? AND node = ?",
                                     [(q, node) for q in que_ids])

    async def downlinks(
        self, ep_eui: str | None = None, *, pending_only: bool = False, que_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Downlinks newest first, as JSON-ready dicts (one sensor's, one by queId, or every pending one)."""
        where: list[str] = []
        params: list[Any] = []
        if ep_eui is not None:
            where.append("ep_eui = ?")
            params.append(ep_eui)
        if que_id is not None:
            where.append("id = ?")
            params.append(que_id)
        if pending_only:
            where.append(f"status IN {_PENDING_STATES}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.store.fetchall(
            "SELECT id, ep_eui, data, format, prio, response_exp, created, actor, targets, status, result_bs,"
            f" tx_time, packet_cnt, error, acked, updated, attempts FROM mioty_downlinks {clause}"
            " ORDER BY id DESC LIMIT 1000",
            params,
        )
        return [
            {
                "queId": int(r[0]),
                "epEui": r[1],
                "data": bytes(r[2]).hex(),
                "format": _opt_int(r[3]),
                "prio": _opt_float(r[4]),
                "responseExp": _opt_flag(r[5]),
                "created": rfc3339(float(r[6])),
                "actor": r[7],
                "bsEuis": json.loads(r[8]),
                "status": r[9],
                "resultBs": r[10],
                "txTime": _opt_int(r[11]),
                "packetCnt": _opt_int(r[12]),
                "error": r[13],
                "acked": bool(r[14]),
                "updated": rfc3339(float(r[15])),
                "attempts": int(r[16]),
            }
            for r in rows
        ]

    async def pending_downlinks(self, que_ids: Sequence[int] | None = None) -> list[tuple[Any, ...]]:
        """Every downlink not ended yet (or those of `que_ids`), oldest first: (id, ep_eui, data, format,
        prio, response_exp, created, status, attempts, targets, node (the hub keeping it), the end
        point's stored best_bs)."""
        ids = ""
        params: tuple[Any, ...] = ()
        if que_ids is not None:
            if not que_ids:
                return []
            ids = f" AND d.id IN ({', '.join('?' * len(que_ids))})"
            params = tuple(que_ids)
        return await self.store.fetchall(
            "SELECT d.id, d.ep_eui, d.data, d.format, d.prio, d.response_exp, d.created, d.status, d.attempts,"
            " d.targets, d.node, s.best_bs FROM mioty_downlinks d LEFT JOIN mioty_sensors s ON s.eui = d.ep_eui"
            f" WHERE d.status IN {_PENDING_STATES}{ids} ORDER BY d.id", params
        )
