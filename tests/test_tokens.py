"""The one scheme of prefixed secrets: minting, reading back (new and earlier forms) and checking.

Each owner keeps the hash it always stored, so keys issued before still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from bsscihub import tokens
from bsscihub.protocols.devices.service import DEVICE_KEYS, ORG_KEYS, hash_device_key
from bsscihub.protocols.gate.tokens import PROVISIONING, Keyring, public_prefix
from bsscihub.web import auth


def test_minted_token_has_the_shape_and_its_hash() -> None:
    scheme = tokens.Scheme("xk", prefix_hex=12)
    token, stored = scheme.mint(lambda t: "h:" + t.secret[::-1])
    assert re.fullmatch(r"xk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token.text)
    assert token.public == "xk_" + token.prefix and token.secret not in token.public
    assert stored == "h:" + token.secret[::-1]
    assert token.secret not in repr(token), "the secret never shows in a repr (logs, tracebacks)"
    assert scheme.parse(token.text) == token
    assert scheme.public(token.text) == token.public
    other = scheme.mint(lambda t: "")[0]
    assert other.prefix != token.prefix and other.secret != token.secret


def test_parse_refuses_what_is_not_one() -> None:
    scheme = tokens.Scheme("xk")
    good = scheme.mint(lambda t: "")[0].text
    for bad in (None, 42, "", "xk", "xk_", "yk" + good[2:], good.replace("_", "-", 1), "xk_0123456_" + "a" * 43,
                "xk_0123456G_" + "a" * 43, "xk_01234567_", "xk_01234567_" + "a" * 101, "xk_01234567_a b",
                "xk_" + "a" * 43):
        assert scheme.parse(bad) is None, bad
        assert scheme.public(bad) == ""
    assert scheme.parse("xk_01234567_" + "a" * 100) is not None  # the longest secret still read


def test_verify_is_the_stored_hash_or_nothing() -> None:
    scheme = tokens.Scheme("xk")
    digest = lambda t: tokens.sha256_hex(t.secret)  # noqa: E731
    token, stored = scheme.mint(digest)
    assert scheme.verify(token.text, stored, digest) == token
    assert scheme.verify(token.text, None, digest) is None, "no stored row never matches"
    assert scheme.verify(token.text[:-1] + ("A" if token.text[-1] != "A" else "B"), stored, digest) is None
    assert scheme.verify("nonsense", stored, digest) is None
    assert tokens.same("abc", "abc") and not tokens.same("abc", "abd") and not tokens.same(None, "")


def test_api_tokens_issued_before_still_verify() -> None:
    # As tokens were minted before the scheme: bsh_<token_hex(6)>_<token_urlsafe(32)>, SHA-256 of the secret.
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    text, stored = f"bsh_{prefix}_{secret}", "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
    token = auth.TOKENS.verify(text, stored, auth.hash_secret)
    assert token is not None and token.prefix == prefix


def test_gate_keys_issued_before_still_verify() -> None:
    # gpk_<token_hex(4)>_<token_urlsafe(32)>, HMAC of "kind\0text" under the gate key.
    keyring = Keyring(b"k" * 32)
    text = f"gpk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    stored = hmac.new(b"k" * 32, f"gpk\0{text}".encode(), hashlib.sha256).hexdigest()
    assert keyring.hash(PROVISIONING, text) == stored
    assert public_prefix(text) == text[:12]
    minted = keyring.mint(PROVISIONING)
    assert minted.stored == keyring.hash(PROVISIONING, minted.token.text)


def test_device_keys_of_both_forms_verify() -> None:
    # Before: bdk_<token_urlsafe(32)>, prefix = its first 8 characters, HMAC keyed by the device id.
    old_secret = secrets.token_urlsafe(32)
    old, old_stored = f"bdk_{old_secret}", hash_device_key("esp-1", old_secret)
    digest = lambda t: hash_device_key("esp-1", t.secret)  # noqa: E731
    read = DEVICE_KEYS.verify(old, old_stored, digest)
    assert read is not None and read.legacy and read.prefix == old_secret[:8] and read.text == old
    assert DEVICE_KEYS.verify(old, hash_device_key("esp-2", old_secret), digest) is None, "bound to its device"
    new, stored = DEVICE_KEYS.mint(digest)
    assert re.fullmatch(r"bdk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", new.text) and not new.legacy
    assert new.secret not in new.public, "the public prefix is no longer cut from the secret"
    assert DEVICE_KEYS.verify(new.text, stored, digest) == new
    org_secret = secrets.token_urlsafe(32)
    assert ORG_KEYS.verify(f"bok_{org_secret}", hash_device_key("bok", org_secret),
                           lambda t: hash_device_key("bok", t.secret)) is not None


def test_logs_keep_only_the_public_part_of_any_token() -> None:
    from bsscihub.web.logring import scrub

    api = auth.TOKENS.mint(auth.hash_secret).token
    gate = Keyring(b"k" * 32).mint(PROVISIONING).token
    device = DEVICE_KEYS.mint(lambda t: "").token
    old_device = "bdk_" + secrets.token_urlsafe(32)
    line = f"tried {api.text}, {gate.text} and {device.text}; then {old_device}."
    assert tokens.scrub(line) == scrub(line) == (
        f"tried {api.public}_***, {gate.public}_*** and {device.public}_***; then bdk_***.")
    assert tokens.scrub("device gate-1_00112233 said log_level=info") == "device gate-1_00112233 said log_level=info"
