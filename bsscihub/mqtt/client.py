"""The hub's MQTT connection: paho-mqtt driven by the Twisted reactor (no paho thread),
with bounded connects, reconnects with backoff and jitter, and acked publishes."""

from __future__ import annotations

import enum
import random as _random
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorThreads,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

__all__ = [
    "ConnectionLost",
    "MQTTSettings",
    "NotConnected",
    "PublishRefused",
    "QueueFull",
    "ReactorMQTTClient",
    "State",
    "Will",
]

# The paho internals we rely on (see _PahoClient); fail at import, not mid-connect.
if not (hasattr(mqtt.Client, "_create_socket") and hasattr(mqtt.Client, "_sock_close")):
    raise ImportError("this paho-mqtt lacks Client._create_socket/_sock_close; bsscihub needs paho-mqtt 2.x")

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def _default_client_id() -> str:
    # stable across restarts of the same host, so the broker keeps our session
    return f"bsscihub-{socket.gethostname()}"


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class Will:
    """The message the broker publishes for us if we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = attrs.field(default=1, validator=attrs.validators.in_((0, 1, 2)))
    retain: bool = True


@attrs.frozen
class MQTTSettings:
    """Where and how to connect; see `MQTTSettings.from_url` for the ``mqtt.url`` form."""

    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=1883,
        validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)),
    )
    tls: bool = False
    #: CA bundle to verify the broker with; None means the system's trust store
    ca_file: str | None = None
    #: client certificate and key, for brokers that require one
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    client_id: str = attrs.field(factory=_default_client_id, validator=attrs.validators.min_len(1))
    #: 5 = MQTT 5, 4 = MQTT 3.1.1
    protocol: int = attrs.field(default=5, validator=attrs.validators.in_((4, 5)))
    keepalive: int = attrs.field(default=60, validator=attrs.validators.ge(5))
    #: bounds the TCP connect, the TLS handshake and the wait for CONNACK together
    connect_timeout: float = attrs.field(default=5.0, validator=_positive)
    will: Will | None = None
    backoff_min: float = attrs.field(default=0.5, validator=_positive)
    backoff_max: float = attrs.field(default=60.0, validator=_positive)
    #: MQTT 5 session expiry (s): how long the broker keeps our session while we are away;
    #: 0: no session is kept (MQTT 5 clean start, 3.1.1 clean session), nothing is queued for us
    session_expiry: int = attrs.field(default=3600, validator=attrs.validators.ge(0))
    #: QoS 1 messages on the wire awaiting their PUBACK (an MQTT 5 broker's Receive
    #: Maximum, 20 by default in mosquitto, may lower it)
    max_inflight: int = attrs.field(
        default=1000,
        validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(60000)),
    )
    #: messages waiting for a free in-flight slot, beyond which publish() raises QueueFull
    max_queued: int = attrs.field(default=100_000, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.backoff_min > self.backoff_max:
            raise ValueError(f"backoff_min {self.backoff_min} exceeds backoff_max {self.backoff_max}")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> MQTTSettings:
        """``mqtt://user:pw@host:port`` or ``mqtts://...`` (ports default to 1883/8883).

        Keyword arguments override what the URL says (e.g. ``mqtt.username``).
        """
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"MQTT URL {url!r}: scheme must be mqtt or mqtts")
        if not parts.hostname:
            raise ValueError(f"MQTT URL {url!r} has no host")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError as e:
            raise ValueError(f"MQTT URL {url!r}: {e}") from None
        values: dict[str, Any] = {
            "host": parts.hostname,
            "port": port,
            "tls": scheme == "mqtts",
        }
        if parts.username:
            values["username"] = urllib.parse.unquote(parts.username)
        if parts.password is not None:
            values["password"] = urllib.parse.unquote(parts.password)
        values.update(kw)
        return cls(**values)


class NotConnected(Exception):
    """publish() was called while there is no MQTT connection."""


class ConnectionLost(error.ConnectionLost):
    """The connection ended before the broker acknowledged this message.

    The broker may or may not have it: redeliver (the client does not).
    """


class PublishRefused(Exception):
    """The broker answered the publish with a failure reason code (MQTT 5)."""


class QueueFull(Exception):
    """``max_queued`` messages are already waiting for an in-flight slot."""


_Queued = tuple[str, bytes, int, bool, "Properties | None", "Deferred[None]"]


class State(enum.Enum):
    """Where `ReactorMQTTClient`'s reconnect state machine is."""

    STOPPED = "stopped"
    #: opening the socket (in a thread) or waiting for the CONNACK
    CONNECTING = "connecting"
    CONNECTED = "connected"
    #: between attempts, for the backoff delay
    WAITING = "waiting"
    #: stop() asked: DISCONNECT sent, waiting for the socket to close
    STOPPING = "stopping"


