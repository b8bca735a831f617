"""The gate family's parts without a broker: signed URLs, the key file, and the registry on both databases.

The end-to-end flows are in test_gate.py; these pin the details that are cheap to check exhaustively.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import example, given
from hypothesis import strategies as st

from bsscihub.config import ConfigError
from bsscihub.keybox import KeyFileError
from bsscihub.protocols.gate import registry
from bsscihub.protocols.gate.dynsec import UnitTopics
from bsscihub.protocols.gate.registry import Command, Refused
from bsscihub.protocols.gate.schema import MIGRATIONS
from bsscihub.protocols.gate.signed import DOWN, UP, BadURL, URLSigner
from bsscihub.protocols.gate.tokens import APP, UNIT, Keyring, public_prefix
from bsscihub.store import Store
from tests.conftest import make_config

SIGNER = URLSigner(b"k" * 32)
FILE = "0123456789abcdef0123456789abcdef"


def args(query: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in query.split("&"))


# -- signed URLs


def test_a_signed_url_grants_its_size_until_it_expires() -> None:
    good = args(SIGNER.query(FILE, UP, 1000, 4096))
    assert SIGNER.verify(FILE, UP, good, now=999.9) == 4096
    with pytest.raises(BadURL) as caught:
        SIGNER.verify(FILE, UP, good, now=1000)
    assert caught.value.code == "url_expired"


@pytest.mark.parametrize("field, value", [("op", DOWN), ("exp", "5000"), ("max", "999999"), ("sig", "AAAA")])
def test_every_field_is_signed(field: str, value: str) -> None:
    forged = {**args(SIGNER.query(FILE, UP, 1000, 4096)), field: value}
    with pytest.raises(BadURL) as caught:
        SIGNER.verify(FILE, UP, forged, now=0)
    assert caught.value.code == "bad_signature"


def test_a_url_is_bound_to_its_file_direction_and_key() -> None:
    good = args(SIGNER.query(FILE, UP, 1000, 4096))
    for file_id, direction, signer, code in (
        ("f" * 32, UP, SIGNER, "bad_signature"),
        (FILE, DOWN, SIGNER, "wrong_direction"),
        (FILE, UP, URLSigner(b"x" * 32), "bad_signature"),
    ):
        with pytest.raises(BadURL) as caught:
            signer.verify(file_id, direction, good, now=0)
        assert caught.value.code == code


@given(st.dictionaries(st.sampled_from(["op", "exp", "max", "sig", "x"]), st.text(max_size=40)))
@example({"op": "", "exp": "0", "max": "0", "sig": "\x80"})  # non-ASCII signature: compare_digest refuses str
@example({"op": "\ud800", "exp": "0", "max": "0", "sig": "\ud800"})  # a lone surrogate, as a raw query may decode to
def test_arbitrary_query_strings_are_refused_not_crashing(query: dict[str, str]) -> None:
    with pytest.raises(BadURL):
        SIGNER.verify(FILE, UP, query, now=0)


# -- secrets


def test_the_key_file_is_created_private_once_and_reused(tmp_path: Path) -> None:
    first = Keyring.load("", tmp_path / "var")
    path = tmp_path / "var" / "gate.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert Keyring.load("", tmp_path / "var") == first
    assert Keyring.load("configured", tmp_path) == Keyring.load("configured", tmp_path / "elsewhere") != first
    path.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="gate.key holds 5 bytes, not 32"):
        Keyring.load("", tmp_path / "var")


def test_hashes_are_keyed_and_separated_by_kind() -> None:
    one, other = Keyring(b"a" * 32), Keyring(b"b" * 32)
    minted = one.mint(UNIT)
    token, prefix = minted.token.text, minted.token.public
    assert public_prefix(token) == prefix and token.startswith(prefix + "_") and len(token) > 50
    assert minted.stored == one.hash(UNIT, token), "the whole text is hashed, as for every key stored before"
    assert public_prefix("gtu_short") == "" and public_prefix("an app token") == ""
    assert one.hash(UNIT, token) != other.hash(UNIT, token)
    assert one.hash(UNIT, token) != one.hash(APP, token)
    assert token not in one.hash(UNIT, token) and one.fingerprint(APP, token) != one.hash(APP, token)[:12]


def test_unit_acls_allow_exactly_its_topics() -> None:
    acls = UnitTopics.of("gatetorio", "gate-1").acls()
    allowed = {(a["acltype"], a["topic"]) for a in acls if a["allow"]}
    assert allowed == {("publishClientSend", "gatetorio/gate-1/status"),
                       ("subscribeLiteral", "gatetorio/gate-1/commands"),
                       ("publishClientReceive", "gatetorio/gate-1/commands")}
    [deny] = [a for a in acls if not a["allow"]]
    assert deny["topic"] == "#" and deny["priority"] < min(a["priority"] for a in acls if a["allow"])


def test_dynsec_provisioning_needs_its_admin_account(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, gate={"broker_provisioning": "dynsec"})
    assert caught.value.key == "gate.dynsec_username"
    config = make_config(tmp_path, gate={"broker_provisioning": "dynsec", "dynsec_username": "admin"})
    assert config.section("gate").broker_provisioning == "dynsec"


# -- the registry's SQL, on SQLite and PostgreSQL


async def _unit(store: Store, hardware_id: str, controller_id: str) -> registry.Registration:
    return await registry.register(store, hardware_id=hardware_id, controller_id=controller_id,
                                   firmware_version="1", key_hash=f"h-{hardware_id}-{controller_id}", now=1.0,
                                   actor="test", provisioning_key_id=None)


@pytest_twisted.ensureDeferred
async def test_registry_identity_and_renames(store: Store) -> None:
    await store.migrate(MIGRATIONS)
    one = (await _unit(store, "hw-1", "gate-1")).unit
    await _unit(store, "hw-2", "gate-2")
    with pytest.raises(Refused) as caught:
        await _unit(store, "hw-3", "gate-1")
    assert (caught.value.http_status, caught.value.code) == (409, "controller_id_taken")
    with pytest.raises(Refused):
        await registry.rename(store, one, "gate-2", 2.0, "op")
    renamed = await registry.rename(store, one, "gate-north", 2.0, "op")
    assert (renamed.id, renamed.controller_id) == (one.id, "gate-north")
    assert [(n.controller_id, n.ended_at) for n in await registry.names(store, one.id)] == [
        ("gate-1", 2.0), ("gate-north", None)]
    assert (await _unit(store, "hw-3", "gate-1")).created, "the old name is free again"
    await _unit(store, "hw-4", "gate_4")
    for q, found in (("gate_", ["gate_4"]), ("ate-", ["gate-1", "gate-2", "gate-north"]), ("%", []),
                     ("HW-", ["gate-1", "gate-2", "gate-north", "gate_4"])):
        units, total = await registry.list_units(store, q=q)
        assert [u.controller_id for u in units] == found and total == len(found), q


@pytest_twisted.ensureDeferred
async def test_registry_status_history_is_trimmed_and_online_tracked(store: Store) -> None:
    await store.migrate(MIGRATIONS)
    unit = (await _unit(store, "hw-1", "gate-1")).unit
    assert await registry.record_status(store, unit.id, 10.0, {"n": 0}, keep=3) is True
    for n in range(1, 6):
        assert await registry.record_status(store, unit.id, 10.0 + n, {"n": n}, keep=3) is False
    items, total = await registry.status_history(store, unit.id, 10, 0)
    assert total == 3 and [i["status"]["n"] for i in items] == [5, 4, 3]
    current = await registry.get_unit(store, "id", unit.id)
    assert current is not None and current.online and current.online_since == 10.0 and current.last_seen == 15.0
    await registry.record_status(store, unit.id, 16.0, {"online": False}, keep=3)
    current = await registry.get_unit(store, "id", unit.id)
    assert current is not None and not current.online and current.online_since is None


@pytest_twisted.ensureDeferred
async def test_registry_shares_and_commands_settle_once(store: Store) -> None:
    await store.migrate(MIGRATIONS)
    unit = (await _unit(store, "hw-1", "gate-1")).unit
    other = (await _unit(store, "hw-2", "gate-2")).unit
    await registry.create_share(store, unit_id=unit.id, prefix="gsh_1", secret_hash="s", level="engineer",
                                actor="a", now=1.0, expires_at=100.0)
    redeemed, access = await registry.redeem_share(store, secret_hash="s", token_hash="t", fingerprint="f",
                                                   used_by="app:f", now=2.0)
    assert (redeemed.used_by, redeemed.used_at, access.level, access.via) == ("app:f", 2.0, "engineer", "share")
    with pytest.raises(Refused) as caught:
        await registry.redeem_share(store, secret_hash="s", token_hash="u", fingerprint="g", used_by="x", now=3.0)
    assert caught.value.code == "share_used"
    assert [(a.controller_id, a.level) for a, _ in await registry.accesses_of_token(store, "t")] == [
        ("gate-1", "engineer")]

    command = Command("c" * 32, unit.id, "open", {}, "a", "rest", 1.0, 5.0, "pending", None, None, None)
    await registry.insert_command(store, command)
    assert await registry.complete_command(store, command.id, other.id, "succeeded", 1, None, 2.0) is None
    done = await registry.complete_command(store, command.id, unit.id, "succeeded", {"ok": 1}, None, 2.0)
    assert done is not None and done.result == {"ok": 1} and done.done
    assert await registry.complete_command(store, command.id, unit.id, "timeout", None, "late", 9.0) is None
