"""Real mosquitto brokers for the tests (a pytest plugin), and an independent paho
subscriber on its own thread to witness what actually reached the broker."""

# Register with ``pytest_plugins = ["tests.broker"]`` (or ``pytest -p tests.broker``).
# Fixtures: ``mosquitto`` (plain anonymous broker), ``mosquitto_factory(**options)``
# (see `Mosquitto`), ``subscriber_factory(broker, *topic_filters, **options)``; all
# stopped at teardown.

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from twisted.internet import threads
from twisted.internet.defer import Deferred

MOSQUITTO = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl")


def _find_dynsec_plugin() -> str | None:
    candidates = [
        *glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"),
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ]
    return next((c for c in candidates if os.path.exists(c)), None)


DYNSEC_PLUGIN = _find_dynsec_plugin()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (racy, but good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@attrs.frozen
class BrokerTLS:
    """PEM files for the broker's TLS listener."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False


def _pbkdf2(password: str, salt: bytes) -> str:
    return base64.b64encode(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)).decode()


@attrs.define(eq=False)
class Mosquitto:
    """One mosquitto process with its own config in ``directory``.

    ``stop()`` and ``start()`` again reuse the same ports, so tests can simulate
    broker outages. Persistence is off by default: a restart loses sessions and retained
    messages (the dynamic-security JSON, a file of its own, survives). With
    ``persistence=True`` the broker saves them in ``directory`` when stopped and loads them
    when started, like a production broker.
    """

    directory: Path
    #: password_file entries, username -> password
    users: Mapping[str, str] = attrs.field(factory=dict)
    tls: BrokerTLS | None = None
    #: enable the dynamic-security plugin with this (admin username, admin password)
    dynsec: tuple[str, str] | None = None
    #: default: anonymous clients allowed unless users or dynsec are configured
    allow_anonymous: bool | None = None
    #: appended verbatim to the generated config
    extra_config: str = ""
    #: keep sessions, their queued messages and retained messages over stop()/start()
    persistence: bool = False
    host: str = "127.0.0.1"
    port: int = attrs.field(factory=free_port)
    #: the TLS listener's port, chosen when ``tls`` is given
    tls_port: int | None = None
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.tls is not None and self.tls_port is None:
            self.tls_port = free_port(self.host)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def dynsec_path(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def subscriptions(self, client_id: str, topic_filter: str) -> int:
        """How many times ``client_id`` subscribed to ``topic_filter`` on this broker (all runs).

        The broker logs it once the subscription is in place, before the SUBACK: a message
        published after that reaches the client. Tests wait on this instead of a sleep.
        """
        line = re.compile(rf"^\d+: {re.escape(client_id)} \d {re.escape(topic_filter)}$", re.MULTILINE)
        return len(line.findall(self.log_text()))

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until its listeners accept connections (blocking)."""
        if self.running:
            return
        self._write_config()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        deadline = time.monotonic() + timeout
        for port in ports:
            while not self._accepts(port):
                if self._process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log_text()[-2000:]}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {port}:\n{self.log_text()[-2000:]}")
                time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not go."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything cleanly."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def ctrl(self, *args: str) -> str:
        """Run ``mosquitto_ctrl dynsec ARGS...`` against this broker as the dynsec admin."""
        if self.dynsec is None or MOSQUITTO_CTRL is None:
            raise RuntimeError("dynsec is not enabled or mosquitto_ctrl is missing")
        user, password = self.dynsec
        command = [
            MOSQUITTO_CTRL,
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-u",
            user,
            "-P",
            password,
        ]
        result = subprocess.run(
            [*command, "dynsec", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.2):
                return True
        except OSError:
            return False

    def _write_config(self) -> None:
        anonymous = self.allow_anonymous
        if anonymous is None:
            anonymous = not self.users and self.dynsec is None
        persistence = ["persistence false"]
        if self.persistence:
            persistence = ["persistence true", f"persistence_location {self.directory}/"]
        lines = [
            "per_listener_settings false",
            *persistence,
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # "CLIENT QOS FILTER" once a subscription is in place: see subscriptions()
            "log_type subscribe",
            "connection_messages true",
            # mosquitto started as root switches to this user; keep the one that owns the files
            f"user {_current_user()}",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            f"listener {self.port} {self.host}",
        ]
        if self.users:
            password_file = self.directory / "passwd"
            self._write_password_file(password_file)
            lines.append(f"password_file {password_file}")
        if self.dynsec is not None:
            if DYNSEC_PLUGIN is None:
                raise RuntimeError("mosquitto's dynamic-security plugin is not installed")
            if not self.dynsec_path.exists():
                self._init_dynsec()
            lines += [
                f"plugin {DYNSEC_PLUGIN}",
                f"plugin_opt_config_file {self.dynsec_path}",
            ]
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    def _write_password_file(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        for user, password in self.users.items():
            if MOSQUITTO_PASSWD is not None:
                create = [] if path.exists() else ["-c"]
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", *create, str(path), user, password],
                    check=True,
                    capture_output=True,
                    timeout=10,
                )
            else:
                # mosquitto 2's "$7$" format: PBKDF2-SHA512, 101 iterations
                salt = os.urandom(12)
                entry = f"{user}:$7$101${base64.b64encode(salt).decode()}${_pbkdf2(password, salt)}\n"
                with path.open("a") as f:
                    f.write(entry)

    def _init_dynsec(self) -> None:
        assert self.dynsec is not None
        user, password = self.dynsec
        if MOSQUITTO_CTRL is not None:
            subprocess.run(
                [
                    MOSQUITTO_CTRL,
                    "dynsec",
                    "init",
                    str(self.dynsec_path),
                    user,
                    password,
                ],
                check=True,
                capture_output=True,
                timeout=10,
            )
            return
        # what `mosquitto_ctrl dynsec init` writes: an admin allowed to drive the plugin
        salt = os.urandom(12)
        control = "$CONTROL/dynamic-security/#"
        acls = [
            ("publishClientSend", control),
            ("publishClientReceive", control),
            ("subscribePattern", control),
            ("publishClientReceive", "$SYS/#"),
            ("subscribePattern", "$SYS/#"),
            ("publishClientReceive", "#"),
            ("subscribePattern", "#"),
            ("unsubscribePattern", "#"),
        ]
        document = {
            "clients": [
                {
                    "username": user,
                    "textName": "Dynsec admin user",
                    "password": _pbkdf2(password, salt),
                    "salt": base64.b64encode(salt).decode(),
                    "iterations": 101,
                    "roles": [{"rolename": "admin"}],
                }
            ],
            "roles": [
                {
                    "rolename": "admin",
                    "acls": [{"acltype": t, "topic": topic, "allow": True} for t, topic in acls],
                }
            ],
            "defaultACLAccess": {
                "publishClientSend": False,
                "publishClientReceive": True,
                "subscribe": False,
                "unsubscribe": True,
            },
        }
        self.dynsec_path.write_text(json.dumps(document, indent=2))


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@attrs.frozen
class Received:
    """One message as the independent subscriber saw it."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Properties | None


class Subscriber:
    """An independent paho client on paho's own network thread (``loop_start``).

    It is the tests' witness of what reached the broker, so it deliberately shares
    nothing with the reactor-driven client under test. paho reconnects it after a
    broker outage. With ``persistent=True`` its session outlives the connection: a
    broker with persistence then delivers after a restart what it had acknowledged to a
    publisher but not yet handed over (a broker stopped mid-stream loses those otherwise).
    With MQTT 5 it subscribes with retain-as-published, so ``retain`` tells whether the
    publisher set the flag.

    `wait_for` blocks on a condition variable (woken by each message, no spinning):
    call it from a thread or once the reactor work is done. In a reactor test use
    ``await subscriber.when(...)``, which runs it via ``deferToThread`` and leaves the
    reactor free to do the work being awaited.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filters: Sequence[str] = ("#",),
        *,
        protocol: int = 5,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_filters = list(topic_filters)
        self._qos = qos
        self._protocol = protocol
        self._messages: list[Received] = []
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self._granted: list[ReasonCode] = []
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-subscriber-{os.getpid()}-{id(self):x}",
            protocol=version,
            clean_session=None if protocol == 5 else not persistent,
        )
        self._persistent = persistent
        # back soon after a broker outage: tests wait for what it then receives
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        if username is not None:
            self._client.username_pw_set(username, password)
        if ca_file is not None:
            self._client.tls_set_context(ssl.create_default_context(cafile=str(ca_file)))
        self._client.on_connect = self._connected
        self._client.on_subscribe = self._suback
        self._client.on_message = self._message

    def start(self, timeout: float = 15.0) -> None:
        """Connect and wait for the SUBACK (blocking; loopback makes it quick)."""
        if self._protocol == 5 and self._persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
            self._client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=properties)
        else:
            self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"subscriber got no SUBACK from {self.host}:{self.port}")
        refused = [str(code) for code in self._granted if code.is_failure]
        if refused:
            self.stop()
            raise RuntimeError(f"subscription refused: {refused}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of everything received so far."""
        with self._condition:
            return list(self._messages)

    def clear(self) -> None:
        with self._condition:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[Received], bool],
        timeout: float = 15.0,
        count: int = 1,
    ) -> list[Received]:
        """Block until ``count`` received messages satisfy ``predicate``; return them.

        Do not call this on the reactor thread while the reactor has work to do for
        it — use `when` there.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                matches = [m for m in self._messages if predicate(m)]
                if len(matches) >= count:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.topic, m.payload[:60]) for m in self._messages[-10:]]
                    raise TimeoutError(f"{len(matches)}/{count} matching messages; last seen {seen}")
                self._condition.wait(remaining)

    def when(
        self,
        predicate: Callable[[Received], bool],
        timeout: float = 15.0,
        count: int = 1,
    ) -> Deferred[list[Received]]:
        """`wait_for` on a reactor thread-pool thread, so the reactor keeps running."""
        return threads.deferToThread(self.wait_for, predicate, timeout, count)

    def _connected(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            return
        if self._protocol == 5:
            options = SubscribeOptions(qos=self._qos, retainAsPublished=True)
            client.subscribe([(f, options) for f in self.topic_filters])
        else:
            client.subscribe([(f, self._qos) for f in self.topic_filters])

    def _suback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        granted: list[ReasonCode],
        properties: Any,
    ) -> None:
        self._granted = list(granted)
        self._subscribed.set()

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(
            topic=message.topic,
            payload=bytes(message.payload),
            retain=bool(message.retain),
            qos=message.qos,
            properties=message.properties,
        )
        with self._condition:
            self._messages.append(received)
            self._condition.notify_all()


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with `Mosquitto`'s options; every one is stopped at teardown."""
    started: list[Mosquitto] = []

    def make(**options: Any) -> Mosquitto:
        broker = Mosquitto(directory=tmp_path_factory.mktemp("mosquitto"), **options)
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain anonymous broker, stopped at teardown."""
    return mosquitto_factory()


@pytest.fixture
def subscriber_factory() -> Iterator[Callable[..., Subscriber]]:
    """``make(broker, *topic_filters, **options)``: a started `Subscriber`, stopped at teardown."""
    started: list[Subscriber] = []

    def make(broker: Mosquitto, *topic_filters: str, **options: Any) -> Subscriber:
        subscriber = Subscriber(broker.host, broker.port, topic_filters or ("#",), **options)
        subscriber.start()
        started.append(subscriber)
        return subscriber

    yield make
    for subscriber in started:
        subscriber.stop()
