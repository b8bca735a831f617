"""Log output: text for people, flat JSON lines for collectors, both filtered by level, with
peers' control characters escaped; NoiseLimiter bounds anonymous noise."""

from __future__ import annotations

import ast
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python import log as legacy

from bsscihub.logs import NoiseLimiter, make_observer, secret_field
from bsscihub.web.logring import LogRing
from tests.test_mioty_service import PKI, pki

__all__ = ["pki"]  # fixture

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


# --- secrets ------------------------------------------------------------------------------

NWKEY = "00112233445566778899aabbccddeeff"
TOKEN = "bsh_0123456789ab_s3cretPartOfTheToken-xyz"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n"


def outputs(emit_events: Callable[[Logger], None]) -> dict[str, str]:
    """What the text and JSON observers and the admin pages' ring wrote for the same events."""
    written: dict[str, str] = {}
    ring = LogRing()
    for fmt in ("text", "json"):
        out = io.StringIO()
        observer = make_observer("debug", fmt, out)
        emit_events(Logger(namespace="bsscihub.test", observer=lambda e, o=observer: (o(e), ring(e))))
        written[fmt] = out.getvalue()
    written["ring"] = json.dumps(ring.lines(level="debug", limit=1000))
    return written


def test_fields_named_like_secrets_are_masked_in_every_output() -> None:
    def emit_events(log: Logger) -> None:
        log.info("attach {epEui} with {nwKey} via {bsEui}", epEui="0011223344556677", nwKey=NWKEY,
                 bsEui="70b3d59cd0000001", sessionKey="a1" * 16, psk="correct-horse-battery",
                 password="hunter2hunter2", api_key="k-1234-secret-value", authorization="Basic dXNlcjpwdw==",
                 settings={"mqtt": {"url": "mqtt://broker", "password": "broker-pass-77"}, "token": "tok-99-x"})

    for name, text in outputs(emit_events).items():
        for secret in (NWKEY, "a1" * 16, "correct-horse-battery", "hunter2hunter2", "k-1234-secret-value",
                       "dXNlcjpwdw==", "broker-pass-77", "tok-99-x"):
            assert secret not in text, (name, secret, text)
        assert "attach 0011223344556677 with *** via 70b3d59cd0000001" in text, name
    record = json.loads(outputs(emit_events)["json"])
    assert record["nwKey"] == record["sessionKey"] == record["psk"] == record["password"] == "***"
    assert record["settings"] == {"mqtt": {"url": "mqtt://broker", "password": "***"}, "token": "***"}
    assert record["epEui"] == "0011223344556677", "nothing else is touched"


def test_values_that_look_like_secrets_are_scrubbed_whatever_their_field() -> None:
    delivery = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

    def emit_events(log: Logger) -> None:
        log.info("client sent {header}", header=f"Bearer {TOKEN}")
        log.info("connecting to {url} and {other}", url="postgresql://hub:pg-pass-42@db/hub",
                 other="redis://:redis-pass-43@redis:6379/0")
        log.warn("loaded {what}", what=PEM)
        log.warn("odd payload {payload}", payload={"endpoints": [{"eui": "x", "nwKey": NWKEY}]})
        log.info("frame {text}", text=f"nwKey={NWKEY.upper()} next")
        log.info("webhook delivery {delivery} of {id}", delivery=delivery, id=delivery)
        try:
            raise ValueError(f"cannot parse key {NWKEY} or token {TOKEN}")
        except ValueError as e:
            log.failure("import failed: {problem}", problem=e)

    written = outputs(emit_events)
    for name, text in written.items():
        for secret in (TOKEN[4:], "s3cretPartOfTheToken", "pg-pass-42", "redis-pass-43", "MIIEvQIBADANBgkqhkiG9w0",
                       NWKEY, NWKEY.upper()):
            assert secret not in text, (name, secret, text)
        # What stays: where it went, and identifiers that only look like keys.
        assert "postgresql://hub:***@db/hub" in text and "redis://:***@redis:6379/0" in text, name
        assert f"webhook delivery {delivery} of {delivery}" in text, name
    assert "[private key]" in written["text"] and "Traceback" in written["text"]
    failure = json.loads(written["json"].splitlines()[-1])
    assert failure["error"] == "ValueError: cannot parse key [32 hex digits] or token bsh_0123456789ab_***"
    assert NWKEY not in failure["traceback"] and "raise ValueError" in failure["traceback"]


def test_no_log_call_passes_a_field_named_like_a_secret() -> None:
    """Every twisted.logger call in the package: a field named password, key, nwKey, ... would be
    written as ***; the log says nothing useful then, so such a field is a mistake to fix at the call."""
    calls = 0
    offenders = []
    for path in sorted((Path(__file__).resolve().parents[1] / "bsscihub").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"debug", "info", "warn", "error", "critical", "failure", "emit"}):
                calls += 1
                offenders += [f"{path.name}:{node.lineno} {kw.arg}" for kw in node.keywords
                              if kw.arg and secret_field(kw.arg)]
    assert calls > 100, "the scan finds the package's log calls"
    assert offenders == []


