"""The BSSCI connection as a Twisted protocol: bytes to frames to the session, frames back to the transport.
Thin on purpose: the rules live in session.py; a framing error closes this one connection with a log line."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub.protocols.bssci.framing import Framer, FramingError
from bsscihub.protocols.bssci.session import IServiceCenter, Session, SessionConfig, SessionStats
from bsscihub.tls import format_peer, peer_certificate

__all__ = ["CLOSE_GRACE", "BSSCIFactory", "BSSCIProtocol"]

# A TLS close waits for the peer's close_notify; one that never sends it is cut off after this.
CLOSE_GRACE = 5.0


@implementer(IHandshakeListener)
class BSSCIProtocol(Protocol):
    """One base-station connection. Under TLS, connectionMade runs before the handshake; the
    client certificate is read in handshakeCompleted (no frame can arrive before it)."""

    log = Logger()
    session: Session

    def __init__(
        self, center: IServiceCenter, config: SessionConfig, clock: IReactorTime, stats: SessionStats, max_frame: int
    ) -> None:
        self._center = center
        self._config = config
        self._clock = clock
        self._stats = stats
        self._framer = Framer(max_frame)
        self._close_deadline: Any = None
        self._json = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.session = Session(
            self._center,
            self._config,
            self._clock,
            peer=format_peer(transport.getPeer()),
            send=transport.write,
            send_many=transport.writeSequence,
            disconnect=self._disconnect,
            stats=self._stats,
        )

    def handshakeCompleted(self) -> None:
        self.session.set_certificate(peer_certificate(self.transport))

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session.closed:
            return
        session.last_rx = self._clock.seconds()
        try:
            messages = self._framer.feed(data)
        except FramingError as e:
            self._stats.framing_errors += 1
            self.log.warn("closing the connection of {bs}: {error}", bs=session.describe(), error=str(e))
            session.close(f"framing error: {e}")
            return
        if self._framer.speaks_json and not self._json:
            self._json = True
            session.reply_in_json()
        receive = session.receive
        for wire in messages:
            receive(wire)
            if session.closed:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        session = getattr(self, "session", None)
        if session is not None:
            session.connection_lost(reason.getErrorMessage())

    def _disconnect(self, abort: bool) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()
            if self._close_deadline is None:
                self._close_deadline = self._clock.callLater(CLOSE_GRACE, transport.abortConnection)


class BSSCIFactory(Factory):
    """Builds a BSSCIProtocol (and its Session) per accepted connection."""

    noisy = False

    def __init__(
        self,
        center: IServiceCenter,
        config: SessionConfig,
        clock: IReactorTime,
        stats: SessionStats,
        max_frame: int,
    ) -> None:
        self.center = center
        self.config = config
        self.clock = clock
        self.stats = stats
        self.max_frame = max_frame

    def buildProtocol(self, addr: Any) -> BSSCIProtocol:
        protocol = BSSCIProtocol(self.center, self.config, self.clock, self.stats, self.max_frame)
        protocol.factory = self
        return protocol
