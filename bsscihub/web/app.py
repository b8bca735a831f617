"""The Klein application object: routes are methods, state lives on the instance.

/health and /metrics need no authentication; /api/v1 and the admin pages come from the declared route table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, globalLogPublisher
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import File

from bsscihub.hub import Hub
from bsscihub.web import openapi
from bsscihub.web.api import CORE_GROUPS, AuthApi
from bsscihub.web.auth import Authenticator, LoginLimiter
from bsscihub.web.dispatch import Dispatcher
from bsscihub.web.events import EventStats
from bsscihub.web.logring import LogRing
from bsscihub.web.pages import CORE_NAV, CorePages, Pages
from bsscihub.web.routing import BoundRoute, collect
from bsscihub.web.sessions import SessionStore
from bsscihub.web.stream import StreamHub

API_PREFIX = "/api/v1"
STATIC = Path(__file__).parent / "static"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeaders(Resource):
    """Wraps the whole site: every response, errors and static files included, gets the same headers."""

    isLeaf = True

    def __init__(self, wrapped: IResource, *, https: bool) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.headers = [
            (b"content-security-policy", CSP.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    def render(self, request: Any) -> Any:
        for name, value in self.headers:
            request.setHeader(name, value)
        request.setHeader(b"server", b"bsscihub")
        return self.wrapped.render(request)


class StaticFiles(File):
    """The UI's own assets: no directory listings, explicit types (nosniff makes browsers strict)."""

    contentTypes = {**File.contentTypes, ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2"}

    def directoryListing(self) -> Any:
        return self.forbidden

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"cache-control", b"public, max-age=3600")
        return super().render_GET(request)


class WebApp:
    app = Klein()
    log = Logger()

    def __init__(self, hub: Hub, *, clock: IReactorTime | None = None, https: bool | None = None) -> None:
        self.hub = hub
        self.clock: IReactorTime = clock if clock is not None else hub.reactor
        self.secure = hub.config.web.https if https is None else https
        web = hub.config.web
        self.sessions = SessionStore(self.clock, web.session_idle, web.session_max)
        self.limiter = LoginLimiter(self.clock)
        self.auth = Authenticator(hub.store, self.sessions, self.clock, secure=self.secure)
        self.stats = EventStats(self.clock)
        self.logs = LogRing()
        self.stream = StreamHub(self.clock, hub.metrics)
        self.login_failures = Counter(
            "bsscihub_web_login_failures", "Refused log-ins by reason", ["reason"], registry=hub.metrics
        )
        self.auth_api = AuthApi(self)
        self.extensions: list[Any] = []
        nav = list(CORE_NAV)
        templates: dict[str, str] = {}
        routes: list[BoundRoute] = []
        for group in (self.auth_api, *(cls(self) for cls in CORE_GROUPS if cls is not AuthApi), CorePages(self)):
            routes += collect(group, api_prefix=API_PREFIX, page_prefix="", tag="")
        for name, family in hub.families.items():
            web_routes = getattr(family, "web_routes", None)
            if web_routes is None:
                continue
            extension = web_routes(hub)
            self.extensions.append(extension)
            routes += collect(extension, api_prefix=f"{API_PREFIX}/{name}", page_prefix=f"/{name}", tag=name,
                              name_prefix=f"{name}_")
            # Family pages go right after the dashboard, in the order the family lists them.
            nav[1:1] = list(getattr(extension, "nav", ()))
            templates.update(getattr(extension, "templates", {}))
        self.routes = routes
        self.pages = Pages(self, templates, nav)
        self.api = Dispatcher(self, routes)
        self._openapi: dict[str, Any] | None = None
        self._routed = self.api.resource()
        self._static = StaticFiles(str(STATIC))
        self._unsubscribe: list[Any] = []

    # -- lifecycle (the web service calls these)

    def start(self) -> None:
        """Feed the dashboard and the stream from the bus; keep recent log lines."""
        if self._unsubscribe:
            return
        self._unsubscribe.append(self.hub.bus.subscribe(self.stats))
        self.stream.start(self.hub.bus)
        self._unsubscribe.append(self.stream.stop)
        globalLogPublisher.addObserver(self.logs)
        self._unsubscribe.append(lambda: globalLogPublisher.removeObserver(self.logs))

    def stop(self) -> None:
        for undo in reversed(self._unsubscribe):
            undo()
        self._unsubscribe.clear()

    def resource(self) -> IResource:
        return SecurityHeaders(self.app.resource(), https=self.secure)

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
            summary = getattr(extension, "summary", None)
            if summary is not None:
                try:
                    counts.update(await summary())
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

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        all_up, doc = self.hub.health.report()
        doc["version"] = self.hub.version
        request.setResponseCode(200 if all_up else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode()

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.hub.metrics)

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
