"""Log output: text for people, flat JSON lines for collectors, both filtered by level, with
peers' control characters escaped; NoiseLimiter bounds anonymous noise."""

from __future__ import annotations

import io
import json
import re

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python import log as legacy

from bsscihub.logs import NoiseLimiter, make_observer

# What a hostile peer might put into a field that ends up in a log line: a forged line,
# a terminal escape, a NUL, a Unicode line separator.
HOSTILE = "bs-1\n2026-01-01T00:00:00+0000 [bsscihub#critical] forged\x1b[31m\x00\u2028"


def emit(level: str, fmt: str) -> str:
    out = io.StringIO()
    log = Logger(namespace="bsscihub.test", observer=make_observer(level, fmt, out))
    log.debug("hidden unless debug {n}", n=1)
    log.info("attached {epEui} to {bsEui}", epEui="0011223344556677", bsEui="70b3d59cd0000001")
    log.error("broken {what}", what="thing")
    return out.getvalue()


def test_text_lines_are_formatted_and_filtered() -> None:
    text = emit("info", "text")
    assert "attached 0011223344556677 to 70b3d59cd0000001" in text
    assert "[bsscihub.test#error] broken thing" in text
    assert "hidden" not in text
    assert "hidden unless debug 1" in emit("debug", "text")
    assert "attached" not in emit("error", "text")


def test_json_lines_are_flat_objects_without_record_separators() -> None:
    out = emit("info", "json")
    assert "\x1e" not in out
    lines = out.splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first == {
        "time": first["time"],
        "level": "info",
        "logger": "bsscihub.test",
        "message": "attached 0011223344556677 to 70b3d59cd0000001",
        "epEui": "0011223344556677",
        "bsEui": "70b3d59cd0000001",
    }
    assert json.loads(lines[1])["level"] == "error"


def test_json_fields_are_made_json_safe_and_failures_stay_on_one_line() -> None:
    out = io.StringIO()
    log = Logger(namespace="bsscihub.test", observer=make_observer("info", "json", out))
    log.info(
        "odd {payload!r} at {time} {nan}", payload=b"\x01\xff", time=12, nan=float("nan"), peer=object(),
        nested={"k": (1, b"\x02")},
    )
    try:
        raise ValueError(f"bad frame from {HOSTILE}")
    except ValueError:
        log.failure("handling {peer} failed", peer="10.0.0.5:4000")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "odd b'\\x01\\xff' at 12 nan"
    assert first["payload"] == "01ff"
    assert first["time_"] == 12, "a field named like a reserved key is kept under another name"
    assert first["nan"] == "nan"
    assert first["peer"].startswith("<object object")
    assert first["nested"] == {"k": [1, "02"]}
    assert second["level"] == "critical"
    assert second["error"].startswith("ValueError: bad frame from bs-1")
    assert "Traceback" in second["traceback"] and "raise ValueError" in second["traceback"]


def test_control_characters_from_peers_are_escaped_in_both_formats() -> None:
    for fmt in ("text", "json"):
        out = io.StringIO()
        log = Logger(namespace="bsscihub.tls", observer=make_observer("info", fmt, out))
        log.warn("TLS handshake with {peer} failed: {reason}", peer="10.0.0.5:1", reason=HOSTILE)
        written = out.getvalue()
        assert written.count("\n") == 1, "one event, one line"
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f\u2028]", written), (fmt, written)
        message = json.loads(written)["message"] if fmt == "json" else written
        assert "bs-1\\x0a2026-01-01T00:00:00+0000 [bsscihub#critical] forged\\x1b[31m\\x00\\u2028" in message


def test_noise_limiter_writes_a_burst_then_one_summary_per_interval() -> None:
    clock, events = Clock(), []
    log = Logger(namespace="bsscihub.test", observer=events.append)
    noise = NoiseLimiter(clock, burst=2, interval=60.0)
    for i in range(30):
        noise.emit(log, LogLevel.warn, "handshakes failed", f"10.0.0.{i % 8}", "failed {n}", n=i)
        clock.advance(1)
    noise.emit(log, LogLevel.warn, "connections refused", "10.0.0.99", "refused {n}", n=0)
    assert [e["n"] for e in events] == [0, 1, 0]
    clock.advance(30)  # the first kind's interval ends
    summary = events[-1]
    assert summary["log_level"] is LogLevel.warn
    assert summary["suppressed"] == 28
    assert summary["hosts"] == "10.0.0.2, 10.0.0.3, 10.0.0.4, 10.0.0.5, 10.0.0.6 and 3 other addresses"
    # A new interval starts with a new burst.
    assert noise.emit(log, LogLevel.warn, "handshakes failed", "10.0.0.1", "failed {n}", n=99)
    # Nothing suppressed of the second kind: no summary for it.
    clock.advance(120)
    assert [e.get("n") for e in events[-2:]] == [None, 99]


def test_noise_limiter_budgets_without_logging_and_forgets_the_oldest_key_saying_what_it_held() -> None:
    clock, events = Clock(), []
    log = Logger(namespace="bsscihub.test", observer=events.append)
    noise = NoiseLimiter(clock, burst=1, interval=60.0, max_keys=2)
    assert noise.allow("event:a") and not noise.allow("event:a")  # a budget only: no line, no summary
    assert noise.emit(log, LogLevel.warn, "from b", None, "line {n}", n=1)
    assert not noise.emit(log, LogLevel.warn, "from b", None, "line {n}", n=2)
    assert noise.emit(log, LogLevel.warn, "from c", None, "line {n}", n=3)  # "event:a" is forgotten
    assert noise.allow("event:a"), "forgotten: a new budget"
    # ... and "from b" with it, its summary written early rather than lost (no origin: the key says it).
    assert formatEvent(events[-1]) == "1 more like this (from b) in the last 60 s"
    assert [e.get("n") for e in events] == [1, 3, None]
    clock.advance(120)
    assert len(events) == 3, "the early summary's timer went with it"


def test_legacy_twisted_log_events_become_the_same_flat_objects() -> None:
    out = io.StringIO()
    observer = make_observer("info", "json", out)
    globalLogPublisher.addObserver(observer)
    try:
        legacy.msg("legacy", "words")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            legacy.err(None, "while dividing")
    finally:
        globalLogPublisher.removeObserver(observer)
    hello, error = (json.loads(line) for line in out.getvalue().splitlines())
    assert hello == {"time": hello["time"], "level": "info", "logger": "log_legacy", "message": "legacy words",
                     "system": "-"}
    assert error["level"] == "critical" and error["message"] == "while dividing"
    assert error["error"] == "ZeroDivisionError: division by zero"
    assert error["traceback"].startswith("Traceback") and "message_" not in error and "time_" not in error
