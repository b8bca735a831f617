"""The MQTT bridge: every bus event goes to the broker through the durable outbox, commands come back to the families.

Also the hub's presence topic, the families' extra layouts (mqtt.layout) and the MQTT figures in /health and /metrics.
"""

from __future__ import annotations

import inspect
import json
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from bsscihub.bus import Event, PlainJSON
from bsscihub.config import ConfigError, MQTTConfig
from bsscihub.contract import masked_url, rfc3339
from bsscihub.errors import CommandError
from bsscihub.family import EventSpec, IMQTTLayout, IMQTTLayouts
from bsscihub.health import ComponentHealth
from bsscihub.lifecycle import AsyncStop
from bsscihub.mqtt.client import MQTTSettings, ReactorMQTTClient, Will
from bsscihub.mqtt.outbox import Outbox, check_topic

if TYPE_CHECKING:
    from bsscihub.hub import Hub

__all__ = [
    "CONTRACT_VERSION",
    "MQTTBridge",
    "MessageHandler",
    "decode_command",
    "install",
    "settings_from_config",
]

CONTRACT_VERSION = 1
"""The topic and payload contract documented in docs/mqtt.md; bumped only for incompatible changes."""

MessageHandler = Callable[[str, bytes, "Properties | None"], Any]
"""handler(topic, payload, properties) for device-side topics; may return a Deferred or a coroutine."""

MAX_COMMAND_PAYLOAD = 64 * 1024
"""Larger command payloads are answered with an error, not parsed."""


