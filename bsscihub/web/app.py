"""The Klein application object: routes are methods, state lives on the instance.

/health and /metrics need no authentication; everything else is added by the web layer.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.iweb import IRequest

from bsscihub.hub import Hub


class WebApp:
    app = Klein()

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def resource(self) -> Any:
        return self.app.resource()

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
