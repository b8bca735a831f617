"""No request a client can make puts a traceback in the log: odd paths, malformed HTTP and clients
that hang up mid-request, sent over real sockets to the hub's running web listener."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, LogLevel

from bsscihub.logs import make_observer
from bsscihub.tap import build_service
from tests.conftest import make_config
from tests.helpers import observing


@pytest.fixture
def captured() -> Iterator[tuple[list[LogEvent], list[str]]]:
    """Every event, and the hub's text log as an operator would read it."""
    events: list[LogEvent] = []
    text: list[str] = []

    class Sink:
        def write(self, data: str) -> None:
            text.append(data)

        def flush(self) -> None:
            pass

    observer = make_observer("debug", "text", Sink())  # type: ignore[arg-type]
    with observing(events.append, observer):
        yield events, text


def exchange(port: int, data: bytes, *, close_early: bool = False) -> bytes:
    """Send `data` over a fresh connection; read the answer unless hanging up at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if close_early:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return b""
        s.shutdown(socket.SHUT_WR) if data.endswith(b"\r\n\r\n") is False else None
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


LOGIN = b'{"username": "admin", "password": "not the password at all"}'

REQUESTS: dict[str, tuple[bytes, bool]] = {
    "NUL in a static path": (b"GET /static/app%00.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "raw NUL in a static path": (b"GET /static/a\x00b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "NUL in an API path": (b"GET /api/v1/mioty/sensors/%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "dot segments": (b"GET /static/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "encoded dot segments": (b"GET /static/%2e%2e/%2e%2e/setup.cfg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             False),
    "invalid UTF-8 path": (b"GET /static/%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "invalid UTF-8 query": (b"GET /api/v1/mioty/sensors?q=%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            False),
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", False),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
    "unknown method": (b"BREW /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    "bad header line": (b"GET / HTTP/1.1\r\nHost x\r\n: nothing\r\n\r\n", False),
    "bad content length": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", False),
    "two content lengths": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                            b"Content-Length: 4\r\n\r\nabcd", False),
    "bad chunked body": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"zz\r\nabc\r\n0\r\n\r\n", False),
    "huge header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", False),
    "absolute URI with control characters": (b"GET http://x/\x1b[31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                             False),
    "non-JSON login": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 5\r\nConnection: close\r\n\r\n\xff\xfe\x00{[", False),
    "hang up inside the headers": (b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Half", True),
    "hang up inside the body": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 1000\r\n\r\n{\"user", True),
    "hang up while the login is checked": (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Type: application/json\r\nContent-Length: "
                                           + str(len(LOGIN)).encode() + b"\r\n\r\n" + LOGIN, True),
    "hang up while a page renders": (b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n", True),
    "hang up on the metrics": (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", True),
    "hang up on the live stream upgrade": (b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                           b"Sec-WebSocket-Version: 13\r\n\r\n", True),
}


@pytest_twisted.ensureDeferred
async def test_no_client_request_produces_a_traceback(
    tmp_path: Path, captured: tuple[list[LogEvent], list[str]]
) -> None:
    events, text = captured
    config = make_config(tmp_path, families=[], mqtt={"url": "mqtt://127.0.0.1:9"})
    service = build_service(config, {}, reactor)
    service.startService()
    answers: dict[str, bytes] = {}
    try:
        await service.when_ready()
        port = (await service.getServiceNamed("web").when_listening()).getHost().port
        for name, (data, close_early) in REQUESTS.items():
            answers[name] = await threads.deferToThread(exchange, port, data, close_early=close_early)
        await deferLater(reactor, 0.5, lambda: None)  # let the hung-up requests finish on the hub's side
        # The hub still serves, and its access line leaves the query string out.
        ok = await threads.deferToThread(
            exchange, port, b"GET /health/live?ticket=SECRET HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert ok.startswith(b"HTTP/1.1 200")
    finally:
        await service.stopService()
    gc.collect()  # a Deferred that failed unseen reports it when collected
    statuses = {name: answers[name][:12] for name, (_, close_early) in REQUESTS.items() if not close_early}
    wrong = {name: status for name, status in statuses.items() if status and not status.startswith(b"HTTP/1.1 4")}
    assert wrong == {}
    failures = [e for e in events if e.get("log_failure") is not None or e.get("isError")]
    assert failures == [], [e.get("log_format") for e in failures]
    serious = [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
    assert serious == [], [e.get("log_format") for e in serious]
    assert "Traceback" not in "".join(text)
    assert '"GET /health/live HTTP/1.1" 200' in "".join(text) and "SECRET" not in "".join(text)
    assert "\x1b" not in "".join(text) and "\x00" not in "".join(text)
