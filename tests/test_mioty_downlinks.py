"""Downlinks in the field, black-box: base stations over real mutual TLS against the running mioty
service; what stations do (reconnect, attPrp, go away, never report) and what the hub must then do."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.test_mioty_field import connect
from tests.test_mioty_service import (
    EP,
    KEY,
    PKI,
    A,
    B,
    Running,
    Station,
    attached_and_heard,
    heard,
    logged,
    pki,
    running,
    start,
    wait_for,
)

__all__ = ["logged", "pki", "running"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def states(running: Running, que_id: int) -> list[tuple[str, str]]:
    """(event, state) of every `downlink` event of one downlink, in order."""
    return [(e.payload["event"], e.payload["state"]) for e in running.of("downlink") if e.payload["queId"] == que_id]


async def stored(running: Running, que_id: int) -> dict[str, Any]:
    await running.service.downlink_queue.flush()
    entry = await running.service.downlink(EP, que_id)
    assert entry is not None
    return entry


async def state_becomes(running: Running, que_id: int, state: str) -> dict[str, Any]:
    await wait_for(lambda: states(running, que_id) and states(running, que_id)[-1][1] == state)
    entry = await stored(running, que_id)
    assert entry["status"] == state
    return entry


async def reconnected(running: Running, old: Station, name: str, eui: str) -> Station:
    old.transport.loseConnection()
    await old.lost
    await wait_for(lambda: eui not in running.service.sessions)
    return await running.station(name, eui)


def after(station: Station, first: str, then: str) -> None:
    """`then` reached the station after `first` (frames arrive in the order they were sent)."""
    commands = [m["command"] for m in station.seen]
    assert first in commands and then in commands
    assert commands.index(first) < len(commands) - 1 - commands[::-1].index(then)


@pytest_twisted.ensureDeferred
async def test_an_accepted_downlink_is_queued_again_when_its_station_reconnects(running: Running) -> None:
    service = running.service
    b = await attached_and_heard(running)
    queued = await service.queue_downlink(EP, b"\xca\xfe", actor="test")
    que_id = queued["queId"]
    assert (queued["status"], queued["baseStations"]) == ("accepted", [B])
    assert (await b.expect("dlDataQue"))["queId"] == que_id
    # The station goes away without reporting it: the hub queues it again ...
    b.transport.loseConnection()
    await b.lost
    entry = await state_becomes(running, que_id, "queued")
    assert entry["bsEuis"] == [] and B in entry["error"] and "disconnected" in entry["error"]
    # ... and hands it over again once the station is back, after the attPrp that resets it there.
    b = await running.station("bs-b", B)
    again = await b.expect("dlDataQue")
    assert (again["queId"], again["userData"]) == (que_id, [[0xCA, 0xFE]])
    after(b, "attPrp", "dlDataQue")
    await state_becomes(running, que_id, "accepted")
    op = b.send("dlDataRes", epEui=int(EP, 16), queId=que_id, result="sent", txTime=7, packetCnt=2)
    await b.expect("dlDataResRsp")
    b.send("dlDataResCmp", op)
    entry = await state_becomes(running, que_id, "sent")
    assert (entry["resultBs"], entry["attempts"], entry["packetCnt"]) == (B, 2, 2)
    # That report may be the first attempt's: the copy of the second must not go out as well.
    assert (await b.expect("dlDataRev"))["queId"] == que_id
    assert states(running, que_id) == [
        ("queue", "queued"), ("dispatch", "dispatched"), ("accept", "accepted"), ("drop", "queued"),
        ("dispatch", "dispatched"), ("accept", "accepted"), ("sent", "sent"),
    ]  # fmt: skip
    from prometheus_client import generate_latest

    text = generate_latest(running.hub.metrics).decode()
    assert 'bsscihub_mioty_downlinks_ended_total{state="sent"} 1.0' in text
    assert 'bsscihub_mioty_downlinks_pending{state="accepted"} 0.0' in text
    event = [e for e in running.of("downlink") if e.payload["queId"] == que_id][-1]
    assert event.topic == f"mioty/ep/{EP}/event/downlink" and event.payload["epEui"] == EP
    assert event.payload["bsEui"] == B and event.payload["time"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_an_att_prp_for_the_end_point_makes_its_station_forget_and_the_hub_queue_again(
    running: Running,
) -> None:
    service = running.service
    b = await attached_and_heard(running)
    que_id = (await service.queue_downlink(EP, b"\x01", actor="test"))["queId"]
    await b.expect("dlDataQue")
    # A new configuration is propagated: the station drops the end point's downlinks with it.
    await service.attach(EP, KEY.hex(), "1a2c", True, actor="test")
    prp = await b.expect("attPrp")
    assert prp["shAddr"] == 0x1A2C
    again = await b.expect("dlDataQue")
    assert again["queId"] == que_id
    after(b, "attPrp", "dlDataQue")
    await state_becomes(running, que_id, "accepted")
    assert [s for s in states(running, que_id) if s[0] == "drop"] == [("drop", "queued")]
    assert "attPrp" in [e for e in running.of("downlink") if e.payload["event"] == "drop"][0].payload["reason"]


@pytest_twisted.ensureDeferred
async def test_a_downlink_waits_for_its_serving_station_or_goes_through_another_on_a_dl_open_uplink(
    running: Running,
) -> None:
    service = running.service
    await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    a = await running.station("bs-a", A)
    b = await running.station("bs-b", B)
    await a.expect("attPrp")
    await b.expect("attPrp")
    await heard(running, a)  # A alone heard it: A serves it
    a.transport.loseConnection()
    await a.lost
    await wait_for(lambda: A not in service.sessions)
    # A is away: the downlink waits instead of failing, and does not go to B, which never heard it.
    first = await service.queue_downlink(EP, b"\x01", actor="test")
    assert (first["status"], first["baseStations"]) == ("queued", [])
    await deferLater(reactor, 0.1, lambda: None)
    assert not [m for m in b.seen if m["command"] == "dlDataQue"]
    # A comes back: it gets the downlink after the end point's attPrp.
    a = await running.station("bs-a", A)
    assert (await a.expect("dlDataQue"))["queId"] == first["queId"]
    after(a, "attPrp", "dlDataQue")
    await state_becomes(running, first["queId"], "accepted")
    op = a.send("dlDataRes", epEui=int(EP, 16), queId=first["queId"], result="sent", txTime=7, packetCnt=2)
    await a.expect("dlDataResRsp")
    a.send("dlDataResCmp", op)
    await state_becomes(running, first["queId"], "sent")
    # A is away again; the end point's next uplink with dlOpen comes through B: B takes the downlink.
    a.transport.loseConnection()
    await a.lost
    await wait_for(lambda: A not in service.sessions)
    second = await service.queue_downlink(EP, b"\x02", actor="test")
    assert second["status"] == "queued"
    await heard(running, b, cnt=3, dlOpen=False)  # no downlink window: still waiting
    await deferLater(reactor, 0.05, lambda: None)
    assert not [m for m in b.seen if m["command"] == "dlDataQue"]
    await heard(running, b, cnt=4, dlOpen=True)
    que = await b.expect("dlDataQue")
    assert (que["queId"], que["userData"]) == (second["queId"], [[2]])
    entry = await state_becomes(running, second["queId"], "accepted")
    assert entry["bsEuis"] == [B]


@pytest_twisted.ensureDeferred
async def test_an_unreported_downlink_expires_with_dl_data_rev_and_an_error_answer_revokes_it(
    tmp_path: Path, pki: PKI
) -> None:
    running = await start(tmp_path, pki, downlink_ttl=1.0)
    try:
        service = running.service
        b = await attached_and_heard(running)
        answered = (await service.queue_downlink(EP, b"\x01", actor="test"))["queId"]
        await b.expect("dlDataQue")
        # Held, never reported: after downlink_ttl the station gets dlDataRev; it takes it: expired.
        rev = await b.expect("dlDataRev")
        assert rev["queId"] == answered
        entry = await state_becomes(running, answered, "expired")
        assert "not sent within 1 s" in entry["error"]
        assert [s for _, s in states(running, answered)][-2:] == ["expiring", "expired"]
        # The same, but the station answers the dlDataRev with an error: revoked.
        b.auto.pop("dlDataRev")
        refused = (await service.queue_downlink(EP, b"\x02", actor="test"))["queId"]
        await b.expect("dlDataQue")
        rev = await b.expect("dlDataRev")
        assert rev["queId"] == refused
        b.send("error", rev["opId"], code=2, message="no such queId")
        assert (await b.expect("errorAck"))["opId"] == rev["opId"]
        entry = await state_becomes(running, refused, "revoked")
        assert "no such queId" in entry["error"]
        # One nobody held expires as well, without a dlDataRev.
        b.transport.loseConnection()
        await b.lost
        lonely = (await service.queue_downlink(EP, b"\x03", actor="test"))["queId"]
        entry = await state_becomes(running, lonely, "expired")
        assert states(running, lonely) == [("queue", "queued"), ("timeout", "expired")]
        assert not service.downlink_queue.pending
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_pending_downlink_survives_a_restart_and_goes_out_when_its_station_returns(
    tmp_path: Path, pki: PKI
) -> None:
    first = await start(tmp_path, pki)
    try:
        await first.service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
        b = await first.station("bs-b", B)
        await b.expect("attPrp")
        await heard(first, b)
        que_id = (await first.service.queue_downlink(EP, b"\xbe\xef", actor="test"))["queId"]
        await b.expect("dlDataQue")
        await state_becomes(first, que_id, "accepted")
    finally:
        await first.stop()
    # A clean stop ends every session: the downlink was recorded as queued again. A crash leaves it
    # as the station took it; so does this edit of the stopped hub's database.
    with sqlite3.connect(tmp_path / "var" / "hub.sqlite") as db:
        assert db.execute("SELECT status, targets FROM mioty_downlinks").fetchall() == [("queued", "[]")]
        db.execute("UPDATE mioty_downlinks SET status = 'accepted', targets = ?", (json.dumps([B]),))
    db.close()
    second = await start(tmp_path, pki)
    try:
        entry = await stored(second, que_id)
        assert (entry["status"], entry["bsEuis"], entry["data"]) == ("queued", [], "beef")
        [event] = second.of("downlink")
        assert (event.payload["queId"], event.payload["state"], event.payload["reason"]) == (
            que_id, "queued", "the hub restarted")
        b = await second.station("bs-b", B)  # the stored best path: B serves it
        que = await b.expect("dlDataQue")
        assert (que["queId"], que["userData"]) == (que_id, [[0xBE, 0xEF]])
        await state_becomes(second, que_id, "accepted")
        assert (await stored(second, que_id))["attempts"] == 2
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_station_that_resumes_its_session_gets_what_was_queued_meanwhile_without_an_att_prp(
    tmp_path: Path, pki: PKI
) -> None:
    running = await start(tmp_path, pki, bssci={"resume_window": 60})
    try:
        service = running.service
        await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
        uuid = os.urandom(16)
        a = await connect(running, "bs-a", A, uuid)
        await a.expect("attPrp")
        await heard(running, a)
        a.transport.abortConnection()
        await a.lost
        await wait_for(lambda: A not in service.sessions)
        # Queued while its serving station is away ...
        queued = await service.queue_downlink(EP, b"\x07", actor="test")
        assert queued["status"] == "queued"
        # ... handed over as soon as the station resumes its session: no attPrp comes first to wait for.
        a = await connect(running, "bs-a", A, uuid, resume_ops=(a.next_op - 1, -1), expect_resume=True)
        que = await a.expect("dlDataQue")
        assert que["queId"] == queued["queId"]
        assert "attPrp" not in [m["command"] for m in a.seen]
        await state_becomes(running, queued["queId"], "accepted")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_detaching_the_end_point_ends_its_pending_downlinks_as_revoked(running: Running) -> None:
    service = running.service
    b = await attached_and_heard(running)
    held = (await service.queue_downlink(EP, b"\x01", actor="test"))["queId"]
    await b.expect("dlDataQue")
    b.transport.loseConnection()
    await b.lost
    waiting = (await service.queue_downlink(EP, b"\x02", actor="test"))["queId"]
    await service.detach(EP, actor="test")
    for que_id in (held, waiting):
        entry = await state_becomes(running, que_id, "revoked")
        assert entry["error"] == "the end point was detached"
    assert not service.downlink_queue.pending
