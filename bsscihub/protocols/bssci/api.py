"""The mioty family's REST routes (/api/v1/mioty/...) and admin pages (/mioty/...), over the family service.

Mounted by the web layer through MiotyFamily.web_routes; roles and audit come from the route declarations.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from zope.interface import implementer

from bsscihub.family import ICertificateRevocation, IDashboardSummary, IWebExtension
from bsscihub.protocols.bssci.blueprints_web import BlueprintRoutes, decoded_fields, decoded_points
from bsscihub.protocols.bssci.meters_web import MeterRoutes
from bsscihub.web.errors import ApiError, not_found, running_service
from bsscihub.web.routing import (
    NO_CONTENT,
    PAGING,
    Accepted,
    Call,
    Created,
    Download,
    NavItem,
    Page,
    Param,
    Redirect,
    api_route,
    page,
    page_route,
)
from bsscihub.web.schema import ANY_OBJECT, hexstr, obj, page_of, string

if TYPE_CHECKING:
    from bsscihub.hub import Hub
    from bsscihub.protocols.bssci.service import MiotyService

EUI = hexstr(16, "EUI-64")
NW_KEY = hexstr(32, "network key (AES-128)")
SHORT_ADDR = hexstr(4, "short address")
BS = Param("eui", EUI, "base-station EUI-64", example="70b3d59cd0000001")
EP = Param("eui", EUI, "end point (sensor) EUI-64", example="0011223344556677")
QUE_ID = Param("queId", {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}, "the downlink's queue id",
               example=42)
ENDPOINT = obj({"eui": EUI, "nwKey": NW_KEY, "shortAddr": SHORT_ADDR, "bidi": {"type": "boolean"}},
               ("eui", "nwKey", "shortAddr", "bidi"))
ATTACH = obj({"nwKey": NW_KEY, "shortAddr": SHORT_ADDR, "bidi": {"type": "boolean"}}, ("nwKey", "shortAddr", "bidi"))
DOWNLINK = obj(
    {
        "data": string("payload as hex", minLength=2, maxLength=2048, pattern=r"^([0-9a-fA-F]{2})+$",
                       **{"x-expected": "an even number of hex digits"}),
        "format": {"type": "integer", "minimum": 0, "maximum": 255},
        "prio": {"type": "number", "minimum": 0},
        "responseExp": {"type": "boolean"},
    },
    ("data",),
)
SENSOR = obj({"epEui": {"type": "string"}}, (), closed=False)
BASE_STATION = obj({"bsEui": {"type": "string"}}, (), closed=False)
_SECRET_FIELDS = ("nwKey", "nw_key")


def _public(sensor: Any) -> Any:
    """Sensor views never carry the network key; only the export (admin) does."""
    if isinstance(sensor, dict):
        return {k: v for k, v in sensor.items() if k not in _SECRET_FIELDS}
    return sensor


def _normalize_page(result: Any) -> tuple[list[Any], int | None]:
    if isinstance(result, dict) and "items" in result:
        return list(result["items"]), result.get("total")
    if isinstance(result, tuple) and len(result) == 2:
        return list(result[0]), int(result[1])
    return list(result or []), None


def _eui_of(item: Any, *keys: str) -> str:
    for key in keys:
        if isinstance(item, dict) and item.get(key):
            return str(item[key])
    return ""


def _uplink_time(uplink: dict[str, Any]) -> float | None:
    rx = uplink.get("rxTime")
    if isinstance(rx, (int, float)) and rx > 0:
        return float(rx) / 1e9
    text = uplink.get("time")
    if isinstance(text, str):
        try:
            return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def chart_points(uplinks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(time, [best RSSI, best SNR]) per uplink, oldest first, for the sensor page's chart."""
    points = []
    for up in uplinks:
        t = _uplink_time(up)
        receivers = up.get("receivers") or [{}]
        best = receivers[0] if isinstance(receivers[0], dict) else {}
        if t is not None:
            points.append({"t": t, "v": [best.get("rssi"), best.get("snr")]})
    return sorted(points, key=lambda p: p["t"])


