"""The core REST API under /api/v1: auth, users, API keys, audit log, certificates, hub state, live stream.

Each handler declares its method, path, role and schemas next to it; families add their own groups.
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import task

from bsscihub import audit, users
from bsscihub.contract import rfc3339
from bsscihub.family import ICertificateRevocation
from bsscihub.web import auth, certs
from bsscihub.web.errors import ApiError, bad_field, forbidden, not_found, rate_limited
from bsscihub.web.proxy import limit_key
from bsscihub.web.routing import (
    ANONYMOUS,
    NO_CONTENT,
    PAGING,
    Call,
    Created,
    Download,
    Param,
    Text,
    api_route,
    page,
)
from bsscihub.web.schema import ANY_OBJECT, OPT_TIME, TIME, obj, page_of, string
from bsscihub.web.stream import upgrade

if TYPE_CHECKING:
    from bsscihub.web.app import WebApp

DAY = 86400.0

# -- schemas shared by several routes

USER_NAME = string("user name", minLength=1, maxLength=64, pattern=r"^[A-Za-z0-9._@-]+$",
                   **{"x-expected": "1-64 letters, digits, '.', '_', '-', '@'"})
PASSWORD = string("password", minLength=users.MIN_PASSWORD, maxLength=users.MAX_PASSWORD)
ROLE = string("role", enum=list(users.ROLES))
USER = obj(
    {"name": USER_NAME, "role": ROLE, "createdAt": TIME, "disabled": {"type": "boolean"}},
    ("name", "role", "createdAt", "disabled"),
    closed=False,
)
CREDENTIALS = obj({"username": string("user name", minLength=1, maxLength=64), "password": string(
    "password", minLength=1, maxLength=users.MAX_PASSWORD)}, ("username", "password"))
API_KEY = obj(
    {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "user": {"type": "string"},
        "prefix": {"type": "string", "description": "public part of the key, safe to show"},
        "role": ROLE,
        "kind": {"type": "string", "enum": ["key", "token"]},
        "createdAt": TIME,
        "expiresAt": OPT_TIME,
        "revokedAt": OPT_TIME,
        "lastUsedAt": OPT_TIME,
        "state": {"type": "string", "enum": ["active", "expired", "revoked"]},
    },
    ("id", "name", "user", "prefix", "role", "state"),
    closed=False,
)
AUDIT_ENTRY = obj(
    {
        "id": {"type": "integer"},
        "time": TIME,
        "actor": {"type": "string"},
        "action": {"type": "string"},
        "target": {"type": "string"},
        "detail": ANY_OBJECT,
        "source": {"type": "string"},
    },
    ("id", "time", "actor", "action", "target", "detail", "source"),
    closed=False,
)
SESSION_INFO = obj(
    {"user": {"type": "string"}, "role": ROLE, "via": {"type": "string"},
     "csrfToken": {"type": "string", "nullable": True}, "expiresAt": OPT_TIME},
    ("user", "role", "via"),
    closed=False,
)
SERIAL = Param("serial", string("certificate serial number, hex", minLength=1, maxLength=42,
                                pattern=r"^(0[xX])?[0-9a-fA-F:]+$"), example="1a2b3c")
TIME_QUERY = {
    "type": "string",
    "format": "date-time",
    "maxLength": 40,
    "description": "RFC 3339 time; seconds since 1970 are accepted too",
}
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?)?([Zz]|[+-]\d{2}:?\d{2})?$"
)


def parse_time(value: str | None, field: str) -> float | None:
    """RFC 3339 (a date alone is midnight UTC, no zone is UTC) or seconds since 1970."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds == seconds and abs(seconds) < 1e11:
            return seconds
        raise bad_field(field, "expected seconds since 1970 or an RFC 3339 time")
    match = _RFC3339.match(value.strip())
    try:
        if match is None:
            raise ValueError(value)
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        moment = datetime.datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0),
            min(int(second or 0), 59),  # a leap second counts as :59
            int(float(fraction) * 1e6) if fraction else 0, tzinfo=datetime.UTC,
        )
        if zone and zone not in "Zz":
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            moment -= sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise bad_field(field, "expected seconds since 1970 or an RFC 3339 time") from None


