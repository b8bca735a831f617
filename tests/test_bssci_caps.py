"""The hub's BSSCI listener honours bssci.max_handshakes, max_connections and handshake_timeout:
a half-open flood over real sockets is held to the cap, shows in /metrics, and a base station still
completes its session once the flood is gone."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest_twisted
from prometheus_client import generate_latest

from tests.test_mioty_service import PKI, A, pki, start, wait_for  # noqa: F401 - pki is a fixture


@pytest_twisted.ensureDeferred
async def test_configured_caps_hold_a_flood_and_a_station_gets_in_after(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    running = await start(tmp_path, pki, bssci={"max_handshakes": 3, "max_connections": 5, "handshake_timeout": "1m"})
    stats = running.service.tls_stats
    flood: list[socket.socket] = []
    try:
        flood = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(10)]
        await wait_for(lambda: stats.handshaking + stats.refused["max_handshakes"] == 10)
        assert stats.handshaking == 3 and stats.open == 3
        text = generate_latest(running.hub.metrics).decode()
        assert 'bsscihub_bssci_tls_refused_total{cap="max_handshakes"} 7.0' in text
        assert "bsscihub_bssci_tls_handshakes_pending 3.0" in text
        for s in flood:
            s.close()
        await wait_for(lambda: stats.open == 0)
        station = await running.station("bs-a", A)
        assert stats.open == 1 and stats.handshaking == 0
        station.transport.loseConnection()
    finally:
        for s in flood:
            s.close()
        await running.stop()
