"""The BSSCI session of one base-station connection: a sans-IO state machine, message maps in, frames out.
It enforces the operation rules (con first, opIds, error/errorAck, timeouts); the service center decides the rest."""

from __future__ import annotations

import enum
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.crypto import attach_signature, verify_attach_signature
from bsscihub.protocols.bssci.framing import encode_frame, op_frame_encoder, to_json_frames

__all__ = [
    "EACCES",
    "EINVAL",
    "EIO",
    "ENOENT",
    "ENOSYS",
    "EOPNOTSUPP",
    "EPROTONOSUPPORT",
    "IServiceCenter",
    "OperationFailed",
    "OperationTimedOut",
    "Refused",
    "ResumeState",
    "Session",
    "SessionClosed",
    "SessionConfig",
    "SessionStats",
    "State",
    "attach_signature",
    "verify_attach_signature",
]

# Linux errno values, as the specification uses them on the wire.
ENOENT = 2
EIO = 5
EACCES = 13
EINVAL = m.EINVAL
ENOSYS = m.ENOSYS
EPROTONOSUPPORT = 93
EOPNOTSUPP = 95

# (major, minor) dialects the hub speaks: 1.1 differs from 1.0 only in the attPrp layout.
KNOWN_VERSIONS = frozenset({(1, 0), (1, 1)})
# After refusing a base station's version: how long to wait for its errorAck before closing.
REFUSAL_WAIT = 5.0
# Problems logged per connection before the rest are only counted (a broken base station
# must not flood the log); the count is logged when the connection ends.
NOTE_LIMIT = 20

# The response each SC-initiated operation expects, and the completion the SC then sends.
_RESPONSES: dict[str, type[m.Message]] = {
    "ping": m.PingRsp,
    "status": m.StatusRsp,
    "attPrp": m.AttPrpRsp,
    "detPrp": m.DetPrpRsp,
    "dlDataQue": m.DlDataQueRsp,
    "dlDataRev": m.DlDataRevRsp,
    "dlRxStatQry": m.DlRxStatQryRsp,
    "ulDataTx": m.UlDataTxRsp,
    "vm.status": m.VmStatusRsp,
    "vm.activate": m.VmActivateRsp,
    "vm.deactivate": m.VmDeactivateRsp,
    "vm.dlData": m.VmDlDataRsp,
}
_INITIATED_BY_BS = frozenset({"con", "ping", "att", "det", "ulData", "dlDataRes", "dlRxStat", "vm.ulData"})

_FRAMES = {
    name: op_frame_encoder(name)
    for name in (
        "ping", "pingRsp", "pingCmp", "statusCmp", "attPrpCmp", "detPrpCmp", "ulDataRsp", "dlDataQueCmp",
        "dlDataRevCmp", "dlDataResRsp", "dlRxStatRsp", "dlRxStatQryCmp", "ulDataTxCmp", "errorAck",
        "vm.statusCmp", "vm.activateCmp", "vm.deactivateCmp", "vm.dlDataCmp", "vm.ulDataRsp",
    )
}  # fmt: skip
_UL_DATA_RSP = _FRAMES["ulDataRsp"]
_COMPLETION = {rsp: _FRAMES[rsp.command[:-3] + "Cmp"] for rsp in _RESPONSES.values()}


