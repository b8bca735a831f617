"""The `devices` family's REST routes (/api/v1/devices/...) and admin pages (/devices/...).

Devices post telemetry with `X-Device-Key`; operators register devices, send commands and offer firmware.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from bsscihub.blobs import StreamedBlob
from bsscihub.contract import rfc3339
from bsscihub.family import IDashboardSummary, IRootRoutes, IWebExtension
from bsscihub.ingest import IDENTIFIER, OVERSIZED, Rejected
from bsscihub.protocols.devices.service import DeviceError, DevicesService
from bsscihub.series import DAY, POINTS, SERIES, SINCE, UNTIL, bucketed, chart_points, series_json, time_range
from bsscihub.web.errors import ApiError, not_found, running_service, unauthorized
from bsscihub.web.routing import (
    ANONYMOUS,
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
from bsscihub.web.schema import ANY_OBJECT, OPT_TIME, TIME, obj, page_of, string

if TYPE_CHECKING:
    from bsscihub.hub import Hub

KEY_HEADER = b"x-device-key"
ORG_KEY_HEADER = b"x-org-key"

ID_SCHEMA = string("device id", minLength=1, maxLength=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
                   **{"x-expected": "1-64 letters, digits, '_', '.', ':', '-'"})
DEVICE_ID = Param("id", ID_SCHEMA, "device id", example="esp32-01")
TYPE_SCHEMA = string("telemetry type", maxLength=64, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
TYPE_FILTER = Param("type", TYPE_SCHEMA, "only this telemetry type", example="temperature")
TYPE_REQUIRED = Param("type", TYPE_SCHEMA, "telemetry type", required=True, example="temperature")
LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}, "most values",
              example=10)
SEARCH = Param("q", string("search", maxLength=64), "part of the id or name", example="")
COMMAND_ID = Param("cid", string("command id", maxLength=32, pattern=r"^[0-9a-f]+$"), example="0011223344556677")
OFFER_ID = Param("offer", string("offer id", maxLength=32, pattern=r"^[0-9a-f]+$"), example="0011223344556677")
FIRMWARE_ID = Param("fw", {"type": "integer", "minimum": 1}, "firmware id", example=1)
TOKEN = Param("token", string("download token", maxLength=100), "from the OTA offer's URL", required=True,
              example="x")
NAME_Q = Param("name", string("name", minLength=1, maxLength=64), "firmware name", required=True, example="sensor")
VERSION_Q = Param("version", string("version", minLength=1, maxLength=32), "firmware version", required=True,
                  example="1.2.0")

DEVICE = obj({"deviceId": {"type": "string"}, "name": {"type": "string"}, "status": {"type": "string"},
              "lastSeen": OPT_TIME, "firstSeen": TIME, "statusTime": OPT_TIME, "firmware": {"type": "string"}},
             ("deviceId", "name", "status", "lastSeen"), closed=False)
REGISTER = obj({"id": ID_SCHEMA, "name": string("display name", maxLength=100)}, ("id",))
RENAME = obj({"name": string("display name", maxLength=100)}, ("name",))
# Documented here, validated by the family (not the web layer) so that bad input over HTTPS is
# counted and logged exactly like bad input over MQTT.
TELEMETRY_IN = {
    "description": '{"type", "value", "time"?} or {"values": {type: value}, "time"?}; time in Unix seconds',
    "properties": {"type": {"description": "telemetry type"}, "value": {"description": "a number"},
                   "time": {"description": "Unix seconds (default: now)"},
                   "values": {"description": "several types at once"}},
}
COMMAND_IN = obj({"name": string("command name", minLength=1, maxLength=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
                  "args": {"description": "any JSON value, passed to the device as is"}}, ("name",))
COMMAND = obj({"commandId": {"type": "string"}, "command": {"type": "string"},
               "state": {"type": "string", "enum": ["sent", "ok", "failed", "timeout"]}},
              ("commandId", "command", "state"), closed=False)
OTA_IN = obj({"firmware": {"type": "integer", "minimum": 1}}, ("firmware",))
FIRMWARE = obj({"id": {"type": "integer"}, "name": {"type": "string"}, "version": {"type": "string"},
                "sha256": {"type": "string"}, "size": {"type": "integer"}}, ("id", "name", "version", "sha256", "size"),
               closed=False)


def _not_done(call: Call, back: str, error: str) -> Redirect:
    """A page action that failed: back to `back` with the error, and no audit entry (nothing changed)."""
    call.audit_action = None
    return Redirect(back, error=error)


def _api_error(e: DeviceError) -> ApiError:
    return ApiError(e.http_status, e.code, str(e))


LEGACY_OTA = obj({
    "device_id": ID_SCHEMA,
    "firmware_version": string("version the device runs after the update", minLength=1, maxLength=32),
    "firmware_url": string("where the device downloads the image (http or https; hosted elsewhere)", minLength=1,
                           maxLength=2048),
    "checksum": string("digest of the image, passed on to the device (e.g. 64 hex digits of sha256)",
                       maxLength=160),
}, ("device_id", "firmware_version", "firmware_url"))


class LegacyRoutes:
    """Paths of the platforms the hub replaces, kept as they were (outside /api/v1), with the API's auth."""

    def __init__(self, devices: DevicesWeb) -> None:
        self.devices = devices

    @api_route("POST", "/api/ota/update", role="operator", summary="Start a firmware update hosted elsewhere:"
               " published to OTA/{device_id}/update; the device answers on OTA/{device_id}/response",
               tag="devices", body=LEGACY_OTA, status=202, errors=(404, 409, 503), audit="devices.ota",
               body_example={"device_id": "Device001", "firmware_version": "2.0.0",
                             "firmware_url": "https://files.example.net/fw/2.0.0.bin"})
    async def ota_update(self, call: Call) -> Any:
        body = call.body
        call.target, call.detail = body["device_id"], {"version": body["firmware_version"]}
        self.devices._device(body["device_id"])
        try:
            offer = await self.devices.service.offer_hosted(body["device_id"], body["firmware_version"],
                                                            body["firmware_url"], body.get("checksum"), call.actor)
        except DeviceError as e:
            raise _api_error(e) from None
        return Accepted({**offer, "status": "sent",
                         "message": f"update published to {self.devices.service.config.ota_root}/"
                                    f"{body['device_id']}/update"})


