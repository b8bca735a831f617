"""The gate family's REST routes (/api/v1/gates/...) and admin pages (/gates/...), over GateService.

Hub users come through the web layer's roles; units, apps and signed URLs are authenticated here, on every route.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs
from zope.interface import implementer

from bsscihub import audit
from bsscihub.blobs import StreamedBlob
from bsscihub.contract import opt_time, rfc3339
from bsscihub.family import IDashboardSummary, IWebExtension
from bsscihub.protocols.gate.config import MAX_FILE_BYTES
from bsscihub.protocols.gate.registry import LEVELS, Refused, Unit, level_at_least
from bsscihub.protocols.gate.service import Caller, GateService
from bsscihub.protocols.gate.tokens import public_prefix
from bsscihub.users import role_at_least
from bsscihub.web.dispatch import Dispatcher
from bsscihub.web.errors import ApiError
from bsscihub.web.pages import form_int
from bsscihub.web.proxy import client_of
from bsscihub.web.routing import (
    NO_CONTENT,
    PAGING,
    Accepted,
    Call,
    Created,
    NavItem,
    Page,
    Param,
    Redirect,
    api_route,
    page,
    page_route,
)
from bsscihub.web.schema import ANY_OBJECT, obj, page_of, string

if TYPE_CHECKING:
    from bsscihub.hub import Hub

S = "s"
"""The web hook mounts a family under /api/v1/{name} and /{name}, here /api/v1/gate and /gate; the units'
firmware calls /api/v1/gates/..., so every path below continues the mount point with this "s"."""

PROVISIONING_HEADER = b"x-provisioning-key"
UNIT_HEADER = b"x-unit-key"
APP_HEADER = b"x-app-token"
MAX_SECRET = 512

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
IDENT = {"pattern": ID_PATTERN, "minLength": 1, "maxLength": 64,
         "x-expected": "1-64 letters, digits, '_', '.', ':', '-' (starting with a letter or digit)"}
HARDWARE_ID = string("the unit's immutable hardware id", **IDENT)
CONTROLLER_ID = string("the unit's name in topics and URLs", **IDENT)
LEVEL = string("access level: user (open, close, stop, status) or engineer (everything)", enum=list(LEVELS))
CID = Param("controller_id", CONTROLLER_ID, "the unit's controller id", example="gate-1")
REGISTER = obj(
    {"hardware_id": HARDWARE_ID, "controller_id": CONTROLLER_ID,
     "firmware_version": string("firmware version", minLength=1, maxLength=64)},
    ("hardware_id", "controller_id", "firmware_version"),
)
RENAME = obj({"controller_id": CONTROLLER_ID}, ("controller_id",))
USER_TOKEN = string("the app's token captured over BLE pairing", minLength=16, maxLength=MAX_SECRET)
GRANT = obj({"user_token": USER_TOKEN, "access_level": LEVEL}, ("user_token", "access_level"))
REVOKE_TOKEN = obj({"user_token": USER_TOKEN}, ("user_token",))
COMMAND = obj(
    {"command": string("command name, e.g. open, close, configure", pattern=r"^[a-z][a-z0-9_]{0,31}$",
                       **{"x-expected": "1-32 of a-z, 0-9, '_' starting with a letter"}),
     "args": ANY_OBJECT,
     "timeout": {"type": "number", "minimum": 1, "maximum": 3600,
                 "description": "seconds (default gate.command_timeout)"}},
    ("command",),
)
SHARE = obj({"access_level": LEVEL,
             "expires_in": {"type": "number", "minimum": 60, "description": "seconds until the token expires"}},
            ("access_level", "expires_in"))
REDEEM = obj({"share_token": string("the sharing token", minLength=1, maxLength=MAX_SECRET)}, ("share_token",))
NEW_KEY = obj({"name": string("what the key is for", minLength=1, maxLength=64),
               "single_use": {"type": "boolean"},
               "expires_in": {"type": "number", "minimum": 60, "description": "seconds (default: never)"}},
              ("name",))
UPLOAD = obj({"name": string("file name", minLength=1, maxLength=128, pattern=r"^[A-Za-z0-9._-]+$",
                             **{"x-expected": "letters, digits, '.', '_', '-'"}),
              "size": {"type": "integer", "minimum": 1, "description": "bytes the unit will upload (the limit)"},
              "kind": string("what the file is", enum=["log", "diagnostics", "other"])},
             ("name", "size"))
WAIT = Param("wait", {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
             "seconds to wait for the unit's answer before replying")
SIGNED = tuple(Param(n, {"type": "string", "maxLength": 200}, d) for n, d in (
    ("op", "up or down"), ("exp", "expiry (Unix seconds)"), ("max", "size limit"), ("sig", "the URL's signature")))
FILE_ID = Param("file_id", string("file id", pattern=r"^[0-9a-f]{32}$", **{"x-expected": "32 hex digits"}),
                example="0" * 32)
COMMAND_ID = Param("command_id", string("command id", pattern=r"^[0-9a-f]{32}$", **{"x-expected": "32 hex digits"}),
                   example="0" * 32)
UNIT_AUTH = "Authenticate as the unit: X-Unit-Key: <the unit_key from its registration>."
APP_AUTH = ("Authenticate as a hub user (Bearer token, API key or session; operator or higher) or as an app: "
            "X-App-Token: <the app's token>, limited by its access level on the unit.")


@attrs.define
class Context:
    """Who acted on what: filled in by a handler as it learns it, written to the audit log either way."""

    actor: str
    target: str = ""
    detail: dict[str, Any] = attrs.field(factory=dict)


Handler = Callable[[Any, Call, Context], Awaitable[Any]]


def audited(action: str, *, change: bool = True) -> Callable[[Handler], Callable[[Any, Call], Awaitable[Any]]]:
    """Every refusal is recorded as `{action}.refused` (with status and code); a change as `action`."""

    def wrap(fn: Handler) -> Callable[[Any, Call], Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: GateWeb, call: Call) -> Any:
            ctx = Context(call.principal.name if call.principal is not None else "anonymous")
            try:
                result = await fn(self, call, ctx)
            except (Refused, ApiError) as e:
                error = e if isinstance(e, ApiError) else ApiError(e.http_status, e.code, str(e))
                # Through the aggregated refusal log: a flood of refusals cannot fill the audit log.
                await self.hub.refusals.record(ctx.actor, f"{action}.refused", ctx.target,
                                               {**ctx.detail, "status": error.status, "code": error.code,
                                                "message": error.message}, call.source)
                raise error from None
            if change:
                await audit.record(self.hub.store, ctx.actor, action, ctx.target, ctx.detail, call.source)
            return result

        return handler

    return wrap


def _header(call: Call, name: bytes) -> str | None:
    request = call.request
    value = request.getHeader(name) if request is not None else None
    if not value:
        return None
    text = value if isinstance(value, str) else value.decode("latin-1")
    text = text.strip()
    if len(text) > MAX_SECRET:
        raise Refused(401, "malformed_credentials", f"{name.decode()} is longer than {MAX_SECRET} characters")
    return text


def base_url(request: Any) -> str:
    """The hub's address as the caller reached it (gate.public_url overrides it in signed URLs)."""
    host = request.getHeader(b"host")
    if not host:
        address = request.getHost()
        host = f"{address.host}:{address.port}".encode()
    # HTTPS here or at a trusted reverse proxy in front (web.trusted_proxies, X-Forwarded-Proto).
    scheme = "https" if client_of(request).https else "http"
    return f"{scheme}://{host.decode('latin-1')}"


