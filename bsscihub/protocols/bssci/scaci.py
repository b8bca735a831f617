"""SCACI: the optional mutual-TLS listener where mioty application centers (ACs) connect to the hub.
Framed as BSSCI with the identifier MIOTYA01; where the interface is not public, docs/scaci.md says what we chose."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub.bus import Event
from bsscihub.errors import CommandError
from bsscihub.protocols.bssci.config import ScaciConfig
from bsscihub.protocols.bssci.framing import Framer, FramingError, encode_frame
from bsscihub.protocols.bssci.identity import is_application_center
from bsscihub.tls import format_peer, peer_certificate

__all__ = ["MAGIC_AC", "ScaciFactory", "ScaciHub", "ScaciProtocol"]

MAGIC_AC = b"MIOTYA01"
VERSION = "1.0.0"
# errno values, as in BSSCI
EPERM, ENOENT, EINVAL, ENOSYS, EPROTO, EOPNOTSUPP = 1, 2, 22, 38, 71, 95
_MAX_USER_DATA = 255


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _eui(value: Any, name: str) -> str:
    """An EUI-64 sent as an integer (BSSCI style) or as hex digits (either case)."""
    if type(value) is int and 0 <= value < 1 << 64:
        return f"{value:016x}"
    if isinstance(value, str) and len(value) == 16:
        try:
            int(value, 16)
        except ValueError:
            pass
        else:
            return value.lower()
    raise _Refused(EINVAL, f"{name} must be an EUI-64 (an integer or 16 hex digits)")


def _bytes(value: Any, name: str, size: int | None = None) -> bytes:
    """Byte strings as BSSCI sends them (a list of integers) or as bin; a hex string is accepted too."""
    try:
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, list):
            data = bytes(v & 0xFF if type(v) is int and -128 <= v < 256 else 256 for v in value)
        elif isinstance(value, str):
            data = bytes.fromhex(value)
        else:
            raise ValueError
    except ValueError:
        raise _Refused(EINVAL, f"{name} must be a byte string") from None
    if size is not None and len(data) != size:
        raise _Refused(EINVAL, f"{name} must be {size} bytes")
    if len(data) > _MAX_USER_DATA:
        raise _Refused(EINVAL, f"{name} is longer than {_MAX_USER_DATA} bytes")
    return data


def _uint(value: Any, name: str, high: int) -> int:
    if type(value) is int and 0 <= value <= high:
        return value
    if name == "shAddr" and isinstance(value, str) and len(value) == 4:
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise _Refused(EINVAL, f"{name} must be a whole number 0..{high}")


@implementer(IHandshakeListener)
class ScaciProtocol(Protocol):
    """One application-center connection: con/conRsp/conCmp first, then AC operations (positive opIds)
    and the hub's own (negative, decreasing, per connection)."""

    log = Logger()

    def __init__(self, hub: ScaciHub) -> None:
        self.hub = hub
        self.framer = Framer(hub.max_frame, magic=MAGIC_AC)
        self.peer = "?"
        self.ac_eui: str | None = None  # set by con
        self.established = False
        self.certified = False
        self.last_ac_op = 0
        self.next_sc_op = -1
        self.pending: dict[int, str] = {}  # SC opId -> command awaiting its Rsp

    # -- transport

    def connectionMade(self) -> None:
        self.peer = format_peer(self.transport.getPeer())  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        cert = peer_certificate(self.transport)
        self.certified = cert is not None and is_application_center(cert)
        if not self.certified:
            self.log.warn("refused application center at {peer}: its certificate is not an application-center "
                          "certificate of this hub", peer=self.peer)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.certified:
            return
        try:
            messages = self.framer.feed(data)
        except FramingError as e:
            self.log.warn("closing the connection of application center {who}: {error}", who=self.describe(),
                          error=str(e))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for msg in messages:
            self.receive(msg)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.hub.connections.discard(self)
        if self.established:
            self.log.info("application center {who} disconnected: {reason}", who=self.describe(),
                          reason=reason.getErrorMessage())

    def describe(self) -> str:
        return f"{self.ac_eui or 'unknown'} at {self.peer}"

    def send(self, command: str, op: int, **fields: Any) -> None:
        self.transport.write(encode_frame({"command": command, "opId": op, **fields}, magic=MAGIC_AC))  # type: ignore[union-attr]

    def start(self, command: str, **fields: Any) -> int:
        """Begin a hub-initiated operation (negative opIds, per connection)."""
        op, self.next_sc_op = self.next_sc_op, self.next_sc_op - 1
        self.pending[op] = command
        if len(self.pending) > 10_000:  # an AC that never answers must not grow this without end
            self.pending.pop(next(iter(self.pending)))
        self.send(command, op, **fields)
        return op

    def eui_out(self, eui: str) -> int | str:
        return eui if self.hub.config.eui_strings else int(eui, 16)

    # -- messages

    def receive(self, msg: dict[str, Any]) -> None:
        command, op = msg.get("command"), msg.get("opId")
        if not isinstance(command, str) or type(op) is not int:
            self.send("error", op if type(op) is int else 0, code=EPROTO, message="command and opId are required")
            return
        if op < 0:  # the AC's answer to one of ours
            self._answer(command, op, msg)
            return
        if command == "errorAck":
            return
        if command == "con":
            self._con(op, msg)
            return
        if command == "conCmp":
            if op == 0 and self.ac_eui is not None:
                self.established = True
                self.hub.connections.add(self)
                self.log.info("application center {who} connected", who=self.describe())
            return
        if not self.established:
            self.send("error", op, code=EPROTO, message="con must come first")
            return
        if command.endswith("Cmp"):
            return  # the AC closing one of its operations
        if op <= self.last_ac_op:
            self.send("error", op, code=EPROTO, message=f"opId {op} does not increase")
            return
        self.last_ac_op = op
        if "." in command:
            self.send("error", op, code=ENOSYS, message=f"sub-channel command {command!r} is not supported")
            return
        handler = self._HANDLERS.get(command)
        if handler is None:
            self.send("error", op, code=EOPNOTSUPP, message=f"unknown command {command!r}")
            return
        d = defer.ensureDeferred(handler(self, op, msg))
        d.addErrback(self._failed, command, op)

    def _failed(self, failure: Failure, command: str, op: int) -> None:
        error = failure.value
        if isinstance(error, _Refused):
            code, text = error.code, str(error)
        elif failure.check(CommandError):
            code, text = (ENOENT if "unknown" in str(failure.value) else EINVAL), str(failure.value)
        else:
            self.log.failure("application center {who}: {command} failed", failure, who=self.describe(),
                             command=command)
            code, text = EPROTO, "internal error"
        self.send("error", op, code=code, message=f"{command}: {text}")

    def _answer(self, command: str, op: int, msg: Mapping[str, Any]) -> None:
        started = self.pending.pop(op, None)
        if started is None:
            return
        if command == "error":
            self.send("errorAck", op)
            self.log.info("application center {who} refused {command}: {message}", who=self.describe(),
                          command=started, message=str(msg.get("message", ""))[:200])
        else:
            self.send(started + "Cmp", op)

    def _con(self, op: int, msg: Mapping[str, Any]) -> None:
        if op != 0 or self.ac_eui is not None:
            self.send("error", op, code=EPROTO, message="con uses opId 0, once")
            return
        version = msg.get("version")
        if not isinstance(version, str) or version.split(".")[0] != VERSION.split(".")[0]:
            self.send("error", op, code=EPROTO, message=f"version {version!r} not supported; this hub speaks {VERSION}")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        try:
            self.ac_eui = _eui(msg.get("acEui", 0), "acEui")
        except _Refused as e:
            self.send("error", op, code=e.code, message=str(e))
            return
        center = self.hub
        self.send("conRsp", 0, version=VERSION, scEui=self.eui_out(center.sc_eui), snResume=False,
                  snScUuid=list(os.urandom(16)), vendor="bsscihub", name="bsscihub", swVersion=center.version)

    async def _ping(self, op: int, msg: Mapping[str, Any]) -> None:
        self.send("pingRsp", op)

    async def _status(self, op: int, msg: Mapping[str, Any]) -> None:
        service = self.hub.service
        now = service.clock.seconds()
        stations = await service.list_base_stations()
        online = [s for s in stations if s.get("state") == "online"]
        sensors = service.registry.sensors
        attached = sum(1 for s in sensors.values() if s.attached)
        # Both names where the open clients differ (code/rc, time/timeNs, uptime/uptimeS); unknown fields are ignored.
        self.send("statusRsp", op, code=0, rc=0, message="ok", time=int(now * 1e9), timeNs=int(now * 1e9),
                  uptime=int(now - service.started_at), uptimeS=int(now - service.started_at),
                  baseStations=len(online), numEndpoints=len(sensors), numEndpointsAttached=attached,
                  basestations=[{"bsEui": self.eui_out(s["bsEui"]), "name": s.get("name"), "online": True}
                                for s in online])

    async def _reg(self, op: int, msg: Mapping[str, Any]) -> None:
        ep = _eui(msg.get("epEui"), "epEui")
        key = _bytes(msg.get("nwkKey", msg.get("nwkSnKey")), "nwkKey", 16)
        short = _uint(msg.get("shAddr"), "shAddr", 0xFFFF)
        bidi = msg.get("bidi", False)
        if type(bidi) is not bool:
            raise _Refused(EINVAL, "bidi must be true or false")
        await self.hub.service.attach(ep, key, short, bidi, actor=f"ac:{self.ac_eui}", source="scaci")
        await self.audit("mioty.sensor.attach", ep, {"shortAddr": f"{short:04x}", "bidi": bidi})
        self.send("regRsp", op)

    async def _dereg(self, op: int, msg: Mapping[str, Any]) -> None:
        ep = _eui(msg.get("epEui"), "epEui")
        await self.hub.service.detach(ep, actor=f"ac:{self.ac_eui}", source="scaci")
        await self.audit("mioty.sensor.detach", ep, {})
        self.send("deregRsp", op)

    async def _dl_que(self, op: int, msg: Mapping[str, Any]) -> None:
        ep = _eui(msg.get("epEui"), "epEui")
        que_id = _uint(msg.get("queId"), "queId", (1 << 64) - 1)
        raw = msg.get("userData")
        if isinstance(raw, list) and raw and isinstance(raw[0], (list, bytes)):
            if len(raw) != 1:
                raise _Refused(EINVAL, "userData: packet-counter dependent downlinks (several entries) are not"
                                       " supported; send one entry")
            raw = raw[0]
        data = _bytes(raw, "userData")
        fmt = msg.get("format")
        prio = msg.get("prio")
        response_exp = msg.get("responseExp")
        result = await self.hub.service.queue_downlink(
            ep, data, format=fmt, prio=prio, response_exp=response_exp, actor=f"ac:{self.ac_eui}")
        self.hub.queued[result["queId"]] = (self.ac_eui or "", que_id, ep)
        await self.audit("mioty.downlink.queue", ep, {"queId": result["queId"], "acQueId": que_id,
                                                      "bytes": len(data)})
        self.send("dlDataQueRsp", op)

    async def _dl_rev(self, op: int, msg: Mapping[str, Any]) -> None:
        ep = _eui(msg.get("epEui"), "epEui")
        que_id = _uint(msg.get("queId"), "queId", (1 << 64) - 1)
        hub_id = next((h for h, (ac, q, e) in self.hub.queued.items() if ac == self.ac_eui and q == que_id
                       and e == ep), None)
        if hub_id is None:
            raise _Refused(ENOENT, f"no downlink {que_id} of this application center for {ep}")
        await self.hub.service.revoke_downlink(ep, hub_id, actor=f"ac:{self.ac_eui}")
        await self.audit("mioty.downlink.revoke", ep, {"queId": hub_id, "acQueId": que_id})
        self.send("dlDataRevRsp", op)

    async def audit(self, action: str, target: str, detail: Mapping[str, Any]) -> None:
        await self.hub.service._audit(f"ac:{self.ac_eui}", action, target, detail, "scaci")

    _HANDLERS = {"ping": _ping, "status": _status, "reg": _reg, "dereg": _dereg, "dlDataQue": _dl_que,
                 "dlDataRev": _dl_rev}


