"""What the tests share, once: waiting until a condition holds (letting the reactor run, or blocking a thread),
what is logged meanwhile, and the hub under twistd as a user runs it (`bsscihub init`, started until /health)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from bsscihub.pki import IssuedCert, issue_client_cert
from bsscihub.protocols.bssci.identity import STATION

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "etc" / "hub.yaml")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# -- waiting: the deadline is generous (a loaded machine), success returns at once


async def until(condition: Callable[[], Any], what: str = "condition", timeout: float = 15.0,
                interval: float | None = None) -> Any:
    """Let the reactor run until `condition()` (sync, or returning an awaitable) is truthy; return that value.

    A sync check is cheap and looked at every 5 ms; an awaitable one (a query, a request) every 30 ms.
    """
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        pause = 0.005 if interval is None else interval
        if hasattr(value, "__await__"):
            value = await value
            pause = 0.03 if interval is None else interval
        if value:
            return value
        if reactor.seconds() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last value {value!r})")
        await task.deferLater(reactor, pause, lambda: None)


def wait_until(condition: Callable[[], Any], what: str = "condition", timeout: float = 15.0,
               interval: float = 0.02) -> Any:
    """`until` for code off the reactor (a hub in another process): blocks this thread between checks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last value {value!r})")
        time.sleep(interval)


# -- what is logged


@contextmanager
def observing(*observers: Callable[[LogEvent], None]) -> Iterator[None]:
    """`observers` get every twisted.logger event while inside; removed however the block ends."""
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        yield
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)


@contextmanager
def log_events(keep: Callable[[LogEvent], Any] = lambda event: True) -> Iterator[list[LogEvent]]:
    """The events logged while inside that `keep` accepts (every one by default)."""
    events: list[LogEvent] = []
    with observing(lambda event: events.append(event) if keep(event) else None):
        yield events


@contextmanager
def log_lines(namespace: str) -> Iterator[list[str]]:
    """What the loggers under `namespace` log while inside, as text (formatted as it is logged)."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace", "").startswith(namespace):
            lines.append(str(formatEvent(event)))

    with observing(observe):
        yield lines


# -- a shared database


def cross_locks(cursor: Any, runs: list[int], both_hold_one: threading.Barrier, first: int, second: int) -> None:
    """In a transaction: add 1 to row `first` of `things` (id, n), then to row `second`. Two of them on two
    connections, (1, 2) and (2, 1), each hold one row on their first run and want the other's: PostgreSQL aborts
    one for a deadlock (the store runs it again, `runs` counts each run by its `first`)."""
    runs.append(first)
    cursor.execute("UPDATE things SET n = n + 1 WHERE id = ?", (first,))
    if runs.count(first) == 1:
        both_hold_one.wait()
    cursor.execute("UPDATE things SET n = n + 1 WHERE id = ?", (second,))


# -- the hub under twistd


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without BSSCIHUB_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BSSCIHUB_")}
    return {**env, **extra}


def init_home(directory: Path) -> Path:
    """`bsscihub init` in `directory` (certificates, schema, admin user); the admin's password in admin-password."""
    init = subprocess.run(
        [sys.executable, "-m", "bsscihub.cli", "init", "--config", CONFIG],
        cwd=directory,
        env=clean_env(BSSCIHUB_DATA_DIR=str(directory / "data")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    password = init.stdout.split("its password (shown only now): ", 1)[1].split()[0]
    (directory / "admin-password").write_text(password)
    return directory


def hub_cli(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`bsscihub ARGS` on the hub of `home` (its data directory, the mioty family), as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "bsscihub.cli", *args, "--config", CONFIG], cwd=home, input=stdin,
                          env=clean_env(BSSCIHUB_DATA_DIR=str(home / "data"), BSSCIHUB_FAMILIES="[mioty]"),
                          capture_output=True, text=True, timeout=60)


def station_cert(home: Path, name: str, eui: str) -> IssuedCert:
    """Base station `name`'s client certificate bound to `eui`, from the CA `bsscihub init` made in `home`."""
    certs = home / "certs"
    return issue_client_cert(certs / "ca.pem", certs / "ca.key", name, home / "bs", binding=STATION.bind(eui))


def get_health(port: int, path: str = "/health", token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def login_token(port: int, home: Path) -> str:
    body = json.dumps({"username": "admin", "password": (home / "admin-password").read_text()}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/auth/token", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return str(json.load(r)["token"])


def start_hub(home: Path, log: Path, web: int, bssci: int, broker: Any, *, timeout: float = 15.0,
              **env: str) -> subprocess.Popen[bytes]:
    """twistd -n bsscihub (mioty) with its output in `log`, returned once /health says every component is up
    (within `timeout` seconds)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG],
            env=clean_env(
                BSSCIHUB_DATA_DIR=str(home / "data"),
                BSSCIHUB_FAMILIES="[mioty]",
                BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1",
                BSSCIHUB_BSSCI_LISTEN=f"tcp:{bssci}:interface=127.0.0.1",
                BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}",
                BSSCIHUB_WEB_PUBLIC_HEALTH="true",  # /metrics and /health's detail without logging in
                **env,
            ),
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return get_health(web)[1]["status"] == "ok"  # ready, and the broker connected too
        except OSError:
            return False

    try:
        wait_until(healthy, "the hub serving /health with every component up", timeout=timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def kill(process: subprocess.Popen[Any]) -> None:
    """SIGKILL, as a crash: nothing is closed cleanly."""
    if process.poll() is None:
        process.kill()
        process.wait()
