"""The web listener: the WebApp served on `web.listen` (HTTPS with the hub certificate if enabled).

An endpoint service, so the port is bound in startService and released in stopService.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from bsscihub.health import ComponentHealth
from bsscihub.hub import Hub
from bsscihub.web.app import WebApp


def make_web_service(hub: Hub) -> StreamServerEndpointService:
    config = hub.config
    endpoint = serverFromString(hub.reactor, config.web.listen)
    if config.web.https:
        from bsscihub.tls import MutualTLSEndpoint, server_context_factory

        context = server_context_factory(
            config.tls.ca, config.tls.cert, config.tls.key, require_client_cert=False
        )
        endpoint = MutualTLSEndpoint(endpoint, context)
    site = Site(WebApp(hub).resource())
    site.displayTracebacks = False
    service = StreamServerEndpointService(endpoint, site)
    service.setName("web")
    # A port that cannot be bound fails the hub's start instead of only logging.
    service._raiseSynchronously = True
    hub.health.register("web", lambda: ComponentHealth(bool(service.running), {"listen": config.web.listen}))
    return service
