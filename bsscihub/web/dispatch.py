"""The one path every API call and page takes: authenticate, authorize by role, CSRF, parse, run, audit, render.

Authorization lives only here, driven by each route's declared role, so no handler can forget it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from klein import Klein
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from bsscihub import audit
from bsscihub.users import role_at_least
from bsscihub.web import csrf
from bsscihub.web.auth import Principal
from bsscihub.web.errors import ApiError, ErrorResponse, bad_field, forbidden, map_exception, unauthorized
from bsscihub.web.proxy import client_of
from bsscihub.web.routing import (
    Accepted,
    BoundRoute,
    Call,
    Created,
    Download,
    NoContent,
    Page,
    Redirect,
    Route,
    Text,
)
from bsscihub.web.schema import FieldError, parse_parameter, validate

if TYPE_CHECKING:
    from bsscihub.web.app import WebApp

JSON_TYPE = "application/json"


def client_address(request: Any) -> str:
    """The real client's address: the peer, or what a trusted reverse proxy says it forwarded for."""
    return client_of(request).address


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=_default).encode()


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON-ready: {type(value).__name__}")


def _first_args(request: Any) -> dict[str, Any]:
    """Query (and form) arguments by name, the first value of each, as text (file uploads stay bytes)."""
    out: dict[str, Any] = {}
    for key, values in (request.args or {}).items():
        if not values:
            continue
        name = key.decode("utf-8", "replace")
        value = values[0]
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[name] = value
    return out


