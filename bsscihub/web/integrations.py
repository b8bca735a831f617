"""REST routes (/api/v1/alerts, /alert-rules, /webhooks) and admin pages (/alerts, /webhooks) of alerts and webhooks.

Mounted by the web app from hub.extensions; operators manage, viewers read alerts, webhooks are for operators.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from zope.interface import implementer

from bsscihub.alerts import CONDITIONS, AlertService
from bsscihub.config import duration
from bsscihub.errors import CommandError
from bsscihub.family import IDashboardSummary, IWebExtension
from bsscihub.web.errors import ApiError, not_found, unavailable
from bsscihub.web.routing import (
    NO_CONTENT,
    PAGING,
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
from bsscihub.web.schema import OPT_TIME, TIME, obj, page_of, string
from bsscihub.webhooks import WebhookService

if TYPE_CHECKING:
    from bsscihub.hub import Hub

RULE_ID = Param("id", {"type": "integer", "minimum": 1}, "rule id", example=1)
HOOK_ID = Param("id", {"type": "integer", "minimum": 1}, "webhook id", example=1)
NAME = string("a name for people", minLength=1, maxLength=64)
NUMBER_OR_NULL = {"type": "number", "nullable": True}
WORD = string("", maxLength=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")

RULE = obj({"id": {"type": "integer"}, "name": {"type": "string"}, "family": {"type": "string"},
            "kind": {"type": "string", "nullable": True}, "target": {"type": "string", "nullable": True},
            "condition": {"type": "string", "enum": list(CONDITIONS)}, "threshold": NUMBER_OR_NULL,
            "after": NUMBER_OR_NULL, "hysteresis": {"type": "number"}, "enabled": {"type": "boolean"},
            "createdAt": TIME, "createdBy": {"type": "string"}},
           ("id", "name", "family", "condition", "enabled"), closed=False)
RULE_BODY = obj({
    "name": NAME,
    "family": string("the family: mioty, ble, devices, gate", maxLength=32),
    "kind": {**WORD, "description": "the kind of thing within the family (bs, ep, meter, gw, node, device, unit);"
             " empty: every kind"},
    "target": {**WORD, "description": "one device's id (EUI, MAC, device id, controller id); empty: every one"},
    "condition": {"type": "string", "enum": list(CONDITIONS)},
    "threshold": {"type": "number", "minimum": -1000, "maximum": 1000,
                  "description": "battery_below: the level (as the device reports it); signal_below: RSSI in dBm"},
    "after": {"type": "number", "minimum": 1, "maximum": 366 * 86400,
              "description": "offline: seconds of silence; without it, offline is what the family reports"},
    "hysteresis": {"type": "number", "minimum": 0, "maximum": 1000,
                   "description": "a threshold alert resolves only once the value is this much above it"},
    "enabled": {"type": "boolean"},
}, ("name", "family", "condition"))
RULE_CHANGES = obj({k: RULE_BODY["properties"][k] for k in ("name", "threshold", "after", "hysteresis", "enabled")})
ALERT = obj({"ruleId": {"type": "integer"}, "rule": {"type": "string"}, "family": {"type": "string"},
             "kind": {"type": "string"}, "id": {"type": "string"}, "condition": {"type": "string"},
             "state": {"type": "string", "enum": ["firing", "resolved"]}, "value": NUMBER_OR_NULL,
             "threshold": NUMBER_OR_NULL, "since": TIME, "lastSeen": OPT_TIME, "time": TIME},
            ("ruleId", "family", "kind", "id", "condition", "state", "since"), closed=False)
HISTORY = obj({"time": TIME, "ruleId": {"type": "integer"}, "rule": {"type": "string"},
               "family": {"type": "string"}, "kind": {"type": "string"}, "id": {"type": "string"},
               "condition": {"type": "string"}, "state": {"type": "string"}, "value": NUMBER_OR_NULL},
              ("time", "ruleId", "state"), closed=False)
NAMES = {"type": "array", "maxItems": 32, "items": string("", minLength=1, maxLength=64)}
HOOK = obj({"id": {"type": "integer"}, "name": {"type": "string"}, "url": {"type": "string"},
            "families": NAMES, "events": NAMES, "enabled": {"type": "boolean"}, "createdAt": TIME,
            "queued": {"type": "integer"}, "delivered": {"type": "integer"}, "failures": {"type": "integer"},
            "lastAttempt": OPT_TIME, "lastSuccess": OPT_TIME,
            "lastStatus": {"type": "string", "nullable": True}, "lastError": {"type": "string", "nullable": True},
            "nextRetry": OPT_TIME, "dropped": {"type": "integer"}},
           ("id", "name", "url", "families", "events", "enabled", "queued"), closed=False)
HOOK_BODY = obj({
    "name": NAME,
    "url": string("http:// or https:// URL events are POSTed to", minLength=8, maxLength=2048),
    "families": {**NAMES, "description": "families whose events are sent (and alerts); empty: all"},
    "events": {**NAMES, "description": "event kinds (e.g. up, state, alert, or family.kind); empty: all"},
    "secret": string("signing secret (default: generated); shown once, never again", minLength=16,
                     maxLength=256),
    "enabled": {"type": "boolean"},
}, ("name", "url"))
HOOK_CHANGES = obj({k: HOOK_BODY["properties"][k] for k in ("name", "url", "families", "events", "enabled")})


S = TypeVar("S", AlertService, WebhookService)
T = TypeVar("T")


def _running(service: S) -> S:
    if not service.running:
        raise unavailable(f"{service.name} are not running")
    return service


# The CRUD shapes alert rules and webhooks share: lists by id, 404 for an unknown id, 400 for a refusal.


def _listed(items: Iterable[Any], call: Call) -> Any:
    """One page of `items` (rules, webhooks) in id order, as JSON."""
    ordered = sorted(items, key=lambda item: item.id)
    limit, offset = call.query["limit"], call.query["offset"]
    return page([item.to_json() for item in ordered[offset : offset + limit]], len(ordered), limit, offset)


def _found(item: T | None, what: str, call: Call) -> T:
    if item is None:
        raise not_found(f"{what} {call.params['id']}")
    return item


async def _checked(work: Awaitable[T]) -> T:
    """The service's answer; its CommandError (a refused body) as a 400."""
    try:
        return await work
    except CommandError as e:
        raise ApiError(400, "invalid", str(e)) from None


