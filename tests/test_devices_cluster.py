"""Generic devices in a cluster: the broker hands a device's answer to any hub (shared subscription), so a
command result or an update report reaching another hub than the one that sent the command is taken from
the shared PostgreSQL database, once, and the sender's timer does not overturn it; a device heard by
another hub is not called offline, nor renamed back by that hub's registry write; hubs registering new
devices at once stay within one cap and announce each once. Two hubs, each on a broker in memory (standing
for the shared subscription's choice), one database."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from bsscihub.protocols.devices.service import CLUSTER_LOAD_EVERY, FIRMWARE_BLOBS, FIRMWARE_PART
from tests.cluster import FamilyHubs, family_hubs
from tests.memory_bridge import FollowingClock, MemoryBroker
from tests.redis_server import redis_url
from tests.test_families import PREFIX, RunningHub, eventually

__all__ = ["family_hubs", "redis_url"]  # fixtures

DEV = f"{PREFIX}/dev/device"


def results(witness: Any, kind: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in witness.messages if m.topic == f"{DEV}/d1/event/{kind}"]


@pytest_twisted.ensureDeferred
async def test_a_devices_answer_on_another_hub_settles_the_command_and_the_update_once(family_hubs: FamilyHubs) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    witnesses = [b.witness(f"{PREFIX}/dev/#", "device/+/commands/#", "OTA/#") for b in brokers]
    clocks = [FollowingClock().start(), FollowingClock().start()]
    sender, other = await family_hubs.two(brokers, ["devices"], clocks,
                                          devices={"command_timeout": "2s", "ota_timeout": "2s"})
    device = brokers[1].device()  # its messages reach the other hub
    try:
        await brokers[0].device().publish("device/d1/status", b"online")
        await eventually(lambda: "d1" in sender.hub.services["devices"].devices, what="d1 registered")

        code, sent = await sender.api("POST", "/api/v1/devices/d1/commands", {"name": "reboot"})
        assert code == 202
        await witnesses[0].when(lambda m: m.topic == "device/d1/commands/reboot")
        await device.publish("device/d1/commands/reboot/result", {"id": sent["commandId"], "ok": True,
                                                                  "result": {"uptime": 0}})
        [answer] = [json.loads(m.payload) for m in await witnesses[1].when(
            lambda m: m.topic == f"{DEV}/d1/event/command_result")]
        assert (answer["commandId"], answer["state"], answer["result"]) == (sent["commandId"], "ok", {"uptime": 0})
        assert other.rejected("devices", "unknown_command") == 0

        # Firmware offered by the sender; the device reports to the other hub.
        image = b"\x01" * 1000
        code, firmware = await sender.api("POST", "/api/v1/devices/firmware?name=fw&version=2.0.0", raw=image,
                                          headers={"Content-Type": "application/octet-stream"})
        assert code == 201 and firmware["sha256"] == hashlib.sha256(image).hexdigest()
        code, offer = await sender.api("POST", "/api/v1/devices/d1/ota", {"firmware": firmware["id"]})
        assert code == 202
        await device.publish("OTA/d1/response", {"status": "downloading", "progress": 50})  # no offerId
        await device.publish("OTA/d1/response", {"offerId": offer["offerId"], "status": "done"})
        await witnesses[1].when(lambda m: m.topic == f"{DEV}/d1/event/ota", count=2)
        assert [(e["offerId"], e["state"], e["progress"]) for e in results(witnesses[1], "ota")] == [
            (offer["offerId"], "downloading", 50), (offer["offerId"], "done", 100)]

        # The sender's deadlines pass: what the device answered stands, nothing is announced again.
        clocks[0].advance(2.5)
        code, tracked = await sender.api("GET", f"/api/v1/devices/d1/commands/{sent['commandId']}")
        assert tracked["state"] == "ok"
        await eventually(lambda: not sender.hub.services["devices"].offers, what="the sender's offer timer")
        code, offers = await sender.api("GET", "/api/v1/devices/d1/ota")
        assert [(o["state"], o["progress"]) for o in offers["items"]] == [("done", 100)]
        assert [e["state"] for e in results(witnesses[0], "command_result")] == []
        assert [e["state"] for e in results(witnesses[0], "ota")] == ["offered"]

        # An answer nobody waits for is still refused, on any hub.
        await device.publish("device/d1/commands/reboot/result", {"id": sent["commandId"], "ok": True})
        await eventually(lambda: other.rejected("devices", "unknown_command") == 1, what="the stale answer refused")

        # A command whose hub dies unanswered is timed out by the other hub, which learnt of it.
        code, lost = await sender.api("POST", "/api/v1/devices/d1/commands", {"name": "blink"})
        assert code == 202
        await family_hubs.stop(sender)
        clocks[1].advance(CLUSTER_LOAD_EVERY + 0.1)  # past its deadline too: loaded, it times out at once
        [timed_out] = [json.loads(m.payload) for m in await witnesses[1].when(
            lambda m: m.topic == f"{DEV}/d1/event/command_result" and lost["commandId"].encode() in m.payload)]
        assert (timed_out["command"], timed_out["state"]) == ("blink", "timeout")
    finally:
        device.stop()


@pytest_twisted.ensureDeferred
async def test_a_device_heard_by_another_hub_is_not_called_offline(family_hubs: FamilyHubs) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    witnesses = [b.witness(f"{DEV}/+/status") for b in brokers]
    one, two = await family_hubs.two(brokers, ["devices"], devices={"offline_after": 3.0})
    assert (await one.api("POST", "/api/v1/devices", {"id": "d2", "name": "Cellar"}))[0] == 201
    await brokers[0].device().publish("device/d1/telemetry/temp", b"21.5")
    heard_first = reactor.seconds()
    await witnesses[0].when(lambda m: json.loads(m.payload)["state"] == "online")
    await deferLater(reactor, 2.0, lambda: None)
    await brokers[1].device().publish("device/d1/telemetry/temp", b"21.6")  # now to the other hub
    await eventually(lambda: "d1" in two.hub.services["devices"].devices, what="d1 heard by hub-1")
    await two.hub.services["devices"]._flush_registry()  # the registry write (every 2 s) the others read
    # 4 s after hub-0 last heard d1 (offline_after 3 s, checked every 0.75 s) but 2 s after hub-1 did:
    # hub-0 has checked meanwhile and must have seen that hub-1 heard it.
    await deferLater(reactor, max(0.0, heard_first + 4.0 - reactor.seconds()), lambda: None)
    said = [json.loads(m.payload)["state"] for w in witnesses for m in w.messages]
    assert "offline" not in said
    code, _ = await one.api("PATCH", "/api/v1/devices/d1", {"name": "Boiler room"})
    assert code == 200

    async def name() -> Any:
        return await one.hub.store.fetchall("SELECT name FROM dev_devices WHERE id = 'd1'")

    async def renamed() -> bool:
        return await name() == [("Boiler room",)]

    await eventually(renamed, what="the rename")
    await two.hub.services["devices"]._flush_registry()
    assert await name() == [("Boiler room",)], "hub-1's registry write kept the name set on hub-0"
    # Silent everywhere: offline.
    await witnesses[0].when(lambda m: json.loads(m.payload)["state"] == "offline", timeout=10)

    # A device registered on hub-0 and never heard by hub-1 is known to hub-1's API within seconds.
    async def known() -> Any:
        code, doc = await two.api("GET", "/api/v1/devices/d2")
        return code == 200 and doc["name"] == "Cellar"

    await eventually(known, what="d2 on hub-1", timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_rename_a_removal_and_a_revoked_key_reach_the_other_hub(family_hubs: FamilyHubs) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    clocks = [FollowingClock().start(), FollowingClock().start()]
    one, two = await family_hubs.two(brokers, ["devices"], clocks)
    registry = two.hub.services["devices"].devices

    async def name_on_two() -> Any:
        code, doc = await two.api("GET", "/api/v1/devices/d1")
        return doc["name"] if code == 200 else code

    async def load_on_two(expected: Any) -> None:
        clocks[1].advance(CLUSTER_LOAD_EVERY + 0.1)  # hub-1's next look at the database
        await eventually(lambda: _equals(name_on_two, expected), what=f"d1 on hub-1 is {expected!r}",
                         timeout=10, interval=0.05)

    assert (await one.api("POST", "/api/v1/devices", {"id": "d1", "name": "Boiler"}))[0] == 201
    await load_on_two("Boiler")

    # A key made on hub-0 works on hub-1; revoked on hub-0, hub-1 refuses it at once (keys are read
    # from the database on every use, nothing to wait for).
    code, created = await one.api("POST", "/api/v1/devices/d1/key")
    assert code == 201
    post, reading, key = "/api/v1/devices/d1/telemetry", {"type": "t", "value": 1}, created["key"]
    assert (await two.api("POST", post, reading, {"X-Device-Key": key}, token=None))[0] == 200
    assert (await one.api("DELETE", "/api/v1/devices/d1/key"))[0] == 204
    assert (await two.api("POST", post, reading, {"X-Device-Key": key}, token=None))[0] == 401

    # A rename on hub-0: hub-1's API shows the new name after its next look (it kept the old one).
    assert (await one.api("PATCH", "/api/v1/devices/d1", {"name": "Cellar"}))[0] == 200
    await load_on_two("Cellar")
    await two.hub.services["devices"]._flush_registry()  # hub-1's registry write keeps it
    assert (await one.api("GET", "/api/v1/devices/d1"))[1]["name"] == "Cellar"

    # Removed on hub-0 with a fresh key: the key is refused on hub-1 at once, the device is gone
    # from hub-1's memory and API after its next look.
    code, created = await one.api("POST", "/api/v1/devices/d1/key")
    assert (await two.api("POST", post, reading, {"X-Device-Key": created["key"]}, token=None))[0] == 200
    assert (await one.api("DELETE", "/api/v1/devices/d1"))[0] == 204
    assert (await two.api("POST", post, reading, {"X-Device-Key": created["key"]}, token=None))[0] == 401
    await load_on_two(404)
    assert "d1" not in registry
    # hub-0 itself noted what it did, and never applies its own notes
    [(nodes,)] = await one.hub.store.fetchall("SELECT COUNT(DISTINCT node) FROM registry_changes")
    assert nodes == 1


@pytest_twisted.ensureDeferred
async def test_a_device_s_key_works_on_a_hub_that_has_not_loaded_the_device_yet(family_hubs: FamilyHubs) -> None:
    # Registered on one hub (as a device registering itself with an organisation key is), posting at once through
    # the load balancer to another: that hub refused its key (401) until its next look at the database (5 s).
    brokers = [MemoryBroker(), MemoryBroker()]
    witnesses = [b.witness(f"{DEV}/+/event/registered", f"{DEV}/+/up") for b in brokers]
    one, two = await family_hubs.two(brokers, ["devices"], devices={"auto_register": False})
    registry = two.hub.services["devices"].devices
    two.hub.services["devices"]._others.stop()  # hub-1 takes no look meanwhile
    keys = {}
    for device_id in ("d1", "d2"):
        assert (await one.api("POST", "/api/v1/devices", {"id": device_id, "name": "Boiler"}))[0] == 201
        code, created = await one.api("POST", f"/api/v1/devices/{device_id}/key")
        assert code == 201
        keys[device_id] = created["key"]

    def post(device_id: str, key: str) -> Any:
        return two.api("POST", f"/api/v1/devices/{device_id}/telemetry", {"type": "t", "value": 1},
                       {"X-Device-Key": key}, token=None)

    assert (await post("d2", keys["d1"]))[0] == 401  # another device's key: refused, and d2 is not read in
    assert "d2" not in registry
    assert await post("d1", keys["d1"]) == (200, {"accepted": 1})
    await witnesses[1].when(lambda m: m.topic == f"{DEV}/d1/up")
    assert (registry["d1"].name, registry["d1"].registered_via) == ("Boiler", "api")
    registered = [(n, json.loads(m.payload)["deviceId"]) for n, w in enumerate(witnesses) for m in w.messages
                  if m.topic.endswith("/event/registered")]
    assert registered == [(0, "d1"), (0, "d2")], "announced by the hub that registered them, once"


async def _equals(read: Any, expected: Any) -> bool:
    return bool(await read() == expected)


@pytest_twisted.ensureDeferred
async def test_a_firmware_image_uploaded_on_one_hub_downloads_from_another(family_hubs: FamilyHubs) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    witness = brokers[0].witness("OTA/#")
    one, two = await family_hubs.two(brokers, ["devices"])
    assert (await one.api("POST", "/api/v1/devices", {"id": "d1"}))[0] == 201

    async def offered(firmware_id: int) -> tuple[str, str]:
        """An offer made on hub-0: its id and download path and query (the device asks whichever hub)."""
        code, offer = await one.api("POST", "/api/v1/devices/d1/ota", {"firmware": firmware_id})
        assert code == 202, offer
        [update] = [json.loads(m.payload) for m in await witness.when(
            lambda m: m.topic == "OTA/d1/update" and offer["offerId"].encode() in m.payload)]
        url = urlsplit(update["url"])
        return offer["offerId"], f"{url.path}?{url.query}"

    async def done(offer_id: str) -> None:
        """The device reports the update done: the offer ends, and the next one may start."""
        await brokers[0].device().publish("OTA/d1/response", {"offerId": offer_id, "status": "done"})
        await eventually(lambda: not one.hub.services["devices"].offers, what="the offer ended")

    async def download(running: RunningHub, path: str) -> tuple[int, bytes]:
        response = await treq.get(running.base + path)
        return response.code, await response.content()

    # Several database parts, the last one short.
    image = bytes(range(256)) * 2500 + b"tail"
    assert len(image) > 2 * FIRMWARE_PART
    code, firmware = await one.api("POST", "/api/v1/devices/firmware?name=fw&version=2.0.0", raw=image,
                                   headers={"Content-Type": "application/octet-stream"})
    assert code == 201
    assert not one.hub.services["devices"].firmware_dir.exists(), "no file on the hub that took the upload"
    offer_id, path = await offered(firmware["id"])
    code, body = await download(two, path)
    assert code == 200 and body == image
    assert (await download(two, path.split("?")[0] + "?token=wrong"))[0] == 404
    # offered by hub-0: hub-1 does not delete it under the device
    assert (await two.api("DELETE", f"/api/v1/devices/firmware/{firmware['id']}"))[0] == 409
    await done(offer_id)

    # An image an earlier version kept as a file in one hub's data_dir goes into the database when that
    # hub starts (here: its start's step, run again), and then any hub serves it.
    old = b"\x02" * 1000
    digest = hashlib.sha256(old).hexdigest()
    await one.hub.store.execute(
        "INSERT INTO dev_firmware (name, version, sha256, size, created_at, actor) VALUES (?, ?, ?, ?, ?, ?)",
        ("old", "1.0.0", digest, len(old), 0.0, "test"))
    [(old_id,)] = await one.hub.store.fetchall("SELECT id FROM dev_firmware WHERE sha256 = ?", (digest,))
    offer_id, path = await offered(old_id)
    assert (await download(one, path))[0] == 404  # on hub-1's disk only: not served yet
    legacy = two.hub.services["devices"].firmware_dir / f"{digest}.bin"
    legacy.parent.mkdir()
    legacy.write_bytes(old)
    await two.hub.services["devices"]._import_firmware_files()
    assert not legacy.exists()
    assert await download(one, path) == (200, old)
    await done(offer_id)

    # Deleted on hub-1: gone for every hub.
    assert (await two.api("DELETE", f"/api/v1/devices/firmware/{firmware['id']}"))[0] == 204
    assert await one.hub.store.fetchall("SELECT part FROM blob_parts WHERE owner = ? AND blob_id = ?",
                                        (FIRMWARE_BLOBS, firmware["sha256"])) == []


@pytest_twisted.ensureDeferred
async def test_hubs_registering_at_once_stay_within_one_cap_and_announce_each_device_once(
    family_hubs: FamilyHubs
) -> None:
    brokers = [MemoryBroker(), MemoryBroker()]
    witnesses = [b.witness(f"{DEV}/+/event/registered", f"{DEV}/+/up") for b in brokers]
    hubs = one, two = await family_hubs.two(brokers, ["devices"],
                                            devices={"max_devices": 4, "registrations_per_minute": 0})
    devices = [broker.device() for broker in brokers]

    def settled(messages: int) -> bool:
        published = sum(1 for w in witnesses for m in w.messages if m.topic.endswith("/up"))
        return published + sum(h.rejected("devices", "registration_limit") for h in hubs) == messages

    def announced() -> list[str]:
        return sorted(m.topic.split("/")[-3] for w in witnesses for m in w.messages
                      if m.topic.endswith("/event/registered"))

    # A device first heard by both hubs at once: one hub's insert makes its row, that hub announces it.
    for device in devices:
        await device.publish("device/both/telemetry/temp", b"20")
    await eventually(lambda: settled(2), what="both messages taken")
    assert announced() == ["both"]
    assert all("both" in h.hub.services["devices"].devices for h in hubs)

    # Six more at once, three to each hub: the cap (4) is the cluster's.
    for n in range(6):
        await devices[n % 2].publish(f"device/d{n}/telemetry/temp", b"21")
    await eventually(lambda: settled(8), what="every message taken or refused")
    [(rows,)] = await one.hub.store.fetchall("SELECT COUNT(*) FROM dev_devices")
    assert rows == 4
    assert len(announced()) == 4 and len(set(announced())) == 4, announced()
    assert sum(h.rejected("devices", "registration_limit") for h in hubs) == 3

    # The REST answers are those of one hub: a device another hub registered is taken (409), whether or not
    # this hub loaded it yet; a device registering itself into a full registry is refused (429).
    [(by, theirs)] = [(n, m.topic.split("/")[-3]) for n, w in enumerate(witnesses) for m in w.messages
                      if m.topic.endswith("/event/registered") and b"both" not in m.payload][:1]
    assert (await hubs[1 - by].api("POST", "/api/v1/devices", {"id": theirs}))[0] == 409
    code, created = await one.api("POST", "/api/v1/devices/org-keys", {"name": "installers"})
    assert code == 201
    code, refused = await two.api("POST", "/api/v1/devices/register", {"device_id": "late"},
                                  {"X-Org-Key": created["key"]}, token=None)
    assert (code, refused["error"]["code"]) == (429, "registration_limit"), refused
