"""The web layer run for real: probes, what /health and /metrics show, log-in limits, proxies, rate limits, CORS.

Over real HTTP on 127.0.0.1; the client binds 127.0.0.2, .3 ... to be a different address; limits run on a Clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool

from bsscihub import audit
from bsscihub.health import ComponentHealth
from bsscihub.web.logring import ACCESS
from bsscihub.web.service import make_site
from tests.test_web_support import PASSWORD, Harness, build_harness, fast_hashing

METRICS_TOKEN = "scrape-me-0123456789abcdef"


@attrs.frozen
class Answer:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])


class Live:
    """The harness's WebApp listening on a real port."""

    def __init__(self, harness: Harness, port: Any) -> None:
        self.h, self.port = harness, port
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def call(self, method: str, path: str, *, source: str = "127.0.0.1", role: str | None = None,
                   json_body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, bindAddress=(source, 0), pool=pool))
        hdrs = dict(headers or {})
        if role is not None:
            hdrs["Authorization"] = f"Bearer {self.h.tokens[role]}"
        kwargs: dict[str, Any] = {"headers": hdrs}
        if json_body is not None:
            kwargs["data"] = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        response = await client.request(method, self.url + path, **kwargs)
        body = await treq.content(response)
        return Answer(response.code, response.headers, body)


async def serve(tmp_path: Path, **overrides: Any) -> AsyncIterator[Live]:
    h = await build_harness(tmp_path, **overrides)
    h.web.start()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(make_site(h.web))
    try:
        yield Live(h, port)
    finally:
        await defer.maybeDeferred(port.stopListening)
        h.web.stop()
        await h.hub.store.stop()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fast_hashing(monkeypatch)
    yield


def live(tmp_path: Path, **overrides: Any) -> Any:
    """An async context: `async with live(...) as web`."""
    from contextlib import asynccontextmanager

    return asynccontextmanager(serve)(tmp_path, **overrides)


# -- probes, /health and /metrics