class AuthApi:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    async def check_login(self, username: str, password: str, source: str) -> users.User:
        """Rate-limited password check shared by the API and the login page (401 or 429 on refusal)."""
        limiter = self.web.limiter
        counted = limit_key(source)  # per address (IPv6: per /64); the audit entry keeps it exact
        wait = await limiter.retry_after(counted, username)
        if wait is not None:
            self.web.login_failures.labels("rate_limited").inc()
            raise rate_limited(wait)
        delay = await limiter.delay(username)
        if delay:
            # Many addresses guessing at this account: every attempt waits, nobody is locked out.
            self.web.login_failures.labels("slowed_down").inc()
            await task.deferLater(self.web.clock, delay, lambda: None)
        user = await users.authenticate(self.web.hub.store, username, password)
        if user is None:
            await limiter.failed(counted, username)
            self.web.login_failures.labels("bad_credentials").inc()
            await self.web.refusals.record("anonymous", "auth.login_failed", username[:64], {}, source)
            raise ApiError(401, "bad_credentials", "wrong user name or password")
        await limiter.succeeded(counted, username)
        return user

    async def start_session(self, request: Any, user: users.User, source: str) -> Any:
        session_id, session = await self.web.sessions.create(user.id, user.name, user.role, source)
        self.web.auth.set_session_cookie(request, session_id)
        return session

    @api_route("POST", "/auth/login", role=ANONYMOUS, summary="Log in; sets the session cookie",
               tag="auth", body=CREDENTIALS, response=SESSION_INFO, errors=(429,),
               description="For browsers. State-changing calls made with the cookie need the returned "
                           "csrfToken in an X-CSRF-Token header. Scripts use POST /auth/token instead.",
               body_example={"username": "admin", "password": "correct horse"})
    async def login(self, call: Call) -> Any:
        user = await self.check_login(call.body["username"], call.body["password"], call.source)
        session = await self.start_session(call.request, user, call.source)
        call.audit_action, call.target, call.acting_as = "auth.login", user.name, user.name
        call.detail = {"via": "session"}
        return {"user": user.name, "role": user.role, "via": "session", "csrfToken": session.csrf,
                "expiresAt": rfc3339(self.web.sessions.expires_at(session))}

    @api_route("POST", "/auth/token", role=ANONYMOUS, summary="Log in; returns a bearer token",
               tag="auth", errors=(429,), status=201,
               body=obj({**CREDENTIALS["properties"], "name": string("what the token is for", maxLength=64)},
                        ("username", "password")),
               response=obj({"token": {"type": "string"}, "expiresAt": TIME, "user": {"type": "string"},
                             "role": ROLE}, ("token", "expiresAt", "user", "role"), closed=False),
               description="The token is shown only in this response and expires after web.session_max.")
    async def token(self, call: Call) -> Any:
        user = await self.check_login(call.body["username"], call.body["password"], call.source)
        now = self.web.clock.seconds()
        expires = now + self.web.hub.config.web.session_max
        key, token = await auth.create_key(
            self.web.hub.store, user, call.body.get("name") or "login", user.role, "token", now, expires
        )
        call.audit_action, call.target, call.acting_as = "auth.token", user.name, user.name
        call.detail = {"key": key.id}
        return Created({"token": token, "expiresAt": rfc3339(expires), "user": user.name, "role": user.role})

    @api_route("POST", "/auth/logout", role="viewer", summary="Log out: end this session or revoke this token",
               tag="auth", status=204, errors=(400,))
    async def logout(self, call: Call) -> Any:
        principal = call.principal
        if principal.via == "session":
            await self.web.sessions.drop(self.web.auth.session_cookie(call.request))
            self.web.auth.clear_session_cookie(call.request)
        elif principal.via == "token":
            await auth.revoke_key(self.web.hub.store, principal.key_id, self.web.clock.seconds())
            self.web.auth.forget()
        else:
            raise ApiError(400, "not_a_login", "API keys are revoked with DELETE /api/v1/api-keys/{id}")
        call.audit_action, call.target, call.detail = "auth.logout", principal.name, {"via": principal.via}
        return NO_CONTENT

    @api_route("GET", "/auth/me", role="viewer", summary="Who the caller is", tag="auth", response=SESSION_INFO)
    def me(self, call: Call) -> Any:
        p = call.principal
        out: dict[str, Any] = {"user": p.name, "role": p.role, "via": p.via}
        if p.session is not None:
            out["csrfToken"] = p.session.csrf
            out["expiresAt"] = rfc3339(self.web.sessions.expires_at(p.session))
        return out

    @api_route("POST", "/auth/ticket", role="viewer", summary="A single-use ticket for the WebSocket stream",
               tag="auth", status=201,
               response=obj({"ticket": {"type": "string"}, "expiresIn": {"type": "number"}}, ("ticket", "expiresIn"),
                            closed=False),
               description="Open /api/v1/stream?ticket=... within 30 s; the ticket works once. Keeps long-lived "
                           "tokens out of URLs (and so out of proxy logs).")
    def ticket(self, call: Call) -> Any:
        return Created({"ticket": self.web.auth.issue_ticket(call.principal), "expiresIn": auth.TICKET_TTL})

    @api_route("POST", "/auth/password", role="viewer", summary="Change your own password", tag="auth",
               status=204, body=obj({"current": string("current password", minLength=1, maxLength=users.MAX_PASSWORD),
                                     "new": PASSWORD}, ("current", "new")), audit="user.password")
    async def change_password(self, call: Call) -> Any:
        p = call.principal
        if await users.authenticate(self.web.hub.store, p.name, call.body["current"]) is None:
            raise ApiError(403, "wrong_password", "current: wrong password", field="current")
        await users.update_user(self.web.hub.store, p.name, password=call.body["new"])
        # Everything else logged in as this user ends; this session continues.
        await self.web.sessions.drop_user(p.user_id, keep=p.session)
        await auth.revoke_user_tokens(self.web.hub.store, p.user_id, self.web.clock.seconds())
        self.web.auth.forget()
        call.target = p.name
        return NO_CONTENT