async def _delete_from_page(call: Call, route: str, back: str, done: str) -> Redirect:
    try:
        await call.invoke(route, params={"id": str(call.params["id"])})
    except ApiError as e:
        return Redirect(back, error=e.message)
    return Redirect(back, flash=done)


@implementer(IWebExtension, IDashboardSummary)
class AlertsWeb:
    tag = "alerts"
    nav = [NavItem("Alerts", "/alerts", "viewer", "alert")]
    templates = None  # alerts.html is with the core's templates

    def __init__(self, hub: Hub, service: AlertService) -> None:
        self.hub = hub
        self._service = service

    @property
    def service(self) -> AlertService:
        return _running(self._service)

    async def summary(self) -> dict[str, Any]:
        return {"alerts": {"label": "Active alerts", "value": len(self.service.active), "href": "/alerts"}}

    @api_route("GET", "/alerts", role="viewer", summary="Alerts firing now, newest first", tag="alerts",
               query=PAGING, response=page_of(ALERT))
    def list_alerts(self, call: Call) -> Any:
        found = self.service.active_alerts()
        limit, offset = call.query["limit"], call.query["offset"]
        return page(found[offset : offset + limit], len(found), limit, offset)

    @api_route("GET", "/alerts/history", role="viewer", summary="Every alert transition, newest first",
               tag="alerts", query=PAGING, response=page_of(HISTORY))
    async def alert_history(self, call: Call) -> Any:
        limit, offset = call.query["limit"], call.query["offset"]
        items, total = await self.service.history(limit, offset)
        return page(items, total, limit, offset)

    @api_route("GET", "/alert-rules", role="viewer", summary="Alert rules", tag="alerts", query=PAGING,
               response=page_of(RULE))
    def list_rules(self, call: Call) -> Any:
        return _listed(self.service.rules.values(), call)

    @api_route("POST", "/alert-rules", role="operator", summary="Add an alert rule (per family, kind or device)",
               tag="alerts", status=201, body=RULE_BODY, response=RULE, errors=(400,), audit="alert.rule.add",
               body_example={"name": "sensor silent", "family": "mioty", "kind": "ep", "condition": "offline",
                             "after": 3600})
    async def add_rule(self, call: Call) -> Any:
        rule = await _checked(self.service.add_rule(call.body, call.actor))
        call.target, call.detail = str(rule.id), rule.to_json()
        return Created(rule.to_json(), location=f"/api/v1/alert-rules/{rule.id}")

    @api_route("GET", "/alert-rules/{id}", role="viewer", summary="One alert rule", tag="alerts",
               params=(RULE_ID,), response=RULE, errors=(404,))
    def get_rule(self, call: Call) -> Any:
        return _found(self.service.rules.get(call.params["id"]), "alert rule", call).to_json()

    @api_route("PATCH", "/alert-rules/{id}", role="operator", summary="Change an alert rule (name, threshold,"
               " silence, hysteresis, on/off)", tag="alerts", params=(RULE_ID,), body=RULE_CHANGES, response=RULE,
               errors=(400, 404), audit="alert.rule.change", audit_target="id")
    async def change_rule(self, call: Call) -> Any:
        rule = _found(await _checked(self.service.update_rule(call.params["id"], call.body)), "alert rule", call)
        call.detail = dict(call.body)
        return rule.to_json()

    @api_route("DELETE", "/alert-rules/{id}", role="operator", summary="Delete an alert rule (its alerts end)",
               tag="alerts", params=(RULE_ID,), status=204, errors=(404,), audit="alert.rule.delete",
               audit_target="id")
    async def delete_rule(self, call: Call) -> Any:
        _found(await self.service.delete_rule(call.params["id"]) or None, "alert rule", call)
        return NO_CONTENT

    # -- pages

    @page_route("GET", "/alerts", role="viewer", summary="Alerts: firing now, rules, history")
    async def alerts_page(self, call: Call) -> Any:
        service = self.service
        history, _ = await service.history(50, 0)
        return Page("alerts.html", {
            "title": "Alerts", "active": service.active_alerts(),
            "rules": [r.to_json() for r in sorted(service.rules.values(), key=lambda r: r.id)],
            "history": history, "families": sorted(self.hub.families), "conditions": CONDITIONS,
        })

    @page_route("POST", "/alerts/rules", role="operator", summary="Add an alert rule")
    async def add_rule_page(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in ("name", "family", "kind", "target",
                                                                          "condition")}
        body = {k: v for k, v in body.items() if v}
        try:
            if str(form.get("after", "")).strip():
                body["after"] = duration(str(form["after"]).strip())
            for key in ("threshold", "hysteresis"):
                if str(form.get(key, "")).strip():
                    body[key] = float(str(form[key]).strip())
        except ValueError as e:
            return Redirect("/alerts", error=f"not a number or duration: {e}")
        try:
            rule = await call.invoke("add_rule", body=body)
        except ApiError as e:
            return Redirect("/alerts", error=e.message)
        return Redirect("/alerts", flash=f"rule {rule.value['name']} added")

    @page_route("POST", "/alerts/rules/{id}/delete", role="operator", summary="Delete an alert rule",
                params=(RULE_ID,))
    async def delete_rule_page(self, call: Call) -> Any:
        return await _delete_from_page(call, "delete_rule", "/alerts", "rule deleted")


