"""ListenerService: binds on start, says when bound or why not, releases the port on stop."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from bsscihub.listening import ListenerService


def service(description: str) -> ListenerService:
    return ListenerService(serverFromString(reactor, description), Factory.forProtocol(Protocol))


@pytest_twisted.ensureDeferred
async def test_bound_port_then_taken_port_fails_then_stop_releases() -> None:
    first = service("tcp:0:interface=127.0.0.1")
    with pytest.raises(RuntimeError, match="not started"):
        await first.when_listening()
    first.startService()
    port = await first.when_listening()
    number = port.getHost().port
    second = service(f"tcp:{number}:interface=127.0.0.1")
    second.startService()
    with pytest.raises(CannotListenError):
        await second.when_ready()
    await second.stopService()
    await first.stopService()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", number)) != 0, "the port is released on stop"
