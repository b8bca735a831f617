"""Tests for the mutual-TLS server policy: real handshakes in memory (iosim)
between real certificates, and the log line each refused peer leaves."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import (
    LogEvent,
    LogLevel,
    formatEvent,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from bsscihub.pki import create_ca, issue_client_cert, issue_server_cert
from bsscihub.tls import (
    MutualTLSEndpoint,
    ServerTLSPolicy,
    TLSConfigError,
    application_protocol,
    format_peer,
    peer_certificate,
    peer_common_name,
    server_context_factory,
)
from tests.helpers import log_events

BS_ADDRESS = IPv4Address("TCP", "10.0.0.5", 43122)
HUB_ADDRESS = IPv4Address("TCP", "10.0.0.1", 16017)
PEER = "10.0.0.5:43122"

# Twisted's own client options (the base-station side here) still hand
# pyOpenSSL objects to pyOpenSSL.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


@attrs.frozen
class Pair:
    cert: Path
    key: Path

    def client(self, ca: Path) -> IOpenSSLClientConnectionCreator:
        """How a base station holding this pair and trusting ca connects."""
        return optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(ca.read_bytes()),
            clientCertificate=PrivateCertificate.loadPEM(
                self.cert.read_bytes() + self.key.read_bytes()
            ),
        )


@attrs.frozen
class PKI:
    ca: Path
    hub: Pair
    bs: Pair
    other: Pair
    legacy_ca: Path
    legacy_bs: Pair
    revoked: Pair
    revoked_serial: int

    def policy(self, **kwargs: object) -> IOpenSSLServerConnectionCreator:
        ca = kwargs.pop("ca", self.ca)
        return server_context_factory(ca, self.hub.cert, self.hub.key, **kwargs)  # type: ignore[arg-type]


def make_legacy_ca(cert_path: Path, key_path: Path) -> None:
    """A CA like those some base-station firmwares ship: CA:true, no keyUsage."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy vendor CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    create_ca(d / "ca.pem", d / "ca.key")
    issue_server_cert(d / "ca.pem", d / "ca.key", d / "hub.pem", d / "hub.key")
    bs = issue_client_cert(d / "ca.pem", d / "ca.key", "bs-1", d / "bs")
    revoked = issue_client_cert(d / "ca.pem", d / "ca.key", "bs-lost", d / "bs")
    create_ca(d / "other.pem", d / "other.key", common_name="other CA")
    other = issue_client_cert(d / "other.pem", d / "other.key", "bs-x", d / "other")
    make_legacy_ca(d / "legacy.pem", d / "legacy.key")
    legacy = issue_client_cert(
        d / "legacy.pem", d / "legacy.key", "bs-old", d / "legacy"
    )
    return PKI(
        ca=d / "ca.pem",
        hub=Pair(d / "hub.pem", d / "hub.key"),
        bs=Pair(bs.cert_path, bs.key_path),
        other=Pair(other.cert_path, other.key_path),
        legacy_ca=d / "legacy.pem",
        legacy_bs=Pair(legacy.cert_path, legacy.key_path),
        revoked=Pair(revoked.cert_path, revoked.key_path),
        revoked_serial=revoked.serial,
    )


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Events logged by bsscihub.tls during one test."""
    with log_events(lambda event: event.get("log_namespace", "").startswith("bsscihub.tls")) as captured:
        yield captured


def lines(events: list[LogEvent], level: LogLevel | None = None) -> list[str]:
    return [
        str(formatEvent(e)) for e in events if level is None or e["log_level"] is level
    ]


@implementer(IHandshakeListener)
class App(Protocol):
    """The application on either side: records what TLS delivered to it."""

    def __init__(self) -> None:
        self.received = b""
        self.handshake_done = False
        self.common_name: str | None = None
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.common_name = peer_common_name(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@attrs.define
class Connection:
    server: TLSMemoryBIOProtocol
    client: Protocol
    pump: IOPump
    clock: Clock
    # Kept here: the TLS wrappers drop their application once the connection is lost.
    server_app: App
    client_app: App | None

    @property
    def base_station(self) -> App:
        assert self.client_app is not None, "this client speaks no TLS"
        return self.client_app


def connect_to_hub(
    policy: IOpenSSLServerConnectionCreator,
    client: IOpenSSLClientConnectionCreator | Callable[[], Protocol],
    *,
    handshake_timeout: float | None = 60.0,
) -> Connection:
    """Listen with MutualTLSEndpoint on a memory reactor, accept one
    connection from BS_ADDRESS, and pump bytes until both sides are quiet."""
    clock, reactor = Clock(), MemoryReactor()
    endpoint = MutualTLSEndpoint(
        TCP4ServerEndpoint(reactor, 16017),
        policy,
        handshake_timeout=handshake_timeout,
        clock=clock,
    )
    endpoint.listen(Factory.forProtocol(App))
    [(port, tls_factory, _backlog, _interface)] = reactor.tcpServers
    assert port == 16017
    server = tls_factory.buildProtocol(BS_ADDRESS)
    assert isinstance(server, TLSMemoryBIOProtocol)
    if IOpenSSLClientConnectionCreator.providedBy(client):
        client_protocol = TLSMemoryBIOFactory(
            client, True, Factory.forProtocol(App), clock=clock
        ).buildProtocol(HUB_ADDRESS)
    else:
        client_protocol = client()
    server_app = application_protocol(server)
    assert isinstance(server_app, App)
    client_app = getattr(client_protocol, "wrappedProtocol", None)
    pump = connect(
        server,
        FakeTransport(server, True, hostAddress=HUB_ADDRESS, peerAddress=BS_ADDRESS),
        client_protocol,
        FakeTransport(
            client_protocol, False, hostAddress=BS_ADDRESS, peerAddress=HUB_ADDRESS
        ),
        clock=clock,
    )
    return Connection(server, client_protocol, pump, clock, server_app, client_app)


def assert_refused(conn: Connection) -> None:
    assert not conn.server_app.handshake_done
    assert conn.server_app.received == b""
    assert conn.server_app.lost is not None
    assert conn.base_station.lost is not None
    assert peer_certificate(conn.server) is None


def test_base_station_with_hub_certificate_connects(
    pki: PKI, events: list[LogEvent]
) -> None:
    conn = connect_to_hub(pki.policy(), pki.bs.client(pki.ca))
    assert conn.server_app.handshake_done and conn.base_station.handshake_done
    assert conn.server_app.common_name == "bs-1"
    assert peer_common_name(conn.server) == "bs-1"
    cert = peer_certificate(conn.server)
    assert cert is not None
    assert cert.public_bytes(serialization.Encoding.PEM) == pki.bs.cert.read_bytes()

    conn.base_station.send(b"MIOTYB01 con")
    conn.pump.flush()
    assert conn.server_app.received == b"MIOTYB01 con"
    conn.server_app.send(b"MIOTYB01 conRsp")
    conn.pump.flush()
    assert conn.base_station.received == b"MIOTYB01 conRsp"
    assert conn.server_app.lost is None

    assert lines(events, LogLevel.warn) == []
    [done] = lines(events)
    assert done.startswith(f"TLS handshake with {PEER} completed: CN=bs-1, TLSv1.")


def test_client_without_certificate_is_refused(
    pki: PKI, events: list[LogEvent]
) -> None:
    no_cert = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(pki.ca.read_bytes())
    )
    conn = connect_to_hub(pki.policy(), no_cert)
    assert_refused(conn)
    assert lines(events) == [
        f"TLS handshake with {PEER} refused: no client certificate"
    ]
    assert events[0]["log_level"] is LogLevel.warn
    assert events[0]["peer"] == PEER


@pytest.mark.parametrize("lenient", [False, True])
def test_certificate_from_another_ca_is_refused(
    pki: PKI, events: list[LogEvent], lenient: bool
) -> None:
    conn = connect_to_hub(pki.policy(lenient=lenient), pki.other.client(pki.ca))
    assert_refused(conn)
    assert lines(events, LogLevel.warn) == [
        (
            f"TLS handshake with {PEER} failed: certificate verify failed"
            " (unable to get local issuer certificate): CN=bs-x issued by CN=other CA"
        )
    ]


def test_server_certificate_is_no_client_certificate(
    pki: PKI, events: list[LogEvent]
) -> None:
    # Same CA, but serverAuth only: OpenSSL checks the purpose of client certs.
    conn = connect_to_hub(pki.policy(), pki.hub.client(pki.ca))
    assert_refused(conn)
    [line] = lines(events, LogLevel.warn)
    assert "(unsuitable certificate purpose): CN=localhost" in line


def test_legacy_ca_without_key_usage_needs_lenient(
    pki: PKI, events: list[LogEvent]
) -> None:
    strict = connect_to_hub(pki.policy(ca=pki.legacy_ca), pki.legacy_bs.client(pki.ca))
    assert_refused(strict)
    [line] = lines(events, LogLevel.warn)
    assert line.startswith(
        f"TLS handshake with {PEER} failed: certificate verify failed"
    )
    assert "key usage" in line and "CN=legacy vendor CA" in line

    del events[:]
    lenient = connect_to_hub(
        pki.policy(ca=pki.legacy_ca, lenient=True), pki.legacy_bs.client(pki.ca)
    )
    assert lenient.server_app.common_name == "bs-old"
    lenient.base_station.send(b"ping")
    lenient.pump.flush()
    assert lenient.server_app.received == b"ping"
    assert lines(events, LogLevel.warn) == []


def test_revoked_certificate_is_refused(pki: PKI, events: list[LogEvent]) -> None:
    seen: list[str | None] = []

    def is_revoked(cert: x509.Certificate) -> str | None:
        seen.append(cert.subject.rfc4514_string())
        return "reported stolen" if cert.serial_number == pki.revoked_serial else None

    policy = pki.policy(is_revoked=is_revoked)
    refused = connect_to_hub(policy, pki.revoked.client(pki.ca))
    assert_refused(refused)
    assert lines(events, LogLevel.warn) == [
        (
            f"TLS handshake with {PEER} refused: certificate serial"
            f" {pki.revoked_serial:#x} (CN=bs-lost) revoked: reported stolen"
        )
    ]

    # Same policy, a station in good standing: consulted once, let in.
    accepted = connect_to_hub(policy, pki.bs.client(pki.ca))
    assert accepted.server_app.common_name == "bs-1"
    assert seen == ["CN=bs-lost", "CN=bs-1"]


def test_failing_revocation_check_refuses(pki: PKI, events: list[LogEvent]) -> None:
    def is_revoked(cert: x509.Certificate) -> str | None:
        raise RuntimeError("registry unavailable")

    conn = connect_to_hub(pki.policy(is_revoked=is_revoked), pki.bs.client(pki.ca))
    assert_refused(conn)
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [
        RuntimeError
    ]
    assert lines(events, LogLevel.warn) == [
        (
            f"TLS handshake with {PEER} refused: certificate serial"
            f" {peer_serial(pki.bs)} (CN=bs-1): the revocation check failed"
        )
    ]


def peer_serial(pair: Pair) -> str:
    return f"{x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number:#x}"


@implementer(IOpenSSLClientConnectionCreator)
class CappedClient:
    """A base station whose TLS stack stops at max_version."""

    def __init__(self, pair: Pair, ca: Path, max_version: int) -> None:
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_VERSION)
        self.context.set_max_proto_version(max_version)
        if max_version < SSL.TLS1_2_VERSION:
            # OpenSSL 3 offers TLS 1.0/1.1 only at security level 0.
            self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context.use_certificate_file(str(pair.cert))
        self.context.use_privatekey_file(str(pair.key))
        self.context.load_verify_locations(str(ca))
        self.context.set_verify(SSL.VERIFY_PEER)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        return connection

    def can_offer(self) -> bool:
        """Whether this OpenSSL can send a ClientHello at all with these limits."""
        try:
            self.clientConnectionForTLS(None).do_handshake()
        except SSL.WantReadError:
            return True
        except SSL.Error:
            return False
        return True


def test_tls12_only_base_station_connects(pki: PKI, events: list[LogEvent]) -> None:
    policy = pki.policy()
    conn = connect_to_hub(policy, CappedClient(pki.bs, pki.ca, SSL.TLS1_2_VERSION))
    assert conn.server_app.common_name == "bs-1"
    assert lines(events) == [f"TLS handshake with {PEER} completed: CN=bs-1, TLSv1.2"]
    assert_refused(
        connect_to_hub(policy, CappedClient(pki.other, pki.ca, SSL.TLS1_2_VERSION))
    )
    assert "unable to get local issuer certificate" in lines(events)[-1]


def test_tls11_client_is_refused(pki: PKI, events: list[LogEvent]) -> None:
    old = CappedClient(pki.bs, pki.ca, SSL.TLS1_1_VERSION)
    if not old.can_offer():
        pytest.skip("the local OpenSSL cannot offer TLS 1.1")
    conn = connect_to_hub(pki.policy(), old)
    assert_refused(conn)
    assert lines(events, LogLevel.warn) == [
        (
            f"TLS handshake with {PEER} failed: unsupported protocol"
            " (the peer offers nothing from TLS 1.2 up)"
        )
    ]


def test_stalled_handshake_times_out(pki: PKI, events: list[LogEvent]) -> None:
    conn = connect_to_hub(pki.policy(), Protocol, handshake_timeout=30)
    conn.clock.advance(29)
    conn.pump.flush()
    assert conn.server_app.lost is None
    conn.clock.advance(1)
    conn.pump.flush()
    assert conn.server_app.lost is not None
    assert lines(events, LogLevel.warn) == [
        f"TLS handshake with {PEER} failed: no handshake within 30 s"
    ]


def test_probe_without_bytes_is_logged_quietly(
    pki: PKI, events: list[LogEvent]
) -> None:
    conn = connect_to_hub(pki.policy(), Protocol)
    assert conn.client.transport is not None
    conn.client.transport.loseConnection()
    conn.pump.flush()
    assert conn.server_app.lost is not None
    assert lines(events, LogLevel.warn) == []
    assert lines(events, LogLevel.info) == [
        (
            f"TLS handshake with {PEER} failed:"
            " connection closed before the handshake completed"
        )
    ]


def test_plain_http_on_the_tls_port(pki: PKI, events: list[LogEvent]) -> None:
    class Browser(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n")

    connect_to_hub(pki.policy(), Browser)
    [line] = lines(events, LogLevel.warn)
    assert line.startswith(f"TLS handshake with {PEER} failed: http request")


def test_optional_client_certificate(pki: PKI, events: list[LogEvent]) -> None:
    no_cert = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(pki.ca.read_bytes())
    )
    policy = pki.policy(require_client_cert=False)
    conn = connect_to_hub(policy, no_cert)
    assert conn.server_app.handshake_done
    assert conn.server_app.common_name is None
    assert lines(events) == [
        f"TLS handshake with {PEER} completed: no client certificate, TLSv1.3"
    ]
    # Offered certificates are still verified.
    assert_refused(connect_to_hub(policy, pki.other.client(pki.ca)))


def test_one_context_for_all_connections(pki: PKI) -> None:
    policy = pki.policy()
    assert isinstance(policy, ServerTLSPolicy)
    a = policy.serverConnectionForTLS(None)
    b = policy.serverConnectionForTLS(None)
    assert a is not b
    assert a.get_context() is b.get_context() is policy.context


def test_bad_configuration_is_reported(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="CA file"):
        server_context_factory(tmp_path / "none.pem", pki.hub.cert, pki.hub.key)
    with pytest.raises(TLSConfigError, match="hub key"):
        server_context_factory(pki.ca, pki.hub.cert, pki.bs.key)
    with pytest.raises(TLSConfigError, match="hub certificate"):
        server_context_factory(pki.ca, tmp_path / "none.pem", pki.hub.key)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (IPv4Address("TCP", "192.0.2.7", 5000), "192.0.2.7:5000"),
        (IPv6Address("TCP", "2001:db8::7", 5000), "[2001:db8::7]:5000"),
        (None, "unknown peer"),
    ],
)
def test_format_peer(address: object, expected: str) -> None:
    assert format_peer(address) == expected