# allow_nan=False: NaN is not JSON, and subscribers' parsers choke on it
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def to_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, as every payload of the contract is."""
    return _ENCODER.encode(value).encode("utf-8")


def _plain_to_json(value: PlainJSON) -> bytes:
    """A PlainJSON payload (no NaN by its producer's promise) with orjson: ~1 µs instead of
    ~9 µs for an uplink with three receivers, on the reactor thread, once per uplink.
    Same bytes as to_json for such payloads (compact, UTF-8, key order kept), except that a
    few floats are spelled differently, the same number (0.00001 where json writes 1e-05)."""
    try:
        # Copied into an exactly sized bytes object: orjson shrinks its ~4 KB write buffer in
        # place, and each such result kept alive (the outbox holds up to memory_max payloads
        # while the broker lags) pinned ~4 KB of heap: 25,000 uplinks took 101 MB instead of
        # 16 MB. The copy costs ~0.2 µs.
        return memoryview(_orjson_dumps(value)).tobytes()
    except TypeError:
        # e.g. an int beyond 64 bits: let the standard encoder decide, as for any payload
        return to_json(value)


try:
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - orjson is a dependency; without it, all goes the standard way
    _plain_to_json = to_json  # type: ignore[assignment]  # noqa: F811


def settings_from_config(config: MQTTConfig, will: Will | None = None, **overrides: Any) -> MQTTSettings:
    """The client's settings for ``mqtt.*``; a mistake is a ConfigError naming the key."""
    values: dict[str, Any] = {
        "client_id": config.client_id,
        "protocol": 5 if config.protocol == "5" else 4,
        # the client insists on at least 5 s: less only floods the broker with pings
        "keepalive": max(5, config.keepalive),
        "will": will,
    }
    if config.username:
        values["username"] = config.username
    if config.password:
        values["password"] = config.password
    if urlsplit(config.url).scheme == "mqtts":
        for key, field in (("ca", "ca_file"), ("cert", "cert_file"), ("key", "key_file")):
            path = getattr(config, key)
            if not path:
                continue
            if not Path(path).is_file():
                raise ConfigError(f"mqtt.{key}", path, "cannot read the file")
            values[field] = path
    values.update(overrides)
    try:
        return MQTTSettings.from_url(config.url, **values)
    except ValueError as e:
        shown = masked_url(config.url)
        raise ConfigError("mqtt.url", shown, str(e).replace(config.url, shown)) from None


def hub_status(state: str, version: str, since: float | None, node: str | None = None) -> bytes:
    """The payload of ``{prefix}/hub/status`` (one hub), or of ``{prefix}/hub/{node}/status`` (with `node`)."""
    doc: dict[str, Any] = {"state": state, "version": version, "since": None if since is None else rfc3339(since)}
    if node is not None:
        doc["node"] = node
    return to_json(doc)


# The core's own contract, as a family declares its EventSpecs (the contract test checks them too).
STATUS_EVENTS = (
    EventSpec("status", "hub/status", True, '{"state", "version", "since"}'),
    EventSpec("status", "hub/{node}/status", True, '{"state", "version", "since", "node"}'),
)


# -- commands -----------------------------------------------------------------------


def _not_a_json_number(name: str) -> Any:
    # Python's parser takes NaN and ±Infinity; nothing downstream could publish or store them.
    raise CommandError(f"payload holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise CommandError(f"payload holds {text[:40]}, beyond what a number can hold")
    return value


def decode_command(payload: bytes) -> dict[str, Any]:
    """A command's payload as a JSON object; CommandError saying what is wrong otherwise.

    An empty payload counts as ``{}`` (``mosquitto_pub -n`` sends one for ``cmd/status``).
    """
    if len(payload) > MAX_COMMAND_PAYLOAD:
        raise CommandError(f"payload larger than {MAX_COMMAND_PAYLOAD} bytes")
    if not payload.strip():
        return {}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8 JSON") from None
    try:
        body = json.loads(text, parse_constant=_not_a_json_number, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise CommandError(f"payload is not valid JSON: {e.msg} at position {e.pos}") from None
    except (ValueError, RecursionError):
        raise CommandError("payload is not valid JSON") from None
    if not isinstance(body, dict):
        raise CommandError(f"payload must be a JSON object, not {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


class MQTTBridge(AsyncStop):
    """The hub's MQTT side: bus -> outbox -> broker, and broker -> commands and device handlers.

    Families use `subscribe` and `publish` (device-side topics, absolute) and `topic` (to
    build a topic under the prefix); their contract events go through the bus, not here.
    """

    name = "mqtt"
    log = Logger()

    def __init__(
        self,
        hub: Hub,
        *,
        clock: IReactorTime | None = None,
        client_factory: Callable[..., Any] = ReactorMQTTClient,
        settings_overrides: Mapping[str, Any] | None = None,
        outbox_options: Mapping[str, Any] | None = None,
        stop_grace: float = 2.0,
    ) -> None:
        """
        @param settings_overrides: MQTTSettings fields beyond the config (tests: fast backoff).
        @param outbox_options: Outbox keyword arguments (window, memory_max, ...).
        @param stop_grace: on stop, how long to wait for messages in flight to be acknowledged.
        """
        self.hub = hub
        config: MQTTConfig = hub.config.mqtt
        self.prefix = config.prefix
        self._clock: IReactorTime = clock if clock is not None else hub.reactor
        overrides = dict(settings_overrides or {})
        cluster = hub.cluster
        self._status_topic = f"{self.prefix}/hub/status"
        self._node: str | None = None
        self._network_status_cleared = False
        if cluster.clustered:
            # Each hub of a cluster its own session (one client id would make the broker drop the other).
            overrides.setdefault("client_id", f"{config.client_id}-{cluster.node}")
            # A session the broker keeps for a dead hub takes its turn of the shared subscriptions
            # (Mosquitto queues them there until it is back, or drops them when it expires): none is kept.
            overrides.setdefault("session_expiry", 0)
            # One retained status per hub, its will on its own; {prefix}/hub/status is one hub's only.
            self._node = cluster.node
            self._status_topic = f"{self.prefix}/hub/{cluster.node}/status"
        # Commands and device ingest are consumed once in a cluster: one shared subscription group.
        self._share = "$share/bsscihub/" if cluster.clustered else ""
        self.settings = settings_from_config(
            config,
            Will(self._status_topic, hub_status("offline", hub.version, None, self._node), qos=1, retain=True),
            **overrides,
        )
        self.outbox = Outbox(
            Path(hub.config.data_dir) / "outbox.sqlite",
            hub.reactor,
            clock=self._clock,
            max_messages=config.outbox_max,
            overflow=config.outbox_overflow,
            **dict(outbox_options or {}),
        )
        self.client = client_factory(
            self.settings,
            hub.reactor,
            on_connect=self._connected,
            on_disconnect=self._disconnected,
            on_message=self._received,
        )
        self.layouts: dict[str, IMQTTLayout] = self._find_layouts(config.layout)
        """The layout named by mqtt.layout, by the family speaking it (none for "standard")."""
        self._command_filter = f"{self.prefix}/+/+/+/cmd/+"
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._command_locks: dict[str, defer.DeferredLock] = {}
        self._unsubscribe_bus: Callable[[], None] | None = None
        self._opening: defer.Deferred[None] | None = None
        self._outbox_error: str | None = None
        self._stop_grace = stop_grace
        self._connected_since: float | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=4)
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self._clock

        self.commands_handled = 0
        """Every command answered, successfully or not."""
        self.commands_rejected = 0
        """The commands answered with an error."""
        self.handler_errors = 0

        hub.health.register("mqtt", self.health, needed=False)  # the outbox covers outages
        hub.metrics.register(_Collector(self))

    def _find_layouts(self, name: str) -> dict[str, IMQTTLayout]:
        if name == "standard":
            return {}
        found: dict[str, IMQTTLayout] = {}
        for family_name, family in self.hub.families.items():
            if IMQTTLayouts.providedBy(family) and name in family.mqtt_layouts:
                layout = family.mqtt_layout(name, self.hub)
                if layout is not None:
                    verifyObject(IMQTTLayout, layout)
                    found[family_name] = layout
        if not found:
            raise ConfigError("mqtt.layout", name, "no enabled family speaks this layout")
        return found

    # -- the families' API --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    def topic(self, relative: str) -> str:
        """``{prefix}/{relative}``."""
        return f"{self.prefix}/{relative}"

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> defer.Deferred[ReasonCode]:
        """Call ``handler(topic, payload, properties)`` for every message matching ``topic_filter``.

        Subscribed now if connected and again after every reconnect (QoS 1). The Deferred
        fires with the broker's answer on the first SUBACK. A handler that raises, or whose
        Deferred or coroutine fails, is logged; the connection is not affected.
        """
        self._handlers.setdefault(topic_filter, []).append(handler)
        return self.client.subscribe(self._share + topic_filter, 1)  # type: ignore[no-any-return]

    def unsubscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Stop calling ``handler`` (the broker keeps sending what the filter matches; it is ignored)."""
        handlers = self._handlers.get(topic_filter, [])
        if handler in handlers:
            handlers.remove(handler)

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any] | list[Any],
        retain: bool = False,
        *,
        acked: bool = False,
    ) -> defer.Deferred[None]:
        """Publish to an absolute topic through the outbox, QoS 1, in order with everything else.

        Bytes go as they are, a str as UTF-8, anything else as JSON. The Deferred fires once
        the message is on disk (``acked=True``: once the broker acknowledged it).

        @raise ValueError: not a topic one can publish to, or not JSON-serialisable.
        """
        check_topic(topic)
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode("utf-8")
        else:
            data = to_json(payload)
        return self.outbox.append(topic, data, retain, acked=acked)

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe_bus = self.hub.bus.subscribe(self._onEvent)
        self.client.subscribe(self._share + self._command_filter, 1)
        for family, layout in self.layouts.items():
            for topic_filter, handler in layout.inbound().items():
                self.subscribe(topic_filter, handler).addErrback(self._layoutSubscribeFailed, topic_filter, family)
        self._sampler.start(5.0, now=True)
        self._opening = self.outbox.open()
        self._opening.addCallbacks(self._outboxOpened, self._outboxFailed)

    def _layoutSubscribeFailed(self, failure: Failure, topic_filter: str, family: str) -> None:
        self.log.failure("MQTT: subscribing to {filter} for the {family} layout failed", failure,
                         filter=topic_filter, family=family)

    def _outboxOpened(self, _: None) -> None:
        self._opening = None
        if self.running:
            self.client.start()

    def _outboxFailed(self, failure: Failure) -> None:
        self._opening = None
        self._outbox_error = failure.getErrorMessage()
        self.log.failure(
            "cannot open the MQTT outbox {path}; nothing is published until the hub is restarted",
            failure,
            path=str(self.outbox.path),
        )

    async def _stop(self) -> None:
        if self._unsubscribe_bus is not None:
            self._unsubscribe_bus()
            self._unsubscribe_bus = None
        if self._sampler.running:
            self._sampler.stop()
        if self._opening is not None:
            await self._opening
        self.outbox.pause()
        if self.client.connected:
            # what is on the wire may still be acknowledged: then it is not resent after a restart
            await self._bounded(self.outbox.when_idle(), self._stop_grace)
        if self.client.connected:
            offline = hub_status("offline", self.hub.version, self._clock.seconds(), self._node)
            await self._bounded(
                self.client.publish(self._status_topic, offline, 1, True), self.settings.connect_timeout
            )
        await self.client.stop()
        await self.outbox.close()
        self.log.info(
            "MQTT bridge stopped; {depth} messages stay in the outbox for the next start", depth=self.outbox.depth
        )

    async def _bounded(self, d: defer.Deferred[Any], seconds: float) -> None:
        d.addTimeout(seconds, self._clock)  # type: ignore[arg-type]
        try:
            await d
        except Exception as e:  # noqa: BLE001 - timing out or losing the connection here is fine
            self.log.debug("MQTT bridge: gave up waiting on stop: {error}", error=repr(e))

    # -- the connection -------------------------------------------------------------

    def _connected(self) -> None:
        self._connected_since = self._clock.seconds()
        online = hub_status("online", self.hub.version, self._connected_since, self._node)
        # first in line: the status goes out before the backlog (the will may have replaced it)
        self.client.publish(self._status_topic, online, 1, True).addErrback(self._statusLost)
        if self._node is not None and not self._network_status_cleared:
            # what a single hub left there would speak for the whole cluster, and go stale (once a start)
            d = self.client.publish(f"{self.prefix}/hub/status", b"", 1, True)
            d.addCallbacks(self._networkStatusCleared, self._statusLost)
        self.log.info(
            "MQTT bridge online as {prefix}; {depth} messages waiting in the outbox",
            prefix=self.prefix,
            depth=self.outbox.depth,
        )
        self.outbox.resume(self._send)

    def _networkStatusCleared(self, _: None) -> None:
        self._network_status_cleared = True

    def _statusLost(self, failure: Failure) -> None:
        # the next connect publishes it again
        self.log.debug("MQTT hub status not acknowledged: {error}", error=failure.getErrorMessage())

    def _disconnected(self, reason: str) -> None:
        self._connected_since = None
        self.outbox.pause()

    def _send(self, topic: str, payload: bytes, retain: bool, correlation: bytes | None) -> defer.Deferred[None]:
        properties = None
        if correlation is not None and self.settings.protocol == 5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        return self.client.publish(topic, payload, 1, retain, properties)  # type: ignore[no-any-return]

    # -- bus -> outbox ----------------------------------------------------------------

    def _onEvent(self, event: Event) -> defer.Deferred[None]:
        """The bus sink: the Deferred fires once the event is committed to the outbox."""
        try:
            if type(event.payload) is PlainJSON:
                payload = _plain_to_json(event.payload)
            else:
                payload = to_json(event.payload)
        except (TypeError, ValueError) as e:
            self.log.error(
                "event for {topic} cannot be published: its payload is not JSON: {error}",
                topic=event.topic,
                error=str(e),
            )
            return defer.fail(e)
        d = self.outbox.append(f"{self.prefix}/{event.topic}", payload, event.retain)
        layout = self.layouts.get(event.family) if self.layouts else None
        if layout is not None:
            try:
                mirrored = [(topic, to_json(doc), retain) for topic, doc, retain in layout.outbound(event)]
            except Exception:
                # the contract's message is on its way; a layout's bug must not cost it
                self.log.failure("the {family} layout {layout} failed on {topic}", family=event.family,
                                 layout=self.hub.config.mqtt.layout, topic=event.topic)
                return d
            for topic, data, retain in mirrored:
                # the overflow policy already counted and logged a drop; nothing more to say
                self.outbox.append(topic, data, retain).addErrback(lambda _: None)
        return d

    # -- broker -> hub ------------------------------------------------------------------

    def _received(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        if topic_matches_sub(self._command_filter, topic):
            # one at a time per target, in arrival order: an attach is done before the detach after it
            target = topic.rsplit("/cmd/", 1)[0]
            lock = self._command_locks.get(target)
            if lock is None:
                lock = self._command_locks[target] = defer.DeferredLock()
            d = lock.run(lambda: defer.Deferred.fromCoroutine(self._command(topic, payload, properties)))
            d.addErrback(lambda f: self.log.failure("MQTT command on {topic} was not answered", f, topic=topic))
            d.addBoth(self._commandDone, target, lock)
        for topic_filter, handlers in list(self._handlers.items()):
            if handlers and topic_matches_sub(topic_filter, topic):
                for handler in list(handlers):
                    self._callHandler(handler, topic, payload, properties)

    def _commandDone(self, _: Any, target: str, lock: defer.DeferredLock) -> None:
        if not lock.locked and not lock.waiting and self._command_locks.get(target) is lock:
            del self._command_locks[target]

    def _callHandler(self, handler: MessageHandler, topic: str, payload: bytes, properties: Properties | None) -> None:
        try:
            result = handler(topic, payload, properties)
            if inspect.iscoroutine(result):
                result = defer.Deferred.fromCoroutine(result)
            if isinstance(result, defer.Deferred):
                result.addErrback(self._handlerFailed, handler, topic)
        except Exception:
            self._handlerFailed(Failure(), handler, topic)

    def _handlerFailed(self, failure: Failure, handler: MessageHandler, topic: str) -> None:
        self.handler_errors += 1
        self.log.failure("MQTT handler {handler!r} failed on {topic}", failure, handler=handler, topic=topic)

    async def _command(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        family, kind, ident, _, name = topic[len(self.prefix) + 1 :].split("/")
        response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        result: Mapping[str, Any] | None = None
        error: str | None = None
        try:
            body = decode_command(payload)
            handler = self.hub.commands.get(family)
            if handler is None:
                known = ", ".join(sorted(self.hub.commands)) or "none"
                raise CommandError(f"unknown family {family!r} (known: {known})")
            outcome: Any = handler(kind, ident, name, body)
            result = await outcome if inspect.isawaitable(outcome) else outcome
            if result is not None and not isinstance(result, Mapping):
                raise TypeError(f"command handler returned {type(result).__name__}, not a mapping")
        except CommandError as e:
            error = str(e) or "command refused"
        except Exception:
            self.log.failure("MQTT command {command} on {topic} failed", command=name, topic=topic)
            error = "internal error"
        doc: dict[str, Any] = dict(result or {}) if error is None else {}
        doc.update({"command": name, "ok": error is None, "error": error})
        try:
            answer = to_json(doc)
        except (TypeError, ValueError):
            self.log.failure("MQTT command {command} on {topic}: its result is not JSON", command=name, topic=topic)
            doc = {"command": name, "ok": False, "error": "internal error"}
            answer = to_json(doc)
        self.commands_handled += 1
        if not doc["ok"]:
            self.commands_rejected += 1
            self.log.info(
                "MQTT command {command} for {family}/{kind}/{id} refused: {error}",
                command=name,
                family=family,
                kind=kind,
                id=ident,
                error=doc["error"],
            )
        # through the bus, like every other event: stored, streamed and published alike; labelled with the
        # family's name when the command came under its topic root (devices: dev/...), as its other events are
        named = next((n for n, f in self.hub.families.items() if getattr(f, "topic_root", None) == family), family)
        event = Event(named, "cmd_result", f"{family}/{kind}/{ident}/event/cmd_result", doc)
        self.hub.bus.publish(event).addErrback(lambda _: None)
        if response_topic is not None:
            try:
                check_topic(response_topic)
            except ValueError as e:
                self.log.info(
                    "MQTT command {command}: ignoring its response topic: {error}", command=name, error=str(e)
                )
                return
            self.outbox.append(
                response_topic, answer, False, bytes(correlation) if correlation is not None else None
            ).addErrback(lambda _: None)

    # -- health and metrics -------------------------------------------------------------

    def _sample(self) -> None:
        self._samples.append((self._clock.seconds(), self.outbox.acked))

    def publish_rate(self) -> float:
        """Messages acknowledged by the broker per second, over the last 15 to 20 seconds."""
        if not self._samples:
            return 0.0
        then, acked = self._samples[0]
        elapsed = self._clock.seconds() - then
        return (self.outbox.acked - acked) / elapsed if elapsed > 0 else 0.0

    def health(self) -> ComponentHealth:
        client, outbox = self.client, self.outbox
        age = outbox.oldest_age()
        detail = {
            "connected": bool(client.connected),
            "state": client.state,
            "broker": f"{self.settings.host}:{self.settings.port}",
            "backoff": client.current_backoff,
            "connects": client.connects,
            "connect_failures": client.failures,
            "outbox_depth": outbox.depth,
            "outbox_in_flight": outbox.inflight,
            "oldest_pending_age": None if age is None else round(age, 3),
            "publish_rate": round(self.publish_rate(), 3),
            "outbox_dropped": outbox.dropped,
            "refused": outbox.refused,
            "commands_handled": self.commands_handled,
            "commands_rejected": self.commands_rejected,
        }
        if self._outbox_error is not None:
            detail["error"] = f"outbox: {self._outbox_error}"
        return ComponentHealth(bool(client.connected) and self._outbox_error is None, detail)


def install(hub: Hub, parent: Any) -> MQTTBridge:
    """Make ``hub.mqtt`` (made by hub.assemble_hub) ``parent``'s first child (for tap.build_service).

    Call it before adding the families: the bridge then takes their events from the start (the
    outbox buffers them until its file is open) and stops last.
    """
    bridge = hub.mqtt
    if bridge is None:
        raise RuntimeError("this hub has no MQTT bridge: make it with assemble_hub")
    if hasattr(parent, "addService") and list(parent):
        raise RuntimeError("install the MQTT bridge before any other child service")
    bridge.setServiceParent(parent)
    return bridge


class _Collector:
    """The bridge's figures for Prometheus, read when scraped (nothing on the hot path)."""

    def __init__(self, bridge: MQTTBridge) -> None:
        self._bridge = bridge

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        bridge, client, outbox = self._bridge, self._bridge.client, self._bridge.outbox
        yield GaugeMetricFamily(
            "bsscihub_mqtt_connected", "1 while connected to the MQTT broker", value=int(bool(client.connected))
        )
        yield GaugeMetricFamily(
            "bsscihub_mqtt_backoff_seconds",
            "Delay before the next connect attempt (0 unless waiting)",
            value=client.current_backoff or 0.0,
        )
        yield CounterMetricFamily(
            "bsscihub_mqtt_connects", "Successful connections to the broker", value=client.connects
        )
        yield CounterMetricFamily("bsscihub_mqtt_connect_failures", "Failed connect attempts", value=client.failures)
        yield GaugeMetricFamily(
            "bsscihub_mqtt_outbox_depth", "Messages in the outbox, not yet acknowledged", value=outbox.depth
        )
        yield GaugeMetricFamily(
            "bsscihub_mqtt_outbox_in_flight", "Messages sent, awaiting the broker's PUBACK", value=outbox.inflight
        )
        yield GaugeMetricFamily(
            "bsscihub_mqtt_outbox_oldest_age_seconds",
            "Age of the oldest unacknowledged message",
            value=outbox.oldest_age() or 0.0,
        )
        yield CounterMetricFamily(
            "bsscihub_mqtt_outbox_appended", "Messages appended to the outbox", value=outbox.appended
        )
        yield CounterMetricFamily("bsscihub_mqtt_published", "Messages the broker acknowledged", value=outbox.acked)
        yield CounterMetricFamily(
            "bsscihub_mqtt_resent", "Messages sent again after a lost connection", value=outbox.resent
        )
        dropped = CounterMetricFamily(
            "bsscihub_mqtt_outbox_dropped", "Messages dropped by the outbox overflow policy", labels=["policy"]
        )
        dropped.add_metric([outbox.overflow], outbox.dropped)
        yield dropped
        yield CounterMetricFamily(
            "bsscihub_mqtt_refused", "Messages the broker refused (dropped)", value=outbox.refused
        )
        commands = CounterMetricFamily("bsscihub_mqtt_commands", "Commands answered, by result", labels=["result"])
        commands.add_metric(["ok"], bridge.commands_handled - bridge.commands_rejected)
        commands.add_metric(["rejected"], bridge.commands_rejected)
        yield commands
        yield CounterMetricFamily(
            "bsscihub_mqtt_handler_errors", "Device-topic handlers that failed", value=bridge.handler_errors
        )
