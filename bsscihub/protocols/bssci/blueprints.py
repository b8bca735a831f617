"""The hub's blueprint book: imported mioty Blueprints and the Type EUI of each sensor, stored and kept in memory.
It adds `typeEui` and `decoded` (or `decodeError`) to uplink events; the command line and REST share it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.logger import Logger

from bsscihub.contract import eui64
from bsscihub.protocols.bssci.blueprint import Blueprint, BlueprintError, DecodeError, parse_blueprint
from bsscihub.store import Migration

__all__ = ["MIGRATIONS", "BlueprintBook", "BlueprintError", "type_eui"]

MIGRATIONS = [
    Migration(
        "mioty_blueprints",
        1,
        # Blueprints by Type EUI (the document as imported) and the Type EUI of each sensor. A type
        # may be given before its blueprint is imported: uplinks then say that it is missing.
        """
        CREATE TABLE mioty_blueprints (
            type_eui TEXT PRIMARY KEY,
            document TEXT NOT NULL,
            name TEXT,
            vendor TEXT,
            imported_at {real} NOT NULL,
            actor TEXT NOT NULL
        );
        CREATE TABLE mioty_sensor_types (
            ep_eui TEXT PRIMARY KEY,
            type_eui TEXT NOT NULL,
            changed {real} NOT NULL
        )
        """,
    ),
]


def type_eui(value: Any) -> str:
    """A Type EUI as 16 lower-case hex digits; BlueprintError otherwise."""
    eui = eui64(value) if isinstance(value, str) else None
    if eui is None:
        raise BlueprintError("a Type EUI is 16 hex digits")
    return eui


class BlueprintBook:
    """Blueprints by Type EUI and sensor types by EUI, mirrored from the database.

    `refresh` reloads when the tables changed (the command line writes them while the hub runs);
    `annotate` is called for every uplink payload before it is published.
    """

    log = Logger()

    def __init__(self, store: Any, clock: Any) -> None:
        self.store = store
        self.clock = clock
        self.blueprints: dict[str, Blueprint] = {}
        self.types: dict[str, str] = {}
        self._signature: tuple[Any, ...] | None = None
        self.decoded = 0
        self.failed = 0

    async def _read_signature(self) -> tuple[Any, ...]:
        a = await self.store.fetchone("SELECT count(*), max(imported_at) FROM mioty_blueprints")
        b = await self.store.fetchone("SELECT count(*), max(changed) FROM mioty_sensor_types")
        return (*(a or ()), *(b or ()))

    async def load(self) -> None:
        signature = await self._read_signature()
        blueprints = {}
        for t, document in await self.store.fetchall("SELECT type_eui, document FROM mioty_blueprints"):
            try:
                blueprints[t] = parse_blueprint(document)
            except BlueprintError as e:  # stored by an older hub that accepted more
                self.log.warn("blueprint {typeEui} cannot be used: {reason}", typeEui=t, reason=str(e))
        self.blueprints = blueprints
        self.types = dict(await self.store.fetchall("SELECT ep_eui, type_eui FROM mioty_sensor_types"))
        self._signature = signature

    async def refresh(self) -> None:
        if await self._read_signature() != self._signature:
            await self.load()

    # -- changes

    async def add(self, document: str | bytes | Mapping[str, Any], actor: str) -> Blueprint:
        """Import (or replace) a blueprint; BlueprintError says what is wrong with it."""
        blueprint = parse_blueprint(document)
        text = json.dumps(blueprint.document, ensure_ascii=False)
        now = self.clock.seconds()
        await self.store.execute(
            "INSERT INTO mioty_blueprints (type_eui, document, name, vendor, imported_at, actor)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type_eui) DO UPDATE SET document = excluded.document,"
            " name = excluded.name, vendor = excluded.vendor, imported_at = excluded.imported_at,"
            " actor = excluded.actor",
            (blueprint.type_eui, text, blueprint.name, blueprint.vendor, now, actor))
        self.blueprints[blueprint.type_eui] = blueprint
        self._signature = None  # the next refresh reads the new signature
        return blueprint

    async def remove(self, type_eui_: str) -> bool:
        t = type_eui(type_eui_)
        removed = bool(await self.store.execute("DELETE FROM mioty_blueprints WHERE type_eui = ?", (t,)))
        self.blueprints.pop(t, None)
        self._signature = None
        return removed

    async def set_type(self, ep: str, type_eui_: str | None) -> None:
        """Give sensor `ep` a Type EUI (None takes it away); its next uplinks are decoded with it."""
        if type_eui_ is None:
            await self.store.execute("DELETE FROM mioty_sensor_types WHERE ep_eui = ?", (ep,))
            self.types.pop(ep, None)
        else:
            t = type_eui(type_eui_)
            await self.store.execute(
                "INSERT INTO mioty_sensor_types (ep_eui, type_eui, changed) VALUES (?, ?, ?)"
                " ON CONFLICT (ep_eui) DO UPDATE SET type_eui = excluded.type_eui, changed = excluded.changed",
                (ep, t, self.clock.seconds()))
            self.types[ep] = t
        self._signature = None

    # -- queries

    def list(self) -> list[dict[str, Any]]:
        users: dict[str, int] = {}
        for t in self.types.values():
            users[t] = users.get(t, 0) + 1
        return [{**bp.summary(), "sensors": users.get(t, 0)} for t, bp in sorted(self.blueprints.items())]

    def get(self, type_eui_: str) -> dict[str, Any] | None:
        bp = self.blueprints.get(type_eui(type_eui_))
        if bp is None:
            return None
        return {**bp.summary(), "sensors": sum(1 for t in self.types.values() if t == bp.type_eui),
                "document": dict(bp.document)}

    def decode(self, ep: str, data: bytes, fmt: int, count: bool = True) -> dict[str, Any]:
        """What an uplink of sensor `ep` gains: {} (no type), or typeEui with decoded or decodeError;
        `count`: in the decode counters (live uplinks, not history read again)."""
        t = self.types.get(ep)
        if t is None:
            return {}
        bp = self.blueprints.get(t)
        if bp is None:
            self.failed += count
            return {"typeEui": t, "decodeError": f"no blueprint imported for type {t}"}
        try:
            decoded = bp.decode(data, fmt)
        except DecodeError as e:
            self.failed += count
            return {"typeEui": t, "decodeError": str(e)}
        self.decoded += count
        return {"typeEui": t, "decoded": decoded}

    def annotate(self, ep: str, payload: dict[str, Any], count: bool = True) -> None:
        """Add the decoded values to an uplink event's payload (the raw `data` stays)."""
        if ep in self.types:
            payload.update(self.decode(ep, bytes.fromhex(payload["data"]), int(payload.get("format") or 0), count))

    def annotate_all(self, items: Iterable[dict[str, Any]]) -> None:
        """Stored uplinks read again (REST history): decoded with the type the sensor has now, not counted."""
        for item in items:
            self.annotate(item["epEui"], item, count=False)
