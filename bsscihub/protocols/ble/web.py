"""The BLE family's REST routes (/api/v1/ble/...) and admin pages (/ble/...): gateways, nodes, readings.

Mounted by the web layer through BLEFamily.web_routes; the registry views come from the running service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from bsscihub.contract import rfc3339
from bsscihub.family import IDashboardSummary, IWebExtension
from bsscihub.ingest import Rejected
from bsscihub.protocols.ble.service import BLEService, Gateway, Node, normalize_mac
from bsscihub.series import DAY, POINTS, SERIES, SINCE, UNTIL, bucketed, chart_points, series_json, time_range
from bsscihub.web.errors import bad_field, not_found, running_service
from bsscihub.web.routing import NO_CONTENT, PAGING, Call, NavItem, Page, Param, Redirect, api_route, page, page_route
from bsscihub.web.schema import ANY_OBJECT, OPT_TIME, TIME, obj, page_of, string

if TYPE_CHECKING:
    from bsscihub.hub import Hub


GATEWAY_ID = Param("id", string("gateway id", maxLength=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"),
                   "gateway id", example="GW001")
MAC = Param("mac", string("MAC address: 12 hex digits, with or without ':' or '-'", maxLength=17,
                          pattern=r"^[0-9A-Fa-f:.\-]{12,17}$"), "beacon MAC address", example="112233445566")
QUANTITY = Param("quantity", string("quantity", maxLength=32, pattern=r"^[a-z][a-z0-9_]*$"), "e.g. temperature",
                 required=True, example="temperature")
SEARCH = Param("q", string("search", maxLength=64), "part of the id or MAC", example="")
LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "most readings",
              example=10)

GATEWAY = obj({"gatewayId": {"type": "string"}, "state": {"type": "string", "enum": ["online", "offline"]},
               "since": TIME, "firstSeen": TIME, "lastSeen": TIME,
               "messages": {"type": "integer"}}, ("gatewayId", "state", "lastSeen"), closed=False)
NODE = obj({"mac": {"type": "string"}, "id": {"type": "string"}, "gatewayId": {"type": "string"},
            "rssi": {"type": "integer", "nullable": True}, "firstSeen": TIME,
            "lastSeen": OPT_TIME, "readings": {"type": "integer"}, "values": ANY_OBJECT},
           ("mac", "id", "gatewayId", "lastSeen", "values"), closed=False)
READING = obj({"time": TIME, "values": ANY_OBJECT,
               "receivers": {"type": "array", "items": obj({"gatewayId": {"type": "string"},
                                                            "rssi": {"type": "integer", "nullable": True}},
                                                           closed=False)}},
              ("time", "values", "receivers"), closed=False)


def _mac(raw: str) -> str:
    try:
        return normalize_mac(raw)
    except Rejected as e:
        raise bad_field("mac", e.detail) from None


@implementer(IWebExtension, IDashboardSummary)
class BLEWeb:
    """Registry views from the service's memory (always current); readings and series from storage."""

    nav = [NavItem("BLE", "/ble", "viewer", "ble")]
    templates = Path(__file__).parent / "templates"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def service(self) -> BLEService:
        return running_service(self.hub, "ble")  # type: ignore[no-any-return]

    async def summary(self) -> dict[str, Any]:
        service = self.service
        online = sum(1 for g in service.gateways.values() if g.state == "online")
        return {
            "ble_gateways": {"label": "BLE gateways online", "value": f"{online}/{len(service.gateways)}",
                             "href": "/ble"},
            "ble_nodes": {"label": "BLE beacons", "value": len(service.nodes), "href": "/ble"},
        }

    def _range(self, query: dict[str, Any]) -> tuple[float, float]:
        return time_range(query, self.hub.reactor.seconds())

    def _gateway(self, call: Call) -> Gateway:
        """The route's gateway; 404 for one the hub does not know."""
        gateway = self.service.gateways.get(call.params["id"])
        if gateway is None:
            raise not_found(f"gateway {call.params['id']}")
        return gateway

    def _node(self, call: Call) -> Node:
        """The route's beacon, by its MAC in any accepted spelling; 404 for one the hub has not heard."""
        node = self.service.nodes.get(_mac(call.params["mac"]))
        if node is None:
            raise not_found(f"node {call.params['mac']}")
        return node

    # -- API: gateways

    @api_route("GET", "/gateways", role="viewer", summary="BLE gateways, most recently heard first", tag="ble",
               query=(*PAGING, SEARCH), response=page_of(GATEWAY))
    def list_gateways(self, call: Call) -> Any:
        q = (call.query.get("q") or "").lower()
        found = sorted((g for g in self.service.gateways.values() if q in g.id.lower()),
                       key=lambda g: (-g.last_seen, g.id))
        limit, offset = call.query["limit"], call.query["offset"]
        return page([g.to_json() for g in found[offset : offset + limit]], len(found), limit, offset)

    @api_route("GET", "/gateways/{id}", role="viewer", summary="One BLE gateway and the beacons nearest to it",
               tag="ble", params=(GATEWAY_ID,), response=GATEWAY, errors=(404,))
    def get_gateway(self, call: Call) -> Any:
        gateway = self._gateway(call)
        nearest = sorted(n.mac for n in self.service.nodes.values() if n.gateway == gateway.id)
        return {**gateway.to_json(), "nearestNodes": nearest}

    @api_route("DELETE", "/gateways/{id}", role="operator", summary="Forget a BLE gateway (it registers again"
               " when heard)", tag="ble", params=(GATEWAY_ID,), status=204, errors=(404,),
               audit="ble.gateway.forget", audit_target="id")
    async def forget_gateway(self, call: Call) -> Any:
        if not await self.service.forget_gateway(call.params["id"]):
            raise not_found(f"gateway {call.params['id']}")
        return NO_CONTENT

    # -- API: nodes

    @api_route("GET", "/nodes", role="viewer", summary="BLE beacon nodes, most recently heard first", tag="ble",
               query=(*PAGING, SEARCH), response=page_of(NODE))
    def list_nodes(self, call: Call) -> Any:
        q = (call.query.get("q") or "").lower().replace(":", "").replace("-", "")
        found = sorted((n for n in self.service.nodes.values() if q in n.mac or q in n.gateway.lower()),
                       key=lambda n: (-n.last_seen, n.mac))
        limit, offset = call.query["limit"], call.query["offset"]
        return page([n.to_json() for n in found[offset : offset + limit]], len(found), limit, offset)

    @api_route("GET", "/nodes/{mac}", role="viewer", summary="One BLE beacon node with its latest values",
               tag="ble", params=(MAC,), response=NODE, errors=(404,))
    def get_node(self, call: Call) -> Any:
        return self._node(call).to_json()

    @api_route("DELETE", "/nodes/{mac}", role="operator", summary="Forget a BLE node and its readings", tag="ble",
               params=(MAC,), status=204, errors=(404,), audit="ble.node.forget", audit_target="mac")
    async def forget_node(self, call: Call) -> Any:
        if not await self.service.forget_node(_mac(call.params["mac"])):
            raise not_found(f"node {call.params['mac']}")
        return NO_CONTENT

    @api_route("GET", "/nodes/{mac}/readings", role="viewer", summary="A node's readings in a time range, newest"
               " first, each with every gateway that heard it (nearest first)", tag="ble", params=(MAC,),
               query=(SINCE, UNTIL, LIMIT), response=page_of(READING), errors=(404,))
    async def readings(self, call: Call) -> Any:
        mac = self._node(call).mac
        since, until = self._range(call.query)
        rows = await self.hub.store.fetchall(
            "SELECT time, data, receivers FROM ble_readings WHERE mac = ? AND time >= ? AND time < ?"
            " ORDER BY time DESC LIMIT ?", (mac, since, until, call.query["limit"]))
        items = [{"time": rfc3339(float(t)), "values": json.loads(d), "receivers": json.loads(r)}
                 for t, d, r in rows]
        return page(items, len(items), call.query["limit"], 0)

    @api_route("GET", "/nodes/{mac}/series", role="viewer", summary="One quantity of a node over a time range,"
               " averaged into at most `points` buckets (for charts)", tag="ble", params=(MAC,),
               query=(QUANTITY, SINCE, UNTIL, POINTS), response=SERIES, errors=(404,))
    async def series(self, call: Call) -> Any:
        mac = self._node(call).mac
        since, until = self._range(call.query)
        result = await bucketed(self.hub.store, "ble_samples", "mac = ? AND quantity = ?",
                                (mac, call.query["quantity"]), since, until, call.query["points"])
        return {"mac": self.service.nodes[mac].to_json()["mac"], "quantity": call.query["quantity"],
                **series_json(result)}

    # -- pages

    @page_route("GET", "", role="viewer", summary="BLE gateways and beacons")
    def overview(self, call: Call) -> Any:
        service = self.service
        gateways = sorted(service.gateways.values(), key=lambda g: (g.state != "online", g.id))
        q = str(call.query.get("q", "")).strip().lower().replace(":", "")
        nodes = sorted((n for n in service.nodes.values() if q in n.mac or q in n.gateway.lower()),
                       key=lambda n: -n.last_seen)
        return Page("ble/overview.html", {
            "title": "BLE", "gateways": [g.to_json() for g in gateways],
            "nodes": [n.to_json() for n in nodes[:500]], "node_total": len(nodes), "q": q,
            "timeout": service.config.gateway_timeout,
        })

    @page_route("GET", "/gateways/{id}", role="viewer", summary="A BLE gateway", params=(GATEWAY_ID,))
    def gateway_page(self, call: Call) -> Any:
        service = self.service
        gateway = self._gateway(call)
        nodes = [n.to_json() for n in sorted((n for n in service.nodes.values() if n.gateway == gateway.id),
                                             key=lambda n: -n.last_seen)]
        return Page("ble/gateway.html", {"title": f"Gateway {gateway.id}", "gateway": gateway.to_json(),
                                                  "nodes": nodes})

    @page_route("POST", "/gateways/{id}/forget", role="operator", summary="Forget a BLE gateway",
                params=(GATEWAY_ID,), audit="ble.gateway.forget", audit_target="id")
    async def gateway_forget_page(self, call: Call) -> Any:
        await self.service.forget_gateway(call.params["id"])
        return Redirect("/ble", flash=f"gateway {call.params['id']} forgotten")

    @page_route("GET", "/nodes/{mac}", role="viewer", summary="A BLE beacon with charts", params=(MAC,))
    async def node_page(self, call: Call) -> Any:
        node = self._node(call)
        mac = node.mac
        until = self.hub.reactor.seconds()
        charts = []
        for quantity in sorted(node.values):
            series = await bucketed(self.hub.store, "ble_samples", "mac = ? AND quantity = ?", (mac, quantity),
                                    until - DAY, until + 1, 200)
            charts.append({"quantity": quantity, "points": chart_points(series),
                           "series": [{"path": f"values.{quantity}", "label": quantity}]})
        rows = await self.hub.store.fetchall(
            "SELECT time, data, receivers FROM ble_readings WHERE mac = ? ORDER BY time DESC LIMIT 20", (mac,))
        readings = [{"time": rfc3339(float(t)), "values": json.loads(d), "receivers": json.loads(r)}
                    for t, d, r in rows]
        view = node.to_json()
        return Page("ble/node.html", {"title": f"Beacon {view['mac']}", "node": view, "charts": charts,
                                               "readings": readings})

    @page_route("POST", "/nodes/{mac}/forget", role="operator", summary="Forget a BLE node", params=(MAC,),
                audit="ble.node.forget", audit_target="mac")
    async def node_forget_page(self, call: Call) -> Any:
        await self.service.forget_node(_mac(call.params["mac"]))
        return Redirect("/ble", flash=f"beacon {call.params['mac']} forgotten")
