"""mioty Blueprints: the JSON type descriptions of end points (typeEui, components, uplink formats), parsed and applied.
`parse_blueprint` checks a document once; `Blueprint.decode` turns an uplink's bytes into named values with units."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import attrs

from bsscihub.contract import eui64
from bsscihub.protocols.bssci.expr import Expr, ExprError, compile_expr

__all__ = ["Blueprint", "BlueprintError", "DecodeError", "Field", "parse_blueprint"]

MAX_DOCUMENT = 256 * 1024  # bytes of JSON; real blueprints are a few kilobytes
_MAX_FIELDS = 256  # per uplink format
_MAX_FORMATS = 256
_TYPES = ("uint", "int", "bool", "float", "hex")
_NAME_MAX = 64


class BlueprintError(ValueError):
    """A blueprint document that cannot be used; the message names the place and the reason."""


class DecodeError(ValueError):
    """A payload that does not match its blueprint; the message is the reason published with it."""


@attrs.frozen
class Field:
    """One entry of an uplink format: `size` bits of `type`, converted by `func`, read only if `condition` holds."""

    name: str
    size: int
    type: str
    unit: str | None = None
    func: Expr | None = None
    condition: Expr | None = None
    little_endian: bool = False
    hidden: bool = False


@attrs.frozen
class Virtual:
    """A value computed from the decoded fields, not read from the payload."""

    name: str
    func: Expr
    unit: str | None = None


@attrs.frozen
class Format:
    id: int
    fields: tuple[Field, ...]
    virtual: tuple[Virtual, ...] = ()


@attrs.frozen
class Blueprint:
    """A parsed blueprint: its type EUI (16 lower-case hex), name, vendor and uplink formats by format id."""

    type_eui: str
    version: str
    name: str | None
    vendor: str | None
    formats: Mapping[int, Format] = attrs.field(repr=False)
    document: Mapping[str, Any] = attrs.field(repr=False, eq=False)

    def summary(self) -> dict[str, Any]:
        return {"typeEui": self.type_eui, "version": self.version, "name": self.name, "vendor": self.vendor,
                "formats": sorted(self.formats)}

    def decode(self, data: bytes, fmt: int) -> dict[str, dict[str, Any]]:
        """{name: {"value", "unit"?}} for the uplink format `fmt`; DecodeError with the reason when
        the payload does not match (too short, bytes left over, an expression that fails)."""
        form = self.formats.get(fmt)
        if form is None:
            raise DecodeError(f"blueprint {self.type_eui} has no uplink format {fmt}")
        reader = _Bits(data)
        values: dict[str, Any] = {}
        out: dict[str, dict[str, Any]] = {}
        for field in form.fields:
            if field.condition is not None and not _run(field.condition, values, None, field.name, "condition"):
                continue
            raw = reader.read(field)
            value = raw if field.func is None else _run(field.func, values, raw, field.name, "func")
            value = _tidy(value)
            values[field.name] = value
            if not field.hidden:
                out[field.name] = {"value": value, **({"unit": field.unit} if field.unit else {})}
        if reader.left:
            raise DecodeError(f"{reader.left} bits left over after the last field of format {fmt}")
        for virtual in form.virtual:
            value = _tidy(_run(virtual.func, values, None, virtual.name, "func"))
            values[virtual.name] = value
            out[virtual.name] = {"value": value, **({"unit": virtual.unit} if virtual.unit else {})}
        return out


def _tidy(value: Any) -> Any:
    # 2981/10 - 273.15 is 24.950000000000045 in binary floating point; nobody wants those digits.
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def _run(expr: Expr, values: Mapping[str, Any], raw: Any, name: str, what: str) -> Any:
    scope = dict(values)
    if raw is not None:
        if isinstance(raw, str):  # hex fields have no number to compute with
            raise DecodeError(f"field {name!r}: a hex field cannot have a {what}")
        scope[""] = raw
    try:
        return expr.evaluate(scope)
    except ExprError as e:
        raise DecodeError(f"field {name!r}: {what} {expr.source!r}: {e}") from None


class _Bits:
    """A cursor over the payload in bits, most significant bit first."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.total = len(data) * 8

    @property
    def left(self) -> int:
        return self.total - self.pos

    def read(self, field: Field) -> Any:
        size = field.size
        if size > self.left:
            raise DecodeError(f"payload ends at bit {self.pos}: field {field.name!r} needs {size} bits, "
                              f"{self.left} left")
        if field.little_endian and self.pos % 8:
            raise DecodeError(f"little-endian field {field.name!r} does not start on a byte boundary")
        start, self.pos = self.pos, self.pos + size
        if size % 8 == 0 and start % 8 == 0:
            chunk = self.data[start // 8 : (start + size) // 8]
            if field.little_endian:
                chunk = chunk[::-1]
            raw = int.from_bytes(chunk, "big")
        else:
            whole = int.from_bytes(self.data, "big")
            raw = (whole >> (self.total - start - size)) & ((1 << size) - 1)
            chunk = raw.to_bytes((size + 7) // 8, "big")
        if field.type == "uint":
            return raw
        if field.type == "int":
            return raw - (1 << size) if raw >> (size - 1) else raw
        if field.type == "bool":
            return raw != 0
        if field.type == "float":
            value = struct.unpack(">f" if size == 32 else ">d", chunk)[0]
            if not math.isfinite(value):
                raise DecodeError(f"field {field.name!r} is not a finite number")
            return value
        return chunk.hex()


def _text(value: Any, where: str, required: bool = False, limit: int = 200) -> str | None:
    if value is None or value == "":
        if required:
            raise BlueprintError(f"{where} is required")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BlueprintError(f"{where} must be a text of at most {limit} characters")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BlueprintError(f"{where} must be a whole number {low}..{high}")
    return value


def _expr(value: Any, where: str) -> Expr | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return compile_expr(value)
    except ExprError as e:
        raise BlueprintError(f"{where}: {e}") from None


def _field(entry: Any, components: Mapping[str, Any], where: str, earlier: set[str]) -> Field:
    if not isinstance(entry, dict):
        raise BlueprintError(f"{where} must be an object")
    name = _text(entry.get("name"), f"{where}.name", required=True, limit=_NAME_MAX)
    assert name is not None
    where = f"{where} ({name})"
    spec: dict[str, Any] = {}
    ref = entry.get("component")
    if ref is not None:
        if not isinstance(ref, str) or not isinstance(components.get(ref), dict):
            raise BlueprintError(f"{where}: component {ref!r} is not defined under \"component\"")
        spec.update(components[ref])
    spec.update({k: v for k, v in entry.items() if k not in ("name", "component")})
    kind = spec.get("type", "uint")
    if kind not in _TYPES:
        raise BlueprintError(f"{where}: type must be one of {', '.join(_TYPES)}, not {kind!r}")
    size = _int(spec.get("size"), f"{where}.size", 1, 64 if kind != "hex" else 8 * 250)
    if kind == "float" and size not in (32, 64):
        raise BlueprintError(f"{where}: a float has size 32 or 64")
    little = spec.get("littleEndian", False)
    if not isinstance(little, bool):
        raise BlueprintError(f"{where}.littleEndian must be true or false")
    if little and size % 8:
        raise BlueprintError(f"{where}: a little-endian field needs a size in whole bytes")
    func = _expr(spec.get("func"), f"{where}.func")
    condition = _expr(spec.get("condition"), f"{where}.condition")
    if kind == "hex" and func is not None:
        raise BlueprintError(f"{where}: a hex field has no func")
    for expr, what in ((func, "func"), (condition, "condition")):
        unknown = sorted(r for r in (expr.references if expr else ()) if r and r not in earlier)
        if unknown:
            raise BlueprintError(f"{where}.{what} refers to ${unknown[0]}, which is not an earlier field")
    if condition is not None and "" in condition.references:
        raise BlueprintError(f"{where}.condition cannot use $: the field is not read yet")
    hidden = spec.get("hidden", False)
    return Field(name, size, kind, _text(spec.get("unit"), f"{where}.unit", limit=32), func, condition,
                 little, bool(hidden))


def _format(entry: Any, components: Mapping[str, Any], default_little: bool, where: str) -> Format:
    if not isinstance(entry, dict):
        raise BlueprintError(f"{where} must be an object")
    fmt = _int(entry.get("id", entry.get("format", 0)), f"{where}.id", 0, 255)
    where = f"uplink format {fmt}"
    little = entry.get("littleEndian", default_little)
    payload = entry.get("payload")
    if not isinstance(payload, list) or not payload or len(payload) > _MAX_FIELDS:
        raise BlueprintError(f"{where}.payload must be a list of 1..{_MAX_FIELDS} fields")
    fields: list[Field] = []
    earlier: set[str] = set()
    for i, item in enumerate(payload):
        if isinstance(item, dict) and "littleEndian" not in item and little is True:
            ref_name = item.get("component")
            ref = components.get(ref_name) if isinstance(ref_name, str) else None
            if not (isinstance(ref, dict) and "littleEndian" in ref):
                item = {**item, "littleEndian": True}
        field = _field(item, components, f"{where}.payload[{i}]", earlier)
        if field.name in earlier:
            raise BlueprintError(f"{where}: field {field.name!r} appears twice")
        earlier.add(field.name)
        fields.append(field)
    virtual = []
    for i, item in enumerate(entry.get("virtual") or ()):
        here = f"{where}.virtual[{i}]"
        if not isinstance(item, dict):
            raise BlueprintError(f"{here} must be an object")
        name = _text(item.get("name"), f"{here}.name", required=True, limit=_NAME_MAX)
        func = _expr(item.get("func"), f"{here}.func")
        if name is None or func is None:
            raise BlueprintError(f"{here} needs a name and a func")
        unknown = sorted(r for r in func.references if r not in earlier)
        if unknown:
            raise BlueprintError(f"{here}.func refers to ${unknown[0]}, which is not a field")
        earlier.add(name)
        virtual.append(Virtual(name, func, _text(item.get("unit"), f"{here}.unit", limit=32)))
    return Format(fmt, tuple(fields), tuple(virtual))


def parse_blueprint(source: str | bytes | Mapping[str, Any]) -> Blueprint:
    """A checked Blueprint from its JSON text (or the decoded object); BlueprintError says what is wrong."""
    if isinstance(source, (str, bytes)):
        if len(source) > MAX_DOCUMENT:
            raise BlueprintError(f"a blueprint is at most {MAX_DOCUMENT // 1024} KiB")
        try:
            doc = json.loads(source)
        except (ValueError, RecursionError) as e:
            raise BlueprintError(f"not JSON: {e}") from None
    else:
        doc = source
    if not isinstance(doc, dict):
        raise BlueprintError("a blueprint is a JSON object")
    version = _text(doc.get("version"), "version", required=True, limit=16)
    type_eui = doc.get("typeEui")
    if not isinstance(type_eui, str) or eui64(type_eui) is None:
        raise BlueprintError("typeEui must be 16 hex digits")
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise BlueprintError("meta must be an object")
    components = doc.get("component") or doc.get("components") or {}
    if not isinstance(components, dict):
        raise BlueprintError("component must be an object of named components")
    little = doc.get("littleEndian", False)
    uplinks = doc.get("uplink")
    if not isinstance(uplinks, list) or not uplinks or len(uplinks) > _MAX_FORMATS:
        raise BlueprintError(f"uplink must be a list of 1..{_MAX_FORMATS} formats")
    formats: dict[int, Format] = {}
    for i, entry in enumerate(uplinks):
        form = _format(entry, components, little is True, f"uplink[{i}]")
        if form.id in formats:
            raise BlueprintError(f"uplink format {form.id} is defined twice")
        formats[form.id] = form
    assert version is not None
    return Blueprint(type_eui.lower(), version, _text(meta.get("name"), "meta.name"),
                     _text(meta.get("vendor"), "meta.vendor"), formats, doc)
