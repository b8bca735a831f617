"""Bad input from devices, handled once for every family: parse and validate helpers, a per-source
rate-limited log, and a counter of rejected messages by family and reason; a handler never raises."""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from bsscihub.logs import NoiseLimiter
from bsscihub.ratelimit import ILimiter, local_limiter

# The reasons a message is dropped; the metric's `reason` label takes only these.
NOT_JSON = "not_json"
OVERSIZED = "oversized"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
IMPLAUSIBLE = "implausible"
BAD_TOPIC = "bad_topic"
UNKNOWN_DEVICE = "unknown_device"
UNKNOWN_COMMAND = "unknown_command"
INTERNAL = "internal"
REGISTRATION_LIMIT = "registration_limit"
REASONS = (NOT_JSON, OVERSIZED, MISSING_FIELD, WRONG_TYPE, IMPLAUSIBLE, BAD_TOPIC, UNKNOWN_DEVICE,
           UNKNOWN_COMMAND, REGISTRATION_LIMIT, INTERNAL)

IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
"""Ids that are safe as one MQTT topic level and one URL path segment (no '/', '+', '#', spaces)."""

MessageHandler = Callable[[str, bytes, Any], Any]


class Rejected(Exception):
    """A message that is dropped: `reason` is one of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str, *, source: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.source = reason, detail, source


# -- parsing and validation (each raises Rejected)


def parse_json(payload: bytes, max_bytes: int) -> Any:
    """The decoded JSON document; the size is checked first so a huge body is never parsed."""
    if len(payload) > max_bytes:
        raise Rejected(OVERSIZED, f"{len(payload)} bytes, more than {max_bytes}")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise Rejected(NOT_JSON, f"not valid JSON: {str(e)[:80]}") from None


def json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    doc = parse_json(payload, max_bytes)
    if not isinstance(doc, dict):
        raise Rejected(WRONG_TYPE, f"expected a JSON object, got {type_name(doc)}")
    return doc


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def require(doc: Mapping[str, Any], name: str) -> Any:
    if name not in doc or doc[name] is None:
        raise Rejected(MISSING_FIELD, f"missing field {name!r}")
    return doc[name]


def text(doc: Mapping[str, Any], name: str, *, max_length: int = 64, required: bool = True) -> str | None:
    if not required and doc.get(name) is None:
        return None
    value = require(doc, name)
    if not isinstance(value, str):
        raise Rejected(WRONG_TYPE, f"{name}: expected a string, got {type_name(value)}")
    if not value or len(value) > max_length:
        raise Rejected(IMPLAUSIBLE, f"{name}: expected 1 to {max_length} characters")
    return value


def identifier(doc: Mapping[str, Any], name: str) -> str:
    value = require(doc, name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)  # numeric ids (common on small devices) become their decimal text
    return check_identifier(value, name)


def check_identifier(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise Rejected(WRONG_TYPE, f"{name}: expected a string, got {type_name(value)}")
    if not IDENTIFIER.match(value):
        raise Rejected(IMPLAUSIBLE, f"{name}: {value[:70]!r} is not 1-64 letters, digits, '_', '.', ':', '-'")
    return value


def number(
    doc: Mapping[str, Any], name: str, low: float, high: float, *, required: bool = True, integer: bool = False
) -> float | None:
    """A finite number within [low, high] (booleans are not numbers here)."""
    if not required and doc.get(name) is None:
        return None
    value = require(doc, name)
    return check_number(value, name, low, high, integer=integer)


def check_number(value: Any, name: str, low: float, high: float, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(WRONG_TYPE, f"{name}: expected a number, got {type_name(value)}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise Rejected(WRONG_TYPE, f"{name}: expected a whole number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise Rejected(IMPLAUSIBLE, f"{name}: {value!r} is outside {low:g}..{high:g}")
    return float(value)


def device_time(doc: Mapping[str, Any], name: str, now: float, *, max_skew: float = 86400.0) -> float:
    """A device-given Unix time (seconds, or milliseconds when it is that large), else now."""
    value = doc.get(name)
    if value is None:
        return now
    seconds = check_number(value, name, 0, 1e14)
    if seconds > 1e11:
        seconds /= 1000.0
    if not 946684800.0 <= seconds <= now + max_skew:  # 2000-01-01 .. a day ahead of the hub's clock
        raise Rejected(IMPLAUSIBLE, f"{name}: {value!r} is not a plausible time")
    return seconds


# -- counting and logging


def errback(log: Logger, format: str, **fields: Any) -> Callable[[Failure], None]:
    """An errback that logs the failure with `format` and consumes it."""

    def logged(failure: Failure) -> None:
        log.failure(format, failure, **fields)

    return logged


_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Counter]] = weakref.WeakKeyDictionary()


def counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    """(accepted, rejected) for a hub's registry, created once per registry (families share them)."""
    found = _COUNTERS.get(registry)
    if found is None:
        found = (
            Counter("bsscihub_ingest_accepted", "Device messages accepted, by family", ["family"], registry=registry),
            Counter("bsscihub_ingest_rejected", "Device messages dropped as bad input, by family and reason",
                    ["family", "reason"], registry=registry),
        )
        _COUNTERS[registry] = found
    return found