@implementer(IWebExtension)
class WebhooksWeb:
    tag = "webhooks"
    nav = [NavItem("Webhooks", "/webhooks", "operator", "link")]
    templates = None  # webhooks.html is with the core's templates

    def __init__(self, hub: Hub, service: WebhookService) -> None:
        self.hub = hub
        self._service = service

    @property
    def service(self) -> WebhookService:
        return _running(self._service)

    @api_route("GET", "/webhooks", role="operator", summary="Webhooks with their delivery status", tag="webhooks",
               query=PAGING, response=page_of(HOOK))
    def list_hooks(self, call: Call) -> Any:
        return _listed(self.service.hooks.values(), call)

    @api_route("POST", "/webhooks", role="operator", summary="Add a webhook; its signing secret is shown once",
               tag="webhooks", status=201, body=HOOK_BODY, errors=(400,), audit="webhook.add",
               response=obj({"webhook": HOOK, "secret": {"type": "string"}}, ("webhook", "secret"), closed=False),
               body_example={"name": "crm", "url": "https://example.net/hook", "families": ["devices"],
                             "events": ["up"]})
    async def add_hook(self, call: Call) -> Any:
        hook, secret = await _checked(self.service.add(call.body, call.actor))
        view = hook.to_json()
        call.target = str(hook.id)
        call.detail = {k: view[k] for k in ("name", "url", "families", "events", "enabled")}
        return Created({"webhook": view, "secret": secret}, location=f"/api/v1/webhooks/{hook.id}")

    @api_route("GET", "/webhooks/{id}", role="operator", summary="One webhook with its delivery status",
               tag="webhooks", params=(HOOK_ID,), response=HOOK, errors=(404,))
    def get_hook(self, call: Call) -> Any:
        return _found(self.service.hooks.get(call.params["id"]), "webhook", call).to_json()

    @api_route("PATCH", "/webhooks/{id}", role="operator", summary="Change a webhook (the secret stays)",
               tag="webhooks", params=(HOOK_ID,), body=HOOK_CHANGES, response=HOOK, errors=(400, 404),
               audit="webhook.change", audit_target="id")
    async def change_hook(self, call: Call) -> Any:
        hook = _found(await _checked(self.service.update(call.params["id"], call.body)), "webhook", call)
        call.detail = dict(call.body)
        return hook.to_json()

    @api_route("DELETE", "/webhooks/{id}", role="operator", summary="Delete a webhook and its queued events",
               tag="webhooks", params=(HOOK_ID,), status=204, errors=(404,), audit="webhook.delete",
               audit_target="id")
    async def delete_hook(self, call: Call) -> Any:
        _found(await self.service.delete(call.params["id"]) or None, "webhook", call)
        return NO_CONTENT

    # -- pages

    @page_route("GET", "/webhooks", role="operator", summary="Webhooks and their delivery status")
    def hooks_page(self, call: Call) -> Any:
        return self._hooks_page(secret=None)

    def _hooks_page(self, **extra: Any) -> Page:
        hooks = [h.to_json() for h in sorted(self.service.hooks.values(), key=lambda h: h.id)]
        return Page("webhooks.html", {"title": "Webhooks", "hooks": hooks,
                                      "families": [*sorted(self.hub.families), "alerts"], **extra})

    @page_route("POST", "/webhooks", role="operator", summary="Add a webhook")
    async def add_hook_page(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {"name": str(form.get("name", "")).strip(), "url": str(form.get("url", "")).strip()}
        for key in ("families", "events"):
            words = [w.strip() for w in str(form.get(key, "")).split(",") if w.strip()]
            if words:
                body[key] = words
        try:
            created = await call.invoke("add_hook", body=body)
        except ApiError as e:
            return Redirect("/webhooks", error=e.message)
        # The secret is shown on this one answer only.
        return self._hooks_page(secret=created.value["secret"], created=created.value["webhook"])

    @page_route("POST", "/webhooks/{id}/delete", role="operator", summary="Delete a webhook", params=(HOOK_ID,))
    async def delete_hook_page(self, call: Call) -> Any:
        return await _delete_from_page(call, "delete_hook", "/webhooks", "webhook deleted")
