"""The blueprint routes of the mioty family: REST under /api/v1/mioty/blueprints, a sensor's Type EUI, the admin page.
A mixin of MiotyWeb, over the service's BlueprintBook; also the sensor page's chart of any decoded numeric field."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bsscihub.web.errors import ApiError, not_found, running_service
from bsscihub.web.routing import NO_CONTENT, Call, Created, Page, Param, Redirect, api_route, page_route
from bsscihub.web.schema import ANY_OBJECT, hexstr, obj

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = ["BlueprintRoutes", "decoded_fields", "decoded_points"]

TYPE = Param("typeEui", hexstr(16, "Type EUI"), "the blueprint's Type EUI", example="70b3d5677000a001")
_EP = Param("eui", hexstr(16, "EUI-64"), "end point (sensor) EUI-64", example="0011223344556677")
BLUEPRINT_VIEW = obj({"typeEui": {"type": "string"}, "name": {"type": ["string", "null"]},
                      "formats": {"type": "array", "items": {"type": "integer"}}}, ("typeEui",), closed=False)
SENSOR_TYPE = obj({"typeEui": {"oneOf": [hexstr(16, "Type EUI"), {"type": "null"}]}}, ("typeEui",))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def decoded_fields(uplinks: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(name, unit) of every numeric decoded value in the uplinks, in the order first met."""
    found: dict[str, str | None] = {}
    for up in uplinks:
        for name, item in (up.get("decoded") or {}).items():
            if isinstance(item, dict) and _number(item.get("value")) and name not in found:
                found[name] = item.get("unit")
    return list(found.items())


def decoded_points(uplinks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """(time, [decoded value `name`]) per uplink that has it, oldest first, for the sensor page's chart."""
    from bsscihub.protocols.bssci.api import _uplink_time

    points = []
    for up in uplinks:
        t = _uplink_time(up)
        item = (up.get("decoded") or {}).get(name)
        if t is not None and isinstance(item, dict) and _number(item.get("value")):
            points.append({"t": t, "v": [item["value"]]})
    return sorted(points, key=lambda p: p["t"])


class BlueprintRoutes:
    """Blueprint routes; the class using it has `hub` and `_invoke`."""

    hub: Hub

    @property
    def book(self) -> Any:
        return running_service(self.hub, "mioty").blueprints

    @api_route("GET", "/blueprints", role="viewer", summary="Imported mioty Blueprints",
               response=obj({"items": {"type": "array", "items": BLUEPRINT_VIEW}}, ("items",)))
    async def list_blueprints(self, call: Call) -> Any:
        return {"items": self.book.list()}

    @api_route("POST", "/blueprints", role="operator", summary="Import a mioty Blueprint (replaces one of its type)",
               status=201, body=ANY_OBJECT, max_body=512 << 10, response=BLUEPRINT_VIEW, errors=(400,),
               audit="mioty.blueprint.import",
               description="The body is the blueprint document itself: version, typeEui, meta, component, uplink"
               " (formats by id, each a payload list of fields with size, type, unit, func, condition).",
               body_example={"version": "1.0", "typeEui": "70b3d5677000a001", "meta": {"name": "Thermometer"},
                             "uplink": [{"id": 0, "payload": [{"name": "temperature", "size": 16, "type": "int",
                                                               "func": "$/10", "unit": "°C"}]}]})
    async def import_blueprint(self, call: Call) -> Any:
        from bsscihub.protocols.bssci.blueprints import BlueprintError

        try:
            blueprint = await self.book.add(call.body, call.actor)
        except BlueprintError as e:
            raise ApiError(400, "invalid_blueprint", f"blueprint: {e}") from None
        call.target, call.detail = blueprint.type_eui, {"name": blueprint.name}
        return Created(self.book.get(blueprint.type_eui), location=f"/api/v1/mioty/blueprints/{blueprint.type_eui}")

    @api_route("GET", "/blueprints/{typeEui}", role="viewer", summary="One blueprint with its document",
               params=(TYPE,), response=BLUEPRINT_VIEW, errors=(404,))
    async def get_blueprint(self, call: Call) -> Any:
        found = self.book.get(call.params["typeEui"])
        if found is None:
            raise not_found(f"blueprint {call.params['typeEui'].lower()}")
        return found

    @api_route("DELETE", "/blueprints/{typeEui}", role="operator", summary="Remove a blueprint", params=(TYPE,),
               status=204, errors=(404,), audit="mioty.blueprint.delete", audit_target="typeEui")
    async def delete_blueprint(self, call: Call) -> Any:
        if not await self.book.remove(call.params["typeEui"]):
            raise not_found(f"blueprint {call.params['typeEui'].lower()}")
        return NO_CONTENT

    @api_route("PUT", "/sensors/{eui}/type", role="operator", summary="Give a sensor a Type EUI (null: none)",
               params=(_EP,), body=SENSOR_TYPE, response=ANY_OBJECT, errors=(404,), audit="mioty.sensor.type",
               audit_target="eui", body_example={"typeEui": "70b3d5677000a001"})
    async def set_sensor_type(self, call: Call) -> Any:
        service = running_service(self.hub, "mioty")
        eui = call.params["eui"].lower()
        if await service.get_sensor(eui) is None:
            raise not_found(f"sensor {eui}")
        t = call.body["typeEui"]
        await self.book.set_type(eui, t.lower() if t else None)
        call.detail = {"typeEui": t.lower() if t else None}
        return await service.get_sensor(eui)

    # -- pages

    @page_route("GET", "/blueprints", role="viewer", summary="Blueprints")
    async def blueprints_page(self, call: Call) -> Any:
        items = (await self._invoke(call, "list_blueprints"))["items"]  # type: ignore[attr-defined]
        return Page("mioty/blueprints.html", {"blueprints": items, "title": "Blueprints"})

    @page_route("POST", "/blueprints", role="operator", summary="Import a blueprint", max_body=512 << 10)
    async def import_blueprint_page(self, call: Call) -> Any:
        raw = call.body.get("file", b"")
        try:
            doc = json.loads(raw)
        except (ValueError, TypeError):
            return Redirect("/mioty/blueprints", error="the file is not valid JSON (expected a blueprint)")
        try:
            created = await self._invoke(call, "import_blueprint", body=doc)  # type: ignore[attr-defined]
        except ApiError as e:
            return Redirect("/mioty/blueprints", error=e.message)
        body = getattr(created, "value", created)
        return Redirect("/mioty/blueprints", flash=f"blueprint {body.get('typeEui')} imported")

    @page_route("POST", "/blueprints/{typeEui}/delete", role="operator", summary="Remove a blueprint", params=(TYPE,))
    async def delete_blueprint_page(self, call: Call) -> Any:
        try:
            await self._invoke(call, "delete_blueprint", params=call.params)  # type: ignore[attr-defined]
        except ApiError as e:
            return Redirect("/mioty/blueprints", error=e.message)
        return Redirect("/mioty/blueprints", flash=f"blueprint {call.params['typeEui'].lower()} removed")

    @page_route("POST", "/sensors/{eui}/type", role="operator", summary="Set the sensor's Type EUI", params=(_EP,))
    async def sensor_type_page(self, call: Call) -> Any:
        eui = call.params["eui"].lower()
        t = call.body.get("typeEui", "").strip().lower() or None
        try:
            await self._invoke(call, "set_sensor_type", params=call.params,  # type: ignore[attr-defined]
                               body={"typeEui": t})
        except ApiError as e:
            return Redirect(f"/mioty/sensors/{eui}", error=e.message)
        return Redirect(f"/mioty/sensors/{eui}", flash=f"type {t}" if t else "type removed")
