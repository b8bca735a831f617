"""endpoints.json, the end-point list other mioty service centers use: strict import, export.
A list of {"eui": 16 hex, "nwKey": 32 hex, "shortAddr": 4 hex, "bidi": bool}; import updates existing sensors."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

from bsscihub import audit
from bsscihub.errors import UserFacingError
from bsscihub.protocols.bssci.registry import Registry, Sensor, attach_change

__all__ = [
    "Endpoint",
    "EndpointsError",
    "dump_endpoints",
    "export_endpoints",
    "export_file",
    "import_endpoints",
    "import_file",
    "parse_endpoints",
]

FIELDS = ("eui", "nwKey", "shortAddr", "bidi")
_HEX = {"eui": 16, "nwKey": 32, "shortAddr": 4}
_HEX_DIGITS = re.compile(r"[0-9A-Fa-f]*")


class EndpointsError(UserFacingError):
    """An endpoints.json file or list that cannot be imported; names the entry and the field."""


@attrs.frozen
class Endpoint:
    eui: str
    nw_key: bytes = attrs.field(repr=False)
    short_addr: int
    bidi: bool


def parse_endpoints(doc: Any) -> list[Endpoint]:
    """Validate a decoded endpoints.json document; raises EndpointsError for the first problem.

    All or nothing: a single bad entry refuses the whole list, so nothing is half imported.
    """
    if not isinstance(doc, list):
        raise EndpointsError(f"endpoints.json must hold a JSON list of end points, not {_kind(doc)}")
    found: list[Endpoint] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(doc):
        where = f"endpoints[{index}]"
        if not isinstance(entry, dict):
            raise EndpointsError(f"{where}: expected an object with {', '.join(FIELDS)}, got {_kind(entry)}")
        unknown = sorted(set(entry) - set(FIELDS), key=str)
        if unknown:
            raise EndpointsError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
        for name in FIELDS:
            if name not in entry:
                raise EndpointsError(f"{where}: missing field {name!r}")
        values: dict[str, Any] = {}
        for name, digits in _HEX.items():
            value = entry[name]
            if not isinstance(value, str) or len(value) != digits or not _HEX_DIGITS.fullmatch(value):
                # The network key is a secret: its value never goes into a message.
                shown = "" if name == "nwKey" else f", got {value!r}"
                raise EndpointsError(f"{where}.{name}: expected {digits} hexadecimal digits{shown}")
            values[name] = value.lower()
        if type(entry["bidi"]) is not bool:
            raise EndpointsError(f"{where}.bidi: expected true or false, got {entry['bidi']!r}")
        eui = values["eui"]
        if eui in seen:
            raise EndpointsError(f"{where}.eui: {eui} appears already in endpoints[{seen[eui]}]")
        seen[eui] = index
        found.append(Endpoint(eui, bytes.fromhex(values["nwKey"]), int(values["shortAddr"], 16), entry["bidi"]))
    return found


def dump_endpoints(sensors: list[Sensor]) -> list[dict[str, Any]]:
    """Sensors in the endpoints.json format, by EUI (with their network keys: handle with care)."""
    return [
        {"eui": s.eui, "nwKey": s.nw_key.hex(), "shortAddr": f"{s.short_addr:04x}", "bidi": s.bidi}
        for s in sorted(sensors, key=lambda s: s.eui)
    ]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _running_service(hub: Any) -> Any:
    service = hub.services.get("mioty")
    return service if service is not None and service.running else None


async def import_endpoints(hub: Any, doc: Any, *, actor: str = "cli") -> dict[str, Any]:
    """Register and attach every end point of an endpoints.json document (updating existing ones).

    In a running hub the changed ones are propagated to the connected base stations at once; a
    hub running elsewhere on the same database picks them up within mioty.flush_interval.
    Returns {"imported", "created", "updated", "unchanged", "errors": []}.
    """
    entries = parse_endpoints(doc)
    service = _running_service(hub)
    if service is not None:
        counts = await service.import_sensors(
            [(e.eui, e.nw_key, e.short_addr, e.bidi) for e in entries], source=f"import by {actor}"
        )
    else:
        now = hub.reactor.seconds()
        registry = Registry(hub.store, hub.reactor)
        counts, _ = await registry.save_sensors(
            {e.eui: attach_change(e.eui, e.nw_key, e.short_addr, e.bidi, now) for e in entries}
        )
    return {
        "imported": len(entries),
        "created": counts.created,
        "updated": counts.updated,
        "unchanged": counts.unchanged,
        "errors": [],
    }


async def export_endpoints(hub: Any) -> list[dict[str, Any]]:
    """Every registered end point in the endpoints.json format, with its network key."""
    service = _running_service(hub)
    if service is not None:
        sensors = list(service.registry.sensors.values())
    else:
        sensors = await Registry(hub.store, hub.reactor).all_sensors()
    return dump_endpoints(sensors)


async def import_file(hub: Any, path: str) -> int:
    """`bsscihub sensors import FILE`: prints one line; exit status 0, or 1 for a bad file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        result = await import_endpoints(hub, json.loads(text), actor="cli")
    except OSError as e:
        return _fail(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError:
        return _fail(f"{path} is not UTF-8 text")
    except ValueError as e:  # JSONDecodeError; EndpointsError is no ValueError
        return _fail(f"{path} is not valid JSON: {e}")
    except EndpointsError as e:
        return _fail(f"{path}: {e}")
    detail = {k: result[k] for k in ("imported", "created", "updated", "unchanged")}
    await audit.record(hub.store, "cli", "mioty.sensor.import", str(path), detail, "bsscihub sensors import")
    print(
        f"imported {result['imported']} end points from {path}: {result['created']} new,"
        f" {result['updated']} updated, {result['unchanged']} unchanged"
    )
    return 0


def _fail(message: str) -> int:
    print(f"bsscihub: {message}", file=sys.stderr)
    return 1


async def export_file(hub: Any, out: str) -> int:
    """`bsscihub sensors export [--out FILE]`: endpoints.json to stdout ("-") or to a file
    readable by its owner only (it holds the network keys)."""
    data = await export_endpoints(hub)
    text = json.dumps(data, indent=2) + "\n"
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    target = Path(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        return _fail(f"cannot write {out}: {e.strerror}")
    print(f"exported {len(data)} end points to {out}", file=sys.stderr)
    return 0
