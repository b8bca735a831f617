"""The mioty registry on SQLite and PostgreSQL: sensors with revisions, base stations and revocations,
uplink copies with published marks and retention, downlinks."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from bsscihub.protocols.bssci.registry import BaseStation, Registry, attach_change, rfc3339
from bsscihub.protocols.bssci.schema import MIGRATIONS
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from bsscihub.web import certs as web_certs

KEY = bytes(range(16))
EP1, EP2 = "0011223344556677", "00112233445566ff"


async def registry(store: Store) -> Registry:
    await store.migrate(CORE_MIGRATIONS + MIGRATIONS)
    r = Registry(store, reactor)
    await r.load()
    return r


@pytest_twisted.ensureDeferred
async def test_revoked_serials_of_version_1_move_to_the_core_table(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS + MIGRATIONS[:1])
    await store.execute("INSERT INTO mioty_revoked_certs (serial, bs_eui, reason, revoked_at) VALUES (?, ?, ?, ?)",
                        ("0xabcdef", "00000000000000aa", "stolen", 4.0))
    r = await registry(store)
    assert r.revoked_serials == {0xABCDEF: "stolen"}
    assert await store.fetchall("SELECT serial, reason, actor FROM revoked_certs") == [("abcdef", "stolen", "mioty")]


def row(ep: str, cnt: int, bs: str, received: float, rx: int = 10**18, snr: float = 1.0) -> tuple[object, ...]:
    return (ep, cnt, bs, received, rx, None, snr, -100.0, None, "eu1", "ulp", None, b"\x01", 0, 0, 0, 0)


@pytest_twisted.ensureDeferred
async def test_sensors_round_trip_with_revisions(store: Store) -> None:
    r = await registry(store)
    counts, changed = await r.save_sensors({EP1: attach_change(EP1, KEY, 0x1A2B, True, 100.0),
                                            EP2: attach_change(EP2, KEY[::-1], 7, False, 100.0)})
    assert (counts.created, counts.updated, counts.unchanged) == (2, 0, 0)
    assert [old for _, old in changed] == [None, None]
    rev = r.sensors[EP1].config_rev
    assert rev >= 1 and r.sensors[EP2].config_rev == rev
    # The same again: nothing written, no new revision.
    counts, changed = await r.save_sensors({EP1: attach_change(EP1, KEY, 0x1A2B, True, 200.0)})
    assert (counts.unchanged, changed) == (1, [])
    fresh = await registry(store)
    s = fresh.sensors[EP1]
    assert (s.nw_key, s.short_addr, s.bidi, s.attached, s.attached_at) == (KEY, 0x1A2B, True, True, 100.0)
    assert "nw_key" not in repr(s) and KEY.hex() not in repr(s)
    assert "nwKey" not in s.to_json() and s.to_json()["shortAddr"] == "1a2b"


@pytest_twisted.ensureDeferred
async def test_changes_from_another_writer_are_seen(store: Store) -> None:
    hub = await registry(store)
    cli = Registry(store, reactor)  # another process: no cache
    await cli.save_sensors({EP1: attach_change(EP1, KEY, 1, True, 10.0)})
    changed, deleted = await hub.sensor_changes()
    assert [s.eui for s in changed] == [EP1] and deleted == set()
    hub.adopt(changed[0])
    assert await hub.sensor_changes() == ([], set())
    # The hub's own writes come back as nothing new.
    await hub.save_sensors({EP2: attach_change(EP2, KEY, 2, True, 10.0)})
    assert await hub.sensor_changes() == ([], set())
    await cli.delete_sensor(EP1)
    assert await hub.sensor_changes() == ([], {EP1})


@pytest_twisted.ensureDeferred
async def test_hot_state_is_written_back_in_a_batch_and_survives_config_changes(store: Store) -> None:
    r = await registry(store)
    await r.save_sensors({EP1: attach_change(EP1, KEY, 1, True, 10.0)})
    s = r.sensors[EP1]
    s.last_seen, s.last_packet_cnt, s.best_bs, s.best_snr = 50.0, 41, "00000000000000aa", 9.5
    r.dirty(EP1)
    assert await r.flush_state() == 1
    assert await r.flush_state() == 0
    # A configuration change (e.g. from `sensors import`) keeps the hot state.
    other = Registry(store, reactor)
    await other.save_sensors({EP1: attach_change(EP1, KEY, 2, True, 60.0)})
    fresh = await registry(store)
    got = fresh.sensors[EP1]
    assert (got.short_addr, got.last_seen, got.last_packet_cnt, got.best_bs, got.best_snr) == (
        2, 50.0, 41, "00000000000000aa", 9.5)


@pytest_twisted.ensureDeferred
async def test_base_stations_and_revocations(store: Store) -> None:
    r = await registry(store)
    bs = BaseStation("00000000000000aa", first_seen=1.0, last_seen=2.0, since=2.0, vendor="Diehl", online=True,
                     geo=[50.1, 8.6, 100.0], last_status={"code": 0, "time": rfc3339(2.0)})
    await r.save_base_station(bs)
    bs.last_seen, bs.name = 3.0, "roof"
    await r.save_base_station(bs)
    await r.revoke_certificate(0xABCDEF, "stolen", "admin", 4.0)
    await r.revoke_certificate(0xABCDEF, "again", "admin", 5.0)  # the first reason stays
    # Revoked from the web (core table only) while the family was not running: refused all the same.
    await web_certs.revoke(store, "1234", "lost", "admin", 6.0, {})
    fresh = await registry(store)
    got = fresh.base_stations[bs.eui]
    assert (got.first_seen, got.last_seen, got.name, got.online, got.geo) == (1.0, 3.0, "roof", True,
                                                                            [50.1, 8.6, 100.0])
    assert got.last_status == {"code": 0, "time": "1970-01-01T00:00:02.000Z"}
    assert fresh.revoked_serials == {0xABCDEF: "stolen", 0x1234: "lost"}
    assert got.state_payload()["state"] == "online"
    stale = await fresh.mark_all_offline(9.0)
    assert [b.eui for b in stale] == [bs.eui]
    assert (await registry(store)).base_stations[bs.eui].online is False


@pytest_twisted.ensureDeferred
async def test_uplinks_unpublished_until_marked_and_pruned_only_when_published(store: Store) -> None:
    r = await registry(store)
    for d in [r.add_uplink(row(EP1, 1, "a", 100.0)), r.add_uplink(row(EP1, 1, "b", 100.1, snr=5.0)),
              r.add_uplink(row(EP1, 2, "a", 200.0)), r.add_uplink(row(EP2, 1, "a", 300.0))]:
        await d
    assert [(x[1], x[2], x[3]) for x in await r.unpublished()] == [
        (EP1, 1, "a"), (EP1, 1, "b"), (EP1, 2, "a"), (EP2, 1, "a")]
    r.mark_published(EP1, 1)
    r.mark_published(EP2, 1)
    await r.flush()
    assert [(x[1], x[2]) for x in await r.unpublished()] == [(EP1, 2)]
    # Retention deletes old published copies only: the unpublished one is kept.
    assert await r.prune_uplinks(250.0) == 2
    assert [(x[1], x[2]) for x in await r.unpublished()] == [(EP1, 2)]
    history = await r.uplink_rows(EP1, 10, None)
    assert [(x[2], x[4]) for x in history] == [(2, 200.0)]
    assert await r.recent_keys(5) == [(EP2, 1, 10**18), (EP1, 2, 10**18)]


@pytest_twisted.ensureDeferred
async def test_uplink_history_pages_by_time(store: Store) -> None:
    r = await registry(store)
    for i in range(5):
        await r.add_uplink(row(EP1, i, "a", 100.0 + i))
    page = await r.uplink_rows(EP1, 2, None)
    assert [x[2] for x in page] == [4, 3]
    page = await r.uplink_rows(EP1, 2, page[-1][4])
    assert [x[2] for x in page] == [2, 1]


@pytest_twisted.ensureDeferred
async def test_downlinks(store: Store) -> None:
    r = await registry(store)
    que = await r.add_downlink(EP1, b"\x01\x02", 3, 0.5, True, "alice", ["00000000000000aa"], 10.0)
    other = await r.add_downlink(EP2, b"", None, None, None, "mqtt", [], 11.0)
    assert other > que
    await r.update_downlink(que, 12.0, status="sent", result_bs="00000000000000aa", tx_time=5, packet_cnt=9)
    await r.update_downlink(que, 13.0, acked=True)
    [entry] = await r.downlinks(EP1)
    assert entry == {
        "queId": que, "epEui": EP1, "data": "0102", "format": 3, "prio": 0.5, "responseExp": True,
        "created": "1970-01-01T00:00:10.000Z", "actor": "alice", "bsEuis": ["00000000000000aa"], "status": "sent",
        "resultBs": "00000000000000aa", "txTime": 5, "packetCnt": 9, "error": None, "acked": True,
        "updated": "1970-01-01T00:00:13.000Z", "attempts": 0,
    }  # fmt: skip
    assert [d["queId"] for d in await r.downlinks(pending_only=True)] == [other]



@pytest_twisted.ensureDeferred
async def test_the_over_the_air_session_key_is_stored_and_ends_with_a_new_key(store: Store) -> None:
    import attrs

    r = await registry(store)
    await r.save_sensors({EP1: attach_change(EP1, KEY, 1, True, 10.0)})
    sn_key = bytes(range(100, 116))
    counts, _ = await r.save_sensors({EP1: lambda old: attrs.evolve(old, sn_key=sn_key, attach_cnt=3)})
    assert counts.updated == 1
    fresh = await registry(store)
    s = fresh.sensors[EP1]
    assert (s.sn_key, s.session_key, s.nw_key, s.attach_cnt) == (sn_key, sn_key, KEY, 3)
    assert sn_key.hex() not in repr(s) and s.to_json()["otaSession"] is True
    # The same key again keeps the session; a new pre-shared key ends it.
    await fresh.save_sensors({EP1: attach_change(EP1, KEY, 1, True, 20.0)})
    assert fresh.sensors[EP1].sn_key == sn_key
    await fresh.save_sensors({EP1: attach_change(EP1, KEY[::-1], 1, True, 30.0)})
    again = (await registry(store)).sensors[EP1]
    assert again.sn_key is None and again.session_key == KEY[::-1] and again.to_json()["otaSession"] is False
