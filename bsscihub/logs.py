"""Log output for the hub: human-readable text by default, JSON lines with `log.format: json`.

Both filter by `log.level`; everything logs through twisted.logger. Text fields are escaped so
that a peer cannot forge or garble log lines, and `NoiseLimiter` bounds what noisy peers and devices log.
"""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import IO, Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from bsscihub.contract import rfc3339

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same, except newline and tab: for text we compose ourselves (tracebacks, our own formats).
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as a backslash escape (\\x00, \\n as \\x0a)."""
    return _CONTROL.sub(_escape_char, text)


def _escaped_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    # Only str values: other types keep their format specs ({lag:.2f}) working.
    return {k: escape(v) if isinstance(v, str) and not k.startswith("log_") else v for k, v in event.items()}


def render(event: Mapping[str, Any]) -> str:
    """The event's message with its string fields escaped; never raises."""
    message = formatEvent(_escaped_fields(event))
    return _CONTROL_KEEP_LINES.sub(_escape_char, message)


def _traceback(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        text = failure.getTraceback()
    except Exception:  # noqa: BLE001 - a broken failure must not break logging
        text = f"(unable to format the traceback of {failure!r})"
    return _CONTROL_KEEP_LINES.sub(_escape_char, text.rstrip("\n"))


def _level_name(event: Mapping[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if isinstance(level, type(LogLevel.info)) else "info"


@implementer(ILogObserver)
class TextObserver:
    """One line per event (`time [namespace#level] message`), plus the traceback of a failure."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        stamp = formatTime(event.get("log_time"))
        namespace = event.get("log_namespace", "-")
        text = f"{stamp} [{namespace}#{_level_name(event)}] {render(event)}\n"
        traceback = _traceback(event)
        if traceback is not None:
            text += traceback + "\n"
        self._out.write(text)
        self._out.flush()


_RESERVED = ("time", "level", "logger", "message")


def _json_safe(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, bytes):
        return value.hex()
    if depth < 3 and isinstance(value, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v, depth + 1) for v in value]
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - whatever it is, the line must still be written
        return repr(type(value))


def json_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The flat object written for one event: time, level, logger, message, then the event's fields."""
    when = event.get("log_time")
    failure = event.get("log_failure")
    skip: tuple[str, ...] = ()
    message = None
    if event.get("log_namespace") == "log_legacy":
        # twisted.python.log events: their time, message tuple and failure are said once, in our keys.
        skip = ("time", "message", "isError", "failure", "why")
        if failure is None and isinstance(event.get("failure"), Failure):
            failure = event["failure"]
        if failure is not None:
            message = _escaped_fields(event).get("why") or "unhandled error"
    record: dict[str, Any] = {
        "time": rfc3339(when) if isinstance(when, int | float) else None,
        "level": _level_name(event),
        "logger": event.get("log_namespace"),
        "message": message if message is not None else render(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key.startswith("_") or key in skip:
            continue
        record[f"{key}_" if key in _RESERVED else key] = _json_safe(value)
    if failure is not None:
        record["error"] = _json_safe(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        record["traceback"] = _traceback({"log_failure": failure})
    return record


@implementer(ILogObserver)
class JSONObserver:
    """One JSON object per line, no record separators: what log collectors (Loki, Fluent Bit,
    Vector, journald via stdout) expect."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        # ensure_ascii: control and non-ASCII characters arrive as \\u escapes, never raw.
        self._out.write(json.dumps(json_record(event), ensure_ascii=True, allow_nan=False) + "\n")
        self._out.flush()


def make_observer(level: str, fmt: str, out: IO[str] | None = None) -> ILogObserver:
    out = sys.stdout if out is None else out
    inner = JSONObserver(out) if fmt == "json" else TextObserver(out)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(_LEVELS[level])])


# twistd takes its log observer factory by dotted name, so the chosen settings wait here.
_twistd_settings = ("info", "text")


def use_for_twistd(level: str, fmt: str) -> str:
    """Remember the settings; returns the dotted name to hand to twistd's `logger` option."""
    global _twistd_settings
    _twistd_settings = (level, fmt)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    return make_observer(*_twistd_settings)


class NoiseLimiter:
    """The hub's one log limiter: at most `burst` lines per key per `interval`, then one summary line when
    the interval ends, "N more like this (KEY) [from ORIGINS]". Keys are kinds of anonymous noise (failed
    TLS handshakes: the origins name up to five addresses) or sources (a device sending bad input);
    a flood from many addresses costs a few lines a minute, and at most `max_keys` keys are kept."""

    MAX_ADDRESSES = 5

    def __init__(self, clock: IReactorTime, *, burst: int = 10, interval: float = 60.0,
                 max_keys: int = 10_000) -> None:
        self.clock, self.burst, self.interval, self.max_keys = clock, burst, interval, max_keys
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.lines = 0
        """Lines written within the bursts (summaries not counted)."""

    def allow(self, key: str) -> bool:
        """Spend one line of `key`'s budget: True if it may be written (the caller writes it, or does
        what the budget stands for); what is refused is counted, and summarized only after `emit`."""
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or (window.summary is None and now - window.start >= self.interval):
            window = self._windows[key] = _Window(now)
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._summarize(next(iter(self._windows)))  # early, not lost; its timer goes with it
        if window.lines < self.burst:
            window.lines += 1
            self.lines += 1
            return True
        window.suppressed += 1
        return False

    def emit(self, log: Logger, level: LogLevel, kind: str, host: str | None, format: str, **fields: Any) -> bool:
        """Log this event unless `kind` has had `burst` lines this interval; True if it was logged.
        `host` (the origin, if not the key itself) is named in the summary."""
        if self.allow(kind):
            log.emit(level, format, **fields)
            return True
        window = self._windows[kind]
        if host is not None:
            if len(window.hosts) < self.MAX_ADDRESSES:
                window.hosts.setdefault(host, None)
            elif host not in window.hosts and len(window.other_hosts) < 100_000:
                window.other_hosts.add(host)
        if window.summary is None:
            delay = max(0.0, window.start + self.interval - self.clock.seconds())
            window.summary = self.clock.callLater(delay, self._summarize, kind)
            window.log, window.level = log, level
        return False

    def _summarize(self, kind: str) -> None:
        window = self._windows.pop(kind, None)
        if window is None:
            return
        if window.summary is not None and window.summary.active():
            window.summary.cancel()
        if window.log is None or not window.suppressed:
            return
        hosts = ", ".join(window.hosts)
        if window.other_hosts:
            hosts += f" and {len(window.other_hosts)} other addresses"
        window.log.emit(
            window.level,
            "{count} more like this ({kind}){origin} in the last {interval:g} s",
            count=window.suppressed,
            kind=kind,
            hosts=hosts,
            origin=f" from {hosts}" if hosts else "",
            interval=self.interval,
            suppressed=window.suppressed,
        )

    def flush(self) -> None:
        """Write the pending summaries now (at stop)."""
        for kind, window in list(self._windows.items()):
            if window.summary is not None:
                self._summarize(kind)
        self._windows.clear()


@attrs.define
class _Window:
    """One key's current interval: lines written, events suppressed and where they came from."""

    start: float
    lines: int = 0
    suppressed: int = 0
    hosts: dict[str, None] = attrs.Factory(dict)
    other_hosts: set[str] = attrs.Factory(set)
    summary: IDelayedCall | None = None
    log: Logger | None = None
    level: LogLevel = LogLevel.info
