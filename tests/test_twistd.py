"""The hub under twistd, as a user runs it: plugin discovery, bad config, /health, SIGTERM, restart."""

from __future__ import annotations

import gc
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from bsscihub.tap import GC_THRESHOLDS, tune_gc
from tests.broker import free_port
from tests.helpers import CONFIG, TWISTD, clean_env, get_health, login_token, wait_until


def test_plugin_is_discoverable() -> None:
    names = [maker.tapname for maker in getPlugins(IServiceMaker)]
    assert "bsscihub" in names
    listed = subprocess.run([*TWISTD, "--help"], capture_output=True, text=True, timeout=60, cwd="/")
    assert "bsscihub" in listed.stdout


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000  # the modules, classes and config loaded so far
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_bad_value_stops_startup_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG],
        env=clean_env(BSSCIHUB_MIOTY_DEDUP_WINDOW="banana"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "config error: mioty.dedup_window = 'banana': expected a duration in seconds, e.g. 0.5, 500ms, 5m, 36h\n"
    )


def start_hub(home: Path, web: int, **extra: str) -> subprocess.Popen[str]:
    env = clean_env(
        BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1",
        BSSCIHUB_BSSCI_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
        BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",  # nothing listens there
        BSSCIHUB_DATA_DIR=str(home / "data"),
        **extra,
    )
    process = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def serving() -> bool:
        assert process.poll() is None, process.communicate()[0]
        try:
            get_health(web)
            return True
        except OSError:
            return False

    try:
        wait_until(serving, "the hub serving /health", timeout=30)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process


def stop_hub(process: subprocess.Popen[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    return process.returncode, output, time.monotonic() - started


def test_runs_serves_health_without_broker_stops_cleanly_and_restarts(home: Path) -> None:
    tmp_path = home
    web = free_port()

    hub = start_hub(tmp_path, web)
    wait_until(lambda: get_health(web, "/health/ready")[0] == 200, "/health/ready", timeout=30)
    # No broker: the hub is live and ready (the outbox keeps every message); /health says MQTT is down.
    assert get_health(web, "/health/live") == (200, {"status": "live"})
    assert get_health(web, "/health/ready") == (200, {"status": "ready"})
    code, doc = get_health(web)
    assert (code, doc["status"]) == (200, "degraded") and "components" not in doc  # details need a login
    token = login_token(web, home)
    code, doc = get_health(web, token=token)
    assert doc["components"]["storage"]["up"] is True
    assert doc["components"]["web"]["up"] is True
    assert doc["components"]["mqtt"]["up"] is False and doc["components"]["mqtt"]["needed"] is False
    returncode, output, took = stop_hub(hub)
    assert returncode == 0, output
    assert took < 10
    assert "bsscihub stopped" in output
    assert "garbage collector: " in output, "the started hub tunes the collector"
    assert "Traceback" not in output

    hub = start_hub(tmp_path, web)
    returncode, output, _ = stop_hub(hub)
    assert returncode == 0, output
    assert "applied migration" not in output, "a second start finds the schema as it was"
    with sqlite3.connect(tmp_path / "data" / "hub.sqlite") as db:
        assert db.execute("SELECT role FROM users WHERE name = 'admin'").fetchall() == [("admin",)]


def test_sigint_also_stops_cleanly(home: Path) -> None:
    hub = start_hub(home, free_port())
    hub.send_signal(signal.SIGINT)
    output, _ = hub.communicate(timeout=15)
    assert hub.returncode == 0, output
    assert "bsscihub stopped" in output


def test_json_log_format_writes_one_flat_object_per_line(home: Path) -> None:
    hub = start_hub(home, free_port(), BSSCIHUB_LOG_FORMAT="json")
    code, output, _ = stop_hub(hub)
    assert code == 0, output
    assert "\x1e" not in output
    records = [json.loads(line) for line in output.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(r["time"].endswith("Z") and not any(k.startswith("log_") for k in r) for r in records)
    [stopped] = [r for r in records if r["message"] == "bsscihub stopped"]
    assert stopped["level"] == "info" and stopped["logger"] == "bsscihub.hub.HubService"


def test_missing_certificates_fail_the_start_with_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG],
        env=clean_env(
            BSSCIHUB_WEB_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
            BSSCIHUB_BSSCI_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
            BSSCIHUB_MQTT_URL="mqtt://127.0.0.1:1",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "hub failed to start: cannot read the CA file certs/ca.pem" in result.stdout
    assert "Traceback" not in result.stdout
