"""A paced MQTT publisher for the device simulators (`bsscihub sim devices`, `bsscihub sim ble`).

Runs in the command's own process (a plain paho client, no reactor): messages at a rate, a line a second, a summary.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from bsscihub.config import HubConfig
from bsscihub.errors import UserFacingError

Message = tuple[str, Any]
"""(topic, JSON-ready payload or bare number)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("broker")
    where.add_argument("--url", help="broker URL, mqtt:// or mqtts:// (default: mqtt.url; user and password"
                       " as in the URL or mqtt.username/mqtt.password)")
    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, default=1.0, help="messages per second, all together (default 1)")
    load.add_argument("--duration", type=float, default=0.0, metavar="S",
                      help="seconds to run (default 0: until Ctrl-C)")
    load.add_argument("--quiet", action="store_true", help="only the summary, no line per second")


def run(config: HubConfig, args: argparse.Namespace, what: str, messages: Iterator[Message]) -> int:
    """Publish `messages` (QoS 1) at `args.rate` for `args.duration`; exit status 0 when every one was acknowledged."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    if args.rate <= 0:
        raise UserFacingError("--rate must be above 0")
    url = args.url or config.mqtt.url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UserFacingError(f"--url {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bsscihub-sim-{uuid.uuid4().hex[:8]}")
    username = unquote(parts.username) if parts.username else config.mqtt.username
    password = unquote(parts.password) if parts.password else config.mqtt.password
    if username:
        client.username_pw_set(username, password or None)
    if parts.scheme == "mqtts":
        context = ssl.create_default_context(cafile=config.mqtt.ca or None)
        if config.mqtt.cert:
            context.load_cert_chain(config.mqtt.cert, config.mqtt.key or None)
        client.tls_set_context(context)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    try:
        client.connect(parts.hostname, port, keepalive=30)
    except OSError as e:
        raise UserFacingError(f"cannot reach the broker at {parts.hostname}:{port}: {e.strerror or e}") from None
    client.loop_start()
    try:
        if not connected.wait(10) or refused:
            raise UserFacingError(f"the broker at {parts.hostname}:{port} refused the connection:"
                                  f" {refused[0] if refused else 'no answer'}")
        return _publish(client, args, what, messages, lambda line: print(line, flush=True))
    finally:
        client.disconnect()
        client.loop_stop()


def _publish(client: Any, args: argparse.Namespace, what: str, messages: Iterator[Message],
             say: Callable[[str], None]) -> int:
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if threading.current_thread() is \
        threading.main_thread() else None
    started = time.monotonic()
    deadline = started + args.duration if args.duration > 0 else float("inf")
    interval = 1.0 / args.rate
    pending: list[Any] = []
    sent = acked = 0
    next_line = started + 1.0
    due = started
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            if now < due:
                stop.wait(min(due, deadline) - now)
                continue
            topic, payload = next(messages)
            data = json.dumps(payload, separators=(",", ":")).encode()
            pending.append(client.publish(topic, data, qos=1))
            sent += 1
            due += interval
            if now >= next_line:
                acked += _settle(pending)
                if not args.quiet:
                    say(f"{what}: {sent} sent, {acked} acknowledged by the broker")
                next_line += 1.0
        for info in pending:
            info.wait_for_publish(10)
        acked += _settle(pending)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    elapsed = time.monotonic() - started
    say(f"{what}: {sent} messages in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):.0f}/s), {acked} acknowledged"
        f"{'' if acked == sent else f', {sent - acked} not acknowledged'}")
    if acked != sent:
        print(f"bsscihub: {sent - acked} messages were not acknowledged by the broker", file=sys.stderr)
        return 1
    return 0


def _settle(pending: list[Any]) -> int:
    """Forget the acknowledged messages; how many there were. One look at each: acknowledgements
    arrive on paho's thread meanwhile."""
    waiting = []
    done = 0
    for info in pending:
        if info.is_published():
            done += 1
        else:
            waiting.append(info)
    pending[:] = waiting
    return done