NAME = Param("name", USER_NAME, "user name", example="alice")


class UsersApi:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    @api_route("GET", "/users", role="admin", summary="List users", tag="users", response=page_of(USER),
               query=(Param("role", ROLE), Param("q", string("part of the name", maxLength=64)), *PAGING))
    async def list_users(self, call: Call) -> Any:
        q = call.query
        found, total = await users.list_users(
            self.web.hub.store, role=q.get("role"), q=q.get("q"), limit=q["limit"], offset=q["offset"]
        )
        return page([u.to_json() for u in found], total, q["limit"], q["offset"])

    @api_route("POST", "/users", role="admin", summary="Create a user", tag="users", status=201, errors=(409,),
               body=obj({"name": USER_NAME, "role": ROLE, "password": PASSWORD}, ("name", "role")),
               response=obj({"user": USER, "password": {"type": "string"}}, ("user",), closed=False),
               description="Without a password one is generated and returned once.", audit="user.add")
    async def create_user(self, call: Call) -> Any:
        body = call.body
        password = body.get("password") or users.generate_password()
        await users.add_user(self.web.hub.store, body["name"], body["role"], password)
        user = await users.get_user(self.web.hub.store, body["name"])
        assert user is not None
        call.target, call.detail = user.name, {"role": user.role}
        out: dict[str, Any] = {"user": user.to_json()}
        if "password" not in body:
            out["password"] = password
        return Created(out, location=f"/api/v1/users/{user.name}")

    @api_route("GET", "/users/{name}", role="admin", summary="One user", tag="users", params=(NAME,),
               response=USER, errors=(404,))
    async def get_user(self, call: Call) -> Any:
        user = await users.get_user(self.web.hub.store, call.params["name"])
        if user is None:
            raise not_found(f"user {call.params['name']}")
        return user.to_json()

    @api_route("PATCH", "/users/{name}", role="admin", summary="Change a user's role, state or password",
               tag="users", params=(NAME,), response=USER, errors=(404,), audit="user.update", audit_target="name",
               body=obj({"role": ROLE, "disabled": {"type": "boolean"}, "password": PASSWORD}))
    async def update_user(self, call: Call) -> Any:
        body = call.body
        user = await users.update_user(
            self.web.hub.store, call.params["name"],
            role=body.get("role"), disabled=body.get("disabled"), password=body.get("password"),
        )
        if user is None:
            raise not_found(f"user {call.params['name']}")
        now = self.web.clock.seconds()
        if body.get("disabled") or "password" in body:
            await self.web.sessions.drop_user(user.id)
            await auth.revoke_user_tokens(self.web.hub.store, user.id, now)
        self.web.sessions.set_role(user.id, user.role)
        self.web.auth.forget()  # keys follow their user's role and state at once
        # Never the password itself: only that it changed.
        call.detail = {k: (v if k != "password" else "changed") for k, v in body.items()}
        return user.to_json()

    @api_route("DELETE", "/users/{name}", role="admin", summary="Delete a user and their API keys", tag="users",
               params=(NAME,), status=204, errors=(404,), audit="user.delete", audit_target="name")
    async def delete_user(self, call: Call) -> Any:
        user = await users.delete_user(self.web.hub.store, call.params["name"])
        if user is None:
            raise not_found(f"user {call.params['name']}")
        await self.web.sessions.drop_user(user.id)
        self.web.auth.forget()
        return NO_CONTENT


