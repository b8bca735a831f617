"""The MQTT layout of the open mioty service center this hub replaces (`mqtt.layout: seed`), spoken both
ways so its consumers keep working: its topics, upper-case EUIs, payloads, and requests answered on `response`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from bsscihub.bus import Event
from bsscihub.contract import nanoseconds_of
from bsscihub.errors import CommandError
from bsscihub.family import IMQTTLayout

if TYPE_CHECKING:
    from bsscihub.hub import Hub
    from bsscihub.protocols.bssci.service import MiotyService

__all__ = ["SEED", "SeedLayout", "seed_messages"]

SEED = "seed"
"""The layout's name, the value of mqtt.layout."""

# statusRsp fields in the order the earlier service center published them; the rest as sent
_STATUS_FIELDS = ("code", "memLoad", "cpuLoad", "dutyCycle", "time", "uptime", "temp", "noisePwDns", "geoLocation")
_REQUESTS = ("register", "config", "cmd", "dl")
_COMMANDS = ("attach", "detach", "status")
_MAX_REQUEST = 64 * 1024

Message = tuple[str, dict[str, Any], bool]


def _seconds(value: Any) -> float | None:
    """An RFC 3339 time as Unix seconds (the seed layout's `timestamp`)."""
    ns = nanoseconds_of(value)
    return None if ns is None else ns / 1e9


def _nanoseconds(value: Any) -> Any:
    """An RFC 3339 time as integer nanoseconds, as the seed layout has station times; integers pass."""
    ns = nanoseconds_of(value)
    return value if ns is None else ns


def _upper(eui: Any) -> Any:
    return eui.upper() if isinstance(eui, str) else eui


def _snr(receiver: Mapping[str, Any]) -> float:
    snr = receiver.get("snr")
    return float(snr) if isinstance(snr, int | float) else float("-inf")


def seed_messages(event: Event, base: str) -> list[Message]:
    """The seed-layout messages (topic, payload, retain) mirroring one mioty event; usually none.

    - ``mioty/ep/{eui}/up`` -> ``{base}/ep/{EUI}/ul``: ``bs_eui``, ``rxTime``, ``snr``, ``rssi`` of the
      best receiver (highest SNR), ``cnt`` (packetCnt), ``data`` as a list of byte values.
    - ``mioty/bs/{eui}/status`` -> ``{base}/bs/{EUI}``: every statusRsp field the station sent,
      ``time`` being the station's time in nanoseconds.
    - attach, detach, auto_detach -> ``{base}/ep/{EUI}/status`` (``action``: attached, detached,
      auto_detached); inactivity_warning -> ``warning``; att_rejected -> ``error``; dl_result ->
      ``response`` (the answer to a downlink that went out, or did not).
    """
    if event.family != "mioty":
        return []
    parts = event.topic.split("/")
    if len(parts) < 4 or parts[0] != "mioty":
        return []
    what, eui, leaf = parts[1], parts[2].upper(), parts[3]
    payload = event.payload
    if what == "bs":
        if leaf != "status" or len(parts) != 4:
            return []
        doc: dict[str, Any] = {}
        for key in _STATUS_FIELDS:
            value = payload.get("bsTime", payload.get("time")) if key == "time" else payload.get(key)
            if value is not None or key in ("code", "dutyCycle", "time"):
                doc[key] = _nanoseconds(value) if key == "time" else value
        return [(f"{base}/bs/{eui}", doc, False)]
    if what != "ep":
        return []
    if leaf == "up" and len(parts) == 4:
        receivers = [r for r in payload.get("receivers") or () if isinstance(r, Mapping)]
        best: Mapping[str, Any] = max(receivers, key=_snr) if receivers else {}
        try:
            data = list(bytes.fromhex(payload.get("data") or ""))
        except (TypeError, ValueError):
            return []
        doc = {
            "bs_eui": _upper(best.get("bsEui")),
            "rxTime": best.get("rxTime", payload.get("rxTime")),
            "snr": best.get("snr"),
            "rssi": best.get("rssi"),
            "cnt": payload.get("packetCnt"),
            "data": data,
        }
        return [(f"{base}/ep/{eui}/ul", doc, False)]
    if leaf != "event" or len(parts) != 5:
        return []
    kind = parts[4]
    common = {"sensor_eui": eui, "timestamp": _seconds(payload.get("time"))}
    if kind == "attach":
        doc = {"action": "attached", **common, "source": payload.get("source")}
        if payload.get("bsEui"):
            doc["base_station_eui"] = _upper(payload["bsEui"])
        return [(f"{base}/ep/{eui}/status", doc, False)]
    if kind == "detach":
        doc = {"action": "detached", **common, "source": payload.get("source")}
        if payload.get("removed"):
            doc["removed"] = True
        return [(f"{base}/ep/{eui}/status", doc, False)]
    silent = payload.get("silentFor")
    hours = round(silent / 3600, 1) if isinstance(silent, int | float) else None
    if kind == "auto_detach":
        doc = {"action": "auto_detached", **common, "reason": "inactivity", "inactive_hours": hours}
        return [(f"{base}/ep/{eui}/status", doc, False)]
    if kind == "inactivity_warning":
        doc = {"action": "inactivity_warning", **common, "inactive_hours": hours}
        return [(f"{base}/ep/{eui}/warning", doc, False)]
    if kind == "att_rejected":
        doc = {"action": "attach_rejected", **common, "base_station_eui": _upper(payload.get("bsEui")),
               "error": payload.get("reason")}  # fmt: skip
        return [(f"{base}/ep/{eui}/error", doc, False)]
    if kind == "dl_result":
        result = payload.get("result")
        doc = {"command": "dl", "action": "dl_result", **common, "success": result == "sent",
               "queId": payload.get("queId"), "result": result, "base_station_eui": _upper(payload.get("bsEui")),
               "txTime": payload.get("txTime"), "packetCnt": payload.get("packetCnt")}  # fmt: skip
        return [(f"{base}/ep/{eui}/response", doc, False)]
    return []


