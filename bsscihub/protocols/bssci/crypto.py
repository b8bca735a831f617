"""mioty end-point cryptography the service center needs: the over-the-air attach signature check
and the network session key an attach derives from the end point's pre-shared key."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

__all__ = ["attach_signature", "session_key", "verify_attach_signature"]

_U32 = 1 << 32
_U64 = 1 << 64


def attach_signature(key: bytes, ep_eui: int, attach_cnt: int) -> bytes:
    """The 4-byte `sign` an end point puts in its over-the-air attach request (`att`).

    The first 4 bytes of AES-CMAC(key, IV), IV = EUI64 (8 bytes, big-endian) | 0xFF | 0x00 |
    attachCnt (4 bytes, big-endian) | 0xFF | 0xFF (mioty radio specification, section 3.7.1.3;
    the 16-byte IV an open service center moved to after real end points failed with 15 bytes).
    """
    iv = ep_eui.to_bytes(8, "big") + b"\xff\x00" + attach_cnt.to_bytes(4, "big") + b"\xff\xff"
    mac = CMAC(algorithms.AES(key))
    mac.update(iv)
    return mac.finalize()[:4]


def verify_attach_signature(key: bytes, ep_eui: int, attach_cnt: int, sign: bytes) -> bool:
    """Whether `sign` is attach_signature(key, ep_eui, attach_cnt), compared in constant time."""
    if not 0 <= attach_cnt < _U32 or not 0 <= ep_eui < _U64 or len(key) != 16:
        return False
    return hmac.compare_digest(attach_signature(key, ep_eui, attach_cnt), sign)


def session_key(key: bytes, ep_eui: int, nonce: bytes, sign: bytes) -> bytes:
    """The network session key of an over-the-air attach: AES-128-ECB with the pre-shared key of the
    one block EUI64 (8 bytes, big-endian) | nonce (4 bytes) | sign (4 bytes). It goes in `attRsp`
    and in every later `attPrp` of that end point; the pre-shared key itself never does."""
    if len(key) != 16 or len(nonce) != 4 or len(sign) != 4 or not 0 <= ep_eui < _U64:
        raise ValueError("session_key needs a 16-byte key, a 64-bit EUI, a 4-byte nonce and a 4-byte sign")
    # One block, no chaining: ECB is the specified construction here, not a mode choice.
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(ep_eui.to_bytes(8, "big") + nonce + sign) + encryptor.finalize()