def _watch(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """Fires when `d` does, without touching its result (others still read it)."""
    seen: defer.Deferred[None] = defer.Deferred()

    def done(result: Any) -> Any:
        if not seen.called:
            seen.callback(None)
        return result

    d.addBoth(done)
    return seen


def attachment(filename: str) -> bytes:
    """The content-disposition of a download, its name cut down to characters no browser or shell misreads."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:100] or "download"
    return f'attachment; filename="{safe}"'.encode()


def send_download(request: Any, download: Download) -> bytes:
    """Answer with `download` as a file (API routes and pages alike)."""
    request.setResponseCode(download.status)
    request.setHeader(b"content-type", download.content_type.encode())
    request.setHeader(b"content-disposition", attachment(download.filename))
    return download.data



def _not_json(name: str) -> Any:
    """Python's parser takes NaN and ±Infinity; RFC 8259 does not, and nothing may store them: 400."""
    raise ValueError(f"{name} is not a JSON number")

class Dispatcher:
    """Registers the route table on a Klein router and runs every call through the same checks."""

    log = Logger()

    def __init__(self, web: WebApp, routes: list[BoundRoute]) -> None:
        self.web = web
        self.routes = routes
        self.by_name = {b.route.name: b for b in routes if b.route.kind == "api"}
        self.router = Klein()
        self.in_flight: set[defer.Deferred[Any]] = set()
        """Calls still running (a client that hung up does not stop its call)."""
        seen: set[tuple[str, str]] = set()
        for bound in routes:
            key = (bound.route.method, bound.route.path)
            if key in seen:
                raise ValueError(f"route declared twice: {key}")
            seen.add(key)
            self._register(bound)
        self.router.handle_errors(NotFound, MethodNotAllowed)(self._unrouted)
        self._latency = Histogram(
            "bsscihub_web_request_seconds",
            "Time to answer an API call or page, by route",
            ["route"],
            registry=web.hub.metrics,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self._responses = Counter(
            "bsscihub_web_responses", "API and page responses by route and status", ["route", "status"],
            registry=web.hub.metrics,
        )

    def _register(self, bound: BoundRoute) -> None:
        route = bound.route
        run = self._api if route.kind == "api" else self._page

        def endpoint(request: IRequest, **kwargs: Any) -> Any:
            # Klein cancels a route whose client hung up; a change half made and not audited is
            # worse than an answer nobody reads, so the route runs to its end either way.
            shielded: defer.Deferred[Any] = defer.Deferred()  # no canceller: a cancel only detaches
            running = defer.Deferred.fromCoroutine(run(bound, request, kwargs))
            # Remembered until done: on stop the hub waits for them before storage closes.
            self.in_flight.add(running)
            def finished(result: Any) -> Any:
                self.in_flight.discard(running)
                return result

            running.addBoth(finished)
            running.chainDeferred(shielded)
            return shielded

        endpoint.__name__ = f"{route.kind}_{route.name}_{route.method}"
        self.router.route(route.werkzeug_path(), methods=[route.method], endpoint=endpoint.__name__)(endpoint)

    def resource(self) -> IResource:
        return self.router.resource()

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait (at most `timeout` seconds) for the calls still running: they may still write to storage."""
        if not self.in_flight:
            return
        done: defer.Deferred[Any] = defer.DeferredList([_watch(d) for d in self.in_flight], consumeErrors=True)
        reactor: Any = self.web.hub.reactor
        timer = reactor.callLater(timeout, done.cancel)
        try:
            await done
        except defer.CancelledError:
            self.log.warn("stopping with {count} web calls still running", count=len(self.in_flight))
        finally:
            if timer.active():
                timer.cancel()

    # -- parsing, shared by HTTP calls and by pages invoking API handlers

    @staticmethod
    def authorize(route: Route, principal: Principal | None) -> None:
        if route.role is None:
            return
        if principal is None:
            raise unauthorized()
        if not role_at_least(principal.role, route.role):
            raise forbidden(f"this needs the {route.role} role; you are {principal.role}")

    @staticmethod
    def parse_params(route: Route, raw: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for param in route.params:
            try:
                out[param.name] = parse_parameter(str(raw[param.name]), param.schema, param.name)
            except FieldError as e:
                raise bad_field(e.field, e.message) from None
        return out

    @staticmethod
    def parse_query(route: Route, raw: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for param in route.query:
            value = raw.get(param.name)
            if value is None or value == "":
                if param.required:
                    raise bad_field(param.name, "missing")
                if "default" in param.schema:
                    out[param.name] = param.schema["default"]
                continue
            if isinstance(value, bytes):
                raise bad_field(param.name, "expected UTF-8 text")
            try:
                out[param.name] = parse_parameter(value, param.schema, param.name)
            except FieldError as e:
                raise bad_field(e.field, e.message) from None
        return out

    @staticmethod
    def check_body(route: Route, body: Any) -> Any:
        if route.body is None:
            return None
        if body is None:
            if route.body_required:
                raise ApiError(400, "missing_body", "this request needs a JSON body")
            return None
        try:
            return validate(body, route.body)
        except FieldError as e:
            if not e.field:
                raise ApiError(400, "invalid_body", f"request body: {e.message}") from None
            raise bad_field(e.field, e.message) from None

    @staticmethod
    def read_body(route: Route, request: Any) -> Any:
        """The JSON body, with 413 (too large), 415 (not JSON) and 400 (not parseable) as precise refusals."""
        content = request.content
        size = 0
        if content is not None:
            content.seek(0, 2)
            size = content.tell()
            content.seek(0)
        if getattr(request, "body_too_large", False) or size > route.max_body:
            raise ApiError(413, "body_too_large", f"request body over {route.max_body} bytes")
        if route.body is None:
            return None
        if size == 0:
            return None
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != JSON_TYPE and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise ApiError(415, "unsupported_media_type", f"expected Content-Type {JSON_TYPE}, got {ctype or 'none'}")
        raw = content.read()
        try:
            return json.loads(raw, parse_constant=_not_json)
        except UnicodeDecodeError:
            raise ApiError(400, "bad_json", "request body is not UTF-8") from None
        except ValueError as e:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {e}") from None

    async def _run(self, bound: BoundRoute, call: Call) -> Any:
        call.audit_action = bound.route.audit
        result = await defer.maybeDeferred(bound.handler, call)  # handlers may be sync or async
        if call.audit_action:
            target = call.target or str(call.params.get(bound.route.audit_target or "", ""))
            await audit.record(self.web.hub.store, call.actor, call.audit_action, target, call.detail, call.source)
        return result

    async def invoke(
        self,
        name: str,
        principal: Principal | None,
        *,
        source: str,
        params: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        request: Any = None,
    ) -> Any:
        """Run an API handler on behalf of a page (same role check, validation and audit as over HTTP)."""
        bound = self.by_name[name]
        self.authorize(bound.route, principal)
        call = Call(
            principal,
            params=self.parse_params(bound.route, {k: str(v) for k, v in (params or {}).items()}),
            query=self.parse_query(bound.route, query or {}),
            body=self.check_body(bound.route, body),
            source=source,
            request=request,
        )
        return await self._run(bound, call)

    # -- API calls over HTTP

    async def _api(self, bound: BoundRoute, request: Any, kwargs: dict[str, Any]) -> Any:
        route = bound.route
        started = time.perf_counter()
        principal: Principal | None = None
        handler_ran = False
        source = client_address(request)
        try:
            try:
                principal = await self.web.auth.authenticate(request, allow_ticket=route.ticket_auth)
            except ApiError:
                await self.web.throttle(route, None, source)  # bad credentials count against the address
                raise
            await self.web.throttle(route, principal, source)
            self.authorize(route, principal)
            # CSRF guards what is done with the session's authority; anonymous routes use none.
            if route.changes_state and route.role is not None and principal is not None and principal.via == "session":
                assert principal.session is not None
                csrf.check(request, principal.session.csrf)
            call = Call(
                principal,
                params=self.parse_params(route, kwargs),
                query=self.parse_query(route, _first_args(request)),
                body=self.check_body(route, self.read_body(route, request)),
                source=source,
                request=request,
            )
            handler_ran = True
            result = self.render_api(request, route, await self._run(bound, call))
        except Exception as e:
            error = map_exception(e)
            if route.changes_state and not handler_ran:
                # Refused before the handler (auth, role, CSRF, schema): the handler cannot audit it.
                await self._audit_refusal(route, principal, request, error)
            result = self.render_error(request, error)
        self._observe(route, request, started)
        return result

    async def _audit_refusal(self, route: Route, principal: Principal | None, request: Any, error: Any) -> None:
        actor = principal.name if principal is not None else "anonymous"
        detail = {"status": error.status, "code": error.code, "message": error.message}
        try:
            action = f"{route.audit or route.name}.refused"
            target = request.path.decode(errors="replace")
            # Aggregated: a client hammering a route cannot fill the audit log.
            await self.web.refusals.record(actor, action, target, detail, client_address(request))
        except Exception:
            self.log.failure("could not audit a refused request to {route}", route=route.name)

    def _observe(self, route: Route, request: Any, started: float) -> None:
        self._latency.labels(route.name).observe(time.perf_counter() - started)
        self._responses.labels(route.name, str(request.code)).inc()

    @staticmethod
    def render_error(request: Any, error: ErrorResponse) -> bytes:
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"content-type", JSON_TYPE.encode())
        request.setHeader(b"cache-control", b"no-store")
        return dumps(error.body())

    @staticmethod
    def render_api(request: Any, route: Route, result: Any) -> Any:
        if IResource.providedBy(result):
            return result
        # API answers are per caller and may carry secrets (tokens, keys shown once): never cached.
        request.setHeader(b"cache-control", b"no-store")
        status = route.status
        if isinstance(result, NoContent):
            request.setResponseCode(204)
            return b""
        if isinstance(result, Download):
            return send_download(request, result)
        if isinstance(result, Text):
            request.setResponseCode(status)
            request.setHeader(b"content-type", result.content_type.encode())
            return result.text if isinstance(result.text, bytes) else result.text.encode()
        if isinstance(result, Created):
            status = 201
            if result.location:
                request.setHeader(b"location", result.location.encode())
            result = result.value
        elif isinstance(result, Accepted):
            status, result = 202, result.value
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_TYPE.encode())
        return dumps(result)

    # -- pages

    async def _page(self, bound: BoundRoute, request: Any, kwargs: dict[str, Any]) -> Any:
        route = bound.route
        pages = self.web.pages
        started = time.perf_counter()
        principal = self.web.auth.session_principal(request)
        try:
            await self.web.throttle(route, principal, client_address(request))
            if route.role is not None and principal is None:
                target = request.uri.decode("utf-8", "replace") if route.method == "GET" else "/"
                result: Any = Redirect("/login?next=" + quote(target, safe="/?=&"))
            else:
                self.authorize(route, principal)
                if route.changes_state and principal is not None:
                    assert principal.session is not None
                    csrf.check(request, principal.session.csrf)
                form = _first_args(request)
                call = Call(
                    principal,
                    params=self.parse_params(route, kwargs),
                    query=form,
                    body=form if route.changes_state else None,
                    source=client_address(request),
                    request=request,
                    dispatcher=self,
                    scope=bound.scope,
                )
                result = await self._run(bound, call)
        except Exception as e:
            error = map_exception(e)
            for name, value in error.headers.items():
                request.setHeader(name.encode(), value.encode())
            result = Page("error.html", {"status": error.status, "message": error.message}, status=error.status)
        rendered = pages.render(request, principal, result)
        self._observe(route, request, started)
        return rendered

    # -- no route matched

    def _unrouted(self, request: Any, failure: Any) -> Any:
        path = request.path.decode("utf-8", "replace")
        method_not_allowed = failure.check(MethodNotAllowed) is not None
        if path.startswith("/api/"):
            if method_not_allowed:
                allowed = getattr(failure.value, "valid_methods", None) or []
                error = ErrorResponse(
                    405, "method_not_allowed", f"{request.method.decode()} is not allowed here",
                    headers={"Allow": ", ".join(allowed)},
                )
            else:
                error = ErrorResponse(404, "not_found", f"no such API path {path}")
            return self.render_error(request, error)
        status = 405 if method_not_allowed else 404
        message = "method not allowed" if method_not_allowed else "no such page"
        principal = self.web.auth.session_principal(request)
        page = Page("error.html", {"status": status, "message": message}, status)
        return self.web.pages.render(request, principal, page)
