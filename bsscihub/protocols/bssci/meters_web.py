"""The meter routes of the mioty family: REST under /api/v1/mioty/meters and the admin pages /mioty/meters.
A mixin of MiotyWeb; keys go in (operator) and never come out, readings and a chart of any numeric field."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from bsscihub.web.errors import ApiError, not_found, running_service
from bsscihub.web.routing import NO_CONTENT, PAGING, Accepted, Call, Page, Param, Redirect, api_route, page, page_route
from bsscihub.web.schema import ANY_OBJECT, hexstr, obj, page_of, string

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = ["MeterRoutes", "meter_points", "numeric_fields"]

METER = Param("meter", string("manufacturer code, dash, 8-digit meter ID", pattern=r"^[A-Za-z]{3}-[0-9A-Fa-f]{8}$",
                              **{"x-expected": "e.g. dme-81795246"}),
              "the meter", example="dme-81795246")
METER_VIEW = obj({"meter": {"type": "string"}, "hasKey": {"type": "boolean"}}, ("meter",), closed=False)
METER_KEY = obj({"key": hexstr(32, "the meter's AES-128 key"), "name": string("a name for the meter", maxLength=64)},
                ("key",))
METER_DOWNLINK = obj({"data": string("frame as hex", minLength=2, maxLength=510, pattern=r"^([0-9a-fA-F]{2})+$",
                                     **{"x-expected": "an even number of hex digits"})}, ("data",))


def _seconds(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def numeric_fields(readings: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(field, unit) of every numeric value in the readings, in the order first met."""
    found: dict[str, str | None] = {}
    for reading in readings:
        for record in reading.get("records") or ():
            value = record.get("value")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and record["field"] not in found:
                found[record["field"]] = record.get("unit")
    return list(found.items())


