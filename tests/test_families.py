"""The family plugin boundary: discovery, enabling by config, and a family defined only in the test-suite
added end to end (config, migration, service, MQTT ingress, command, event) without touching the hub's code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import paho.mqtt.client as paho
import pytest
import pytest_twisted
import treq
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet import defer, reactor, threads
from zope.interface.verify import verifyObject

import bsscihub.plugins
from bsscihub import users
from bsscihub.config import ConfigError
from bsscihub.family import IFamily, IFamilyService, enabled_families, installed_families
from bsscihub.hub import Hub
from bsscihub.tap import build_service, load_hub_config
from bsscihub.web import auth
from tests.broker import Mosquitto, Subscriber
from tests.conftest import make_config
from tests.helpers import until as eventually
from tests.memory_bridge import ClockedReactor, FollowingClock, MemoryBroker, MemoryDevice, MemoryWitness

REPO = Path(__file__).resolve().parents[1]
PREFIX = "hubtest"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
"""A time as the contract writes it in every MQTT payload and REST body."""

# -- shared by the family tests (test_ble, test_devices): a whole hub on a real broker


class DeviceClient:
    """A device or gateway: an independent paho client publishing device-side messages (QoS 1)."""

    def __init__(self, broker: Mosquitto) -> None:
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{uuid.uuid4().hex[:8]}")
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()

    async def publish(self, topic: str, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self._client.publish(topic, data, qos=1)
        await threads.deferToThread(info.wait_for_publish, 5)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@attrs.define
class RunningHub:
    hub: Hub
    service: Any
    base: str
    token: str
    _session: tuple[Any, str] | None = None
    clock: FollowingClock | None = None

    async def api(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                  token: str | None = "admin", raw: bytes | None = None) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {self.token}"} if token == "admin" else {}
        sent.update(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        response = await treq.request(method, self.base + path, data=data, headers=sent)
        content = await response.content()
        try:
            doc = json.loads(content) if content else None
        except ValueError:
            doc = content
        return response.code, doc

    async def _login(self) -> tuple[Any, str]:
        if self._session is None:
            response = await treq.post(self.base + "/api/v1/auth/login", json={
                "username": "admin", "password": "correct horse battery"})
            assert response.code == 200, await response.text()
            self._session = (response.cookies(), (await response.json())["csrfToken"])
        return self._session

    async def page(self, path: str) -> tuple[int, str]:
        """An admin page as a logged-in admin sees it (session cookie)."""
        cookies, _ = await self._login()
        response = await treq.get(self.base + path, cookies=cookies, allow_redirects=False)
        return response.code, await response.text()

    async def form(self, path: str, fields: dict[str, Any]) -> tuple[int, str]:
        """Submit an admin page form (with its CSRF token); returns the status and the redirect target."""
        cookies, csrf = await self._login()
        response = await treq.post(self.base + path, data={**fields, "_csrf": csrf}, cookies=cookies,
                                   allow_redirects=False)
        await response.content()
        location = response.headers.getRawHeaders("location", [""])[0]
        return response.code, location

    def rejected(self, family: str, reason: str) -> float:
        value = self.hub.metrics.get_sample_value("bsscihub_ingest_rejected_total",
                                                  {"family": family, "reason": reason})
        return value or 0.0

    async def stop(self) -> None:
        await self.service.stopService()
        if self.clock is not None:
            self.clock.stop()


async def start_hub(tmp_path: Path, broker: Mosquitto | MemoryBroker, names: list[str],
                    clock: FollowingClock | None = None, **overrides: Any) -> RunningHub:
    """The whole hub (bridge, outbox, commands, web on a real port) on a real broker or a MemoryBroker;
    its time from `clock` when given (I/O and threads stay on the real reactor)."""
    memory = isinstance(broker, MemoryBroker)
    url = "mqtt://127.0.0.1:1883" if memory else f"mqtt://{broker.host}:{broker.port}"
    config = make_config(tmp_path, families=names, mqtt={
        "url": url, "client_id": f"hub-{uuid.uuid4().hex[:8]}", "prefix": PREFIX,
    }, **overrides)
    families = enabled_families(installed_families(), tuple(names))
    hub_reactor = reactor if clock is None else ClockedReactor(reactor, clock)
    service = build_service(config, families, hub_reactor, mqtt_client=broker.client_factory if memory else None)
    service.startService()
    hub: Hub = service.hub
    try:
        await service.when_ready()
        for family_service in hub.services.values():
            await defer.Deferred.fromCoroutine(family_service.when_subscribed()).addTimeout(10, reactor)
        await eventually(lambda: hub.mqtt.connected, what="the bridge to connect")
        port = await service.getServiceNamed("web").when_listening()
        if await users.get_user(hub.store, "admin") is None:
            await users.add_user(hub.store, "admin", "admin", "correct horse battery")
        user = await users.get_user(hub.store, "admin")
        assert user is not None
        _, token = await auth.create_key(hub.store, user, "tests", "admin", "key", reactor.seconds(), None)
    except BaseException:
        # A hub left running would keep its threads, and the test run, alive.
        await service.stopService()
        raise
    return RunningHub(hub, service, f"http://127.0.0.1:{port.getHost().port}", token, clock=clock)


MemoryHub = Callable[..., Awaitable[tuple[RunningHub, MemoryWitness, MemoryDevice]]]


@pytest_twisted.async_yield_fixture
async def memory_hub(tmp_path: Path) -> AsyncIterator[MemoryHub]:
    """start(names, topics, clock=None, **overrides): a whole hub (start_hub) on a MemoryBroker of its own, a
    witness of `topics` there before the hub starts, and a device publishing to it; stopped after the test."""
    started: list[tuple[RunningHub, MemoryDevice]] = []

    async def start(names: list[str], topics: list[str], clock: FollowingClock | None = None,
                    **overrides: Any) -> tuple[RunningHub, MemoryWitness, MemoryDevice]:
        broker = MemoryBroker()
        witness = broker.witness(*topics)
        running = await start_hub(tmp_path, broker, names, clock, **overrides)
        started.append((running, broker.device()))
        return running, witness, started[-1][1]

    yield start
    for running, device in started:
        device.stop()
        await running.stop()


def payloads(subscriber: Subscriber | MemoryWitness, topic: str) -> list[Any]:
    return [json.loads(m.payload) if m.payload else None for m in subscriber.messages if m.topic == topic]


# -- discovery and enabling


def test_shipped_families_are_discovered_and_provide_the_interface() -> None:
    installed = installed_families()
    assert {"mioty", "ble", "devices"} <= set(installed)
    for name, family in installed.items():
        assert verifyObject(IFamily, family)
        assert family.name == name
        for section in family.config_sections:
            assert "_" not in section, "BSSCIHUB_<SECTION>_<KEY> needs section names without '_'"


def test_plugin_modules_import_no_implementation() -> None:
    # getPlugins imports every plugin module; those must stay cheap and unable to break discovery.
    code = textwrap.dedent("""
        import sys
        from bsscihub.family import installed_families
        names = sorted(installed_families())
        heavy = sorted(m for m in sys.modules if m.endswith((".service", ".web")) and m.startswith("bsscihub.")
                       or m == "bsscihub.web.app")
        print(names, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    names, heavy = out.stdout.strip().split("] [")
    assert "'ble'" in names and "'devices'" in names
    assert heavy == "]", f"plugin discovery imported {heavy}"


def _write_hub_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(f"data_dir: {tmp_path / 'var'}\n" + text)
    return path


def test_families_are_enabled_by_name(tmp_path: Path) -> None:
    _, all_families = load_hub_config(str(_write_hub_yaml(tmp_path, "")), environ={})
    assert list(all_families) == sorted(installed_families())

    _, only_ble = load_hub_config(str(_write_hub_yaml(tmp_path, "families: [ble]\n")), environ={})
    assert list(only_ble) == ["ble"]

    _, from_env = load_hub_config(str(_write_hub_yaml(tmp_path, "")), environ={"BSSCIHUB_FAMILIES": "devices, ble"})
    assert list(from_env) == ["devices", "ble"]

    _, none = load_hub_config(str(_write_hub_yaml(tmp_path, "families: []\n")), environ={})
    assert none == {}


def test_an_unknown_family_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_hub_config(str(_write_hub_yaml(tmp_path, "families: [ble, zigbee]\n")), environ={})
    assert caught.value.key == "families"
    assert "unknown family 'zigbee'" in str(caught.value)
    assert "ble" in str(caught.value) and "devices" in str(caught.value), "the message lists what is installed"


def test_a_family_section_is_validated_like_core_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_hub_config(str(_write_hub_yaml(tmp_path, "ble:\n  gateway_timeout: soon\n")), environ={})
    assert caught.value.key == "ble.gateway_timeout"
    with pytest.raises(ConfigError) as caught:
        load_hub_config(str(_write_hub_yaml(tmp_path, "")), environ={"BSSCIHUB_DEVICES_AUTO_REGISTER": "maybe"})
    assert caught.value.key == "devices.auto_register"
    with pytest.raises(ConfigError) as caught:
        load_hub_config(str(_write_hub_yaml(tmp_path, "ble:\n  topics: ['a/#/b']\n")), environ={})
    assert caught.value.key == "ble.topics"


@pytest_twisted.ensureDeferred
async def test_a_disabled_family_gets_no_service_tables_or_routes(tmp_path: Path) -> None:
    config = make_config(tmp_path, families=["ble"], mqtt={"url": "mqtt://127.0.0.1:1"})
    service = build_service(config, enabled_families(installed_families(), ("ble",)), reactor)
    hub = service.hub
    assert set(hub.services) == {"ble"}
    assert {m.component for m in hub.migrations()} == {"core", "registry", "blobs", "web", "lease_events", "alerts",
                                                          "webhooks", "ble"}
    web = service.getServiceNamed("web").web
    paths = {b.route.path for b in web.routes}
    assert "/api/v1/ble/gateways" in paths
    assert not any(p.startswith("/api/v1/devices") for p in paths)


# -- a family that exists only here, dropped into the plugin path


TEST_FAMILY = '''
"""A family that lives only in the test-suite: a drop-in module, no hub code touched."""

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from bsscihub import ingest
from bsscihub.bus import Event
from bsscihub.config import _positive_int, _str, setting
from bsscihub.errors import CommandError
from bsscihub.family import EventSpec, FamilyService, IFamily
from bsscihub.store import Migration


@attrs.frozen
class TestfamConfig:
    greeting: str = setting("hello", _str, "what the family says")
    limit: int = setting(100, _positive_int, "largest value accepted")


class TestfamService(FamilyService):
    family = "testfam"

    def subscriptions(self):
        return {"testfam/+/in": self.on_in}

    def on_in(self, topic, payload, properties):
        doc = ingest.json_object(payload, 1024)
        value = ingest.number(doc, "value", 0, self.hub.config.section("testfam").limit)
        self.ingest.accepted()
        return self.store(topic.split("/")[1], value)

    async def store(self, thing, value):
        await self.hub.store.execute("INSERT INTO testfam_things (thing, value) VALUES (?, ?)", (thing, value))
        greeting = self.hub.config.section("testfam").greeting
        await self.hub.bus.publish(Event("testfam", "seen", f"testfam/thing/{thing}/seen",
                                         {"thing": thing, "value": value, "greeting": greeting}))

    async def command(self, kind, id, name, payload):
        if name != "ping":
            raise CommandError(f"unknown command {name}")
        await self.hub.mqtt.publish(f"testfam/{id}/pong", {"greeting": self.hub.config.section("testfam").greeting})
        return {"pinged": id}


@implementer(IPlugin, IFamily)
class Testfam:
    name = "testfam"
    config_sections = {"testfam": TestfamConfig}
    migrations = [Migration("testfam", 1, "CREATE TABLE testfam_things (id {pk}, thing TEXT NOT NULL, value {real})")]
    events = (EventSpec("seen", "testfam/thing/{id}/seen", False, '{"thing", "value", "greeting"}'),)

    def make_service(self, hub):
        return TestfamService(hub)


testfam = Testfam()
'''


@pytest.fixture
def test_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`bsscihub/plugins/testfam.py` in a directory of its own, as a third-party package would install it."""
    site = tmp_path / "site"
    plugins = site / "bsscihub" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "testfam.py").write_text(TEST_FAMILY)
    # What pluginPackagePaths computes at import when `site` is on sys.path.
    monkeypatch.setattr(bsscihub.plugins, "__path__", [*bsscihub.plugins.__path__, str(plugins)])
    yield site
    sys.modules.pop("bsscihub.plugins.testfam", None)


def test_a_third_party_package_on_sys_path_adds_a_family(test_family: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(test_family), str(REPO)])}
    code = "from bsscihub.family import installed_families; print(sorted(installed_families()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=test_family)
    assert "'testfam'" in out.stdout


@pytest_twisted.ensureDeferred
async def test_a_new_family_works_end_to_end_without_hub_changes(
    tmp_path: Path, test_family: Path, mosquitto: Mosquitto, subscriber_factory: Any
) -> None:
    assert "testfam" in installed_families()
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, testfam={"limit": -1})
    assert caught.value.key == "testfam.limit"

    witness = subscriber_factory(mosquitto, f"{PREFIX}/#", "testfam/#")
    running = await start_hub(tmp_path, mosquitto, ["testfam"], testfam={"greeting": "hi"})
    device = DeviceClient(mosquitto)
    try:
        hub = running.hub
        applied = await hub.store.fetchall("SELECT version FROM schema_migrations WHERE component = 'testfam'")
        assert applied == [(1,)]
        assert hub.services["testfam"].running
        assert verifyObject(IFamilyService, hub.services["testfam"])

        await device.publish("testfam/t1/in", b"not json")
        await device.publish("testfam/t1/in", {"value": 1000})
        await device.publish("testfam/t1/in", {"value": 7})
        await witness.when(lambda m: m.topic == f"{PREFIX}/testfam/thing/t1/seen")
        assert payloads(witness, f"{PREFIX}/testfam/thing/t1/seen") == [{"thing": "t1", "value": 7.0, "greeting": "hi"}]
        assert await hub.store.fetchall("SELECT thing, value FROM testfam_things") == [("t1", 7.0)]
        assert running.rejected("testfam", "not_json") == 1
        assert running.rejected("testfam", "implausible") == 1

        await device.publish(f"{PREFIX}/testfam/thing/t1/cmd/ping", {})
        await witness.when(lambda m: m.topic == "testfam/t1/pong")
        assert payloads(witness, "testfam/t1/pong") == [{"greeting": "hi"}]
        await witness.when(lambda m: m.topic == f"{PREFIX}/testfam/thing/t1/event/cmd_result")
        [result] = payloads(witness, f"{PREFIX}/testfam/thing/t1/event/cmd_result")
        assert result == {"pinged": "t1", "command": "ping", "ok": True, "error": None}
    finally:
        device.stop()
        await running.stop()
    assert "testfam" not in running.hub.commands, "a stopped family takes no more commands"
