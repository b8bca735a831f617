"""The hub's BSSCI stack behind its real mutual-TLS policy, talking to base stations over TLS in memory
(iosim, a Clock for time): operations and error paths across the TLS layer, no sockets, no sleeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from bsscihub.family import installed_families
from bsscihub.hub import make_hub
from bsscihub.pki import create_ca, issue_client_cert
from bsscihub.protocols.bssci.framing import Framer, encode_frame
from bsscihub.protocols.bssci.identity import STATION
from bsscihub.protocols.bssci.protocol import CLOSE_GRACE, BSSCIFactory, BSSCIProtocol
from bsscihub.protocols.bssci.service import MiotyService
from bsscihub.protocols.bssci.session import EACCES, IServiceCenter, SessionConfig, SessionStats
from bsscihub.tls import MutualTLSEndpoint, application_protocol, peer_common_name
from tests import test_mioty_service, test_tls
from tests.conftest import make_config
from tests.test_bssci_session import BS_EUI, CONFIG, EP1, EP2, EP3, Center, status_rsp, ul_data
from tests.test_tls import BS_ADDRESS, HUB_ADDRESS, PEER, PKI, Pair

# Twisted's client options (the base-station side) still hand pyOpenSSL objects to pyOpenSSL.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

# The TLS tests' module-scoped PKI: a CA, the hub certificate, and base station bs-1 (bound to no bsEui).
pki = test_tls.pki
logged = test_mioty_service.logged  # the hub's log lines during one test

OTHER_ADDRESS = IPv4Address("TCP", "10.0.0.6", 40001)
OTHER_PEER = "10.0.0.6:40001"
OTHER_EUI = 0x00073200007767F4
BOUND_EUI = 0x00000000000000AA
SN_BS_UUID = bytes(range(16))
# What a base station answers by itself to the hub's operations while a test sets up.
AUTO_ANSWERS = {"attPrp": {}, "status": status_rsp()}


@implementer(IHandshakeListener)
class Station(Protocol):
    """The base station's application over TLS: decodes what the hub sends, records how the link ended."""

    def __init__(self) -> None:
        self._framer = Framer()
        self.inbox: list[dict[str, Any]] = []
        self.handshake_done = False
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.inbox.extend(self._framer.feed(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@attrs.define
class Link:
    """One base station's mutual-TLS connection to the hub, pumped in memory."""

    station: Station
    protocol: BSSCIProtocol
    """The hub's side of this connection, inside its TLS wrapper."""
    pump: IOPump
    next_op: int = 1

    def write(self, data: bytes, *, chunk: int | None = None) -> None:
        """Send raw bytes through TLS, in TLS writes of `chunk` bytes (each pumped to the hub alone)."""
        assert self.station.transport is not None
        step = chunk or len(data)
        for start in range(0, len(data), step):
            self.station.transport.write(data[start : start + step])
            self.pump.flush()

    def send(self, command: str, op: int | None = None, **fields: Any) -> int:
        if op is None:
            op, self.next_op = self.next_op, self.next_op + 1
        self.write(frame(command, op, **fields))
        return op

    def received(self) -> list[dict[str, Any]]:
        out, self.station.inbox = self.station.inbox, []
        return out

    def commands(self) -> list[tuple[str, int]]:
        return [(w["command"], w["opId"]) for w in self.received()]

    def con(self, bs_eui: int = BS_EUI) -> dict[str, Any]:
        """Send con; return the hub's one answer (conRsp or error)."""
        self.send(
            "con", 0, version="1.0.0", bsEui=bs_eui, vendor="Diehl Metering", bidi=True, snBsUuid=list(SN_BS_UUID)
        )
        [answer] = self.received()
        return answer

    def establish(self, bs_eui: int = BS_EUI) -> None:
        """con → conRsp → conCmp, then answer the attPrps and the status poll until the hub is quiet."""
        assert self.con(bs_eui)["command"] == "conRsp"
        self.send("conCmp", 0)
        while asked := [w for w in self.received() if w["command"] in AUTO_ANSWERS]:
            for w in asked:
                self.send(w["command"] + "Rsp", w["opId"], **AUTO_ANSWERS[w["command"]])

    @property
    def closed(self) -> bool:
        return self.station.lost is not None


@attrs.define
class Listener:
    """The BSSCI listener as MiotyService.prepare() builds it (BSSCIFactory inside MutualTLSEndpoint
    around the configured endpoint), on a memory reactor; `connect` accepts one base station over iosim."""

    clock: Clock
    tls_factory: IProtocolFactory
    links: list[Link] = attrs.Factory(list)

    def connect(self, pair: Pair | None, ca: Path, peer: IPv4Address = BS_ADDRESS) -> Link:
        """`pair` None: a station that offers no client certificate."""
        server = self.tls_factory.buildProtocol(peer)
        assert isinstance(server, TLSMemoryBIOProtocol)
        options = (pair.client(ca) if pair is not None
                   else optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.read_bytes())))
        client = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Station), clock=self.clock)
        client_tls = client.buildProtocol(HUB_ADDRESS)
        # Taken now: the TLS wrappers drop their application once the connection is lost.
        station, protocol = client_tls.wrappedProtocol, application_protocol(server)
        assert isinstance(station, Station) and isinstance(protocol, BSSCIProtocol)
        pump = connect(
            server,
            FakeTransport(server, True, hostAddress=HUB_ADDRESS, peerAddress=peer),
            client_tls,
            FakeTransport(client_tls, False, hostAddress=peer, peerAddress=HUB_ADDRESS),
            clock=self.clock,
        )
        link = Link(station, protocol, pump)
        self.links.append(link)
        return link

    def advance(self, seconds: float) -> None:
        """Let time pass on the hub's clock, then deliver whatever that made either side send."""
        self.clock.advance(seconds)
        for link in self.links:
            link.pump.flush()


