"""The wireless M-Bus frame: link layer (EN 13757-4), extended link layer, OMS authentication and
fragmentation layer, transport layer and its security modes 5 and 7 (OMS volume 2), then the records.

The parser never raises for what a meter sends: a `Telegram` carries what could be read and, in
`error`, why the rest could not (unknown CI, no key, wrong key, truncated frame, ...).
"""

from __future__ import annotations

import hmac
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

from bsscihub.protocols.wmbus.records import Record, RecordsError, parse_records

__all__ = [
    "DEVICE_TYPES",
    "Telegram",
    "WMBusError",
    "crc16",
    "manufacturer_code",
    "manufacturer_id",
    "parse_telegram",
]

# EN 13757-7 table of device types (the "medium" of the secondary address), short names.
DEVICE_TYPES = {
    0x00: "other", 0x01: "oil", 0x02: "electricity", 0x03: "gas", 0x04: "heat", 0x05: "steam",
    0x06: "warm water", 0x07: "water", 0x08: "heat cost allocator", 0x09: "compressed air",
    0x0A: "cooling (outlet)", 0x0B: "cooling (inlet)", 0x0C: "heat (inlet)", 0x0D: "heat and cooling",
    0x0E: "bus/system component", 0x0F: "unknown", 0x15: "hot water", 0x16: "cold water",
    0x17: "hot and cold water", 0x18: "pressure", 0x19: "A/D converter", 0x1A: "smoke detector",
    0x1B: "room sensor", 0x1C: "gas detector", 0x20: "breaker", 0x21: "valve", 0x25: "customer unit",
    0x28: "waste water", 0x29: "garbage", 0x31: "communication controller", 0x32: "unidirectional repeater",
    0x33: "bidirectional repeater", 0x36: "radio converter (system side)", 0x37: "radio converter (meter side)",
}  # fmt: skip
_FUNCTIONS = {0x44: "SND_NR", 0x46: "SND_IR", 0x47: "ACC_NR", 0x48: "ACC_DMD", 0x08: "RSP_UD", 0x06: "CNF_IR"}
_ELL_SIZES = {0x8C: 2, 0x8D: 8, 0x8E: 10, 0x8F: 16}  # bytes after the CI
_STATUS_BITS = ((0x04, "power low"), (0x08, "permanent error"), (0x10, "temporary error"))
_APPLICATION_STATUS = {1: "application busy", 2: "application error", 3: "abnormal condition"}
_MAX_FRAME = 512  # the longest wM-Bus frame is 256 bytes plus its CRCs


class WMBusError(ValueError):
    """A frame too broken to name its meter (shorter than the link layer, bad length or CRC)."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x3D65) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """The CRC of EN 13757-4 (polynomial 0x3D65, initial 0, complemented), a byte at a time."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc ^ 0xFFFF


