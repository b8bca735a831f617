"""Two hub processes (twistd) as one cluster on real PostgreSQL, Redis and Mosquitto, behind a real
HAProxy in TCP mode: copies of uplinks split across hubs, one hub killed with SIGKILL mid-run; attach,
detach and downlinks asked on one hub reach the other's stations, and a dead hub's downlink goes out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.broker import Mosquitto, Subscriber, free_port
from tests.cluster import HAPROXY, owner
from tests.cluster import ready as _ready
from tests.conftest import _reset_pg_schema
from tests.helpers import clean_env, start_hub
from tests.redis_server import redis_url
from tests.test_mioty_service import EP, PKI, A, B, Station, pki

__all__ = ["pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")



class Hubs:
    """Hub processes, HAProxy, and what the test needs to reach them."""

    def __init__(self, tmp: Path, pki: PKI, database: str, redis: str, broker: Mosquitto) -> None:
        self.tmp, self.pki, self.database, self.redis, self.broker = tmp, pki, database, redis, broker
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, tuple[int, int]] = {}  # node -> (bssci, web)
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.front = free_port()

    def start(self, node: str) -> None:
        bssci, web = free_port(), free_port()
        home = self.tmp / node
        home.mkdir()
        self.procs[node] = start_hub(
            home, home / "hub.log", web, bssci, self.broker, timeout=40,
            BSSCIHUB_DATABASE=self.database, BSSCIHUB_CLUSTER_REDIS=self.redis, BSSCIHUB_CLUSTER_NODE=node,
            BSSCIHUB_MIOTY_DEDUP_WINDOW="0.3",
            BSSCIHUB_TLS_CA=str(self.pki.ca), BSSCIHUB_TLS_CA_KEY=str(self.pki.ca_key),
            BSSCIHUB_TLS_CERT=str(self.pki.hub_cert), BSSCIHUB_TLS_KEY=str(self.pki.hub_key),
        )  # fmt: skip
        self.ports[node] = (bssci, web)

    def start_haproxy(self) -> None:
        assert HAPROXY is not None
        servers = "\n".join(f"    server {node} 127.0.0.1:{bssci} check port {web}"
                            for node, (bssci, web) in self.ports.items())
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    option redispatch
    retries 3
frontend bssci
    bind 127.0.0.1:{self.front}
    default_backend hubs
backend hubs
    balance leastconn
    option httpchk GET /health/ready
    default-server inter 300ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
""")
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # the first health checks
        assert self.haproxy.poll() is None

    def owner(self, eui: str) -> str:
        return owner(self.redis, eui)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.haproxy is not None:
            self.haproxy.kill()
            self.haproxy.wait()


@pytest.fixture
def hubs(tmp_path: Path, pki: PKI, postgres_url: str, redis_url: str, mosquitto: Mosquitto) -> Iterator[Hubs]:
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (./dev test installs it; or: apt-get install haproxy)")
    _reset_pg_schema(postgres_url)
    running = Hubs(tmp_path, pki, postgres_url, redis_url, mosquitto)
    try:
        running.start("hub1")  # migrates the schema first
        running.start("hub2")
        running.start_haproxy()
        yield running
    finally:
        running.stop()


async def connect(hubs: Hubs, name: str, eui: str, timeout: float = 15.0) -> Station:
    """A base station through HAProxy, until its session is up (tries again while a hub is going)."""
    pair = hubs.pki.bs[name]
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(hubs.pki.ca.read_bytes()),
                                  clientCertificate=PrivateCertificate.loadPEM(pair[0].read_bytes() +
                                                                               pair[1].read_bytes()))
    deadline = reactor.seconds() + timeout
    while True:
        try:
            endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", hubs.front, timeout=2))
            station = await connectProtocol(endpoint, Station())
            station.send("con", 0, version="1.0.0", bsEui=int(eui, 16), vendor="Test", model="T1", name=name,
                         bidi=True, snBsUuid=list(os.urandom(16)))
            await station.expect("conRsp", timeout=3)
            station.send("conCmp", 0)
            return station
        except Exception:
            if reactor.seconds() > deadline:
                raise
            await deferLater(reactor, 0.2, lambda: None)


async def send(station: Station, cnt: int, snr: float) -> bool:
    """One uplink copy; True once the hub acknowledged it (ulDataRsp)."""
    try:
        op = station.uplink(cnt=cnt, snr=snr)
        answer = await station.expect("ulDataRsp", timeout=3)
    except Exception:
        return False
    station.send("ulDataCmp", op)
    return bool(answer["opId"] == op)


