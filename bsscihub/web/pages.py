"""The admin pages: jinja2 (autoescaped) templates served by the hub, forms that call the API handlers.

A page form runs the same handler, validation and audit as the REST call; only the rendering differs.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup
from twisted.web.resource import IResource

from bsscihub import users
from bsscihub.web import csrf
from bsscihub.web.dispatch import send_download
from bsscihub.web.errors import ApiError
from bsscihub.web.routing import (
    ANONYMOUS,
    Call,
    Download,
    NavItem,
    Page,
    Param,
    Redirect,
    page_route,
)

if TYPE_CHECKING:
    from bsscihub.web.app import WebApp
    from bsscihub.web.auth import Principal

TEMPLATES = Path(__file__).parent / "templates"

CORE_NAV = [
    NavItem("Dashboard", "/", "viewer", "dashboard"),
    NavItem("Certificates", "/certificates", "operator", "cert"),
    NavItem("Users & keys", "/users", "admin", "users"),
    NavItem("Audit log", "/audit", "admin", "audit"),
    NavItem("Logs", "/logs", "admin", "logs"),
    NavItem("Configuration", "/config", "operator", "config"),
]


_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$")


def fmt_time(value: Any) -> str:
    """Seconds since 1970, an RFC 3339 text or a datetime, as one consistent UTC form."""
    if value in (None, ""):
        return "—"
    try:
        if isinstance(value, datetime.datetime):
            moment = value
        elif isinstance(value, str) and _ISO_TIME.match(value):
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
    except (TypeError, ValueError, OverflowError):
        return str(value)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_value(value: Any) -> str:
    """A device field for people: times in one form, short decimals, a dash for nothing."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, str) and _ISO_TIME.match(value):
        return fmt_time(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def fmt_ago(value: Any, now: float) -> str:
    if value in (None, ""):
        return "never"
    if isinstance(value, str) and _ISO_TIME.match(value):  # the API's RFC 3339 times
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    seconds = now - float(value)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(seconds) >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def safe_next(target: str | None) -> str:
    """Only local paths: a crafted ?next= must not send a fresh session to another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def pager(total: int, limit: int, offset: int, query: Mapping[str, Any]) -> dict[str, Any]:
    def link(new_offset: int) -> str:
        kept = {k: v for k, v in query.items() if v not in (None, "") and k not in ("offset", "_csrf")}
        return "?" + urlencode({**kept, "offset": new_offset, "limit": limit})

    return {
        "total": total,
        "first": offset + 1 if total else 0,
        "last": min(offset + limit, total),
        "prev": link(max(0, offset - limit)) if offset > 0 else None,
        "next": link(offset + limit) if offset + limit < total else None,
    }


class Pages:
    """Renders page results: templates with the shared layout, redirects with flash messages, downloads."""

    def __init__(self, web: WebApp, family_templates: Sequence[Any], nav: list[NavItem]) -> None:
        self.web = web
        self.nav = nav
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(
                # The core's first: a family adds pages under its own name, never replaces the layout.
                [jinja2.FileSystemLoader(str(TEMPLATES)), *(jinja2.FileSystemLoader(str(d)) for d in family_templates)]
            ),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["time"] = fmt_time
        self.env.filters["show"] = fmt_value
        self.env.filters["ago"] = lambda v: fmt_ago(v, self.web.clock.seconds())
        self.env.filters["json_attr"] = lambda v: Markup(json.dumps(v, separators=(",", ":")).replace("&", "\\u0026")
                                                         .replace("'", "\\u0027").replace("<", "\\u003c")
                                                         .replace(">", "\\u003e"))
        self.env.globals["version"] = web.hub.version
        self.env.globals["pager"] = pager
        self.env.globals["roles"] = users.ROLES

    def render(self, request: Any, principal: Principal | None, result: Any) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        if IResource.providedBy(result):
            return result  # renders itself (a download streamed from the database)
        session = principal.session if principal is not None else None
        if isinstance(result, Redirect):
            if session is not None:
                if result.flash:
                    session.flash("ok", result.flash)
                if result.error:
                    session.flash("error", result.error)
            request.setResponseCode(303)
            request.setHeader(b"location", result.location.encode())
            return b""
        if isinstance(result, Download):
            return send_download(request, result)
        assert isinstance(result, Page), result
        context = {
            "user": principal,
            "csrf_token": session.csrf if session is not None else "",
            "nav": [n for n in self.nav if principal is not None and users.role_at_least(principal.role, n.role)],
            "flashes": session.take_flashes() if session is not None else [],
            "path": request.path.decode("utf-8", "replace"),
            **result.context,
        }
        request.setResponseCode(result.status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.env.get_template(result.template).render(context).encode()


def form_bool(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "on", "yes")


def form_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def api_message(error: Exception) -> str:
    if isinstance(error, ApiError):
        return error.message
    return str(error)


class CorePages:
    """Login, dashboard, account, users and keys, audit log, logs, configuration, certificates."""

    def __init__(self, web: WebApp) -> None:
        self.web = web

    async def _invoke(self, call: Call, name: str, **kwargs: Any) -> Any:
        return await call.invoke(name, **kwargs)

    # -- login and logout

    @page_route("GET", "/login", role=ANONYMOUS, summary="Log-in form")
    def login_form(self, call: Call) -> Any:
        token = csrf.issue_login_token(call.request, self.web.auth.is_secure(call.request))
        return Page("login.html", {"login_token": token, "next": safe_next(call.query.get("next")), "error": None,
                                   "username": ""})

    @page_route("POST", "/login", role=ANONYMOUS, summary="Log in")
    async def login(self, call: Call) -> Any:
        form = call.body
        username, password = str(form.get("username", ""))[:64], str(form.get("password", ""))
        try:
            csrf.check_login_token(call.request)
            user = await self.web.auth_api.check_login(username, password, call.source)
        except ApiError as e:
            token = csrf.issue_login_token(call.request, self.web.auth.is_secure(call.request))
            return Page("login.html", {"login_token": token, "next": safe_next(form.get("next")),
                                       "error": e.message, "username": username}, status=e.status)
        await self.web.auth_api.start_session(call.request, user, call.source)
        call.audit_action, call.target, call.acting_as = "auth.login", user.name, user.name
        call.detail = {"via": "page"}
        return Redirect(safe_next(form.get("next")))

    @page_route("POST", "/logout", role="viewer", summary="Log out")
    async def logout(self, call: Call) -> Any:
        await self.web.sessions.drop(self.web.auth.session_cookie(call.request))
        self.web.auth.clear_session_cookie(call.request)
        call.audit_action, call.target, call.detail = "auth.logout", call.actor, {"via": "page"}
        return Redirect("/login")

    # -- dashboard

    @page_route("GET", "/", role="viewer", summary="Dashboard")
    async def dashboard(self, call: Call) -> Any:
        return Page("dashboard.html", {"data": await self.web.dashboard(), "title": "Dashboard"})

    # -- own account

    @page_route("GET", "/account", role="viewer", summary="Own password and API keys")
    async def account(self, call: Call) -> Any:
        keys = await self._invoke(call, "list_keys", query={"limit": "200"}) if call.principal.role != "admin" else \
            await self._invoke(call, "list_keys", query={"limit": "200", "user": call.actor})
        return Page("account.html", {"keys": keys, "title": "Account"})

    @page_route("POST", "/account/password", role="viewer", summary="Change own password")
    async def account_password(self, call: Call) -> Any:
        if call.body.get("new") != call.body.get("confirm"):
            return Redirect("/account", error="the new passwords differ")
        try:
            await self._invoke(call, "change_password", body={"current": call.body.get("current", ""),
                                                               "new": call.body.get("new", "")})
        except ApiError as e:
            return Redirect("/account", error=api_message(e))
        return Redirect("/account", flash="password changed")

    @page_route("POST", "/account/keys", role="viewer", summary="Create an API key")
    async def create_key(self, call: Call) -> Any:
        return await self._create_key(call, "/account")

    async def _create_key(self, call: Call, back: str) -> Any:
        form = call.body
        body: dict[str, Any] = {"name": form.get("name", "").strip()}
        if form.get("role"):
            body["role"] = form["role"]
        if form.get("user"):
            body["user"] = form["user"]
        days = form_int(form.get("expiresInDays"))
        if days is not None:
            body["expiresInDays"] = days
        try:
            created = await self._invoke(call, "create_key", body=body)
        except ApiError as e:
            return Redirect(back, error=api_message(e))
        assert call.principal.session is not None
        call.principal.session.flash("secret", created.value["secret"])
        return Redirect(back, flash=f"API key {created.value['key']['name']} created — copy it now, it is shown once")

    @page_route("POST", "/account/keys/{id}/revoke", role="viewer", summary="Revoke an API key",
                params=(Param("id", {"type": "integer", "minimum": 1, "maximum": 2**53}, example=999999),))
    async def revoke_key(self, call: Call) -> Any:
        back = "/users" if call.body.get("back") == "users" and call.principal.role == "admin" else "/account"
        try:
            await self._invoke(call, "revoke_key", params={"id": call.params["id"]})
        except ApiError as e:
            return Redirect(back, error=api_message(e))
        return Redirect(back, flash="API key revoked")

    # -- users (admin)

    @page_route("GET", "/users", role="admin", summary="Users and API keys")
    async def users(self, call: Call) -> Any:
        found = await self._invoke(call, "list_users", query={"limit": "500", "q": call.query.get("q", "")})
        keys = await self._invoke(call, "list_keys", query={"limit": "500"})
        return Page("users.html", {"users": found, "keys": keys, "q": call.query.get("q", ""), "title": "Users & keys"})

    @page_route("POST", "/users", role="admin", summary="Create a user")
    async def create_user(self, call: Call) -> Any:
        form = call.body
        body = {"name": form.get("name", "").strip(), "role": form.get("role", "")}
        if form.get("password"):
            body["password"] = form["password"]
        try:
            created = await self._invoke(call, "create_user", body=body)
        except ApiError as e:
            return Redirect("/users", error=api_message(e))
        if "password" in created.value:
            assert call.principal.session is not None
            call.principal.session.flash("secret", created.value["password"])
            return Redirect("/users", flash=f"user {body['name']} created — their password is shown once below")
        return Redirect("/users", flash=f"user {body['name']} created")

    @page_route("POST", "/users/{name}", role="admin", summary="Change a user",
                params=(Param("name", {"type": "string", "maxLength": 64}, example="alice"),))
    async def update_user(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {}
        if form.get("role"):
            body["role"] = form["role"]
        if "disabled" in form:
            body["disabled"] = form_bool(form["disabled"])
        if form.get("password"):
            body["password"] = form["password"]
        try:
            await self._invoke(call, "update_user", params={"name": call.params["name"]}, body=body)
        except ApiError as e:
            return Redirect("/users", error=api_message(e))
        return Redirect("/users", flash=f"user {call.params['name']} updated")

    @page_route("POST", "/users/{name}/delete", role="admin", summary="Delete a user",
                params=(Param("name", {"type": "string", "maxLength": 64}, example="alice"),))
    async def delete_user(self, call: Call) -> Any:
        try:
            await self._invoke(call, "delete_user", params={"name": call.params["name"]})
        except ApiError as e:
            return Redirect("/users", error=api_message(e))
        return Redirect("/users", flash=f"user {call.params['name']} deleted")

    @page_route("POST", "/users/keys", role="admin", summary="Create an API key for a user")
    async def create_user_key(self, call: Call) -> Any:
        return await self._create_key(call, "/users")

    # -- audit, logs, configuration

    @page_route("GET", "/audit", role="admin", summary="Audit log")
    async def audit(self, call: Call) -> Any:
        filters = {k: call.query.get(k, "") for k in ("actor", "action", "target", "since", "until")}
        query = {**filters, "limit": call.query.get("limit", "50"), "offset": call.query.get("offset", "0")}
        error = None
        try:
            entries = await self._invoke(call, "audit_log", query=query)
        except ApiError as e:
            entries, error = {"items": [], "total": 0, "limit": 50, "offset": 0}, api_message(e)
        return Page("audit.html", {"entries": entries, "filters": filters, "error": error, "title": "Audit log"})

    @page_route("GET", "/logs", role="admin", summary="Recent log lines")
    async def logs(self, call: Call) -> Any:
        level = call.query.get("level", "info")
        level = level if level in ("info", "warn", "error") else "info"
        access = call.query.get("access") == "true"
        lines = await self._invoke(call, "logs", query={"level": level, "limit": "500", "access": str(access).lower()})
        return Page("logs.html", {"lines": lines["items"], "level": level, "access": access, "title": "Logs"})

    @page_route("GET", "/config", role="operator", summary="Configuration")
    async def config(self, call: Call) -> Any:
        return Page("config.html", {"config": await self._invoke(call, "config"), "title": "Configuration"})

    # -- certificates

    @page_route("GET", "/certificates", role="operator", summary="Certificates")
    async def certificates(self, call: Call) -> Any:
        try:
            ca: Any = await self._invoke(call, "ca")
        except ApiError as e:
            ca = {"error": api_message(e)}
        issued = await self._invoke(call, "list_certs", query={"limit": "200", "q": call.query.get("q", "")})
        revoked = await self._invoke(call, "revoked", query={"limit": "200"})
        bindings = (await self._invoke(call, "bindings"))["items"]
        return Page("certificates.html", {"ca": ca, "issued": issued, "revoked": revoked, "q": call.query.get("q", ""),
                                          "bindings": bindings, "title": "Certificates"})

    @page_route("POST", "/certificates", role="admin", summary="Issue a client certificate")
    async def issue_certificate(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {"name": form.get("name", "").strip(), "format": form.get("format") or "zip"}
        for field in ("kind", "subject"):  # what a family declares it may be bound to (none: nothing)
            if str(form.get(field, "")).strip():
                body[field] = str(form[field]).strip()
        days = form_int(form.get("days"))
        if days is not None:
            body["days"] = days
        try:
            return await self._invoke(call, "issue", body=body)
        except ApiError as e:
            return Redirect("/certificates", error=api_message(e))

    @page_route("POST", "/certificates/revoke", role="admin", summary="Revoke a certificate")
    async def revoke_certificate(self, call: Call) -> Any:
        serial = str(call.body.get("serial", "")).strip()
        try:
            await self._invoke(call, "revoke", params={"serial": serial or "-"},
                               body={"reason": str(call.body.get("reason", ""))[:200]})
        except ApiError as e:
            return Redirect("/certificates", error=api_message(e))
        return Redirect("/certificates", flash=f"certificate {serial} revoked")
