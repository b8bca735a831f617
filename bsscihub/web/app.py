"""The Klein application object: routes are methods, state lives on the instance.

/health and /metrics need no authentication; /api/v1 and the admin pages come from the declared route table.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.static import File
from zope.interface.verify import verifyObject

from bsscihub import audit
from bsscihub.family import IDashboardSummary, IRootRoutes, IWebExtension, IWebRoutes, binding_kinds
from bsscihub.hub import Hub
from bsscihub.web import certs, openapi
from bsscihub.web.api import CORE_GROUPS, AuthApi
from bsscihub.web.auth import Authenticator, LoginLimiter
from bsscihub.web.dispatch import Dispatcher
from bsscihub.web.errors import ApiError, rate_limited
from bsscihub.web.events import EventStats
from bsscihub.web.logring import LogRing
from bsscihub.web.pages import CORE_NAV, CorePages, Pages
from bsscihub.web.proxy import ProxyPolicy, client_of, limit_key, parse_networks
from bsscihub.web.routing import BoundRoute, collect
from bsscihub.web.sessions import SessionStore
from bsscihub.web.stream import StreamHub, WSRoute

API_PREFIX = "/api/v1"
STATIC = Path(__file__).parent / "static"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


CORS_HEADERS = b"Authorization, Content-Type, X-CSRF-Token"
CORS_EXPOSED = b"Location, Retry-After, WWW-Authenticate, Content-Disposition"


class SecurityHeaders(Resource):
    """Wraps the whole site: every response, errors and static files included, gets the same headers.

    It also resolves the real client once (behind trusted proxies) and answers CORS preflights.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, *, https: bool, proxies: ProxyPolicy | None = None,
                 cors_origins: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.https = https
        self.proxies = proxies or ProxyPolicy()
        self.cors_origins = frozenset(cors_origins)
        self.headers = [
            (b"content-security-policy", CSP.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]

    def _cors(self, request: Any) -> bool:
        """Sets the CORS headers for an allowed origin on /api/; True if this is a preflight (answered)."""
        origin = request.getHeader(b"origin")
        if not origin or not self.cors_origins or not request.path.startswith(b"/api/"):
            return False
        text = origin.decode("latin-1")
        if text not in self.cors_origins and "*" not in self.cors_origins:
            return False
        # Bearer tokens only: the session cookie is SameSite=Strict and no credentials are allowed here.
        request.setHeader(b"access-control-allow-origin", b"*" if "*" in self.cors_origins else origin)
        request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE")
            request.setHeader(b"access-control-allow-headers", CORS_HEADERS)
            request.setHeader(b"access-control-max-age", b"600")
            return True
        request.setHeader(b"access-control-expose-headers", CORS_EXPOSED)
        return False

    def render(self, request: Any) -> Any:
        client = client_of(request, self.proxies)
        for name, value in self.headers:
            request.setHeader(name, value)
        if self.https or client.https:
            request.setHeader(b"strict-transport-security", b"max-age=31536000")
        request.setHeader(b"server", b"bsscihub")
        if not _decodable_target(request):
            # Klein and static files would log a traceback for these; no route can match them.
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"bad request: the path or host is not UTF-8 text\n"
        if self._cors(request):
            return b""
        return self.wrapped.render(request)


def _decodable_target(request: Any) -> bool:
    """Whether the (percent-decoded) path and the host are UTF-8 without NUL or other control bytes."""
    try:
        text = b"/".join(request.postpath).decode() + request.getRequestHostname().decode()
    except UnicodeDecodeError:
        return False
    return not any(ch < " " or ch == "\x7f" for ch in text)


class StaticFiles(File):
    """The UI's own assets: no directory listings, explicit types (nosniff makes browsers strict)."""

    contentTypes = {**File.contentTypes, ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2"}

    def directoryListing(self) -> Any:
        return self.forbidden

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"cache-control", b"public, max-age=3600")
        return super().render_GET(request)


SWAGGER_FILES = frozenset({b"swagger-ui.css", b"swagger-ui-bundle.js", b"favicon-32x32.png"})


class _Only(Resource):
    """A few named files of a directory and nothing else (the package ships editors and source maps too)."""

    def __init__(self, directory: Path, names: frozenset[bytes]) -> None:
        super().__init__()
        self.directory, self.names = directory, names

    def getChild(self, path: bytes, request: Any) -> IResource:
        if path not in self.names:
            return notFound()
        return StaticFiles(str(self.directory / path.decode()))


def swagger_assets() -> IResource | None:
    """Swagger UI's files from the swagger-ui-py package (found without importing it), or None."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (static / "swagger-ui-bundle.js").is_file():
        return None
    return _Only(static, SWAGGER_FILES)


class WebApp:
    app = Klein()
    log = Logger()

    def __init__(self, hub: Hub, *, clock: IReactorTime | None = None, https: bool | None = None) -> None:
        self.hub = hub
        self.clock: IReactorTime = clock if clock is not None else hub.reactor
        self.secure = hub.config.web.https if https is None else https
        web = hub.config.web
        self.sessions = SessionStore(self.clock, web.session_idle, web.session_max, store=hub.store)
        limiter = hub.cluster.limiter  # in a cluster: counted once for all hubs
        self.limiter = LoginLimiter(self.clock, limiter=limiter)
        self.proxies = ProxyPolicy(parse_networks(web.trusted_proxies))
        self.api_limiter = (limiter("web.api", self.clock, rate=web.rate_limit, burst=web.rate_burst)
                            if web.rate_limit > 0 else None)
        self.anonymous_limiter = (
            limiter("web.anonymous", self.clock, rate=web.anonymous_rate_limit, burst=web.anonymous_rate_burst)
            if web.anonymous_rate_limit > 0 else None)
        self.refusals = hub.refusals
        self.auth = Authenticator(hub.store, self.sessions, self.clock, secure=self.secure)
        self.stats = EventStats(self.clock)
        self.logs = LogRing()
        self.stream = StreamHub(self.clock, hub.metrics)
        self.login_failures = Counter(
            "bsscihub_web_login_failures", "Refused log-ins by reason", ["reason"], registry=hub.metrics
        )
        self.throttled = Counter(
            "bsscihub_web_rate_limited", "Requests refused with 429, by limit", ["limit"], registry=hub.metrics
        )
        self.auth_api = AuthApi(self)
        self.binding_kinds = binding_kinds(hub.families)  # what the families' certificates may be bound to
        self.extensions: list[Any] = []
        nav = list(CORE_NAV)
        templates: list[Any] = []
        routes: list[BoundRoute] = []
        for group in (self.auth_api, *(cls(self) for cls in CORE_GROUPS if cls is not AuthApi), CorePages(self)):
            routes += collect(group, api_prefix=API_PREFIX, page_prefix="", tag="")
        routes = [certs.with_binding_fields(r, self.binding_kinds) for r in routes]
        routes += collect(WSRoute(self), api_prefix="", page_prefix="", tag="")
        for name, family in hub.families.items():
            if not IWebRoutes.providedBy(family):
                continue
            verifyObject(IWebRoutes, family)
            extension = family.web_routes(hub)
            verifyObject(IWebExtension, extension)
            self.extensions.append(extension)
            routes += collect(extension, api_prefix=f"{API_PREFIX}/{name}", page_prefix=f"/{name}", tag=name,
                              name_prefix=f"{name}_")
            if IRootRoutes.providedBy(extension):  # paths kept as earlier platforms had them
                verifyObject(IRootRoutes, extension)
                routes += collect(extension.root_routes, api_prefix="", page_prefix="", tag=name,
                                  name_prefix=f"{name}_root_")
            # Family pages go right after the dashboard, in the order the family lists them.
            nav[1:1] = list(extension.nav)
            if extension.templates is not None:
                templates.append(extension.templates)
        for extension in hub.extensions:  # core parts with routes of their own (alerts, webhooks)
            verifyObject(IWebExtension, extension)
            self.extensions.append(extension)
            routes += collect(extension, api_prefix=API_PREFIX, page_prefix="", tag=extension.tag,
                              name_prefix=f"{extension.tag}_")
            nav[len(nav) - len(CORE_NAV) + 1 : len(nav) - len(CORE_NAV) + 1] = list(extension.nav)
        self.routes = routes
        self.pages = Pages(self, templates, nav)
        self.api = Dispatcher(self, routes)
        self._openapi: dict[str, Any] | None = None
        self._routed = self.api.resource()
        self._static = StaticFiles(str(STATIC))
        self._swagger = swagger_assets()
        self._unsubscribe: list[Any] = []
        self._last_purge = float("-inf")

    # -- lifecycle (the web service calls these)

    def start(self) -> None:
        """Feed the dashboard and the stream from the bus; keep recent log lines; housekeeping."""
        if self._unsubscribe:
            return
        self._housekeeping = LoopingCall(lambda: defer.ensureDeferred(self._housekeep()))
        self._housekeeping.clock = self.clock
        self._housekeeping.start(self.refusals.interval, now=False).addErrback(
            lambda f: self.log.failure("web housekeeping stopped", f))
        self._unsubscribe.append(self._housekeeping.stop)
        self._unsubscribe.append(self.hub.bus.subscribe(self.stats))
        self.stream.start(self.hub.bus)
        self._unsubscribe.append(self.stream.stop)
        self._unsubscribe.append(self.hub.cluster.relay_events(self.hub.bus, self.stream.publish))
        globalLogPublisher.addObserver(self.logs)
        self._unsubscribe.append(lambda: globalLogPublisher.removeObserver(self.logs))
        self.logs.listeners.append(self.stream.log_line)
        self._unsubscribe.append(lambda: self.logs.listeners.remove(self.stream.log_line))

    def stop(self) -> None:
        for undo in reversed(self._unsubscribe):
            undo()
        self._unsubscribe.clear()

    async def drain(self) -> None:
        """On stop, the listener closed: let running calls finish, then write the refusals still held."""
        await self.api.settle()
        await self.refusals.flush()

    async def _housekeep(self) -> None:
        """Every minute: aggregated refusals to the audit log; hourly, entries past web.audit_retention."""
        await self.refusals.flush()
        try:
            await self.sessions.purge()
        except Exception:
            self.log.failure("could not purge expired sessions")
        now = self.clock.seconds()
        if now - self._last_purge >= 3600:
            self._last_purge = now
            try:
                removed = await audit.purge(self.hub.store, time.time() - self.hub.config.web.audit_retention)
            except Exception:
                self.log.failure("could not purge old audit entries")
            else:
                if removed:
                    self.log.info("removed {count} audit entries older than the retention", count=removed)

    def resource(self) -> IResource:
        return SecurityHeaders(self.app.resource(), https=self.secure, proxies=self.proxies,
                               cors_origins=self.hub.config.web.cors_origins)

    # -- rate limits

    async def throttle(self, route: Any, principal: Any, source: str) -> None:
        """429 when the caller is over its limit: per address on routes without login, per client on the API."""
        source = limit_key(source)
        if route.role is None and principal is None and self.anonymous_limiter is not None:
            wait = await self.anonymous_limiter.take(source)
            if wait is not None:
                self.throttled.labels("anonymous").inc()
                raise rate_limited(wait, "too many requests from this address")
        if self.api_limiter is not None and route.kind == "api":
            if principal is None:
                key: tuple[str, Any] = ("address", source)
            elif principal.key_id is not None:
                key = ("key", principal.key_id)
            else:
                key = ("user", principal.user_id)
            wait = await self.api_limiter.take(key)
            if wait is not None:
                self.throttled.labels("api").inc()
                raise rate_limited(wait, "too many requests")

    # -- shared helpers

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi.build([b.route for b in self.routes], version=self.hub.version,
                                          api_prefix=API_PREFIX)
        return self._openapi

    def same_origin(self, request: Any) -> bool:
        """For cookie-authenticated WebSockets: browsers send Origin, and it must be this host."""
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        if not origin or not host:
            return False
        return urlsplit(origin.decode("latin-1")).netloc.lower() == host.decode("latin-1").lower()

    async def dashboard(self) -> dict[str, Any]:
        all_up, health = self.hub.health.report()
        row = await self.hub.store.fetchone("SELECT COUNT(*) FROM users")
        counts: dict[str, Any] = {}
        for extension in self.extensions:
            if IDashboardSummary.providedBy(extension):
                try:
                    counts.update(await extension.summary())
                except Exception:
                    self.log.failure("dashboard summary of {extension!r} failed", extension=extension)
        counts["users"] = {"label": "Users", "value": int(row[0]) if row else 0, "href": "/users"}
        counts["stream"] = {"label": "Live clients", "value": len(self.stream.clients), "href": None}
        return {
            "health": health,
            "counts": counts,
            "rates": self.stats.rates(),
            "recent": self.stats.recent()[:20],
            "version": self.hub.version,
            "uptime": max(0.0, self.clock.seconds() - self.hub.started_at),
        }

    # -- the fixed routes

    async def may_see_details(self, request: Any) -> bool:
        """/health details and /metrics: open if web.public_health, else a login, API key or the metrics token."""
        web = self.hub.config.web
        if web.public_health:
            return True
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if web.metrics_token and scheme.lower() == "bearer" and token.strip():
            digest = "sha256:" + hashlib.sha256(token.strip().encode()).hexdigest()
            if hmac.compare_digest(digest, web.metrics_token):
                return True
        try:
            principal = await self.auth.authenticate(request)
        except ApiError:
            return False
        return principal is not None

    @staticmethod
    def _json(request: IRequest, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode()

    @app.route("/health/live", methods=["GET"])
    def health_live(self, request: IRequest) -> bytes:
        # The process serves: nothing else is checked, so a broker or database outage never restarts it.
        return self._json(request, 200, {"status": "live"})

    @app.route("/health/ready", methods=["GET"])
    def health_ready(self, request: IRequest) -> bytes:
        ready, doc = self.hub.health.report()
        out: dict[str, Any] = {"status": "ready" if ready else "not_ready"}
        if not ready:
            out["notReady"] = doc["notReady"]
        return self._json(request, 200 if ready else 503, out)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> Any:
        return defer.Deferred.fromCoroutine(self._health(request))

    async def _health(self, request: IRequest) -> bytes:
        ready, doc = self.hub.health.report()
        if not await self.may_see_details(request):
            doc = {"status": doc["status"]}
        doc["version"] = self.hub.version
        # 503 only when not ready: a broker outage is "degraded", and the outbox covers it.
        return self._json(request, 200 if ready else 503, doc)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Any:
        return defer.Deferred.fromCoroutine(self._metrics(request))

    async def _metrics(self, request: IRequest) -> bytes:
        if not await self.may_see_details(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="bsscihub"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics need a login, an API key or the metrics token (web.metrics_token)\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.hub.metrics)

    @app.route("/api/docs", methods=["GET"])
    def api_docs(self, request: IRequest) -> Any:
        """Swagger UI over /api/v1/openapi.json, served by the hub itself (no CDN, under the CSP)."""
        if self._swagger is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Swagger UI is not installed (swagger-ui-py); the API document is /api/v1/openapi.json\n"
        return self._static.getChild(b"api-docs.html", request)

    @app.route("/api/docs/", branch=True)
    def api_docs_assets(self, request: IRequest) -> IResource:
        return self._swagger if self._swagger is not None else notFound()

    @app.route("/static/", branch=True)
    def static(self, request: IRequest) -> IResource:
        return self._static

    @app.route("/favicon.ico", methods=["GET"])
    def favicon(self, request: IRequest) -> IResource:
        return self._static.getChild(b"favicon.svg", request)

    @app.route("/", branch=True)
    def routed(self, request: IRequest) -> IResource:
        # The API and the pages: the table built from the declared routes.
        return self._routed
