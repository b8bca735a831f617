"""Two hub processes (twistd) as one cluster on real PostgreSQL, Redis and Mosquitto, behind a real
HAProxy in TCP mode: copies of uplinks split across hubs, one hub killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater

from tests.broker import Mosquitto, Subscriber, free_port
from tests.conftest import _reset_pg_schema
from tests.helpers import CONFIG, TWISTD, clean_env
from tests.redis_server import redis_url
from tests.test_mioty_service import EP, PKI, A, B, Station, pki

__all__ = ["pki", "redis_url"]  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin")


def _ready(web: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


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
        env = clean_env(
            BSSCIHUB_DATABASE=self.database, BSSCIHUB_CLUSTER_REDIS=self.redis, BSSCIHUB_CLUSTER_NODE=node,
            BSSCIHUB_FAMILIES="mioty", BSSCIHUB_DATA_DIR=str(home / "data"),
            BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1",
            BSSCIHUB_BSSCI_LISTEN=f"tcp:{bssci}:interface=127.0.0.1",
            BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{self.broker.port}", BSSCIHUB_MIOTY_DEDUP_WINDOW="0.3",
            BSSCIHUB_TLS_CA=str(self.pki.ca), BSSCIHUB_TLS_CA_KEY=str(self.pki.ca_key),
            BSSCIHUB_TLS_CERT=str(self.pki.hub_cert), BSSCIHUB_TLS_KEY=str(self.pki.hub_key),
        )  # fmt: skip
        log = (home / "hub.log").open("wb")
        self.procs[node] = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG], env=env,
                                            cwd=home, stdout=log, stderr=subprocess.STDOUT)
        self.ports[node] = (bssci, web)
        deadline = time.monotonic() + 40
        while not _ready(web):
            assert self.procs[node].poll() is None, (home / "hub.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "hub not ready in 40 s"
            time.sleep(0.1)

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
        port = self.redis.rsplit(":", 1)[1].split("/")[0]
        out = subprocess.run(["redis-cli", "-p", port, "-n", "0", "HGET", "bsscihub:owners", f"mioty/{eui}"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        return str(json.loads(out)["node"]) if out else ""

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
