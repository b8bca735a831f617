"""The application layer's data records (EN 13757-3 DIF/DIFE/VIF/VIFE) as named values with units.
The record tables come from pymbusparser (the Rust m-bus-parser); dates are decoded here (see `_date`)."""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import pymbusparser

__all__ = ["Record", "RecordsError", "parse_records"]

_FUNCTIONS = {
    "Instantaneous value": "instantaneous",
    "Maximum value": "maximum",
    "Minimum value": "minimum",
    "Value during error state": "error",
}
_NOT_A_NAME = re.compile(r"[^a-z0-9]+")
_OFFSET = re.compile(r"at byte offset (\d+)")


class RecordsError(ValueError):
    """The application data holds no valid record list; `records` and `vendor` are those read before
    the record that could not be (a meter's other readings are not lost to one record the tables lack)."""

    def __init__(self, message: str, records: list[Record] | None = None, vendor: bytes = b"") -> None:
        super().__init__(message)
        self.records = records or []
        self.vendor = vendor


@attrs.frozen
class Record:
    """One data record: `field` is unique within its telegram (quantity, then storage/tariff/subunit
    when not 0), `value` a number, an ISO 8601 date/time text, or lower-case hex for other data."""

    field: str
    quantity: str
    value: int | float | str | None
    unit: str | None
    storage: int
    tariff: int
    subunit: int
    function: str
    coding: str
    header: str  # DIF..VIFE, hex

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.field, "quantity": self.quantity, "value": self.value, "unit": self.unit,
            "storage": self.storage, "tariff": self.tariff, "subunit": self.subunit, "function": self.function,
            "coding": self.coding, "header": self.header,
        }  # fmt: skip


def _number(text: Any) -> int | float | None:
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return int(value) if value == value.to_integral_value() else float(value)


@functools.lru_cache(maxsize=256)
def _real_scale(header: bytes) -> Decimal | None:
    """The VIF's power of ten for a record of 32-bit real data, read from the library's own table by
    parsing the same header as a 32-bit integer of value 1: pymbusparser 0.5.3 scales integer and BCD
    data but hands real data back unscaled (05 13 0000803f gives 1.0 m3 instead of 0.001 m3)."""
    probe = bytes([(header[0] & 0xF0) | 0x04]) + header[1:] + b"\x01\x00\x00\x00"
    try:
        [entry] = pymbusparser.parse_records(probe.hex())
        return Decimal(str(entry["value"]["value"]))
    except (pymbusparser.MbusParserError, KeyError, TypeError, ValueError, InvalidOperation):
        return None


def _date(coding: str, data: bytes) -> str | None:
    """Types G (date) and F (date and time) of EN 13757-3 annex A, as ISO 8601; None when a field is
    out of range or the invalid bit is set. Decoded here: pymbusparser 0.5.3 reads day 31 of type F
    as "every day" and gives month names instead of numbers."""
    if coding.startswith("Date (type G)") and len(data) == 2:
        day, month = data[0] & 0x1F, data[1] & 0x0F
        year = ((data[0] & 0xE0) >> 5) | ((data[1] & 0xF0) >> 1)
        time = ""
    elif coding.startswith("Date and time (type F)") and len(data) == 4:
        if data[0] & 0x80:  # IV: the meter says the time is invalid
            return None
        minute, hour = data[0] & 0x3F, data[1] & 0x1F
        day, month = data[2] & 0x1F, data[3] & 0x0F
        year = ((data[2] & 0xE0) >> 5) | ((data[3] & 0xF0) >> 1)
        if minute > 59 or hour > 23:
            return None
        time = f"T{hour:02d}:{minute:02d}:00"
    else:
        return None
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return None
    # Two-digit years: 0..80 are 2000..2080, the rest 1981..1999 (the usual meter convention).
    return f"{2000 + year if year <= 80 else 1900 + year:04d}-{month:02d}-{day:02d}{time}"


def _field_name(quantity: str, storage: int, tariff: int, subunit: int, function: str) -> str:
    name = _NOT_A_NAME.sub("_", quantity.lower()).strip("_") or "value"
    if function not in ("instantaneous", ""):
        name += f"_{function}"
    for letter, number in (("s", storage), ("t", tariff), ("u", subunit)):
        if number:
            name += f"_{letter}{number}"
    return name


def parse_records(data: bytes) -> tuple[list[Record], bytes]:
    """The records of an application data block (filler 0x2F skipped), and the manufacturer-specific
    data after a 0x0F/0x1F marker (empty if none). Raises RecordsError naming the problem, with the
    records before it."""
    try:
        raw = pymbusparser.parse_records(data.hex())
    except pymbusparser.MbusParserError as e:
        found = _OFFSET.search(str(e))
        offset = int(found[1]) if found else 0
        records, vendor = parse_records(data[:offset]) if 0 < offset < len(data) else ([], b"")
        raise RecordsError(f"the data records do not parse: {e}", records, vendor) from None
    return _normalize(raw)


def _normalize(raw: list[Any]) -> tuple[list[Record], bytes]:
    records: list[Record] = []
    vendor = b""
    seen: dict[str, int] = {}
    for entry in raw:
        value = entry.get("value") or {}
        kind = value.get("kind")
        coding = str(entry.get("data_coding") or "")
        payload = bytes.fromhex(str(entry.get("data_hex") or ""))
        if kind == "manufacturer_specific" and not entry.get("quantities"):
            vendor += payload
            continue
        function = _FUNCTIONS.get(str(entry.get("function")), str(entry.get("function") or "").lower())
        quantity = ", ".join(entry.get("quantities") or ()) or "Unknown"
        result: int | float | str | None
        if kind in ("decimal", "float", "integer"):
            result = _number(value.get("value"))
            if coding == "32-bit real" and result is not None:
                scale = _real_scale(bytes.fromhex(str(entry.get("header_hex") or "")))
                result = None if scale is None else _number(Decimal(str(result)) * scale)
            elif isinstance(result, int) and result < 0 and "Error flags" in (entry.get("quantities") or ()):
                result += 1 << (8 * len(payload))  # a bit field (type D), not a signed number
        elif kind in ("date", "datetime"):
            result = _date(coding, payload)
        elif isinstance(value.get("value"), str):
            result = value["value"]
        else:
            result = payload.hex()
        storage, tariff, subunit = (int(entry.get(k) or 0) for k in ("storage_number", "tariff", "subunit"))
        name = _field_name(quantity, storage, tariff, subunit, function)
        count = seen[name] = seen.get(name, 0) + 1
        if count > 1:
            name = f"{name}_{count}"
        records.append(Record(
            field=name, quantity=quantity, value=result, unit=entry.get("unit"), storage=storage, tariff=tariff,
            subunit=subunit, function=function, coding=coding,
            header=str(entry.get("header_hex") or "").replace(" ", "").lower(),
        ))  # fmt: skip
    return records, vendor