@implementer(IWebExtension, IDashboardSummary, IRootRoutes)
class DevicesWeb:
    """Routes over the running DevicesService; the registry comes from its memory, telemetry from storage."""

    nav = [NavItem("Devices", "/devices", "viewer", "devices")]
    templates = Path(__file__).parent / "templates"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.root_routes = LegacyRoutes(self)

    @property
    def service(self) -> DevicesService:
        return running_service(self.hub, "devices")  # type: ignore[no-any-return]

    def _device(self, device_id: str) -> Any:
        device = self.service.devices.get(device_id)
        if device is None:
            raise not_found(f"device {device_id}")
        return device

    def _range(self, query: dict[str, Any]) -> tuple[float, float]:
        return time_range(query, self.hub.reactor.seconds())

    async def summary(self) -> dict[str, Any]:
        service = self.service
        online = sum(1 for d in service.devices.values() if d.status == "online")
        return {"devices": {"label": "Devices (online)", "value": f"{len(service.devices)} ({online})",
                            "href": "/devices"}}

    # -- API: registry

    @api_route("GET", "", role="viewer", summary="Devices, most recently heard first", tag="devices",
               query=(*PAGING, SEARCH), response=page_of(DEVICE))
    def list_devices(self, call: Call) -> Any:
        q = (call.query.get("q") or "").lower()
        found = sorted((d for d in self.service.devices.values() if q in d.id.lower() or q in d.name.lower()),
                       key=lambda d: (-(d.last_seen or 0.0), d.id))
        limit, offset = call.query["limit"], call.query["offset"]
        return page([d.to_json() for d in found[offset : offset + limit]], len(found), limit, offset)

    @api_route("POST", "", role="operator", summary="Register a device (needed when devices.auto_register is off)",
               tag="devices", body=REGISTER, body_example={"id": "esp32-01", "name": "Boiler room"}, status=201,
               response=DEVICE, errors=(409,), audit="devices.register")
    async def register(self, call: Call) -> Any:
        try:
            device = await self.service.register(call.body["id"], call.body.get("name", ""))
        except DeviceError as e:
            raise _api_error(e) from None
        call.target = device.id
        return Created(device.to_json(), f"/api/v1/devices/{device.id}")

    @api_route("GET", "/{id}", role="viewer", summary="One device: registry entry, status and telemetry types",
               tag="devices", params=(DEVICE_ID,), response=DEVICE, errors=(404,))
    async def get_device(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        return {**device.to_json(), "types": await self.service.types(device.id),
                "key": await self.service.key_info(device.id)}

    @api_route("PATCH", "/{id}", role="operator", summary="Rename a device", tag="devices", params=(DEVICE_ID,),
               body=RENAME, body_example={"name": "Boiler room"}, response=DEVICE, errors=(404,),
               audit="devices.rename", audit_target="id")
    def rename(self, call: Call) -> Any:
        self._device(call.params["id"])
        call.detail = {"name": call.body["name"]}
        return self.service.rename(call.params["id"], call.body["name"]).to_json()

    @api_route("DELETE", "/{id}", role="operator", summary="Forget a device with its telemetry, commands and key",
               tag="devices", params=(DEVICE_ID,), status=204, errors=(404,), audit="devices.forget",
               audit_target="id")
    async def forget(self, call: Call) -> Any:
        self._device(call.params["id"])
        await self.service.forget(call.params["id"])
        return NO_CONTENT

    # -- API: telemetry

    @api_route("GET", "/{id}/telemetry", role="viewer", summary="A device's telemetry values in a time range,"
               " newest first", tag="devices", params=(DEVICE_ID,), query=(TYPE_FILTER, SINCE, UNTIL, LIMIT),
               response=page_of(ANY_OBJECT), errors=(404,))
    async def telemetry(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        since, until = self._range(call.query)
        items = await self.service.telemetry(device.id, call.query.get("type"), since, until, call.query["limit"])
        return {"deviceId": device.id, "since": rfc3339(since), "until": rfc3339(until),
                **page(items, len(items), call.query["limit"], 0)}

    @api_route("GET", "/{id}/series", role="viewer", summary="One telemetry type over a time range, averaged into"
               " at most `points` buckets in SQL (for charts)", tag="devices", params=(DEVICE_ID,),
               query=(TYPE_REQUIRED, SINCE, UNTIL, POINTS), response=SERIES, errors=(404,))
    async def series(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        since, until = self._range(call.query)
        result = await bucketed(self.hub.store, "dev_telemetry", "device = ? AND type = ?",
                                (device.id, call.query["type"]), since, until, call.query["points"])
        return {"deviceId": device.id, "type": call.query["type"], **series_json(result)}

    @api_route("POST", "/{id}/telemetry", role=ANONYMOUS, summary="Telemetry over HTTPS, authenticated with the"
               " device's key in the X-Device-Key header: {type, value, time?} or {values: {type: value}, time?}",
               tag="devices", params=(DEVICE_ID,), body=TELEMETRY_IN,
               body_example={"type": "temperature", "value": 21.5},
               response=obj({"accepted": {"type": "integer"}}, ("accepted",)), errors=(401, 413), max_body=64 << 10)
    async def post_telemetry(self, call: Call) -> Any:
        service = self.service
        device_id = call.params["id"]
        key = (call.request.getHeader(KEY_HEADER) or b"").decode("latin-1").strip() if call.request else ""
        # The same refusal whatever failed, so a caller learns nothing about which devices exist.
        if not key or not await service.check_key(device_id, key):
            raise unauthorized("missing or invalid X-Device-Key for this device")
        content = call.request.content
        content.seek(0, 2)
        size = content.tell()
        topic = f"https:/api/v1/devices/{device_id}/telemetry"
        if size > service.config.max_payload:
            error = Rejected(OVERSIZED, f"{size} bytes, more than {service.config.max_payload}", source=device_id)
            service.ingest.rejected(error, topic)
            raise ApiError(413, "body_too_large", error.detail)
        try:
            accepted = service.http_telemetry(device_id, call.body, topic)
        except Rejected as e:
            raise ApiError(400, e.reason, e.detail) from None
        return {"accepted": accepted}

    # -- API: organisation keys and self-registration

    @api_route("GET", "/org-keys", role="admin", summary="Organisation keys (devices register themselves with one)",
               tag="devices", response=page_of(ANY_OBJECT))
    async def list_org_keys(self, call: Call) -> Any:
        items = await self.service.list_org_keys()
        return page(items, len(items), len(items), 0)

    @api_route("POST", "/org-keys", role="admin", summary="Create an organisation key; shown only in this answer",
               tag="devices", body=obj({"name": string("what it is for", minLength=1, maxLength=100)}, ("name",)),
               body_example={"name": "field installers"}, status=201, response=ANY_OBJECT,
               audit="devices.org_key.create")
    async def create_org_key(self, call: Call) -> Any:
        key, token = await self.service.create_org_key(call.body["name"], call.actor)
        call.target = key["prefix"]
        return Created({**key, "key": token})

    @api_route("DELETE", "/org-keys/{key_id}", role="admin", summary="Revoke an organisation key", tag="devices",
               params=(Param("key_id", {"type": "integer", "minimum": 1}, "key id", example=1),),
               response=ANY_OBJECT, errors=(404, 409), audit="devices.org_key.revoke", audit_target="key_id")
    async def revoke_org_key(self, call: Call) -> Any:
        try:
            return await self.service.revoke_org_key(call.params["key_id"])
        except DeviceError as e:
            raise _api_error(e) from None

    @api_route("POST", "/register", role=ANONYMOUS, summary="A device registers itself with an organisation key"
               " (X-Org-Key header); answers its own key and broker account, shown once", tag="devices",
               body=obj({"device_id": ID_SCHEMA, "name": string("display name", maxLength=100)}, ("device_id",)),
               body_example={"device_id": "pi-kitchen"}, status=201, response=ANY_OBJECT,
               errors=(401, 409, 429, 503), audit="devices.self_register")
    async def self_register(self, call: Call) -> Any:
        org_key = (call.request.getHeader(ORG_KEY_HEADER) or b"").decode("latin-1").strip()
        call.target = call.body["device_id"]
        call.acting_as = f"org-key:{org_key.partition('_')[2][:8]}" if org_key else "anonymous"
        try:
            created = await self.service.self_register(org_key, call.body["device_id"], call.body.get("name", ""))
        except DeviceError as e:
            raise _api_error(e) from None
        return Created(created, f"/api/v1/devices/{created['deviceId']}")

    # -- API: device keys

    @api_route("POST", "/{id}/key", role="operator", summary="Create the device's API key (replacing any old one);"
               " the key is shown only in this answer", tag="devices", params=(DEVICE_ID,), status=201,
               response=obj({"key": {"type": "string"}, "prefix": {"type": "string"}}, ("key", "prefix"),
                            closed=False), errors=(404,), audit="devices.key.create", audit_target="id")
    async def create_key(self, call: Call) -> Any:
        self._device(call.params["id"])
        return Created(await self.service.create_key(call.params["id"]))

    @api_route("DELETE", "/{id}/key", role="operator", summary="Revoke the device's API key", tag="devices",
               params=(DEVICE_ID,), status=204, errors=(404,), audit="devices.key.revoke", audit_target="id")
    async def revoke_key(self, call: Call) -> Any:
        self._device(call.params["id"])
        if not await self.service.revoke_key(call.params["id"]):
            raise not_found(f"API key of device {call.params['id']}")
        return NO_CONTENT

    # -- API: commands

    @api_route("POST", "/{id}/commands", role="operator", summary="Send a command to device/{id}/commands/{name};"
               " its result is tracked when the device answers", tag="devices", params=(DEVICE_ID,), body=COMMAND_IN,
               body_example={"name": "reboot", "args": {"delay": 5}}, status=202, response=COMMAND,
               errors=(404, 503), audit="devices.command", audit_target="id")
    async def send_command(self, call: Call) -> Any:
        self._device(call.params["id"])
        call.detail = {"command": call.body["name"]}
        try:
            return Accepted(await self.service.send_command(call.params["id"], call.body["name"],
                                                            call.body.get("args"), call.actor))
        except DeviceError as e:
            raise _api_error(e) from None

    @api_route("GET", "/{id}/commands", role="viewer", summary="A device's latest commands and their results",
               tag="devices", params=(DEVICE_ID,), query=(Param("limit", {"type": "integer", "minimum": 1,
                                                                          "maximum": 500, "default": 50},
                                                                 example=10),),
               response=page_of(COMMAND), errors=(404,))
    async def list_commands(self, call: Call) -> Any:
        self._device(call.params["id"])
        items = await self.service.list_commands(call.params["id"], call.query["limit"])
        return page(items, len(items), call.query["limit"], 0)

    @api_route("GET", "/{id}/commands/{cid}", role="viewer", summary="One command and its result", tag="devices",
               params=(DEVICE_ID, COMMAND_ID), response=COMMAND, errors=(404,))
    async def get_command(self, call: Call) -> Any:
        found = await self.service.get_command(call.params["id"], call.params["cid"])
        if found is None:
            raise not_found(f"command {call.params['cid']}")
        return found

    # -- API: firmware and OTA

    @api_route("GET", "/firmware", role="viewer", summary="Firmware images uploaded for OTA", tag="devices",
               response=page_of(FIRMWARE))
    async def list_firmware(self, call: Call) -> Any:
        items = await self.service.list_firmware()
        return page(items, len(items), len(items), 0)

    @api_route("POST", "/firmware", role="operator", summary="Upload a firmware image: the raw bytes as the body"
               " (application/octet-stream)", tag="devices", query=(NAME_Q, VERSION_Q), status=201,
               response=FIRMWARE, errors=(413,), max_body=8 << 20, audit="devices.firmware.upload",
               produces="application/json")
    async def upload_firmware(self, call: Call) -> Any:
        content = call.request.content
        content.seek(0)
        data = content.read()
        try:
            firmware = await self.service.add_firmware(call.query["name"], call.query["version"], data, call.actor)
        except DeviceError as e:
            raise _api_error(e) from None
        call.target, call.detail = str(firmware["id"]), {"sha256": firmware["sha256"], "version": firmware["version"]}
        return Created(firmware)

    @api_route("DELETE", "/firmware/{fw}", role="operator", summary="Delete a firmware image", tag="devices",
               params=(FIRMWARE_ID,), status=204, errors=(404, 409), audit="devices.firmware.delete",
               audit_target="fw")
    async def delete_firmware(self, call: Call) -> Any:
        try:
            found = await self.service.delete_firmware(call.params["fw"])
        except DeviceError as e:
            raise _api_error(e) from None
        if not found:
            raise not_found(f"firmware {call.params['fw']}")
        return NO_CONTENT

    @api_route("POST", "/{id}/ota", role="operator", summary="Offer a firmware image to the device on"
               " OTA/{id}/update (URL and sha256); progress comes back on OTA/{id}/response", tag="devices",
               params=(DEVICE_ID,), body=OTA_IN, body_example={"firmware": 1}, status=202, errors=(404, 409, 503),
               audit="devices.ota", audit_target="id")
    async def start_ota(self, call: Call) -> Any:
        self._device(call.params["id"])
        call.detail = {"firmware": call.body["firmware"]}
        try:
            return Accepted(await self.service.offer(call.params["id"], call.body["firmware"], call.actor))
        except DeviceError as e:
            raise _api_error(e) from None

    @api_route("GET", "/{id}/ota", role="viewer", summary="A device's firmware updates, newest first",
               tag="devices", params=(DEVICE_ID,), errors=(404,),
               response=page_of(ANY_OBJECT))
    async def list_ota(self, call: Call) -> Any:
        self._device(call.params["id"])
        items = await self.service.list_offers(call.params["id"])
        return page(items, len(items), 20, 0)

    @api_route("GET", "/{id}/ota/{offer}/firmware", role=ANONYMOUS, summary="The offered image, for the device"
               " (the URL sent in the offer carries its token)", tag="devices", params=(DEVICE_ID, OFFER_ID),
               query=(TOKEN,), produces="application/octet-stream", errors=(404,))
    async def download_firmware(self, call: Call) -> Any:
        found = await self.service.firmware_for_offer(call.params["id"], call.params["offer"], call.query["token"])
        if found is None:
            raise not_found("offer")
        firmware, filename = found
        return StreamedBlob(self.service.firmware_parts(firmware), int(firmware["size"]), filename)

    # -- pages

    @page_route("GET", "", role="viewer", summary="Devices")
    async def devices_page(self, call: Call) -> Any:
        service = self.service
        q = str(call.query.get("q", "")).strip().lower()
        found = sorted((d for d in service.devices.values() if q in d.id.lower() or q in d.name.lower()),
                       key=lambda d: -(d.last_seen or 0.0))
        return Page("devices/list.html", {
            "title": "Devices", "devices": [d.to_json() for d in found[:500]], "total": len(found), "q": q,
            "auto_register": service.config.auto_register, "firmware": await service.list_firmware(),
        })

    @page_route("POST", "", role="operator", summary="Register a device", audit="devices.register")
    async def register_page(self, call: Call) -> Any:
        device_id = str(call.body.get("id", "")).strip()
        try:
            if not IDENTIFIER.match(device_id):
                raise DeviceError("device id: expected 1-64 letters, digits, '_', '.', ':', '-'", 400)
            await self.service.register(device_id, str(call.body.get("name", "")).strip()[:100])
        except DeviceError as e:
            return _not_done(call, "/devices", str(e))
        call.target = device_id
        return Redirect(f"/devices/{device_id}", flash=f"device {device_id} registered")

    @page_route("POST", "/firmware", role="operator", summary="Upload a firmware image",
                audit="devices.firmware.upload")
    async def upload_page(self, call: Call) -> Any:
        data = call.body.get("file", b"")
        if isinstance(data, str):
            data = data.encode("utf-8")  # the form layer decoded it because it happened to be UTF-8
        name, version = str(call.body.get("name", "")).strip()[:64], str(call.body.get("version", "")).strip()[:32]
        if not name or not version:
            return _not_done(call, "/devices", "name and version are needed")
        try:
            firmware = await self.service.add_firmware(name, version, data, call.actor)
        except DeviceError as e:
            return _not_done(call, "/devices", str(e))
        call.target, call.detail = str(firmware["id"]), {"sha256": firmware["sha256"], "version": version}
        return Redirect("/devices", flash=f"firmware {name} {version} uploaded (sha256 {firmware['sha256'][:12]}…)")

    @page_route("GET", "/{id}", role="viewer", summary="A device with charts", params=(DEVICE_ID,))
    async def device_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        service = self.service
        types = await service.types(device.id)
        until = self.hub.reactor.seconds() + 1
        charts = []
        for t in types:
            series = await bucketed(self.hub.store, "dev_telemetry", "device = ? AND type = ?", (device.id, t["type"]),
                                    until - DAY, until, 200)
            charts.append({"type": t["type"], "points": chart_points(series),
                           "series": [{"path": f"values.{t['type']}", "label": t["type"]}]})
        return Page("devices/device.html", {
            "title": f"Device {device.id}", "device": device.to_json(), "types": types, "charts": charts,
            "commands": await service.list_commands(device.id, 20), "key": await service.key_info(device.id),
            "offers": await service.list_offers(device.id, 10), "firmware": await service.list_firmware(),
            "device_root": service.config.device_root, "ota_root": service.config.ota_root,
        })

    @page_route("POST", "/{id}/commands", role="operator", summary="Send a command", params=(DEVICE_ID,),
                audit="devices.command", audit_target="id")
    async def command_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        name = str(call.body.get("name", "")).strip()
        raw = str(call.body.get("args", "")).strip()
        try:
            args = json.loads(raw) if raw else None
        except ValueError:
            return _not_done(call, f"/devices/{device.id}", "arguments: expected JSON, e.g. {\"delay\": 5}")
        try:
            sent = await self.service.send_command(device.id, name, args, call.actor)
        except DeviceError as e:
            return _not_done(call, f"/devices/{device.id}", str(e))
        call.detail = {"command": name}
        return Redirect(f"/devices/{device.id}", flash=f"command {name} sent ({sent['commandId']})")

    @page_route("POST", "/{id}/key", role="operator", summary="Create the device's API key", params=(DEVICE_ID,),
                audit="devices.key.create", audit_target="id")
    async def key_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        try:
            created = await self.service.create_key(device.id)
        except DeviceError as e:
            return _not_done(call, f"/devices/{device.id}", str(e))
        if call.principal.session is not None:
            call.principal.session.flash("secret", created["key"])
        return Redirect(f"/devices/{device.id}", flash="device key created — copy it now, it is shown once")

    @page_route("POST", "/{id}/key/revoke", role="operator", summary="Revoke the device's API key",
                params=(DEVICE_ID,), audit="devices.key.revoke", audit_target="id")
    async def revoke_key_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        try:
            await self.service.revoke_key(device.id)
        except DeviceError as e:
            return _not_done(call, f"/devices/{device.id}", str(e))
        return Redirect(f"/devices/{device.id}", flash="device key revoked")

    @page_route("POST", "/{id}/ota", role="operator", summary="Offer firmware to the device", params=(DEVICE_ID,),
                audit="devices.ota", audit_target="id")
    async def ota_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        try:
            firmware = int(str(call.body.get("firmware", "")))
            offer = await self.service.offer(device.id, firmware, call.actor)
        except ValueError:
            return _not_done(call, f"/devices/{device.id}", "choose a firmware image")
        except DeviceError as e:
            return _not_done(call, f"/devices/{device.id}", str(e))
        call.detail = {"firmware": firmware}
        return Redirect(f"/devices/{device.id}", flash=f"firmware {offer['version']} offered")

    @page_route("POST", "/{id}/delete", role="operator", summary="Forget a device", params=(DEVICE_ID,),
                audit="devices.forget", audit_target="id")
    async def forget_page(self, call: Call) -> Any:
        device = self._device(call.params["id"])
        try:
            await self.service.forget(device.id)
        except DeviceError as e:
            return _not_done(call, f"/devices/{device.id}", str(e))
        return Redirect("/devices", flash=f"device {device.id} forgotten")

