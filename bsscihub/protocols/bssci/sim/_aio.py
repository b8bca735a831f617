"""The load generator's default transport: asyncio with the standard library's ssl module.
Measured cheaper per operation than Twisted with pyOpenSSL on the client side (see bench/README.md)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

from bsscihub.protocols.bssci.sim._plan import WorkerPlan
from bsscihub.protocols.bssci.sim._run import RECONNECT_DELAY, STOP_SIGNALS, TICK, Run
from bsscihub.protocols.bssci.sim._session import BaseStation

__all__ = ["client_context", "run_worker"]


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A base station's TLS: its own certificate, and only the hub CA trusted (TLS 1.2+)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    return context


class _Connection(asyncio.Protocol):
    def __init__(self, station: BaseStation, run: Run) -> None:
        self.station = station
        self.run = run
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.station.connection_made(transport.write, self._close)  # type: ignore[attr-defined]

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.station.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.station_lost(self.station, by_us=self.closing)
        if not self.closed.done():
            self.closed.set_result(None)


async def _keep_connected(run: Run, station: BaseStation, context: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    opts = run.options
    while not run.stopping:
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(station, run),
                opts.host,
                opts.port,
                ssl=context,
                server_hostname=opts.host,
                ssl_handshake_timeout=opts.connect_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError) as e:
            run.connect_failed(e)
            await asyncio.sleep(RECONNECT_DELAY)
            continue
        await connection.closed
        if not run.stopping:
            await asyncio.sleep(RECONNECT_DELAY)


async def _main(
    plan: WorkerPlan, report: Callable[[dict[str, Any]], None] | None, stop_on_signals: bool
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = Run(plan, call_soon=loop.call_soon, report=report)
    if stop_on_signals:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, run.stop)
    opts = plan.options
    contexts = [client_context(opts.ca, *opts.certs[station.index]) for station in run.stations]
    await asyncio.sleep(max(0.0, plan.start_at - time.time()))
    tasks = [
        asyncio.create_task(_keep_connected(run, station, context))
        for station, context in zip(run.stations, contexts, strict=True)
    ]
    while not run.finished:
        await asyncio.sleep(TICK)
        run.tick()
    # Let the closes go out, then stop the stations still dialling.
    await asyncio.wait(tasks, timeout=5.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return run.summary()


def run_worker(
    plan: WorkerPlan,
    report: Callable[[dict[str, Any]], None] | None = None,
    *,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    """Run one worker's share to the end on a fresh asyncio loop; returns its summary."""
    return asyncio.run(_main(plan, report, stop_on_signals))
