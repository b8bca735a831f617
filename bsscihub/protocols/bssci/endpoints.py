"""endpoints.json, the end-point list other mioty service centers use, and its CSV form: strict import, export.
A list of {"eui": 16 hex, "nwKey": 32 hex, "shortAddr": 4 hex, "bidi": bool}; import updates existing sensors."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bsscihub import audit
from bsscihub.errors import UserFacingError
from bsscihub.protocols.bssci.registry import Registry, Sensor, attach_change

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = [
    "Endpoint",
    "EndpointsError",
    "dump_csv",
    "dump_endpoints",
    "export_endpoints",
    "export_file",
    "import_endpoints",
    "import_file",
    "parse_csv",
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


# Column names the earlier service center's CSV import took (case-insensitive), by field.
_CSV_NAMES = {
    "eui": ("eui", "mac", "address", "epeui", "ep_eui"),
    "nwKey": ("nwkey", "network_key", "key", "networkkey"),
    "shortAddr": ("shortaddr", "short_addr", "shortaddress", "addr"),
    "bidi": ("bidi", "bidirectional", "bidir"),
}
_TRUE, _FALSE = ("true", "1", "yes", "on", "y"), ("false", "0", "no", "off", "n", "")


def parse_csv(text: str) -> list[dict[str, Any]]:
    """End points from CSV as that service center's users keep them, as an endpoints.json document.

    Columns eui, nwKey, shortAddr, bidi (bidi may be left out: false), separated by commas,
    semicolons or tabs; the header row is optional (without it the columns are in that order)
    and may use that service center's other names (mac, network_key, short_addr, ...). Hex in any
    case; a shortAddr a spreadsheet cut to fewer than 4 digits gets its leading zeros back.
    EndpointsError names the line and the field of the first problem; nothing is half imported.
    """
    text = text.lstrip("\ufeff")  # a spreadsheet's byte-order mark
    first = text.split("\n", 1)[0]
    delimiter = ";" if ";" in first else "\t" if "\t" in first else ","
    try:
        rows = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True), 1)
                if any(cell.strip() for cell in row)]  # fmt: skip
    except csv.Error as e:
        raise EndpointsError(f"not CSV: {e}") from None
    columns = {"eui": 0, "nwKey": 1, "shortAddr": 2, "bidi": 3}
    if rows and any(cell.strip().lower() in names for cell in rows[0][1] for names in _CSV_NAMES.values()):
        header = [cell.strip().lower() for cell in rows[0][1]]
        columns = {field: next((i for i, name in enumerate(header) if name in names), -1)
                   for field, names in _CSV_NAMES.items()}  # fmt: skip
        missing = [field for field, i in columns.items() if i < 0 and field != "bidi"]
        if missing:
            raise EndpointsError(f"line {rows[0][0]}: the header has no {missing[0]} column")
        rows = rows[1:]
    doc: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        cells = [cell.strip() for cell in row]

        def cell(field: str, cells: list[str] = cells) -> str:
            i = columns[field]
            return cells[i] if 0 <= i < len(cells) else ""

        if len(cells) <= max(columns["eui"], columns["nwKey"], columns["shortAddr"]):
            raise EndpointsError(f"line {line}: expected the columns eui, nwKey, shortAddr and bidi,"
                                 f" got {len(cells)} column{'s' if len(cells) != 1 else ''}")
        short_addr = cell("shortAddr")
        if 0 < len(short_addr) < 4:
            short_addr = short_addr.rjust(4, "0")
        bidi = cell("bidi").lower()
        if bidi not in _TRUE + _FALSE:
            raise EndpointsError(f"line {line}: bidi: expected true or false, got {cell('bidi')!r}")
        entry: dict[str, Any] = {"eui": cell("eui"), "nwKey": cell("nwKey"), "shortAddr": short_addr,
                                 "bidi": bidi in _TRUE}
        try:
            parse_endpoints([entry])
        except EndpointsError as e:
            raise EndpointsError(f"line {line}: {str(e).removeprefix('endpoints[0].')}") from None
        eui = cell("eui").lower()
        if eui in seen:
            raise EndpointsError(f"line {line}: end point {eui} appears already on line {seen[eui]}")
        seen[eui] = line
        doc.append(entry)
    return doc


def dump_csv(doc: list[dict[str, Any]]) -> str:
    """An endpoints.json document as CSV, header eui,nwKey,shortAddr,bidi, hex upper-case as that
    service center wrote it (with the network keys: handle with care)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(FIELDS)
    for entry in doc:
        writer.writerow([entry["eui"].upper(), entry["nwKey"].upper(), entry["shortAddr"].upper(),
                         "true" if entry["bidi"] else "false"])  # fmt: skip
    return out.getvalue()


def file_format(path: str, fmt: str = "auto") -> str:
    """json or csv: as asked, else by the file name (.csv, .txt), else json."""
    if fmt != "auto":
        return fmt
    return "csv" if Path(path).suffix.lower() in (".csv", ".txt") else "json"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _running_service(hub: Hub) -> Any:
    service = hub.services.get("mioty")
    return service if service is not None and service.running else None


async def import_endpoints(hub: Hub, doc: Any, *, actor: str = "cli") -> dict[str, Any]:
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


async def export_endpoints(hub: Hub) -> list[dict[str, Any]]:
    """Every registered end point in the endpoints.json format, with its network key."""
    service = _running_service(hub)
    if service is not None:
        sensors = list(service.registry.sensors.values())
    else:
        sensors = await Registry(hub.store, hub.reactor).all_sensors()
    return dump_endpoints(sensors)


async def import_file(hub: Hub, path: str, fmt: str = "auto") -> int:
    """`bsscihub sensors import FILE`: endpoints.json, or CSV (`fmt` csv, or a .csv/.txt file name);
    prints one line; exit status 0, or 1 for a bad file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = parse_csv(text) if file_format(path, fmt) == "csv" else json.loads(text)
        result = await import_endpoints(hub, doc, actor="cli")
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


async def export_file(hub: Hub, out: str, fmt: str = "auto") -> int:
    """`bsscihub sensors export [--out FILE]`: endpoints.json (or CSV: `fmt` csv, or a .csv file
    name) to stdout ("-") or to a file readable by its owner only (it holds the network keys)."""
    data = await export_endpoints(hub)
    text = dump_csv(data) if file_format(out, fmt) == "csv" else json.dumps(data, indent=2) + "\n"
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
