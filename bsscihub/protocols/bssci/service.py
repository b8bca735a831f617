"""The mioty service center: the mutual-TLS BSSCI listener and the base-station sessions' side of the family.
It is the sessions' IServiceCenter; uplinks go through uplinks.UplinkPipeline, REST/MQTT actions live in actions.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeGuard

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub import audit
from bsscihub.bus import Event
from bsscihub.cluster import Fence, HeldEvent, IDedupStore, LeaseEvents
from bsscihub.contract import finite_doc
from bsscihub.family import FamilyService
from bsscihub.health import ComponentHealth
from bsscihub.listening import ListenerService
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.actions import MiotyActions, UnknownDevice
from bsscihub.protocols.bssci.blueprints import BlueprintBook
from bsscihub.protocols.bssci.crypto import session_key, verify_attach_signature
from bsscihub.protocols.bssci.downlinks import Downlinks
from bsscihub.protocols.bssci.identity import cert_station, station_identity_problem
from bsscihub.protocols.bssci.metrics import Counters, Histogram, MiotyMetrics
from bsscihub.protocols.bssci.protocol import BSSCIFactory
from bsscihub.protocols.bssci.registry import BaseStation, Registry, Sensor, rfc3339
from bsscihub.protocols.bssci.session import (
    EACCES,
    ENOENT,
    IServiceCenter,
    Refused,
    ResumeState,
    Session,
    SessionConfig,
    SessionStats,
    State,
)
from bsscihub.protocols.bssci.uplinks import UplinkPipeline, untrack
from bsscihub.protocols.bssci.vm import VariableMac
from bsscihub.tls import ConnectionStats

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = ["MiotyService", "UnknownDevice"]

# Copies of one over-the-air attach or detach, heard by several base stations, each get the same
# answer within this many seconds; the attachment or detachment itself happens once.
OTA_COPY_WINDOW = 60.0
_LATENCY_STEPS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _jsonable(value: Any) -> dict[str, Any]:
    """A report's decoded MessagePack values as JSON can hold them: byte strings as hex, NaN/±Infinity
    as null named under "invalid" (the hub's one rule for them, bsscihub.contract.finite_doc)."""
    return finite_doc(value)


def _has_fix(geo: tuple[float, float, float] | None) -> TypeGuard[tuple[float, float, float]]:
    """Whether a geoLocation is a position: latitude and longitude 0 is how stations say "no fix"."""
    return geo is not None and (geo[0] != 0 or geo[1] != 0)


@attrs.define
class _Resumable:
    """A station's ended session, kept for bssci.resume_window, and the propagations it missed.
    Its downlinks stay with it meanwhile: a station that resumes still holds them."""

    session: Session
    state: ResumeState
    missed: list[tuple[bool, int]] = attrs.Factory(list)
    expiry: IDelayedCall | None = None

    def cancel(self) -> None:
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()


@attrs.frozen
class _Waiting:
    """The end points whose dlOpen uplinks matter: queued downlinks here or on another hub (a cluster)."""

    here: Container[str]
    elsewhere: Container[str]

    def __contains__(self, ep: object) -> bool:
        return ep in self.here or ep in self.elsewhere


@attrs.frozen
class _OtaAttach:
    """The last accepted over-the-air attach of an end point, to answer its copies alike."""

    request: tuple[int, bytes, bytes]  # attachCnt, nonce, sign
    at: float
    short_addr: int


@implementer(IServiceCenter)
class MiotyService(MiotyActions, FamilyService):
    """The mioty family at run time (`hub.services["mioty"]`).

    The sessions' side is here; uplinks run through `self.uplinks` (uplinks.UplinkPipeline);
    the public actions and queries below come from actions.MiotyActions, the metrics from
    metrics.MiotyMetrics.

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

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.clock = hub.reactor
        self.bssci = hub.config.section("bssci")
        self.settings = hub.config.section("mioty")
        self.registry = Registry(hub.store, self.clock)
        if hub.cluster.clustered:
            self.registry.node = hub.cluster.node
        self.sessions: dict[str, Session] = {}
        """The current session of each base station, by bsEui (from con until it ends)."""
        self.cluster = hub.cluster
        self.cluster.router.register("mioty", self.station_command)
        self.stats = SessionStats()
        window = self.settings.dedup_window
        self.counters = Counters(latency=Histogram([window / 2, window, *(window + s for s in _LATENCY_STEPS)]))
        self.downlink_queue = Downlinks(self.clock, self.registry, self.sessions, self.settings.downlink_ttl,
                                        self._ep_event, self._background, self.cluster.node, self.cluster.clustered)
        self.cluster.ownership.watch(self._station_claimed)
        self.blueprints = BlueprintBook(hub.store, self.clock)
        self.remote_waiting: dict[str, str] = {}
        """A cluster: end points with a queued downlink kept by another hub, and that hub's name."""
        on_uplink: Any = self.downlink_queue.uplink
        waiting: Container[str] = self.downlink_queue.waiting
        if self.cluster.clustered:
            self.downlink_queue.on_waiting = self._waiting_changed
            on_uplink, waiting = self._uplink_for_downlinks, _Waiting(waiting, self.remote_waiting)
        self.uplinks = UplinkPipeline(self.clock, self.registry, hub.bus, self.counters, window,
                                      self.settings.dedup_memory, on_uplink, waiting, hub.cluster.make_dedup,
                                      annotate=self.blueprints.annotate)
        self.session_config = SessionConfig.from_bssci(self.bssci, hub.version)
        self.vm = VariableMac(self)
        self.listener: ListenerService | None = None
        self.scaci: Any = None
        """The SCACI side (scaci.ScaciHub) once its listener runs (scaci.listen set)."""
        self.scaci_port: Any = None
        self._scaci_unsubscribe: Any = None
        self.port: Any = None
        """The listening port once started (`port.getHost().port` is the bound port number)."""
        self._ota: dict[str, _OtaAttach] = {}  # epEui -> its last accepted over-the-air attach
        self._det_seen: dict[tuple[str, int, bytes], float] = {}  # (epEui, packetCnt, sign) -> when detached
        self._resumable: dict[str, _Resumable] = {}  # bsEui -> its ended session, while resumable
        self._handover: dict[str, Session] = {}  # bsEui -> the session whose resume is offered to its successor
        self._refreshing: defer.Deferred[Any] | None = None  # the hot state read under way (cluster)
        self.stopping = False
        self._writes: set[defer.Deferred[Any]] = set()
        self.started_at = self.clock.seconds()
        """A sensor is not silent while the hub was down: silence counts from here at the earliest."""
        self.lease = self.cluster.lease("mioty", self.clock)
        """In a cluster its holder alone judges silence and reports the changes the sync picks up."""
        self.lease_events = LeaseEvents(self.lease, hub.store, hub.bus, self.clock)
        """A cluster: the holder's warnings, auto-detaches and reports, kept with their write until announced."""
        lifecycle = max(0.05, min(60.0, self.settings.inactivity_warning / 4, self.settings.auto_detach / 4))
        self._loops = [
            (self.looping(self.sync, "syncing the sensor registry"), self.settings.flush_interval),
            (self.looping(self.check_lifecycle, "checking sensor activity"), lifecycle),
            (self.looping(self.prune, "pruning uplink history"), min(3600.0, self.settings.uplink_retention / 4)),
            # Blueprints and sensor types imported from the command line while the hub runs.
            (self.looping(self.blueprints.refresh, "reloading blueprints"), 5.0),
            (self.looping(self.downlink_queue.tick, "expiring downlinks"),
             max(0.05, min(60.0, self.settings.downlink_ttl / 4))),
        ]
        if self.uplinks.clustered:
            self._loops.append((self.looping(self.uplinks.adopt_orphans, "adopting orphaned uplinks"), 1.0))
        if self.cluster.clustered:
            self._loops.append((self.looping(self.adopt_downlinks, "adopting downlinks nobody keeps"), 2.0))
            self._loops.append((self.looping(self.hand_over_downlinks, "handing downlinks to other hubs"), 2.0))
        hub.health.register("bssci", self._health)
        hub.metrics.register(MiotyMetrics(self))
        self.tls_stats = ConnectionStats()
        hub.metrics.register(self.tls_stats.collector("bsscihub_bssci_"))

    @property
    def dedup(self) -> IDedupStore:
        return self.uplinks.dedup

    # -- start and stop

    async def prepare(self) -> None:
        from bsscihub.tls import ConnectionLimits, MutualTLSEndpoint, server_context_factory

        registry = self.registry
        await registry.load()
        for bs in await registry.mark_all_offline(self.clock.seconds()):
            self._publish_state(bs)
        await self.blueprints.load()
        await self.uplinks.load()
        await self.vm.prepare()
        await self.downlink_queue.load()
        if self.cluster.clustered:
            try:
                await self.learn_waiting()
            except Exception as e:
                self.log.warn("the downlinks waiting on the other hubs are not known yet: {problem}", problem=str(e))
        self.lease.start()
        for loop, interval in self._loops:
            loop.start(interval, now=False)
        tls = self.hub.config.tls
        policy = server_context_factory(tls.ca, tls.cert, tls.key, lenient=tls.lenient, is_revoked=self._is_revoked)
        bssci = self.bssci
        endpoint = MutualTLSEndpoint(
            serverFromString(self.hub.reactor, bssci.listen), policy, handshake_timeout=bssci.handshake_timeout,
            clock=self.clock, limits=ConnectionLimits(bssci.max_connections, bssci.max_handshakes),
            stats=self.tls_stats,
        )
        factory = BSSCIFactory(self, self.session_config, self.clock, self.stats, bssci.max_frame)
        self.listener = ListenerService(endpoint, factory)
        self.listener.setName("bssci")
        self.listener.setServiceParent(self)
        self.port = await self.listener.when_listening()
        await self._start_scaci(policy)
        host = self.port.getHost()
        self.log.info(
            "BSSCI listening on {host}:{port} (mutual TLS); {sensors} sensors, {stations} known base stations",
            host=host.host,
            port=host.port,
            sensors=len(registry.sensors),
            stations=len(registry.base_stations),
        )

    async def _start_scaci(self, policy: Any) -> None:
        """The optional SCACI listener for application centers: same CA, its own port (off by default)."""
        from bsscihub.protocols.bssci.scaci import ScaciFactory, ScaciHub
        from bsscihub.tls import ConnectionLimits, MutualTLSEndpoint

        settings = self.hub.config.section("scaci")
        if not settings.listen:
            return
        bssci = self.bssci
        self.scaci = ScaciHub(self, settings, bssci.sc_eui, self.hub.version, bssci.max_frame)
        unsubscribe = self.hub.bus.subscribe(self.scaci.on_event)
        self._scaci_unsubscribe = unsubscribe
        if self.cluster.clustered:
            # The result of an AC's downlink comes from the hub that keeps the downlink, maybe another one.
            scaci = self.scaci
            stop_relay = self.cluster.relay_events(
                self.hub.bus, lambda event: scaci.on_event(event) if event.kind == "dl_result" else None)
            self._scaci_unsubscribe = lambda: (unsubscribe(), stop_relay())
        endpoint = MutualTLSEndpoint(
            serverFromString(self.hub.reactor, settings.listen), policy, handshake_timeout=bssci.handshake_timeout,
            clock=self.clock, limits=ConnectionLimits(64, 16),
        )
        listener = ListenerService(endpoint, ScaciFactory(self.scaci))
        listener.setName("scaci")
        listener.setServiceParent(self)
        self.scaci_port = await listener.when_listening()
        host = self.scaci_port.getHost()
        self.log.info("SCACI listening on {host}:{port} (mutual TLS) for application centers", host=host.host,
                      port=host.port)

    async def drain(self) -> None:
        for loop, _ in self._loops:
            if loop.running:
                loop.stop()
        if self._scaci_unsubscribe is not None:
            self._scaci_unsubscribe()
        self.stopping = True  # nothing to resume after a restart: resume state lives in memory only
        for session in list(self.sessions.values()):
            session.close("the hub is stopping")
        for record in self._resumable.values():
            record.cancel()
        await self.uplinks.drain(self.drain_wait)
        await self.vm.drain()
        await defer.DeferredList(list(self._writes), consumeErrors=True)
        await self.downlink_queue.flush()
        await self.registry.flush()
        await self.lease.stop()

    def _health(self) -> ComponentHealth:
        established = sorted(eui for eui, s in self.sessions.items() if s.state is State.ESTABLISHED)
        return ComponentHealth(
            bool(self.running) and self.port is not None,
            {"listen": self.bssci.listen, "connected": len(established), "baseStations": established},
        )

    # -- IServiceCenter: the sessions' side

    def _is_revoked(self, cert: Any) -> str | None:
        """The TLS handshake's revocation check: from memory, on the reactor thread."""
        reason = self.registry.revoked_serials.get(cert.serial_number)
        if reason is not None:
            return reason or "revoked"
        eui = cert_station(cert)
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
        if cert.serial_number in self.registry.revoked_serials:
            self.counters.refused += 1
            raise Refused(EACCES, f"certificate serial {cert.serial_number:#x} is revoked")
        old = self.sessions.get(eui)
        problem = station_identity_problem(
            cert, eui, pinned_serial=bs.cert_serial if bs is not None else None, registered=bs is not None,
            connected_serial=old.certificate.serial_number if old is not None and old.certificate else None,
            self_register=self.bssci.self_register,
        )  # fmt: skip
        if problem is not None:
            self.counters.refused += 1
            raise Refused(EACCES, problem)
        self._offer_resume(session, con, old)
        self.sessions[eui] = session
        self.cluster.ownership.claim("mioty", eui, partial(self._claimed_elsewhere, session))
        self.counters.connections += 1
        if old is not None and old is not session and not old.closed:
            self.log.warn(
                "base station {bsEui} connected again from {peer}; closing its older connection from {old}",
                bsEui=eui,
                peer=session.peer,
                old=old.peer,
            )
            # Aborted: a station that reconnected has usually lost the old connection silently.
            old.close("replaced by a newer connection of the same bsEui", abort=True)

    def _claimed_elsewhere(self, session: Session, node: str) -> None:
        """Another hub of the cluster took this station's newer connection: the newest wins."""
        if self.sessions.get(session.bs_hex) is session and not session.closed:
            self.log.warn("base station {bsEui} connected again to hub {node}; closing its connection from {peer}",
                          bsEui=session.bs_hex, node=node, peer=session.peer)
            session.close(f"replaced by a newer connection of the same bsEui on hub {node}", abort=True)

    def _offer_resume(self, session: Session, con: m.Con, old: Session | None) -> None:
        """Resume the station's previous session if it asks (same snBsUuid) within bssci.resume_window.

        The previous session is the one still open (the station noticed the break first) or the
        one that ended last; either way it is offered once: a station that refuses gets a fresh one.
        """
        eui = session.bs_hex
        kept = self._resumable.pop(eui, None)
        if kept is not None:
            kept.cancel()
        window = self.bssci.resume_window
        if not window or old is session:
            return
        missed: tuple[tuple[bool, int], ...] = ()
        previous: Session | None = None
        if old is not None and not old.closed:
            previous, state = old, old.resume_state()
        elif kept is not None:
            previous, state, missed = kept.session, kept.state, tuple(kept.missed)
        else:
            return
        if state is None or state.bs_uuid != con.snBsUuid or self.clock.seconds() - state.ended > window:
            if kept is not None:
                self._downlinks_gone(kept.session)
            return
        # What changed while it was away goes after what it had not finished.
        session.offer_resume(attrs.evolve(state, propagations=(*state.propagations, *missed)))
        # Its downlinks wait for the outcome: kept by a resumed session, queued again by a fresh one.
        self._handover[eui] = previous

    def _downlinks_gone(self, session: Session) -> None:
        if self.downlink_queue.pending:
            self.downlink_queue.station_gone(session)

    def _resume_expired(self, eui: str, record: _Resumable) -> None:
        if self._resumable.get(eui) is record:
            del self._resumable[eui]
            self._downlinks_gone(record.session)

    def session_ready(self, session: Session) -> None:
        con = session.con
        assert con is not None
        now = self.clock.seconds()
        eui = session.bs_hex
        bs = self.registry.base_stations.get(eui) or BaseStation(eui, first_seen=now, last_seen=now, since=now)
        cert = session.certificate
        bs.vendor, bs.model, bs.name, bs.sw_version = con.vendor, con.model, con.name, con.swVersion
        bs.version, bs.bidi, bs.peer = con.version, con.bidi, session.peer
        if _has_fix(con.geoLocation):
            bs.geo = list(con.geoLocation)
        if cert is not None:
            bs.cert_serial, bs.cert_subject = f"{cert.serial_number:#x}", cert.subject.rfc4514_string()
        bs.online, bs.since, bs.last_seen = True, now, now
        self._save_base_station(bs)
        self._publish_state(bs)
        previous = self._handover.pop(eui, None)
        if previous is not None:
            if session.resumed:
                self.downlink_queue.hand_over(previous, session)
            else:
                self._downlinks_gone(previous)
        if session.resumed:
            self.counters.resumed += 1
            self.log.info("base station {bsEui} ({vendor} {model}, BSSCI {version}) resumed its session from {peer};"
                          " {count} propagations reissued", bsEui=eui, vendor=con.vendor or "unknown vendor",
                          model=con.model or "", version=con.version, peer=session.peer,
                          count=session.propagation_pending)
            # It kept its attachments: the session reissued only what was unfinished or missed.
            self.vm.session_ready(session)
            # No attPrp will precede the downlinks queued for it: hand them over now.
            self.downlink_queue.resumed(session)
            return
        if self.cluster.clustered:
            # It may have been on another hub: what that hub kept for it is this one's now.
            self._background(self.take_downlinks(eui), f"taking the downlinks of base station {eui}")
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
        if self.cluster.clustered:
            # Its end points' packet counters as the hub that heard them last wrote them back, first.
            refreshed = self._refresh_state()
            refreshed.addCallback(lambda _: self._propagate_attached(session))
            self._background(refreshed, f"propagating the attached end points to {eui}")
        else:
            self._propagate_attached(session)
        self.vm.session_ready(session)

    def _propagate_attached(self, session: Session) -> None:
        if self.sessions.get(session.bs_hex) is not session or session.state is not State.ESTABLISHED:
            return
        # Always all of them: a base station forgets its attachments when it reconnects.
        session.propagate((True, int(s.eui, 16)) for s in list(self.registry.sensors.values()) if s.attached)

    def _refresh_state(self) -> defer.Deferred[Any]:
        """One read of the sensors' hot state for the stations connecting meanwhile (a failover brings many)."""
        reading = self._refreshing
        if reading is None:
            reading = self._refreshing = defer.Deferred.fromCoroutine(self.registry.refresh_state())

            def done(result: Any) -> None:
                self._refreshing = None
                if isinstance(result, Failure):
                    self.log.failure("reading the sensors' hot state failed; propagating what this hub knows",
                                     result)

            reading.addBoth(done)
        waiter: defer.Deferred[Any] = defer.Deferred()

        def fire(result: Any) -> Any:
            waiter.callback(None)
            return result

        reading.addBoth(fire)
        return waiter

    def session_closed(self, session: Session, reason: str) -> None:
        eui = session.bs_hex
        current = self.sessions.get(eui) is session
        state = session.resume_state() if current and self.bssci.resume_window else None
        if state is not None and not self.stopping:
            record = _Resumable(session, state)
            record.expiry = self.clock.callLater(self.bssci.resume_window, self._resume_expired, eui, record)
            self._resumable[eui] = record
        elif self._handover.get(eui) is not session:
            self._downlinks_gone(session)
        if current and eui in self._handover and self._handover[eui] is not session:
            self._downlinks_gone(self._handover.pop(eui))  # offered a resume, then gone without a session
        if not current:
            return  # replaced by a newer connection: still online
        del self.sessions[eui]
        self.cluster.ownership.release("mioty", eui)
        self.vm.session_closed(session)
        bs = self.registry.base_stations.get(eui)
        self.log.info("base station {bsEui} at {peer} disconnected: {reason}", bsEui=eui, peer=session.peer,
                      reason=reason)
        if bs is not None and bs.online:
            now = self.clock.seconds()
            bs.online, bs.since, bs.last_seen = False, now, now
            self._save_base_station(bs)
            self._publish_state(bs)

    def uplink(self, session: Session, msg: m.UlData) -> defer.Deferred[None]:
        return self.uplinks.store(session.bs_hex, msg)

    def vm_uplink(self, session: Session, msg: m.VmUlData) -> defer.Deferred[None]:
        return self.vm.store(session, msg)

    def attach_request(self, session: Session, msg: m.Att) -> defer.Deferred[m.AttRsp]:
        return defer.Deferred.fromCoroutine(self._ota_attach(session, msg))

    async def _ota_attach(self, session: Session, msg: m.Att) -> m.AttRsp:
        ep = f"{msg.epEui:016x}"
        now = self.clock.seconds()
        sensor = self.registry.sensors.get(ep)
        reason, code, copy = None, EACCES, None
        if sensor is None:
            reason, code = f"end point {ep} is not registered at this service center", ENOENT
        elif not verify_attach_signature(sensor.nw_key, msg.epEui, msg.attachCnt, msg.sign):
            reason = f"the signature of end point {ep} does not verify with its key"
        elif sensor.attach_cnt is not None and msg.attachCnt <= sensor.attach_cnt:
            copy = self._ota.get(ep)
            if copy is None or copy.request != (msg.attachCnt, msg.nonce, msg.sign) or now - copy.at > OTA_COPY_WINDOW:
                copy = None
                reason = f"replayed attachCnt {msg.attachCnt} of end point {ep} (the last one was {sensor.attach_cnt})"
        if reason is not None:
            self._ep_event(ep, "att_rejected", {"bsEui": session.bs_hex, "attachCnt": msg.attachCnt,
                                                "reason": reason})
            raise Refused(code, f"att: {reason}")
        assert sensor is not None
        # Every copy derives the same key from the same request: each station answers alike.
        sn_key = session_key(sensor.nw_key, msg.epEui, msg.nonce, msg.sign)
        if copy is not None:
            return m.AttRsp(opId=msg.opId, nwkSnKey=sn_key, shAddr=None if msg.shAddr is not None else copy.short_addr)
        short_addr = msg.shAddr if msg.shAddr is not None else sensor.short_addr
        # Claimed at once, before the write: another copy arriving meanwhile is a copy.
        sensor.attach_cnt = msg.attachCnt
        self._ota[ep] = _OtaAttach((msg.attachCnt, msg.nonce, msg.sign), now, short_addr)

        def make(old: Sensor | None) -> Sensor:
            base = old or sensor
            return attrs.evolve(base, attach_cnt=msg.attachCnt, attached=True, short_addr=short_addr,
                                attached_at=now, dual_chan=msg.dualChan, repetition=msg.repetition,
                                wide_carr_off=msg.wideCarrOff, long_blk_dist=msg.longBlkDist, sn_key=sn_key)

        await self.registry.save_sensors({ep: make})
        self.registry.sensors[ep].paths = (session.bs_hex,)  # its serving station for downlinks, until an uplink
        # A new session restarts the end point's packet counter: the next attPrp says so.
        attached = self.registry.sensors[ep]
        attached.last_packet_cnt, attached.last_seen, attached.warned = None, now, False
        self.registry.dirty(ep)
        self._propagate(True, ep, exclude=session)
        self._propagate_elsewhere(True, ep)
        self._ep_event(ep, "attach", {"source": "ota", "bsEui": session.bs_hex, "attachCnt": msg.attachCnt,
                                      "shortAddr": f"{short_addr:04x}"})
        self.log.info("end point {epEui} attached over the air via {bsEui} (attachCnt {attachCnt})", epEui=ep,
                      bsEui=session.bs_hex, attachCnt=msg.attachCnt)
        await self._audit(f"bs:{session.bs_hex}", "mioty.sensor.ota_attach", ep, {"attachCnt": msg.attachCnt},
                          "bssci")
        return m.AttRsp(opId=msg.opId, nwkSnKey=sn_key, shAddr=None if msg.shAddr is not None else short_addr)

    def detach_request(self, session: Session, msg: m.Det) -> defer.Deferred[m.DetRsp]:
        return defer.Deferred.fromCoroutine(self._ota_detach(session, msg))

    async def _ota_detach(self, session: Session, msg: m.Det) -> m.DetRsp:
        ep = f"{msg.epEui:016x}"
        sensor = self.registry.sensors.get(ep)
        if sensor is None:
            raise Refused(ENOENT, f"det: end point {ep} is not registered at this service center")
        now = self.clock.seconds()
        request = (ep, msg.packetCnt, msg.sign)
        # The copies other stations heard are answered alike, but detach once.
        if now - self._det_seen.get(request, -math.inf) > OTA_COPY_WINDOW:
            if len(self._det_seen) > 1000:
                self._det_seen = {k: t for k, t in self._det_seen.items() if now - t <= OTA_COPY_WINDOW}
            self._det_seen[request] = now
            if sensor.attached:
                await self._save_attached(ep, False)
                self._propagate(False, ep, exclude=session)
                self._propagate_elsewhere(False, ep)
                self._ep_event(ep, "detach", {"source": "ota", "bsEui": session.bs_hex, "packetCnt": msg.packetCnt})
                self.log.info("end point {epEui} detached over the air via {bsEui}", epEui=ep, bsEui=session.bs_hex)
                await self._audit(f"bs:{session.bs_hex}", "mioty.sensor.ota_detach", ep,
                                  {"packetCnt": msg.packetCnt}, "bssci")
        return m.DetRsp(opId=msg.opId, sign=msg.sign)

    def downlink_result(self, session: Session, msg: m.DlDataRes) -> defer.Deferred[None] | None:
        ep = f"{msg.epEui:016x}"
        self._ep_event(ep, "dl_result", {"queId": msg.queId, "bsEui": session.bs_hex, "result": msg.result,
                                         "txTime": msg.txTime, "packetCnt": msg.packetCnt})
        return self.downlink_queue.result(session, msg)

    def downlink_rx_status(self, session: Session, msg: m.DlRxStat) -> None:
        self._ep_event(f"{msg.epEui:016x}", "dl_rx_status", _jsonable({
            "bsEui": session.bs_hex, "rxTime": msg.rxTime, "packetCnt": msg.packetCnt, "dlRxSnr": msg.dlRxSnr,
            "dlRxRssi": msg.dlRxRssi,
        }))  # fmt: skip

    def status_report(self, session: Session, msg: m.StatusRsp) -> None:
        now = self.clock.seconds()
        payload: dict[str, Any] = {"code": msg.code, "message": msg.message, "bsTime": msg.time,
                                   "dutyCycle": msg.dutyCycle}
        for name in ("geoLocation", "uptime", "temp", "cpuLoad", "memLoad", "config"):
            value = getattr(msg, name)
            if value is not None and (name != "geoLocation" or _has_fix(value)):
                payload[name] = list(value) if name == "geoLocation" else value
        payload = _jsonable(payload)
        payload["time"] = rfc3339(now)
        bs = self.registry.base_stations.get(session.bs_hex)
        if bs is not None:
            bs.last_status, bs.status_time, bs.last_seen = payload, now, now
            if _has_fix(msg.geoLocation):
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
        if sensor.eui in self.downlink_queue.by_ep:
            # The station forgets the end point's downlinks with this attPrp: they are queued again.
            self.downlink_queue.propagating(session, sensor.eui)
        return m.AttPrp(
            opId=op_id,
            epEui=ep_eui,
            bidi=sensor.bidi,
            nwkSnKey=sensor.session_key,
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

    def _event(self, kind: str, topic: str, payload: Mapping[str, Any], retain: bool = False) -> defer.Deferred[Any]:
        """Publish one event; the Deferred fires once the bus took it (never fails: a failure is logged)."""
        d = self.hub.bus.publish(Event("mioty", kind, topic, payload, retain))
        d.addErrback(lambda f: self.log.warn("publishing {topic} failed: {problem}", topic=topic,
                                             problem=f.getErrorMessage()))
        return d

    def _ep(self, ep: str, kind: str, fields: Mapping[str, Any]) -> Event:
        """An end point's event, timed now."""
        return Event("mioty", kind, f"mioty/ep/{ep}/event/{kind}",
                     {"epEui": ep, **fields, "time": rfc3339(self.clock.seconds())})

    def _ep_event(self, ep: str, kind: str, fields: Mapping[str, Any]) -> defer.Deferred[Any]:
        event = self._ep(ep, kind, fields)
        return self._event(kind, event.topic, event.payload)

    def _held_ep_event(self, ep: str, kind: str, fields: Mapping[str, Any]) -> HeldEvent:
        """A lease holder's end point event, to keep in its fenced write and announce after it (`_announce`)."""
        return self.lease_events.hold(self._ep(ep, kind, fields))

    def _announce(self, held: HeldEvent) -> None:
        self._background(self.lease_events.announce(held), f"announcing {held.event.topic}")

    def _publish_state(self, bs: BaseStation) -> None:
        self._event("state", f"mioty/bs/{bs.eui}/state", bs.state_payload(), retain=True)

    def _background(self, work: Any, what: str) -> None:
        """Run a database write without waiting for it; the stop waits for all of them."""
        d = work if isinstance(work, defer.Deferred) else defer.Deferred.fromCoroutine(work)
        d.addErrback(lambda f: self.log.failure("mioty: {what} failed", f, what=what))
        if not d.called:
            self._writes.add(d)
            d.addBoth(untrack, d, self._writes)

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
        if not attach and ep in self.downlink_queue.by_ep:
            self.downlink_queue.detached(ep)
        for away in self._resumable.values():
            away.missed.append(item)  # a station that resumes gets it then
        targets = []
        for session in self._established():
            if session is not exclude:
                session.propagate((item,))
                targets.append(session.bs_hex)
        return sorted(targets)

    # -- periodic work

    async def sync(self) -> None:
        """Write sensor hot state back; take in sensor changes made by other processes (e.g. `sensors import`).
        Every hub propagates them to its own stations. A cluster reports each once: a change or removal made
        on a hub was reported by that hub, one made outside any hub by the lease holder."""
        await self.registry.flush_state()
        changed, deleted = await self.registry.sensor_changes()
        report = self.lease.held
        fence = Fence(self.lease.name, self.lease.token)
        reports: list[tuple[str, str, dict[str, Any]]] = []  # published once the fence took this hub's token
        for sensor in changed:
            old = self.registry.adopt(sensor)
            self._announce_change(sensor, old, "external", report and sensor.writer is None, reports)
        detached = []
        for eui in deleted:
            old = self.registry.sensors.pop(eui, None)
            if old is not None and old.attached:
                self._propagate(False, eui)
                detached.append(eui)
        if report and detached:
            # Asked once the removals took effect here (sensor_changes does not return them again, and this may
            # fail): a removal a hub noted is reported by that hub.
            reported = await self.registry.removed_by_hubs(sorted(detached))
            reports.extend((eui, "detach", {"source": "external", "removed": True}) for eui in detached
                           if eui not in reported)
        # Not from a hub that still believes it leads after another took the lease over.
        if reports and self.cluster.clustered:
            # Kept with the fence's write: a holder dying before announcing them leaves them to the next.
            held = [self._held_ep_event(eui, kind, fields) for eui, kind, fields in reports]

            def keep(cursor: Any, claim: Fence) -> None:
                claim.check(cursor)
                for event in held:
                    event.keep(cursor)

            if await self.lease_events.write(held, lambda claim: self.hub.store.interaction(keep, claim), fence):
                for event in held:
                    self._announce(event)
        elif reports:  # one hub: nobody else leads
            for eui, kind, fields in reports:
                self._ep_event(eui, kind, fields)
        online = [s.bs_hex for s in self._established()]
        await self.registry.touch_base_stations(online, self.clock.seconds())
        if self.cluster.clustered:  # the holder announces the warnings and auto-detaches a dead holder stored only
            await self.lease_events.announce_left()

    def _announce_change(self, sensor: Sensor, old: Sensor | None, source: str, report: bool = True,
                         reports: list[tuple[str, str, dict[str, Any]]] | None = None) -> list[str]:
        """Propagate a sensor whose configuration may have changed, and report it (unless `report` is false;
        into `reports` as (eui, kind, fields), if given, for the caller to publish)."""
        event: tuple[str, str, dict[str, Any]] | None = None
        targets: list[str] = []
        if sensor.attached:
            if old is not None and old.attached and old.config() == sensor.config():
                return []
            targets = self._propagate(True, sensor.eui)
            event = (sensor.eui, "attach", {"source": source, "shortAddr": f"{sensor.short_addr:04x}",
                                            "bidi": sensor.bidi})
        elif old is not None and old.attached:
            targets = self._propagate(False, sensor.eui)
            event = (sensor.eui, "detach", {"source": source})
        if report and event is not None:
            if reports is not None:
                reports.append(event)
            else:
                self._ep_event(*event)
        return targets

    async def check_lifecycle(self, now: float | None = None) -> None:
        """Warn about silent sensors (mioty.inactivity_warning) and detach them (mioty.auto_detach).
        In a cluster only the holder of the `mioty` lease does, on what every hub wrote back."""
        if not self.lease.held:
            return
        fence = Fence(self.lease.name, self.lease.token)  # what is written below was judged under this leadership
        now = self.clock.seconds() if now is None else now
        settings = self.settings
        clustered = self.cluster.clustered
        if clustered:
            await self._refresh_state()  # silent here is not silent: another hub may hear it
            warned = await self.registry.warnings()  # what an earlier leader warned about
            if not self.lease.held:  # lost while reading: the next holder judges
                return
        for sensor in list(self.registry.sensors.values()):
            if not sensor.attached:
                continue
            heard = sensor.last_seen or sensor.attached_at or sensor.created_at
            if clustered:  # warned about this silence (since its last uplink or attach) by the holder then
                began = max((t for t in (sensor.last_seen, sensor.attached_at) if t is not None), default=heard)
                sensor.warned = warned.get(sensor.eui, -math.inf) >= began
            since = max(heard, self.started_at)
            silent = now - since
            fields = {"lastSeen": None if sensor.last_seen is None else rfc3339(sensor.last_seen),
                      "silentFor": round(silent)}
            if silent >= settings.auto_detach:
                # A cluster keeps the event with the write: a holder dying before announcing it leaves it to the next.
                held = self._held_ep_event(sensor.eui, "auto_detach", fields) if clustered else None
                if not await self.lease_events.write([held] if held else [], partial(
                        self._save_attached, sensor.eui, False, keep=held.keep if held else None), fence):
                    return  # a newer leader judges from now on
                self._propagate(False, sensor.eui)
                self._propagate_elsewhere(False, sensor.eui)  # a cluster: the other hubs' stations too
                if held is not None:
                    self._announce(held)
                else:
                    self._ep_event(sensor.eui, "auto_detach", fields)
                self.log.info("end point {epEui} detached after {hours:.0f} h without an uplink", epEui=sensor.eui,
                              hours=silent / 3600)
                await self._audit("hub", "mioty.sensor.auto_detach", sensor.eui, fields, "mioty")
            elif silent >= settings.inactivity_warning and not sensor.warned:
                if not clustered:
                    sensor.warned = True
                    self._ep_event(sensor.eui, "inactivity_warning", fields)
                    continue
                held = self._held_ep_event(sensor.eui, "inactivity_warning", fields)
                if not await self.lease_events.write([held], partial(self.registry.save_warning, sensor.eui, now,
                                                                     keep=held.keep), fence):
                    return
                sensor.warned = True
                self._announce(held)

    async def prune(self) -> None:
        """Delete uplink history older than mioty.uplink_retention (never unpublished copies)."""
        deleted = await self.registry.prune_uplinks(self.clock.seconds() - self.settings.uplink_retention)
        if deleted:
            self.log.info("pruned {count} uplink copies older than the retention", count=deleted)

    async def _save_attached(self, eui: str, attached: bool, fence: Fence | None = None, *,
                             keep: Callable[[Any], None] | None = None) -> Sensor:
        """Attach or detach a sensor in the database; a leader's write passes its `fence` (checked there) and
        `keep(cursor)`, what else its transaction stores (the event it entails)."""
        now = self.clock.seconds()
        cached = self.registry.sensors[eui]

        def make(old: Sensor | None) -> Sensor:
            base = old or cached
            # A detach ends an over-the-air session: attaching again propagates the provisioned key.
            return attrs.evolve(base, attached=attached,
                                attached_at=base.attached_at if base.attached or not attached else now,
                                sn_key=base.sn_key if attached else None)

        await self.registry.save_sensors({eui: make}, fence, keep)
        return self.registry.sensors[eui]