class _PahoClient(mqtt.Client):
    """paho's Client with the two things it has no public API for.

    - ``adopt``: paho's ``connect()`` makes a blocking TCP connect and TLS handshake;
      we do those in a thread instead and hand paho the connected socket, so
      ``connect()`` itself runs on the reactor thread without blocking.
    - ``abort``: close the socket now, without a DISCONNECT (timeouts, stop() that
      takes too long). paho calls ``on_socket_close`` but not ``on_disconnect``.
    """

    _adopted: SocketLike | None = None

    def adopt(self, sock: SocketLike) -> None:
        self._adopted = sock

    def _create_socket(self) -> SocketLike:
        sock, self._adopted = self._adopted, None
        if sock is None:
            raise RuntimeError("paho tried to open a socket itself")
        return sock

    def abort(self) -> None:
        self._sock_close()

    def want_write(self) -> bool:
        # loop_write() keeps the reactor's write interest while this is true
        sock = self._sock
        return super().want_write() or (isinstance(sock, _BatchedSocket) and sock.unsent())

    def _packet_write(self) -> MQTTErrorCode:
        rc = super()._packet_write()
        sock = self._sock
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, _BatchedSocket):
            try:
                sock.flush()
            except OSError as e:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", e)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return rc


_DISCONNECT = bytes([PacketTypes.DISCONNECT << 4])


class _BatchedSocket:
    """paho's socket with reads and writes batched.

    paho reads a packet a few bytes at a time (the fixed header byte by byte) and sends every
    packet with its own call: at thousands of QoS 1 PUBACKs a second those syscalls were a fifth
    of the reactor thread. Here one recv() fills a buffer that paho's small reads are served
    from, and sends collect until `flush()` (after each of paho's write rounds) sends them at once.
    """

    _READ_SIZE = 65536

    def __init__(self, sock: SocketLike) -> None:
        self.raw = self._sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()

    def recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = self._sock.recv(max(bufsize, self._READ_SIZE))  # BlockingIOError etc. go to paho
            if len(data) <= bufsize:
                return data
            self._rbuf, self._rpos = data, 0
        chunk = self._rbuf[self._rpos : self._rpos + bufsize]
        self._rpos += len(chunk)
        return chunk

    def pending(self) -> int:
        """Bytes received but not read yet: here, or decrypted and held by TLS."""
        inner = getattr(self._sock, "pending", None)
        return len(self._rbuf) - self._rpos + (inner() if inner is not None else 0)

    def send(self, data: bytes | bytearray) -> int:
        if data[:1] == _DISCONNECT:
            # Sent through: paho closes the socket once it counts a DISCONNECT as sent, and
            # stop() must go on waiting while the broker does not read.
            self.flush()
            if self._wbuf:
                raise BlockingIOError
            return self._sock.send(data)
        self._wbuf += data
        return len(data)

    def unsent(self) -> bool:
        return bool(self._wbuf)

    def flush(self) -> None:
        """Send what paho wrote; what the kernel does not take now waits for the next round."""
        while self._wbuf:
            try:
                sent = self._sock.send(self._wbuf)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            del self._wbuf[:sent]

    def close(self) -> None:
        try:
            self.flush()  # e.g. the DISCONNECT paho wrote just before closing
        except OSError:
            pass
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)


