"""The mioty attach cryptography against published known answers: the `att` signature (AES-CMAC)
and the network session key an over-the-air attach derives (AES-128-ECB)."""

from __future__ import annotations

import pytest

from bsscihub.protocols.bssci.crypto import attach_signature, session_key, verify_attach_signature

# Public vectors of an open service center's tests (BSSCI.md, "Over-the-air attach").
PSK = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
EUI = 0x70B3D56770111505
ATTACH_CNT = 0x123456
SIGN = bytes.fromhex("d7173412")
NONCE = bytes.fromhex("a1b2c3d4")
SESSION_KEY = bytes.fromhex("e77429f27a4d62080a8cef1447a42777")


def test_attach_signature_known_answer() -> None:
    assert attach_signature(PSK, EUI, ATTACH_CNT) == SIGN
    assert verify_attach_signature(PSK, EUI, ATTACH_CNT, SIGN)


@pytest.mark.parametrize(
    ("key", "eui", "cnt", "sign"),
    [
        (PSK, EUI, ATTACH_CNT + 1, SIGN),  # another counter
        (PSK, EUI + 1, ATTACH_CNT, SIGN),  # another end point
        (bytes(16), EUI, ATTACH_CNT, SIGN),  # another key
        (PSK, EUI, ATTACH_CNT, bytes.fromhex("d7173413")),
        (PSK, EUI, 1 << 32, SIGN),  # does not fit the IV
        (PSK[:15], EUI, ATTACH_CNT, SIGN),
    ],
)
def test_wrong_signatures_do_not_verify(key: bytes, eui: int, cnt: int, sign: bytes) -> None:
    assert not verify_attach_signature(key, eui, cnt, sign)


def test_session_key_known_answer() -> None:
    assert session_key(PSK, EUI, NONCE, SIGN) == SESSION_KEY
    # Never the pre-shared key, and every input counts.
    assert session_key(PSK, EUI, NONCE, SIGN) != PSK
    assert session_key(PSK, EUI, bytes.fromhex("a1b2c3d5"), SIGN) != SESSION_KEY
    assert session_key(PSK, EUI + 1, NONCE, SIGN) != SESSION_KEY


@pytest.mark.parametrize(
    ("key", "nonce", "sign"),
    [(PSK[:15], NONCE, SIGN), (PSK, NONCE[:3], SIGN), (PSK, NONCE, SIGN + b"\x00")],
)
def test_session_key_refuses_wrong_sizes(key: bytes, nonce: bytes, sign: bytes) -> None:
    with pytest.raises(ValueError, match="16-byte key"):
        session_key(key, EUI, nonce, sign)
