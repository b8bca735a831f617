"""Log output for the hub: human-readable text by default, JSON lines with `log.format: json`.

Both filter by `log.level`; everything logs through twisted.logger. Text fields are escaped so
that a peer cannot forge or garble log lines, secrets are scrubbed from every output (`scrub`,
`secret_field`), and `NoiseLimiter` bounds what noisy peers and devices log.
"""

from __future__ import annotations

import functools
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

from bsscihub import tokens
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


# --- secrets: one scrubber for every output (text, JSON, the admin pages' log ring) -----------

REDACTED = "***"
# Field names (lower case, without "_" and "-") that carry secrets whatever their values look like.
_SECRET_NAMES = frozenset({
    "password", "passwd", "secret", "token", "key", "authorization", "nwkey", "nwksnkey", "sessionkey", "psk",
    "apikey", "privatekey", "cookie", "ticket", "credentials",
})  # fmt: skip
_SECRET_ENDINGS = ("password", "passwd", "secret", "token", "key", "psk")

_LEXICAL = [
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S),
     "[private key]"),
    # Every secret the hub hands out (API tokens, gate and device keys): their public part only.
    (tokens.TOKEN_TEXT, r"\1_\2_***"),
    (tokens.UNPREFIXED_TEXT, r"\1_***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s,;'\"]+"), r"\1 ***"),
    # user:password@ in any URL (database, broker, Redis, webhooks).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@"), r"\1***@"),
    # "password=..", "nwKey": "..", token: .. and the like, in any case and quoting.
    (re.compile(r"(?i)\b(password|passwd|secret|token|api[_-]?key|nw_?key|nwksnkey|session_?key|psk|authorization)"
                r"([\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)([^\s,;&'\"]+)"), r"\1\2***"),
    (re.compile(r"(?i)([?&]ticket=)[^&\s]+"), r"\1***"),
]
# 128-bit keys (mioty network and session keys) written as hex; identifiers (uuid4().hex) look the
# same, so fields named like one (id, queId, delivery) keep theirs.
_HEX_KEY = (re.compile(r"\b[0-9a-fA-F]{32}\b"), "[32 hex digits]")
_SCRUB = [*_LEXICAL, _HEX_KEY]
# Words every rule above needs (in lower case): a line without any is left alone, which is most lines
# (substring tests on the lower-cased text cost about a tenth of one case-blind regex pass).
_TRIGGERS = ("key", "_", "bearer", "basic", "://", "passw", "secret", "token", "psk", "authorization", "ticket=")


@functools.lru_cache(maxsize=4096)
def secret_field(name: str) -> bool:
    """True for a field (or mapping key) whose value is a secret by its name: password, nwKey, api_key, ..."""
    folded = name.lower().replace("_", "").replace("-", "")
    return folded in _SECRET_NAMES or folded.endswith(_SECRET_ENDINGS)


@functools.lru_cache(maxsize=4096)
def _identifier_field(name: str) -> bool:
    folded = name.lower().replace("_", "")
    return folded.endswith("id") or folded == "delivery"


def scrub(text: str, rules: list[tuple[re.Pattern[str], str]] = _SCRUB) -> str:
    """`text` with what looks like a credential or key replaced: our tokens and keys, Bearer/Basic credentials,
    URL passwords, PEM private keys, `password=..` pairs, 32 hex digits (a mioty key)."""
    lower = text.lower()
    if not any(word in lower for word in _TRIGGERS):
        if rules is _LEXICAL or _HEX_KEY[0].search(text) is None:
            return text
        rules = [_HEX_KEY]
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _field_value(name: str, value: Any) -> Any:
    """A field as it may be written: masked by its name, scrubbed and escaped if text."""
    if secret_field(name):
        return REDACTED
    if isinstance(value, BaseException):
        value = str(value)  # an error's message may quote what failed to parse
    if isinstance(value, str):
        return escape(scrub(value, _LEXICAL if _identifier_field(name) else _SCRUB))
    return value  # other types keep their format specs ({lag:.2f}) working


def _escaped_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    # Masked before formatting, so "{nwKey}" in a message says *** too.
    return {k: v if k.startswith("log_") else _field_value(k, v) for k, v in event.items()}


def render(event: Mapping[str, Any]) -> str:
    """The event's message with its string fields escaped and secrets scrubbed; never raises."""
    message = formatEvent(_escaped_fields(event))
    # The fields are clean; this catches what objects' own str() said (reprs, URLs in a config).
    return scrub(_CONTROL_KEEP_LINES.sub(_escape_char, message), _LEXICAL)


def _traceback(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        text = failure.getTraceback()
    except Exception:  # noqa: BLE001 - a broken failure must not break logging
        text = f"(unable to format the traceback of {failure!r})"
    return scrub(_CONTROL_KEEP_LINES.sub(_escape_char, text.rstrip("\n")))


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


def _json_safe(value: Any, depth: int = 0, rules: list[tuple[re.Pattern[str], str]] = _SCRUB) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return scrub(value, rules)
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, bytes):
        return scrub(value.hex())
    if depth < 3 and isinstance(value, Mapping):
        return {str(k): REDACTED if secret_field(str(k)) else _json_safe(v, depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v, depth + 1) for v in value]
    try:
        return scrub(str(value))
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
            message = scrub(_escaped_fields(event).get("why") or "unhandled error")
    record: dict[str, Any] = {
        "time": rfc3339(when) if isinstance(when, int | float) else None,
        "level": _level_name(event),
        "logger": event.get("log_namespace"),
        "message": message if message is not None else render(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key.startswith("_") or key in skip:
            continue
        record[f"{key}_" if key in _RESERVED else key] = (
            REDACTED if secret_field(key) else _json_safe(value, 0, _LEXICAL if _identifier_field(key) else _SCRUB)
        )
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
_twistd_settings: tuple[str, str, str | None] = ("info", "text", None)


def use_for_twistd(level: str, fmt: str, logfile: str | None = None) -> str:
    """Remember the settings (and twistd's --logfile, if any); returns the dotted name to hand to
    twistd's `logger` option."""
    global _twistd_settings
    _twistd_settings = (level, fmt, logfile)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    level, fmt, logfile = _twistd_settings
    if logfile is None:
        return make_observer(level, fmt)
    from twisted.python.logfile import LogFile

    # As twistd's own --logfile: rotated at 1 MB; but in our format, escaped and scrubbed.
    return make_observer(level, fmt, LogFile.fromFullPath(logfile))  # type: ignore[arg-type]


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
