"""Connection caps of the TLS listener over real sockets: a flood of connections that never
handshake is held to `max_handshakes`/`max_connections`, cut after the handshake timeout, logged
at a bounded rate, and a real base station still gets in once slots are free."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from zope.interface import implementer

from bsscihub.tls import ConnectionLimits, MutualTLSEndpoint
from tests.helpers import log_lines, until
from tests.test_tls import PKI, pki  # noqa: F401 - the module-scoped PKI fixture


@implementer(IHandshakeListener)
class Greeter(Protocol):
    """Hub side: says hello once the handshake is done."""

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")


@implementer(IHandshakeListener)
class Station(Protocol):
    def __init__(self) -> None:
        self.greeted: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(data)

    def handshakeCompleted(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.greeted.called:
            self.greeted.errback(ConnectionError("closed before the hub said hello"))


@pytest.fixture
def tls_lines() -> Iterator[list[str]]:
    with log_lines("bsscihub.tls") as lines:
        yield lines


async def settle(seconds: float = 0.3) -> None:
    await deferLater(reactor, seconds, lambda: None)


def open_sockets(port: int, count: int) -> list[socket.socket]:
    """TCP connects that never send a byte: the kernel completes them without the hub."""
    found = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        found.append(s)
    return found


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def listen(keys: PKI, limits: ConnectionLimits, timeout: float) -> tuple[MutualTLSEndpoint, IListeningPort]:
    endpoint = MutualTLSEndpoint(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1"), keys.policy(), handshake_timeout=timeout,
        clock=reactor, limits=limits,
    )
    port = await endpoint.listen(Factory.forProtocol(Greeter))
    return endpoint, port


async def connect_station(keys: PKI, port: int) -> bytes:
    station = Station()
    endpoint = wrapClientTLS(keys.bs.client(keys.ca), TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    await endpoint.connect(Factory.forProtocol(lambda: station))
    try:
        return await station.greeted
    finally:
        assert station.transport is not None
        station.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_half_open_flood_is_capped_logged_and_stations_get_in_after(
    pki: PKI,  # noqa: F811
    tls_lines: list[str],
) -> None:
    limits = ConnectionLimits(max_connections=50, max_handshakes=8, log_burst=3, log_interval=3600)
    endpoint, port = await listen(pki, limits, timeout=60)
    number = port.getHost().port
    flood: list[socket.socket] = []
    try:
        flood = open_sockets(number, 40)
        stats = endpoint.stats
        await until(lambda: stats.handshaking + stats.refused["max_handshakes"] == 40)
        assert stats.handshaking == 8 and stats.open == 8
        assert stats.refused["max_handshakes"] == 32
        await settle(0.05)
        cut = [s for s in flood if closed_by_server(s)]
        assert len(cut) == 32, "every connection beyond the cap is closed at once"
        # A real station is refused too while the flood holds every slot ...
        with pytest.raises(ConnectionError):
            await connect_station(pki, number)
        # ... and gets in as soon as the flood goes away.
        for s in flood:
            s.close()
        await until(lambda: stats.open == 0)
        assert stats.handshaking == 0
        assert await connect_station(pki, number) == b"hello"
    finally:
        for s in flood:
            s.close()
        await port.stopListening()
    refusals = [line for line in tls_lines if line.startswith("refused a connection")]
    assert len(refusals) == 3, "rate-limited to log_burst lines"
    assert "8 TLS handshakes in progress already (max_handshakes = 8)" in refusals[0]
    summaries = [line for line in tls_lines if "more like this" in line]
    # The listener's stop writes the pending summary at once, with where the flood came from.
    assert sorted(summaries) == [
        # the 8 that held the slots and closed without a ClientHello, 3 of them logged
        "30 more like this (connections refused at max_handshakes) from 127.0.0.1 in the last 3600 s",
        "5 more like this (TLS handshakes failed) from 127.0.0.1 in the last 3600 s",
    ]


@pytest_twisted.ensureDeferred
async def test_connection_cap_counts_established_connections(pki: PKI) -> None:  # noqa: F811
    endpoint, port = await listen(pki, ConnectionLimits(max_connections=2, max_handshakes=10), timeout=60)
    number = port.getHost().port
    stations: list[Any] = []
    try:
        for _ in range(2):
            station = Station()
            client = wrapClientTLS(pki.bs.client(pki.ca), TCP4ClientEndpoint(reactor, "127.0.0.1", number))
            await client.connect(Factory.forProtocol(lambda s=station: s))
            assert await station.greeted == b"hello"
            stations.append(station)
        assert endpoint.stats.open == 2 and endpoint.stats.handshaking == 0
        [late] = open_sockets(number, 1)
        await until(lambda: endpoint.stats.refused["max_connections"] == 1)
        await settle(0.05)
        assert closed_by_server(late)
        late.close()
        assert endpoint.stats.refused == {"max_connections": 1, "max_handshakes": 0}
    finally:
        for station in stations:
            station.transport.loseConnection()
        await settle(0.1)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_cut_after_the_handshake_timeout(
    pki: PKI,  # noqa: F811
    tls_lines: list[str],
) -> None:
    endpoint, port = await listen(pki, ConnectionLimits(max_handshakes=4), timeout=1.0)
    [silent] = open_sockets(port.getHost().port, 1)
    try:
        await until(lambda: endpoint.stats.handshaking == 1)
        assert not closed_by_server(silent)
        await until(lambda: endpoint.stats.handshake_timeouts == 1)
        await settle(0.05)
        assert closed_by_server(silent)
        assert endpoint.stats.handshaking == 0 and endpoint.stats.handshake_timeouts == 1
    finally:
        silent.close()
        await port.stopListening()
    assert any(line.endswith("failed: no handshake within 1 s") for line in tls_lines), tls_lines
