"""Wireless M-Bus / OMS telegrams (EN 13757-4/-3, OMS volume 2): frame, decryption, readings.
`parse_telegram(frame, key)` gives a `Telegram` whatever the bytes hold; `error` names what could not be read."""

from bsscihub.protocols.wmbus.frame import (
    DEVICE_TYPES,
    Telegram,
    WMBusError,
    crc16,
    manufacturer_code,
    manufacturer_id,
    parse_telegram,
)
from bsscihub.protocols.wmbus.records import Record, parse_records

__all__ = [
    "DEVICE_TYPES",
    "Record",
    "Telegram",
    "WMBusError",
    "crc16",
    "manufacturer_code",
    "manufacturer_id",
    "parse_records",
    "parse_telegram",
]
