"""The load generator on Twisted with pyOpenSSL (`--stack twisted`), kept to compare against asyncio.
Same base stations and phases as the default driver; only the transport differs."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure

from bsscihub.protocols.bssci.sim._plan import WorkerPlan
from bsscihub.protocols.bssci.sim._run import RECONNECT_DELAY, STOP_SIGNALS, TICK, Run
from bsscihub.protocols.bssci.sim._session import BaseStation

__all__ = ["run_worker"]


class _Connection(Protocol):
    def __init__(self, station: BaseStation, run: Run) -> None:
        self.station = station
        self.run = run
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.closing = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        # Twisted leaves Nagle on (asyncio turns it off): small pipelined
        # frames would wait for delayed ACKs, tens of milliseconds each.
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        self.station.connection_made(self.transport.write, self._close)

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.station.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.run.station_lost(self.station, by_us=self.closing)
        self.closed.callback(None)


async def _keep_connected(reactor: Any, run: Run, station: BaseStation, options: Any) -> None:
    opts = run.options
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, opts.host, opts.port, timeout=opts.connect_timeout))
    while not run.stopping:
        connection = _Connection(station, run)
        try:
            await connectProtocol(endpoint, connection)
        except Exception as e:  # noqa: BLE001 - any failure to connect is counted, then retried
            run.connect_failed(e)
            await task.deferLater(reactor, RECONNECT_DELAY)
            continue
        await connection.closed
        if not run.stopping:
            await task.deferLater(reactor, RECONNECT_DELAY)


def _stop_on_signals(reactor: Any, run: Run) -> None:
    """Instead of the reactor's handlers, which would stop it before there is a summary."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: reactor.callFromThread(run.stop))


async def _main(
    reactor: Any, plan: WorkerPlan, report: Callable[[dict[str, Any]], None] | None, stop_on_signals: bool
) -> dict[str, Any]:
    run = Run(plan, call_soon=lambda f: reactor.callLater(0, f), report=report)
    if stop_on_signals:
        _stop_on_signals(reactor, run)
        # The reactor puts its own SIGTERM handler in place as it starts: this one goes back after it.
        reactor.callWhenRunning(_stop_on_signals, reactor, run)
    opts = plan.options
    ca = Certificate.loadPEM(Path(opts.ca).read_bytes())
    tls = []
    for station in run.stations:
        cert, key = opts.certs[station.index]
        client = PrivateCertificate.loadPEM(Path(cert).read_bytes() + Path(key).read_bytes())
        tls.append(optionsForClientTLS(opts.host, trustRoot=ca, clientCertificate=client))
    await task.deferLater(reactor, max(0.0, plan.start_at - time.time()))
    connecting = [
        defer.Deferred.fromCoroutine(_keep_connected(reactor, run, station, options))
        for station, options in zip(run.stations, tls, strict=True)
    ]
    while not run.finished:
        await task.deferLater(reactor, TICK)
        run.tick()
    await defer.DeferredList(connecting)
    return run.summary()


def run_worker(
    plan: WorkerPlan,
    report: Callable[[dict[str, Any]], None] | None = None,
    *,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    """Run one worker's share on the global reactor (so: once per process); returns its summary."""
    result: list[dict[str, Any]] = []

    async def main(reactor: Any) -> None:
        result.append(await _main(reactor, plan, report, stop_on_signals))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0]