class Refused(Exception):
    """The service center refuses a base station's request; answered with `error` (code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OperationFailed(Exception):
    """The base station answered an SC-initiated operation with `error`."""

    def __init__(self, command: str, code: int, message: str) -> None:
        super().__init__(f"{command} refused by the base station: error {code}: {message}")
        self.command, self.code, self.message = command, code, message


class OperationTimedOut(Exception):
    """The base station did not answer an SC-initiated operation within bssci.op_timeout."""


class SessionClosed(Exception):
    """The connection ended before the operation completed."""


class State(enum.Enum):
    AWAIT_CON = "awaiting con"
    REFUSING = "refused, awaiting errorAck"
    AWAIT_CON_CMP = "awaiting conCmp"
    ESTABLISHED = "established"
    CLOSED = "closed"


@attrs.frozen
class SessionConfig:
    """What a session needs from the `bssci` config section."""

    sc_eui: int
    version: str = "1.0.0"
    ping_idle: float = 60.0
    ping_timeout: float = 30.0
    op_timeout: float = 60.0
    status_interval: float = 300.0
    propagate_window: int = 64
    sw_version: str | None = None
    vendor: str = "bsscihub"
    resume_window: float = 0.0

    @classmethod
    def from_bssci(cls, bssci: Any, sw_version: str) -> SessionConfig:
        return cls(
            sc_eui=int(bssci.sc_eui, 16),
            version=bssci.version,
            ping_idle=bssci.ping_idle,
            ping_timeout=bssci.ping_timeout,
            op_timeout=bssci.op_timeout,
            status_interval=bssci.status_interval,
            propagate_window=bssci.propagate_window,
            sw_version=sw_version,
            resume_window=bssci.resume_window,
        )


@attrs.frozen
class ResumeState:
    """What a session leaves behind for a resume: its identities, both opId counters, and the
    propagations it had not finished (in order), as of `ended` (clock time)."""

    bs_uuid: bytes
    sc_uuid: bytes
    sc_next: int  # the next SC opId (negative)
    bs_last: int  # the highest BS opId seen
    propagations: tuple[tuple[bool, int], ...] = attrs.field(repr=False)
    ended: float


class SessionStats:
    """Counters shared by every session of a service (plain integers: scraped, never locked)."""

    def __init__(self) -> None:
        self.received: defaultdict[str, int] = defaultdict(int)  # BS-initiated operations, by command
        self.sent: defaultdict[str, int] = defaultdict(int)  # SC-initiated operations, by command
        self.errors_sent = 0
        self.errors_received = 0
        self.invalid = 0
        self.op_timeouts = 0
        self.ping_timeouts = 0
        self.framing_errors = 0


class IServiceCenter(Interface):
    """What a session asks of the service center (the registry, deduplication, events)."""

    def session_connecting(session: Session, con: m.Con) -> None:
        """A valid `con` arrived; raise Refused to refuse it (answered with error, then closed).
        May call `session.offer_resume(state)` to resume the station's previous session."""

    def session_ready(session: Session) -> None:
        """`conCmp` arrived: the session takes SC-initiated operations now (propagate, announce)."""

    def session_closed(session: Session, reason: str) -> None:
        """A session that got past `con` ended."""

    def uplink(session: Session, msg: m.UlData) -> defer.Deferred[None]:
        """Store one copy; the result fires once it is durable. Raise Refused for invalid values."""

    def attach_request(session: Session, msg: m.Att) -> defer.Deferred[m.AttRsp]:
        """Over-the-air attach; fails with Refused to answer error."""

    def detach_request(session: Session, msg: m.Det) -> defer.Deferred[m.DetRsp]:
        """Over-the-air detach; fails with Refused to answer error."""

    def downlink_result(session: Session, msg: m.DlDataRes) -> defer.Deferred[None] | None:
        """A `dlDataRes`; raise Refused to answer error instead of dlDataResRsp. A Deferred
        returned delays dlDataResRsp until it fires (the result is recorded); failing, it is
        answered with error, so that the station reports it again."""

    def vm_uplink(session: Session, msg: m.VmUlData) -> defer.Deferred[None]:
        """Store one Variable-MAC frame copy (`vm.ulData`); fires once durable. Raise Refused to answer error."""

    def downlink_rx_status(session: Session, msg: m.DlRxStat) -> None:
        """A `dlRxStat`; raise Refused to answer error instead of dlRxStatRsp."""

    def status_report(session: Session, msg: m.StatusRsp) -> None:
        """A `statusRsp` (periodic poll or on demand)."""

    def propagation(session: Session, attach: bool, ep_eui: int, op_id: int) -> m.Message | None:
        """The attPrp/detPrp to send now for a queued propagation, or None to skip it."""


class _ScOp:
    """One SC-initiated operation waiting for its response."""

    __slots__ = ("command", "deadline", "propagation", "rsp", "waiters")

    def __init__(
        self,
        command: str,
        deadline: float,
        waiters: list[defer.Deferred[Any]] | None,
        propagation: tuple[bool, int] | None,
    ) -> None:
        self.command = command
        self.rsp = _RESPONSES[command]
        self.deadline = deadline
        self.waiters = waiters
        self.propagation = propagation