KEY_ID = Param("id", {"type": "integer", "minimum": 1, "maximum": 2**53}, "API key id", example=999999)


class KeysApi:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    @api_route("GET", "/api-keys", role="viewer", summary="List API keys (admins: everyone's)", tag="api-keys",
               query=(Param("user", USER_NAME, "only this user's keys (admins)"), *PAGING), response=page_of(API_KEY))
    async def list_keys(self, call: Call) -> Any:
        p, q = call.principal, call.query
        user_id: int | None = p.user_id
        if p.role == "admin":
            user_id = None
            if q.get("user"):
                owner = await users.get_user(self.web.hub.store, q["user"])
                if owner is None:
                    return page([], 0, q["limit"], q["offset"])
                user_id = owner.id
        found, total = await auth.list_keys(self.web.hub.store, user_id=user_id, limit=q["limit"], offset=q["offset"])
        now = self.web.clock.seconds()
        return page([k.to_json(now) for k in found], total, q["limit"], q["offset"])

    @api_route("POST", "/api-keys", role="viewer", summary="Create an API key; the secret is shown once",
               tag="api-keys", status=201, audit="apikey.create",
               body=obj(
                   {"name": string("what the key is for", minLength=1, maxLength=64),
                    "role": {**ROLE, "description": "at most your own role (default: your role)"},
                    "expiresInDays": {"type": "integer", "minimum": 1, "maximum": 3650, "default": 90},
                    "user": {**USER_NAME, "description": "admins: create it for this user"}},
                   ("name",)),
               response=obj({"key": API_KEY, "secret": {"type": "string"}}, ("key", "secret"), closed=False),
               errors=(404,))
    async def create_key(self, call: Call) -> Any:
        p, body = call.principal, call.body
        owner = await users.get_user(self.web.hub.store, body.get("user") or p.name)
        if owner is None:
            raise not_found(f"user {body.get('user')}")
        if owner.id != p.user_id and p.role != "admin":
            raise forbidden("only admins create keys for other users")
        role = body.get("role") or owner.role
        # A key never grants more than its owner has, nor more than its creator has.
        if users.RANK[role] > users.RANK[owner.role]:
            raise ApiError(403, "forbidden", f"role: at most the owner's role ({owner.role})", field="role")
        if users.RANK[role] > users.RANK[p.role]:
            raise ApiError(403, "forbidden", f"role: at most your own role ({p.role})", field="role")
        now = self.web.clock.seconds()
        expires = now + DAY * body.get("expiresInDays", 90)
        key, secret = await auth.create_key(self.web.hub.store, owner, body["name"], role, "key", now, expires)
        call.target, call.detail = f"{key.id}", {"name": key.name, "user": owner.name, "role": role}
        return Created({"key": key.to_json(now), "secret": secret}, location=f"/api/v1/api-keys/{key.id}")

    @api_route("DELETE", "/api-keys/{id}", role="viewer", summary="Revoke an API key", tag="api-keys",
               params=(KEY_ID,), status=204, errors=(404, 409), audit="apikey.revoke", audit_target="id")
    async def revoke_key(self, call: Call) -> Any:
        p = call.principal
        key = await auth.get_key(self.web.hub.store, call.params["id"])
        # Someone else's key is "not found": its existence is not the caller's business.
        if key is None or (p.role != "admin" and key.user != p.name):
            raise not_found(f"API key {call.params['id']}")
        revoked = await auth.revoke_key(self.web.hub.store, key.id, self.web.clock.seconds())
        self.web.auth.forget()
        if not revoked:
            raise ApiError(409, "conflict", f"API key {key.id} is revoked already")
        call.detail = {"name": key.name, "user": key.user}
        return NO_CONTENT