def _signed_args(call: Call) -> dict[str, str]:
    return {k: str(v) for k, v in call.query.items() if v is not None}


@implementer(IWebExtension, IDashboardSummary)
class GateWeb:
    """Routes and pages of the gate family; mounted by the web layer via GateFamily.web_routes."""

    nav = [NavItem("Gates", "/gates", "viewer", "gate")]
    templates = Path(__file__).parent / "templates"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def service(self) -> GateService:
        service = self.hub.services.get("gate")
        if service is None:
            raise Refused(503, "unavailable", "the gate family is not running")
        return cast(GateService, service)

    async def summary(self) -> dict[str, Any]:
        return await self.service.summary()

    # -- who is calling

    async def _unit_from_key(self, key: str, ctx: Context) -> Unit:
        unit = await self.service.unit_by_key(key)
        if unit is None:
            raise Refused(401, "invalid_unit_key", "unknown unit key")
        ctx.actor = f"gate-unit:{unit.hardware_id}"
        return unit

    async def _as_unit(self, call: Call, ctx: Context, controller_id: str) -> Unit:
        ctx.target = controller_id
        key = _header(call, UNIT_HEADER)
        if key is None:
            raise Refused(401, "unit_key_required", "this call needs the unit's key in X-Unit-Key")
        unit = await self._unit_from_key(key, ctx)
        if unit.controller_id != controller_id:
            raise Refused(403, "wrong_unit", f"this unit key belongs to {unit.controller_id}, not {controller_id}")
        return unit

    def _app_token(self, call: Call, ctx: Context) -> str:
        token = _header(call, APP_HEADER)
        if token is None:
            raise Refused(401, "app_token_required", "this call needs the app's token in X-App-Token")
        ctx.actor = self.service.app_actor(token)
        return token

    async def _unit_and_caller(self, call: Call, ctx: Context, controller_id: str, *, role: str = "operator",
                               level: str | None = None) -> tuple[Unit, Caller]:
        """A hub user with `role`, or an app with access (at least `level`) to the unit."""
        ctx.target = controller_id
        principal = call.principal
        if principal is not None:
            if not role_at_least(principal.role, role):
                raise Refused(403, "forbidden", f"this needs the {role} role; you are {principal.role}")
            return await self.service.unit(controller_id), Caller(principal.name, "user")
        token = _header(call, APP_HEADER)
        if token is None:
            raise Refused(401, "unauthorized",
                          "authenticate as a hub user (Authorization: Bearer) or as an app (X-App-Token)")
        ctx.actor = self.service.app_actor(token)
        unit = await self.service.unit_or_none(controller_id)
        access = await self.service.app_access(unit, token) if unit is not None else None
        # An unknown unit and a unit without access look the same to an app: names are not for probing.
        if unit is None or access is None:
            raise Refused(403, "no_access", f"this app has no access to gate unit {controller_id}")
        if level is not None and not level_at_least(access.level, level):
            raise Refused(403, "access_level", f"this needs {level} access; this app has {access.level}")
        return unit, Caller(ctx.actor, "app", access.level)

    async def _invoke(self, name: str, call: Call, *, params: dict[str, Any] | None = None, body: Any = None,
                      query: dict[str, Any] | None = None) -> Any:
        """Run an API handler for a page: the same role check, validation and audit as over HTTP."""
        handler = getattr(self, name)
        route = handler.__func__.__routes__[0]
        Dispatcher.authorize(route, call.principal)
        inner = Call(call.principal,
                     params=Dispatcher.parse_params(route, {k: str(v) for k, v in (params or {}).items()}),
                     query=Dispatcher.parse_query(route, {k: str(v) for k, v in (query or {}).items()}),
                     body=Dispatcher.check_body(route, body), source=call.source, request=call.request)
        return await handler(inner)

    # == REST: units register and report ==================================================================

    @api_route("POST", f"{S}/register", role=None, summary="Register a gate unit, or re-register it",
               body=REGISTER, errors=(401, 403, 409, 503), status=200,
               body_example={"hardware_id": "b827eb123456", "controller_id": "gate-1", "firmware_version": "1.4.2"},
               description="Authenticate with X-Provisioning-Key: <key> (an admin creates keys), or re-register "
                           "with X-Unit-Key. A new unit gets 201; a known one 200, with a new key (the old one "
                           "stops working) and its firmware updated. The answer carries the unit key and the MQTT "
                           "credentials and topics, shown only here. A known unit keeps its controller_id (only "
                           "an operator renames): use the one in the answer.")
    @audited("gate.register")
    async def register(self, call: Call, ctx: Context) -> Any:
        body = call.body
        ctx.target = body["controller_id"]
        ctx.detail = {"hardware_id": body["hardware_id"], "firmware_version": body["firmware_version"]}
        key_text = _header(call, PROVISIONING_HEADER)
        unit_key = _header(call, UNIT_HEADER)
        key = as_unit = None
        if key_text is not None:
            ctx.actor = f"gate-key:{public_prefix(key_text) or 'unknown'}"
            key = await self.service.check_provisioning_key(key_text)
            ctx.detail["provisioning_key"] = key.name
        elif unit_key is not None:
            as_unit = await self._unit_from_key(unit_key, ctx)
        else:
            raise Refused(401, "provisioning_key_required",
                          "register with X-Provisioning-Key (or X-Unit-Key to re-register)")
        registration, secret = await self.service.register(
            hardware_id=body["hardware_id"], controller_id=body["controller_id"],
            firmware_version=body["firmware_version"], actor=ctx.actor, provisioning_key=key, as_unit=as_unit,
        )
        unit = registration.unit
        ctx.target = unit.controller_id
        ctx.detail["created"] = registration.created
        answer = {**unit.to_json(), "unit_key": secret, "mqtt": self.service.credentials(unit, secret)}
        if unit.controller_id != body["controller_id"]:
            answer["note"] = (f"this unit is registered as {unit.controller_id}; use the controller_id and topics "
                              "of this answer")
        return Created(answer, f"/api/v1/gates/{unit.controller_id}") if registration.created else answer

    @api_route("POST", S + "/{controller_id}/user-tokens", role=None, params=(CID,), body=GRANT,
               summary="Map an app's token (captured over BLE) to this unit", errors=(401, 403), description=UNIT_AUTH)
    @audited("gate.app.grant")
    async def grant_user_token(self, call: Call, ctx: Context) -> Any:
        unit = await self._as_unit(call, ctx, call.params["controller_id"])
        access = await self.service.grant_app(unit, call.body["user_token"], call.body["access_level"])
        ctx.detail = {"fingerprint": access.fingerprint, "access_level": access.level}
        return Created(access.to_json())

    @api_route("POST", S + "/{controller_id}/user-tokens/revoke", role=None, params=(CID,), body=REVOKE_TOKEN,
               summary="Revoke an app's token on this unit (e.g. unpaired over BLE)", status=204,
               errors=(401, 403, 404), description=UNIT_AUTH)
    @audited("gate.app.revoke")
    async def revoke_user_token(self, call: Call, ctx: Context) -> Any:
        unit = await self._as_unit(call, ctx, call.params["controller_id"])
        if not await self.service.revoke_app_token(unit, call.body["user_token"]):
            raise Refused(404, "not_found", f"this app token has no active access to {unit.controller_id}")
        return NO_CONTENT

    @api_route("POST", S + "/{controller_id}/files/upload-url", role=None, params=(CID,), body=UPLOAD,
               summary="A signed URL to upload a file (logs) from the unit", errors=(401, 403, 413),
               description=UNIT_AUTH + " PUT the file's bytes to the URL before it expires; at most `size` bytes.")
    @audited("gate.file.upload_url")
    async def upload_url(self, call: Call, ctx: Context) -> Any:
        unit = await self._as_unit(call, ctx, call.params["controller_id"])
        body = call.body
        record, url, expires = await self.service.upload_url(
            unit, name=body["name"], size=body["size"], kind=body.get("kind", "log"), base_url=base_url(call.request),
            actor=ctx.actor)
        ctx.detail = {"file_id": record.id, "name": record.name, "size": record.max_size}
        return Created({"file": record.to_json(), "url": url, "method": "PUT", "expires_at": rfc3339(expires),
                        "max_size": record.max_size})

    # == REST: apps ==========================================================================================

    @api_route("GET", f"{S}/mine", role=None, summary="The units an app may reach, with its access level",
               response=page_of(ANY_OBJECT), errors=(401,), description="Authenticate with X-App-Token.")
    @audited("gate.app.discover", change=False)
    async def my_units(self, call: Call, ctx: Context) -> Any:
        token = self._app_token(call, ctx)
        found = await self.service.app_units(token)
        items = [{"controller_id": unit.controller_id, "access_level": access.level, "online": unit.online,
                  "last_seen": opt_time(unit.last_seen), "firmware_version": unit.firmware_version,
                  "via": access.via} for access, unit in found]
        mine = page(items, len(items), len(items), 0)
        if self.service.broker.enabled and found:
            # Its own broker account (password: its token) for publishing commands to these units directly.
            mine["mqtt"] = {"username": self.service.app_username(found[0][0].fingerprint),
                            "topics": {"publish": [self.service.topics(u.controller_id).commands for _, u in found],
                                       "subscribe": [self.service.topics(u.controller_id).status for _, u in found]}}
        return mine

    @api_route("POST", S + "/{controller_id}/commands", role=None, params=(CID,), query=(WAIT,), body=COMMAND,
               summary="Send a command to the unit", errors=(401, 403, 404, 503),
               body_example={"command": "open", "args": {}},
               description=APP_AUTH + " The command goes out on the unit's command topic with an id; the unit's "
                                      "status message carrying that command_id completes it (or it times out). "
                                      "202 with state pending, or 200 once settled when `wait` allows.")
    @audited("gate.command")
    async def send_command(self, call: Call, ctx: Context) -> Any:
        unit, caller = await self._unit_and_caller(call, ctx, call.params["controller_id"])
        body = call.body
        ctx.detail = {"command": body["command"]}
        command = await self.service.send_command(unit, body["command"], body.get("args"), caller=caller,
                                                  via="app" if caller.kind == "app" else "rest",
                                                  timeout=body.get("timeout"))
        ctx.detail["id"] = command.id
        if call.query.get("wait"):
            command = await self.service.wait_command(command.id, float(call.query["wait"]))
        return command.to_json() if command.done else Accepted(command.to_json())

    @api_route("GET", S + "/{controller_id}/commands/{command_id}", role=None, params=(CID, COMMAND_ID),
               query=(WAIT,), summary="One command and its result", errors=(401, 403, 404),
               description="A hub user (viewer or higher) sees every command; an app only the ones it sent.")
    @audited("gate.command.read", change=False)
    async def get_command(self, call: Call, ctx: Context) -> Any:
        unit, caller = await self._unit_and_caller(call, ctx, call.params["controller_id"], role="viewer")
        command = await self.service.wait_command(call.params["command_id"], float(call.query.get("wait") or 0))
        if command.unit_id != unit.id or (caller.kind == "app" and command.actor != caller.actor):
            raise Refused(404, "not_found", f"command {call.params['command_id']} not found")
        return command.to_json()

    @api_route("POST", S + "/{controller_id}/shares", role=None, params=(CID,), body=SHARE,
               summary="Create a sharing token for this unit", errors=(400, 401, 403, 404),
               body_example={"access_level": "engineer", "expires_in": 86400},
               description=APP_AUTH + " An app may share at most its own level. The token is shown only here; "
                                      "another app redeems it once.")
    @audited("gate.share.create")
    async def create_share(self, call: Call, ctx: Context) -> Any:
        unit, caller = await self._unit_and_caller(call, ctx, call.params["controller_id"])
        share, token = await self.service.create_share(unit, call.body["access_level"], call.body["expires_in"],
                                                       caller)
        ctx.detail = {"share_id": share.id, "prefix": share.prefix, "access_level": share.level,
                      "expires_at": share.expires_at}
        return Created({**share.to_json(self.service.now()), "share_token": token})

    @api_route("DELETE", S + "/{controller_id}/shares/{share_id}", role=None, status=204,
               params=(CID, Param("share_id", {"type": "integer", "minimum": 1}, example=1)),
               summary="Revoke a sharing token", errors=(401, 403, 404, 409),
               description=APP_AUTH + " An app may revoke only the tokens it created.")
    @audited("gate.share.revoke")
    async def revoke_share(self, call: Call, ctx: Context) -> Any:
        unit, caller = await self._unit_and_caller(call, ctx, call.params["controller_id"])
        ctx.detail = {"share_id": call.params["share_id"]}
        await self.service.revoke_share(unit, call.params["share_id"], caller)
        return NO_CONTENT

    @api_route("POST", f"{S}/shares/redeem", role=None, body=REDEEM,
               summary="Redeem a sharing token: this app gets the token's access to its unit",
               errors=(401, 404, 409, 410),
               description="Authenticate with X-App-Token. A token works once: a used one is 409, an expired or "
                           "revoked one 410, an unknown one 404.")
    @audited("gate.share.redeem")
    async def redeem_share(self, call: Call, ctx: Context) -> Any:
        app_token = self._app_token(call, ctx)
        share_token = call.body["share_token"]
        ctx.target = public_prefix(share_token) or "unknown"
        share, access = await self.service.redeem_share(share_token, app_token)
        ctx.target = access.controller_id
        ctx.detail = {"share_id": share.id, "prefix": share.prefix, "access_level": access.level}
        return {"controller_id": access.controller_id, "access_level": access.level, "share_id": share.id}

    @api_route("POST", S + "/{controller_id}/files/{file_id}/download-url", role=None, params=(CID, FILE_ID),
               summary="A signed URL to download one of the unit's files", errors=(401, 403, 404, 409),
               description=APP_AUTH + " Apps need engineer access.")
    @audited("gate.file.download_url")
    async def download_url(self, call: Call, ctx: Context) -> Any:
        unit, _ = await self._unit_and_caller(call, ctx, call.params["controller_id"], level="engineer")
        ctx.detail = {"file_id": call.params["file_id"]}
        record, url, expires = await self.service.download_url(unit, call.params["file_id"],
                                                               base_url(call.request))
        return {"file": record.to_json(), "url": url, "method": "GET", "expires_at": rfc3339(expires)}

    # == REST: signed file URLs ==============================================================================

    @api_route("PUT", S + "/files/{file_id}", role=None, params=(FILE_ID,), query=SIGNED, status=201,
               max_body=MAX_FILE_BYTES, summary="Upload a file to a signed URL", errors=(403, 404, 409, 413),
               description="The URL comes from POST /gates/{controller_id}/files/upload-url; the body is the file.")
    @audited("gate.file.upload")
    async def put_file(self, call: Call, ctx: Context) -> Any:
        file_id = call.params["file_id"]
        ctx.actor, ctx.target = f"gate-url:{file_id}", file_id
        record = await self.service.receive_upload(file_id, _signed_args(call), call.request.content)
        ctx.detail = {"size": record.size, "sha256": record.sha256}
        return Created(record.to_json())

    @api_route("GET", S + "/files/{file_id}", role=None, params=(FILE_ID,), query=SIGNED,
               produces="application/octet-stream", summary="Download a file from a signed URL",
               errors=(403, 404), description="The URL comes from a download-url call or a config_update command.")
    @audited("gate.file.download", change=False)
    async def get_file(self, call: Call, ctx: Context) -> Any:
        file_id = call.params["file_id"]
        ctx.actor, ctx.target = f"gate-url:{file_id}", file_id
        record, parts = await self.service.read_download(file_id, _signed_args(call))
        return StreamedBlob(parts, int(record.size or 0), record.name)

    # == REST: operators ======================================================================================

    @api_route("GET", S, role="viewer", query=(*PAGING, Param("q", {"type": "string", "maxLength": 64},
                                                              "part of a controller or hardware id")),
               summary="The gate unit registry", response=page_of(ANY_OBJECT))
    async def list_units(self, call: Call) -> Any:
        units, total = await self.service.list_units(call.query.get("q") or "", call.query["limit"],
                                                     call.query["offset"])
        return page([u.to_json() for u in units], total, call.query["limit"], call.query["offset"])

    @api_route("GET", S + "/{controller_id}", role="viewer", params=(CID,), errors=(404,),
               summary="One unit: identity, firmware, last status, online state, names it had, topics")
    async def get_unit(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        topics = self.service.topics(unit.controller_id)
        return {**unit.to_json(), "names": await self.service.names(unit),
                "topics": {"subscribe": topics.commands, "publish": topics.status}}

    @api_route("PATCH", S + "/{controller_id}", role="operator", params=(CID,), body=RENAME, errors=(404, 409, 503),
               summary="Rename a unit: keeps its history, moves its topics and broker permissions, frees the name")
    @audited("gate.rename")
    async def rename_unit(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["controller_id"]
        ctx.detail = {"to": call.body["controller_id"]}
        unit = await self.service.rename(call.params["controller_id"], call.body["controller_id"], ctx.actor)
        return unit.to_json()

    @api_route("DELETE", S + "/{controller_id}", role="admin", params=(CID,), status=204, errors=(404, 503),
               summary="Delete a unit, its broker account and its history")
    @audited("gate.delete")
    async def delete_unit(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["controller_id"]
        unit = await self.service.delete(call.params["controller_id"])
        ctx.detail = {"hardware_id": unit.hardware_id}
        return NO_CONTENT

    @api_route("GET", S + "/{controller_id}/status", role="viewer", params=(CID,), query=PAGING, errors=(404,),
               summary="The unit's status history, newest first", response=page_of(ANY_OBJECT))
    async def status_history(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        items, total = await self.service.status_history(unit, call.query["limit"], call.query["offset"])
        return page(items, total, call.query["limit"], call.query["offset"])

    @api_route("GET", S + "/{controller_id}/commands", role="viewer", params=(CID,), query=PAGING, errors=(404,),
               summary="Commands sent to the unit and their results, newest first", response=page_of(ANY_OBJECT))
    async def list_commands(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        items, total = await self.service.commands(unit, call.query["limit"], call.query["offset"])
        return page([c.to_json() for c in items], total, call.query["limit"], call.query["offset"])

    @api_route("GET", S + "/{controller_id}/user-tokens", role="operator", params=(CID,), errors=(404,),
               summary="Apps with access to the unit (token fingerprints, never the tokens)")
    async def list_user_tokens(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        items = [a.to_json() for a in await self.service.access_list(unit)]
        return page(items, len(items), len(items), 0)

    @api_route("DELETE", S + "/{controller_id}/user-tokens/{access_id}", role="operator", status=204,
               params=(CID, Param("access_id", {"type": "integer", "minimum": 1}, example=1)), errors=(404,),
               summary="Revoke one app's access to the unit")
    @audited("gate.app.revoke")
    async def revoke_access(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["controller_id"]
        ctx.detail = {"access_id": call.params["access_id"]}
        unit = await self.service.unit(call.params["controller_id"])
        await self.service.revoke_access(unit, call.params["access_id"])
        return NO_CONTENT

    @api_route("GET", S + "/{controller_id}/shares", role="operator", params=(CID,), errors=(404,),
               summary="Sharing tokens of the unit (never the tokens themselves)")
    async def list_shares(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        now = self.service.now()
        items = [s.to_json(now) for s in await self.service.shares(unit)]
        return page(items, len(items), len(items), 0)

    @api_route("GET", S + "/{controller_id}/files", role="viewer", params=(CID,), errors=(404,),
               summary="Files uploaded by the unit and pushed to it")
    async def list_files(self, call: Call) -> Any:
        unit = await self.service.unit(call.params["controller_id"])
        items = [f.to_json() for f in await self.service.files(unit)]
        return page(items, len(items), len(items), 0)

    @api_route("POST", S + "/{controller_id}/config", role="operator", params=(CID,), status=202,
               query=(Param("name", {"type": "string", "maxLength": 128, "pattern": r"^[A-Za-z0-9._-]+$",
                                     "default": "config"}, "file name the unit sees"),),
               max_body=MAX_FILE_BYTES, errors=(404, 413, 503),
               summary="Push a new config: stored, then sent to the unit as a config_update command with a signed URL",
               description="The request body is the config file, as is (any content type).")
    @audited("gate.config.push")
    async def push_config(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["controller_id"]
        unit = await self.service.unit(call.params["controller_id"])
        content = call.request.content
        content.seek(0)
        data = content.read()
        return await self._push(call, ctx, unit, data, call.query.get("name") or "config")

    async def _push(self, call: Call, ctx: Context, unit: Unit, data: bytes, name: str) -> Any:
        record, command = await self.service.push_config(unit, data, name=name, base_url=base_url(call.request),
                                                         caller=Caller(ctx.actor, "user"), via="rest")
        ctx.detail = {"file_id": record.id, "size": record.size, "sha256": record.sha256, "command_id": command.id}
        return Accepted({"file": record.to_json(), "command": command.to_json()})

    @api_route("GET", f"{S}/provisioning-keys", role="admin", summary="Provisioning keys (never the keys themselves)")
    async def list_keys(self, call: Call) -> Any:
        now = self.service.now()
        items = [k.to_json(now) for k in await self.service.provisioning_keys()]
        return page(items, len(items), len(items), 0)

    @api_route("POST", f"{S}/provisioning-keys", role="admin", body=NEW_KEY,
               summary="Create a provisioning key (shown only in this answer)",
               body_example={"name": "installer van 3", "single_use": False, "expires_in": 2592000})
    @audited("gate.key.create")
    async def create_key(self, call: Call, ctx: Context) -> Any:
        key, token = await self.service.create_provisioning_key(
            name=call.body["name"], single_use=bool(call.body.get("single_use", False)),
            expires_in=call.body.get("expires_in"), actor=ctx.actor)
        ctx.target, ctx.detail = key.prefix, {"name": key.name, "single_use": key.single_use}
        return Created({**key.to_json(self.service.now()), "key": token})

    @api_route("DELETE", S + "/provisioning-keys/{key_id}", role="admin", status=204,
               params=(Param("key_id", {"type": "integer", "minimum": 1}, example=1),), errors=(404, 409),
               summary="Revoke a provisioning key")
    @audited("gate.key.revoke")
    async def revoke_key(self, call: Call, ctx: Context) -> Any:
        ctx.target = str(call.params["key_id"])
        key = await self.service.revoke_provisioning_key(call.params["key_id"])
        ctx.target, ctx.detail = key.prefix, {"name": key.name}
        return NO_CONTENT

    # == admin pages ==========================================================================================

    @page_route("GET", S, role="viewer", summary="Gate units and provisioning keys")
    async def units_page(self, call: Call) -> Any:
        limit, offset = 100, max(0, form_int(call.query.get("offset"), 0) or 0)
        q = str(call.query.get("q") or "")[:64]
        units = await self._invoke("list_units", call, query={"limit": limit, "offset": offset, "q": q})
        keys = await self._invoke("list_keys", call) if role_at_least(call.principal.role, "admin") else None
        return Page("gate/units.html", {"title": "Gates", "units": units, "keys": keys, "q": q,
                                        "provisioning": self.service.config.broker_provisioning})

    @page_route("POST", f"{S}/keys", role="admin", summary="Create a provisioning key")
    async def create_key_page(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {"name": str(form.get("name", "")).strip(),
                                "single_use": str(form.get("single_use", "")).lower() in ("1", "on", "true")}
        days = str(form.get("expires_in_days") or "").strip()
        if days.isdigit() and int(days) > 0:
            body["expires_in"] = int(days) * 86400
        try:
            created = await self._invoke("create_key", call, body=body)
        except ApiError as e:
            return Redirect("/gates", error=e.message)
        assert call.principal.session is not None
        call.principal.session.flash("secret", created.value["key"])
        return Redirect("/gates", flash=f"provisioning key {body['name']} created — copy it now, it is shown once")

    @page_route("POST", S + "/keys/{key_id}/revoke", role="admin", summary="Revoke a provisioning key",
                params=(Param("key_id", {"type": "integer", "minimum": 1}, example=1),))
    async def revoke_key_page(self, call: Call) -> Any:
        try:
            await self._invoke("revoke_key", call, params={"key_id": call.params["key_id"]})
        except ApiError as e:
            return Redirect("/gates", error=e.message)
        return Redirect("/gates", flash="provisioning key revoked")

    @page_route("GET", S + "/{controller_id}", role="viewer", params=(CID,), summary="One gate unit")
    async def unit_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        params = {"controller_id": cid}
        unit = await self._invoke("get_unit", call, params=params)
        paging = {"limit": 50, "offset": 0}
        context = {
            "title": f"Gate {cid}", "unit": unit,
            "status": await self._invoke("status_history", call, params=params, query={"limit": 20, "offset": 0}),
            "commands": await self._invoke("list_commands", call, params=params, query=paging),
            "files": await self._invoke("list_files", call, params=params),
            "access": None, "shares": None, "levels": LEVELS,
        }
        if role_at_least(call.principal.role, "operator"):
            context["access"] = await self._invoke("list_user_tokens", call, params=params)
            context["shares"] = await self._invoke("list_shares", call, params=params)
        return Page("gate/unit.html", context)

    def _back(self, cid: str) -> str:
        return f"/gates/{cid}"

    @page_route("POST", S + "/{controller_id}/rename", role="operator", params=(CID,), summary="Rename a gate unit")
    async def rename_page(self, call: Call) -> Any:
        cid, new = call.params["controller_id"], str(call.body.get("controller_id", "")).strip()
        try:
            await self._invoke("rename_unit", call, params={"controller_id": cid}, body={"controller_id": new})
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        return Redirect(self._back(new), flash=f"renamed {cid} to {new}")

    @page_route("POST", S + "/{controller_id}/delete", role="admin", params=(CID,), summary="Delete a gate unit")
    async def delete_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        try:
            await self._invoke("delete_unit", call, params={"controller_id": cid})
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        return Redirect("/gates", flash=f"gate unit {cid} deleted")

    @page_route("POST", S + "/{controller_id}/commands", role="operator", params=(CID,), summary="Send a command")
    async def command_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        text = str(call.body.get("args") or "").strip()
        try:
            args = json.loads(text) if text else {}
        except ValueError:
            return Redirect(self._back(cid), error="arguments: not valid JSON")
        try:
            result = await self._invoke("send_command", call, params={"controller_id": cid},
                                        body={"command": str(call.body.get("command", "")).strip(), "args": args})
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        sent = result.value if isinstance(result, Accepted) else result
        return Redirect(self._back(cid), flash=f"command {sent['command']} sent ({sent['id'][:8]})")

    @page_route("POST", S + "/{controller_id}/user-tokens/{access_id}/revoke", role="operator",
                params=(CID, Param("access_id", {"type": "integer", "minimum": 1}, example=1)),
                summary="Revoke an app's access")
    async def revoke_access_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        try:
            await self._invoke("revoke_access", call, params=call.params)
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        return Redirect(self._back(cid), flash="app access revoked")

    @page_route("POST", S + "/{controller_id}/shares", role="operator", params=(CID,),
                summary="Create a sharing token")
    async def create_share_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        hours = str(call.body.get("expires_in_hours") or "24").strip()
        body = {"access_level": str(call.body.get("access_level", "")),
                "expires_in": int(hours) * 3600 if hours.isdigit() else 0}
        try:
            created = await self._invoke("create_share", call, params={"controller_id": cid}, body=body)
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        assert call.principal.session is not None
        call.principal.session.flash("secret", created.value["share_token"])
        return Redirect(self._back(cid), flash="sharing token created — copy it now, it is shown once")

    @page_route("POST", S + "/{controller_id}/shares/{share_id}/revoke", role="operator",
                params=(CID, Param("share_id", {"type": "integer", "minimum": 1}, example=1)),
                summary="Revoke a sharing token")
    async def revoke_share_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        try:
            await self._invoke("revoke_share", call, params=call.params)
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        return Redirect(self._back(cid), flash="sharing token revoked")

    @page_route("POST", S + "/{controller_id}/config", role="operator", params=(CID,), max_body=MAX_FILE_BYTES,
                summary="Push a config file")
    async def push_config_page(self, call: Call) -> Any:
        cid = call.params["controller_id"]
        try:
            pushed = await self._push_form(call)
        except ApiError as e:
            return Redirect(self._back(cid), error=e.message)
        return Redirect(self._back(cid), flash=f"config {pushed.value['file']['name']} pushed "
                                               f"({pushed.value['file']['size']} bytes)")

    @audited("gate.config.push")
    async def _push_form(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["controller_id"]
        data = call.body.get("file")
        if isinstance(data, str):
            data = data.encode()
        if not data:
            raise Refused(400, "file_required", "choose a config file to push")
        name = str(call.body.get("name") or "config").strip() or "config"
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name):
            raise Refused(400, "invalid_name", "file name: expected 1-128 letters, digits, '.', '_', '-'")
        return await self._push(call, ctx, await self.service.unit(ctx.target), data, name)

    @page_route("GET", S + "/{controller_id}/files/{file_id}", role="operator", params=(CID, FILE_ID),
                summary="Download one of the unit's files")
    @audited("gate.file.download", change=False)
    async def file_page(self, call: Call, ctx: Context) -> Any:
        ctx.target = call.params["file_id"]
        unit = await self.service.unit(call.params["controller_id"])
        record, parts = await self.service.read_file(unit, call.params["file_id"])
        return StreamedBlob(parts, int(record.size or 0), record.name)