def meter_points(readings: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """(time, [value of `field`]) per reading, oldest first, for the meter page's chart."""
    points = []
    for reading in readings:
        t = _seconds(reading.get("time"))
        value = (reading.get("values") or {}).get(field)
        if t is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            points.append({"t": t, "v": [value]})
    return sorted(points, key=lambda p: p["t"])


class MeterRoutes:
    """Meter routes; the class using it has `hub`, `_invoke` and `_search`."""

    hub: Hub

    @property
    def vm(self) -> Any:
        from bsscihub.protocols.bssci.api import _NotFoundMapping

        return _NotFoundMapping(running_service(self.hub, "mioty").vm)

    async def _meter_or_404(self, call: Call) -> dict[str, Any]:
        meter = await self.vm.get_meter(call.params["meter"])
        if meter is None:
            raise not_found(f"meter {call.params['meter'].lower()}")
        return dict(meter)

    @api_route("GET", "/meters", role="viewer", summary="List wireless M-Bus meters",
               query=(Param("q", string("part of the meter id or name", maxLength=64)), *PAGING),
               response=page_of(METER_VIEW))
    async def list_meters(self, call: Call) -> Any:
        q = call.query
        result = await self.vm.list_meters(q.get("q") or None, q["limit"], q["offset"])
        return page(result["items"], result["total"], q["limit"], q["offset"])

    @api_route("GET", "/meters/{meter}", role="viewer", summary="One meter with its last reading", params=(METER,),
               response=METER_VIEW, errors=(404,))
    async def get_meter(self, call: Call) -> Any:
        return await self._meter_or_404(call)

    @api_route("PUT", "/meters/{meter}/key", role="operator", summary="Set the meter's AES key (never shown again)",
               params=(METER,), body=METER_KEY, response=METER_VIEW, audit="mioty.meter.key_set",
               audit_target="meter", body_example={"key": "000102030405060708090a0b0c0d0e0f"})
    async def set_meter_key(self, call: Call) -> Any:
        name = call.body.get("name")
        result = await self.vm.set_meter_key(call.params["meter"], call.body["key"], name=name)
        call.detail = {"name": name} if name is not None else {}
        return result

    @api_route("DELETE", "/meters/{meter}/key", role="operator", summary="Remove the meter's key", params=(METER,),
               response=METER_VIEW, errors=(404,), audit="mioty.meter.key_clear", audit_target="meter")
    async def clear_meter_key(self, call: Call) -> Any:
        await self._meter_or_404(call)
        return await self.vm.set_meter_key(call.params["meter"], None)

    @api_route("DELETE", "/meters/{meter}", role="operator", summary="Forget a meter (heard again, it comes back)",
               params=(METER,), status=204, errors=(404,), audit="mioty.meter.delete", audit_target="meter")
    async def delete_meter(self, call: Call) -> Any:
        if not await self.vm.remove_meter(call.params["meter"]):
            raise not_found(f"meter {call.params['meter'].lower()}")
        return NO_CONTENT

    @api_route("GET", "/meters/{meter}/readings", role="viewer", summary="Readings, newest first", params=(METER,),
               errors=(404,),
               query=(Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                      Param("before", {"type": "number", "minimum": 0}, "only readings before this time (epoch s)")),
               response=page_of(ANY_OBJECT))
    async def meter_readings(self, call: Call) -> Any:
        found = await self.vm.readings(call.params["meter"], call.query["limit"], call.query.get("before"))
        return page(found["items"], len(found["items"]), call.query["limit"], 0)

    @api_route("GET", "/meters/{meter}/downlinks", role="viewer", summary="Frames queued for the meter and sent",
               params=(METER,), errors=(404,),
               response=page_of(ANY_OBJECT))
    async def meter_downlinks(self, call: Call) -> Any:
        found = await self.vm.downlinks(call.params["meter"])
        return page(found["items"], len(found["items"]), len(found["items"]), 0)

    @api_route("POST", "/meters/{meter}/downlinks", role="operator",
               summary="Queue a frame for the meter (vm.dlData with its next uplink)", params=(METER,),
               body=METER_DOWNLINK, status=202, response=ANY_OBJECT, errors=(404, 409),
               audit="mioty.meter.downlink", audit_target="meter")
    async def meter_downlink(self, call: Call) -> Any:
        from bsscihub.errors import CommandError
        from bsscihub.protocols.bssci.actions import UnknownDevice

        try:
            result = await running_service(self.hub, "mioty").vm.queue_downlink(
                call.params["meter"], call.body["data"], actor=call.actor)
        except UnknownDevice as e:
            raise ApiError(404, "not_found", str(e)) from None
        except CommandError as e:
            raise ApiError(409, "conflict", str(e)) from None
        call.detail = {"dlId": result["dlId"], "bytes": len(call.body["data"]) // 2}
        return Accepted(result)

    # -- pages

    @page_route("GET", "/meters", role="viewer", summary="Meters")
    async def meters_page(self, call: Call) -> Any:
        meters, q = await self._search(call, "list_meters")  # type: ignore[attr-defined]
        return Page("mioty/meters.html", {"meters": meters, "q": q, "title": "Meters"})

    @page_route("GET", "/meters/{meter}", role="viewer", summary="Meter", params=(METER,))
    async def meter_page(self, call: Call) -> Any:
        invoke = self._invoke  # type: ignore[attr-defined]
        meter = await invoke(call, "get_meter", params=call.params)
        readings = (await invoke(call, "meter_readings", params=call.params, query={"limit": "500"}))["items"]
        fields = numeric_fields(readings)
        chosen = call.query.get("field") or (fields[0][0] if fields else "")
        units = dict(fields)
        if chosen not in units:
            chosen = fields[0][0] if fields else ""
        label = f"{chosen} ({units[chosen]})" if units.get(chosen) else chosen
        ident = meter["meter"]
        return Page("mioty/meter.html", {
            "meter": meter, "ident": ident, "readings": readings[:100], "fields": fields, "field": chosen,
            "points": meter_points(readings, chosen), "series": [{"label": label, "path": f"values.{chosen}"}],
            "last": meter.get("lastReading") or {}, "title": f"Meter {ident}",
        })  # fmt: skip

    @page_route("POST", "/meters/{meter}/key", role="operator", summary="Set or remove the meter's key",
                params=(METER,))
    async def meter_key_page(self, call: Call) -> Any:
        ident = call.params["meter"].lower()
        back = f"/mioty/meters/{ident}"
        try:
            if call.body.get("clear"):
                await self._invoke(call, "clear_meter_key", params=call.params)  # type: ignore[attr-defined]
                return Redirect(back, flash="key removed")
            body = {"key": call.body.get("key", "").strip()}
            if call.body.get("name", "").strip():
                body["name"] = call.body["name"].strip()
            await self._invoke(call, "set_meter_key", params=call.params, body=body)  # type: ignore[attr-defined]
        except ApiError as e:
            return Redirect(back if await self.vm.get_meter(ident) else "/mioty/meters", error=e.message)
        return Redirect(back, flash="key set; the next reading is decrypted with it")

    @page_route("POST", "/meters", role="operator", summary="Add a meter with its key")
    async def add_meter_page(self, call: Call) -> Any:
        ident = call.body.get("meter", "").strip().lower()
        try:
            await self._invoke(call, "set_meter_key", params={"meter": ident},  # type: ignore[attr-defined]
                               body={"key": call.body.get("key", "").strip()})
        except ApiError as e:
            return Redirect("/mioty/meters", error=e.message)
        return Redirect(f"/mioty/meters/{ident}", flash=f"meter {ident} added with its key")

    @page_route("POST", "/meters/{meter}/downlink", role="operator", summary="Queue a frame for the meter",
                params=(METER,))
    async def meter_downlink_page(self, call: Call) -> Any:
        back = f"/mioty/meters/{call.params['meter'].lower()}"
        try:
            await self._invoke(call, "meter_downlink", params=call.params,  # type: ignore[attr-defined]
                               body={"data": call.body.get("data", "").strip()})
        except ApiError as e:
            return Redirect(back, error=e.message)
        return Redirect(back, flash="queued: it goes out with the meter's next uplink")