class HubApi:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    @api_route("GET", "/openapi.json", role=ANONYMOUS, summary="This API's OpenAPI 3 document", tag="hub",
               response=ANY_OBJECT)
    def openapi(self, call: Call) -> Any:
        return self.web.openapi()

    @api_route("GET", "/health", role="viewer", summary="Component health", tag="hub", response=obj(
        {"status": {"type": "string", "enum": ["ok", "degraded"]}, "components": ANY_OBJECT,
         "version": {"type": "string"}}, ("status", "components"), closed=False))
    def health(self, call: Call) -> Any:
        _, doc = self.web.hub.health.report()
        doc["version"] = self.web.hub.version
        return doc

    @api_route("GET", "/metrics", role="viewer", summary="Prometheus metrics", tag="hub", produces="text/plain")
    def metrics(self, call: Call) -> Any:
        return Text(generate_latest(self.web.hub.metrics), CONTENT_TYPE_LATEST)

    @api_route("GET", "/config", role="operator", summary="The hub configuration, secrets masked", tag="hub",
               response=ANY_OBJECT)
    def config(self, call: Call) -> Any:
        return self.web.hub.config.masked()

    @api_route("GET", "/dashboard", role="viewer", summary="Health, counts, event rates and the latest events",
               tag="hub", response=obj({"health": ANY_OBJECT, "counts": ANY_OBJECT, "rates": ANY_OBJECT,
                                        "recent": {"type": "array", "items": ANY_OBJECT}},
                                       ("health", "counts", "rates", "recent"), closed=False))
    async def dashboard(self, call: Call) -> Any:
        doc = await self.web.dashboard()
        # The page charts seconds; the API answers times as the contract writes them.
        doc["recent"] = [{**e, "time": rfc3339(e["time"])} for e in doc["recent"]]
        doc["rates"] = {**doc["rates"], "start": rfc3339(doc["rates"]["start"])}
        return doc

    @api_route("GET", "/logs", role="admin", summary="Recent log lines, newest first", tag="hub",
               query=(Param("level", string("lowest level", enum=["info", "warn", "error", "critical"])),
                      Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200}),
                      Param("access", {"type": "boolean", "default": False}, "include HTTP access lines")),
               response=page_of(ANY_OBJECT))
    def logs(self, call: Call) -> Any:
        q = call.query
        lines = self.web.logs.lines(level=q.get("level") or "info", limit=q["limit"], access=q["access"])
        return page(lines, len(lines), q["limit"], 0)

    @api_route("GET", "/audit", role="admin", summary="The audit log, newest first", tag="audit",
               query=(Param("actor", string("who", maxLength=64)),
                      Param("action", string("what, e.g. user.add; 'user.' for every user action", maxLength=64)),
                      Param("target", string("what was changed", maxLength=200)),
                      Param("since", TIME_QUERY, "from this time"), Param("until", TIME_QUERY, "before this time"),
                      *PAGING),
               response=page_of(AUDIT_ENTRY))
    async def audit_log(self, call: Call) -> Any:
        q = call.query
        entries, total = await audit.query(
            self.web.hub.store, actor=q.get("actor"), action=q.get("action"), target=q.get("target"),
            since=parse_time(q.get("since"), "since"), until=parse_time(q.get("until"), "until"),
            limit=q["limit"], offset=q["offset"],
        )
        return page([e.to_json() for e in entries], total, q["limit"], q["offset"])

    @api_route("GET", "/stream", role="viewer", summary="Live events over WebSocket", tag="stream",
               ticket_auth=True, errors=(426, 503),
               query=(Param("ticket", string("single-use ticket from POST /auth/ticket", maxLength=100)),),
               description='Send {"subscribe": ["mioty/uplink", "mioty", "*"]}; receive {"event": {"channel", "topic",'
                           ' "time", "payload"}}. Authenticate with the session cookie, a bearer header or a ticket. '
                           "A client that does not keep up is disconnected.")
    def stream(self, call: Call) -> Any:
        return upgrade(self.web, call, "stream")