@pytest_twisted.ensureDeferred
async def test_a_hub_killed_mid_run_loses_no_acknowledged_uplink(
    hubs: Hubs, subscriber_factory: Callable[..., Subscriber], mosquitto: Mosquitto
) -> None:
    witness = subscriber_factory(mosquitto, f"bsscihub/mioty/ep/{EP}/up")
    a = await connect(hubs, "bs-a", A)
    b = await connect(hubs, "bs-b", B)
    deadline = reactor.seconds() + 5
    while not (hubs.owner(A) and hubs.owner(B)) and reactor.seconds() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
    # leastconn spreads the two stations over the two hubs: every uplink's copies are split.
    assert {hubs.owner(A), hubs.owner(B)} == {"hub1", "hub2"}
    acked: set[int] = set()
    for cnt in range(1, 11):
        ok_a, ok_b = await send(a, cnt, 3.0), await send(b, cnt, 9.0)
        if ok_a or ok_b:
            acked.add(cnt)
    await deferLater(reactor, 1.0, lambda: None)
    split = [json.loads(m.payload) for m in witness.messages]
    assert sorted(p["packetCnt"] for p in split) == list(range(1, 11)), "each uplink published once"
    assert all([r["bsEui"] for r in p["receivers"]] == [B, A] for p in split), "with both receivers"

    # Kill the hub holding A inside the window of an uplink it collects (acknowledged, not yet
    # published), while A keeps sending.
    victim = hubs.owner(A)
    ok_a, ok_b = await send(a, 11, 3.0), await send(b, 11, 9.0)
    hubs.procs[victim].send_signal(signal.SIGKILL)
    killed_at = reactor.seconds()
    assert ok_a and ok_b
    acked.add(11)
    for cnt in range(12, 16):
        if await send(a, cnt, 3.0):
            acked.add(cnt)
    await a.lost
    a = await connect(hubs, "bs-a", A)
    reconnected = reactor.seconds() - killed_at
    assert reconnected < 10, f"A took {reconnected:.1f} s to reconnect"
    survivor = "hub2" if victim == "hub1" else "hub1"
    assert hubs.owner(A) == survivor
    for cnt in range(16, 26):
        ok_a, ok_b = await send(a, cnt, 3.0), await send(b, cnt, 9.0)
        if ok_a or ok_b:
            acked.add(cnt)
    assert set(range(16, 26)) <= acked
    # Orphans of the dead hub are adopted after the window and 5 s.
    deadline = reactor.seconds() + 15
    while reactor.seconds() < deadline:
        published = [json.loads(m.payload)["packetCnt"] for m in witness.messages]
        if acked <= set(published):
            break
        await deferLater(reactor, 0.2, lambda: None)
    published = [json.loads(m.payload)["packetCnt"] for m in witness.messages]
    assert acked <= set(published), f"acknowledged, never published: {sorted(acked - set(published))}"
    repeats = {cnt for cnt in published if published.count(cnt) > 1}
    assert repeats <= set(range(11, 16)), f"published twice outside the kill: {sorted(repeats)}"
    # The admin side of the survivor answers.
    assert _ready(hubs.ports[survivor][1])
    with urllib.request.urlopen(f"http://127.0.0.1:{hubs.ports[survivor][1]}/login", timeout=5) as r:
        assert r.status == 200
    print(f"failover: reconnected in {reconnected:.2f} s; {len(acked)} acknowledged uplinks, "
          f"{len(published)} published, repeats {sorted(repeats)}")


EP2 = "00112233445566e2"  # end points of their own: the other test's uplinks stay in Redis for a while
EP3 = "00112233445566e3"