def _open_socket(host: str, port: int, timeout: float, context: ssl.SSLContext | None) -> socket.socket:
    """The blocking part of a connect, for a worker thread: TCP, then TLS if asked."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if context is None:
        return sock
    try:
        # the handshake runs under the socket's timeout; check_hostname is on in the context
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def _tls_context(settings: MQTTSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    # create_default_context already verifies; say so, since this is the whole point
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def _describe(exc: BaseException | None) -> str:
    """One line saying why a connect failed, for the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the MQTT broker's certificate was rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with the MQTT broker failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "connecting to the MQTT broker timed out"
    if isinstance(exc, OSError):
        return f"cannot connect to the MQTT broker: {exc.strerror or exc}"
    return f"cannot connect to the MQTT broker: {type(exc).__name__}: {exc}"


@implementer(IReadDescriptor, IWriteDescriptor)
class _PahoSocket:
    """paho's socket as the reactor sees it; reads and writes go through paho."""

    def __init__(self, owner: ReactorMQTTClient, sock: SocketLike) -> None:
        self._owner = owner
        self.sock = sock
        self._fd = sock.fileno()
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def doRead(self) -> None:
        self._owner._doRead(self)

    def doWrite(self) -> None:
        self._owner._doWrite(self)

    def connectionLost(self, reason: Failure) -> None:
        self._owner._descriptorLost(self, reason)

    def logPrefix(self) -> str:
        return "MQTT"


