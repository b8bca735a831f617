"""Gate units in a cluster: the broker hands a unit's status to any hub (shared subscription), so the hub
that relayed a command is often not the one that hears the answer. Two whole hubs on PostgreSQL and a
real Redis, each on a broker in memory (standing for the shared subscription's choice): a command is
answered at once wherever the answer lands, a unit heard by the other hub is not called offline, its
will is published whichever hub hears it, and what waited for it is relayed once by the hub it returns to."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from bsscihub import blobs
from bsscihub.protocols.gate import registry
from bsscihub.protocols.gate import service as gate_service
from bsscihub.protocols.gate.registry import FileRecord
from tests.cluster import FamilyHubs, family_hubs
from tests.memory_bridge import MemoryBroker
from tests.redis_server import redis_url
from tests.test_families import PREFIX, RunningHub, eventually
from tests.test_gate import APP_A, GATES, as_app, error, register, registered

__all__ = ["family_hubs", "redis_url"]  # fixtures

STATE = f"{PREFIX}/gate/unit/gate-1/state"
OFFLINE_AFTER = 1.0


def states(witness: Any) -> list[str]:
    return [json.loads(m.payload)["state"] for m in witness.messages if m.topic == STATE]


@pytest_twisted.ensureDeferred
async def test_a_unit_whose_messages_reach_either_hub(family_hubs: FamilyHubs) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    witnesses = [b.witness(f"{PREFIX}/gate/#", "gatetorio/#") for b in brokers]
    one, two = await family_hubs.two(brokers, ["gate"], gate={
        "secret": "one secret for every hub", "offline_after": OFFLINE_AFTER, "command_timeout": 10})
    assert one.hub.cluster.clustered and two.hub.cluster.clustered
    await registered(one, "hw-1", "gate-1")
    commands: list[tuple[int, dict[str, Any]]] = []

    def unit_hears(n: int) -> Any:
        def heard(topic: str, payload: bytes) -> None:
            command = json.loads(payload)
            commands.append((n, command))
            if command["command"] == "mute":
                return
            # its answer reaches the other hub
            status(1 - n, {"state": "open", "command_id": command["id"], "ok": True, "result": {"by": n}})
        return heard

    for n in (0, 1):
        brokers[n].listen("gatetorio/gate-1/commands", unit_hears(n))

    def status(n: int, doc: dict[str, Any]) -> None:
        brokers[n].route("gatetorio/gate-1/status", json.dumps(doc).encode(), False)

    # Online, heard by hub one; then its heartbeats reach hub two only, past hub one's offline_after.
    status(0, {"state": "closed"})
    await witnesses[0].when(lambda m: m.topic == STATE)
    for _ in range(4):
        await deferLater(reactor, OFFLINE_AFTER / 2, lambda: None)
        status(1, {"state": "closed"})
    assert states(witnesses[0]) + states(witnesses[1]) == ["online"], (states(witnesses[0]), states(witnesses[1]))
    code, doc = await one.api("GET", f"{GATES}/gate-1")
    assert doc["online"] is True

    # A command asked on hub one, relayed there; the answer lands on hub two: answered within a second.
    started = reactor.seconds()
    code, done = await one.api("POST", f"{GATES}/gate-1/commands?wait=8", {"command": "open"})
    assert code == 200 and done["state"] == "succeeded" and done["result"] == {"by": 0}
    assert reactor.seconds() - started < 2.0, "not held until the command's deadline"

    # Its will reaches hub two, which never saw it come online: offline is published all the same.
    status(1, {"online": False})
    await witnesses[1].when(lambda m: m.topic == STATE and b"offline" in m.payload)

    # Offline: a command asked on hub one waits there; the unit returns on hub two, which relays it, once.
    code, waiting = await one.api("POST", f"{GATES}/gate-1/commands", {"command": "close"})
    assert code == 202 and waiting["state"] == "pending"
    status(1, {"state": "closed"})
    code, settled = await one.api("GET", f"{GATES}/gate-1/commands/{waiting['id']}?wait=5")
    assert settled["state"] == "succeeded" and settled["result"] == {"by": 1}
    status(0, {"state": "closed"})  # hub one hears it too now: nothing of its queue goes out again
    await deferLater(reactor, 0.3, lambda: None)
    assert [(n, c["command"]) for n, c in commands] == [(0, "open"), (1, "close")]

    # Silent at last: offline once, from whichever hub's timer.
    witnesses[0].clear()
    witnesses[1].clear()
    await eventually(lambda: states(witnesses[0]) + states(witnesses[1]) == ["offline"], timeout=5,
                     what="offline after the silence")
    await deferLater(reactor, OFFLINE_AFTER * 1.5, lambda: None)
    assert states(witnesses[0]) + states(witnesses[1]) == ["offline"]

    # Back, heard by hub one only, which relays a command the unit never answers, and dies.
    status(0, {"state": "closed"})
    await witnesses[0].when(lambda m: m.topic == STATE and b"online" in m.payload)
    code, muted = await one.api("POST", f"{GATES}/gate-1/commands", {"command": "mute", "timeout": 2})
    assert code == 202 and muted["relayed_at"] is not None
    await family_hubs.stop(one)
    witnesses[1].clear()
    # Hub two learns of both within seconds: the command times out, the silent unit goes offline.
    code, ended = await two.api("GET", f"{GATES}/gate-1/commands/{muted['id']}?wait=9")
    assert ended["state"] == "timeout"
    await witnesses[1].when(lambda m: m.topic == STATE and b"offline" in m.payload, timeout=10)


@pytest_twisted.ensureDeferred
async def test_revocations_renames_and_removals_reach_the_other_hub(
    family_hubs: FamilyHubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hub two's memory follows on its periodic look at the database: every second here, not every
    # five, so the waits below take seconds, not three looks' worth; the look itself is the same.
    monkeypatch.setattr(gate_service, "CLUSTER_LOAD_EVERY", 1.0)
    brokers = [MemoryBroker(), MemoryBroker()]
    one, two = await family_hubs.two(brokers, ["gate"], gate={"secret": "one secret for every hub"})
    service = two.hub.services["gate"]
    unit = await registered(one, "hw-1", "gate-1")

    # Keys and tokens are checked in the database on every use: revoked on hub one, refused on hub two
    # at once.
    code, _ = await one.api("POST", f"{GATES}/gate-1/user-tokens", {"user_token": APP_A, "access_level": "user"},
                            headers={"X-Unit-Key": unit["unit_key"]}, token=None)
    assert code == 201
    code, mine = await as_app(two, APP_A, "GET", f"{GATES}/mine")
    assert [u["controller_id"] for u in mine["items"]] == ["gate-1"]
    code, _ = await one.api("POST", f"{GATES}/gate-1/user-tokens/revoke", {"user_token": APP_A},
                            headers={"X-Unit-Key": unit["unit_key"]}, token=None)
    assert code == 204
    code, mine = await as_app(two, APP_A, "GET", f"{GATES}/mine")
    assert (code, mine["items"]) == (200, [])
    code, doc = await as_app(two, APP_A, "POST", f"{GATES}/gate-1/commands", {"command": "open"})
    assert (code, error(doc)[0]) == (403, "no_access")
    code, created = await one.api("POST", f"{GATES}/provisioning-keys", {"name": "van"})
    assert (await one.api("DELETE", f"{GATES}/provisioning-keys/{created['id']}"))[0] == 204
    code, doc = await register(two, created["key"], "hw-2", "gate-2")
    assert (code, error(doc)[0]) == (401, "provisioning_key_revoked")

    # Heard by hub two (its silence timer armed there), renamed on hub one: hub two's API has the new
    # name at once, its own memory follows within seconds.
    brokers[1].route("gatetorio/gate-1/status", json.dumps({"state": "closed"}).encode(), False)
    await eventually(lambda: service._offline_timers, what="hub two's silence timer")
    [unit_id] = service._offline_timers
    await eventually(lambda: service._by_controller == {"gate-1": unit_id}, timeout=10, interval=0.05,
                     what="hub two's look at the units")
    assert (await one.api("PATCH", f"{GATES}/gate-1", {"controller_id": "gate-9"}))[0] == 200
    assert (await two.api("GET", f"{GATES}/gate-9"))[0] == 200
    assert (await two.api("GET", f"{GATES}/gate-1"))[0] == 404
    await eventually(lambda: service._by_controller == {"gate-9": unit_id}, timeout=10, interval=0.05,
                     what="hub two's name map")

    # Removed on hub one: its unit key is refused on hub two at once, hub two's timer ends within seconds.
    assert (await one.api("DELETE", f"{GATES}/gate-9"))[0] == 204
    code, doc = await register(two, None, "hw-1", "gate-1", unit_key=unit["unit_key"])
    assert (code, error(doc)[0]) == (401, "invalid_unit_key")
    await eventually(lambda: not service._offline_timers and not service._by_controller, timeout=10,
                     interval=0.05, what="hub two forgets the unit")


@pytest_twisted.ensureDeferred
async def test_a_file_uploaded_on_one_hub_downloads_from_another(family_hubs: FamilyHubs, tmp_path: Path) -> None:
    one, two = await family_hubs.two([MemoryBroker(), MemoryBroker()], ["gate"],
                                     gate={"secret": "one secret for every hub"})
    unit = await registered(one, "hw-1", "gate-1")
    as_unit = {"X-Unit-Key": unit["unit_key"]}

    async def fetch(running: RunningHub, method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
        """A signed URL (whichever hub signed it) sent to `running`."""
        parts = urlsplit(url)
        response = await treq.request(method, f"{running.base}{parts.path}?{parts.query}", data=data)
        return response.code, await response.content()

    # Uploaded to hub one (several database parts, the last one short), downloaded from hub two.
    log = bytes(range(256)) * 2500 + b"tail"
    assert len(log) > 2 * blobs.PART
    code, upload = await one.api("POST", f"{GATES}/gate-1/files/upload-url",
                                 {"name": "gate.log", "size": len(log), "kind": "log"}, headers=as_unit, token=None)
    assert code == 201
    assert (await fetch(one, "PUT", upload["url"], log))[0] == 201
    assert not (tmp_path / "hub0" / "var" / "gate" / "files").exists(), "no file on the hub that took it"
    file_id = upload["file"]["id"]
    code, down = await two.api("POST", f"{GATES}/gate-1/files/{file_id}/download-url")
    assert code == 200
    assert await fetch(two, "GET", down["url"]) == (200, log)
    assert await fetch(one, "GET", down["url"]) == (200, log)
    cookies, _ = await two._login()
    response = await treq.get(f"{two.base}/gates/gate-1/files/{file_id}", cookies=cookies, allow_redirects=False)
    assert response.code == 200 and await response.content() == log

    # A file an earlier version kept in one hub's data_dir goes into the database when that hub starts
    # (here: its start's step, run again); then any hub serves it. One whose hash is wrong stays.
    service = two.hub.services["gate"]
    stored_unit = await registry.get_unit(one.hub.store, "controller_id", "gate-1")
    assert stored_unit is not None
    old, bad = b"old log\n" * 100, b"tampered"
    records = [FileRecord(uuid.uuid4().hex, stored_unit.id, "up", "log", name, len(data), len(data),
                          hashlib.sha256(b"original" if name == "bad.log" else data).hexdigest(), 0.0, "test", 1.0)
               for name, data in (("old.log", old), ("bad.log", bad))]
    for record, data in zip(records, (old, bad), strict=True):
        await registry.create_file(one.hub.store, record)
        service.files_dir.mkdir(parents=True, exist_ok=True)
        (service.files_dir / record.id).write_bytes(data)
    code, old_down = await one.api("POST", f"{GATES}/gate-1/files/{records[0].id}/download-url")
    assert code == 200 and (await fetch(one, "GET", old_down["url"]))[0] == 404  # on hub two's disk only
    await service._move_files_in()
    assert not (service.files_dir / records[0].id).exists()
    assert await fetch(one, "GET", old_down["url"]) == (200, old)
    assert (service.files_dir / records[1].id).read_bytes() == bad
    code, bad_down = await one.api("POST", f"{GATES}/gate-1/files/{records[1].id}/download-url")
    assert (await fetch(one, "GET", bad_down["url"]))[0] == 404
