"""Small process and port helpers shared by the benchmark scripts (run as `python bench/NAME.py`).

Not part of the hub: the scripts import it as a sibling module.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Any


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal a child and wait; SIGKILL if it does not go in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
