"""The web listener: the WebApp served on `web.listen` (HTTPS with the hub certificate if enabled).

An endpoint service, so the port is bound in startService and released in stopService.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request, Site

from bsscihub.health import ComponentHealth
from bsscihub.hub import Hub
from bsscihub.listening import ListenerService
from bsscihub.web.app import WebApp
from bsscihub.web.logring import ACCESS
from bsscihub.web.proxy import client_of

MAX_BODY = 8 << 20
"""No request body is read beyond this; routes set their own, lower limits (the API answers 413)."""


class _Discard:
    """Stands in for the body file once a request is over the limit: nothing more is kept."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BoundedRequest(Request):
    """A request that stops buffering its body past MAX_BODY (and says so, for the 413)."""

    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
            self.content = _Discard()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self.body_too_large = True
            self.content = _Discard()
            return
        super().handleContentChunk(data)


def access_log_line(timestamp: str, request: Any) -> str:
    """The combined log format without the query string: tickets and search terms stay out of logs.

    The address is the real client's (behind trusted proxies), as rate limits and the audit log see it."""
    return http.combinedLogFormatter(timestamp, _AsLogged(request))


class _AsLogged:
    """A request as its access line shows it: the path without the query, from the real client."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = request.uri.split(b"?", 1)[0]

    def getClientAddress(self) -> Any:
        client = client_of(self._request).address
        if client and client != _peer(self._request):
            return (IPv6Address if ":" in client else IPv4Address)("TCP", client, 0)
        return self._request.getClientAddress()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _peer(request: Any) -> str:
    try:
        return str(request.getClientAddress().host)
    except AttributeError:
        return "-"


class WebService(ListenerService):
    """Starts the app's bus subscriptions and log ring with the listener, and stops them with it.

    The stored sessions are loaded before the port is bound: the first request after a restart
    already finds its log-in."""

    log = Logger()

    def __init__(self, endpoint: Any, site: Site, web: WebApp) -> None:
        super().__init__(endpoint, site)
        self.web = web
        self._loading: defer.Deferred[None] | None = None

    def startService(self) -> None:
        self.web.start()
        self._loading = defer.Deferred.fromCoroutine(self._load_then_listen())

    async def _load_then_listen(self) -> None:
        try:
            loaded = await self.web.sessions.load()
        except Exception:
            self.log.failure("could not restore the stored admin sessions; users log in again")
        else:
            if loaded:
                self.log.info("{count} admin sessions restored", count=loaded)
        ListenerService.startService(self)

    def when_listening(self) -> defer.Deferred[Any]:
        loading = self._loading
        if loading is None or loading.called:
            return super().when_listening()
        d: defer.Deferred[Any] = defer.Deferred()

        def listening(_: Any) -> None:
            ListenerService.when_listening(self).chainDeferred(d)

        loading.addCallback(listening)
        return d

    when_ready = when_listening

    def stopService(self) -> Any:
        self.web.stop()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loading is not None and not self._loading.called:
            await self._loading
        await super().stopService()
        await self.web.drain()


# Module level: a Logger class attribute would take the class's name as its namespace.
_access_log = Logger(namespace=ACCESS)


class WebSite(Site):
    """Access lines go through twisted.logger under their own namespace (the log page can leave them out)."""

    def log(self, request: Any) -> None:
        _access_log.info("{line}", line=self._logFormatter(self._logDateTime, request))


def make_site(web: WebApp) -> Site:
    site = WebSite(web.resource(), logFormatter=access_log_line)
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    return site


def make_web_service(hub: Hub) -> WebService:
    config = hub.config
    endpoint = serverFromString(hub.reactor, config.web.listen)
    if config.web.https:
        from bsscihub.tls import MutualTLSEndpoint, server_context_factory

        context = server_context_factory(
            config.tls.ca, config.tls.cert, config.tls.key, require_client_cert=False
        )
        endpoint = MutualTLSEndpoint(endpoint, context)
    web = WebApp(hub)
    service = WebService(endpoint, make_site(web), web)
    # A port that cannot be bound fails the hub's start (HubService waits for when_ready).
    service.setName("web")
    hub.health.register("web", lambda: ComponentHealth(bool(service.running), {"listen": config.web.listen}))
    return service