@pytest_twisted.ensureDeferred
async def test_probes_and_what_health_and_metrics_reveal(tmp_path: Path, fast: None) -> None:
    digest = "sha256:" + hashlib.sha256(METRICS_TOKEN.encode()).hexdigest()
    async with live(tmp_path, web={"metrics_token": digest}) as web:
        hub = web.h.hub
        assert ((await web.call("GET", "/health/live")).json()) == {"status": "live"}
        ready = await web.call("GET", "/health/ready")
        assert (ready.code, ready.json()) == (200, {"status": "ready"})
        assert ready.header("Cache-Control") == "no-store"

        # The broker away is reported in /health, and the hub stays ready: the outbox covers it.
        hub.health.register("mqtt", lambda: ComponentHealth(False, {"state": "waiting"}), needed=False)
        assert (await web.call("GET", "/health/ready")).code == 200
        anonymous = await web.call("GET", "/health")
        assert (anonymous.code, anonymous.json()) == (200, {"status": "degraded", "version": hub.version})
        detailed = (await web.call("GET", "/health", role="viewer")).json()
        assert detailed["components"]["mqtt"] == {"up": False, "needed": False, "state": "waiting"}
        by_token = await web.call("GET", "/health", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert by_token.json()["components"]["storage"]["up"] is True

        # Storage down (or still starting): not ready, so a load balancer stops sending traffic.
        hub.health.register("storage", lambda: ComponentHealth(False, {"error": "connection refused"}))
        not_ready = await web.call("GET", "/health/ready")
        assert (not_ready.code, not_ready.json()) == (503, {"status": "not_ready", "notReady": ["storage"]})
        assert (await web.call("GET", "/health")).code == 503
        assert (await web.call("GET", "/health/live")).code == 200  # but nothing restarts the process

        refused = await web.call("GET", "/metrics")
        assert refused.code == 401 and refused.header("WWW-Authenticate") == 'Bearer realm="bsscihub"'
        assert b"bsscihub_" not in refused.body
        wrong = await web.call("GET", "/metrics", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.code == 401
        scraped = await web.call("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.code == 200 and b"bsscihub_web_request_seconds" in scraped.body
        assert (await web.call("GET", "/metrics", role="viewer")).code == 200


@pytest_twisted.ensureDeferred
async def test_public_health_opens_details_and_metrics(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path, web={"public_health": True}) as web:
        assert "components" in (await web.call("GET", "/health")).json()
        assert (await web.call("GET", "/metrics")).code == 200


# -- log-in limits and reverse proxies


async def wrong_password(web: Live, *, source: str = "127.0.0.1", user: str = "admin",
                         headers: dict[str, str] | None = None) -> Answer:
    return await web.call("POST", "/api/v1/auth/token", source=source, headers=headers,
                          json_body={"username": user, "password": "not-the-password"})


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_from_one_address_do_not_lock_the_account_out(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path) as web:
        for _ in range(6):
            answer = await wrong_password(web, source="127.0.0.2")
        assert (answer.code, answer.json()["error"]["code"]) == (429, "rate_limited")
        right = {"username": "admin", "password": PASSWORD}
        blocked = await web.call("POST", "/api/v1/auth/token", source="127.0.0.2", json_body=right)
        assert blocked.code == 429 and int(blocked.header("Retry-After") or 0) > 0
        # The admin, from anywhere else, gets in at once.
        token = await web.call("POST", "/api/v1/auth/token", source="127.0.0.3", json_body=right)
        assert token.code == 201 and token.json()["user"] == "admin"
        assert token.header("Cache-Control") == "no-store"  # the token is never cached on the way
        login = await web.call("POST", "/api/v1/auth/login", source="127.0.0.3", json_body=right)
        assert login.code == 200 and login.header("Cache-Control") == "no-store"
        failed, _ = await audit.query(web.h.hub.store, action="auth.login_failed")
        assert {e.source for e in failed} == {"127.0.0.2"} and len(failed) == 5


@pytest_twisted.ensureDeferred
async def test_trusted_proxy_gives_the_client_address_and_scheme(tmp_path: Path, fast: None,
                                                                 logged: list[Any]) -> None:
    async with live(tmp_path, web={"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]}) as web:
        store = web.h.hub.store
        # Through the proxy (127.0.0.1, trusted): the client is the rightmost address not trusted.
        forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.2.3", "X-Forwarded-Proto": "https"}
        for _ in range(5):
            await wrong_password(web, headers=forwarded)
        failed, _ = await audit.query(store, action="auth.login_failed")
        assert {e.source for e in failed} == {"203.0.113.7"}
        assert (await wrong_password(web, headers=forwarded)).code == 429
        # Another client behind the same proxy is not held back by that one.
        right = {"username": "admin", "password": PASSWORD}
        other = {"X-Forwarded-For": "203.0.113.8", "X-Forwarded-Proto": "https"}
        login = await web.call("POST", "/api/v1/auth/login", json_body=right, headers=other)
        assert login.code == 200
        cookie = [part.strip().lower() for part in (login.header("Set-Cookie") or "").split(";")]
        assert cookie[0].startswith("__host-bsscihub_session=") and "secure" in cookie  # TLS ended at the proxy
        assert login.header("Strict-Transport-Security")
        entries, _ = await audit.query(store, action="auth.login")
        assert entries[0].source == "203.0.113.8"
        access = [e["line"] for e in logged if e.get("log_namespace") == ACCESS and "/auth/login" in e["line"]]
        assert access[-1].startswith('"203.0.113.8" ')  # the access log names the client too
        # RFC 7239 Forwarded works the same way.
        await web.call("POST", "/api/v1/auth/login", json_body=right,
                       headers={"Forwarded": 'for="[2001:db8::7]:4711";proto=http'})
        entries, _ = await audit.query(store, action="auth.login")
        assert entries[0].source == "2001:db8::7"

        # From a peer that is not a trusted proxy, the same headers are ignored: anyone could send them.
        login = await web.call("POST", "/api/v1/auth/login", source="127.0.0.2", json_body=right, headers=forwarded)
        assert "secure" not in (login.header("Set-Cookie") or "").lower()
        entries, _ = await audit.query(store, action="auth.login")
        assert entries[0].source == "127.0.0.2"


# -- rate limits


@pytest_twisted.ensureDeferred
async def test_api_rate_limit_per_client_answers_429_with_retry_after(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path, web={"rate_limit": 2, "rate_burst": 3}) as web:
        for _ in range(3):
            assert (await web.call("GET", "/api/v1/auth/me", role="viewer")).code == 200
        refused = await web.call("GET", "/api/v1/auth/me", role="viewer")
        assert (refused.code, refused.json()["error"]["code"]) == (429, "rate_limited")
        assert refused.header("Retry-After") == "1"  # 0.5 s, rounded up to whole seconds
        # Per client: another caller, even from the same address, is not affected.
        assert (await web.call("GET", "/api/v1/auth/me", role="operator")).code == 200
        web.h.clock.advance(0.5)
        assert (await web.call("GET", "/api/v1/auth/me", role="viewer")).code == 200
        metrics = (await web.call("GET", "/metrics", role="admin")).body.decode()
        assert 'bsscihub_web_rate_limited_total{limit="api"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_routes_without_login_are_limited_per_address(tmp_path: Path, fast: None) -> None:
    families = ("mioty", "gate", "devices")
    async with live(tmp_path, families=families, web={"anonymous_rate_limit": 0.1, "anonymous_rate_burst": 4}) as web:
        register = {"hardware_id": "hw-1", "controller_id": "gate-1", "firmware_version": "1"}
        answers = [
            await wrong_password(web, source="127.0.0.2"),
            await web.call("POST", "/api/v1/gates/register", source="127.0.0.2", json_body=register),
            await web.call("POST", "/api/v1/devices/dev-1/telemetry", source="127.0.0.2",
                           json_body={"type": "temperature", "value": 1}, headers={"X-Device-Key": "nope"}),
            await web.call("GET", "/login", source="127.0.0.2"),
        ]
        # Each answered by its route (the devices family has no running service in this harness) ...
        assert [a.code for a in answers] == [401, 401, 503, 200]
        # ... until the address has used up its share of the routes that take no login.
        for path, body in (("/api/v1/auth/login", {"username": "a", "password": "b"}),
                           ("/api/v1/gates/register", register), ("/api/v1/devices/dev-1/telemetry", {"value": 1})):
            refused = await web.call("POST", path, source="127.0.0.2", json_body=body)
            assert (refused.code, refused.header("Retry-After")) == (429, "10"), path
        page = await web.call("POST", "/login", source="127.0.0.2")
        assert page.code == 429 and page.header("Retry-After") == "10"
        # Another address is not held back; a logged-in caller is limited by web.rate_limit only.
        assert (await wrong_password(web, source="127.0.0.3")).code == 401
        assert (await web.call("GET", "/api/v1/gates/mine", source="127.0.0.2", role="operator")).code != 429


# -- the audit log under a flood of refusals


@pytest_twisted.ensureDeferred
async def test_refusals_cannot_flood_the_audit_log(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path, web={"rate_limit": 0, "anonymous_rate_limit": 0, "audit_retention": "30d"}) as web:
        store = web.h.hub.store
        for _ in range(40):
            assert (await web.call("POST", "/api/v1/api-keys", json_body={"name": "x"})).code == 401
        entries, total = await audit.query(store, action="apikey.create.refused")
        assert total == 5  # the first few as they came ...
        await web.h.web._housekeep()  # ... the rest summed up once a minute
        entries, total = await audit.query(store, action="apikey.create.refused")
        assert total == 6 and entries[0].detail["repeated"] == 35 and entries[0].source == "127.0.0.1"
        assert entries[0].detail["code"] == "unauthorized"

        # Entries older than web.audit_retention are removed by the same housekeeping.
        await store.execute("UPDATE audit_log SET time = time - 31 * 86400 WHERE id = ?", (entries[-1].id,))
        web.h.clock.advance(3600)
        await web.h.web._housekeep()
        assert (await audit.query(store, action="apikey.create.refused"))[1] == 5


# -- CORS


@pytest_twisted.ensureDeferred
async def test_cors_is_off_by_default(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path) as web:
        origin = {"Origin": "https://app.example.com"}
        answer = await web.call("GET", "/api/v1/auth/me", role="viewer", headers=origin)
        assert answer.code == 200 and answer.header("Access-Control-Allow-Origin") is None
        preflight = await web.call("OPTIONS", "/api/v1/auth/me",
                                   headers={**origin, "Access-Control-Request-Method": "GET"})
        assert preflight.header("Access-Control-Allow-Origin") is None


@pytest_twisted.ensureDeferred
async def test_cors_for_configured_origins(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path, web={"cors_origins": ["https://app.example.com"]}) as web:
        origin = {"Origin": "https://app.example.com"}
        preflight = await web.call("OPTIONS", "/api/v1/mioty/sensors", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.code == 204
        assert preflight.header("Access-Control-Allow-Origin") == "https://app.example.com"
        assert "Authorization" in (preflight.header("Access-Control-Allow-Headers") or "")
        assert "POST" in (preflight.header("Access-Control-Allow-Methods") or "")
        assert preflight.header("Access-Control-Allow-Credentials") is None  # bearer tokens, never cookies
        answer = await web.call("GET", "/api/v1/auth/me", role="viewer", headers=origin)
        assert answer.header("Access-Control-Allow-Origin") == "https://app.example.com"
        assert "Retry-After" in (answer.header("Access-Control-Expose-Headers") or "")
        assert answer.header("Vary") == "Origin"
        other = await web.call("GET", "/api/v1/auth/me", role="viewer", headers={"Origin": "https://evil.example"})
        assert other.code == 200 and other.header("Access-Control-Allow-Origin") is None
        page = await web.call("GET", "/login", headers=origin)
        assert page.header("Access-Control-Allow-Origin") is None  # the API only, not the admin pages


# -- Swagger UI


@pytest_twisted.ensureDeferred
async def test_api_docs_are_served_by_the_hub(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path) as web:
        page = await web.call("GET", "/api/docs")
        assert page.code == 200 and (page.header("Content-Type") or "").startswith("text/html")
        assert b'src="/api/docs/swagger-ui-bundle.js"' in page.body and b"<script>" not in page.body
        assert "script-src 'self'" in (page.header("Content-Security-Policy") or "")
        bundle = await web.call("GET", "/api/docs/swagger-ui-bundle.js")
        assert bundle.code == 200 and bundle.header("Content-Type") == "text/javascript"
        assert b"SwaggerUIBundle" in bundle.body
        assert (await web.call("GET", "/api/docs/swagger-ui.css")).code == 200
        assert (await web.call("GET", "/static/api-docs.js")).code == 200
        # The admin pages link to it.
        login = await web.call("POST", "/api/v1/auth/login", json_body={"username": "viewer", "password": PASSWORD})
        cookie = (login.header("Set-Cookie") or "").split(";")[0]
        dashboard = await web.call("GET", "/", headers={"Cookie": cookie})
        assert dashboard.code == 200 and b'href="/api/docs"' in dashboard.body
        # Only what the page needs: not the package's editor, source maps or anything beside them.
        for path in ("/api/docs/swagger-editor-bundle.js", "/api/docs/index.css", "/api/docs/../__init__.py",
                     "/api/docs/%2e%2e/core.py"):
            assert (await web.call("GET", path)).code == 404, path


def test_urls_handed_out_use_the_scheme_the_client_used() -> None:
    """Signed file URLs of the gate family say https when TLS ended at a trusted proxy, never otherwise."""
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest

    from bsscihub.protocols.gate.web import base_url
    from bsscihub.web.proxy import ProxyPolicy, client_of, parse_networks

    def request(peer: str, trusted: list[str]) -> Any:
        r = DummyRequest([b""])
        r.client = IPv4Address("TCP", peer, 40000)
        r.requestHeaders.setRawHeaders(b"host", [b"hub.example.com"])
        r.requestHeaders.setRawHeaders(b"x-forwarded-proto", [b"https"])
        client_of(r, ProxyPolicy(parse_networks(trusted)))
        return r

    assert base_url(request("127.0.0.1", ["127.0.0.1"])) == "https://hub.example.com"
    assert base_url(request("192.0.2.9", ["127.0.0.1"])) == "http://hub.example.com"


@pytest_twisted.ensureDeferred
async def test_an_ipv6_client_is_limited_by_its_64_not_by_each_address(tmp_path: Path, fast: None) -> None:
    async with live(tmp_path, web={"trusted_proxies": ["127.0.0.1"]}) as web:
        for n in range(5):  # a new address of the same /64 for each guess
            answer = await wrong_password(web, headers={"X-Forwarded-For": f"2001:db8:0:7::{n + 1:x}"})
            assert answer.code == 401
        assert (await wrong_password(web, headers={"X-Forwarded-For": "2001:db8:0:7::99"})).code == 429
        right = {"username": "admin", "password": PASSWORD}
        other = await web.call("POST", "/api/v1/auth/token", json_body=right,
                               headers={"X-Forwarded-For": "2001:db8:0:8::1"})
        assert other.code == 201
        failed, _ = await audit.query(web.h.hub.store, action="auth.login_failed")
        assert failed[0].source == "2001:db8:0:7::5"  # the audit log keeps the exact address


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("trusted_proxies", ["10.0.0.0/8", "proxy.example"], "'proxy.example' is not one"),
    ("cors_origins", ["https://app.example.com/path"], "expected origins such as https://app.example.com"),
    ("metrics_token", "my-plain-token", "never the token itself"),
    ("rate_limit", -1, "0 turns the limit off"),
    ("audit_retention", "forever", "expected a duration"),
])
def test_bad_web_settings_stop_the_start_naming_the_key(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    from bsscihub.config import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, web={key: value})
    assert caught.value.key == f"web.{key}" and expected in str(caught.value)


def test_web_settings_from_the_environment(tmp_path: Path) -> None:
    from bsscihub.config import load_config

    config = load_config(None, {"BSSCIHUB_WEB_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8",
                                "BSSCIHUB_WEB_CORS_ORIGINS": "https://app.example.com",
                                "BSSCIHUB_WEB_RATE_LIMIT": "0", "BSSCIHUB_WEB_PUBLIC_HEALTH": "true"})
    web = config.web
    assert web.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8") and web.cors_origins == ("https://app.example.com",)
    assert (web.rate_limit, web.public_health) == (0.0, True)