class Session:
    """One base station's session, from `con` to the end of its connection.

    The protocol feeds every decoded map to `receive` and sets `last_rx` on every read; the
    session writes frames through `send`/`send_many` and ends the connection through
    `disconnect(abort)`. Time comes from the injected clock; one DelayedCall per session serves
    the idle ping, the status poll and every operation timeout.
    """

    log = Logger()

    def __init__(
        self,
        center: IServiceCenter,
        config: SessionConfig,
        clock: IReactorTime,
        *,
        peer: str,
        send: Callable[[bytes], None],
        send_many: Callable[[list[bytes]], None],
        disconnect: Callable[[bool], None],
        stats: SessionStats | None = None,
    ) -> None:
        self._center = center
        self._config = config
        self._clock = clock
        self.peer = peer
        self._send = send
        self._send_many = send_many
        self._disconnect = disconnect
        self.stats = stats if stats is not None else SessionStats()
        self.state = State.AWAIT_CON
        self.closed = False
        """Whether the session ended (kept in step with `state`, read for every frame)."""
        self.connected_at = clock.seconds()
        self.established_at: float | None = None
        self.last_rx = self.connected_at
        """Clock time of the last read; the protocol sets it, the idle ping reads it."""
        self.certificate: x509.Certificate | None = None
        self.con: m.Con | None = None
        self.bs_eui = 0
        self.bs_hex = ""
        self.version = config.version
        self.sc_uuid = b""
        self.resumed = False
        """Whether this session continues the station's previous one (snResume answered true)."""
        self._offer: ResumeState | None = None
        self._fell_back = False
        self._final: ResumeState | None = None
        self._refuse_deadline = 0.0
        major, minor, patch = m.parse_version(config.version)
        self._major = major
        # Every version the hub speaks: its own, and each known dialect of that major as x.y.0.
        self._spoken = sorted(
            {(a, b, 0) for a, b in KNOWN_VERSIONS if a == major if (a, b) != (major, minor)} | {(major, minor, patch)}
        )
        self._sc_next = -1
        self._sc_pending: dict[int, _ScOp] = {}
        self._bs_last = 0
        # BS-initiated operations answered by us: opId -> (the message we wait for, since).
        self._awaiting: dict[int, tuple[str, float]] = {}
        self._ping_op: int | None = None
        self._ping_deadline = 0.0
        self._status_op: int | None = None
        self._next_status = 0.0
        self._prp_queue: deque[tuple[bool, int]] = deque()
        self._prp_in_flight = 0
        self._prp_burst = 0
        self._prp_refused = 0
        self._prp_started = 0.0
        self._timer: IDelayedCall | None = None
        self._notes = 0
        self._dispatch: dict[type[m.Message], Callable[[Any], None]] = {
            m.Con: self._on_con,
            m.ConCmp: self._on_con_cmp,
            m.Ping: self._on_ping,
            m.UlData: self._on_ul_data,
            m.VmUlData: self._on_vm_ul_data,
            m.Att: self._on_att,
            m.Det: self._on_det,
            m.DlDataRes: self._on_dl_data_res,
            m.DlRxStat: self._on_dl_rx_stat,
            m.Error: self._on_error,
            m.ErrorAck: self._on_error_ack,
            **dict.fromkeys(_RESPONSES.values(), self._on_response),
            **dict.fromkeys(
                (m.UlDataCmp, m.PingCmp, m.AttCmp, m.DetCmp, m.DlDataResCmp, m.DlRxStatCmp, m.VmUlDataCmp),
                self._on_completion,
            ),
        }
        self._arm(self.connected_at + config.op_timeout)

    # -- what the service center uses

    @property
    def bidi(self) -> bool:
        return bool(self.con and self.con.bidi)

    @property
    def propagation_pending(self) -> int:
        """attPrp/detPrp queued or in flight."""
        return len(self._prp_queue) + self._prp_in_flight

    def describe(self) -> str:
        """For log lines: the bsEui (once known) and the peer address."""
        return f"base station {self.bs_hex} at {self.peer}" if self.bs_hex else f"base station at {self.peer}"

    def set_certificate(self, cert: x509.Certificate | None) -> None:
        """The client certificate, once the TLS handshake completed."""
        self.certificate = cert

    def reply_in_json(self) -> None:
        """The station sent JSON (the specification allows "JSON/MessagePack"): everything this
        session sends from now on goes out as JSON frames too, as such a station expects."""
        send, send_many = self._send, self._send_many
        self._send = lambda data: send(to_json_frames(data))
        self._send_many = lambda frames: send_many([to_json_frames(frame) for frame in frames])

    def propagate(self, items: Iterable[tuple[bool, int]]) -> None:
        """Queue (attach?, epEui) propagations: sent `propagate_window` at a time, each response
        releasing the next, so the connection's reads never wait for them."""
        if self.state is State.CLOSED:
            return
        if not self._prp_queue and not self._prp_in_flight:
            self._prp_started, self._prp_burst, self._prp_refused = self._clock.seconds(), 0, 0
        self._prp_queue.extend(items)
        if self.state is State.ESTABLISHED:
            self._pump()

    def request(self, make: Callable[[int], m.Message]) -> defer.Deferred[Any]:
        """Start an SC-initiated operation with `make(opId)` (status, dlDataQue, dlDataRev,
        dlRxStatQry, ...). Fires with the response message; fails with OperationFailed,
        OperationTimedOut or SessionClosed."""
        return self._start(make)[1]

    def _start(self, make: Callable[[int], m.Message]) -> tuple[int, defer.Deferred[Any]]:
        if self.state is not State.ESTABLISHED:
            return 0, defer.fail(SessionClosed(f"{self.describe()} is not connected"))
        op_id = self._take_op_id()
        msg = make(op_id)
        d: defer.Deferred[Any] = defer.Deferred()
        deadline = self._clock.seconds() + self._config.op_timeout
        self._sc_pending[op_id] = _ScOp(msg.command, deadline, [d], None)
        self.stats.sent[msg.command] += 1
        self._send(self._frame(msg))
        self._arm(deadline)
        return op_id, d

    def _frame(self, msg: m.Message) -> bytes:
        """An SC-initiated message as a frame, in this station's dialect and float widths."""
        return encode_frame(m.encode(msg, version=self.version), single_float=msg.command in m.SINGLE_FLOAT_COMMANDS)

    def poll_status(self) -> defer.Deferred[m.StatusRsp]:
        """Ask for the base station's status now (joins a poll already under way)."""
        if self._status_op is not None:
            op = self._sc_pending.get(self._status_op)
            if op is not None and op.waiters is not None:
                d: defer.Deferred[m.StatusRsp] = defer.Deferred()
                op.waiters.append(d)
                return d
        op_id, d = self._start(lambda op: m.Status(opId=op))
        if op_id:
            self._status_op = op_id
        return d

    def close(self, reason: str, *, abort: bool = False) -> None:
        """End the session now and the connection (after what was written, unless `abort`)."""
        if self.state is State.CLOSED:
            return
        self._teardown(reason)
        self._disconnect(abort)

    def connection_lost(self, reason: str) -> None:
        if self.state is not State.CLOSED:
            self._teardown(reason)

    # -- input

    def receive(self, wire: dict[str, Any]) -> None:
        """Handle one framed message map."""
        if self.closed:
            return
        if wire.get("command") == "ulDataCmp":
            # Half of all traffic, and nothing to validate but the opId: no message value.
            op_id = wire.get("opId")
            if type(op_id) is int:
                entry = self._awaiting.pop(op_id, None)
                if entry is None or entry[0] != "ulDataCmp":
                    self._unexpected_completion("ulDataCmp", op_id, entry)
                return
        try:
            msg = m.decode(wire)
        except m.MessageError as e:
            self._invalid(e)
            return
        handler = self._dispatch.get(type(msg), self._on_unexpected)
        try:
            handler(msg)
        except Exception:
            # A bug must cost one operation, not the connection (and all that is in flight on it).
            self.log.failure("handling {command} {opId} of {bs} failed", command=msg.command, opId=msg.opId,
                             bs=self.describe())
            if msg.command in _INITIATED_BY_BS and not self.closed:
                self._send_error(msg.opId, EIO, f"{msg.command}: internal error of the service center")

    def _invalid(self, e: m.MessageError) -> None:
        self.stats.invalid += 1
        self._note("invalid message from {bs}: {problem}", problem=e.message)
        op_id = e.opId
        if op_id is None:
            return  # no operation to answer
        if e.command == "errorAck":
            return
        if e.command == "error":
            # Even a malformed error ends its operation.
            self._on_error(m.Error(opId=op_id, code=0, message=e.message))
            return
        if e.command in _INITIATED_BY_BS and op_id > self._bs_last:
            self._bs_last = op_id
        op = self._sc_pending.pop(op_id, None) if op_id < 0 else None
        if op is not None:
            # An invalid response: the error replaces our Cmp and ends the operation.
            self._op_over(op, OperationFailed(op.command, e.code, f"invalid response: {e.message}"))
        self._send_error(op_id, e.code, e.message)

    def _begin(self, msg: m.Message) -> bool:
        """The checks every BS-initiated operation passes: session set up, opId increasing."""
        op = msg.opId
        if self.state is not State.ESTABLISHED:
            self._send_error(
                op, EINVAL, f"{msg.command}: not before the session is set up (con, conRsp, conCmp come first)"
            )
            return False
        if op <= self._bs_last:
            if op <= 0:
                text = f"{msg.command}: a base-station operation needs a positive opId, got {op}"
            else:
                text = f"{msg.command}: opId {op} does not increase (the previous operation was {self._bs_last})"
            self._send_error(op, EINVAL, text)
            return False
        self._bs_last = op
        self.stats.received[msg.command] += 1
        return True

    # -- connect

    def _on_con(self, msg: m.Con) -> None:
        if self.state is not State.AWAIT_CON:
            self._send_error(msg.opId, EINVAL, "con: this connection has a session already")
            return
        if msg.opId != 0:
            self._send_error(msg.opId, EINVAL, f"con: field 'opId' must be 0, got {msg.opId}")
            return
        self.stats.received["con"] += 1
        major, minor, patch = m.parse_version(msg.version)
        if major != self._major:
            self.log.warn(
                "refusing base station {bsEui} at {peer}: it speaks BSSCI {version}, the hub {hub}"
                " (major versions differ); closing after its errorAck",
                bsEui=f"{msg.bsEui:016x}",
                peer=self.peer,
                version=msg.version,
                hub=self._config.version,
            )
            self._refuse_version(msg.version)
            return
        # The highest version we speak that does not exceed the station's; a station that cannot
        # live with it answers error and closes.
        offered = [v for v in self._spoken if v <= (major, minor, patch)] or self._spoken[:1]
        answer = "{}.{}.{}".format(*offered[-1])
        self.con = msg
        self.bs_eui = msg.bsEui
        self.bs_hex = f"{msg.bsEui:016x}"
        self.version = answer
        self._offer = None
        try:
            self._center.session_connecting(self, msg)
        except Refused as e:
            self.log.warn("refused {bs}: {reason}", bs=self.describe(), reason=e.message)
            self._refuse(e.code, e.message)
            return
        self.state = State.AWAIT_CON_CMP
        offer = self._offer
        if offer is not None:
            # Both counters continue; never an SC opId the station may have seen already.
            self.resumed = True
            self.sc_uuid = offer.sc_uuid
            self._sc_next = offer.sc_next
            if msg.snScOpId is not None and msg.snScOpId <= offer.sc_next:
                self._sc_next = msg.snScOpId - 1
            self._bs_last = offer.bs_last
        else:
            # Fresh every time, never the BS's snBsUuid: a base station that sees its own UUID
            # assumes a resumed session and rejects SC opIds restarting at -1.
            self.resumed = False
            self.sc_uuid = os.urandom(16)
            self._sc_next = -1
            self._bs_last = 0
        rsp = m.ConRsp(
            opId=0,
            version=answer,
            scEui=self._config.sc_eui,
            vendor=self._config.vendor,
            swVersion=self._config.sw_version,
            snResume=self.resumed,
            snScUuid=self.sc_uuid,
        )
        self._send(encode_frame(m.encode(rsp)))

    def _refuse(self, code: int, text: str) -> None:
        self._send_error(0, code, text, await_ack=False)
        self.close(text)

    def _refuse_version(self, version: str) -> None:
        """Answer `error` and close once the station acknowledged it, or after REFUSAL_WAIT."""
        spoken = ", ".join("{}.{}.{}".format(*v) for v in self._spoken)
        self._send_error(0, EPROTONOSUPPORT, f"BSSCI version {version} is not supported: the service center"
                         f" speaks {spoken} (major versions differ)", await_ack=False)
        self.state = State.REFUSING
        self._dispatch = dict.fromkeys(m.MESSAGE_CLASSES.values(), self._while_refusing)
        self._refuse_deadline = self._clock.seconds() + REFUSAL_WAIT
        self._arm(self._refuse_deadline)

    def _while_refusing(self, msg: m.Message) -> None:
        if type(msg) is m.ErrorAck and msg.opId == 0:
            self.close("BSSCI version refused")

    def offer_resume(self, state: ResumeState) -> None:
        """From session_connecting: answer this `con` with snResume true, continuing `state`'s opId
        counters, and reissue its unfinished propagations once conCmp arrives."""
        self._offer = state

    def resume_state(self) -> ResumeState | None:
        """What a resume of this session would continue (None if it never got past conCmp)."""
        if self._final is not None or self.closed:
            return self._final
        con = self.con
        if con is None or self.established_at is None:
            return None
        unfinished = [op.propagation for op in self._sc_pending.values() if op.propagation is not None]
        return ResumeState(con.snBsUuid, self.sc_uuid, self._sc_next, self._bs_last,
                           (*unfinished, *self._prp_queue), self._clock.seconds())

    def _on_con_cmp(self, msg: m.ConCmp) -> None:
        if self.state is not State.AWAIT_CON_CMP or msg.opId != 0:
            self._note("unexpected conCmp (opId {opId}) from {bs}", opId=msg.opId)
            return
        self.state = State.ESTABLISHED
        now = self._clock.seconds()
        self.established_at = now
        self._next_status = now  # the first status poll goes out at once
        if self._offer is not None:
            # The station kept what the previous session propagated: only the unfinished ones again.
            self.propagate(self._offer.propagations)
            self._offer = None
        self._center.session_ready(self)
        if self.state is State.ESTABLISHED:
            self._pump()
            self._wake()

    # -- BS-initiated operations

    def _on_ul_data(self, msg: m.UlData) -> None:
        if not self._begin(msg):
            return
        try:
            stored = self._center.uplink(self, msg)
        except Refused as e:
            self._send_error(msg.opId, e.code, e.message)
            return
        stored.addCallbacks(self._ul_stored, self._ul_failed, callbackArgs=(msg.opId,), errbackArgs=(msg.opId,))

    def _ul_stored(self, _: object, op_id: int) -> None:
        # ulDataRsp only now: the copy is committed, so acknowledging it loses nothing.
        if self.state is not State.CLOSED:
            self._send(_UL_DATA_RSP(op_id))
            self._awaiting[op_id] = ("ulDataCmp", self.last_rx)

    def _ul_failed(self, failure: Failure, op_id: int) -> None:
        self._note("could not store an uplink from {bs}: {problem}", problem=failure.getErrorMessage())
        if self.state is not State.CLOSED:
            self._send_error(op_id, EIO, "ulData: the service center could not store the uplink; send it again")

    def _on_vm_ul_data(self, msg: m.VmUlData) -> None:
        # As ulData: vm.ulDataRsp only once the copy is committed.
        if not self._begin(msg):
            return
        try:
            stored = self._center.vm_uplink(self, msg)
        except Refused as e:
            self._send_error(msg.opId, e.code, e.message)
            return
        stored.addCallbacks(self._vm_stored, self._ul_failed, callbackArgs=(msg.opId,), errbackArgs=(msg.opId,))

    def _vm_stored(self, _: object, op_id: int) -> None:
        if self.state is not State.CLOSED:
            self._answer(op_id, _FRAMES["vm.ulDataRsp"], "vm.ulDataCmp")

    def _on_ping(self, msg: m.Ping) -> None:
        if self._begin(msg):
            self._answer(msg.opId, _FRAMES["pingRsp"], "pingCmp")

    def _answer(self, op_id: int, frame: Callable[[int], bytes], completion: str) -> None:
        self._send(frame(op_id))
        self._awaiting[op_id] = (completion, self.last_rx)

    def _on_att(self, msg: m.Att) -> None:
        if self._begin(msg):
            d = defer.maybeDeferred(self._center.attach_request, self, msg)
            d.addBoth(self._answered, msg.opId, "attCmp")

    def _on_det(self, msg: m.Det) -> None:
        if self._begin(msg):
            d = defer.maybeDeferred(self._center.detach_request, self, msg)
            d.addBoth(self._answered, msg.opId, "detCmp")

    def _answered(self, result: Any, op_id: int, completion: str) -> None:
        """Send the response message (or the error) the service center came up with."""
        if self.state is State.CLOSED:
            return
        if isinstance(result, Failure):
            refused = result.value
            if isinstance(refused, Refused):
                self._send_error(op_id, refused.code, refused.message)
            else:
                self.log.failure("handling operation {opId} of {bs} failed", result, opId=op_id, bs=self.describe())
                self._send_error(op_id, EIO, "internal error of the service center")
            return
        self._send(encode_frame(m.encode(result)))
        self._awaiting[op_id] = (completion, self.last_rx)

    def _on_dl_data_res(self, msg: m.DlDataRes) -> None:
        if self._begin(msg):
            self._report(self._center.downlink_result, msg, _FRAMES["dlDataResRsp"], "dlDataResCmp")

    def _on_dl_rx_stat(self, msg: m.DlRxStat) -> None:
        if self._begin(msg):
            self._report(self._center.downlink_rx_status, msg, _FRAMES["dlRxStatRsp"], "dlRxStatCmp")

    def _report(self, handler: Callable[[Session, Any], Any], msg: m.Message, frame: Any, completion: str) -> None:
        try:
            recorded = handler(self, msg)
        except Refused as e:
            self._send_error(msg.opId, e.code, e.message)
            return
        except Exception:
            # Answered all the same: the base station must not resend a report we mishandled.
            self.log.failure("handling {command} of {bs} failed", command=msg.command, bs=self.describe())
        else:
            if isinstance(recorded, defer.Deferred):
                recorded.addCallbacks(self._reported, self._report_failed, callbackArgs=(msg.opId, frame, completion),
                                      errbackArgs=(msg.opId, msg.command))
                return
        self._answer(msg.opId, frame, completion)

    def _reported(self, _: object, op_id: int, frame: Any, completion: str) -> None:
        # Answered only now that the report is recorded: a crash before makes the station report it again.
        if self.state is not State.CLOSED:
            self._answer(op_id, frame, completion)

    def _report_failed(self, failure: Failure, op_id: int, command: str) -> None:
        self._note("could not record {command} from {bs}: {problem}", command=command,
                   problem=failure.getErrorMessage())
        if self.state is not State.CLOSED:
            self._send_error(op_id, EIO, f"{command}: the service center could not record it; send it again")

    def _on_completion(self, msg: m.Message) -> None:
        entry = self._awaiting.pop(msg.opId, None)
        if entry is None or entry[0] != msg.command:
            self._unexpected_completion(msg.command, msg.opId, entry)

    def _unexpected_completion(self, command: str, op_id: int, entry: tuple[str, float] | None) -> None:
        if entry is not None:
            self._awaiting[op_id] = entry  # it waits for something else (an errorAck)
        self._note("unexpected {command} (opId {opId}) from {bs}", command=command, opId=op_id)

    # -- SC-initiated operations

    def _take_op_id(self) -> int:
        op_id = self._sc_next
        self._sc_next -= 1
        return op_id

    def _pump(self) -> None:
        """Send queued propagations while fewer than propagate_window are in flight."""
        queue = self._prp_queue
        window = self._config.propagate_window
        frames: list[bytes] = []
        deadline = 0.0
        while self._prp_in_flight < window and queue:
            attach, ep = queue.popleft()
            msg = self._center.propagation(self, attach, ep, self._sc_next)
            if msg is None:
                continue
            op_id = self._take_op_id()
            if not deadline:
                deadline = self._clock.seconds() + self._config.op_timeout
            self._sc_pending[op_id] = _ScOp(msg.command, deadline, None, (attach, ep))
            self._prp_in_flight += 1
            self.stats.sent[msg.command] += 1
            frames.append(self._frame(msg))
        if frames:
            self._send_many(frames)
            self._arm(deadline)
        elif not self._prp_in_flight and self._prp_burst:
            self.log.info(
                "{bs}: {count} attachment propagations done in {seconds:.1f} s, {refused} refused",
                bs=self.describe(),
                count=self._prp_burst,
                seconds=self._clock.seconds() - self._prp_started,
                refused=self._prp_refused,
            )
            self._prp_burst = 0

    def _on_response(self, msg: m.Message) -> None:
        op_id = msg.opId
        if op_id == self._ping_op and type(msg) is m.PingRsp:
            self._ping_op = None
            self._send(_FRAMES["pingCmp"](op_id))
            return
        op = self._sc_pending.pop(op_id, None)
        if op is None or type(msg) is not op.rsp:
            if op is not None:
                self._op_over(op, OperationFailed(op.command, EINVAL, f"answered with {msg.command}"))
            self._send_error(op_id, EINVAL, f"{msg.command}: no such operation {op_id} in progress")
            return
        self._send(_COMPLETION[op.rsp](op_id))
        if type(msg) is m.StatusRsp:
            self._status_op = None
            try:
                self._center.status_report(self, msg)
            except Exception:
                self.log.failure("storing the status of {bs} failed", bs=self.describe())
        self._op_over(op, msg)

    def _op_over(self, op: _ScOp, result: Any) -> None:
        """An SC-initiated operation ended: `result` is the response or the exception."""
        if op.command == "status":
            self._status_op = None
        if op.waiters:
            for d in op.waiters:
                if isinstance(result, Exception):
                    d.errback(result)
                else:
                    d.callback(result)
        if op.propagation is not None:
            self._prp_in_flight -= 1
            self._prp_burst += 1
            if isinstance(result, Exception):
                self._prp_refused += 1
                attach, ep = op.propagation
                self._note(
                    "{bs} did not take {command} of end point {epEui}: {problem}",
                    command=op.command,
                    epEui=f"{ep:016x}",
                    problem=str(result),
                )
            if self.state is State.ESTABLISHED:
                self._pump()

    # -- errors

    def _send_error(self, op_id: int, code: int, text: str, *, await_ack: bool = True) -> None:
        self.stats.errors_sent += 1
        self._send(encode_frame({"command": "error", "opId": op_id, "code": code, "message": text}))
        if await_ack:
            self._awaiting[op_id] = ("errorAck", self.last_rx)

    def _on_error(self, msg: m.Error) -> None:
        self.stats.errors_received += 1
        op_id = msg.opId
        self._send(_FRAMES["errorAck"](op_id))
        if op_id == 0 and self.state is State.AWAIT_CON_CMP and self.resumed:
            self.log.info(
                "{bs} refused to resume its session (error {code}: {message}); a new con gets a fresh one",
                bs=self.describe(), code=msg.code, message=msg.message,
            )
            self._fall_back()
            return
        if op_id == 0 and self.state is State.AWAIT_CON_CMP:
            self.log.warn(
                "{bs} refused the connection: error {code}: {message}", bs=self.describe(), code=msg.code,
                message=msg.message,
            )
            self.close(f"conRsp refused: {msg.message}")
            return
        if op_id == self._ping_op:
            self._ping_op = None  # an answer all the same: the base station is alive
            return
        op = self._sc_pending.pop(op_id, None)
        if op is not None:
            self._op_over(op, OperationFailed(op.command, msg.code, msg.message))
            return
        self._awaiting.pop(op_id, None)
        self._note(
            "{bs} sent error {code} for operation {opId}: {message}", code=msg.code, opId=op_id, message=msg.message
        )

    def _fall_back(self) -> None:
        """The station refused the resume: wait for its next `con` (here, or on a new connection),
        which gets a fresh session (fresh snScUuid, SC opIds from -1, everything propagated)."""
        self.state = State.AWAIT_CON
        self.resumed = False
        self._offer = None
        self._fell_back = True  # the service center counts this connection as the station's
        self._sc_next, self._bs_last = -1, 0
        self._awaiting.clear()
        self.connected_at = self._clock.seconds()
        self._arm(self.connected_at + self._config.op_timeout)

    def _on_error_ack(self, msg: m.ErrorAck) -> None:
        entry = self._awaiting.get(msg.opId)
        if entry is not None and entry[0] == "errorAck":
            del self._awaiting[msg.opId]

    def _on_unexpected(self, msg: m.Message) -> None:
        """A message only a service center sends."""
        command = msg.command
        if command.endswith("Cmp"):
            # Every completion a station may send has its handler: this one only an SC sends.
            self._send_error(msg.opId, EINVAL, f"{command}: wrong direction, only a service center sends it")
        elif command.endswith("Rsp"):
            self._send_error(msg.opId, EINVAL, f"{command}: no such operation {msg.opId} in progress")
        else:
            self._send_error(msg.opId, ENOSYS, f"{command}: a service center does not take this command")

    def _note(self, text: str, **fields: Any) -> None:
        """Log a problem with this base station, up to NOTE_LIMIT per connection."""
        self._notes += 1
        if self._notes <= NOTE_LIMIT:
            self.log.warn(text, bs=self.describe(), **fields)

    # -- time

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._wake)

    def _wake(self) -> None:
        """The session's only timer: set-up timeout, operation timeouts, idle ping, status poll."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.state is State.CLOSED:
            return
        config = self._config
        now = self._clock.seconds()
        if self.state is State.REFUSING:
            if now < self._refuse_deadline:
                self._arm(self._refuse_deadline)
            else:
                self.close("BSSCI version refused; no errorAck", abort=True)
            return
        if self.state is not State.ESTABLISHED:
            deadline = self.connected_at + config.op_timeout
            if now < deadline:
                self._arm(deadline)
                return
            self.log.warn(
                "{bs} did not complete con within {seconds:g} s; closing", bs=self.describe(), seconds=config.op_timeout
            )
            self.close("no con", abort=True)
            return
        pending = self._sc_pending
        while pending:
            # Every operation has the same timeout, so deadlines follow insertion order.
            op_id = next(iter(pending))
            op = pending[op_id]
            if op.deadline > now:
                break
            del pending[op_id]
            self.stats.op_timeouts += 1
            self._op_over(op, OperationTimedOut(f"{op.command} {op_id}: no answer within {config.op_timeout:g} s"))
        awaiting = self._awaiting
        cutoff = now - config.op_timeout
        while awaiting:
            op_id = next(iter(awaiting))
            if awaiting[op_id][1] > cutoff:
                break
            del awaiting[op_id]  # the base station never completed it: stop waiting
        if self._ping_op is not None:
            if now >= self._ping_deadline:
                self.stats.ping_timeouts += 1
                self.log.warn(
                    "{bs} did not answer a ping within {seconds:g} s; closing",
                    bs=self.describe(),
                    seconds=config.ping_timeout,
                )
                self.close("ping timeout", abort=True)
                return
        elif now - self.last_rx >= config.ping_idle:
            self._ping_op = self._take_op_id()
            self._ping_deadline = now + config.ping_timeout
            self.stats.sent["ping"] += 1
            self._send(_FRAMES["ping"](self._ping_op))
        if now >= self._next_status:
            self._next_status = now + config.status_interval
            if self._status_op is None:
                self.poll_status().addErrback(self._status_failed)
        wake = min(
            self._ping_deadline if self._ping_op is not None else self.last_rx + config.ping_idle,
            self._next_status,
        )
        if pending:
            wake = min(wake, pending[next(iter(pending))].deadline)
        if awaiting:
            wake = min(wake, awaiting[next(iter(awaiting))][1] + config.op_timeout)
        self._arm(wake)

    def _status_failed(self, failure: Failure) -> None:
        if not failure.check(SessionClosed):
            self._note("status poll of {bs} failed: {problem}", problem=failure.getErrorMessage())

    # -- end

    def _teardown(self, reason: str) -> None:
        accepted = self.state in (State.AWAIT_CON_CMP, State.ESTABLISHED) or self._fell_back
        self._final = self.resume_state()
        self.state = State.CLOSED
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._sc_pending = self._sc_pending, {}
        self._prp_queue.clear()
        self._prp_in_flight = 0
        self._awaiting.clear()
        closed = SessionClosed(f"{self.describe()} disconnected: {reason}")
        for op in pending.values():
            for d in op.waiters or ():
                d.errback(closed)
        if self._notes > NOTE_LIMIT:
            self.log.warn(
                "{bs}: {count} more problems were not logged", bs=self.describe(), count=self._notes - NOTE_LIMIT
            )
        if accepted:
            self._center.session_closed(self, reason)