def manufacturer_code(field: bytes) -> str:
    """The three letters of a 2-byte M-field (least significant byte first), e.g. a5 11 -> "DME"."""
    value = int.from_bytes(field[:2], "little")
    return "".join(chr(((value >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def manufacturer_id(code: str) -> bytes:
    """The 2-byte M-field of a three-letter manufacturer code (the inverse of manufacturer_code)."""
    letters = code.upper()
    if len(letters) != 3 or not all("A" <= c <= "Z" for c in letters):
        raise ValueError(f"a manufacturer code is three letters A-Z, got {code!r}")
    value = sum((ord(c) - 64) << shift for c, shift in zip(letters, (10, 5, 0), strict=True))
    return value.to_bytes(2, "little")


def _strip_crcs(frame: bytes) -> tuple[bytes, str]:
    """The frame without its CRCs, and which format it came in: "A", "B" or "none" (a receiver
    that removed them already, as base stations do). Format B is recognised by a valid CRC at the
    end of a frame whose length matches its L-field; a frame without CRCs can match by chance (1 in
    65,536), which the records or the decryption then reveal as an error."""
    length = frame[0]
    size = len(frame)
    if size == length + 1:
        if size <= 128:
            if size >= 12 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "big"):
                return frame[:-2], "B"
        elif crc16(frame[:126]) == int.from_bytes(frame[126:128], "big") and crc16(frame[128:-2]) == int.from_bytes(
            frame[-2:], "big"
        ):
            return frame[:126] + frame[128:-2], "B"
        return frame, "none"
    blocks = [10, *([16] * ((length - 9 + 15) // 16))]
    if length > 9 and (length - 9) % 16:
        blocks[-1] = (length - 9) % 16
    if size != length + 1 + 2 * len(blocks):
        raise WMBusError(f"the frame has {size} bytes; its L-field {length} calls for {length + 1} without CRCs,"
                         f" or {length + 1 + 2 * len(blocks)} with (format A)")
    out, pos = bytearray(), 0
    for number, block in enumerate(blocks, 1):
        data, check = frame[pos : pos + block], frame[pos + block : pos + block + 2]
        if crc16(data) != int.from_bytes(check, "big"):
            raise WMBusError(f"CRC error in block {number} (format A)")
        out += data
        pos += block + 2
    return bytes(out), "A"


def _aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _cmac(key: bytes, data: bytes) -> bytes:
    mac = CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def kdf_a(key: bytes, constant: int, counter: bytes, meter_id: bytes) -> bytes:
    """OMS volume 2 KDF-A: AES-CMAC(key, D | message counter | meter ID | 0x07 * 7), where D is 0x00
    for the meter's encryption key and 0x01 for its MAC key; counter and ID as in the frame (LSB first)."""
    return _cmac(key, bytes([constant]) + counter + meter_id + b"\x07" * 7)


@attrs.frozen
class Telegram:
    """One wM-Bus telegram, decoded as far as it goes. `meter_id` is the 8-digit identification
    number (BCD, as printed on the meter); `records` is empty and `error` says why whenever the
    application data could not be read."""

    frame: bytes
    c_field: int
    manufacturer: str
    meter_id: str
    version: int
    device_type: int
    crc: str  # "A", "B" or "none"
    ci: int | None = None
    ell: dict[str, Any] | None = None
    afl: dict[str, Any] | None = None
    access_number: int | None = None
    status: int | None = None
    config: int | None = None
    security_mode: int = 0
    encrypted: bool = False
    decrypted: bool = False
    records: tuple[Record, ...] = ()
    manufacturer_data: bytes = b""
    error: str | None = None

    @property
    def key(self) -> str:
        """The meter's identity in the hub: manufacturer and ID, e.g. "dme-81795246"."""
        return f"{self.manufacturer.lower()}-{self.meter_id}"

    @property
    def medium(self) -> str:
        return DEVICE_TYPES.get(self.device_type, f"device type 0x{self.device_type:02x}")

    @property
    def alarms(self) -> list[str]:
        """The transport layer's status bits, in words (empty when all is well)."""
        if self.status is None:
            return []
        found = [text for bit, text in _STATUS_BITS if self.status & bit]
        if self.status & 3:
            found.insert(0, _APPLICATION_STATUS[self.status & 3])
        return found

    def values(self) -> dict[str, Any]:
        """field -> value of every record (for charts and quick looks)."""
        return {r.field: r.value for r in self.records}

    def to_json(self) -> dict[str, Any]:
        return {
            "meter": self.key, "manufacturer": self.manufacturer, "meterId": self.meter_id, "version": self.version,
            "deviceType": self.device_type, "medium": self.medium,
            "function": _FUNCTIONS.get(self.c_field, f"0x{self.c_field:02x}"), "ci": self.ci, "ell": self.ell,
            "afl": self.afl, "accessNumber": self.access_number, "status": self.status, "alarms": self.alarms,
            "securityMode": self.security_mode, "encrypted": self.encrypted, "decrypted": self.decrypted,
            "records": [r.to_json() for r in self.records], "values": self.values(),
            "manufacturerData": self.manufacturer_data.hex(), "frame": self.frame.hex(), "error": self.error,
        }  # fmt: skip


def parse_telegram(frame: bytes, key: bytes | None = None) -> Telegram:
    """Decode a wM-Bus frame (with format A or B CRCs, or without CRCs), decrypting with `key`
    (the meter's 16-byte AES key) when its transport layer is encrypted. Raises WMBusError only when
    the frame does not even hold a link layer; anything later is reported in `Telegram.error`."""
    if len(frame) < 11:
        raise WMBusError(f"a wM-Bus frame has at least 11 bytes (L, C, M, A, CI), got {len(frame)}")
    if len(frame) > _MAX_FRAME:
        raise WMBusError(f"a wM-Bus frame has at most {_MAX_FRAME} bytes, got {len(frame)}")
    data, crc = _strip_crcs(frame)
    link_id = data[4:8]
    base: dict[str, Any] = {
        "frame": frame, "c_field": data[1], "manufacturer": manufacturer_code(data[2:4]),
        "meter_id": link_id[::-1].hex(), "version": data[8], "device_type": data[9], "crc": crc,
    }  # fmt: skip
    found: dict[str, Any] = {}
    try:
        _parse_layers(data, key, found)
    except _Stop as stop:
        found["error"] = stop.reason
    except IndexError:
        found["error"] = "the frame ends inside a header (truncated)"
    return Telegram(**base, **found)


class _Stop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_layers(data: bytes, key: bytes | None, out: dict[str, Any]) -> None:
    """The layers after the link header, into `out` (Telegram fields); raises _Stop with a reason."""
    pos = 10
    address = data[2:10]  # M-field and A-field: the meter's, unless a long TPL header names another
    ci = data[pos]
    out["ci"] = ci
    if ci in _ELL_SIZES:
        body = data[pos + 1 : pos + 1 + _ELL_SIZES[ci]]
        if len(body) < _ELL_SIZES[ci]:
            raise IndexError
        ell: dict[str, Any] = {"ci": ci, "cc": body[0], "acc": body[1]}
        if ci in (0x8E, 0x8F):
            ell["m2"], ell["a2"] = manufacturer_code(body[2:4]), body[4:10].hex()
        if ci in (0x8D, 0x8F):
            sn = int.from_bytes(body[-6:-2], "little")
            ell["sessionNumber"] = sn
            out["ell"] = ell
            if sn >> 29:
                raise _Stop("the extended link layer is encrypted (AES-128-CTR), which is not supported")
        out["ell"] = ell
        pos += 1 + _ELL_SIZES[ci]
        ci = data[pos]
        out["ci"] = ci
    counter = b""
    authenticated = b""  # what the AFL's MAC covers before the transport layer: MCL, MCR, ML
    mac = b""
    if ci == 0x90:
        size = data[pos + 1]
        body = data[pos + 2 : pos + 2 + size]
        if len(body) < size or size < 2:
            raise IndexError
        fcl = int.from_bytes(body[:2], "little")
        afl: dict[str, Any] = {"fcl": fcl, "fragment": fcl & 0xFF}
        out["afl"] = afl
        i = 2
        if fcl & 0x2000:
            afl["mcl"] = body[i]
            authenticated += body[i : i + 1]
            i += 1
        if fcl & 0x0200:
            afl["keyInfo"] = int.from_bytes(body[i : i + 2], "little")
            i += 2
        if fcl & 0x0800:
            counter = body[i : i + 4]
            authenticated += counter
            afl["messageCounter"] = int.from_bytes(counter, "little")
            i += 4
        end = size - 2 if fcl & 0x1000 else size
        if fcl & 0x0400:
            mac = body[i:end]
            afl["mac"] = mac.hex()
        authenticated += body[end:size]  # the message length, when present
        if fcl & 0x4000 or afl["fragment"] > 1:
            raise _Stop("a fragmented message (AFL more-fragments), which is not supported")
        pos += 2 + size
        ci = data[pos]
        out["ci"] = ci
    transport = data[pos:]
    if ci == 0x7A:
        if pos + 5 > len(data):
            raise IndexError
        acc, status, config = data[pos + 1], data[pos + 2], int.from_bytes(data[pos + 3 : pos + 5], "little")
        pos += 5
    elif ci == 0x72:
        header = data[pos + 1 : pos + 13]
        if len(header) < 12:
            raise IndexError
        address = header[4:6] + header[0:4] + header[6:8]
        acc, status, config = header[8], header[9], int.from_bytes(header[10:12], "little")
        pos += 13
    elif ci == 0x78:
        acc, status, config = None, None, 0
        pos += 1
    else:
        raise _Stop(f"CI field 0x{ci:02x} is not a transport layer this hub reads (0x72, 0x7a, 0x78)")
    out["access_number"], out["status"], out["config"] = acc, status, config
    mode = (config >> 8) & 0x1F
    out["security_mode"] = mode
    payload = data[pos:]
    if mode:
        out["encrypted"] = True
        if mode == 7 and key is not None and mac:
            # OMS: AFL.MAC = CMAC(Kmac, MCL | MCR | [ML] | the transport layer from its CI to the end)
            mac_key = kdf_a(key, 0x01, counter, address[2:6])
            verified = hmac.compare_digest(_cmac(mac_key, authenticated + transport)[: len(mac)], mac)
            out["afl"]["macVerified"] = verified
            if not verified:
                raise _Stop("the authentication layer's MAC does not verify: wrong key, or the frame was altered")
        payload = _decrypt(mode, config, payload, key, address, acc or 0, counter)
        out["decrypted"] = True
    try:
        records, vendor = parse_records(payload)
    except RecordsError as e:
        out["records"], out["manufacturer_data"] = tuple(e.records), e.vendor
        raise _Stop(str(e)) from None
    out["records"], out["manufacturer_data"] = tuple(records), vendor


def _decrypt(mode: int, config: int, payload: bytes, key: bytes | None, address: bytes, acc: int,
             counter: bytes) -> bytes:
    if mode not in (5, 7):
        raise _Stop(f"security mode {mode} is not supported (5 and 7 are)")
    if key is None:
        raise _Stop(f"encrypted (security mode {mode}) and no key is set for this meter")
    if mode == 7:
        if not payload:
            raise IndexError
        cfe, payload = payload[0], payload[1:]
        if (cfe >> 4) & 3 != 1:
            raise _Stop(f"security mode 7 with key derivation {(cfe >> 4) & 3}, which is not supported (KDF-A is)")
        if len(counter) != 4:
            raise _Stop("security mode 7 needs the message counter of the authentication layer (AFL), missing")
        key, iv = kdf_a(key, 0x00, counter, address[2:6]), bytes(16)
    else:
        iv = address + bytes([acc]) * 8
    size = ((config >> 4) & 0x0F) * 16
    if size == 0 or size > len(payload):
        raise _Stop(f"the configuration field announces {size // 16} encrypted blocks; the frame holds"
                    f" {len(payload) // 16}")
    plain = _aes_cbc_decrypt(key, iv, payload[:size])
    if plain[:2] != b"\x2f\x2f":
        raise _Stop(f"decryption (security mode {mode}) did not give the 2F2F check bytes: wrong key?")
    return plain[2:] + payload[size:]
