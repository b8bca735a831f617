"""The mioty service center: the mutual-TLS BSSCI listener, base-station sessions, sensors, uplinks, downlinks.
It is the sessions' IServiceCenter, publishes the family's events, and serves the REST and MQTT commands."""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub import audit
from bsscihub.bus import Event
from bsscihub.errors import CommandError
from bsscihub.family import FamilyService
from bsscihub.health import ComponentHealth
from bsscihub.pki import cert_bs_eui
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.dedup import (
    LATE,
    MERGED,
    SAME_UPLINK_SPREAD_NS,
    Copy,
    Deduplicator,
    subpackets_json,
    uplink_payload,
)
from bsscihub.protocols.bssci.protocol import BSSCIFactory
from bsscihub.protocols.bssci.registry import BaseStation, ImportCounts, Registry, Sensor, attach_change, rfc3339
from bsscihub.protocols.bssci.session import (
    EACCES,
    EINVAL,
    ENOENT,
    EOPNOTSUPP,
    IServiceCenter,
    OperationFailed,
    OperationTimedOut,
    Refused,
    Session,
    SessionClosed,
    SessionConfig,
    SessionStats,
    State,
    verify_attach_signature,
)

__all__ = ["MiotyService", "UnknownDevice"]

_I64_MAX = (1 << 63) - 1
# Copies of one over-the-air attach, heard by several base stations, each get the attRsp.
OTA_COPY_WINDOW = 60.0
_MAX_TEXT = 64  # profile, mode: short radio identifiers
_MAX_DOWNLINK = 1024
_LATENCY_STEPS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class UnknownDevice(CommandError):
    """No such end point or base station (the REST layer answers 404)."""


def _eui(value: Any, what: str = "EUI") -> str:
    """16 lower-case hex digits from a hex string (any case) or an integer."""
    if type(value) is int and 0 <= value < 1 << 64:
        return f"{value:016x}"
    if isinstance(value, str) and len(value) == 16:
        try:
            int(value, 16)
        except ValueError:
            pass
        else:
            if value.isascii() and value.isalnum():
                return value.lower()
    raise CommandError(f"bad {what} {value!r}: expected 16 hexadecimal digits")


def _nw_key(value: Any) -> bytes:
    # The key itself never goes into an error message.
    if isinstance(value, bytes) and len(value) == 16:
        return value
    if isinstance(value, str) and len(value) == 32 and value.isascii():
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise CommandError("nwKey must be 32 hexadecimal digits (the AES-128 network key)")


def _short_addr(value: Any) -> int:
    if type(value) is int and 0 <= value <= 0xFFFF:
        return value
    if isinstance(value, str) and len(value) == 4 and value.isascii():
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise CommandError(f"shortAddr must be 4 hexadecimal digits, got {value!r}")


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise CommandError(f"{name} must be true or false, got {value!r}")
    return value


