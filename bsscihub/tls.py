"""The mutual-TLS policy of the BSSCI listener (and of HTTPS when enabled): one
OpenSSL context, an endpoint wrapper with connection caps, and a (rate-limited) log line for every failed handshake."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast
from weakref import WeakKeyDictionary

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    ILoggingContext,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub.errors import UserFacingError
from bsscihub.logs import NoiseLimiter
from bsscihub.pki import cert_common_name

__all__ = [
    "ConnectionLimits",
    "ConnectionStats",
    "MutualTLSEndpoint",
    "application_protocol",
    "RevocationCheck",
    "ServerTLSPolicy",
    "TLSConfigError",
    "format_peer",
    "peer_certificate",
    "peer_common_name",
    "server_context_factory",
]

StrPath = str | os.PathLike[str]

#: Given a client certificate whose chain verified, a reason to refuse it, or None.
RevocationCheck = Callable[[x509.Certificate], "str | None"]

# Base stations on slow cellular links need a few round trips of RSA; a peer
# that has not finished after this long is holding a slot for nothing.
DEFAULT_HANDSHAKE_TIMEOUT = 60.0

# OpenSSL reasons that deserve a hint for the operator reading the log.
_HINTS = {
    "tlsv1 alert unknown ca": "the peer does not trust the hub certificate",
    "sslv3 alert bad certificate": "the peer rejected the hub certificate",
    "sslv3 alert certificate unknown": "the peer rejected the hub certificate",
    "unsupported protocol": "the peer offers nothing from TLS 1.2 up",
    "http request": "plain HTTP sent to the TLS port",
    "wrong version number": "not TLS, or a TLS version OpenSSL does not know",
}


class TLSConfigError(UserFacingError):
    """The TLS certificates or keys cannot be used."""


@attrs.define
class _Verification:
    """What the verify callback learned about one connection's peer."""

    reason: str | None = None
    # A policy decision (revocation), not a broken certificate chain.
    refused: bool = False
    revocation_checked: bool = False


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class ServerTLSPolicy:
    """Makes one OpenSSL server connection per accepted TCP connection, all
    sharing one context built once by server_context_factory, and is that
    context's verify callback."""

    context: SSL.Context
    is_revoked: RevocationCheck | None = None
    # Per connection: Twisted keeps the connection's app data for itself.
    _verifications: WeakKeyDictionary[SSL.Connection, _Verification] = attrs.field(
        factory=WeakKeyDictionary, init=False, repr=False
    )
    log = Logger()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        self._verifications[connection] = _Verification()
        return connection

    def verification(self, connection: SSL.Connection) -> _Verification | None:
        """What verifying this connection's peer certificate found."""
        return self._verifications.get(connection)

    def verify(
        self,
        connection: SSL.Connection,
        cert: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        """The OpenSSL verify callback: record why a chain failed, then consult
        the revocation check once the chain has verified."""
        # A connection made elsewhere on this context: verify, record nothing.
        state = self._verifications.get(connection) or _Verification()
        if not ok:
            if state.reason is None:
                state.reason = (
                    f"certificate verify failed ({_verify_error_string(errno)}):"
                    f" {_describe_chain_cert(cert.to_cryptography(), depth)}"
                )
            return False
        if depth != 0 or self.is_revoked is None or state.revocation_checked:
            return True
        state.revocation_checked = True
        leaf = cert.to_cryptography()
        serial = f"certificate serial {leaf.serial_number:#x} ({_subject(leaf)})"
        try:
            why = self.is_revoked(leaf)
        except Exception:  # noqa: BLE001 - any bug in the check must refuse
            # Fail closed: a broken check must not let a revoked station in.
            self.log.failure(
                "revocation check failed for {subject}", subject=_subject(leaf)
            )
            state.reason = f"{serial}: the revocation check failed"
        else:
            if why is None:
                return True
            state.reason = f"{serial} revoked: {why}"
        state.refused = True
        return False


def server_context_factory(
    ca_path: StrPath,
    cert_path: StrPath,
    key_path: StrPath,
    *,
    require_client_cert: bool = True,
    lenient: bool = False,
    is_revoked: RevocationCheck | None = None,
) -> IOpenSSLServerConnectionCreator:
    """The hub's TLS server policy: TLS 1.2+, the hub certificate, and client
    certificates verified against the CAs in ca_path only.

    lenient drops the strict X.509 checks (for base-station CAs without
    keyUsage) and nothing else. is_revoked may refuse a certificate whose chain
    verified; it runs inside the handshake on the reactor thread, so it must
    answer from memory.
    """
    ca_certs = _load_ca_bundle(Path(ca_path))
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_DH_USE
        | SSL.OP_SINGLE_ECDH_USE
        # A resumed session skips the verify callback, hence the revocation
        # check; base stations keep one long connection, so nothing is lost.
        | SSL.OP_NO_TICKET
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_session_id(b"bsscihub")
    try:
        context.use_certificate_chain_file(os.fsencode(cert_path))
    except SSL.Error as e:
        raise TLSConfigError(
            f"cannot load the hub certificate {cert_path}: {_reasons(e)}"
        ) from None
    try:
        context.use_privatekey_file(os.fsencode(key_path))
        context.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(
            f"cannot use the hub key {key_path} with {cert_path}: {_reasons(e)}"
        ) from None
    # Trust only these CAs: never the system store, which would let any
    # publicly issued certificate in.
    store = context.get_cert_store()
    if store is None:
        raise TLSConfigError("OpenSSL context has no certificate store")
    for ca in ca_certs:
        store.add_cert(crypto.X509.from_cryptography(ca))
        # Tells the base station which CA to pick its certificate for.
        context.add_client_ca(ca)
    if not lenient:
        store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    mode = SSL.VERIFY_PEER
    if require_client_cert:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    policy = ServerTLSPolicy(context, is_revoked)
    context.set_verify(mode, policy.verify)
    return policy


@attrs.define
class ConnectionStats:
    """What one TLS listener's connections are doing, for its metrics and tests."""

    open: int = 0
    handshaking: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    refused: dict[str, int] = attrs.Factory(lambda: {"max_connections": 0, "max_handshakes": 0})

    def collector(self, prefix: str) -> _StatsCollector:
        """A Prometheus collector exposing these figures as `{prefix}tls_...`."""
        return _StatsCollector(prefix, self)


class _StatsCollector:
    def __init__(self, prefix: str, stats: ConnectionStats) -> None:
        self._prefix, self._stats = prefix, stats

    def collect(self) -> Iterable[Metric]:
        p, stats = self._prefix + "tls_", self._stats
        yield GaugeMetricFamily(p + "connections", "open TCP connections, handshaking or not", value=stats.open)
        yield GaugeMetricFamily(p + "handshakes_pending", "connections whose TLS handshake is not done yet",
                                value=stats.handshaking)
        yield CounterMetricFamily(p + "handshake_failures", "TLS handshakes that failed or were refused",
                                  value=stats.handshake_failures)
        yield CounterMetricFamily(p + "handshake_timeouts", "connections cut for not finishing the handshake in time",
                                  value=stats.handshake_timeouts)
        refused = CounterMetricFamily(p + "refused", "connections closed at accept because a cap was reached",
                                      labels=["cap"])
        for cap, count in sorted(stats.refused.items()):
            refused.add_metric([cap], count)
        yield refused


@implementer(IHandshakeListener)
class _HandshakeWatch(Protocol):
    """Sits between the TLS layer and the application protocol: counts the connection against the
    listener's caps, cuts a handshake that takes too long, and logs once how the handshake ended
    (Twisted alone hands a failure to the application and logs nothing). The application gets the
    TLS transport itself, so only received data passes through here."""

    log = Logger()

    def __init__(self, factory: _MutualTLSFactory, app: IProtocol) -> None:
        self._factory = factory
        self._app = app
        self._peer = "unknown peer"
        self._done = False
        self._timed_out = False
        self._timeout_call: IDelayedCall | None = None

    @property
    def application(self) -> IProtocol:
        return self._app

    def logPrefix(self) -> str:
        app = self._app
        return app.logPrefix() if ILoggingContext.providedBy(app) else type(app).__name__  # type: ignore[attr-defined]

    def makeConnection(self, transport: ITransport) -> None:
        factory = self._factory
        self.transport = transport
        self.connected = True
        self._peer = format_peer(transport.getPeer())
        factory.stats.open += 1
        factory.stats.handshaking += 1
        if factory.handshake_timeout is not None:
            self._timeout_call = factory.clock.callLater(factory.handshake_timeout, self._handshakeTimedOut)
        self._app.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._app.dataReceived(data)

    def handshakeCompleted(self) -> None:
        self._done = True
        self._factory.stats.handshaking -= 1
        self._cancelTimeout()
        transport = cast(TLSMemoryBIOProtocol, self.transport)
        cert = peer_certificate(transport)
        self.log.info(
            "TLS handshake with {peer} completed: {subject}, {version}",
            peer=self._peer,
            subject=_subject(cert) if cert is not None else "no client certificate",
            version=transport.getHandle().get_protocol_version_name(),
        )
        if IHandshakeListener.providedBy(self._app):
            self._app.handshakeCompleted()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        stats = self._factory.stats
        stats.open -= 1
        if not self._done:
            self._done = True
            stats.handshaking -= 1
            stats.handshake_failures += 1
            self._reportFailure(reason)
        self._cancelTimeout()
        self.connected = False
        self._app.connectionLost(reason)

    def _handshakeTimedOut(self) -> None:
        self._timeout_call = None
        self._timed_out = True
        self._factory.stats.handshake_timeouts += 1
        cast(ITCPTransport, self.transport).abortConnection()

    def _cancelTimeout(self) -> None:
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None

    def _reportFailure(self, failure: Failure) -> None:
        factory = self._factory
        connection = cast(TLSMemoryBIOProtocol, self.transport).getHandle()
        state = None
        if connection is not None and isinstance(factory.policy, ServerTLSPolicy):
            state = factory.policy.verification(connection)
        outcome, level = "failed", LogLevel.warn
        if self._timed_out:
            why = f"no handshake within {factory.handshake_timeout:g} s"
        elif state is not None and state.reason is not None:
            why = state.reason
            if state.refused:
                outcome = "refused"
        elif isinstance(failure.value, SSL.Error):
            reasons = _reasons(failure.value)
            if "peer did not return a certificate" in reasons:
                outcome, why = "refused", "no client certificate"
            else:
                hints = [_HINTS[r] for r in _HINTS if r in reasons]
                why = reasons + (f" ({'; '.join(hints)})" if hints else "")
        else:
            why = "connection closed before the handshake completed"
            if connection is None or connection.client_random() is None:
                # No ClientHello: port probes and load-balancer health checks, not an incident.
                level = LogLevel.info
        factory.noise.emit(
            self.log,
            level,
            "TLS handshakes " + outcome,
            _host(self._peer),
            "TLS handshake with {peer} {outcome}: {reason}",
            peer=self._peer,
            outcome=outcome,
            reason=why,
        )


class _MutualTLSFactory(TLSMemoryBIOFactory):
    """TLS for every accepted connection, refused at accept (before any TLS state exists) when
    the listener is at one of its caps."""

    log = Logger()

    def __init__(
        self,
        policy: IOpenSSLServerConnectionCreator,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        handshake_timeout: float | None,
        limits: ConnectionLimits,
        stats: ConnectionStats,
    ) -> None:
        super().__init__(policy, False, wrappedFactory, clock=clock)
        self.policy = policy
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.limits = limits
        self.stats = stats
        self.noise = NoiseLimiter(clock, burst=limits.log_burst, interval=limits.log_interval)

    def buildProtocol(self, addr: IAddress) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        limits, stats = self.limits, self.stats
        cap = None
        if limits.max_connections is not None and stats.open >= limits.max_connections:
            cap, limit = "max_connections", limits.max_connections
        elif limits.max_handshakes is not None and stats.handshaking >= limits.max_handshakes:
            cap, limit = "max_handshakes", limits.max_handshakes
        if cap is not None:
            stats.refused[cap] += 1
            peer = format_peer(addr)
            self.noise.emit(
                self.log,
                LogLevel.warn,
                f"connections refused at {cap}",
                _host(peer),
                "refused a connection from {peer}: {count} {what} already ({cap} = {limit})",
                peer=peer,
                count=stats.open if cap == "max_connections" else stats.handshaking,
                what="connections open" if cap == "max_connections" else "TLS handshakes in progress",
                cap=cap,
                limit=limit,
            )
            # None: the port closes the socket at once.
            return None
        app = self.wrappedFactory.buildProtocol(addr)
        if app is None:
            return None
        return self.protocol(self, _HandshakeWatch(self, app))

    def doStop(self) -> None:
        self.noise.flush()
        super().doStop()


@attrs.frozen
class ConnectionLimits:
    """Caps of one TLS listener: open connections, and handshakes not finished yet (the cheap
    way to tie up a server's memory); None is no cap. Log lines about anonymous peers are
    limited to `log_burst` per kind per `log_interval` seconds, then summarized."""

    max_connections: int | None = None
    max_handshakes: int | None = None
    log_burst: int = 10
    log_interval: float = 60.0


@implementer(IStreamServerEndpoint)
@attrs.frozen
class MutualTLSEndpoint:
    """Any stream server endpoint (usually `tcp:16017`) with TLS on top, using
    the policy from server_context_factory."""

    endpoint: IStreamServerEndpoint
    policy: IOpenSSLServerConnectionCreator
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    clock: IReactorTime | None = None
    limits: ConnectionLimits = ConnectionLimits()
    stats: ConnectionStats = attrs.Factory(ConnectionStats)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        return self.endpoint.listen(
            _MutualTLSFactory(
                self.policy, protocolFactory, clock, self.handshake_timeout, self.limits, self.stats
            )
        )


def application_protocol(protocol: object) -> object:
    """The application protocol under one of MutualTLSEndpoint's TLS connections (for tests and
    tools; the application itself gets the TLS transport as its transport)."""
    wrapped = getattr(protocol, "wrappedProtocol", protocol)
    return wrapped.application if isinstance(wrapped, _HandshakeWatch) else wrapped


def _host(peer: str) -> str:
    """The address part of host:port ([v6]:port keeps its brackets)."""
    return peer.rsplit(":", 1)[0] if ":" in peer else peer


def peer_certificate(transport: object) -> x509.Certificate | None:
    """The client certificate of a TLS transport, once its handshake is done."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except (AttributeError, SSL.Error):
        # The TLS connection is already gone.
        return None
    if cert is None or isinstance(cert, x509.Certificate):
        return cert
    return cast(crypto.X509, cert).to_cryptography()


def peer_common_name(transport: object) -> str | None:
    """The CN of the client certificate: the base station's name."""
    cert = peer_certificate(transport)
    return None if cert is None else cert_common_name(cert)


def format_peer(address: object) -> str:
    """host:port for log lines, with IPv6 hosts in brackets."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    return "unknown peer" if address is None else str(address)


def _load_ca_bundle(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise TLSConfigError(f"cannot read the CA file {path}: {e.strerror}") from None
    except ValueError:
        raise TLSConfigError(f"{path} holds no PEM certificate") from None
    return certs


def _reasons(error: SSL.Error) -> str:
    """OpenSSL's reason strings from an error queue, without library names."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list):
        found = [
            str(e[2]) for e in queue if isinstance(e, tuple) and len(e) == 3 and e[2]
        ]
        if found:
            return "; ".join(dict.fromkeys(found))
    return str(error) or type(error).__name__


def _verify_error_string(errno: int) -> str:
    # pyOpenSSL has no public name for X509_verify_cert_error_string.
    try:
        from OpenSSL._util import ffi, lib

        return cast(
            bytes, ffi.string(lib.X509_verify_cert_error_string(errno))
        ).decode()
    except (ImportError, AttributeError):
        return f"X.509 verify error {errno}"


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "empty subject"


def _describe_chain_cert(cert: x509.Certificate, depth: int) -> str:
    if depth == 0:
        return f"{_subject(cert)} issued by {cert.issuer.rfc4514_string()}"
    return f"CA certificate {_subject(cert)} (chain depth {depth})"