async def _rest(web: int, method: str, path: str, token: str, body: Any = None) -> Any:
    """One REST call, in a thread: the stations on this reactor answer the hub meanwhile."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{web}/api/v1/mioty{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})

    def call() -> Any:
        with urllib.request.urlopen(request, timeout=15) as r:
            return json.load(r)

    return await deferToThread(call)


def _operator_token(hubs: Hubs, web: int) -> str:
    """A user added with the CLI in the shared database; its bearer token is good on every hub."""
    added = subprocess.run([sys.executable, "-m", "bsscihub.cli", "user", "add", "op", "--role", "operator"],
                           env=clean_env(BSSCIHUB_DATABASE=hubs.database, BSSCIHUB_DATA_DIR=str(hubs.tmp / "cli")),
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    password = added.stdout.split("(shown only now): ", 1)[1].split()[0]
    request = urllib.request.Request(f"http://127.0.0.1:{web}/api/v1/auth/token",
                                     data=json.dumps({"username": "op", "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return str(json.load(r)["token"])


async def _sent(station: Station, ep: str, que_id: int) -> None:
    """The station reports the downlink sent, and the hub confirms the report."""
    op = station.send("dlDataRes", epEui=int(ep, 16), queId=que_id, result="sent", txTime=7, packetCnt=2)
    assert (await station.expect("dlDataResRsp"))["opId"] == op
    station.send("dlDataResCmp", op)


@pytest_twisted.ensureDeferred
async def test_downlinks_reach_the_hub_holding_the_station_and_survive_the_death_of_theirs(
    hubs: Hubs, subscriber_factory: Callable[..., Subscriber], mosquitto: Mosquitto
) -> None:
    witness = subscriber_factory(mosquitto, f"bsscihub/mioty/ep/{EP2}/event/downlink")
    uplinks = subscriber_factory(mosquitto, f"bsscihub/mioty/ep/{EP2}/up")

    async def published(count: int) -> None:
        """Until the end point's `count`th uplink is out (its hub knows the receivers from then on)."""
        deadline = reactor.seconds() + 10
        while len(uplinks.messages) < count:
            assert reactor.seconds() < deadline, "the uplink was not published"
            await deferLater(reactor, 0.02, lambda: None)
    a = await connect(hubs, "bs-a", A)
    b = await connect(hubs, "bs-b", B)
    deadline = reactor.seconds() + 5
    while not (hubs.owner(A) and hubs.owner(B)) and reactor.seconds() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
    near, far = hubs.owner(A), hubs.owner(B)
    assert {near, far} == {"hub1", "hub2"}
    web = hubs.ports[near][1]  # every request below is made on A's hub
    token = _operator_token(hubs, web)

    # Attach and detach asked on A's hub reach B on the other hub.
    for ep in (EP2, EP3):
        body = {"eui": ep, "nwKey": "00" * 16, "shortAddr": "1a2b", "bidi": True}
        await _rest(web, "POST", "/sensors", token, body)
    prps = [await b.expect("attPrp"), await b.expect("attPrp")]
    assert sorted(p["epEui"] for p in prps) == [int(EP2, 16), int(EP3, 16)]
    assert (await _rest(web, "POST", f"/sensors/{EP3}/detach", token))["attached"] is False
    assert (await b.expect("detPrp"))["epEui"] == int(EP3, 16)

    # B hears EP2 and serves it: a downlink queued on A's hub goes out through B's.
    op = b.uplink(ep=EP2, cnt=1, snr=9.0)
    assert (await b.expect("ulDataRsp"))["opId"] == op
    b.send("ulDataCmp", op)
    await published(1)
    queued = await _rest(web, "POST", f"/sensors/{EP2}/downlinks", token, {"data": "beef"})
    assert (queued["status"], queued["baseStations"]) == ("accepted", [B])
    que = await b.expect("dlDataQue")
    assert (que["queId"], que["userData"]) == (queued["queId"], [[0xBE, 0xEF]])
    await _sent(b, EP2, queued["queId"])

    # Now A hears EP2 and serves it; a downlink A holds (accepted, not sent) when its hub is killed.
    op = a.uplink(ep=EP2, cnt=2, snr=9.0)
    assert (await a.expect("ulDataRsp"))["opId"] == op
    a.send("ulDataCmp", op)
    await published(2)
    held = await _rest(web, "POST", f"/sensors/{EP2}/downlinks", token, {"data": "cafe"})
    assert (held["status"], held["baseStations"]) == ("accepted", [A])
    assert (await a.expect("dlDataQue"))["queId"] == held["queId"]
    hubs.procs[near].send_signal(signal.SIGKILL)
    killed_at = reactor.seconds()
    await a.lost
    a = await connect(hubs, "bs-a", A)
    assert hubs.owner(A) == far
    # The surviving hub takes it over and sends it again on A's new session.
    que = await a.expect("dlDataQue")
    took = reactor.seconds() - killed_at
    assert (que["queId"], que["userData"]) == (held["queId"], [[0xCA, 0xFE]])
    await _sent(a, EP2, held["queId"])
    stored = await _rest(hubs.ports[far][1], "GET", f"/sensors/{EP2}/downlinks/{held['queId']}", token)
    assert (stored["status"], stored["resultBs"]) == ("sent", A)

    def events(que_id: int) -> list[str]:
        return [d["state"] for d in map(json.loads, (m.payload for m in witness.messages)) if d["queId"] == que_id]

    deadline = reactor.seconds() + 5
    while events(held["queId"])[-1:] != ["sent"] and reactor.seconds() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
    assert events(queued["queId"])[-1] == "sent"
    assert events(held["queId"])[-3:] == ["queued", "dispatched", "sent"] or events(held["queId"])[-4:] == [
        "queued", "dispatched", "accepted", "sent"]
    print(f"failover: the held downlink went out again {took:.2f} s after its hub was killed")