class ReactorMQTTClient:
    """An MQTT client on the reactor: connect, stay connected, publish with acks.

    paho keeps the MQTT protocol (packets, keepalive, in-flight bookkeeping); the
    reactor owns the socket. paho's external-loop callbacks (``on_socket_open``,
    ``on_socket_close``, ``on_socket_register_write``, ``on_socket_unregister_write``)
    add and remove one `_PahoSocket` descriptor, whose ``doRead``/``doWrite`` call
    ``loop_read``/``loop_write``; a `LoopingCall` runs ``loop_misc`` for pings.
    paho's other callbacks only queue events, handled once paho has returned, so the
    state machine and the caller's callbacks never run inside paho's locks.

    Transitions (``start``/``stop`` are the caller's; the rest are events)::

        STOPPED    --start-------------------> CONNECTING
        CONNECTING --CONNACK ok--------------> CONNECTED   (backoff reset)
        CONNECTING --fail/refused/timeout----> WAITING     (retry after backoff)
        CONNECTED  --connection lost---------> WAITING     (pending publishes fail)
        WAITING    --delay elapsed-----------> CONNECTING
        CONNECTING/CONNECTED --stop----------> STOPPING    (DISCONNECT sent)
        STOPPING   --socket closed/timeout---> STOPPED
        WAITING    --stop--------------------> STOPPED

    ``publish`` returns a Deferred that fires when the broker acknowledged the
    message (PUBACK for QoS 1; for QoS 0, when written to the socket). If the
    connection ends first it fails with `ConnectionLost`, and paho is told to forget
    the message: it is never resent behind the caller's back, since the caller (a
    durable outbox) owns redelivery. QoS 1 is at-least-once: a message that failed
    with `ConnectionLost` may still have reached the broker.
    """

    log = Logger()

    def __init__(
        self,
        settings: MQTTSettings,
        reactor: IReactorFDSet,
        *,
        on_connect: Callable[[], None],
        on_disconnect: Callable[[str], None],
        on_message: Callable[[str, bytes, Properties | None], None],
        random: Callable[[], float] = _random.random,
        open_socket: Callable[[], Deferred[SocketLike]] | None = None,
    ) -> None:
        """
        @param reactor: provides IReactorFDSet and IReactorTime (and IReactorThreads
            unless C{open_socket} is given).
        @param random: uniform in [0, 1), for the backoff jitter.
        @param open_socket: opens a connected (and, with TLS, handshaken) socket to
            the broker; by default L{_open_socket} in the reactor's thread pool.
        """
        self.settings = settings
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_message = on_message
        self._random = random
        self._open_socket = open_socket or self._open_in_thread
        self._tls_context = _tls_context(settings) if settings.tls else None

        self._state = State.STOPPED
        self._descriptor: _PahoSocket | None = None
        # bumped for every attempt: late thread results and events of an old socket are dropped
        self._generation = 0
        self._openings = 0
        self._failed_in_a_row = 0
        self._attempt_timer: IDelayedCall | None = None
        self._retry_timer: IDelayedCall | None = None
        self._stop_timer: IDelayedCall | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._was_connected = False
        self._events: deque[Callable[[], None]] = deque()
        self._draining = False
        # QoS 0 completes in write order; QoS 1 by packet id
        self._pending_writes: deque[tuple[int, Deferred[None]]] = deque()
        self._pending_acks: dict[int, Deferred[None]] = {}
        # messages waiting for an in-flight slot, in publish order
        self._queue: deque[_Queued] = deque()
        self._window = settings.max_inflight
        self._subscriptions: dict[str, int] = {}
        self._suback_filters: dict[int, list[str]] = {}
        self._suback_waiters: dict[str, list[Deferred[ReasonCode]]] = {}
        self._misc = LoopingCall(self._loopMisc)
        self._misc.clock = self._clock

        self.current_backoff: float | None = None
        self.published = 0
        self.acked = 0
        self.connects = 0
        self.failures = 0

        self._paho = self._makePaho()

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def connected(self) -> bool:
        return self._state is State.CONNECTED and self._descriptor is not None

    def start(self) -> None:
        """Connect, and keep reconnecting until `stop`."""
        if self._state is State.STOPPING:
            raise RuntimeError("stop() is still in progress; wait for its Deferred")
        if self._state is not State.STOPPED:
            return
        self._failed_in_a_row = 0
        self._connect()

    def stop(self) -> Deferred[None]:
        """Disconnect cleanly (so the broker does not publish the will) and stop retrying.

        Publish your own 'offline' status and wait for its ack before calling this.
        Fires once the socket is closed, every timer cancelled and every descriptor
        removed; pending publishes fail with `ConnectionLost`.
        """
        if self._state is State.STOPPED:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if self._state is State.STOPPING:
            return waiter
        self._was_connected = self._state is State.CONNECTED
        self._cancelTimers()
        self.current_backoff = None
        self._setState(State.STOPPING)
        if self._descriptor is not None:
            self._paho.disconnect()
        if self._descriptor is not None or self._openings:
            # the broker or a connect thread may not answer; don't wait longer than a connect
            self._stop_timer = self._clock.callLater(self.settings.connect_timeout, self._stopTimedOut)
        self._maybeStopped()
        return waiter

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> Deferred[None]:
        """Queue a message; the Deferred fires when the broker has it (see the class).

        QoS 2 is refused: its exactly-once needs the session state that this client
        deliberately drops on every disconnect (see the class).

        @raise NotConnected: not connected right now (nothing was queued).
        @raise QueueFull: ``max_queued`` messages already wait for an in-flight slot.
        """
        if qos not in (0, 1):
            raise ValueError(f"publish supports QoS 0 and 1, not {qos!r}")
        if self._state is not State.CONNECTED or self._descriptor is None:
            raise NotConnected(f"MQTT client is {self._state.value}")
        d: Deferred[None] = Deferred()
        # the queue keeps publish order, so once anything waits, everything waits
        if self._queue or (qos and len(self._pending_acks) >= self._window):
            if len(self._queue) >= self.settings.max_queued:
                raise QueueFull(f"{len(self._queue)} messages wait for an in-flight slot")
            self._queue.append((topic, payload, qos, retain, properties, d))
        else:
            self._send(topic, payload, qos, retain, properties, d)
        self.published += 1
        return d

    def subscribe(self, topic_filter: str, qos: int = 1) -> Deferred[ReasonCode]:
        """Subscribe now if connected, and again after every reconnect.

        The Deferred fires with the broker's answer for this filter (the granted QoS,
        or a failure reason code, which is also logged) on the first SUBACK that
        covers it; it stays pending while disconnected, and is dropped by `stop`.
        """
        self._subscriptions[topic_filter] = qos
        waiter: Deferred[ReasonCode] = Deferred()
        self._suback_waiters.setdefault(topic_filter, []).append(waiter)
        if self.connected:
            self._sendSubscribe([(topic_filter, qos)])
        return waiter

    # -- state machine --------------------------------------------------------

    def _setState(self, state: State) -> None:
        self.log.debug("MQTT client {old} -> {new}", old=self._state.value, new=state.value)
        self._state = state

    def _connect(self) -> None:
        """Enter CONNECTING, bounded by ``connect_timeout``.

        paho's ``connect()`` would block the reactor in the TCP connect and the TLS
        handshake, so those run in a pool thread (each under a socket timeout of
        ``connect_timeout``) and paho adopts the finished socket on the reactor
        thread. One timer of ``connect_timeout`` covers the thread and the CONNACK
        together; a socket that arrives after it is closed unused.
        """
        self._setState(State.CONNECTING)
        self._generation += 1
        generation = self._generation
        # one timer bounds the TCP connect, the TLS handshake and the CONNACK together
        self._attempt_timer = self._clock.callLater(self.settings.connect_timeout, self._attemptTimedOut, generation)
        self._openings += 1
        try:
            opening = self._open_socket()
        except Exception as e:  # noqa: BLE001 - any failure to start is a failed attempt
            opening = Deferred()
            opening.errback(e)
        opening.addCallbacks(
            self._socketOpened,
            self._socketNotOpened,
            callbackArgs=(generation,),
            errbackArgs=(generation,),
        )

    def _socketOpened(self, sock: SocketLike, generation: int) -> None:
        self._openings -= 1
        if generation != self._generation or self._state is not State.CONNECTING:
            # this attempt timed out or was stopped while the thread ran
            sock.close()
            self._maybeStopped()
            return
        s = self.settings
        sock = _BatchedSocket(sock)
        try:
            self._paho.adopt(sock)
            if s.protocol == 5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = s.session_expiry
                rc = self._paho.connect(
                    s.host,
                    s.port,
                    s.keepalive,
                    # without a session to keep, also drop one an earlier run may have left
                    clean_start=s.session_expiry == 0,
                    properties=properties,
                )
            else:
                rc = self._paho.connect(s.host, s.port, s.keepalive)
        except Exception as e:  # noqa: BLE001 - a failed attempt, retried, never a crash
            self.log.failure("paho could not start the MQTT session")
            self._closeSocket(sock)
            self._attemptFailed(f"cannot start the MQTT session: {e}")
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._closeSocket(sock)
            self._attemptFailed(f"cannot start the MQTT session: {mqtt.error_string(rc)}")

    def _socketNotOpened(self, reason: Failure, generation: int) -> None:
        self._openings -= 1
        if generation != self._generation or self._state is not State.CONNECTING:
            self._maybeStopped()
            return
        self._attemptFailed(_describe(reason.value))

    def _closeSocket(self, sock: SocketLike) -> None:
        if self._paho.socket() is sock:
            self._paho.abort()
        else:
            sock.close()

    def _attemptTimedOut(self, generation: int) -> None:
        self._attempt_timer = None
        if generation != self._generation or self._state is not State.CONNECTING:
            return
        timeout = self.settings.connect_timeout
        if self._descriptor is not None:
            self._paho.abort()
            self._attemptFailed(f"no CONNACK from the MQTT broker within {timeout:g} s")
        else:
            self._attemptFailed(f"connecting to the MQTT broker took longer than {timeout:g} s")

    def _attemptFailed(self, reason: str) -> None:
        """CONNECTING -> WAITING."""
        self.failures += 1
        self._cancelTimers()
        self._scheduleRetry(reason)

    def _scheduleRetry(self, reason: str) -> None:
        """-> WAITING, with full jitter: uniform in [0, min(max, min * 2^(n-1)))."""
        self._failed_in_a_row += 1
        attempt = self._failed_in_a_row
        s = self.settings
        ceiling = min(s.backoff_max, s.backoff_min * 2.0 ** min(attempt - 1, 64))
        delay = self._random() * ceiling
        self.current_backoff = delay
        self._setState(State.WAITING)
        self._retry_timer = self._clock.callLater(delay, self._retry)
        self.log.warn(
            "{reason}; retry {attempt} in {delay:.2f} s ({host}:{port})",
            reason=reason,
            attempt=attempt,
            delay=delay,
            host=s.host,
            port=s.port,
        )

    def _retry(self) -> None:
        """WAITING -> CONNECTING."""
        self._retry_timer = None
        self.current_backoff = None
        self._connect()

    def _onConnack(
        self,
        generation: int,
        reason: ReasonCode,
        session_present: bool,
        properties: Properties | None,
    ) -> None:
        if generation != self._generation or self._state is not State.CONNECTING:
            return
        if reason.is_failure:
            if self._descriptor is not None:
                self._paho.abort()
            self._attemptFailed(f"MQTT broker refused the connection: {reason}")
            return
        if self._attempt_timer is not None:
            self._attempt_timer.cancel()
            self._attempt_timer = None
        self._failed_in_a_row = 0
        self.connects += 1
        # MQTT 5: never have more unacknowledged messages out than the broker accepts
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self._window = min(self.settings.max_inflight, receive_maximum or 65535)
        self._setState(State.CONNECTED)
        s = self.settings
        self.log.info(
            "MQTT connected to {host}:{port} as {clientId} (session present: {sessionPresent}, in flight: {inflight})",
            host=s.host,
            port=s.port,
            clientId=s.client_id,
            sessionPresent=session_present,
            inflight=self._window,
        )
        if self._subscriptions:
            self._sendSubscribe(list(self._subscriptions.items()))
        self._callUser(self._on_connect)

    def _onDisconnect(self, generation: int, reason: str) -> None:
        """The socket closed: paho's on_disconnect, or we found it dead."""
        if generation != self._generation:
            return
        if self._descriptor is not None:
            self._paho.abort()
        if self._state is State.CONNECTING:
            self._attemptFailed(f"the MQTT broker closed the connection before CONNACK: {reason}")
        elif self._state is State.CONNECTED:
            self._scheduleRetry(f"MQTT connection lost: {reason}")
            self._failPending(reason)
            self._callUser(self._on_disconnect, reason)
        elif self._state is State.STOPPING:
            self._maybeStopped()

    def _stopTimedOut(self) -> None:
        self._stop_timer = None
        self._maybeStopped(force=True)

    def _maybeStopped(self, force: bool = False) -> None:
        """STOPPING -> STOPPED, once the socket is closed and no connect thread is left."""
        if self._state is not State.STOPPING:
            return
        if not force and (self._descriptor is not None or self._openings):
            return
        if self._descriptor is not None:
            self._paho.abort()
        self._cancelTimers()
        self._generation += 1
        self._setState(State.STOPPED)
        self._failPending("client stopped")
        self._suback_waiters.clear()
        if self._was_connected:
            self._was_connected = False
            self._callUser(self._on_disconnect, "client stopped")
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _cancelTimers(self) -> None:
        for name in ("_attempt_timer", "_retry_timer", "_stop_timer"):
            timer: IDelayedCall | None = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)

    def _failPending(self, reason: str) -> None:
        # paho would resend these itself after reconnecting; the caller redelivers instead
        self._paho.drop_out_messages()
        self._suback_filters.clear()
        writes, self._pending_writes = self._pending_writes, deque()
        acks, self._pending_acks = self._pending_acks, {}
        queued, self._queue = self._queue, deque()
        for d in [d for _, d in writes] + list(acks.values()) + [entry[-1] for entry in queued]:
            d.errback(ConnectionLost(reason))

    # -- publishing -------------------------------------------------------------

    def _send(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        d: Deferred[None],
    ) -> None:
        info = self._paho.publish(topic, payload, qos, retain, properties)
        if qos:
            # even without a socket (closed, not yet handled) paho keeps it; _failPending fails it
            self._pending_acks[info.mid] = d
        elif info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._pending_writes.append((info.mid, d))
        else:
            d.errback(ConnectionLost(mqtt.error_string(info.rc)))

    def _release(self) -> None:
        """Move queued messages into free in-flight slots."""
        queue = self._queue
        while queue and self._state is State.CONNECTED:
            if queue[0][2] and len(self._pending_acks) >= self._window:
                return
            self._send(*queue.popleft())

    # -- events from paho, handled after it returns -----------------------------

    def _onPublished(self, mid: int, reason: ReasonCode) -> None:
        writes = self._pending_writes
        if writes and writes[0][0] == mid:
            d = writes.popleft()[1]
        else:
            found = self._pending_acks.pop(mid, None)
            if found is None:
                return
            d = found
            if self._queue:
                self._release()
        if reason.is_failure:
            d.errback(PublishRefused(str(reason)))
        else:
            self.acked += 1
            d.callback(None)

    def _onMessage(self, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.log.warn("dropped an MQTT message whose topic is not UTF-8")
            return
        payload = message.payload
        self._callUser(
            self._on_message,
            topic,
            payload if type(payload) is bytes else bytes(payload),
            message.properties,
        )

    def _onSuback(self, mid: int, reasons: list[ReasonCode]) -> None:
        for topic_filter, reason in zip(self._suback_filters.pop(mid, []), reasons, strict=False):
            if reason.is_failure:
                self.log.warn(
                    "MQTT broker refused the subscription to {topicFilter}: {reason}",
                    topicFilter=topic_filter,
                    reason=str(reason),
                )
            for waiter in self._suback_waiters.pop(topic_filter, []):
                waiter.callback(reason)

    def _sendSubscribe(self, items: list[tuple[str, int]]) -> None:
        rc, mid = self._paho.subscribe(items)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._suback_filters[mid] = [topic_filter for topic_filter, _ in items]

    def _callUser(self, f: Callable[..., None], *args: Any) -> None:
        try:
            f(*args)
        except Exception:  # noqa: BLE001 - the caller's bug must not break the connection
            self.log.failure("MQTT client callback {callback!r} failed", callback=f)

    def _drain(self) -> None:
        if self._draining:
            return  # the outer loop picks up what this call queued
        self._draining = True
        events = self._events
        try:
            while events:
                event = events.popleft()
                try:
                    event()
                except Exception:  # noqa: BLE001 - logged; the connection is reset below
                    self.log.failure("MQTT client failed handling {event!r}", event=event)
                    # don't sit on a connection whose state we may have left half-updated
                    if self._descriptor is not None:
                        self._killConnection("internal error")
        finally:
            self._draining = False

    # -- paho and the reactor ---------------------------------------------------

    def _makePaho(self) -> _PahoClient:
        s = self.settings
        if s.protocol == 5:
            paho = _PahoClient(
                CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
                reconnect_on_failure=False,
            )
        else:
            paho = _PahoClient(
                CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                clean_session=s.session_expiry == 0,
                protocol=MQTTProtocolVersion.MQTTv311,
                reconnect_on_failure=False,
            )
        paho.connect_timeout = s.connect_timeout
        # we keep the in-flight window ourselves: paho's own limit costs a scan of every
        # message in flight per ack (half the throughput at 1000 in flight)
        paho.max_inflight_messages_set(0)
        paho.max_queued_messages_set(0)
        if s.username is not None:
            paho.username_pw_set(s.username, s.password)
        if s.will is not None:
            paho.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        paho.on_socket_open = self._pahoSocketOpen
        paho.on_socket_close = self._pahoSocketClose
        paho.on_socket_register_write = self._pahoRegisterWrite
        paho.on_socket_unregister_write = self._pahoUnregisterWrite
        paho.on_connect = self._pahoConnect
        paho.on_disconnect = self._pahoDisconnect
        paho.on_publish = self._pahoPublish
        paho.on_message = self._pahoMessage
        paho.on_subscribe = self._pahoSubscribe
        return paho

    def _open_in_thread(self) -> Deferred[SocketLike]:
        # paho's own connect() would block the reactor on TCP and TLS; a pool thread
        # does that part (each step bounded by connect_timeout), the reactor the rest
        s = self.settings
        return deferToThreadPool(
            IReactorFromThreads(self._reactor),
            IReactorThreads(self._reactor).getThreadPool(),
            _open_socket,
            s.host,
            s.port,
            s.connect_timeout,
            self._tls_context,
        )

    # paho's socket callbacks: act at once, they only touch the reactor
    def _pahoSocketOpen(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._descriptor = _PahoSocket(self, sock)
        self._reactor.addReader(self._descriptor)
        if not self._misc.running:
            self._misc.start(1.0, now=False)

    def _pahoSocketClose(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        descriptor = self._descriptor
        if descriptor is None or descriptor.sock is not sock:
            return
        self._reactor.removeReader(descriptor)
        self._reactor.removeWriter(descriptor)
        descriptor.closed = True
        self._descriptor = None
        if self._misc.running:
            self._misc.stop()

    def _pahoRegisterWrite(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        if self._descriptor is not None and self._descriptor.sock is sock:
            self._reactor.addWriter(self._descriptor)

    def _pahoUnregisterWrite(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        if self._descriptor is not None and self._descriptor.sock is sock:
            self._reactor.removeWriter(self._descriptor)

    # paho's protocol callbacks: only queue, _drain() handles them after paho returns
    def _pahoConnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._events.append(
            partial(
                self._onConnack,
                self._generation,
                reason,
                bool(flags.session_present),
                properties,
            )
        )

    def _pahoDisconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            description = f"the broker sent DISCONNECT: {reason}"
        elif str(reason) == "Unspecified error":
            description = "connection closed"
        else:
            description = str(reason)
        self._events.append(partial(self._onDisconnect, self._generation, description))

    def _pahoPublish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._events.append(partial(self._onPublished, mid, reason))

    def _pahoMessage(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._events.append(partial(self._onMessage, message))

    def _pahoSubscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._events.append(partial(self._onSuback, mid, reasons))

    # the descriptor's side
    def _doRead(self, descriptor: _PahoSocket) -> None:
        try:
            self._paho.loop_read()
            sock = descriptor.sock
            # buffered or TLS-decrypted bytes the reactor cannot see: read them now
            while self._descriptor is descriptor and sock.pending():  # type: ignore[attr-defined]
                self._paho.loop_read()
        except Exception:  # noqa: BLE001 - the reactor must not see it; reset the connection
            self.log.failure("MQTT read failed")
            self._killConnection("internal error while reading")
        self._drain()

    def _doWrite(self, descriptor: _PahoSocket) -> None:
        try:
            self._paho.loop_write()
        except Exception:  # noqa: BLE001 - the reactor must not see it; reset the connection
            self.log.failure("MQTT write failed")
            self._killConnection("internal error while writing")
        self._drain()

    def _descriptorLost(self, descriptor: _PahoSocket, reason: Failure) -> None:
        # the reactor dropped the descriptor (e.g. a hangup it saw before paho did)
        if descriptor.closed or descriptor is not self._descriptor:
            return
        self._killConnection(reason.getErrorMessage())
        self._drain()

    def _killConnection(self, reason: str) -> None:
        if self._descriptor is not None:
            self._paho.abort()
        self._events.append(partial(self._onDisconnect, self._generation, reason))

    def _loopMisc(self) -> None:
        try:
            self._paho.loop_misc()
        except Exception:  # noqa: BLE001 - a LoopingCall stops on errors; reset the connection
            self.log.failure("MQTT keepalive check failed")
            self._killConnection("internal error in keepalive")
        self._drain()
