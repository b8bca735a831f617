"""Two mioty hubs in one process on a real Redis and PostgreSQL: attach, detach, downlinks, their
revocation and reception status asked on one hub reach the stations of the other, and a station that
moves takes its downlinks with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.cluster import MiotyHubs, mioty_hubs
from tests.redis_server import redis_url
from tests.test_mioty_service import EP, KEY, PKI, A, B, Running, Station, attached_and_heard, heard, pki, wait_for

__all__ = ["mioty_hubs", "pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def commands(station: Station, command: str) -> list[dict[str, Any]]:
    return [m for m in station.seen if m["command"] == command]


def states(running: Running, que_id: int) -> list[str]:
    return [e.payload["state"] for e in running.of("downlink") if e.payload["queId"] == que_id]


async def stored(running: Running, que_id: int, keeper: Running) -> dict[str, Any]:
    await keeper.service.downlink_queue.flush()
    entry = await running.service.downlink(EP, que_id)
    assert entry is not None
    return entry


async def waiting_downlink(keeper: Running, other: Running, name: str, eui: str, cnt: int) -> dict[str, Any]:
    """EP attached on `keeper` and heard through its station `name`, which goes away (`other` sees nobody hold
    it); a downlink then queued on `keeper` waits there: its answer."""
    station = await attached_and_heard(keeper, name, eui, cnt=cnt)
    station.transport.loseConnection()
    await station.lost
    await wait_for(lambda: other.hub.cluster.ownership.owner("mioty", eui) is None)
    queued = await keeper.service.queue_downlink(EP, "beef", actor="test")
    assert queued["status"] == "queued"  # its serving station is away: the hub keeps it
    return queued


@pytest_twisted.ensureDeferred
async def test_what_one_hub_is_asked_reaches_the_stations_of_the_other(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    b = await two.station("bs-b", B)
    await wait_for(lambda: one.hub.cluster.ownership.owner("mioty", B) == "hub-2")
    # Attached on hub-1, which holds no station: the attPrp goes out on hub-2, and the answer says so.
    attached = await one.service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    assert attached["baseStations"] == [B]
    prp = await b.expect("attPrp")
    assert (prp["epEui"], prp["shAddr"], bytes(prp["nwkSnKey"])) == (int(EP, 16), 0x1A2B, KEY)
    await heard(two, b)  # B serves the end point's downlinks now

    # Queued on hub-1: hub-2 keeps it and dispatches it to B; the answer is B's.
    queued = await one.service.queue_downlink(EP, "beef", actor="test")
    assert (queued["status"], queued["baseStations"]) == ("accepted", [B])
    que = await b.expect("dlDataQue")
    assert (que["queId"], que["userData"]) == (queued["queId"], [[0xBE, 0xEF]])
    assert queued["queId"] in two.service.downlink_queue.pending
    assert queued["queId"] not in one.service.downlink_queue.pending
    assert (await stored(one, queued["queId"], two))["bsEuis"] == [B]
    # Revoked on hub-1: the dlDataRev reaches B through hub-2, which keeps it.
    revoked = await one.service.revoke_downlink(EP, queued["queId"], actor="test")
    assert (revoked["status"], revoked["problems"]) == ("revoked", [])
    assert (await b.expect("dlDataRev"))["queId"] == queued["queId"]
    await wait_for(lambda: states(two, queued["queId"])[-1:] == ["revoked"])

    # Reception status asked on hub-1: B, on the end point's path, is asked on hub-2.
    asked = await one.service.query_dl_rx_status(EP)
    assert asked["baseStations"] == [B]
    assert (await b.expect("dlRxStatQry"))["epEui"] == int(EP, 16)

    # One more, sent: its result reaches the database and hub-2's downlink event.
    queued = await one.service.queue_downlink(EP, "cafe", actor="test")
    assert (await b.expect("dlDataQue"))["queId"] == queued["queId"]
    op = b.send("dlDataRes", epEui=int(EP, 16), queId=queued["queId"], result="sent", txTime=7, packetCnt=20)
    await b.expect("dlDataResRsp")
    b.send("dlDataResCmp", op)
    assert states(two, queued["queId"])[-1] == "sent"
    assert (await stored(one, queued["queId"], two))["status"] == "sent"
    # The end point acknowledges it (dlAck in its next uplink) through A on hub-1, which did not send it.
    a = await one.station("bs-a", A)
    await heard(one, a, cnt=21, dlAck=True, dlOpen=False)  # each test its own counters: Redis remembers
    await wait_for(lambda: [e.payload["event"] for e in one.of("downlink")
                            if e.payload["queId"] == queued["queId"]] == ["queue", "ack"])
    assert (await stored(one, queued["queId"], two))["acked"] is True

    # Detached on hub-1: detPrp on hub-2's station.
    detached = await one.service.detach(EP, actor="test")
    assert detached["baseStations"] == [A, B]
    assert (await b.expect("detPrp"))["epEui"] == int(EP, 16)


@pytest_twisted.ensureDeferred
async def test_a_station_that_moves_takes_its_downlinks_and_only_one_hub_keeps_them(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    await one.service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
    first = await two.station("bs-b", B)
    await first.expect("attPrp")
    await heard(two, first, cnt=2)  # not the first test's uplink, still remembered in Redis
    queued = await two.service.queue_downlink(EP, "beef", actor="test")
    await first.expect("dlDataQue")
    assert queued["status"] == "accepted"  # B holds it, and never reports on this connection
    await two.service.registry.flush_state()  # as every mioty.flush_interval
    # B connects to hub-1 (hub-2 closes the older connection): hub-1 keeps the downlink and sends it
    # again; hub-2 forgets it and writes nothing more about it.
    second = await one.station("bs-b", B)
    await first.lost
    # Its attPrp from hub-1 carries the session as hub-2 left it: key, and the packet counter hub-2 heard.
    prp = await second.expect("attPrp")
    assert (prp["epEui"], bytes(prp["nwkSnKey"]), prp["lastPacketCnt"]) == (int(EP, 16), KEY, 2)
    que = await second.expect("dlDataQue")
    assert que["queId"] == queued["queId"]
    await wait_for(lambda: queued["queId"] not in two.service.downlink_queue.pending)
    assert queued["queId"] in one.service.downlink_queue.pending
    op = second.send("dlDataRes", epEui=int(EP, 16), queId=queued["queId"], result="sent", txTime=7,
                     packetCnt=2)
    await second.expect("dlDataResRsp")
    second.send("dlDataResCmp", op)
    await wait_for(lambda: states(one, queued["queId"])[-1:] == ["sent"], "hub-1 reports the downlink sent")
    entry = await stored(one, queued["queId"], one)
    assert (entry["status"], entry["resultBs"]) == ("sent", B)
    assert states(one, queued["queId"])[-1] == "sent"
    assert "sent" not in states(two, queued["queId"]) and states(two, queued["queId"])[-1] == "accepted"
    # hub-1 heard nothing of the end point for 40 h as far as its memory goes; hub-2 heard it just now
    # (written back): it is not silent, so hub-1 neither warns nor detaches.
    long_ago = reactor.seconds() - 40 * 3600
    assert one.service.lease.held  # started first: hub-1 judges silence for the cluster
    one.service.started_at = one.service.registry.sensors[EP].last_seen = long_ago
    await one.service.check_lifecycle()
    assert not one.of("inactivity_warning") and not one.of("auto_detach")
    assert one.service.registry.sensors[EP].last_seen > long_ago


@pytest_twisted.ensureDeferred
async def test_a_downlink_whose_hub_is_gone_is_adopted_and_sent_when_its_station_comes(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    queued = await waiting_downlink(two, one, "bs-b", B, cnt=3)  # B is away: hub-2 keeps it
    # hub-2 goes away for good with the downlink; hub-1 adopts it (its sweep runs every 2 s).
    await mioty_hubs.stop(two)
    await wait_for(lambda: queued["queId"] in one.service.downlink_queue.pending)
    [row] = await one.service.registry.pending_downlinks([queued["queId"]])
    assert (row[7], row[10]) == ("queued", "hub-1")
    # B comes back, to hub-1: the downlink goes out there.
    back = await one.station("bs-b", B)
    assert (await back.expect("dlDataQue"))["queId"] == queued["queId"]


@pytest_twisted.ensureDeferred
async def test_a_waiting_downlink_follows_its_end_point_to_a_station_on_another_hub(mioty_hubs: MiotyHubs) -> None:
    one, two = await mioty_hubs.two()
    queued = await waiting_downlink(one, two, "bs-a", A, cnt=4)  # A, its serving station, is away: hub-1 keeps it
    # The end point is heard through B on hub-2 from now on (written back as every flush_interval), with
    # no downlink window opened.
    b = await two.station("bs-b", B)
    await heard(two, b, cnt=5, dlOpen=False)
    await two.service.registry.flush_state()
    assert not [m for m in b.seen if m["command"] == "dlDataQue"]
    # hub-1 learns it (as before judging silence) and hands the downlink to hub-2, which sends it via B.
    await one.service.registry.refresh_state()
    assert await one.service.hand_over_downlinks() == 1
    assert (await b.expect("dlDataQue"))["queId"] == queued["queId"]
    assert queued["queId"] in two.service.downlink_queue.pending
    assert queued["queId"] not in one.service.downlink_queue.pending


@pytest_twisted.ensureDeferred
async def test_a_dlopen_uplink_on_another_hub_sends_the_waiting_downlink_through_its_receiver(
    mioty_hubs: MiotyHubs
) -> None:
    one, two = await mioty_hubs.two()
    queued = await waiting_downlink(one, two, "bs-a", A, cnt=6)  # A is away: hub-1 keeps it
    await wait_for(lambda: two.service.remote_waiting.get(EP) == "hub-1")  # and hub-2 learns that it waits
    # A hub started later learns it too.
    three = await mioty_hubs.start("hub-3")
    assert three.service.remote_waiting == {EP: "hub-1"}
    await mioty_hubs.stop(three)
    # The end point's next uplink, with dlOpen, comes through B on hub-2: the downlink goes out via B at once
    # (nothing else would send it: for hub-1, A still serves it until it reads hub-2's write-back).
    b = await two.station("bs-b", B)
    await heard(two, b, cnt=7, dlOpen=True)
    assert (await b.expect("dlDataQue", timeout=5))["queId"] == queued["queId"]
    await wait_for(lambda: two.service.remote_waiting.get(EP) is None)


@pytest_twisted.ensureDeferred
async def test_an_application_center_on_one_hub_gets_the_result_of_its_downlink_sent_by_the_other(
    mioty_hubs: MiotyHubs, tmp_path: Path, pki: PKI
) -> None:
    from bsscihub.pki import issue_client_cert
    from bsscihub.protocols.bssci.identity import APPLICATION_CENTER
    from tests.test_scaci import AC_EUI, app_center

    one, two = await mioty_hubs.two(scaci={"listen": "tcp:0:interface=127.0.0.1"})
    issued = issue_client_cert(pki.ca, pki.ca_key, "ac-1", tmp_path / "ac", binding=APPLICATION_CENTER.bind())
    ac = await app_center(one, issued.cert_path, issued.key_path)
    ac.send("con", 0, version="1.0.0", acEui=AC_EUI, vendor="Test", model="AC", name="ac-1", swVersion="1",
            snAcUuid=list(os.urandom(16)))
    await ac.expect("conRsp", 0)
    ac.send("conCmp", 0)
    b = await two.station("bs-b", B)
    op = ac.send("reg", epEui=int(EP, 16), nwkKey=list(KEY), shAddr=0x1A2B, bidi=True)
    await ac.expect("regRsp", op)
    await b.expect("attPrp")  # registered on hub-1, attached at B on hub-2
    await heard(two, b, cnt=8, dlOpen=False)
    # The AC's downlink, queued on hub-1, goes out through B on hub-2; its result comes back to the AC.
    op = ac.send("dlDataQue", epEui=int(EP, 16), queId=77, cntDepend=False, userData=[[0xCA, 0xFE]])
    await ac.expect("dlDataQueRsp", op)
    que = await b.expect("dlDataQue")
    res = b.send("dlDataRes", epEui=int(EP, 16), queId=que["queId"], result="sent", txTime=42, packetCnt=9)
    await b.expect("dlDataResRsp", timeout=5)
    b.send("dlDataResCmp", res)
    result = await ac.expect("dlDataRes", timeout=5)
    assert (result["queId"], result["result"], result["txTime"], result["packetCnt"]) == (77, "sent", 42, 9)
    assert [e for e in two.of("dl_result") if e.payload["queId"] == que["queId"]]
    assert not one.of("dl_result")  # hub-1 only relayed it to its AC