class Ingest:
    """A family's front door for device messages: counts what it accepts and rejects, never raises."""

    log = Logger()

    def __init__(self, family: str, registry: CollectorRegistry, clock: IReactorTime, *, interval: float = 60.0
                 ) -> None:
        self.family = family
        accepted, rejected = counters(registry)
        self._accepted = accepted.labels(family)
        self._rejected = {reason: rejected.labels(family, reason) for reason in REASONS}
        # One line per source per interval, then one summary of what it kept sending (bsscihub.logs).
        self.reject_log = NoiseLimiter(clock, burst=1, interval=interval)

    def accepted(self, count: int = 1) -> None:
        self._accepted.inc(count)

    def rejected(self, error: Rejected, topic: str) -> None:
        self._rejected[error.reason].inc()
        source = error.source or topic
        self.reject_log.emit(
            self.log, LogLevel.warn, f"{self.family}: messages dropped from {source}", None,
            "{family}: dropped a message from {source} on {topic}: {reason} ({detail})",
            family=self.family, source=source, topic=topic, reason=error.reason, detail=error.detail)

    def failed(self, failure: Failure, topic: str) -> None:
        """A bug, not bad input: counted as `internal` and logged with its traceback (rate-limited too)."""
        if isinstance(failure.value, Rejected):
            self.rejected(failure.value, topic)
            return
        self._rejected[INTERNAL].inc()
        if self.reject_log.allow("internal:" + topic):
            self.log.failure("{family}: handling a message on {topic} failed", failure, family=self.family,
                             topic=topic)

    def guard(self, handler: MessageHandler, active: Callable[[], bool] = lambda: True) -> MessageHandler:
        """`handler(topic, payload, properties)` made safe: Rejected and any bug are counted, logged, dropped.

        The handler may be async (a coroutine or a Deferred): its failure is handled the same way.
        """

        def guarded(topic: str, payload: bytes, properties: Any = None) -> None:
            if not active():
                return
            try:
                result = handler(topic, payload, properties)
                if hasattr(result, "__await__") and not isinstance(result, defer.Deferred):
                    result = defer.Deferred.fromCoroutine(result)
            except Rejected as e:
                self.rejected(e, topic)
                return
            except Exception:
                self.failed(Failure(), topic)
                return
            if isinstance(result, defer.Deferred):
                result.addErrback(self.failed, topic)

        guarded.__name__ = getattr(handler, "__name__", "handler")
        return guarded


class RegistrationLimit:
    """Bounds what devices can make the hub create on their own: at most `cap` entries in all, and at most
    `per_minute` new ones per source (a gateway, an ingress topic), refilled continuously.

    A broker client that invents ids must not grow the registry (memory, storage, pages) without end;
    a refusal is an ordinary rejection (`registration_limit`), counted and logged once per source.

    The rate comes from `limiter` (`Cluster.limiter`, named `name`). Its answer decides at once when it
    is there at once (one hub); in a cluster it arrives from Redis after the check, so a hub lets a source
    register once more before it hears that the cluster's budget for it is spent, then refuses it until
    the budget refills.
    """

    def __init__(self, clock: IReactorTime, cap: int, per_minute: int, *, max_sources: int = 10_000,
                 limiter: Callable[..., ILimiter] = local_limiter, name: str = "registrations") -> None:
        self.clock, self.cap, self.per_minute, self.max_sources = clock, cap, per_minute, max_sources
        self._rate = (limiter(name, clock, rate=per_minute / 60.0, burst=per_minute, max_keys=max_sources)
                      if per_minute else None)
        self._refused: dict[str, float] = {}  # source -> until when the (shared) budget is spent

    def check(self, source: str, count: int, what: str) -> None:
        """Raise Rejected unless one more entry may be created now (`count`: how many exist)."""
        if self.cap and count >= self.cap:
            raise self.full(source, what)
        if self._rate is None:
            return
        until = self._refused.get(source)
        if until is not None:
            if self.clock.seconds() < until:
                raise self._too_many(what, source)
            del self._refused[source]
        answer: list[float | None] = []
        self._rate.take(source).addCallback(self._answered, source, answer)
        if answer and answer[0] is not None:
            raise self._too_many(what, source)

    def full(self, source: str, what: str) -> Rejected:
        """The refusal when the registry holds `cap` entries (in a cluster: counted over every hub)."""
        return Rejected(REGISTRATION_LIMIT, f"{what}: the registry is full ({self.cap}); raise the cap or"
                        " register by hand", source=source)

    def _answered(self, wait: float | None, source: str, answer: list[float | None]) -> None:
        answer.append(wait)
        if wait is not None:
            self._refused[source] = self.clock.seconds() + wait
            if len(self._refused) > self.max_sources:
                del self._refused[next(iter(self._refused))]

    def _too_many(self, what: str, source: str) -> Rejected:
        return Rejected(REGISTRATION_LIMIT, f"{what}: more than {self.per_minute} new a minute from this source",
                        source=source)