CERT_INFO = obj({"serial": {"type": "string"}, "subject": {"type": "string"}, "notAfter": {"type": "string"}},
                ("serial",), closed=False)
BINDING = obj({"kind": {"type": "string"}, "subject": {"type": "string"}}, ("kind", "subject"))
BINDING["nullable"] = True
ISSUED = obj({"serial": {"type": "string"}, "name": {"type": "string"}, "binding": BINDING,
              "notAfter": TIME, "issuedAt": TIME, "issuedBy": {"type": "string"},
              "revokedAt": OPT_TIME,
              "revokeReason": {"type": "string", "nullable": True}}, ("serial", "name"), closed=False)
REVOKED = obj({"serial": {"type": "string"}, "reason": {"type": "string"}, "revokedAt": TIME, "binding": BINDING},
              ("serial", "reason", "revokedAt"), closed=False)


class CertsApi:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    @api_route("GET", "/certificates/ca", role="operator", summary="The hub CA", tag="certificates",
               response=CERT_INFO, errors=(503,))
    def ca(self, call: Call) -> Any:
        return certs.ca_info(self.web.hub.config)

    @api_route("GET", "/certificates/bindings", role="operator", summary="What a certificate may be bound to",
               tag="certificates", response=obj({"items": {"type": "array", "items": obj(
                   {"kind": {"type": "string"}, "label": {"type": "string"},
                    "subject": {"type": "string", "nullable": True}, "field": {"type": "string", "nullable": True}},
                   ("kind", "label"), closed=False)}}, ("items",), closed=False),
               description="The binding kinds the enabled families declare: `subject` says what the kind binds"
                           " to (null: it takes none); `field` is the request and listing field that carries the"
                           " subject by itself.")
    def bindings(self, call: Call) -> Any:
        return {"items": certs.kinds_json(self.web.binding_kinds)}

    @api_route("GET", "/certificates", role="operator", summary="Client certificates issued by the hub",
               tag="certificates", query=(Param("q", string("part of name, serial or bound subject", maxLength=64)),
                                          *PAGING),
               response=page_of(ISSUED),
               description="Each item's `binding` is {kind, subject} or null; every binding kind's `field` (see"
                           " /certificates/bindings) is there too, holding the subject of a binding of that kind.")
    async def list_certs(self, call: Call) -> Any:
        q = call.query
        items, total = await certs.list_issued(self.web.hub.store, self.web.binding_kinds, q=q.get("q"),
                                               limit=q["limit"], offset=q["offset"])
        return page(items, total, q["limit"], q["offset"])

    @api_route("POST", "/certificates", role="admin", summary="Issue a client certificate (download)",
               tag="certificates", status=201, produces="application/zip", errors=(409,), audit="cert.issue",
               body=obj({
                   "name": string("device name: certificate CN and DNS SAN", minLength=1, maxLength=64,
                                  pattern=r"^(?![cC][aA]$)[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$",
                                  **{"x-expected": "1-64 letters, digits, '.', '_', '-' (not 'ca')"}),
                   "days": {"type": "integer", "minimum": 1, "maximum": 3650, "default": 825},
                   "format": string("zip (NAME.pem, NAME.key, ca.pem) or pem (one bundle)", enum=["zip", "pem"]),
                   "kind": string("what the certificate is bound to: a binding kind of GET /certificates/bindings"
                                  " (or the name that kind had before); none: bound to nothing", maxLength=64),
                   "subject": string("what of that kind it is bound to (e.g. a station's EUI); none for a kind"
                                     " that takes none", minLength=1, maxLength=128),
               }, ("name",)),
               description="The private key exists only in this response; the hub keeps no copy. A kind's `field`"
                           " (GET /certificates/bindings) may carry the subject instead of `kind` and `subject`.")
    async def issue(self, call: Call) -> Any:
        body = call.body
        binding = certs.binding_of(self.web.binding_kinds, body)
        bundle = await certs.issue(
            self.web.hub.config, self.web.hub.store, name=body["name"], binding=binding,
            days=body.get("days", 825), fmt=body.get("format", "zip"), actor=call.actor, now=self.web.clock.seconds(),
        )
        call.target = bundle.serial
        call.detail = {"name": bundle.name, "binding": binding.to_json() if binding else None,
                       "notAfter": bundle.not_after}
        return Download(bundle.data, bundle.filename, bundle.content_type, status=201)

    @api_route("POST", "/certificates/{serial}/revoke", role="admin", summary="Revoke a certificate by serial",
               tag="certificates", params=(SERIAL,), errors=(409,), audit="cert.revoke", response=REVOKED,
               body=obj({"reason": string("why", maxLength=200)}), body_required=False)
    async def revoke(self, call: Call) -> Any:
        serial = certs.normalize_serial(call.params["serial"])
        reason = (call.body or {}).get("reason", "")
        result = await certs.revoke(self.web.hub.store, serial, reason, call.actor, self.web.clock.seconds(),
                                    self.web.binding_kinds)
        call.target, call.detail = serial, {"reason": reason, "name": result["name"]}
        # The families with TLS listeners refuse it from now on (and drop connections using it).
        for extension in self.web.extensions:
            if ICertificateRevocation.providedBy(extension):
                await extension.certificate_revoked(int(serial, 16), reason, call.actor)
        return result

    @api_route("GET", "/certificates/revoked", role="operator", summary="Revoked serials", tag="certificates",
               query=PAGING, response=page_of(REVOKED))
    async def revoked(self, call: Call) -> Any:
        q = call.query
        items, total = await certs.list_revoked(self.web.hub.store, limit=q["limit"], offset=q["offset"])
        return page(items, total, q["limit"], q["offset"])


CORE_GROUPS = (AuthApi, UsersApi, KeysApi, HubApi, CertsApi)
