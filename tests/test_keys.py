"""keys_dir: the key files sealing stored secrets, one set for every hub of a cluster.

Hubs with their own data directories and one keys_dir open what another sealed (meter keys, webhook secrets)
and accept what another minted (gate keys); a hub with its own keys does not; the files are made once, whole.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import formatEvent
from twisted.web import server

from bsscihub.config import ConfigError, load_config
from bsscihub.family import installed_families
from bsscihub.hub import make_hub
from bsscihub.keybox import KeyBox, KeyFileError, load_key
from bsscihub.protocols.bssci.meters import registry_for
from bsscihub.protocols.gate.tokens import Keyring
from bsscihub.webhooks import WebhookService, sign
from tests.cluster import FamilyHubs, family_hubs
from tests.conftest import _reset_pg_schema, make_config
from tests.memory_bridge import MemoryBroker
from tests.redis_server import redis_url
from tests.test_alerts import Receiver
from tests.test_families import RunningHub, eventually
from tests.test_gate import error, new_key, register

__all__ = ["family_hubs", "redis_url"]  # fixtures

KEY_FILES = {"gate.key", "meter-keys.secret", "webhook-keys.secret"}


# -- the setting


def test_keys_dir_defaults_to_data_dir_and_is_set_like_any_top_level_key(tmp_path: Path) -> None:
    assert make_config(tmp_path).keys_dir == tmp_path / "var"
    config = make_config(tmp_path, keys_dir=str(tmp_path / "keys"))
    assert (config.keys_dir, config.data_dir) == (tmp_path / "keys", tmp_path / "var")
    assert config.masked()["keys_dir"] == str(tmp_path / "keys")
    from_env = load_config(None, environ={"BSSCIHUB_KEYS_DIR": "/srv/keys", "BSSCIHUB_DATA_DIR": "/srv/hub1"})
    assert (from_env.keys_dir, from_env.data_dir) == (Path("/srv/keys"), Path("/srv/hub1"))
    # One way only: the webhooks' own key file setting is gone.
    with pytest.raises(ConfigError, match=r"^config error: webhooks\.key_file = .*unknown key"):
        make_config(tmp_path, webhooks={"key_file": "/srv/webhook-keys.secret"})


# -- the files


def test_hubs_starting_at_once_make_one_whole_private_key(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "keys" / "webhook-keys.secret"
    code = ("import sys; from pathlib import Path; from bsscihub.keybox import load_key;"
            " print('ready', flush=True); sys.stdin.read(); print(load_key(Path(sys.argv[1])).hex())")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True) for _ in range(8)]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
    for racer in racers:  # all loaded and waiting: released together
        assert racer.stdin is not None
        racer.stdin.close()
    seen = set()
    for racer in racers:
        assert racer.stdout is not None and racer.wait(timeout=60) == 0
        seen.add(racer.stdout.read().strip())
        racer.stdout.close()
    assert len(seen) == 1 and len(bytes.fromhex(seen.pop())) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["webhook-keys.secret"]  # no temporary file left
    assert load_key(path) == path.read_bytes()


def test_a_key_file_that_is_short_or_cannot_be_made_is_named_in_one_line(tmp_path: Path) -> None:
    short = tmp_path / "meter-keys.secret"
    short.write_bytes(b"12345")
    with pytest.raises(KeyFileError, match=f"^key file {short} holds 5 bytes, not 32"):
        KeyBox(short).load()
    (tmp_path / "plain").write_text("not a directory")
    with pytest.raises(KeyFileError, match=f"^key file {tmp_path}/plain/keys/gate.key: "):
        load_key(tmp_path / "plain" / "keys" / "gate.key")


def test_a_key_file_left_in_data_dir_is_not_replaced_by_a_new_one_in_keys_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path, keys_dir=str(tmp_path / "keys"))
    config.data_dir.mkdir(parents=True)
    for name in KEY_FILES:
        (config.data_dir / name).write_bytes(name[0].encode() * 32)
    with pytest.raises(KeyFileError, match=f"^key file {tmp_path}/keys/meter-keys.secret does not exist but"
                                           f" {config.data_dir}/meter-keys.secret does: move it into keys_dir"):
        KeyBox.of_hub(config, "meter-keys.secret").load()
    with pytest.raises(KeyFileError, match="keys/gate.key does not exist but .*/var/gate.key does"):
        Keyring.load("", config.keys_dir, config.data_dir)
    assert not (tmp_path / "keys").exists()  # nothing made
    # Moved as told: the old keys, from keys_dir.
    (tmp_path / "var").rename(tmp_path / "keys")
    assert Keyring.load("", config.keys_dir, config.data_dir) == Keyring(b"g" * 32)
    assert load_key(tmp_path / "keys" / "webhook-keys.secret", moved_from=config.data_dir / "webhook-keys.secret") \
        == b"w" * 32
    # keys_dir unset: data_dir's own files are the keys.
    (tmp_path / "single").mkdir()
    single = make_config(tmp_path / "single")
    single.data_dir.mkdir()
    (single.data_dir / "gate.key").write_bytes(b"s" * 32)
    assert Keyring.load("", single.keys_dir, single.data_dir) == Keyring(b"s" * 32)


@pytest_twisted.ensureDeferred
async def test_a_keys_dir_that_cannot_be_made_stops_the_webhooks_start(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory")
    config = make_config(tmp_path, families=[], keys_dir=str(tmp_path / "plain" / "keys"))
    hub = make_hub(config, reactor, {})
    hub.store.start()
    try:
        await hub.store.migrate(hub.migrations())
        service = WebhookService(hub)
        service.startService()
        with pytest.raises(KeyFileError, match="plain/keys/webhook-keys.secret"):
            await service.when_ready()
    finally:
        await hub.store.stop()


# -- two hubs, one database, one keys_dir


@pytest_twisted.ensureDeferred
async def test_a_meter_key_set_on_one_hub_opens_on_another_with_the_same_keys_dir(
        tmp_path: Path, postgres_url: str) -> None:
    _reset_pg_schema(postgres_url)
    mioty = {"mioty": installed_families()["mioty"]}
    hubs = []
    for name, keys in (("hub1", "keys"), ("hub2", "keys"), ("alone", "own-keys")):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, families=["mioty"], database=postgres_url,
                             keys_dir=str(tmp_path / keys))  # data_dir: tmp_path/name/var, each its own
        hub = make_hub(config, reactor, mioty)
        hub.store.start()
        hubs.append(hub)
    try:
        await hubs[0].store.migrate(hubs[0].migrations())
        one, two, alone = (registry_for(hub) for hub in hubs)
        await one.set_key("dme-81795246", bytes(range(16)), 10.0)
        for registry in (two, alone):
            meter = await registry.get("dme-81795246")
            assert meter is not None
            assert registry.key_of(meter) == (bytes(range(16)) if registry is two else None)
        assert {p.name for p in (tmp_path / "keys").iterdir()} == {"meter-keys.secret"}
        assert not list(tmp_path.glob("*/var/meter-keys.secret"))
    finally:
        for hub in hubs:
            await hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_gate_keys_and_webhook_secrets_made_on_one_hub_work_on_another_with_the_same_keys_dir(
        family_hubs: FamilyHubs, tmp_path: Path, logged: list[Any]) -> None:
    """Whole hubs of one cluster (PostgreSQL, Redis), each its data_dir: a provisioning key minted on hub one
    registers a unit on hub two, whose unit key works on hub one; hub two delivers, signed with its secret,
    the events of a webhook made on hub one. A third hub on its own keys (its data_dir) refuses that key."""
    receiver = Receiver()
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(receiver))

    async def hub(**keys: Any) -> RunningHub:
        return await family_hubs.start(MemoryBroker(), ["gate"],
                                       webhooks={"retry_min": "100ms", "retry_max": "200ms", "timeout": "2s"}, **keys)

    try:
        one = await hub(keys_dir=str(tmp_path / "keys"))
        code, created = await one.api("POST", "/api/v1/webhooks", {
            "name": "crm", "url": f"http://127.0.0.1:{listening.getHost().port}/in", "families": ["gate"],
            "events": ["registered"], "secret": "crm-secret-" + "s" * 20})
        assert code == 201, created
        provisioning = await new_key(one)
        two = await hub(keys_dir=str(tmp_path / "keys"))  # loads the webhook at its start

        code, unit = await register(two, provisioning, "hw-1", "gate-1")
        assert code == 201, unit
        code, again = await register(one, None, "hw-1", "gate-1", "1.1.0", unit_key=unit["unit_key"])
        assert code == 200, again
        await eventually(lambda: receiver.received, timeout=10, what="hub two's delivery")
        [(headers, body)] = receiver.received  # one event, delivered by the hub that handled it
        assert json.loads(body)["payload"]["controllerId"] == "gate-1"
        assert headers["x-bsscihub-signature-256"] == sign(b"crm-secret-" + b"s" * 20, body)

        assert {p.name for p in (tmp_path / "keys").iterdir()} == {"gate.key", "webhook-keys.secret"}  # no mioty
        assert not [p for p in tmp_path.glob("hub*/var/*") if p.name in KEY_FILES]
        warned = "keys_dir is this hub's data_dir"
        assert not [e for e in logged if warned in (formatEvent(e) or "")]

        alone = await hub()  # keys_dir unset: its data_dir, its own gate key
        code, doc = await register(alone, provisioning, "hw-2", "gate-2")
        assert (code, error(doc)[0]) == (401, "invalid_provisioning_key")
        assert (alone.hub.config.data_dir / "gate.key").exists()  # tmp_path/hub2/var: the third hub's own
        [warning] = [formatEvent(e) for e in logged if warned in (formatEvent(e) or "")]
        assert str(alone.hub.config.data_dir) in warning
    finally:
        await listening.stopListening()