class ScaciHub:
    """The SCACI side of the mioty service: the connected application centers, the downlinks they
    queued (hub queId -> their own queId), and the bus events forwarded to them."""

    log = Logger()

    def __init__(self, service: Any, config: ScaciConfig, sc_eui: str, version: str, max_frame: int) -> None:
        self.service = service
        self.config = config
        self.sc_eui = sc_eui
        self.version = version
        self.max_frame = max_frame
        self.connections: set[ScaciProtocol] = set()
        self.queued: dict[int, tuple[str, int, str]] = {}  # hub queId -> (acEui, AC queId, epEui)
        self.forwarded = 0

    def on_event(self, event: Event) -> None:
        """A bus sink: uplinks to every AC, results of an AC's downlink to that AC, attach/detach as epStat."""
        if event.family != "mioty" or not self.connections:
            return
        payload = event.payload
        if event.kind == "uplink":
            for ac in list(self.connections):
                ac.start("ulData", **self._ul_data(ac, payload))
                self.forwarded += 1
        elif event.kind == "dl_result":
            entry = self.queued.get(payload.get("queId"))  # type: ignore[arg-type]
            if entry is None:
                return
            ac_eui, que_id, ep = entry
            fields: dict[str, Any] = {"queId": que_id, "result": payload.get("result")}
            if payload.get("result") == "sent":
                fields.update(txTime=payload.get("txTime"), packetCnt=payload.get("packetCnt"))
            for ac in list(self.connections):
                if ac.ac_eui == ac_eui:
                    ac.start("dlDataRes", **{**fields, "epEui": ac.eui_out(ep)})
            if payload.get("result") in ("sent", "expired", "invalid"):
                self.queued.pop(payload["queId"], None)
        elif event.kind in ("attach", "detach", "auto_detach"):
            subject = payload.get("epEui")
            if not isinstance(subject, str):
                return
            for ac in list(self.connections):
                ac.start("epStat", epEui=ac.eui_out(subject), attached=event.kind == "attach", state=event.kind)

    @staticmethod
    def _ul_data(ac: ScaciProtocol, up: Mapping[str, Any]) -> dict[str, Any]:
        data = list(bytes.fromhex(up["data"]))
        return {
            "epEui": ac.eui_out(up["epEui"]), "packetCnt": up["packetCnt"], "cnt": up["packetCnt"],
            "rxTime": up["rxTime"], "userData": data, "data": data, "format": up.get("format", 0),
            "dlOpen": up.get("dlOpen", False), "responseExp": up.get("responseExp", False),
            "dlAck": up.get("dlAck", False),
            "rxInfo": [{"bsEui": ac.eui_out(r["bsEui"]), "snr": r["snr"], "rssi": r["rssi"], "rxTime": r["rxTime"]}
                       for r in up.get("receivers", ())],
        }


class ScaciFactory(Factory):
    noisy = False

    def __init__(self, hub: ScaciHub) -> None:
        self.hub = hub

    def buildProtocol(self, addr: Any) -> ScaciProtocol:
        protocol = ScaciProtocol(self.hub)
        protocol.factory = self
        return protocol
