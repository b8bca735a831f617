"""Shared pieces of the web tests: a hub with the web app on an in-memory client (StubTreq), users per role.

FakeMioty is a test double of the mioty family service's API (not of a database or broker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import pytest_twisted
from argon2 import PasswordHasher
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.task import Clock

from bsscihub import users
from bsscihub.errors import CommandError
from bsscihub.family import installed_families
from bsscihub.hub import Hub, make_hub
from bsscihub.protocols.bssci.registry import ImportCounts, Sensor
from bsscihub.protocols.bssci.service import UnknownDevice
from bsscihub.web import auth
from bsscihub.web.app import WebApp
from tests.conftest import make_config

ROLES = ("viewer", "operator", "admin")
PASSWORD = "correct-horse-battery"


class FakeMioty:
    """Test double of the mioty service API (bsscihub.protocols.bssci.service): same methods, state in dicts."""

    running = True

    def __init__(self) -> None:
        self.sensors: dict[str, dict[str, Any]] = {}
        self.stations: dict[str, dict[str, Any]] = {
            "70b3d59cd0000001": {"bsEui": "70b3d59cd0000001", "state": "online", "name": "roof", "vendor": "Acme",
                                 "model": "BS-1", "swVersion": "1.2.3"},
        }
        self.uplinks: dict[str, list[dict[str, Any]]] = {}
        self.queued: list[tuple[str, bytes, dict[str, Any]]] = []
        self.calls: list[tuple[str, Any]] = []
        # endpoints.py (import/export) reads the registry's sensors and calls import_sensors.
        self.registry = SimpleNamespace(sensors={})

    def _sensor(self, eui: str) -> dict[str, Any]:
        if eui not in self.sensors:
            raise UnknownDevice(f"unknown end point {eui}")
        return self.sensors[eui]

    async def attach(self, ep_eui: str, nw_key: str, short_addr: str, bidi: bool, *, actor: str = "system",
                     source: str = "api") -> dict[str, Any]:
        self.calls.append(("attach", (ep_eui, actor)))
        # The real service keeps the key but never returns it; the double keeps it to check the routes strip it.
        self.sensors[ep_eui] = {"epEui": ep_eui, "nwKey": nw_key, "shortAddr": short_addr, "bidi": bidi,
                                "attached": True}
        self.registry.sensors[ep_eui] = Sensor(ep_eui, bytes.fromhex(nw_key), int(short_addr, 16), bidi)
        return {"epEui": ep_eui, "attached": True, "changed": True, "baseStations": []}

    async def import_sensors(self, entries: Any, *, source: str = "import") -> ImportCounts:
        created = 0
        for eui, key, addr, bidi in entries:
            created += eui not in self.sensors
            await self.attach(eui, key.hex(), f"{addr:04x}", bidi, actor=source)
        return ImportCounts(created=created, updated=len(entries) - created, unchanged=0)

    async def detach(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        self._sensor(ep_eui)["attached"] = False
        self.calls.append(("detach", (ep_eui, actor)))
        return {"epEui": ep_eui, "attached": False, "baseStations": []}

    async def remove_sensor(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        self._sensor(ep_eui)
        del self.sensors[ep_eui], self.registry.sensors[ep_eui]
        return {"epEui": ep_eui, "removed": True, "baseStations": []}

    async def queue_downlink(self, ep_eui: str, data: bytes, *, format: Any = None, prio: Any = None,
                             response_exp: Any = None, actor: str = "system") -> dict[str, Any]:
        if not self._sensor(ep_eui)["bidi"]:
            raise CommandError(f"end point {ep_eui} is not bidirectional (bidi is false)")
        self.queued.append((ep_eui, data, {"format": format, "actor": actor}))
        return {"epEui": ep_eui, "queId": len(self.queued), "status": "accepted", "baseStations": []}

    async def revoke_downlink(self, ep_eui: str, que_id: int, *, actor: str = "system") -> dict[str, Any]:
        self._sensor(ep_eui)
        if not 1 <= que_id <= len(self.queued):
            raise CommandError(f"no pending downlink {que_id!r} for end point {ep_eui}")
        self.calls.append(("revoke_downlink", (ep_eui, que_id, actor)))
        return {"epEui": ep_eui, "queId": que_id, "status": "revoked", "problems": []}

    async def query_dl_rx_status(self, ep_eui: str) -> dict[str, Any]:
        self._sensor(ep_eui)
        self.calls.append(("dl_rx_status", ep_eui))
        return {"epEui": ep_eui, "baseStations": []}

    async def poll_status(self, bs_eui: str) -> dict[str, Any]:
        if bs_eui not in self.stations:
            raise UnknownDevice(f"unknown base station {bs_eui}")
        self.calls.append(("poll", bs_eui))
        return {"bsEui": bs_eui, "cpuLoad": 0.1}

    async def revoke_base_station(self, bs_eui: str, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        if bs_eui not in self.stations:
            raise UnknownDevice(f"unknown base station {bs_eui}")
        self.calls.append(("revoke", (bs_eui, reason, actor)))
        self.stations[bs_eui]["revoked"] = True
        return {**self.stations[bs_eui], "revokedSerials": []}

    async def revoke_certificate(self, serial: int, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        self.calls.append(("revoke_certificate", (serial, reason, actor)))
        return {"serial": f"{serial:#x}", "revoked": True}

    async def list_base_stations(self) -> list[dict[str, Any]]:
        return list(self.stations.values())

    async def get_base_station(self, eui: str) -> dict[str, Any] | None:
        return self.stations.get(eui)

    async def list_sensors(self, filter: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        found = [s for e, s in sorted(self.sensors.items()) if not filter or filter.lower() in e]
        return {"items": found[offset: offset + limit], "total": len(found), "limit": limit, "offset": offset}

    async def get_sensor(self, eui: str) -> dict[str, Any] | None:
        return self.sensors.get(eui)

    async def uplink_history(self, ep_eui: str, limit: int = 100, before: float | None = None) -> dict[str, Any]:
        return {"items": list(reversed(self.uplinks.get(ep_eui, [])))[:limit]}

    async def downlinks(self, ep_eui: str) -> dict[str, Any]:
        return {"items": [{"queId": i, "data": d.hex(), "format": o["format"], "status": "accepted"}
                          for i, (e, d, o) in enumerate(self.queued, 1) if e == ep_eui]}

    async def downlink(self, ep_eui: str, que_id: int) -> dict[str, Any] | None:
        return next((d for d in (await self.downlinks(ep_eui))["items"] if d["queId"] == que_id), None)


@attrs.define
class Reply:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if isinstance(values, list) and values else None

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]  # type: ignore[no-any-return]


class Harness:
    """A migrated hub, a WebApp on an injected Clock, a user and a bearer token per role."""

    def __init__(self, hub: Hub, web: WebApp, clock: Clock) -> None:
        self.hub, self.web, self.clock = hub, web, clock
        self.stub = StubTreq(web.resource())
        # Cookies only when a test passes them: StubTreq's client would otherwise keep a jar.
        self.stub.request.__wrapped__.__self__._cookiejar = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self.tokens: dict[str, str] = {}
        self.mioty = hub.services.get("mioty")

    async def _settle(self, d: defer.Deferred[Any]) -> Any:
        # StubTreq needs pumping while handlers wait on the store's threads.
        done: list[Any] = []
        d.addBoth(lambda r: (done.append(r), r)[1])
        from twisted.internet import reactor

        while not done:
            self.stub.flush()
            if not done:
                await task.deferLater(reactor, 0.001, lambda: None)
        return await d

    async def request(
        self,
        method: str,
        path: str,
        *,
        role: str | None = None,
        token: str | None = None,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        if role is not None:
            token = self.tokens[role]
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        if cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        kwargs: dict[str, Any] = {"headers": hdrs, "allow_redirects": False}
        if data is not None:
            kwargs["data"] = data
        response = await self._settle(self.stub.request(method, "http://hub.test" + path, **kwargs))
        body = await self._settle(self.stub.content(response))
        return Reply(response.code, response.headers, body)

    async def login(self, name: str, password: str = PASSWORD) -> tuple[dict[str, str], str]:
        """A session via the API: (cookies, csrf token)."""
        reply = await self.request("POST", "/api/v1/auth/login", json_body={"username": name, "password": password})
        assert reply.code == 200, reply.body
        cookie = reply.header("Set-Cookie")
        assert cookie is not None
        name_value = cookie.split(";", 1)[0]
        key, _, value = name_value.partition("=")
        return {key: value}, reply.json()["csrfToken"]


def fast_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Still Argon2id, with cheap parameters: the tests log in hundreds of times.
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(users, "_hasher", cheap)
    monkeypatch.setattr(users, "_DUMMY_HASH", cheap.hash("dummy"))


async def build_harness(tmp_path: Path, *, families: tuple[str, ...] = ("mioty",), **overrides: Any) -> Harness:
    from twisted.internet import reactor

    certs = tmp_path / "certs"
    overrides.setdefault("tls", {"ca": str(certs / "ca.pem"), "ca_key": str(certs / "ca.key"),
                                 "cert": str(certs / "hub.pem"), "key": str(certs / "hub.key")})
    config = make_config(tmp_path, **overrides)
    installed = installed_families()
    hub = make_hub(config, reactor, {name: installed[name] for name in families})
    if "mioty" in families:
        fake = hub.services["mioty"] = FakeMioty()
        # The meter routes run on the real Variable-MAC component, over the real database.
        from twisted.internet.task import LoopingCall

        from bsscihub.protocols.bssci.vm import VariableMac

        events: list[tuple[Any, ...]] = []
        fake.vm = VariableMac(SimpleNamespace(  # type: ignore[attr-defined, arg-type]
            hub=hub, clock=reactor, settings=config.section("mioty"), _event=lambda *a: events.append(a),
            looping=lambda fn, what: LoopingCall(fn)))
        # The blueprint routes run on the real blueprint book, over the real database.
        from bsscihub.protocols.bssci.blueprints import BlueprintBook

        fake.blueprints = BlueprintBook(hub.store, reactor)  # type: ignore[attr-defined]
        # The network page reads the real tables.
        fake.registry.store, fake.registry.base_stations = hub.store, {}
        fake.clock = reactor  # type: ignore[attr-defined]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    hub.health.started = True  # what HubService says once started; these tests build the parts themselves
    clock = Clock()
    clock.advance(1_700_000_000)
    web = WebApp(hub, clock=clock)
    harness = Harness(hub, web, clock)
    for role in ROLES:
        await users.add_user(hub.store, role, role, PASSWORD)
        user = await users.get_user(hub.store, role)
        assert user is not None
        _, token = await auth.create_key(hub.store, user, "test", role, "key", clock.seconds(), None)
        harness.tokens[role] = token
    return harness


def harness_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """The body of each test module's `harness` fixture."""
    fast_hashing(monkeypatch)
    h: Harness = pytest_twisted.blockon(defer.ensureDeferred(build_harness(tmp_path)))
    yield h
    h.web.stop()
    pytest_twisted.blockon(h.hub.store.stop())