class _NotFoundMapping:
    """Wraps the service: its UnknownDevice (a CommandError) becomes the API's 404."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._service, name)
        if not callable(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            from bsscihub.protocols.bssci.service import UnknownDevice

            try:
                return await method(*args, **kwargs)
            except UnknownDevice as e:
                raise ApiError(404, "not_found", str(e)) from None

        return call


@implementer(IWebExtension, IDashboardSummary, ICertificateRevocation)
class MiotyWeb(MeterRoutes, BlueprintRoutes):
    """REST routes and pages of the mioty family; every call goes to `hub.services["mioty"]`
    (the meter routes come from meters_web.MeterRoutes, the blueprint routes from blueprints_web)."""

    nav = [
        NavItem("Base stations", "/mioty/base-stations", "viewer", "bs"),
        NavItem("Sensors", "/mioty/sensors", "viewer", "sensor"),
        NavItem("Meters", "/mioty/meters", "viewer", "sensor"),
        NavItem("Blueprints", "/mioty/blueprints", "viewer", "sensor"),
        NavItem("Network", "/mioty/network", "viewer", "bs"),
    ]
    templates = Path(__file__).parent / "templates"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def service(self) -> Any:
        return _NotFoundMapping(running_service(self.hub, "mioty"))

    async def _known_station(self, call: Call) -> str:
        """The route's base-station EUI in lower case; 404 when the hub does not know the station."""
        eui = call.params["eui"].lower()
        if await self.service.get_base_station(eui) is None:
            raise not_found(f"base station {eui}")
        return eui

    async def _known_sensor(self, call: Call) -> str:
        """The route's sensor EUI in lower case; 404 when the hub does not know the sensor."""
        eui = call.params["eui"].lower()
        if await self.service.get_sensor(eui) is None:
            raise not_found(f"sensor {eui}")
        return eui

    async def certificate_revoked(self, serial: int, reason: str, actor: str) -> None:
        """Called by the web layer when a certificate is revoked: base stations using it are refused."""
        service = cast("MiotyService | None", self.hub.services.get("mioty"))
        if service is not None and service.running:
            await service.revoke_certificate(serial, reason, actor=actor)

    async def summary(self) -> dict[str, Any]:
        stations = list(await self.service.list_base_stations())
        online = sum(1 for s in stations if isinstance(s, dict) and s.get("state") == "online")
        items, total = _normalize_page(await self.service.list_sensors(None, 1, 0))
        return {
            "mioty.baseStations": {"label": "Base stations online", "value": f"{online} / {len(stations)}",
                                   "href": "/mioty/base-stations"},
            "mioty.sensors": {"label": "Sensors", "value": total if total is not None else len(items),
                              "href": "/mioty/sensors"},
            "mioty.meters": {"label": "Meters", "value": (await self.vm.list_meters(None, 0, 0))["total"],
                             "href": "/mioty/meters"},
        }

    # -- base stations

    @api_route("GET", "/base-stations", role="viewer", summary="List base stations",
               query=(Param("q", string("part of EUI, name, vendor or model", maxLength=64)),
                      Param("state", string("online or offline", enum=["online", "offline"])), *PAGING),
               response=page_of(BASE_STATION))
    async def list_base_stations(self, call: Call) -> Any:
        q = call.query
        stations = list(await self.service.list_base_stations())
        if q.get("state"):
            stations = [s for s in stations if s.get("state") == q["state"]]
        if q.get("q"):
            needle = q["q"].lower()
            stations = [s for s in stations if any(needle in str(v).lower() for v in s.values()
                                                   if isinstance(v, (str, int)))]
        return page(stations[q["offset"]: q["offset"] + q["limit"]], len(stations), q["limit"], q["offset"])

    @api_route("GET", "/base-stations/{eui}", role="viewer", summary="One base station", params=(BS,),
               response=BASE_STATION, errors=(404,))
    async def get_base_station(self, call: Call) -> Any:
        station = await self.service.get_base_station(call.params["eui"].lower())
        if station is None:
            raise not_found(f"base station {call.params['eui']}")
        return station

    @api_route("POST", "/base-stations/{eui}/status", role="operator", summary="Poll the base station's status now",
               params=(BS,), response=ANY_OBJECT, errors=(404, 409), audit="mioty.bs.status", audit_target="eui")
    async def poll_status(self, call: Call) -> Any:
        eui = await self._known_station(call)
        result = await self.service.poll_status(eui)
        return result if isinstance(result, dict) else {"bsEui": eui, "requested": True}

    @api_route("POST", "/base-stations/{eui}/revoke", role="admin",
               summary="Revoke a base station: drop it and refuse its certificate",
               params=(BS,), body=obj({"reason": string("why", maxLength=200)}), body_required=False,
               response=ANY_OBJECT, errors=(404, 409), audit="mioty.bs.revoke", audit_target="eui")
    async def revoke_base_station(self, call: Call) -> Any:
        eui = await self._known_station(call)
        reason = (call.body or {}).get("reason", "")
        result = await self.service.revoke_base_station(eui, reason, actor=call.actor)
        call.detail = {"reason": reason}
        return result if isinstance(result, dict) else {"bsEui": eui, "revoked": True, "reason": reason}

    # -- sensors

    @api_route("GET", "/sensors", role="viewer", summary="List and search sensors",
               query=(Param("q", string("part of the EUI", maxLength=64)), *PAGING), response=page_of(SENSOR))
    async def list_sensors(self, call: Call) -> Any:
        q = call.query
        items, total = _normalize_page(await self.service.list_sensors(q.get("q") or None, q["limit"], q["offset"]))
        return page([_public(s) for s in items], total if total is not None else q["offset"] + len(items),
                    q["limit"], q["offset"])

    @api_route("POST", "/sensors", role="operator", summary="Register and attach a sensor", status=201,
               body=obj({"eui": EUI, **ATTACH["properties"]}, ("eui", "nwKey", "shortAddr", "bidi")),
               response=SENSOR, errors=(409,), audit="mioty.sensor.create",
               body_example={"eui": "0011223344556677", "nwKey": "000102030405060708090a0b0c0d0e0f",
                             "shortAddr": "1a2b", "bidi": False})
    async def create_sensor(self, call: Call) -> Any:
        body = call.body
        eui = body["eui"].lower()
        if await self.service.get_sensor(eui) is not None:
            raise ApiError(409, "conflict", f"sensor {eui} exists already; PUT /sensors/{eui} changes it")
        await self.service.attach(eui, body["nwKey"].lower(), body["shortAddr"].lower(), body["bidi"], actor=call.actor)
        call.target, call.detail = eui, {"shortAddr": body["shortAddr"].lower(), "bidi": body["bidi"]}
        return Created(_public(await self.service.get_sensor(eui)) or {"epEui": eui},
                       location=f"/api/v1/mioty/sensors/{eui}")

    @api_route("GET", "/sensors/export", role="admin", summary="Every sensor as endpoints.json (with keys)",
               produces="application/json", response={"type": "array", "items": ENDPOINT})
    async def export_sensors(self, call: Call) -> Any:
        from bsscihub.protocols.bssci import endpoints

        data = await endpoints.export_endpoints(self.hub)
        return Download(json.dumps(data, indent=2).encode(), "endpoints.json", "application/json")

    @api_route("GET", "/sensors/export.csv", role="admin", summary="Every sensor as CSV (with keys)",
               produces="text/csv", description="Columns eui,nwKey,shortAddr,bidi, hex upper-case: the CSV the"
               " earlier open mioty service center exported; the sensors page imports it back.")
    async def export_sensors_csv(self, call: Call) -> Any:
        from bsscihub.protocols.bssci import endpoints

        data = await endpoints.export_endpoints(self.hub)
        return Download(endpoints.dump_csv(data).encode(), "sensors.csv", "text/csv; charset=utf-8")

    @api_route("POST", "/sensors/import", role="operator", summary="Import sensors from endpoints.json",
               body={"type": "array", "items": ENDPOINT, "maxItems": 100_000}, max_body=8 << 20,
               response=obj({"imported": {"type": "integer"}, "errors": {"type": "array", "items": ANY_OBJECT}},
                            ("imported",), closed=False),
               errors=(409,), audit="mioty.sensor.import")
    async def import_sensors(self, call: Call) -> Any:
        from bsscihub.protocols.bssci import endpoints

        try:
            result = await endpoints.import_endpoints(self.hub, call.body, actor=call.actor)
        except endpoints.EndpointsError as e:
            # The schema already checked every entry; what is left is a list naming a sensor twice.
            raise ApiError(409, "conflict", str(e)) from None
        call.detail = {k: result[k] for k in ("imported", "created", "updated", "unchanged") if k in result}
        return result

    @api_route("GET", "/sensors/{eui}", role="viewer", summary="One sensor", params=(EP,), response=SENSOR,
               errors=(404,))
    async def get_sensor(self, call: Call) -> Any:
        sensor = await self.service.get_sensor(call.params["eui"].lower())
        if sensor is None:
            raise not_found(f"sensor {call.params['eui']}")
        return _public(sensor)

    @api_route("PUT", "/sensors/{eui}", role="operator", summary="Change a sensor's keys (re-attaches it)",
               params=(EP,), body=ATTACH, response=SENSOR, errors=(404, 409), audit="mioty.sensor.update",
               audit_target="eui")
    async def update_sensor(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        body = call.body
        await self.service.attach(eui, body["nwKey"].lower(), body["shortAddr"].lower(), body["bidi"], actor=call.actor)
        call.detail = {"shortAddr": body["shortAddr"].lower(), "bidi": body["bidi"]}
        return _public(await self.service.get_sensor(eui))

    @api_route("DELETE", "/sensors/{eui}", role="operator", summary="Detach and remove a sensor", params=(EP,),
               status=204, errors=(404, 409), audit="mioty.sensor.delete", audit_target="eui")
    async def delete_sensor(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        remove = getattr(self.service, "remove_sensor", None)
        if remove is not None:
            await remove(eui, actor=call.actor)
        else:
            await self.service.detach(eui, actor=call.actor)
        return NO_CONTENT

    @api_route("POST", "/sensors/{eui}/attach", role="operator", summary="Attach a sensor (propagate to base stations)",
               params=(EP,), body=ATTACH, response=SENSOR, errors=(409,), audit="mioty.sensor.attach",
               audit_target="eui")
    async def attach(self, call: Call) -> Any:
        eui, body = call.params["eui"].lower(), call.body
        await self.service.attach(eui, body["nwKey"].lower(), body["shortAddr"].lower(), body["bidi"], actor=call.actor)
        call.detail = {"shortAddr": body["shortAddr"].lower(), "bidi": body["bidi"]}
        return _public(await self.service.get_sensor(eui)) or {"epEui": eui}

    @api_route("POST", "/sensors/{eui}/detach", role="operator", summary="Detach a sensor", params=(EP,),
               response=SENSOR, errors=(404, 409), audit="mioty.sensor.detach", audit_target="eui")
    async def detach(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        await self.service.detach(eui, actor=call.actor)
        return _public(await self.service.get_sensor(eui)) or {"epEui": eui}

    @api_route("GET", "/sensors/{eui}/uplinks", role="viewer", summary="Uplink history, newest first",
               params=(EP,), errors=(404,),
               query=(Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                      Param("before", {"type": "number", "minimum": 0}, "only uplinks before this time (epoch s)")),
               response=page_of(ANY_OBJECT))
    async def uplinks(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        history = await self.service.uplink_history(eui, call.query["limit"], call.query.get("before"))
        items, _ = _normalize_page(history)
        return page(items, len(items), call.query["limit"], 0)

    @api_route("GET", "/sensors/{eui}/downlinks", role="viewer", summary="Queued and recent downlinks",
               params=(EP,), errors=(404,),
               response=page_of(ANY_OBJECT))
    async def downlinks(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        items, _ = _normalize_page(await self.service.downlinks(eui))
        return page(items, len(items), len(items), 0)

    @api_route("GET", "/sensors/{eui}/downlinks/{queId}", role="viewer",
               summary="One downlink with its state (queued, dispatched, accepted, expiring, sent, expired, invalid,"
                       " rejected, revoked)",
               params=(EP, QUE_ID), response=ANY_OBJECT, errors=(404,))
    async def downlink(self, call: Call) -> Any:
        eui, que_id = call.params["eui"].lower(), call.params["queId"]
        found = await self.service.downlink(eui, que_id)
        if found is None:
            raise not_found(f"downlink {que_id} of sensor {eui}")
        return found

    @api_route("POST", "/sensors/{eui}/downlinks", role="operator", summary="Queue a downlink", params=(EP,),
               body=DOWNLINK, status=202, response=ANY_OBJECT, errors=(404, 409), audit="mioty.sensor.downlink",
               audit_target="eui")
    async def queue_downlink(self, call: Call) -> Any:
        eui, body = await self._known_sensor(call), call.body
        result = await self.service.queue_downlink(
            eui, bytes.fromhex(body["data"]), format=body.get("format"), prio=body.get("prio"),
            response_exp=body.get("responseExp"), actor=call.actor,
        )
        call.detail = {"bytes": len(body["data"]) // 2}
        return Accepted(result if isinstance(result, dict) else {"epEui": eui, "queued": True})

    @api_route("DELETE", "/sensors/{eui}/downlinks/{queId}", role="operator",
               summary="Withdraw a pending downlink (dlDataRev to the base station holding it)",
               params=(EP, QUE_ID), response=ANY_OBJECT, errors=(404, 409), audit="mioty.sensor.downlink_revoke",
               audit_target="eui")
    async def revoke_downlink(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        que_id = call.params["queId"]
        call.detail = {"queId": que_id}
        return await self.service.revoke_downlink(eui, que_id, actor=call.actor)

    @api_route("POST", "/sensors/{eui}/dl-rx-status", role="operator",
               summary="Ask the base stations for the sensor's downlink reception status (dlRxStatQry);"
                       " answers arrive as dl_rx_status events",
               params=(EP,), status=202, response=ANY_OBJECT, errors=(404, 409))
    async def query_dl_rx_status(self, call: Call) -> Any:
        eui = await self._known_sensor(call)
        return Accepted(await self.service.query_dl_rx_status(eui))

    @api_route("GET", "/network", role="viewer", summary="Which base stations hear which sensors and meters",
               query=(Param("hours", {"type": "integer", "minimum": 1, "maximum": 720, "default": 24},
                            "the window: copies heard in the last this many hours"),),
               response=obj({"since": {"type": "number"}, "baseStations": {"type": "array", "items": ANY_OBJECT},
                             "links": {"type": "array", "items": ANY_OBJECT}}, ("since", "baseStations", "links")))
    async def network(self, call: Call) -> Any:
        from bsscihub.protocols.bssci.network import coverage

        service = running_service(self.hub, "mioty")
        return await coverage(service, service.clock.seconds() - 3600 * call.query["hours"])

    # -- pages

    @page_route("GET", "/network", role="viewer", summary="Network coverage")
    async def network_page(self, call: Call) -> Any:
        hours = call.query.get("hours", "24")
        try:
            result = await self._invoke(call, "network", query={"hours": hours})
        except ApiError:
            hours, result = "24", await self._invoke(call, "network", query={"hours": "24"})
        stations = result["baseStations"]
        column = {bs["bsEui"]: i for i, bs in enumerate(stations)}
        rows: dict[tuple[str, str], list[Any]] = {}
        for link in result["links"]:
            cells = rows.setdefault((link["kind"], link["device"]), [None] * len(stations))
            cells[column[link["bsEui"]]] = link
        matrix = [{"kind": kind, "device": device, "cells": cells,
                   "heardBy": sum(1 for c in cells if c is not None)} for (kind, device), cells in rows.items()]
        return Page("mioty/network.html", {"stations": stations, "matrix": matrix, "hours": int(hours),
                                           "title": "Network"})

    async def _invoke(self, call: Call, name: str, **kwargs: Any) -> Any:
        return await call.invoke(name, **kwargs)

    async def _search(self, call: Call, name: str) -> tuple[dict[str, Any], str]:
        """A list page's page of API list `name` and its search text (?q, limit, offset); an invalid search
        shows an empty list rather than an error page."""
        query = {"q": call.query.get("q", ""), "limit": call.query.get("limit", "50"),
                 "offset": call.query.get("offset", "0")}
        try:
            found = await self._invoke(call, name, query=query)
        except ApiError as e:
            if e.status != 400:
                raise
            found = {"items": [], "total": 0, "limit": 50, "offset": 0}
        return found, query["q"]

    @page_route("GET", "/base-stations", role="viewer", summary="Base stations")
    async def base_stations_page(self, call: Call) -> Any:
        stations = await self._invoke(call, "list_base_stations", query={"limit": "1000", "q": call.query.get("q", "")})
        return Page("mioty/base_stations.html", {"stations": stations, "q": call.query.get("q", ""),
                                                 "title": "Base stations"})

    @page_route("GET", "/base-stations/{eui}", role="viewer", summary="Base station", params=(BS,))
    async def base_station_page(self, call: Call) -> Any:
        station = await self._invoke(call, "get_base_station", params=call.params)
        return Page("mioty/base_station.html", {"bs": station, "eui": call.params["eui"].lower(),
                                                "title": f"Base station {call.params['eui']}"})

    @page_route("POST", "/base-stations/{eui}/status", role="operator", summary="Poll status", params=(BS,))
    async def poll_page(self, call: Call) -> Any:
        back = f"/mioty/base-stations/{call.params['eui'].lower()}"
        try:
            await self._invoke(call, "poll_status", params=call.params)
        except ApiError as e:
            return Redirect(back, error=e.message)
        return Redirect(back, flash="status requested")

    @page_route("POST", "/base-stations/{eui}/revoke", role="admin", summary="Revoke", params=(BS,))
    async def revoke_page(self, call: Call) -> Any:
        back = f"/mioty/base-stations/{call.params['eui'].lower()}"
        try:
            await self._invoke(call, "revoke_base_station", params=call.params,
                               body={"reason": str(call.body.get("reason", ""))[:200]})
        except ApiError as e:
            return Redirect(back, error=e.message)
        return Redirect(back, flash="base station revoked")

    @page_route("GET", "/sensors", role="viewer", summary="Sensors")
    async def sensors_page(self, call: Call) -> Any:
        sensors, q = await self._search(call, "list_sensors")
        return Page("mioty/sensors.html", {"sensors": sensors, "q": q, "title": "Sensors"})

    @page_route("POST", "/sensors", role="operator", summary="Add a sensor")
    async def add_sensor_page(self, call: Call) -> Any:
        form = call.body
        body = {"eui": form.get("eui", "").strip().lower(), "nwKey": form.get("nwKey", "").strip().lower(),
                "shortAddr": form.get("shortAddr", "").strip().lower(), "bidi": form.get("bidi") in ("on", "true", "1")}
        try:
            await self._invoke(call, "create_sensor", body=body)
        except ApiError as e:
            return Redirect("/mioty/sensors", error=e.message)
        return Redirect(f"/mioty/sensors/{body['eui']}", flash=f"sensor {body['eui']} added and attached")

    @page_route("POST", "/sensors/import", role="operator", summary="Import endpoints.json", max_body=8 << 20)
    async def import_page(self, call: Call) -> Any:
        raw = call.body.get("file", b"")
        head = raw[:64].lstrip("\ufeff \t\r\n") if isinstance(raw, str) else raw[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
        if head and head[:1] not in ("[", "{", b"[", b"{"):
            from bsscihub.protocols.bssci import endpoints

            try:  # CSV, as the earlier service center exported it
                data = endpoints.parse_csv(raw if isinstance(raw, str) else raw.decode("utf-8"))
            except UnicodeDecodeError:
                return Redirect("/mioty/sensors", error="the file is neither endpoints.json nor UTF-8 CSV")
            except endpoints.EndpointsError as e:
                return Redirect("/mioty/sensors", error=f"the CSV file: {e}")
        else:
            try:
                data = json.loads(raw)
            except (ValueError, TypeError):
                return Redirect("/mioty/sensors", error="the file is not valid JSON (expected endpoints.json)")
        try:
            result = await self._invoke(call, "import_sensors", body=data)
        except ApiError as e:
            return Redirect("/mioty/sensors", error=e.message)
        errors = result.get("errors") or []
        message = f"imported {result.get('imported', 0)} sensors" + (f", {len(errors)} refused" if errors else "")
        return Redirect("/mioty/sensors", flash=message)

    @page_route("GET", "/sensors/{eui}", role="viewer", summary="Sensor", params=(EP,))
    async def sensor_page(self, call: Call) -> Any:
        sensor = await self._invoke(call, "get_sensor", params=call.params)
        ups = (await self._invoke(call, "uplinks", params=call.params, query={"limit": "500"}))["items"]
        downs = (await self._invoke(call, "downlinks", params=call.params))["items"]
        # The chart shows the signal, or any numeric value the sensor's blueprint decodes (chosen on the page).
        fields = decoded_fields(ups)
        units = dict(fields)
        chosen = call.query.get("field") or ""
        if chosen in units:
            label = f"{chosen} ({units[chosen]})" if units[chosen] else chosen
            points = decoded_points(ups, chosen)
            series = [{"label": label, "path": f"decoded.{chosen}.value"}]
        else:
            chosen, points = "", chart_points(ups)
            series = [{"label": "RSSI (dBm)", "path": "receivers.0.rssi"},
                      {"label": "SNR (dB)", "path": "receivers.0.snr"}]
        last = next((up for up in ups if up.get("decoded") or up.get("decodeError")), None)
        return Page("mioty/sensor.html", {
            "sensor": sensor, "eui": call.params["eui"].lower(), "uplinks": ups[:100], "downlinks": downs,
            "points": points, "title": f"Sensor {call.params['eui']}", "series": series, "fields": fields,
            "field": chosen, "last": last,
        })

    async def _sensor_action(self, call: Call, name: str, done: str, **kwargs: Any) -> Any:
        back = f"/mioty/sensors/{call.params['eui'].lower()}"
        try:
            await self._invoke(call, name, params=call.params, **kwargs)
        except ApiError as e:
            return Redirect(back, error=e.message)
        return Redirect(back, flash=done)

    @page_route("POST", "/sensors/{eui}/attach", role="operator", summary="Attach", params=(EP,))
    async def attach_page(self, call: Call) -> Any:
        form = call.body
        body = {"nwKey": form.get("nwKey", "").strip().lower(), "shortAddr": form.get("shortAddr", "").strip().lower(),
                "bidi": form.get("bidi") in ("on", "true", "1")}
        return await self._sensor_action(call, "attach", "attach sent to the base stations", body=body)

    @page_route("POST", "/sensors/{eui}/detach", role="operator", summary="Detach", params=(EP,))
    async def detach_page(self, call: Call) -> Any:
        return await self._sensor_action(call, "detach", "detach sent to the base stations")

    @page_route("POST", "/sensors/{eui}/downlink", role="operator", summary="Queue a downlink", params=(EP,))
    async def downlink_page(self, call: Call) -> Any:
        form = call.body
        body: dict[str, Any] = {"data": form.get("data", "").strip().replace(" ", "")}
        if form.get("format", "").strip():
            try:
                body["format"] = int(form["format"])
            except ValueError:
                return Redirect(f"/mioty/sensors/{call.params['eui'].lower()}", error="format: expected a number")
        if form.get("responseExp"):
            body["responseExp"] = True
        return await self._sensor_action(call, "queue_downlink", "downlink queued", body=body)

    @page_route("POST", "/sensors/{eui}/downlinks/{queId}/revoke", role="operator", summary="Withdraw a downlink",
                params=(EP, QUE_ID))
    async def revoke_downlink_page(self, call: Call) -> Any:
        return await self._sensor_action(call, "revoke_downlink", f"downlink {call.params['queId']} withdrawn")

    @page_route("POST", "/sensors/{eui}/dl-rx-status", role="operator", summary="Ask for downlink reception status",
                params=(EP,))
    async def dl_rx_status_page(self, call: Call) -> Any:
        return await self._sensor_action(call, "query_dl_rx_status",
                                         "asked the base stations; answers arrive as dl_rx_status events")

    @page_route("POST", "/sensors/{eui}/delete", role="operator", summary="Remove a sensor", params=(EP,))
    async def delete_page(self, call: Call) -> Any:
        try:
            await self._invoke(call, "delete_sensor", params=call.params)
        except ApiError as e:
            return Redirect(f"/mioty/sensors/{call.params['eui'].lower()}", error=e.message)
        return Redirect("/mioty/sensors", flash=f"sensor {call.params['eui'].lower()} removed")
