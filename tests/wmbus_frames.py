"""Builds wireless M-Bus / OMS frames for the tests (EN 13757-4/-3, OMS volume 2), encrypted or not.

Written from the standards, independently of the hub's parser, so that the tests check one against the other.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

# A water meter's readings, record by record (DIF VIF data), with what EN 13757-3 says they mean.
WATER_RECORDS = bytes.fromhex(
    "0c13" "78563412"  # volume, 8-digit BCD, 10^-3 m3: 12345.678 m3
    "4c13" "11223344"  # the same at storage 1 (e.g. the due date): 44332.211 m3
    "426c" "9f2c"  # date at storage 1, type G: 2020-12-31
    "046d" "2b0a9f2c"  # date and time, type F: 2020-12-31T10:43
    "0b3b" "563412"  # volume flow, 6-digit BCD, 10^-3 m3/h: 123.456 m3/h
    "025a" "1201"  # flow temperature, 16-bit, 0.1 degC: 27.4
    "025f" "ffff"  # return temperature, 16-bit signed, 1 degC: -1
    "0406" "a0860100"  # energy, 32-bit, 10^3 Wh: 100000 kWh, i.e. 100000000 Wh
    "01fd17" "05"  # error flags: 5
    "8401" "13" "6e000000"  # volume at storage 2 (DIFE), 32-bit: 0.11 m3
)
WATER_VALUES = {
    "volume": 12345.678,
    "volume_s1": 44332.211,
    "time_point_date_s1": "2020-12-31",
    "time_point_date_and_time": "2020-12-31T10:43:00",
    "volume_flow": 123.456,
    "flow_temperature": 27.4,
    "return_temperature": -1,
    "energy": 100000000,
    "error_flags": 5,
    "volume_s2": 0.11,
}
KEY = bytes.fromhex("0102030405060708090a0b0c0d0e0f10")


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        for bit in range(8):
            top = (crc >> 15) ^ ((byte >> (7 - bit)) & 1)
            crc = ((crc << 1) & 0xFFFF) ^ (0x3D65 if top else 0)
    return crc ^ 0xFFFF


def m_field(code: str) -> bytes:
    value = ((ord(code[0]) - 64) << 10) | ((ord(code[1]) - 64) << 5) | (ord(code[2]) - 64)
    return value.to_bytes(2, "little")


def link_header(body_size: int, *, c: int = 0x44, m: str = "DME", meter_id: str = "12345678", version: int = 1,
                device: int = 0x07) -> bytes:
    """L C M A for a frame whose bytes after the A-field number `body_size` (no CRCs)."""
    return bytes([9 + body_size, c]) + m_field(m) + bytes.fromhex(meter_id)[::-1] + bytes([version, device])


def _encrypt(key: bytes, iv: bytes, plain: bytes) -> bytes:
    plain = plain + b"\x2f" * (-len(plain) % 16)  # filler to a whole block
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(plain) + enc.finalize()


def mode5_frame(records: bytes = WATER_RECORDS, *, key: bytes = KEY, acc: int = 0x2A, status: int = 0,
                meter_id: str = "12345678", m: str = "DME", device: int = 0x07, version: int = 1) -> bytes:
    """SND_NR with a short TPL header (CI 0x7A), security mode 5: AES-128-CBC, IV = M | A | ACC x 8."""
    cipher = _encrypt(key, m_field(m) + bytes.fromhex(meter_id)[::-1] + bytes([version, device]) + bytes([acc]) * 8,
                      b"\x2f\x2f" + records)
    config = (5 << 8) | ((len(cipher) // 16) << 4)
    tpl = bytes([0x7A, acc, status]) + config.to_bytes(2, "little")
    body = tpl + cipher
    return link_header(len(body), m=m, meter_id=meter_id, device=device, version=version) + body


def mode7_frame(records: bytes = WATER_RECORDS, *, key: bytes = KEY, counter: int = 0x113E35, acc: int = 0x1B,
                meter_id: str = "12345678", m: str = "DME", device: int = 0x07) -> bytes:
    """ELL (CI 0x8C), AFL (CI 0x90) with message counter and AES-CMAC, short TPL, security mode 7:
    AES-128-CBC with a zero IV and the key derived by KDF-A from the message counter and meter ID."""
    ident = bytes.fromhex(meter_id)[::-1]
    ctr = counter.to_bytes(4, "little")

    def kdf(d: int) -> bytes:
        mac = CMAC(algorithms.AES(key))
        mac.update(bytes([d]) + ctr + ident + b"\x07" * 7)
        return mac.finalize()

    cipher = _encrypt(kdf(0), bytes(16), b"\x2f\x2f" + records)
    config = (7 << 8) | ((len(cipher) // 16) << 4)
    tpl = bytes([0x7A, acc, 0x00]) + config.to_bytes(2, "little") + b"\x10" + cipher
    mcl = 0x05  # AES-CMAC-128 truncated to 8 bytes
    mac = CMAC(algorithms.AES(kdf(1)))
    mac.update(bytes([mcl]) + ctr + tpl)
    afl_body = (0x2C00).to_bytes(2, "little") + bytes([mcl]) + ctr + mac.finalize()[:8]
    body = bytes([0x8C, 0x00, acc]) + bytes([0x90, len(afl_body)]) + afl_body + tpl
    return link_header(len(body), m=m, meter_id=meter_id, device=device) + body


def plain_frame(records: bytes = WATER_RECORDS, **kw: object) -> bytes:
    """SND_NR with a short TPL header and no encryption."""
    body = bytes([0x7A, 0x01, 0x00, 0x00, 0x00]) + records
    return link_header(len(body), **kw) + body  # type: ignore[arg-type]


def with_format_a(frame: bytes) -> bytes:
    """The frame as it goes over the air in format A: a CRC after the first 10 bytes, then every 16."""
    out, blocks = bytearray(), [frame[:10]] + [frame[i : i + 16] for i in range(10, len(frame), 16)]
    for block in blocks:
        out += block + crc16(block).to_bytes(2, "big")
    return bytes(out)


def with_format_b(frame: bytes) -> bytes:
    """Format B (frames up to 126 bytes): L counts the one CRC at the end, which covers all before it."""
    framed = bytes([frame[0] + 2]) + frame[1:]
    return framed + crc16(framed).to_bytes(2, "big")