@pytest_twisted.ensureDeferred
async def test_secrets_stay_out_of_the_log_when_a_sensor_is_attached(tmp_path: Path, pki: PKI) -> None:
    """The mioty attach path for real, logged at debug level: a station on mutual TLS, a sensor attached
    by command with its network key (attPrp to the station), then over the air (the session key in attRsp)."""
    from bsscihub.protocols.bssci.crypto import attach_signature, session_key
    from tests.test_mioty_service import EP, A, start

    nonce, sign = b"\x01\x02\x03\x04", attach_signature(bytes.fromhex(NWKEY), int(EP, 16), 7)
    sn_key = session_key(bytes.fromhex(NWKEY), int(EP, 16), nonce, sign).hex()

    outs = {"text": io.StringIO(), "json": io.StringIO()}
    observers = [make_observer("debug", fmt, out) for fmt, out in outs.items()]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    running = await start(tmp_path, pki)
    try:
        station = await running.station("bs-a", A)
        await running.service.command("ep", EP, "attach", {"nwKey": NWKEY.upper(), "shortAddr": "1a2b",
                                                           "bidi": True})
        assert bytes((await station.expect("attPrp"))["nwkSnKey"]).hex() == NWKEY
        station.send("att", epEui=int(EP, 16), rxTime=1, attachCnt=7, snr=1.0, rssi=-90.0, nonce=list(nonce),
                     sign=list(sign))
        assert bytes((await station.expect("attRsp"))["nwkSnKey"]).hex() == sn_key
    finally:
        await running.stop()
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    for name, out in outs.items():
        text = out.getvalue()
        assert f"end point {EP} attached over the air via {A}" in text, (name, text[-3000:])
        for secret in (NWKEY, sn_key, sn_key.upper()):
            assert secret not in text.lower(), (name, secret)


@pytest_twisted.ensureDeferred
async def test_secrets_stay_out_of_the_log_when_users_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The auth path for real over HTTP, logged at debug level: a failed log-in, a bearer token asked for and
    used, a ticket in a query and a token in a Referer."""
    import treq
    from twisted.internet import reactor

    from bsscihub.web.service import make_site
    from tests.test_web_support import PASSWORD, build_harness, fast_hashing

    fast_hashing(monkeypatch)
    harness = await build_harness(tmp_path)
    outs = {"text": io.StringIO(), "json": io.StringIO()}
    observers = [make_observer("debug", fmt, out) for fmt, out in outs.items()]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    port = reactor.listenTCP(0, make_site(harness.web), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}/api/v1"
    wrong = "wrong-horse-battery-staple-9"
    try:
        refused = await treq.post(f"{base}/auth/login", json={"username": "admin", "password": wrong})
        assert refused.code == 401
        await refused.content()
        answer = await treq.post(f"{base}/auth/token", json={"username": "admin", "password": PASSWORD})
        assert answer.code == 201
        token = (await answer.json())["token"]
        used = await treq.get(f"{base}/users?ticket=ticket-secret-31", headers={
            "Authorization": f"Bearer {token}", "Referer": f"http://hub.test/ui?token={token}"})
        assert used.code == 200
        await used.content()
    finally:
        await port.stopListening()
        harness.web.stop()
        await harness.hub.store.stop()
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    secret_part = token.rsplit("_", 1)[1]
    for name, out in outs.items():
        text = out.getvalue()
        lines = text.splitlines()
        assert sum('"POST /api/v1/auth/' in line for line in lines) == 2, (name, text)
        assert sum('"GET /api/v1/users' in line for line in lines) == 1, (name, text)
        for secret in (wrong, PASSWORD, secret_part, "ticket-secret-31"):
            assert secret not in text, (name, secret, text)


def test_twistd_logfile_gets_the_hubs_format_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd --logfile (and a daemon's twistd.log) is written by the hub's observer, not twistd's own."""
    from twisted.scripts.twistd import ServerOptions

    from bsscihub import logs

    config = str(Path(__file__).resolve().parents[1] / "etc" / "hub.yaml")
    for name in [k for k in os.environ if k.startswith("BSSCIHUB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(logs, "_twistd_settings", logs._twistd_settings)
    path = tmp_path / "hub.log"
    options = ServerOptions()
    options.parseOptions(["--nodaemon", f"--logfile={path}", "--pidfile=", "bsscihub", "--config", config])
    assert options["logger"] is logs.twistd_observer
    observer = logs.twistd_observer()
    Logger(namespace="bsscihub.test", observer=observer).info("connected to {url}", url="mqtt://hub:pw-5521@broker")
    written = path.read_text()
    assert "[bsscihub.test#info] connected to mqtt://hub:***@broker" in written and "pw-5521" not in written
    daemon = ServerOptions()
    daemon.parseOptions(["--pidfile=", "bsscihub", "--config", config])
    assert daemon["logger"] is logs.twistd_observer and logs._twistd_settings[2] == "twistd.log"
