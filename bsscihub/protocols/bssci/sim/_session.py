"""One simulated base station's side of a BSSCI connection, without I/O: bytes in, bytes out.
It connects, answers every SC-initiated operation, sends uplinks and queued downlinks, and checks the SC's rules."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import msgpack  # type: ignore[import-untyped]

from bsscihub import __version__
from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.framing import MAGIC, Framer, FramingError, encode_frame, op_frame_encoder
from bsscihub.protocols.bssci.sim._stats import Counters, Histogram

__all__ = ["BaseStation", "Host", "Uplink", "ul_template"]

# An uplink shared by its copies: [epEui, packetCnt, rxTime, userData, acked,
# when its first copy was sent (None until then), dlAck (decided then)].
Uplink = list[Any]
_ACKED = 4
_FIRST_SENT = 5
_DL_ACK = 6

# SC-initiated operations a base station answers, and the answer's command.
_ANSWERS = {
    "attPrp": "attPrpRsp",
    "detPrp": "detPrpRsp",
    "status": "statusRsp",
    "ping": "pingRsp",
    "dlDataQue": "dlDataQueRsp",
    "dlDataRev": "dlDataRevRsp",
    "dlRxStatQry": "dlRxStatQryRsp",
}
_COMPLETIONS = {answer[:-3] + "Cmp": request for request, answer in _ANSWERS.items()}

_packer = msgpack.Packer(use_bin_type=True)

_ul_data_cmp = op_frame_encoder("ulDataCmp")
_ping = op_frame_encoder("ping")
_ping_cmp = op_frame_encoder("pingCmp")
_error_ack = op_frame_encoder("errorAck")
_dl_data_res_cmp = op_frame_encoder("dlDataResCmp")
_simple_answers = {command: op_frame_encoder(answer) for command, answer in _ANSWERS.items() if command != "status"}


def ul_template(subpackets: int = 0) -> dict[str, Any]:
    """The ulData map in the field order base stations send, with per-copy fields as placeholders."""
    template: dict[str, Any] = {
        "command": "ulData",
        "opId": 0,
        "epEui": 0,
        "rxTime": 0,
        "packetCnt": 0,
        "snr": 0.0,
        "rssi": 0.0,
        "eqSnr": 0.0,
        "profile": "eu1",
        "mode": "ulp",
    }
    if subpackets:
        template["subpackets"] = {
            "snr": [10.0 + (i % 7) * 0.5 for i in range(subpackets)],
            "rssi": [-110.0 - (i % 5) for i in range(subpackets)],
            "frequency": [868_180_000 + 2380 * (i % 24) for i in range(subpackets)],
        }
    template.update({"userData": [], "format": 0, "dlOpen": False, "responseExp": False, "dlAck": False})
    return template


class Host(Protocol):
    """What a base station needs from the run it belongs to."""

    counters: Counters
    latency: Histogram  # the current phase's histogram
    latency_second: Histogram  # this second's, for the per-second line
    copy_spread: Histogram  # how long after an uplink's first copy its others went out
    outstanding: int  # uplink copies queued or in flight, all base stations
    # Sensors whose uplink carried a downlink -> that uplink's packetCnt: the sensor's next
    # uplink acknowledges it (dlAck), through whichever stations hear it.
    dl_ack_due: dict[int, int]

    def request_flush(self, station: BaseStation) -> None: ...
    def station_ready(self, station: BaseStation) -> None: ...
    def station_att_prp_done(self, station: BaseStation) -> None: ...


class BaseStation:
    """The protocol state of one simulated base station; it outlives its connections.

    `connection_made(write, close)` starts a session with `con`; frames are
    fed to `data_received`; output is gathered and handed to `write` in one
    piece by `flush`, which the host calls once per event-loop turn.
    """

    def __init__(
        self,
        index: int,
        eui: int,
        host: Host,
        *,
        version: str = "1.0.0",
        vendor: str = "bsscihub",
        model: str = "sim",
        in_flight: int = 8,
        expect_att_prp: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.index = index
        self.eui = eui
        self.name = f"sim-{eui:016x}"
        self.version = version
        self.vendor = vendor
        self.model = model
        self.in_flight = in_flight
        self.expect_att_prp = expect_att_prp
        self._host = host
        self._clock = clock
        self.queue: deque[tuple[Uplink, float, float]] = deque()
        self.ready = False
        self.att_prp_count = 0  # over the station's lifetime, not per connection
        self.att_prp_done_at: float | None = None  # wall clock
        self._write: Callable[[bytes], None] | None = None
        self._close: Callable[[], None] | None = None
        # epEui -> dlDataQue in arrival order; a key exists only while its list is not empty. Like a
        # real base station, it forgets them at a new session and at an attPrp for their sensor.
        self._downlinks: dict[int, list[m.DlDataQue]] = {}
        self._dl_after: dict[int, list[m.DlDataRes]] = {}  # ulData opId -> results due after its Rsp
        self._dl_results: dict[int, m.DlDataRes] = {}  # dlDataRes opId -> result, until Rsp
        self._dl_unreported: list[m.DlDataRes] = []  # results a lost connection never got answered
        self._reset()
        # The ulData map, mutated per copy: packing one dict is cheaper than building it.
        self._ul: dict[str, Any] = ul_template()

    def _reset(self) -> None:
        # A downlink that went out is reported on the next connection if this one never answered it.
        for results in self._dl_after.values():
            self._dl_unreported.extend(results)
        self._dl_unreported.extend(self._dl_results.values())
        self._dl_after = {}
        self._dl_results = {}
        self._framer = Framer()
        self._out: list[bytes] = []
        self._dirty = False
        self._next_op = 1
        self._inflight: dict[int, tuple[float, Uplink]] = {}
        self._sc_pending: dict[int, str] = {}  # SC opId -> its command, until Cmp
        self._sc_errors: set[int] = set()  # SC opIds we answered with error, until errorAck
        self._last_sc_op = 0
        self._ping_op: int | None = None
        self._ping_sent_at = 0.0
        self.last_tx = self._clock()
        self.ready = False

    # --- connection ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._write is not None

    @property
    def dl_results_pending(self) -> int:
        """Downlink results not yet answered by the SC, or waiting for their uplink's ulDataRsp."""
        return len(self._dl_results) + len(self._dl_after)

    @property
    def load(self) -> int:
        """Uplink copies in flight or waiting for the window."""
        return len(self._inflight) + len(self.queue)

    def connection_made(self, write: Callable[[bytes], None], close: Callable[[], None]) -> None:
        self._reset()
        self._write, self._close = write, close
        con = m.Con(
            opId=0,
            version=self.version,
            bsEui=self.eui,
            vendor=self.vendor,
            model=self.model,
            name=self.name,
            swVersion=__version__,
            bidi=True,
            # Fresh per connection: the simulator never resumes a session.
            snBsUuid=os.urandom(16),
        )
        self._send(encode_frame(m.encode(con)))
        self.flush()

    def connection_lost(self) -> tuple[int, int]:
        """Forget the connection; returns (copies in flight, copies queued) that were lost."""
        lost = (len(self._inflight), len(self.queue))
        self._host.outstanding -= lost[0] + lost[1]
        self.queue.clear()
        self._write = self._close = None
        self._reset()
        return lost

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def flush(self) -> None:
        self._dirty = False
        if self._out and self._write is not None:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._write(data)
            self.last_tx = self._clock()

    def _send(self, frame: bytes) -> None:
        self._out.append(frame)
        if not self._dirty:
            self._dirty = True
            self._host.request_flush(self)

    def _anomaly(self, what: str) -> None:
        self._host.counters.anomalies[what] += 1

    # --- uplinks ---------------------------------------------------------------

    def offer(self, uplink: Uplink, snr: float, rssi: float) -> None:
        """Queue one copy of an uplink as this station heard it; sent when the window allows."""
        self.queue.append((uplink, snr, rssi))
        self._host.outstanding += 1
        if self.ready and len(self._inflight) < self.in_flight:
            self._pump(self._clock())

    def _pump(self, now: float) -> None:
        inflight, queue, ul = self._inflight, self.queue, self._ul
        room = self.in_flight - len(inflight)
        if room <= 0 or not queue:
            return
        pack, send = _packer.pack, self._send
        counters = self._host.counters
        spread = self._host.copy_spread
        downlinks = self._downlinks
        while room and queue:
            uplink, snr, rssi = queue.popleft()
            first = uplink[_FIRST_SENT]
            if first is None:
                uplink[_FIRST_SENT] = now
                if self._host.dl_ack_due:
                    self._decide_dl_ack(uplink)
            else:
                spread.record(now - first)
            op = self._next_op
            self._next_op = op + 1
            ul["opId"] = op
            ul["epEui"] = uplink[0]
            ul["rxTime"] = uplink[2]
            ul["packetCnt"] = uplink[1]
            ul["snr"] = snr
            ul["rssi"] = rssi
            ul["eqSnr"] = snr + 3.0
            ul["userData"] = uplink[3]
            # Two cheap checks per copy: downlinks and their acknowledgements are rare.
            if uplink[_DL_ACK] or (downlinks and uplink[0] in downlinks):
                payload = self._pack_with_downlink(op, uplink)
            else:
                payload = pack(ul)
            send(MAGIC + len(payload).to_bytes(4, "little") + payload)
            inflight[op] = (now, uplink)
            counters.ul_sent += 1
            room -= 1

    def _decide_dl_ack(self, uplink: Uplink) -> None:
        """At an uplink's first copy: does it acknowledge the downlink its sensor received with
        the uplink before (dlAck: "acks the downlink of packetCnt-1")?"""
        ep, cnt = uplink[0], uplink[1]
        carried = self._host.dl_ack_due.get(ep)
        if carried is not None and cnt > carried:
            del self._host.dl_ack_due[ep]
            if cnt == carried + 1:
                uplink[_DL_ACK] = True
                self._host.counters.dl_acked += 1

    def _pack_with_downlink(self, op: int, uplink: Uplink) -> bytes:
        """The ulData of a sensor with downlinks queued here, or acknowledging one (dlAck): the
        first one due goes out in this uplink's downlink window (dlOpen), and its dlDataRes
        follows the uplink's ulDataRsp."""
        ep, cnt = uplink[0], uplink[1]
        queued = self._downlinks.get(ep, [])
        counters = self._host.counters
        results: list[m.DlDataRes] = []
        sent = False
        for dl in list(queued):
            if dl.cntDepend:
                counts = dl.packetCnt or ()
                if cnt not in counts:
                    if all(c < cnt for c in counts):
                        # Every counter it was meant for has passed: it can never go out.
                        queued.remove(dl)
                        results.append(m.DlDataRes(opId=0, epEui=ep, queId=dl.queId, result="expired"))
                        counters.dl_expired += 1
                    continue
            if sent:
                continue  # one downlink per uplink's window
            queued.remove(dl)
            results.append(
                m.DlDataRes(opId=0, epEui=ep, queId=dl.queId, result="sent", txTime=time.time_ns(), packetCnt=cnt)
            )
            counters.dl_sent += 1
            sent = True
            self._host.dl_ack_due[ep] = cnt
        if not queued:
            self._downlinks.pop(ep, None)
        if results:
            self._dl_after[op] = results
        ul = self._ul
        closed, no_ack = ul["dlOpen"], ul["dlAck"]
        ul["dlOpen"] = sent or closed
        ul["dlAck"] = uplink[_DL_ACK] or no_ack
        payload: bytes = _packer.pack(ul)
        ul["dlOpen"], ul["dlAck"] = closed, no_ack
        return payload

    def _start_dl_results(self, results: list[m.DlDataRes]) -> None:
        """Start one dlDataRes operation per result, with our next opIds."""
        for result in results:
            op = self._next_op
            self._next_op = op + 1
            self._dl_results[op] = result
            self._send(encode_frame(m.encode(attrs.evolve(result, opId=op))))

    def set_ul_template(self, template: dict[str, Any]) -> None:
        """The fixed fields of every ulData (profile, mode, flags, subpackets), in wire order."""
        self._ul = dict(template)

    # --- liveness --------------------------------------------------------------

    def check_idle(self, now: float, idle: float, timeout: float) -> None:
        """Ping when nothing was sent for `idle` seconds, as base stations do."""
        if not self.ready:
            return
        if self._ping_op is not None:
            if now - self._ping_sent_at > timeout:
                # Kept open: the ceiling server never answers pings by design.
                self._host.counters.ping_timeouts += 1
                self._ping_op = None
            return
        if now - self.last_tx >= idle:
            op = self._next_op
            self._next_op = op + 1
            self._ping_op, self._ping_sent_at = op, now
            self._host.counters.pings_sent += 1
            self._send(_ping(op))

    # --- input -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except FramingError as e:
            self._anomaly(f"framing error: {str(e)[:60]}")
            self.close()
            return
        now = self._clock()
        host = self._host
        counters = host.counters
        inflight = self._inflight
        dl_after = self._dl_after
        for wire in frames:
            command = wire.get("command")
            if command == "ulDataRsp":
                # The hot path, inline.
                op = wire.get("opId")
                entry = inflight.pop(op, None) if type(op) is int else None
                if entry is None or op is None:
                    self._anomaly("ulDataRsp for no ulData in flight")
                    continue
                dt = now - entry[0]
                host.latency.record(dt)
                host.latency_second.record(dt)
                self._send(_ul_data_cmp(op))
                counters.ul_completed += 1
                host.outstanding -= 1
                uplink = entry[1]
                if not uplink[_ACKED]:
                    uplink[_ACKED] = True
                    counters.unique_acked += 1
                if dl_after and op in dl_after:
                    self._start_dl_results(dl_after.pop(op))
            else:
                self._other(wire, command, now)
        if self.ready and self.queue and len(inflight) < self.in_flight:
            self._pump(now)

    def _other(self, wire: dict[str, Any], command: Any, now: float) -> None:
        op = wire.get("opId")
        if type(op) is not int or type(command) is not str:
            self._anomaly("message without a valid command or opId")
            return
        if command == "conRsp":
            self._con_rsp(wire)
        elif command == "error" and op == 0:
            self._host.counters.errors_received += 1
            self._anomaly(f"con refused: {str(wire.get('message'))[:80]}")
            self._send(_error_ack(0))
            self.flush()
            self.close()
        elif not self.ready:
            self._anomaly(f"{command} before conCmp")
        elif op < 0:
            self._sc_message(wire, command, op)
        elif command == "error":
            self._error_for_ours(wire, op)
        elif command == "pingRsp":
            if op == self._ping_op:
                self._ping_op = None
                self._host.counters.pings_answered += 1
                self._send(_ping_cmp(op))
            else:
                self._anomaly("pingRsp for no ping in flight")
        elif command == "dlDataResRsp":
            if self._dl_results.pop(op, None) is not None:
                self._host.counters.dl_reported += 1
                self._send(_dl_data_res_cmp(op))
            else:
                self._anomaly("dlDataResRsp for no dlDataRes in flight")
        else:
            self._anomaly(f"unexpected {command} with opId {op} >= 0")

    def _con_rsp(self, wire: dict[str, Any]) -> None:
        if self.ready:
            self._anomaly("second conRsp")
            return
        try:
            rsp = m.decode(wire)
        except m.MessageError as e:
            self._anomaly(f"invalid conRsp: {e.message}")
            self.close()
            return
        if not isinstance(rsp, m.ConRsp) or rsp.opId != 0:
            self._anomaly("conRsp with opId != 0")
        elif rsp.snResume:
            # We sent a fresh snBsUuid: there is nothing the SC could resume.
            self._anomaly("conRsp resumes a session that never existed")
        self._send(encode_frame({"command": "conCmp", "opId": 0}))
        if self._downlinks:
            self._host.counters.dl_forgotten += sum(map(len, self._downlinks.values()))
            self._downlinks = {}
        self.ready = True
        self._host.counters.connects += 1
        self._host.station_ready(self)
        if self._dl_unreported:
            results, self._dl_unreported = self._dl_unreported, []
            self._start_dl_results(results)
        self._pump(self._clock())

    def _sc_message(self, wire: dict[str, Any], command: str, op: int) -> None:
        """A message with a negative opId: an SC-initiated operation, its Cmp, or errorAck."""
        counters = self._host.counters
        request = _COMPLETIONS.get(command)
        if request is not None:
            if self._sc_pending.pop(op, None) is None:
                self._anomaly(f"{command} for no operation in flight")
            else:
                counters.sc_completed += 1
            return
        if command == "errorAck":
            if op in self._sc_errors:
                self._sc_errors.discard(op)
                counters.sc_completed += 1
            else:
                self._anomaly("errorAck for no error sent")
            return
        if command == "error":
            # The SC replaced its Cmp by error: acknowledge, the operation ends.
            counters.errors_received += 1
            if self._sc_pending.pop(op, None) is None:
                self._anomaly("error for no SC operation in flight")
            self._send(_error_ack(op))
            return
        # A new SC-initiated operation: opIds go -1, -2, ... per connection.
        if op >= self._last_sc_op:
            self._anomaly("SC opId not strictly decreasing")
        elif self._last_sc_op == 0 and op != -1:
            self._anomaly("first SC opId is not -1")
        self._last_sc_op = min(op, self._last_sc_op)
        if command == "attPrp":
            # The hot path of an attach storm: the shape is checked by the codec.
            try:
                m.decode(wire)
            except m.MessageError as e:
                self._answer_error(op, e.code, e.message)
                return
            self._sc_pending[op] = command
            if self._downlinks:
                forgotten = self._downlinks.pop(wire["epEui"], None)
                if forgotten:
                    counters.dl_forgotten += len(forgotten)
            self._send(_simple_answers["attPrp"](op))
            counters.sc_ops += 1
            counters.att_prp += 1
            self.att_prp_count += 1
            if self.att_prp_count == self.expect_att_prp:
                self.att_prp_done_at = time.time()
                self._host.station_att_prp_done(self)
            return
        answer = _ANSWERS.get(command)
        if answer is None:
            # A station without Variable MAC answers vm.* so, as the spec says: not an anomaly.
            self._answer_error(op, m.ENOSYS, f"the simulator does not implement {command!r}",
                               anomaly=not command.startswith("vm."))
            return
        try:
            decoded = m.decode(wire)
        except m.MessageError as e:
            self._answer_error(op, e.code, e.message)
            return
        self._sc_pending[op] = command
        counters.sc_ops += 1
        if isinstance(decoded, m.DlDataQue):
            self._queue_downlink(decoded)
        elif isinstance(decoded, m.DlDataRev):
            self._revoke_downlink(decoded.epEui, decoded.queId)
        if command == "status":
            self._send(encode_frame(m.encode(self._status(op))))
        else:
            if command == "detPrp":
                counters.det_prp += 1
            self._send(_simple_answers[command](op))

    def _queue_downlink(self, dl: m.DlDataQue) -> None:
        queued = self._downlinks.setdefault(dl.epEui, [])
        # A queId queued again replaces the earlier one.
        queued[:] = [q for q in queued if q.queId != dl.queId]
        queued.append(dl)
        self._host.counters.dl_queued += 1

    def _revoke_downlink(self, ep: int, que_id: int) -> None:
        """Drop a queued downlink; one already sent (or unknown) is answered all the same."""
        queued = self._downlinks.get(ep)
        if not queued:
            return
        kept = [q for q in queued if q.queId != que_id]
        if len(kept) == len(queued):
            return
        self._host.counters.dl_revoked += 1
        if kept:
            self._downlinks[ep] = kept
        else:
            del self._downlinks[ep]

    def _status(self, op: int) -> m.StatusRsp:
        return m.StatusRsp(
            opId=op,
            code=0,
            message="ok",
            time=time.time_ns(),
            dutyCycle=0.01,
            uptime=float(int(self._clock())),
            temp=41.5,
            cpuLoad=0.1,
            memLoad=0.2,
        )

    def _answer_error(self, op: int, code: int, message: str, *, anomaly: bool = True) -> None:
        self._host.counters.errors_sent += 1
        self._sc_errors.add(op)
        if anomaly:
            self._anomaly(f"answered error {code}: {message[:80]}")
        self._send(encode_frame({"command": "error", "opId": op, "code": code, "message": message}))

    def _error_for_ours(self, wire: dict[str, Any], op: int) -> None:
        """The SC answered one of our operations with error: acknowledge it, free its slot."""
        counters = self._host.counters
        counters.errors_received += 1
        entry = self._inflight.pop(op, None)
        results = None
        if entry is not None:
            counters.ul_errors += 1
            self._host.outstanding -= 1
            # A downlink sent with this uplink went out over the air all the same: report it.
            results = self._dl_after.pop(op, None)
        elif self._dl_results.pop(op, None) is not None:
            counters.dl_errors += 1
        elif op == self._ping_op:
            self._ping_op = None
        else:
            self._anomaly("error for no operation of ours in flight")
        self._send(_error_ack(op))
        if results:
            self._start_dl_results(results)
