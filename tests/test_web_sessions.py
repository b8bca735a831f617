"""Admin sessions survive a restart: the hub stopped and started again (SQLite and PostgreSQL), same cookie.

Also what the database holds (only the id's SHA-256) and what a restart must not bring back (expired, logged out).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock

from bsscihub import users
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from bsscihub.tap import build_service
from bsscihub.web.sessions import SessionStore
from tests.conftest import make_config
from tests.test_web_support import PASSWORD, fast_hashing


async def start(config: Any) -> tuple[Any, str]:
    service = build_service(config, {}, reactor, on_start_failure=lambda: None)
    service.startService()
    await service.when_ready()
    port = await service.getServiceNamed("web").when_listening()
    return service, f"http://127.0.0.1:{port.getHost().port}"


async def me(url: str, cookie: str) -> tuple[int, Any]:
    response = await treq.get(url + "/api/v1/auth/me", headers={"Cookie": cookie})
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_sessions_survive_a_restart(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_hashing(monkeypatch)
    config = make_config(tmp_path, families=[], database=database_url)
    service, url = await start(config)
    try:
        await users.add_user(service.hub.store, "alice", "operator", PASSWORD)
        await users.add_user(service.hub.store, "bob", "viewer", PASSWORD)
        sessions = {}
        for name in ("alice", "bob"):
            response = await treq.post(url + "/api/v1/auth/login", json={"username": name, "password": PASSWORD})
            assert response.code == 200
            sessions[name] = (response.headers.getRawHeaders("set-cookie")[0].split(";")[0],
                              json.loads(await response.content())["csrfToken"])
        cookie, csrf = sessions["alice"]
        value = cookie.split("=", 1)[1]
        stored = await service.hub.store.fetchall("SELECT id_hash, csrf FROM web_sessions ORDER BY created")
        # Only the digest of the cookie is stored: a copy of the database logs nobody in.
        assert hashlib.sha256(value.encode()).hexdigest() in [row[0] for row in stored]
        assert value not in str(stored)
    finally:
        await service.stopService()

    service, url = await start(config)  # a new process would see the same: only the database carries over
    try:
        code, doc = await me(url, cookie)
        assert (code, doc["user"], doc["role"], doc["via"], doc["csrfToken"]) == (200, "alice", "operator",
                                                                                  "session", csrf)
        # The CSRF token came back with the session: a state-changing call works as before the restart.
        response = await treq.post(url + "/api/v1/auth/logout", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
        assert response.code == 204
        assert (await me(url, cookie))[0] == 401
        assert (await me(url, sessions["bob"][0]))[0] == 200
        # Disabled from elsewhere (the CLI writes the database): the next start does not restore his session.
        await users.update_user(service.hub.store, "bob", disabled=True)
    finally:
        await service.stopService()

    service, url = await start(config)
    try:
        assert (await me(url, cookie))[0] == 401  # a log-out is not undone by a restart
        assert (await me(url, sessions["bob"][0]))[0] == 401  # nor is a disabled user's session restored
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_expired_sessions_are_not_restored(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    await users.add_user(store, "alice", "viewer", PASSWORD)
    user = await users.get_user(store, "alice")
    assert user is not None
    clock = Clock()
    clock.advance(1_700_000_000)
    first = SessionStore(clock, 600, 3600, store=store)
    idle, _ = await first.create(user.id, user.name, user.role, "10.0.0.1")
    clock.advance(300)
    busy, _ = await first.create(user.id, user.name, user.role, "10.0.0.2")
    clock.advance(301)  # `idle` has now been idle for 601 s
    assert first.get(idle) is None and first.get(busy) is not None

    again = SessionStore(clock, 600, 3600, store=store)
    assert await again.load() == 1
    assert again.get(idle) is None
    session = again.get(busy)
    assert session is not None and (session.name, session.source) == ("alice", "10.0.0.2")
    clock.advance(3600)  # past session_max, however busy
    assert await SessionStore(clock, 600, 3600, store=store).load() == 0
    assert await store.fetchall("SELECT id_hash FROM web_sessions") == []


@pytest_twisted.ensureDeferred
async def test_changes_made_by_another_process_reach_the_running_hub(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_web_support import build_harness

    fast_hashing(monkeypatch)
    h = await build_harness(tmp_path)
    try:
        operator, _ = await h.login("operator")
        viewer, _ = await h.login("viewer")
        assert (await h.request("GET", "/api/v1/config", cookies=operator)).code == 200
        # What `bsscihub user role|disable|passwd` write while the hub runs:
        await h.hub.store.execute("UPDATE users SET role = 'viewer' WHERE name = 'operator'")
        await h.hub.store.execute("DELETE FROM web_sessions WHERE user_id = (SELECT id FROM users WHERE name = ?)",
                                  ("viewer",))
        await h.web._housekeep()  # once a minute
        assert (await h.request("GET", "/api/v1/config", cookies=operator)).code == 403
        assert (await h.request("GET", "/api/v1/auth/me", cookies=viewer)).code == 401
        await h.hub.store.execute("UPDATE users SET disabled = 1 WHERE name = 'operator'")
        await h.web._housekeep()
        assert (await h.request("GET", "/api/v1/auth/me", cookies=operator)).code == 401
    finally:
        h.web.stop()
        await h.hub.store.stop()
