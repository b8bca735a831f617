"""Sessions, CSRF, login rate limiting, API keys and tokens, tickets: the web layer's security, clock injected.

Route-level tests through StubTreq; the session store and limiter also directly where timing matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from bsscihub import audit, users
from bsscihub.contract import rfc3339
from bsscihub.web.auth import LoginLimiter
from bsscihub.web.sessions import SessionStore
from tests.test_web_support import PASSWORD, Harness, build_harness, fast_hashing, harness_fixture


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


def session_cookie_attributes(reply: Any) -> list[str]:
    cookie = reply.header("Set-Cookie")
    assert cookie is not None
    return [part.strip().lower() for part in cookie.split(";")]


@pytest_twisted.ensureDeferred
async def test_session_cookie_is_httponly_and_samesite(harness: Harness) -> None:
    reply = await harness.request("POST", "/api/v1/auth/login", json_body={"username": "viewer", "password": PASSWORD})
    attributes = session_cookie_attributes(reply)
    assert attributes[0].startswith("bsscihub_session=")
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    assert "secure" not in attributes  # plain HTTP here: a Secure cookie would never come back


@pytest_twisted.ensureDeferred
async def test_session_cookie_is_secure_under_https(tmp_path: Path, monkeypatch: Any) -> None:
    fast_hashing(monkeypatch)
    h = await build_harness(tmp_path, web={"https": True})
    try:
        reply = await h.request("POST", "/api/v1/auth/login", json_body={"username": "viewer", "password": PASSWORD})
        attributes = session_cookie_attributes(reply)
        assert attributes[0].startswith("__host-bsscihub_session=") and "secure" in attributes
        assert (reply.header("Strict-Transport-Security") or "").startswith("max-age=")
    finally:
        h.web.stop()
        await h.hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_session_idle_and_absolute_expiry(harness: Harness) -> None:
    h = harness
    idle, maximum = h.hub.config.web.session_idle, h.hub.config.web.session_max
    cookies, _ = await h.login("viewer")
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 200
    h.clock.advance(idle - 1)
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 200  # use resets the idle timer
    h.clock.advance(idle - 1)
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 200
    h.clock.advance(idle)
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 401

    cookies, _ = await h.login("viewer")
    started = h.clock.seconds()
    while h.clock.seconds() - started < maximum - idle / 2:
        h.clock.advance(idle / 2)  # always active, never idle
        assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 200
    h.clock.advance(idle / 2)
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 401
    page = await h.request("GET", "/audit", cookies=cookies)
    assert page.code == 303 and page.header("Location") == "/login?next=/audit"


@pytest_twisted.ensureDeferred
async def test_session_store_is_bounded() -> None:
    store = SessionStore(Clock(), 60, 600, limit=3)
    ids = [(await store.create(1, "u", "viewer", "ip"))[0] for _ in range(5)]
    assert len(store) == 3 and store.get(ids[0]) is None and store.get(ids[4]) is not None


@pytest_twisted.ensureDeferred
async def test_csrf_is_required_for_session_changes(harness: Harness) -> None:
    h = harness
    cookies, csrf = await h.login("admin")
    body = {"name": "mallory", "role": "admin"}
    reply = await h.request("POST", "/api/v1/users", cookies=cookies, json_body=body)
    assert (reply.code, reply.error["code"]) == (403, "csrf_failed")
    reply = await h.request("POST", "/api/v1/users", cookies=cookies, json_body=body,
                            headers={"X-CSRF-Token": "x" * 43})
    assert reply.code == 403
    assert not await users.user_exists(h.hub.store, "mallory")
    reply = await h.request("POST", "/api/v1/users", cookies=cookies, json_body=body, headers={"X-CSRF-Token": csrf})
    assert reply.code == 201
    # Reads need no token; bearer calls carry no ambient credentials and need none either.
    assert (await h.request("GET", "/api/v1/users", cookies=cookies)).code == 200
    assert (await h.request("DELETE", "/api/v1/users/mallory", role="admin")).code == 204


@pytest_twisted.ensureDeferred
async def test_csrf_on_page_forms(harness: Harness) -> None:
    h = harness
    cookies, csrf = await h.login("admin")
    form = "name=eve&role=viewer&password=long-enough-pw"
    ctype = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await h.request("POST", "/users", cookies=cookies, data=form, headers=ctype)
    assert reply.code == 403 and b"CSRF" in reply.body
    assert not await users.user_exists(h.hub.store, "eve")
    reply = await h.request("POST", "/users", cookies=cookies, data=form + f"&_csrf={csrf}", headers=ctype)
    assert (reply.code, reply.header("Location")) == (303, "/users")
    assert await users.user_exists(h.hub.store, "eve")
    # The log-in form has no session yet: its token must match the cookie set with the form.
    reply = await h.request("POST", "/login", data=f"username=viewer&password={PASSWORD}&_csrf=forged",
                            headers=ctype)
    assert reply.code == 403 and reply.header("Set-Cookie") is not None
    assert "bsscihub_session" not in (reply.header("Set-Cookie") or "")


@pytest_twisted.ensureDeferred
async def test_page_login_and_logout(harness: Harness) -> None:
    h = harness
    form = await h.request("GET", "/login?next=/audit")
    login_cookie = (form.header("Set-Cookie") or "").split(";")[0]
    name, _, token = login_cookie.partition("=")
    assert name == "bsscihub_login" and f'value="{token}"'.encode() in form.body
    ctype = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await h.request("POST", "/login", cookies={name: token}, headers=ctype,
                            data=f"username=admin&password=wrong-password&_csrf={token}&next=/audit")
    assert reply.code == 401 and b"wrong user name or password" in reply.body
    reply = await h.request("POST", "/login", cookies={name: token}, headers=ctype,
                            data=f"username=admin&password={PASSWORD}&_csrf={token}&next=//evil.example/")
    assert (reply.code, reply.header("Location")) == (303, "/")  # never off-site
    session = dict([(reply.header("Set-Cookie") or "").split(";")[0].split("=", 1)])
    page = await h.request("GET", "/", cookies=session)
    assert page.code == 200 and b"Dashboard" in page.body
    csrf = page.body.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    out = await h.request("POST", "/logout", cookies=session, headers=ctype, data=f"_csrf={csrf}")
    assert (out.code, out.header("Location")) == (303, "/login")
    assert (await h.request("GET", "/", cookies=session)).code == 303
    actions = [e.action for e in (await audit.query(h.hub.store, actor="admin"))[0]]
    assert actions[:2] == ["auth.logout", "auth.login"]


@pytest_twisted.ensureDeferred
async def test_login_rate_limited_per_account_and_address(harness: Harness) -> None:
    h = harness
    for _ in range(5):
        reply = await h.request("POST", "/api/v1/auth/token",
                                json_body={"username": "operator", "password": "nope-nope"})
        assert reply.code == 401
    reply = await h.request("POST", "/api/v1/auth/token", json_body={"username": "operator", "password": PASSWORD})
    assert (reply.code, reply.error["code"]) == (429, "rate_limited")  # from this address, even the right one
    assert int(reply.header("Retry-After") or 0) == 180  # one attempt back every 15 min / 5
    h.clock.advance(180)
    reply = await h.request("POST", "/api/v1/auth/token", json_body={"username": "operator", "password": PASSWORD})
    assert reply.code == 201
    failed, _ = await audit.query(h.hub.store, action="auth.login_failed")
    assert len(failed) == 5 and {e.target for e in failed} == {"operator"} and failed[0].source == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_an_account_guessed_from_many_addresses_is_slowed_down_not_locked(tmp_path: Path,
                                                                                monkeypatch: Any) -> None:
    from twisted.internet import defer

    fast_hashing(monkeypatch)
    h = await build_harness(tmp_path, web={"trusted_proxies": ["127.0.0.1"]})
    try:
        for n in range(20):  # a botnet: each address stays under its own limit
            reply = await h.request("POST", "/api/v1/auth/token", headers={"X-Forwarded-For": f"198.51.100.{n}"},
                                    json_body={"username": "admin", "password": "guess-guess"})
            assert reply.code == 401
        pending = defer.ensureDeferred(h.request(
            "POST", "/api/v1/auth/token", headers={"X-Forwarded-For": "203.0.113.1"},
            json_body={"username": "admin", "password": PASSWORD}))
        from twisted.internet import reactor, task

        for _ in range(20):
            await task.deferLater(reactor, 0.005, lambda: None)
        assert not pending.called  # held back by the slow-down ...
        h.clock.advance(h.web.limiter.slow_down)
        reply = await pending
        assert reply.code == 201  # ... and then let in: the right password is never refused
        metrics = (await h.request("GET", "/metrics", role="admin")).body.decode()
        assert 'bsscihub_web_login_failures_total{reason="slowed_down"} 1.0' in metrics
    finally:
        h.web.stop()
        await h.hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_login_limiter_counts_per_account_and_address_never_per_account_alone() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock, per_account_source=(3, 60), per_source=(5, 60), slow_after=(10, 60))
    for _ in range(3):
        assert await limiter.retry_after("10.0.0.1", "admin") is None
        await limiter.failed("10.0.0.1", "admin")
    assert await limiter.retry_after("10.0.0.1", "admin") == pytest.approx(20)
    assert await limiter.retry_after("10.0.0.2", "admin") is None  # the account is not locked for others
    assert await limiter.retry_after("10.0.0.1", "bob") is None
    await limiter.failed("10.0.0.1", "bob")
    await limiter.failed("10.0.0.1", "carol")
    assert await limiter.retry_after("10.0.0.1", "dave") is not None  # too many names from one address
    assert await limiter.retry_after("10.0.0.3", "dave") is None
    await limiter.succeeded("10.0.0.1", "admin")
    assert await limiter.retry_after("10.0.0.9", "admin") is None
    # Many addresses guessing one account: it is slowed down, never refused.
    assert await limiter.delay("admin") == 0
    for n in range(10):
        await limiter.failed(f"10.1.0.{n}", "admin")
    assert await limiter.delay("admin") == limiter.slow_down > 0
    assert await limiter.retry_after("10.2.0.1", "admin") is None
    clock.advance(60)
    assert await limiter.delay("admin") == 0


@pytest_twisted.ensureDeferred
async def test_api_keys_shown_once_revocable_and_expiring(harness: Harness) -> None:
    h = harness
    reply = await h.request("POST", "/api/v1/api-keys", role="operator",
                            json_body={"name": "grafana", "role": "viewer", "expiresInDays": 1})
    assert reply.code == 201
    secret, key = reply.json()["secret"], reply.json()["key"]
    assert key["role"] == "viewer" and secret.startswith(key["prefix"] + "_")
    listed = (await h.request("GET", "/api/v1/api-keys", role="operator")).json()["items"]
    assert secret not in str(listed) and [k["name"] for k in listed] == ["grafana", "test"]
    stored = await h.hub.store.fetchone("SELECT secret_hash FROM api_keys WHERE id = ?", (key["id"],))
    assert stored is not None and stored[0].startswith("sha256:") and secret.split("_", 2)[2] not in stored[0]

    assert (await h.request("GET", "/api/v1/mioty/sensors", token=secret)).code == 200
    assert (await h.request("POST", "/api/v1/mioty/base-stations/70b3d59cd0000001/status", token=secret)).code == 403

    h.clock.advance(86400)
    reply = await h.request("GET", "/api/v1/mioty/sensors", token=secret)
    assert (reply.code, reply.error["message"]) == (401, "invalid or expired token")
    listed = (await h.request("GET", "/api/v1/api-keys", role="operator")).json()["items"]
    assert listed[0]["state"] == "expired"

    reply = await h.request("POST", "/api/v1/api-keys", role="operator", json_body={"name": "ci"})
    secret, key_id = reply.json()["secret"], reply.json()["key"]["id"]
    assert reply.json()["key"]["role"] == "operator"
    assert (await h.request("DELETE", f"/api/v1/api-keys/{key_id}", role="viewer")).code == 404  # not theirs
    assert (await h.request("DELETE", f"/api/v1/api-keys/{key_id}", role="operator")).code == 204
    assert (await h.request("GET", "/api/v1/auth/me", token=secret)).code == 401
    assert (await h.request("DELETE", f"/api/v1/api-keys/{key_id}", role="admin")).code == 409
    entries, _ = await audit.query(h.hub.store, action="apikey.")
    assert [(e.action, e.actor) for e in entries] == [
        ("apikey.revoke", "operator"), ("apikey.create", "operator"), ("apikey.create", "operator"),
    ]
    assert secret not in str([e.to_json() for e in entries])


@pytest_twisted.ensureDeferred
async def test_api_keys_never_exceed_their_user(harness: Harness) -> None:
    h = harness
    reply = await h.request("POST", "/api/v1/api-keys", role="viewer", json_body={"name": "x", "role": "admin"})
    assert (reply.code, reply.error["field"]) == (403, "role")
    reply = await h.request("POST", "/api/v1/api-keys", role="viewer", json_body={"name": "x", "user": "admin"})
    assert reply.code == 403
    reply = await h.request("POST", "/api/v1/api-keys", role="admin", json_body={"name": "ops", "user": "operator"})
    secret = reply.json()["secret"]
    assert reply.json()["key"]["user"] == "operator"
    assert (await h.request("GET", "/api/v1/config", token=secret)).code == 200
    # The key is the operator's: demote the operator and the key follows.
    await h.request("PATCH", "/api/v1/users/operator", role="admin", json_body={"role": "viewer"})
    assert (await h.request("GET", "/api/v1/config", token=secret)).code == 403
    await h.request("PATCH", "/api/v1/users/operator", role="admin", json_body={"disabled": True})
    assert (await h.request("GET", "/api/v1/auth/me", token=secret)).code == 401


@pytest_twisted.ensureDeferred
async def test_login_tokens_and_logout(harness: Harness) -> None:
    h = harness
    reply = await h.request("POST", "/api/v1/auth/token", json_body={"username": "viewer", "password": PASSWORD})
    token = reply.json()["token"]
    assert reply.json()["expiresAt"] == rfc3339(h.clock.seconds() + h.hub.config.web.session_max)
    me = (await h.request("GET", "/api/v1/auth/me", token=token)).json()
    assert (me["user"], me["via"]) == ("viewer", "token")
    assert (await h.request("POST", "/api/v1/auth/logout", token=token)).code == 204
    assert (await h.request("GET", "/api/v1/auth/me", token=token)).code == 401
    reply = await h.request("POST", "/api/v1/auth/logout", role="viewer")
    assert (reply.code, reply.error["code"]) == (400, "not_a_login")


@pytest_twisted.ensureDeferred
async def test_disabling_a_user_ends_their_sessions(harness: Harness) -> None:
    h = harness
    cookies, _ = await h.login("operator")
    await h.request("PATCH", "/api/v1/users/operator", role="admin", json_body={"disabled": True})
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 401
    reply = await h.request("POST", "/api/v1/auth/login", json_body={"username": "operator", "password": PASSWORD})
    assert reply.code == 401


@pytest_twisted.ensureDeferred
async def test_password_change(harness: Harness) -> None:
    h = harness
    cookies, csrf = await h.login("viewer")
    other, _ = await h.login("viewer")
    reply = await h.request("POST", "/api/v1/auth/password", cookies=cookies, headers={"X-CSRF-Token": csrf},
                            json_body={"current": "wrong-one", "new": "a-new-password"})
    assert (reply.code, reply.error["field"]) == (403, "current")
    reply = await h.request("POST", "/api/v1/auth/password", cookies=cookies, headers={"X-CSRF-Token": csrf},
                            json_body={"current": PASSWORD, "new": "a-new-password"})
    assert reply.code == 204
    assert (await h.request("GET", "/api/v1/auth/me", cookies=cookies)).code == 200
    assert (await h.request("GET", "/api/v1/auth/me", cookies=other)).code == 401  # other sessions end
    assert await users.authenticate(h.hub.store, "viewer", "a-new-password") is not None


@pytest_twisted.ensureDeferred
async def test_tickets_work_once_and_briefly(harness: Harness) -> None:
    h = harness
    ticket = (await h.request("POST", "/api/v1/auth/ticket", role="viewer")).json()["ticket"]
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    # Without the WebSocket handshake headers the request is refused after authenticating.
    reply = await h.request("GET", f"/api/v1/stream?ticket={ticket}")
    assert (reply.code, reply.error["code"]) == (426, "upgrade_required")
    reply = await h.request("GET", f"/api/v1/stream?ticket={ticket}", headers=upgrade)
    assert (reply.code, reply.error["message"]) == (401, "invalid or expired ticket")  # used up
    ticket = (await h.request("POST", "/api/v1/auth/ticket", role="viewer")).json()["ticket"]
    h.clock.advance(31)
    assert (await h.request("GET", f"/api/v1/stream?ticket={ticket}", headers=upgrade)).code == 401
    # A ticket is for the stream only.
    ticket = (await h.request("POST", "/api/v1/auth/ticket", role="viewer")).json()["ticket"]
    assert (await h.request("GET", f"/api/v1/auth/me?ticket={ticket}")).code == 401


@pytest_twisted.ensureDeferred
async def test_passwords_are_argon2id_and_unknown_users_take_as_long(harness: Harness, monkeypatch: Any) -> None:
    row = await harness.hub.store.fetchone("SELECT password_hash FROM users WHERE name = 'admin'")
    assert row is not None and row[0].startswith("$argon2id$")
    verified: list[str] = []
    real = users.verify_password
    monkeypatch.setattr(users, "verify_password", lambda h, p: verified.append(h) or real(h, p))
    assert await users.authenticate(harness.hub.store, "nobody", "whatever") is None
    assert verified and verified[0].startswith("$argon2id$")  # a dummy hash is checked all the same


@pytest_twisted.ensureDeferred
async def test_revocation_elsewhere_applies_within_the_key_cache_ttl(harness: Harness) -> None:
    from bsscihub.web.auth import KEY_CACHE_TTL

    h = harness
    assert (await h.request("GET", "/api/v1/auth/me", role="viewer")).code == 200
    # Another process on the same database revokes the key: this one learns it within the TTL.
    await h.hub.store.execute("UPDATE api_keys SET revoked_at = 1 WHERE name = 'test'")
    assert (await h.request("GET", "/api/v1/auth/me", role="viewer")).code == 200
    h.clock.advance(KEY_CACHE_TTL)
    assert (await h.request("GET", "/api/v1/auth/me", role="viewer")).code == 401


@pytest_twisted.ensureDeferred
async def test_refusals_before_the_handler_are_audited(harness: Harness) -> None:
    h = harness
    assert (await h.request("POST", "/api/v1/api-keys", json_body={"name": "x"})).code == 401
    assert (await h.request("POST", "/api/v1/users", role="operator", json_body={"name": "x"})).code == 403
    reply = await h.request("POST", "/api/v1/api-keys", role="operator", json_body={"name": 5})
    assert reply.code == 400
    entries, _ = await audit.query(h.hub.store)
    refused = [(e.action, e.actor, e.detail["status"]) for e in entries if e.action.endswith(".refused")]
    assert sorted(refused) == [
        ("apikey.create.refused", "anonymous", 401),
        ("apikey.create.refused", "operator", 400),
        ("user.add.refused", "operator", 403),
    ]