def listen(
    policy: IOpenSSLServerConnectionCreator, center: IServiceCenter, clock: Clock, config: SessionConfig = CONFIG
) -> Listener:
    reactor = MemoryReactor()
    endpoint = MutualTLSEndpoint(serverFromString(reactor, "tcp:16017:backlog=1024"), policy, clock=clock)
    endpoint.listen(BSSCIFactory(center, config, clock, SessionStats(), 1 << 20))
    [(port, tls_factory, _backlog, _interface)] = reactor.tcpServers
    assert port == 16017
    return Listener(clock, tls_factory)


def frame(command: str, op: int, **fields: Any) -> bytes:
    return encode_frame({"command": command, "opId": op, **fields})


def record_reads(protocol: BSSCIProtocol, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the reads TLS hands to the hub's protocol from now on."""
    sizes: list[int] = []
    receive = protocol.dataReceived

    def spy(data: bytes) -> None:
        sizes.append(len(data))
        receive(data)

    monkeypatch.setattr(protocol, "dataReceived", spy)
    return sizes


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def center() -> Center:
    return Center()


@pytest.fixture
def hub(pki: PKI, center: Center, clock: Clock) -> Listener:
    return listen(pki.policy(), center, clock)


def test_station_with_a_valid_certificate_connects_and_gets_its_attachments_over_tls(
    pki: PKI, hub: Listener, center: Center, logged: list[str]
) -> None:
    bs = hub.connect(pki.bs, pki.ca)
    assert bs.station.handshake_done
    assert peer_common_name(bs.protocol.transport) == "bs-1"
    assert any(line.startswith(f"TLS handshake with {PEER} completed: CN=bs-1, TLSv1.") for line in logged)

    rsp = bs.con()
    assert (rsp["command"], rsp["opId"], rsp["scEui"]) == ("conRsp", 0, CONFIG.sc_eui)
    assert rsp["snResume"] is False
    assert isinstance(rsp["snScUuid"], list)  # byte strings go out as arrays of integers
    sc_uuid = bytes(rsp["snScUuid"])
    assert len(sc_uuid) == 16 and sc_uuid != SN_BS_UUID
    assert center.names() == ["connecting"]

    bs.send("conCmp", 0)
    sent = bs.received()
    assert center.names() == ["connecting", "ready"]
    # propagate_window 2: two attPrps, then the first status poll.
    assert [(w["command"], w["opId"], w.get("epEui")) for w in sent] == [
        ("attPrp", -1, EP1), ("attPrp", -2, EP2), ("status", -3, None),
    ]  # fmt: skip
    assert bytes(sent[0]["nwkSnKey"]) == bytes(range(16)) and sent[0]["lastPacketCnt"] == 7
    bs.send("attPrpRsp", -1)
    [(cmp_command, cmp_op), (prp_command, prp_op)] = bs.commands()
    assert (cmp_command, cmp_op, prp_command, prp_op) == ("attPrpCmp", -1, "attPrp", -4)
    bs.send("attPrpRsp", -2)
    bs.send("attPrpRsp", -4)
    assert bs.commands() == [("attPrpCmp", -2), ("attPrpCmp", -4)]
    assert not bs.closed
    # Fresh per connection: another station (same snBsUuid) gets another snScUuid.
    assert bytes(hub.connect(pki.bs, pki.ca, peer=OTHER_ADDRESS).con()["snScUuid"]) != sc_uuid


def test_ul_data_in_one_byte_tls_writes_is_answered_only_once_stored(
    pki: PKI, hub: Listener, center: Center, logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bs = hub.connect(pki.bs, pki.ca)
    bs.establish()
    reads = record_reads(bs.protocol, monkeypatch)
    data = frame("ulData", 1, **ul_data())
    bs.write(data[:-1], chunk=1)
    assert center.uplinks == [] and bs.received() == []
    bs.write(data[-1:])
    assert reads == [1] * len(data)
    [(msg, stored)] = center.uplinks
    assert (msg.epEui, msg.packetCnt, msg.userData) == (EP1, 1, b"\x01\x02\x03")
    hub.advance(1)
    assert bs.received() == []  # not before the copy is durable
    stored.callback(None)
    bs.pump.flush()
    assert bs.commands() == [("ulDataRsp", 1)]
    bs.write(frame("ulDataCmp", 1), chunk=1)
    assert bs.received() == [] and not bs.closed
    assert [line for line in logged if "unexpected" in line] == []
    bs.send("ulDataCmp", 1)  # the operation is over: a second completion finds nothing
    assert any("unexpected ulDataCmp (opId 1)" in line for line in logged)


def test_ul_data_frames_coalesced_into_one_tls_write_are_each_answered_once_stored(
    pki: PKI, hub: Listener, center: Center, logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bs = hub.connect(pki.bs, pki.ca)
    bs.establish()
    reads = record_reads(bs.protocol, monkeypatch)
    data = frame("ulData", 1, **ul_data()) + frame("ulData", 2, **ul_data(cnt=2)) + frame("ping", 3)
    bs.write(data)
    assert reads == [len(data)]
    assert [msg.packetCnt for msg, _ in center.uplinks] == [1, 2]
    assert bs.commands() == [("pingRsp", 3)]
    center.uplinks[1][1].callback(None)
    bs.pump.flush()
    assert bs.commands() == [("ulDataRsp", 2)]
    center.uplinks[0][1].callback(None)
    bs.pump.flush()
    assert bs.commands() == [("ulDataRsp", 1)]
    bs.write(frame("ulDataCmp", 2) + frame("ulDataCmp", 1) + frame("pingCmp", 3))
    assert bs.received() == [] and not bs.closed
    assert [line for line in logged if "unexpected" in line] == []


def test_idle_station_is_pinged_and_a_silent_one_is_disconnected(
    pki: PKI, hub: Listener, center: Center, logged: list[str]
) -> None:
    bs = hub.connect(pki.bs, pki.ca)
    bs.establish()
    hub.advance(CONFIG.ping_idle - 1)
    assert bs.received() == []
    hub.advance(1)
    [(command, op)] = bs.commands()
    assert command == "ping" and op < 0
    bs.send("pingRsp", op)
    assert bs.commands() == [("pingCmp", op)]

    hub.advance(CONFIG.ping_idle)
    [(command, op)] = bs.commands()
    assert command == "ping"
    hub.advance(CONFIG.ping_timeout - 1)
    assert not bs.closed
    hub.advance(1)
    assert bs.closed and bs.pump.serverIO.disconnected
    assert bs.protocol.session.closed and center.names()[-1] == "closed"
    assert any(
        line == f"base station {BS_EUI:016x} at {PEER} did not answer a ping within 30 s; closing" for line in logged
    )


def test_malformed_frame_closes_only_that_connection_and_names_the_peer(
    pki: PKI, hub: Listener, center: Center, logged: list[str]
) -> None:
    broken = hub.connect(pki.bs, pki.ca)
    broken.establish()
    healthy = hub.connect(pki.bs, pki.ca, peer=OTHER_ADDRESS)
    healthy.establish(OTHER_EUI)

    broken.write(b"GARBAGE!\x00\x00\x00\x00")
    assert broken.closed and broken.pump.serverIO.disconnected and broken.protocol.session.closed
    [line] = [line for line in logged if "bad frame identifier" in line]
    assert line.startswith(f"closing the connection of base station {BS_EUI:016x} at {PEER}: ")
    assert not healthy.closed and center.names().count("closed") == 1

    op = healthy.send("ulData", **ul_data(EP3))
    [(msg, stored)] = center.uplinks
    assert msg.epEui == EP3
    stored.callback(None)
    healthy.pump.flush()
    assert healthy.commands() == [("ulDataRsp", op)]
    assert not any(OTHER_PEER in line for line in logged if "closing" in line)


def test_station_that_never_completes_the_tls_close_is_cut_off(pki: PKI, hub: Listener) -> None:
    link = hub.connect(pki.bs, pki.ca)
    link.establish()
    link.pump.client.dataReceived = lambda data: None  # deaf from now on: never answers close_notify
    link.write(b"GARBAGE!\x00\x00\x00\x00")
    assert link.protocol.session.closed and not link.pump.serverIO.disconnected
    hub.advance(CLOSE_GRACE - 0.1)
    assert not link.pump.serverIO.disconnected
    hub.advance(0.1)
    assert link.pump.serverIO.disconnected
    assert not hub.clock.getDelayedCalls()  # nothing of that connection left behind


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pair]:
    """A station CA of its own, and a certificate from it that bsscihub.pki binds to bsEui BOUND_EUI."""
    d = tmp_path_factory.mktemp("bound")
    create_ca(d / "ca.pem", d / "ca.key", common_name="station CA")
    issued = issue_client_cert(d / "ca.pem", d / "ca.key", "bs-a", d / "bs", binding=STATION.bind(f"{BOUND_EUI:016x}"))
    return d / "ca.pem", Pair(issued.cert_path, issued.key_path)


@pytest.fixture
def service(tmp_path: Path, clock: Clock) -> MiotyService:
    """The real service center (the hub's IServiceCenter) on the test's Clock. Its storage is never
    started: the `con` checks run from memory, and the test stops before conCmp, which writes."""
    return MiotyService(make_hub(make_config(tmp_path), clock, installed_families()))


def test_con_claiming_another_bs_eui_than_its_certificate_is_refused(
    pki: PKI, bound: tuple[Path, Pair], service: MiotyService, clock: Clock, logged: list[str]
) -> None:
    station_ca, pair = bound
    hub = listen(pki.policy(ca=station_ca), service, clock, service.session_config)
    impostor = hub.connect(pair, pki.ca)
    assert impostor.station.handshake_done
    error = impostor.con(OTHER_EUI)
    assert (error["command"], error["opId"], error["code"]) == ("error", 0, EACCES)
    assert error["message"] == (
        f"the client certificate belongs to base station {BOUND_EUI:016x}, not to {OTHER_EUI:016x}"
    )
    assert impostor.closed and impostor.protocol.session.closed
    assert f"refused base station {OTHER_EUI:016x} at {PEER}: {error['message']}" in logged
    assert service.sessions == {} and service.counters.refused == 1

    # Under a policy that lets a station in without a certificate, the con is refused all the same.
    lax = listen(pki.policy(require_client_cert=False), service, clock, service.session_config)
    anonymous = lax.connect(None, pki.ca, peer=OTHER_ADDRESS)
    assert anonymous.station.handshake_done
    error = anonymous.con(BOUND_EUI)
    assert (error["command"], error["code"], error["message"]) == ("error", EACCES, "no client certificate")
    assert anonymous.closed and service.sessions == {}

    # The same certificate claiming its own bsEui is accepted.
    genuine = hub.connect(pair, pki.ca, peer=OTHER_ADDRESS)
    assert genuine.con(BOUND_EUI)["command"] == "conRsp"
    assert list(service.sessions) == [f"{BOUND_EUI:016x}"] and not genuine.closed


def test_an_unbound_certificate_cannot_claim_a_station_another_one_is_registering(
    pki: PKI, clock: Clock, tmp_path: Path, logged: list[str]
) -> None:
    # Unknown stations may register themselves; the first certificate to claim the bsEui holds it
    # from its con on, before anything is stored.
    config = make_config(tmp_path, bssci={"self_register": True})
    service = MiotyService(make_hub(config, clock, installed_families()))
    hub = listen(pki.policy(), service, clock, service.session_config)
    first = hub.connect(pki.bs, pki.ca)
    assert first.con(OTHER_EUI)["command"] == "conRsp"
    second = hub.connect(pki.revoked, pki.ca, peer=OTHER_ADDRESS)  # another certificate bound to no EUI
    error = second.con(OTHER_EUI)
    assert (error["command"], error["code"]) == ("error", EACCES)
    assert error["message"] == f"another certificate is connecting as base station {OTHER_EUI:016x}"
    assert second.closed and not first.closed
    assert f"refused base station {OTHER_EUI:016x} at {OTHER_PEER}: {error['message']}" in logged
    assert list(service.sessions) == [f"{OTHER_EUI:016x}"] and service.counters.refused == 1