def _fields(payload: Mapping[str, Any], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    required, optional = tuple(required), tuple(optional)
    missing = [k for k in required if k not in payload]
    if missing:
        raise CommandError(f"missing field {missing[0]!r}")
    unknown = sorted(set(payload) - set(required) - set(optional))
    if unknown:
        known = ", ".join(chain(required, optional)) or "none"
        raise CommandError(f"unknown field {unknown[0]!r} (known: {known})")


def _jsonable(value: Any) -> Any:
    """A decoded MessagePack value as JSON can hold it (byte strings as hex)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_text(name: str, value: str | None) -> None:
    if value is not None and (len(value) > _MAX_TEXT or "\x00" in value):
        raise Refused(EINVAL, f"ulData: field {name!r} must be a short text without NUL characters")


def _copy_from_row(row: tuple[Any, ...]) -> tuple[str, Copy]:
    """A stored copy (id + UPLINK_COLUMNS) back as the Copy it was."""
    (_, ep, pc, bs, received, rx_time, rx_duration, snr, rssi, eq_snr, profile, mode, sub, data, fmt, dl_open,
     response_exp, dl_ack) = row  # fmt: skip
    subpackets = None
    if sub:
        value = json.loads(sub)
        subpackets = m.Subpackets(
            snr=tuple(value["snr"]),
            rssi=tuple(value["rssi"]),
            frequency=tuple(value["frequency"]),
            phase=tuple(value["phase"]) if "phase" in value else None,
        )
    msg = m.UlData(
        opId=0,
        epEui=int(ep, 16),
        rxTime=int(rx_time),
        rxDuration=None if rx_duration is None else int(rx_duration),
        packetCnt=int(pc),
        snr=float(snr),
        rssi=float(rssi),
        eqSnr=None if eq_snr is None else float(eq_snr),
        profile=profile,
        mode=mode,
        subpackets=subpackets,
        userData=bytes(data),
        format=int(fmt),
        dlOpen=bool(dl_open),
        responseExp=bool(response_exp),
        dlAck=bool(dl_ack),
    )
    return ep, Copy(bs, float(received), msg)


def _group_copies(rows: Iterable[tuple[Any, ...]]) -> list[tuple[str, list[Copy]]]:
    """Stored copies grouped into uplinks: same sensor and counter, rxTimes close together."""
    groups: list[tuple[str, list[Copy]]] = []
    index: dict[tuple[str, int], list[list[Copy]]] = {}
    for row in rows:
        ep, copy = _copy_from_row(row)
        candidates = index.setdefault((ep, copy.msg.packetCnt), [])
        for copies in candidates:
            if abs(copies[0].msg.rxTime - copy.msg.rxTime) <= SAME_UPLINK_SPREAD_NS:
                copies.append(copy)
                break
        else:
            copies = [copy]
            candidates.append(copies)
            groups.append((ep, copies))
    return groups


def _untrack(result: Any, d: defer.Deferred[Any], tracked: set[defer.Deferred[Any]]) -> Any:
    """A callback that forgets a Deferred the stop waits for, passing its result on."""
    tracked.discard(d)
    return result


class _Histogram:
    """A Prometheus histogram without locks (observed on the reactor thread only)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(set(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(bound), total))
        return out


@attrs.define
class _Counters:
    copies: int = 0
    uplinks: int = 0
    merged: int = 0
    late: int = 0
    replayed: int = 0
    store_failures: int = 0
    publish_failures: int = 0
    connections: int = 0
    refused: int = 0
    latency: _Histogram = attrs.field(factory=lambda: _Histogram(()))


@attrs.define
class _Downlink:
    """A queued downlink until a base station reports it sent (or every target reported)."""

    que_id: int
    ep_eui: str
    targets: list[str]
    results: dict[str, str] = attrs.field(factory=dict)


class _Metrics:
    """Exposes the service's plain counters to Prometheus at scrape time."""

    def __init__(self, service: MiotyService) -> None:
        self._service = service

    def collect(self) -> Iterable[Any]:
        service = self._service
        c, stats = service.counters, service.stats
        p = "bsscihub_mioty_"

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(p + name, doc, value=value)

        yield counter("uplink_copies", "ulData copies received and stored (each acknowledged after commit)", c.copies)
        yield counter("uplinks", "unique uplinks published (copies merged)", c.uplinks)
        yield counter("duplicate_copies", "copies merged into an uplink inside its dedup window", c.merged)
        yield counter("late_copies", "copies arriving after their uplink was published: dropped", c.late)
        yield counter("uplinks_replayed", "uplinks stored but unpublished at the last stop, published at start",
                      c.replayed)
        yield counter("uplink_store_failures", "copies that could not be stored (answered with error)",
                      c.store_failures)
        yield counter("publish_failures", "uplink events the bus did not take durably", c.publish_failures)
        yield counter("connections", "base-station sessions accepted (con)", c.connections)
        yield counter("connections_refused", "con refused (revoked, certificate of another bsEui)", c.refused)
        yield counter("framing_errors", "connections closed for a framing error", stats.framing_errors)
        yield counter("invalid_messages", "messages that failed validation (answered with error)", stats.invalid)
        yield counter("operation_timeouts", "hub-initiated operations not answered in time", stats.op_timeouts)
        yield counter("ping_timeouts", "base stations dropped for not answering a ping", stats.ping_timeouts)
        ops = CounterMetricFamily(p + "operations", "BSSCI operations started, by command and initiator",
                                  labels=["command", "initiator"])
        for command, count in sorted(stats.received.items()):
            ops.add_metric([command, "bs"], count)
        for command, count in sorted(stats.sent.items()):
            ops.add_metric([command, "sc"], count)
        yield ops
        errors = CounterMetricFamily(p + "protocol_errors", "BSSCI error messages, by direction",
                                     labels=["direction"])
        errors.add_metric(["sent"], stats.errors_sent)
        errors.add_metric(["received"], stats.errors_received)
        yield errors
        yield GaugeMetricFamily(p + "connected_base_stations", "base stations with an established session",
                                value=sum(1 for s in service.sessions.values() if s.state is State.ESTABLISHED))
        yield GaugeMetricFamily(p + "propagations_pending", "attPrp/detPrp queued or in flight",
                                value=sum(s.propagation_pending for s in service.sessions.values()))
        yield GaugeMetricFamily(p + "uplinks_pending", "uplinks inside their dedup window", value=service.dedup.pending)
        yield GaugeMetricFamily(p + "sensors_attached", "attached end points",
                                value=sum(1 for s in service.registry.sensors.values() if s.attached))
        latency = c.latency
        yield HistogramMetricFamily(p + "dedup_latency_seconds", "first copy received to uplink event published",
                                    buckets=latency.buckets(), sum_value=latency.sum)


@implementer(IServiceCenter)
class MiotyService(FamilyService):
    """The mioty family at run time (`hub.services["mioty"]`).

    Public, for the REST and MQTT layers (every EUI is 16 hex digits, any case):
    actions `attach`, `detach`, `remove_sensor`, `import_sensors`, `queue_downlink`,
    `revoke_downlink`, `query_dl_rx_status`, `poll_status`, `revoke_base_station`,
    `revoke_certificate`; queries `list_base_stations`, `get_base_station`, `list_sensors`,
    `get_sensor`, `uplink_history`, `downlinks`; and `command` (registered in `hub.commands`
    as "mioty"). Every one is a coroutine; actions raise CommandError (UnknownDevice for an
    unknown EUI) with a one-line reason. None of them writes the audit log except `command`:
    the REST layer audits its own calls.
    """

    log = Logger()
    family = "mioty"
    drain_wait = 2.0
    """Seconds the stop waits for the bus to confirm published uplinks (else re-emitted at the next start)."""

    def __init__(self, hub: Any) -> None:
        super().__init__(hub)
        self.clock = hub.reactor
        self.bssci = hub.config.section("bssci")
        self.settings = hub.config.section("mioty")
        self.registry = Registry(hub.store, self.clock)
        self.dedup = Deduplicator(self.clock, self.settings.dedup_window, self.settings.dedup_memory,
                                  self._publish_uplink)
        self.sessions: dict[str, Session] = {}
        """The current session of each base station, by bsEui (from con until it ends)."""
        self.stats = SessionStats()
        window = self.settings.dedup_window
        self.counters = _Counters(latency=_Histogram([window / 2, window, *(window + s for s in _LATENCY_STEPS)]))
        self.session_config = SessionConfig.from_bssci(self.bssci, hub.version)
        self.listener: StreamServerEndpointService | None = None
        self.port: Any = None
        """The listening port once started (`port.getHost().port` is the bound port number)."""
        self._downlinks: dict[int, _Downlink] = {}
        self._last_sent: dict[str, tuple[int, int]] = {}  # epEui -> (queId, packetCnt) of the last sent downlink
        self._ota: dict[str, tuple[int, bytes, float]] = {}  # epEui -> last accepted (attachCnt, sign, when)
        self._det_reported: dict[tuple[str, int], float] = {}
        self._unconfirmed: set[defer.Deferred[Any]] = set()
        self._writes: set[defer.Deferred[Any]] = set()
        self._publish_notes = 0
        self.started_at = self.clock.seconds()
        """A sensor is not silent while the hub was down: silence counts from here at the earliest."""
        lifecycle = max(0.05, min(60.0, self.settings.inactivity_warning / 4, self.settings.auto_detach / 4))
        self._loops = [
            (self.looping(self.sync, "syncing the sensor registry"), self.settings.flush_interval),
            (self.looping(self.check_lifecycle, "checking sensor activity"), lifecycle),
            (self.looping(self.prune, "pruning uplink history"), min(3600.0, self.settings.uplink_retention / 4)),
        ]
        hub.health.register("bssci", self._health)
        hub.metrics.register(_Metrics(self))

    # -- start and stop

    async def prepare(self) -> None:
        from bsscihub.tls import MutualTLSEndpoint, server_context_factory

        registry = self.registry
        await registry.load()
        for bs in await registry.mark_all_offline(self.clock.seconds()):
            self._publish_state(bs)
        # Late copies of uplinks published before the restart must still be dropped.
        for ep, pc, rx_time in reversed(await registry.recent_keys(self.settings.dedup_memory)):
            self.dedup.remember((ep, pc), rx_time)
        await self._replay()
        for entry in await registry.downlinks(pending_only=True):
            self._downlinks[entry["queId"]] = _Downlink(entry["queId"], entry["epEui"], list(entry["bsEuis"]))
        for loop, interval in self._loops:
            loop.start(interval, now=False)
        tls = self.hub.config.tls
        policy = server_context_factory(tls.ca, tls.cert, tls.key, lenient=tls.lenient, is_revoked=self._is_revoked)
        endpoint = MutualTLSEndpoint(serverFromString(self.hub.reactor, self.bssci.listen), policy, clock=self.clock)
        factory = BSSCIFactory(self, self.session_config, self.clock, self.stats, self.bssci.max_frame)
        self.listener = StreamServerEndpointService(endpoint, factory)
        self.listener.setName("bssci")
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)
        waiting: defer.Deferred[Any] = self.listener._waitingForPort  # type: ignore[assignment]
        self.port = await waiting
        host = self.port.getHost()
        self.log.info(
            "BSSCI listening on {host}:{port} (mutual TLS); {sensors} sensors, {stations} known base stations",
            host=host.host,
            port=host.port,
            sensors=len(registry.sensors),
            stations=len(registry.base_stations),
        )

    async def drain(self) -> None:
        for loop, _ in self._loops:
            if loop.running:
                loop.stop()
        for session in list(self.sessions.values()):
            session.close("the hub is stopping")
        self.dedup.flush()
        # Confirmed now means not published twice after the restart.
        deadline = self.clock.seconds() + self.drain_wait
        while self._unconfirmed and self.clock.seconds() < deadline:
            await task.deferLater(self.clock, 0.01, lambda: None)
        if self._unconfirmed:
            self.log.warn("{count} uplinks not confirmed by the bus; they are published again at the next start",
                          count=len(self._unconfirmed))
        await defer.DeferredList(list(self._writes), consumeErrors=True)
        await self.registry.flush()

    def _health(self) -> ComponentHealth:
        established = sorted(eui for eui, s in self.sessions.items() if s.state is State.ESTABLISHED)
        return ComponentHealth(
            bool(self.running) and self.port is not None,
            {"listen": self.bssci.listen, "connected": len(established), "baseStations": established},
        )

    async def _replay(self) -> None:
        """Publish what was stored (and acknowledged) but not published before the last stop."""
        rows = await self.registry.unpublished()
        groups = _group_copies(rows)
        for ep, copies in groups:
            self._publish_uplink((ep, copies[0].msg.packetCnt), copies, min(c.received for c in copies), replay=True)
        if groups:
            self.counters.replayed += len(groups)
            self.log.info("published {count} uplinks ({copies} copies) stored before the last stop",
                          count=len(groups), copies=len(rows))

    # -- IServiceCenter: the sessions' side

    def _is_revoked(self, cert: Any) -> str | None:
        """The TLS handshake's revocation check: from memory, on the reactor thread."""
        reason = self.registry.revoked_serials.get(cert.serial_number)
        if reason is not None:
            return reason or "revoked"
        eui = cert_bs_eui(cert)
        bs = self.registry.base_stations.get(eui) if eui else None
        if bs is not None and bs.revoked:
            return f"base station {eui} is revoked: {bs.revoked_reason or 'no reason given'}"
        return None

    def session_connecting(self, session: Session, con: m.Con) -> None:
        eui = session.bs_hex
        bs = self.registry.base_stations.get(eui)
        if bs is not None and bs.revoked:
            self.counters.refused += 1
            raise Refused(EACCES, f"base station {eui} is revoked: {bs.revoked_reason or 'no reason given'}")
        cert = session.certificate
        if cert is None:  # the TLS policy demands one; fail closed all the same
            self.counters.refused += 1
            raise Refused(EACCES, "no client certificate")
        bound = cert_bs_eui(cert)
        if bound is not None and bound != eui:
            self.counters.refused += 1
            raise Refused(EACCES, f"the client certificate belongs to base station {bound}, not to {eui}")
        if cert.serial_number in self.registry.revoked_serials:
            self.counters.refused += 1
            raise Refused(EACCES, f"certificate serial {cert.serial_number:#x} is revoked")
        old = self.sessions.get(eui)
        self.sessions[eui] = session
        self.counters.connections += 1
        if old is not None and not old.closed:
            self.log.warn(
                "base station {bsEui} connected again from {peer}; closing its older connection from {old}",
                bsEui=eui,
                peer=session.peer,
                old=old.peer,
            )
            # Aborted: a station that reconnected has usually lost the old connection silently.
            old.close("replaced by a newer connection of the same bsEui", abort=True)

    def session_ready(self, session: Session) -> None:
        con = session.con
        assert con is not None
        now = self.clock.seconds()
        eui = session.bs_hex
        bs = self.registry.base_stations.get(eui) or BaseStation(eui, first_seen=now, last_seen=now, since=now)
        cert = session.certificate
        bs.vendor, bs.model, bs.name, bs.sw_version = con.vendor, con.model, con.name, con.swVersion
        bs.version, bs.bidi, bs.peer = con.version, con.bidi, session.peer
        bs.geo = list(con.geoLocation) if con.geoLocation is not None else bs.geo
        if cert is not None:
            bs.cert_serial, bs.cert_subject = f"{cert.serial_number:#x}", cert.subject.rfc4514_string()
        bs.online, bs.since, bs.last_seen = True, now, now
        self._save_base_station(bs)
        self._publish_state(bs)
        attached = [int(s.eui, 16) for s in self.registry.sensors.values() if s.attached]
        self.log.info(
            "base station {bsEui} ({vendor} {model}, BSSCI {version}) connected from {peer};"
            " propagating {count} attached end points",
            bsEui=eui,
            vendor=con.vendor or "unknown vendor",
            model=con.model or "",
            version=con.version,
            peer=session.peer,
            count=len(attached),
        )
        # Always all of them: a base station forgets its attachments when it reconnects.
        session.propagate((True, ep) for ep in attached)

    def session_closed(self, session: Session, reason: str) -> None:
        eui = session.bs_hex
        if self.sessions.get(eui) is not session:
            return  # replaced by a newer connection: still online
        del self.sessions[eui]
        bs = self.registry.base_stations.get(eui)
        self.log.info("base station {bsEui} at {peer} disconnected: {reason}", bsEui=eui, peer=session.peer,
                      reason=reason)
        if bs is not None and bs.online:
            now = self.clock.seconds()
            bs.online, bs.since, bs.last_seen = False, now, now
            self._save_base_station(bs)
            self._publish_state(bs)

    def uplink(self, session: Session, msg: m.UlData) -> defer.Deferred[None]:
        # Checked before the batch: one row the database refuses would fail all the others.
        if msg.packetCnt > _I64_MAX or msg.rxTime > _I64_MAX or (msg.rxDuration or 0) > _I64_MAX:
            raise Refused(EINVAL, "ulData: packetCnt, rxTime and rxDuration must be below 2**63")
        if (msg.format or 0) > _I64_MAX:
            raise Refused(EINVAL, "ulData: field 'format' must be below 2**63")
        snr, rssi, eq_snr = msg.snr, msg.rssi, msg.eqSnr
        if not (math.isfinite(snr) and math.isfinite(rssi) and (eq_snr is None or math.isfinite(eq_snr))):
            raise Refused(EINVAL, "ulData: snr, rssi and eqSnr must be finite numbers")
        _check_text("profile", msg.profile)
        _check_text("mode", msg.mode)
        sub = msg.subpackets
        sub_json = None
        if sub is not None:
            if not all(map(math.isfinite, chain(sub.snr, sub.rssi, sub.frequency, sub.phase or ()))):
                raise Refused(EINVAL, "ulData: subpackets must hold finite numbers")
            sub_json = json.dumps(subpackets_json(sub))
        ep = f"{msg.epEui:016x}"
        now = self.clock.seconds()
        self.dedup.sweep_due(now)
        bs = session.bs_hex
        self.counters.copies += 1
        stored = self.registry.add_uplink(
            (ep, msg.packetCnt, bs, now, msg.rxTime, msg.rxDuration, snr, rssi, eq_snr, msg.profile, msg.mode,
             sub_json, msg.userData, msg.format or 0, int(msg.dlOpen), int(msg.responseExp), int(msg.dlAck))
        )  # fmt: skip
        stored.addCallbacks(self._copy_stored, self._copy_failed, (ep, Copy(bs, now, msg)))
        return stored

    def _copy_stored(self, _: object, ep: str, copy: Copy) -> None:
        # Deduplicated only once stored: an event never mentions an uncommitted copy.
        outcome = self.dedup.add((ep, copy.msg.packetCnt), copy)
        if outcome == MERGED:
            self.counters.merged += 1
        elif outcome == LATE:
            self.counters.late += 1
            self.registry.mark_published(ep, copy.msg.packetCnt)

    def _copy_failed(self, failure: Failure) -> Failure:
        self.counters.store_failures += 1
        return failure

    def _publish_uplink(self, key: tuple[str, int], copies: list[Copy], first: float, replay: bool = False) -> None:
        ep, packet_cnt = key
        payload = uplink_payload(ep, copies, first)
        if not replay:
            self.counters.latency.observe(self.clock.seconds() - first)
        self.counters.uplinks += 1
        sensor = self.registry.sensors.get(ep)
        if sensor is not None and (sensor.last_seen is None or first >= sensor.last_seen):
            receivers = payload["receivers"]
            sensor.last_seen, sensor.last_packet_cnt = first, packet_cnt
            sensor.best_bs, sensor.best_snr = receivers[0]["bsEui"], receivers[0]["snr"]
            sensor.paths = tuple(r["bsEui"] for r in receivers)
            sensor.warned = False
            self.registry.dirty(ep)
        if payload["dlAck"]:
            self._downlink_acked(ep, packet_cnt)
        d = self.hub.bus.publish(Event("mioty", "uplink", f"mioty/ep/{ep}/up", payload))
        if not d.called:
            self._unconfirmed.add(d)
            d.addBoth(_untrack, d, self._unconfirmed)
        d.addCallbacks(self._published, self._publish_failed, callbackArgs=(ep, packet_cnt),
                       errbackArgs=(ep, packet_cnt))

    def _published(self, _: object, ep: str, packet_cnt: int) -> None:
        self.registry.mark_published(ep, packet_cnt)

    def _publish_failed(self, failure: Failure, ep: str, packet_cnt: int) -> None:
        # Not marked: the uplink is stored and published again at the next start.
        self.counters.publish_failures += 1
        self._publish_notes += 1
        if self._publish_notes <= 10 or self._publish_notes & (self._publish_notes - 1) == 0:
            self.log.warn("the bus did not take uplink {epEui}/{packetCnt} ({count} so far): {problem}", epEui=ep,
                          packetCnt=packet_cnt, count=self._publish_notes, problem=failure.getErrorMessage())

    def attach_request(self, session: Session, msg: m.Att) -> defer.Deferred[m.AttRsp]:
        return defer.Deferred.fromCoroutine(self._ota_attach(session, msg))

    async def _ota_attach(self, session: Session, msg: m.Att) -> m.AttRsp:
        ep = f"{msg.epEui:016x}"
        now = self.clock.seconds()
        sensor = self.registry.sensors.get(ep)
        reason, code = None, EACCES
        if sensor is None:
            reason, code = f"end point {ep} is not registered at this service center", ENOENT
        elif not verify_attach_signature(sensor.nw_key, msg.epEui, msg.attachCnt, msg.sign):
            reason = f"the signature of end point {ep} does not verify with its key"
        elif sensor.attach_cnt is not None and msg.attachCnt <= sensor.attach_cnt:
            last = self._ota.get(ep)
            if last is None or last[:2] != (msg.attachCnt, msg.sign) or now - last[2] > OTA_COPY_WINDOW:
                reason = f"replayed attachCnt {msg.attachCnt} of end point {ep} (the last one was {sensor.attach_cnt})"
        if reason is not None:
            self._ep_event(ep, "att_rejected", {"bsEui": session.bs_hex, "attachCnt": msg.attachCnt,
                                                "reason": reason})
            raise Refused(code, f"att: {reason}")
        assert sensor is not None
        key, short_addr = sensor.nw_key, sensor.short_addr
        if sensor.attach_cnt is None or msg.attachCnt > sensor.attach_cnt:
            # Claimed at once, before the write: another copy arriving meanwhile is a copy.
            sensor.attach_cnt = msg.attachCnt
            self._ota[ep] = (msg.attachCnt, msg.sign, now)
            if msg.shAddr is not None:
                short_addr = msg.shAddr

            def make(old: Sensor | None) -> Sensor:
                base = old or sensor
                return attrs.evolve(base, attach_cnt=msg.attachCnt, attached=True, short_addr=short_addr,
                                    attached_at=now, dual_chan=msg.dualChan, repetition=msg.repetition,
                                    wide_carr_off=msg.wideCarrOff, long_blk_dist=msg.longBlkDist)

            await self.registry.save_sensors({ep: make})
            self._propagate(True, ep, exclude=session)
            self._ep_event(ep, "attach", {"source": "ota", "bsEui": session.bs_hex, "attachCnt": msg.attachCnt,
                                          "shortAddr": f"{short_addr:04x}"})
            await self._audit(f"bs:{session.bs_hex}", "mioty.sensor.ota_attach", ep, {"attachCnt": msg.attachCnt},
                              "bssci")
        return m.AttRsp(opId=msg.opId, nwkSnKey=key, shAddr=None if msg.shAddr is not None else short_addr)

    def detach_request(self, session: Session, msg: m.Det) -> defer.Deferred[m.DetRsp]:
        ep = f"{msg.epEui:016x}"
        now = self.clock.seconds()
        key = (ep, msg.packetCnt)
        # One report per request, not per base station that heard it.
        if now - self._det_reported.get(key, -math.inf) > OTA_COPY_WINDOW:
            if len(self._det_reported) > 1000:
                self._det_reported.clear()
            self._det_reported[key] = now
            sensor = self.registry.sensors.get(ep)
            self._ep_event(ep, "det_request", {
                "bsEui": session.bs_hex, "packetCnt": msg.packetCnt, "rxTime": msg.rxTime, "snr": msg.snr,
                "rssi": msg.rssi, "sign": msg.sign.hex(), "registered": sensor is not None,
                "attached": bool(sensor and sensor.attached),
            })  # fmt: skip
            self.log.warn("end point {epEui} asked over the air to detach (via {bsEui}); detach it by hand",
                          epEui=ep, bsEui=session.bs_hex)
        return defer.fail(Refused(
            EOPNOTSUPP,
            "det: over-the-air detach is not supported (the detRsp signature is not publicly specified);"
            " the request was reported to the operator, who can detach the end point",
        ))  # fmt: skip

    def downlink_result(self, session: Session, msg: m.DlDataRes) -> None:
        ep = f"{msg.epEui:016x}"
        self._ep_event(ep, "dl_result", {"queId": msg.queId, "bsEui": session.bs_hex, "result": msg.result,
                                         "txTime": msg.txTime, "packetCnt": msg.packetCnt})
        entry = self._downlinks.get(msg.queId)
        if entry is None:
            self.log.info("dlDataRes {result} from {bsEui} for queId {queId}, which is not pending",
                          result=msg.result, bsEui=session.bs_hex, queId=msg.queId)
            return
        entry.results[session.bs_hex] = msg.result
        sent = msg.result == "sent"
        if not sent and set(entry.results) < set(entry.targets):
            return  # other base stations may still send it
        del self._downlinks[msg.queId]
        if sent:
            if msg.packetCnt is not None:
                self._last_sent[entry.ep_eui] = (msg.queId, msg.packetCnt)
            for other in entry.targets:
                if other != session.bs_hex and other in self.sessions:
                    self._request(self.sessions[other], lambda op, e=entry: m.DlDataRev(
                        opId=op, epEui=int(e.ep_eui, 16), queId=e.que_id))  # fmt: skip
        self._background(self.registry.update_downlink(
            msg.queId, self.clock.seconds(), status=msg.result, result_bs=session.bs_hex, tx_time=msg.txTime,
            packet_cnt=msg.packetCnt,
        ), "recording a downlink result")  # fmt: skip

    def _downlink_acked(self, ep: str, packet_cnt: int) -> None:
        last = self._last_sent.get(ep)
        if last is not None and last[1] == packet_cnt - 1:
            del self._last_sent[ep]
            self._background(self.registry.update_downlink(last[0], self.clock.seconds(), acked=True),
                             "recording a downlink acknowledgement")

    def downlink_rx_status(self, session: Session, msg: m.DlRxStat) -> None:
        self._ep_event(f"{msg.epEui:016x}", "dl_rx_status", {
            "bsEui": session.bs_hex, "rxTime": msg.rxTime, "packetCnt": msg.packetCnt, "dlRxSnr": msg.dlRxSnr,
            "dlRxRssi": msg.dlRxRssi,
        })  # fmt: skip

    def status_report(self, session: Session, msg: m.StatusRsp) -> None:
        now = self.clock.seconds()
        payload: dict[str, Any] = {"code": msg.code, "message": msg.message, "bsTime": msg.time,
                                   "dutyCycle": msg.dutyCycle}
        for name in ("geoLocation", "uptime", "temp", "cpuLoad", "memLoad", "config"):
            value = getattr(msg, name)
            if value is not None:
                payload[name] = list(value) if name == "geoLocation" else _jsonable(value)
        payload["time"] = rfc3339(now)
        bs = self.registry.base_stations.get(session.bs_hex)
        if bs is not None:
            bs.last_status, bs.status_time, bs.last_seen = payload, now, now
            if msg.geoLocation is not None:
                bs.geo = list(msg.geoLocation)
            self._save_base_station(bs)
        self._event("status", f"mioty/bs/{session.bs_hex}/status", payload, retain=True)

    def propagation(self, session: Session, attach: bool, ep_eui: int, op_id: int) -> m.Message | None:
        sensor = self.registry.sensors.get(f"{ep_eui:016x}")
        if not attach:
            # Re-attached meanwhile: the attPrp queued after this detPrp says the rest.
            return None if sensor is not None and sensor.attached else m.DetPrp(opId=op_id, epEui=ep_eui)
        if sensor is None or not sensor.attached:
            return None
        return m.AttPrp(
            opId=op_id,
            epEui=ep_eui,
            bidi=sensor.bidi,
            nwkSnKey=sensor.nw_key,
            shAddr=sensor.short_addr,
            lastPacketCnt=sensor.last_packet_cnt or 0,
            dualChan=sensor.dual_chan,
            repetition=sensor.repetition,
            wideCarrOff=sensor.wide_carr_off,
            longBlkDist=sensor.long_blk_dist,
            epClass=sensor.ep_class,
            syncBurst=sensor.sync_burst,
        )

    # -- events and background writes

    def _event(self, kind: str, topic: str, payload: Mapping[str, Any], retain: bool = False) -> None:
        d = self.hub.bus.publish(Event("mioty", kind, topic, payload, retain))
        d.addErrback(lambda f: self.log.warn("publishing {topic} failed: {problem}", topic=topic,
                                             problem=f.getErrorMessage()))

    def _ep_event(self, ep: str, kind: str, fields: Mapping[str, Any]) -> None:
        payload = {"epEui": ep, **fields, "time": rfc3339(self.clock.seconds())}
        self._event(kind, f"mioty/ep/{ep}/event/{kind}", payload)

    def _publish_state(self, bs: BaseStation) -> None:
        self._event("state", f"mioty/bs/{bs.eui}/state", bs.state_payload(), retain=True)

    def _background(self, work: Any, what: str) -> None:
        """Run a database write without waiting for it; the stop waits for all of them."""
        d = work if isinstance(work, defer.Deferred) else defer.Deferred.fromCoroutine(work)
        d.addErrback(lambda f: self.log.failure("mioty: {what} failed", f, what=what))
        if not d.called:
            self._writes.add(d)
            d.addBoth(_untrack, d, self._writes)

    def _save_base_station(self, bs: BaseStation) -> None:
        self._background(self.registry.save_base_station(bs), f"saving base station {bs.eui}")

    async def _audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any], source: str) -> None:
        try:
            await audit.record(self.hub.store, actor, action, target, detail, source)
        except Exception:
            self.log.failure("writing the audit log failed ({action} {target})", action=action, target=target)

    def _established(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.state is State.ESTABLISHED]

    def _propagate(self, attach: bool, ep: str, exclude: Session | None = None) -> list[str]:
        """Queue attPrp/detPrp of one end point on every connected base station."""
        item = (attach, int(ep, 16))
        targets = []
        for session in self._established():
            if session is not exclude:
                session.propagate((item,))
                targets.append(session.bs_hex)
        return sorted(targets)

    def _request(self, session: Session, make: Any) -> defer.Deferred[Any]:
        d = session.request(make)
        d.addErrback(lambda f: self.log.info("{bs}: {problem}", bs=session.describe(), problem=f.getErrorMessage()))
        return d

    # -- periodic work

    async def sync(self) -> None:
        """Write sensor hot state back; take in sensor changes made by other processes (e.g. `sensors import`)."""
        await self.registry.flush_state()
        changed, deleted = await self.registry.sensor_changes()
        for sensor in changed:
            old = self.registry.adopt(sensor)
            self._announce_change(sensor, old, "external")
        for eui in deleted:
            old = self.registry.sensors.pop(eui, None)
            if old is not None and old.attached:
                self._propagate(False, eui)
                self._ep_event(eui, "detach", {"source": "external", "removed": True})
        online = [s.bs_hex for s in self._established()]
        await self.registry.touch_base_stations(online, self.clock.seconds())

    def _announce_change(self, sensor: Sensor, old: Sensor | None, source: str) -> list[str]:
        """Propagate and report a sensor whose configuration may have changed."""
        if sensor.attached:
            if old is not None and old.attached and old.config() == sensor.config():
                return []
            targets = self._propagate(True, sensor.eui)
            self._ep_event(sensor.eui, "attach", {"source": source, "shortAddr": f"{sensor.short_addr:04x}",
                                                  "bidi": sensor.bidi})
            return targets
        if old is not None and old.attached:
            targets = self._propagate(False, sensor.eui)
            self._ep_event(sensor.eui, "detach", {"source": source})
            return targets
        return []

    async def check_lifecycle(self, now: float | None = None) -> None:
        """Warn about silent sensors (mioty.inactivity_warning) and detach them (mioty.auto_detach)."""
        now = self.clock.seconds() if now is None else now
        settings = self.settings
        for sensor in list(self.registry.sensors.values()):
            if not sensor.attached:
                continue
            since = max(sensor.last_seen or sensor.attached_at or sensor.created_at, self.started_at)
            silent = now - since
            fields = {"lastSeen": None if sensor.last_seen is None else rfc3339(sensor.last_seen),
                      "silentFor": round(silent)}
            if silent >= settings.auto_detach:
                await self._save_attached(sensor.eui, False)
                self._propagate(False, sensor.eui)
                self._ep_event(sensor.eui, "auto_detach", fields)
                self.log.info("end point {epEui} detached after {hours:.0f} h without an uplink", epEui=sensor.eui,
                              hours=silent / 3600)
                await self._audit("hub", "mioty.sensor.auto_detach", sensor.eui, fields, "mioty")
            elif silent >= settings.inactivity_warning and not sensor.warned:
                sensor.warned = True
                self._ep_event(sensor.eui, "inactivity_warning", fields)

    async def prune(self) -> None:
        """Delete uplink history older than mioty.uplink_retention (never unpublished copies)."""
        deleted = await self.registry.prune_uplinks(self.clock.seconds() - self.settings.uplink_retention)
        if deleted:
            self.log.info("pruned {count} uplink copies older than the retention", count=deleted)

    async def _save_attached(self, eui: str, attached: bool) -> Sensor:
        now = self.clock.seconds()
        cached = self.registry.sensors[eui]

        def make(old: Sensor | None) -> Sensor:
            base = old or cached
            return attrs.evolve(base, attached=attached,
                                attached_at=base.attached_at if base.attached or not attached else now)

        await self.registry.save_sensors({eui: make})
        return self.registry.sensors[eui]

    # -- actions (REST and MQTT)

    async def attach(
        self,
        ep_eui: str,
        nw_key: str | bytes,
        short_addr: str | int,
        bidi: bool,
        *,
        actor: str = "system",
        source: str = "api",
    ) -> dict[str, Any]:
        """Register the end point (or change it) and attach it: attPrp to every connected base
        station. `nw_key`: 32 hex digits or 16 bytes; `short_addr`: 4 hex digits or an int.
        Returns {"epEui", "attached": true, "baseStations": [bsEui the attPrp was queued on]}."""
        eui, key, addr = _eui(ep_eui, "end point EUI"), _nw_key(nw_key), _short_addr(short_addr)
        bidi = _bool(bidi, "bidi")
        _, changed = await self.registry.save_sensors(
            {eui: attach_change(eui, key, addr, bidi, self.clock.seconds())}
        )
        sensor = self.registry.sensors[eui]
        # Attaching again re-propagates even if nothing changed: the operator asked for it.
        targets = self._propagate(True, eui)
        self._ep_event(eui, "attach", {"source": source, "shortAddr": f"{sensor.short_addr:04x}", "bidi": bidi})
        self.log.info("end point {epEui} attached by {actor}; attPrp to {count} base stations", epEui=eui,
                      actor=actor, count=len(targets))
        return {"epEui": eui, "attached": True, "changed": bool(changed), "baseStations": targets}

    async def detach(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        """Detach the end point: detPrp to every connected base station (it stays registered).
        Returns {"epEui", "attached": false, "baseStations": [...]}."""
        eui = self._known_sensor(ep_eui).eui
        await self._save_attached(eui, False)
        targets = self._propagate(False, eui)
        self._ep_event(eui, "detach", {"source": source})
        self.log.info("end point {epEui} detached by {actor}", epEui=eui, actor=actor)
        return {"epEui": eui, "attached": False, "baseStations": targets}

    async def remove_sensor(self, ep_eui: str, *, actor: str = "system", source: str = "api") -> dict[str, Any]:
        """Detach the end point and delete it from the registry (its uplink history stays)."""
        sensor = self._known_sensor(ep_eui)
        await self.registry.delete_sensor(sensor.eui)
        targets = self._propagate(False, sensor.eui)
        self._ep_event(sensor.eui, "detach", {"source": source, "removed": True})
        self.log.info("end point {epEui} removed by {actor}", epEui=sensor.eui, actor=actor)
        return {"epEui": sensor.eui, "removed": True, "baseStations": targets}

    async def import_sensors(self, entries: Iterable[tuple[str, bytes, int, bool]], *,
                             source: str = "import") -> ImportCounts:
        """Register and attach (eui, nwKey, shortAddr, bidi) entries, validated beforehand;
        changed ones are propagated at once. Used by endpoints.import_endpoints."""
        now = self.clock.seconds()
        changes = {eui: attach_change(eui, key, addr, bidi, now) for eui, key, addr, bidi in entries}
        counts, changed = await self.registry.save_sensors(changes)
        for new, stored in changed:
            self._announce_change(new, stored, source)
        return counts

    async def queue_downlink(
        self,
        ep_eui: str,
        data: bytes | str,
        *,
        format: int | None = None,
        prio: float | None = None,
        response_exp: bool | None = None,
        actor: str = "system",
    ) -> dict[str, Any]:
        """Queue a downlink (dlDataQue) on the end point's best bidirectional base station (by the
        SNR of its last uplink), or on every connected bidirectional one if none heard it yet.
        Waits for the base stations' dlDataQueRsp; the outcome comes later as a dl_result event.
        Returns {"epEui", "queId", "status": "accepted", "baseStations"}."""
        sensor = self._known_sensor(ep_eui)
        if isinstance(data, str):
            try:
                data = bytes.fromhex(data)
            except ValueError:
                raise CommandError("data must be hexadecimal digits, two per byte") from None
        if not isinstance(data, bytes) or len(data) > _MAX_DOWNLINK:
            raise CommandError(f"data must be at most {_MAX_DOWNLINK} bytes")
        if format is not None and (type(format) is not int or not 0 <= format <= 255):
            raise CommandError(f"format must be an integer 0..255, got {format!r}")
        if prio is not None and (type(prio) not in (int, float) or not math.isfinite(prio) or prio < 0):
            raise CommandError(f"prio must be a non-negative number, got {prio!r}")
        if response_exp is not None:
            _bool(response_exp, "responseExp")
        if not sensor.attached:
            raise CommandError(f"end point {sensor.eui} is detached")
        if not sensor.bidi:
            raise CommandError(f"end point {sensor.eui} is not bidirectional (bidi is false)")
        targets = self._downlink_targets(sensor)
        if not targets:
            raise CommandError(f"no connected bidirectional base station can reach end point {sensor.eui}")
        now = self.clock.seconds()
        bs_euis = [s.bs_hex for s in targets]
        que_id = await self.registry.add_downlink(sensor.eui, data, format, prio, response_exp, actor, bs_euis, now)
        entry = self._downlinks[que_id] = _Downlink(que_id, sensor.eui, bs_euis)
        ep_int = int(sensor.eui, 16)

        def make(op: int) -> m.Message:
            return m.DlDataQue(opId=op, epEui=ep_int, queId=que_id, cntDepend=False, userData=(data,),
                               format=format, prio=None if prio is None else float(prio), responseExp=response_exp)

        results = await defer.DeferredList([s.request(make) for s in targets], consumeErrors=True)
        accepted = [bs for bs, (ok, _) in zip(bs_euis, results, strict=True) if ok]
        problems = [f"{bs}: {value.getErrorMessage()}" for bs, (ok, value) in zip(bs_euis, results, strict=True)
                    if not ok]
        now = self.clock.seconds()
        if not accepted:
            self._downlinks.pop(que_id, None)
            await self.registry.update_downlink(que_id, now, status="rejected", error="; ".join(problems))
            raise CommandError(f"downlink {que_id} not queued: {'; '.join(problems)}")
        entry.targets = accepted
        if que_id in self._downlinks:
            await self.registry.update_downlink(que_id, now, status="accepted", targets=accepted)
        self.log.info("downlink {queId} for {epEui} ({size} bytes) queued on {bsEuis} by {actor}", queId=que_id,
                      epEui=sensor.eui, size=len(data), bsEuis=",".join(accepted), actor=actor)
        return {"epEui": sensor.eui, "queId": que_id, "status": "accepted", "baseStations": accepted}

    def _downlink_targets(self, sensor: Sensor) -> list[Session]:
        for bs in sensor.paths or ((sensor.best_bs,) if sensor.best_bs else ()):
            session = self.sessions.get(bs)
            if session is not None and session.state is State.ESTABLISHED and session.bidi:
                return [session]
        return [s for s in self._established() if s.bidi]

    async def revoke_downlink(self, ep_eui: str, que_id: int, *, actor: str = "system") -> dict[str, Any]:
        """Withdraw a queued downlink (dlDataRev to the base stations holding it)."""
        sensor = self._known_sensor(ep_eui)
        entry = self._downlinks.get(que_id) if type(que_id) is int else None
        if entry is None or entry.ep_eui != sensor.eui:
            raise CommandError(f"no pending downlink {que_id!r} for end point {sensor.eui}")
        sessions = [self.sessions[bs] for bs in entry.targets if bs in self.sessions]
        results = await defer.DeferredList(
            [s.request(lambda op: m.DlDataRev(opId=op, epEui=int(sensor.eui, 16), queId=que_id)) for s in sessions],
            consumeErrors=True,
        )
        problems = [f"{s.bs_hex}: {v.getErrorMessage()}" for s, (ok, v) in zip(sessions, results, strict=True)
                    if not ok]
        self._downlinks.pop(que_id, None)
        await self.registry.update_downlink(que_id, self.clock.seconds(), status="revoked",
                                            error="; ".join(problems) or None)
        self.log.info("downlink {queId} for {epEui} revoked by {actor}", queId=que_id, epEui=sensor.eui, actor=actor)
        return {"epEui": sensor.eui, "queId": que_id, "status": "revoked", "problems": problems}

    async def query_dl_rx_status(self, ep_eui: str) -> dict[str, Any]:
        """Ask the base stations on the end point's path for its downlink reception status
        (dlRxStatQry); the answers arrive as dl_rx_status events."""
        sensor = self._known_sensor(ep_eui)
        targets = self._downlink_targets(sensor)
        results = await defer.DeferredList(
            [s.request(lambda op: m.DlRxStatQry(opId=op, epEui=int(sensor.eui, 16))) for s in targets],
            consumeErrors=True,
        )
        asked = [s.bs_hex for s, (ok, _) in zip(targets, results, strict=True) if ok]
        return {"epEui": sensor.eui, "baseStations": asked}

    async def poll_status(self, bs_eui: str) -> dict[str, Any]:
        """Poll a connected base station's status now; returns the `mioty/bs/{bsEui}/status` payload."""
        eui = _eui(bs_eui, "base-station EUI")
        session = self.sessions.get(eui)
        if session is None or session.state is not State.ESTABLISHED:
            if eui not in self.registry.base_stations:
                raise UnknownDevice(f"unknown base station {eui}")
            raise CommandError(f"base station {eui} is not connected")
        try:
            await session.poll_status()
        except (OperationFailed, OperationTimedOut, SessionClosed) as e:
            raise CommandError(str(e)) from None
        bs = self.registry.base_stations[eui]
        return {"bsEui": eui, **(bs.last_status or {})}

    async def revoke_base_station(self, bs_eui: str, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        """Revoke a base station: close its connection, refuse its bsEui at `con` and the serial of
        the certificate it last used in the TLS handshake, from now on."""
        eui = _eui(bs_eui, "base-station EUI")
        bs = self.registry.base_stations.get(eui)
        if bs is None:
            raise UnknownDevice(f"unknown base station {eui}")
        if not isinstance(reason, str):
            raise CommandError("reason must be a string")
        now = self.clock.seconds()
        bs.revoked, bs.revoked_reason, bs.revoked_at = True, reason or None, now
        await self.registry.save_base_station(bs)
        session = self.sessions.get(eui)
        serials = {int(bs.cert_serial, 16)} if bs.cert_serial else set()
        if session is not None and session.certificate is not None:
            serials.add(session.certificate.serial_number)
        for serial in serials:
            await self.registry.revoke_certificate(serial, reason or f"base station {eui} revoked", actor, now)
        self.log.warn("base station {bsEui} revoked by {actor}: {reason}", bsEui=eui, actor=actor,
                      reason=reason or "no reason given")
        if session is not None:
            session.close(f"revoked by {actor}")
        return {**bs.to_json(), "revokedSerials": [f"{s:#x}" for s in sorted(serials)]}

    async def revoke_certificate(self, serial: int, reason: str = "", *, actor: str = "system") -> dict[str, Any]:
        """Refuse a client certificate by serial number (in every future TLS handshake)."""
        if type(serial) is not int or serial <= 0:
            raise CommandError(f"bad certificate serial {serial!r}")
        await self.registry.revoke_certificate(serial, reason or "revoked", actor, self.clock.seconds())
        for session in list(self.sessions.values()):
            if session.certificate is not None and session.certificate.serial_number == serial:
                session.close(f"certificate revoked by {actor}")
        self.log.warn("certificate serial {serial} revoked by {actor}", serial=f"{serial:#x}", actor=actor)
        return {"serial": f"{serial:#x}", "revoked": True}

    def _known_sensor(self, ep_eui: str) -> Sensor:
        eui = _eui(ep_eui, "end point EUI")
        sensor = self.registry.sensors.get(eui)
        if sensor is None:
            raise UnknownDevice(f"unknown end point {eui}")
        return sensor

    # -- queries (REST)

    async def list_base_stations(self) -> list[dict[str, Any]]:
        """Every base station that ever connected, by EUI (see get_base_station for the fields)."""
        return [self._bs_json(bs) for _, bs in sorted(self.registry.base_stations.items())]

    async def get_base_station(self, bs_eui: str) -> dict[str, Any] | None:
        """One base station, or None: bsEui, state ("online"/"offline"), vendor, model, name,
        swVersion, version, since, bidi, geoLocation, peer, certSerial, certSubject, firstSeen,
        lastSeen, status (the last status payload), revoked, revokedReason, revokedAt, and while
        connected: connectedSince, propagationPending."""
        bs = self.registry.base_stations.get(_eui(bs_eui, "base-station EUI"))
        return None if bs is None else self._bs_json(bs)

    def _bs_json(self, bs: BaseStation) -> dict[str, Any]:
        out = bs.to_json()
        session = self.sessions.get(bs.eui)
        if session is not None and session.established_at is not None:
            out["connectedSince"] = rfc3339(session.established_at)
            out["propagationPending"] = session.propagation_pending
        return out

    async def list_sensors(self, filter: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """Sensors by EUI, those whose EUI contains `filter` (hex, any case):
        {"items": [sensor as in get_sensor], "total", "limit", "offset"}."""
        needle = (filter or "").lower()
        found = sorted(eui for eui in self.registry.sensors if needle in eui)
        page = found[offset : offset + limit] if limit > 0 else []
        return {"items": [self.registry.sensors[eui].to_json() for eui in page], "total": len(found),
                "limit": limit, "offset": offset}

    async def get_sensor(self, ep_eui: str) -> dict[str, Any] | None:
        """One sensor, or None: epEui, shortAddr (4 hex), bidi, dualChan, repetition,
        wideCarrOff, longBlkDist, epClass, syncBurst, attached, attachedAt, attachCnt,
        lastPacketCnt, lastSeen, bestBs, bestSnr, createdAt. Never the network key."""
        sensor = self.registry.sensors.get(_eui(ep_eui, "end point EUI"))
        return None if sensor is None else sensor.to_json()

    async def uplink_history(self, ep_eui: str, limit: int = 100, before: float | None = None) -> dict[str, Any]:
        """The sensor's stored uplinks, newest first, received before `before` (Unix seconds):
        {"items": [uplink event payload + "received" (Unix s of the first copy)]}."""
        eui = _eui(ep_eui, "end point EUI")
        limit = max(1, min(int(limit), 1000))
        row_limit = limit * 8 + 8
        rows = await self.registry.uplink_rows(eui, row_limit, before)
        groups = _group_copies(rows)
        if len(rows) == row_limit and len(groups) > 1:
            groups.pop()  # its other copies may lie beyond the rows read
        items = []
        for ep, copies in groups[:limit]:
            first = min(c.received for c in copies)
            items.append({**uplink_payload(ep, copies, first), "received": first})
        return {"items": items}

    async def downlinks(self, ep_eui: str) -> dict[str, Any]:
        """The end point's downlinks, newest first: {"items": [{queId, epEui, data, format, prio,
        responseExp, created, actor, bsEuis, status (queued, accepted, rejected, revoked, sent,
        expired, invalid), resultBs, txTime, packetCnt, error, acked, updated}]}."""
        return {"items": await self.registry.downlinks(_eui(ep_eui, "end point EUI"))}

    # -- MQTT commands

    async def command(self, kind: str, id: str, name: str, payload: Any) -> Mapping[str, Any] | None:
        """`{p}/mioty/{kind}/{id}/cmd/{name}`: ep attach/detach/down/revoke_down/dl_rx_status, bs status."""
        names = {"ep": ("attach", "detach", "down", "revoke_down", "dl_rx_status"), "bs": ("status",)}.get(kind)
        if names is None:
            raise CommandError(f"unknown target {kind!r}: use ep (end point) or bs (base station)")
        if name not in names:
            raise CommandError(f"unknown {kind} command {name!r} (known: {', '.join(names)})")
        eui = _eui(id, "end point EUI" if kind == "ep" else "base-station EUI")
        if not isinstance(payload, Mapping):
            raise CommandError("the payload must be a JSON object")
        if kind == "bs":
            _fields(payload, ())
            return await self.poll_status(eui)
        if name == "attach":
            _fields(payload, ("nwKey", "shortAddr", "bidi"))
            result = await self.attach(eui, payload["nwKey"], payload["shortAddr"], payload["bidi"], actor="mqtt",
                                       source="mqtt")
            detail = {"shortAddr": f"{_short_addr(payload['shortAddr']):04x}", "bidi": payload["bidi"]}
            await self._audit("mqtt", "mioty.sensor.attach", eui, detail, "mqtt")
            return result
        if name == "detach":
            _fields(payload, ())
            result = await self.detach(eui, actor="mqtt", source="mqtt")
            await self._audit("mqtt", "mioty.sensor.detach", eui, {}, "mqtt")
            return result
        if name == "revoke_down":
            _fields(payload, ("queId",))
            result = await self.revoke_downlink(eui, payload["queId"], actor="mqtt")
            await self._audit("mqtt", "mioty.sensor.downlink_revoke", eui, {"queId": payload["queId"]}, "mqtt")
            return result
        if name == "dl_rx_status":
            _fields(payload, ())
            return await self.query_dl_rx_status(eui)
        _fields(payload, ("data",), ("format", "prio", "responseExp"))
        data = payload["data"]
        if not isinstance(data, str):
            raise CommandError("data must be a string of hexadecimal digits")
        result = await self.queue_downlink(eui, data, format=payload.get("format"), prio=payload.get("prio"),
                                           response_exp=payload.get("responseExp"), actor="mqtt")
        await self._audit("mqtt", "mioty.sensor.downlink", eui, {"queId": result["queId"], "bytes": len(data) // 2},
                          "mqtt")
        return result