@implementer(IMQTTLayout)
class SeedLayout:
    """The seed layout for one hub: `outbound` for the bridge, `inbound` requests carried out by the
    mioty service (`hub.services["mioty"]`) like the hub's own commands, one at a time per end point."""

    log = Logger()

    def __init__(self, hub: Hub, base: str) -> None:
        self.hub = hub
        self.base = base
        self._locks: dict[str, defer.DeferredLock] = {}

    def outbound(self, event: Event) -> Iterable[Message]:
        return seed_messages(event, self.base)

    def inbound(self) -> Mapping[str, Callable[..., Any]]:
        return {f"{self.base}/ep/+/{request}": self._received for request in _REQUESTS}

    def _received(self, topic: str, payload: bytes, properties: Any = None) -> defer.Deferred[None]:
        request = topic.rsplit("/", 1)[1]
        eui = topic[len(self.base) + 1 :].split("/")[1]
        lock = self._locks.get(eui.lower())
        if lock is None:
            lock = self._locks[eui.lower()] = defer.DeferredLock()
        d = lock.run(lambda: defer.Deferred.fromCoroutine(self._answer(request, eui, payload)))

        def release(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._locks.get(eui.lower()) is lock:
                del self._locks[eui.lower()]
            return result

        return d.addBoth(release)

    async def _answer(self, request: str, eui: str, payload: bytes) -> None:
        command = request
        try:
            body = _decode(payload)
            if request == "cmd":
                command = _command_name(body)
            result = await self._carry_out(command, eui, body)
            error = None
        except CommandError as e:
            result, error = {}, str(e) or "refused"
        except Exception:
            self.log.failure("seed layout: {request} for {eui} failed", request=request, eui=eui)
            result, error = {}, "internal error"
        doc: dict[str, Any] = {
            "command": command,
            "action": f"{command}_response" if error is None else "error_response",
            "sensor_eui": eui.upper(),
            "success": error is None,
            **result,
            "timestamp": self.hub.reactor.seconds(),
        }
        if error is not None:
            doc["error"] = error
            self.log.info("seed layout: {request} for {eui} refused: {error}", request=command, eui=eui, error=error)
        topic = f"{self.base}/ep/{eui.upper()}/response"
        if self.hub.mqtt is None:  # only a hub without its bridge (the CLI's) has no MQTT to answer on
            return
        try:
            await self.hub.mqtt.publish(topic, doc)
        except ValueError as e:  # a topic nobody can publish to: the EUI level held a wildcard
            self.log.info("seed layout: cannot answer on {topic}: {error}", topic=topic, error=str(e))

    async def _carry_out(self, command: str, eui: str, body: Any) -> dict[str, Any]:
        service = cast("MiotyService | None", self.hub.services.get("mioty"))
        command_handler = self.hub.commands.get("mioty")
        if service is None or command_handler is None:
            raise CommandError("the mioty service is not running")

        async def run(kind: str, ident: str, name: str, payload: Any) -> Mapping[str, Any]:
            return await command_handler(kind, ident, name, payload) or {}

        if command in ("register", "config"):
            if not isinstance(body, Mapping):
                raise CommandError("the payload must be a JSON object with nwKey, shortAddr and bidi")
            return _attached(await run("ep", eui, "attach", _keys(body)))
        if command == "attach":
            keys = _keys(body) if isinstance(body, Mapping) and "nwKey" in body else None
            if keys is None:
                sensor = service.registry.sensors.get(eui.lower())
                if sensor is None:
                    raise CommandError(f"end point {eui.upper()} is not registered: register it with its keys")
                keys = {"nwKey": sensor.nw_key.hex(), "shortAddr": f"{sensor.short_addr:04x}", "bidi": sensor.bidi}
            return _attached(await run("ep", eui, "attach", keys))
        if command == "detach":
            result = await run("ep", eui, "detach", {})
            return {"detached_from": len(result.get("baseStations", ()))}
        if command == "status":
            known = await service.get_sensor(eui)
            if known is None:
                return {"status": {"registered": False, "attached": False}}
            shown = {k: _upper(v) if k in ("epEui", "bestBs") else v for k, v in known.items()}
            return {"status": {"registered": True, **shown}}
        # dl
        if not isinstance(body, Mapping):
            raise CommandError("the payload must be a JSON object with data")
        down = {k: body[k] for k in ("format", "prio", "responseExp") if k in body}
        down["data"] = _data(body.get("data"))
        result = await run("ep", eui, "down", down)
        return {"queId": result.get("queId"), "status": result.get("status"),
                "base_stations": [_upper(bs) for bs in result.get("baseStations", ())]}  # fmt: skip


def _decode(payload: bytes) -> Any:
    """A request's payload: JSON, or a bare word (`mosquitto_pub -m detach`); empty is {}."""
    if len(payload) > _MAX_REQUEST:
        raise CommandError(f"payload larger than {_MAX_REQUEST} bytes")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    if not text:
        return {}
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        if text.isascii() and text.isalpha():
            return text
        raise CommandError("payload is neither JSON nor a command word") from None


def _command_name(body: Any) -> str:
    if isinstance(body, Mapping):
        body = body.get("command", body.get("action"))
    if not isinstance(body, str) or body.strip().lower() not in _COMMANDS:
        raise CommandError(f"unknown command {body!r} (known: {', '.join(_COMMANDS)})")
    return body.strip().lower()


def _keys(body: Mapping[str, Any]) -> dict[str, Any]:
    """The attach fields of a register/config request (hex in any case; bidi false when left out)."""
    for name in ("nwKey", "shortAddr"):
        if name not in body:
            raise CommandError(f"missing field {name!r}")
    short_addr = body["shortAddr"]
    if isinstance(short_addr, str) and len(short_addr) < 4 and short_addr.isascii() and short_addr.isalnum():
        short_addr = short_addr.rjust(4, "0")
    return {"nwKey": body["nwKey"], "shortAddr": short_addr, "bidi": body.get("bidi", False)}


def _attached(result: Mapping[str, Any]) -> dict[str, Any]:
    return {"attached_to": len(result.get("baseStations", ()))}


def _data(value: Any) -> str:
    """Downlink data as the hub's commands take it (hex), from hex or a list of byte values."""
    if isinstance(value, list):
        if not all(type(b) is int and 0 <= b <= 255 for b in value):
            raise CommandError("data must be hexadecimal digits or a list of byte values 0..255")
        return bytes(value).hex()
    if isinstance(value, str):
        return value
    raise CommandError("data must be hexadecimal digits or a list of byte values 0..255")
