"""The hub as a service tree: start order, /health, and a clean stop (no port or thread left behind)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater

from bsscihub.health import ComponentHealth
from bsscihub.hub import make_hub
from bsscihub.tap import build_service
from bsscihub.web.app import WebApp
from tests.conftest import make_config
from tests.helpers import until


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "bsscihub-store" in t.name]


@pytest_twisted.ensureDeferred
async def test_start_serves_health_then_stop_releases_port_and_threads(tmp_path: Path, mosquitto: Any) -> None:
    config = make_config(tmp_path, families=[], mqtt={"url": f"mqtt://{mosquitto.host}:{mosquitto.port}"},
                         web={"public_health": True})
    before = {t.ident for t in threading.enumerate()}
    service = build_service(config, {}, reactor)
    service.startService()
    try:
        await service.when_ready()
        port = await service.getServiceNamed("web").when_listening()
        number = port.getHost().port
        assert store_threads(), "the store runs on its own threads while the hub runs"

        deadline = reactor.seconds() + 15
        while True:  # the bridge connects right after start
            response = await treq.get(f"http://127.0.0.1:{number}/health")
            doc = json.loads(await response.content())
            if doc["status"] == "ok" or reactor.seconds() > deadline:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert response.code == 200
        assert doc["status"] == "ok"
        assert doc["components"]["storage"] == {"up": True, "backend": "sqlite"}
        assert doc["components"]["mqtt"]["up"] is True
        assert (tmp_path / "var" / "hub.sqlite").exists()
    finally:
        await service.stopService()
    assert not store_threads()
    leftover = [t for t in threading.enumerate() if t.ident not in before and "PoolThread-twisted" not in t.name]
    assert not leftover, leftover
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", number)) != 0, "the web port is released on stop"


@pytest_twisted.ensureDeferred
async def test_health_is_503_only_when_a_needed_component_is_down(tmp_path: Path) -> None:
    hub = make_hub(make_config(tmp_path, families=[], web={"public_health": True}), reactor, {})
    hub.store.start()
    try:
        client = StubTreq(WebApp(hub).resource())

        async def health() -> tuple[int, dict[str, Any]]:
            response = await client.get("http://hub/health")
            return response.code, json.loads(await response.content())

        code, doc = await health()
        assert (code, doc["status"], doc["notReady"]) == (503, "unavailable", ["starting"])
        hub.health.started = True
        # The broker away: reported, but the hub stays ready (the outbox keeps every message).
        hub.health.register("mqtt", lambda: ComponentHealth(False, {"state": "waiting"}), needed=False)
        code, doc = await health()
        assert (code, doc["status"]) == (200, "degraded")
        assert doc["components"]["mqtt"] == {"up": False, "needed": False, "state": "waiting"}
        assert doc["components"]["storage"]["up"] is True
        hub.health.register("bssci", lambda: ComponentHealth(False, {"listen": "tcp:16017"}))
        code, doc = await health()
        assert (code, doc["status"], doc["notReady"]) == (503, "unavailable", ["bssci"])
    finally:
        await hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_a_start_failure_is_reported_not_swallowed(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = make_config(tmp_path, families=[], web={"listen": f"tcp:{taken}:interface=127.0.0.1"})
        failures: list[bool] = []
        service = build_service(config, {}, reactor, on_start_failure=lambda: failures.append(True))
        service.startService()
        try:
            await service.when_ready()
        except CannotListenError:
            pass
        else:
            raise AssertionError("binding a busy port must fail the start")
        finally:
            await service.stopService()
        assert failures == [True]


@pytest_twisted.ensureDeferred
async def test_stopping_lets_running_web_calls_finish_before_storage_closes(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    from bsscihub import audit

    config = make_config(tmp_path, families=[])
    service = build_service(config, {}, reactor, on_start_failure=lambda: None)
    service.startService()
    errors: list[Any] = []

    def observe(event: Any) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        await service.when_ready()
        web = service.getServiceNamed("web")
        port = (await web.when_listening()).getHost().port
        body = json.dumps({"username": "admin", "password": "a-wrong-one"}).encode()
        request = (b"POST /api/v1/auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(request)  # and hang up: the call runs on (a password check takes a while)
        await until(lambda: web.web.api.in_flight, "the log-in call under way")
        assert web.web.api.in_flight
        await service.stopService()  # while the call still runs
        assert not web.web.api.in_flight
        store = service.hub.store
        store.start()
        entries, _ = await audit.query(store, action="auth.login_failed")
        await store.stop()
    finally:
        globalLogPublisher.removeObserver(observe)
        if service.running:
            await service.stopService()
    assert [e.target for e in entries] == ["admin"]  # written before storage closed
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_a_part_failing_to_stop_still_stops_the_store_and_the_cluster(tmp_path: Path) -> None:
    # The store's threads, left running, would keep the process alive after the reactor stopped.
    from twisted.application.service import Service
    from twisted.logger import globalLogPublisher

    class Stubborn(Service):
        name = "stubborn"

        def stopService(self) -> None:
            Service.stopService(self)
            raise RuntimeError("cannot stop")

    config = make_config(tmp_path, families=[])
    service = build_service(config, {}, reactor, on_start_failure=lambda: None)
    Stubborn().setServiceParent(service)
    failures: list[Any] = []

    def observe(event: Any) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    service.startService()
    await service.when_ready()
    assert store_threads()
    globalLogPublisher.addObserver(observe)
    try:
        await service.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not store_threads(), "the store stopped although another part failed to"
    assert not service.hub.store.running
    assert [e["part"] for e in failures] == ["stubborn"]
