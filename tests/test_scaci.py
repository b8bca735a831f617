"""SCACI: a mioty application center over real mutual TLS registers an end point, receives its uplinks from a base
station, and sends a downlink that reaches the station; the result comes back under the AC's own queue id."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from bsscihub.pki import issue_client_cert
from bsscihub.protocols.bssci.framing import Framer, FramingError, encode_frame
from bsscihub.protocols.bssci.identity import APPLICATION_CENTER
from bsscihub.protocols.bssci.scaci import MAGIC_AC
from tests import test_mioty_service
from tests.test_mioty_service import EP, KEY, PKI, Running, start, wait_for

pki = test_mioty_service.pki  # the fixture: a CA, the hub's and the stations' certificates

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

A = "00000000000000aa"
AC_EUI = 0x70B3D5FFFE000001


class AppCenter(Protocol):
    """An application center: frames with MIOTYA01, records what the hub sends."""

    def __init__(self) -> None:
        self.framer = Framer(magic=MAGIC_AC)
        self.inbox: list[dict[str, Any]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.next_op = 1

    def dataReceived(self, data: bytes) -> None:
        self.inbox.extend(self.framer.feed(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)

    def send(self, command: str, op: int | None = None, **fields: Any) -> int:
        if op is None:
            op, self.next_op = self.next_op, self.next_op + 1
        assert self.transport is not None
        self.transport.write(encode_frame({"command": command, "opId": op, **fields}, magic=MAGIC_AC))
        return op

    async def expect(self, command: str, op: int | None = None, timeout: float = 15.0) -> dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            for i, msg in enumerate(self.inbox):
                if msg["command"] == command and (op is None or msg["opId"] == op):
                    return self.inbox.pop(i)
            if reactor.seconds() > deadline or self.lost.called:
                raise AssertionError(f"no {command}; got {[m['command'] for m in self.inbox]}")
            await deferLater(reactor, 0.005, lambda: None)


@pytest.fixture
def running(tmp_path: Path, pki: PKI) -> Iterator[Running]:
    scaci = {"scaci": {"listen": "tcp:0:interface=127.0.0.1"}}
    hub = pytest_twisted.blockon(defer.ensureDeferred(start(tmp_path, pki, sections=scaci, dedup_window=0.1)))
    yield hub
    pytest_twisted.blockon(defer.ensureDeferred(hub.stop()))


async def app_center(running: Running, cert: Path, key: Path) -> AppCenter:
    pair = PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(running.pki.ca.read_bytes()),
                                  clientCertificate=pair)
    port = running.service.scaci_port.getHost().port
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return await connectProtocol(endpoint, AppCenter())


@pytest_twisted.ensureDeferred
async def test_an_application_center_registers_receives_uplinks_and_sends_a_downlink(running: Running,
                                                                                      tmp_path: Path) -> None:
    issued = issue_client_cert(running.pki.ca, running.pki.ca_key, "ac-1", tmp_path / "ac",
                               binding=APPLICATION_CENTER.bind())
    ac = await app_center(running, issued.cert_path, issued.key_path)
    ac.send("con", 0, version="1.0.0", acEui=AC_EUI, vendor="Test", model="AC", name="ac-1", swVersion="1",
            snAcUuid=list(os.urandom(16)))
    con = await ac.expect("conRsp", 0)
    assert con["version"] == "1.0.0" and con["scEui"] == int("70b3d59cd0000000", 16) and con["snResume"] is False
    assert len(con["snScUuid"]) == 16
    ac.send("conCmp", 0)
    await wait_for(lambda: running.service.scaci.connections)
    from prometheus_client import generate_latest

    assert "bsscihub_mioty_scaci_connections 1.0" in generate_latest(running.hub.metrics).decode()
    station = await running.station("bs-a", A)
    # status, with both field names the open clients read
    op = ac.send("status")
    status = await ac.expect("statusRsp", op)
    assert status["rc"] == status["code"] == 0 and status["baseStations"] == 1
    assert status["timeNs"] == status["time"] and [b["bsEui"] for b in status["basestations"]] == [int(A, 16)]
    # reg: the hub attaches the end point at the base station
    op = ac.send("reg", epEui=int(EP, 16), nwkKey=list(KEY), shAddr=0x1A2B, bidi=True)
    await ac.expect("regRsp", op)
    prp = await station.expect("attPrp")
    assert prp["epEui"] == int(EP, 16) and bytes(prp["nwkSnKey"]) == KEY and prp["shAddr"] == 0x1A2B
    stat = await ac.expect("epStat")
    assert stat["epEui"] == int(EP, 16) and stat["attached"] is True and stat["opId"] < 0
    # an uplink of the end point reaches the AC with its receivers; ulDataRsp is closed with ulDataCmp
    up_op = station.uplink(cnt=5, snr=6.5)
    await station.expect("ulDataRsp")
    station.send("ulDataCmp", up_op)
    ul = await ac.expect("ulData")
    assert ul["epEui"] == int(EP, 16) and ul["packetCnt"] == 5 and ul["userData"] == [1, 2, 3]
    assert [(r["bsEui"], r["snr"]) for r in ul["rxInfo"]] == [(int(A, 16), 6.5)]
    assert ul["opId"] < 0
    ac.send("ulDataRsp", ul["opId"])
    await ac.expect("ulDataCmp", ul["opId"])
    # a downlink with the AC's own queue id goes out as a BSSCI dlDataQue; its result comes back with that id
    op = ac.send("dlDataQue", epEui=int(EP, 16), queId=77, cntDepend=False, userData=[[0xCA, 0xFE]], format=3)
    await ac.expect("dlDataQueRsp", op)
    que = await station.expect("dlDataQue")
    assert que["userData"] == [[0xCA, 0xFE]] and que["format"] == 3 and que["epEui"] == int(EP, 16)
    res_op = station.send("dlDataRes", epEui=int(EP, 16), queId=que["queId"], result="sent", txTime=42,
                          packetCnt=6)
    await station.expect("dlDataResRsp", res_op)
    result = await ac.expect("dlDataRes")
    assert (result["queId"], result["result"], result["txTime"], result["packetCnt"]) == (77, "sent", 42, 6)
    # revoking a downlink the AC never queued is refused with the reason
    op = ac.send("dlDataRev", epEui=int(EP, 16), queId=99)
    error = await ac.expect("error", op)
    assert error["code"] == 2 and "no downlink 99" in error["message"]
    ac.send("errorAck", op)
    # unknown commands and sub-channel commands
    op = ac.send("frobnicate")
    assert (await ac.expect("error", op))["code"] == 95
    op = ac.send("rc.something")
    assert (await ac.expect("error", op))["code"] == 38
    # bad input: an error with the reason, the connection stays
    op = ac.send("reg", epEui="not an eui", nwkKey=list(KEY), shAddr=1, bidi=True)
    assert "epEui" in (await ac.expect("error", op))["message"]
    op = ac.send("ping")
    await ac.expect("pingRsp", op)
    # dereg: the hub detaches it at the base station
    op = ac.send("dereg", epEui=int(EP, 16))
    await ac.expect("deregRsp", op)
    detach = await station.expect("detPrp")
    assert detach["epEui"] == int(EP, 16)
    rows = await running.hub.store.fetchall("SELECT actor, action, source FROM audit_log ORDER BY id")
    assert [r for r in rows if r[2] == "scaci"] == [
        (f"ac:{AC_EUI:016x}", action, "scaci")
        for action in ("mioty.sensor.attach", "mioty.downlink.queue", "mioty.sensor.detach")]


@pytest_twisted.ensureDeferred
async def test_only_application_center_certificates_are_served(running: Running, tmp_path: Path) -> None:
    cert, key = running.pki.bs["bs-a"]  # a base station's certificate from the same CA
    ac = await app_center(running, cert, key)
    ac.send("con", 0, version="1.0.0", acEui=AC_EUI)
    await ac.lost
    assert not ac.inbox and not running.service.scaci.connections


@pytest_twisted.ensureDeferred
async def test_a_broken_frame_closes_that_connection_only(running: Running, tmp_path: Path) -> None:
    issued = issue_client_cert(running.pki.ca, running.pki.ca_key, "ac-2", tmp_path / "ac",
                               binding=APPLICATION_CENTER.bind())
    good = await app_center(running, issued.cert_path, issued.key_path)
    bad = await app_center(running, issued.cert_path, issued.key_path)
    for ac in (good, bad):
        ac.send("con", 0, version="1.0.0", acEui=AC_EUI)
        await ac.expect("conRsp", 0)
        ac.send("conCmp", 0)
    assert bad.transport is not None
    bad.transport.write(b"MIOTYB01\x01\x00\x00\x00\x80")  # the BSSCI identifier on the SCACI port
    await bad.lost
    op = good.send("ping")
    await good.expect("pingRsp", op)
    with pytest.raises(FramingError):
        Framer(magic=MAGIC_AC).feed(encode_frame({"command": "ping", "opId": 1}))


def test_application_center_certificates_are_marked_and_bound_to_no_station(tmp_path: Path, pki: PKI) -> None:
    from cryptography import x509

    from bsscihub.pki import PKIError
    from bsscihub.protocols.bssci.identity import cert_station, is_application_center

    issued = issue_client_cert(pki.ca, pki.ca_key, "ac-3", tmp_path,
                               binding=APPLICATION_CENTER.bind())
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    assert is_application_center(cert) and cert_station(cert) is None
    station = x509.load_pem_x509_certificate(pki.bs["bs-a"][0].read_bytes())
    assert not is_application_center(station)
    with pytest.raises(PKIError, match="bound to scaci.ac takes no subject"):
        APPLICATION_CENTER.bind("00000000000000aa")
