"""Start-up time and idle memory of the hub: spawn `twistd -n bsscihub`, time until /health answers.

Run: .venv/bin/python bench/startup.py [--runs 5]; prints median start-up seconds and idle RSS in MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from _common import free_port

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_run(home: Path) -> tuple[float, float]:
    web = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BSSCIHUB_")}
    env.update(
        BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1",
        BSSCIHUB_BSSCI_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
        BSSCIHUB_DATA_DIR=str(home / "data"),
    )
    started = time.perf_counter()
    hub = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "bsscihub",
            "--config",
            str(REPO / "etc" / "hub.yaml"),
        ],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web}/health", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # 503 (no broker) still means the hub is up and serving
            except OSError:
                if time.perf_counter() - started > 30:
                    raise RuntimeError("hub did not start") from None
                time.sleep(0.02)
        took = time.perf_counter() - started
        time.sleep(3)  # idle
        return took, rss_mib(hub.pid)
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bsscihub-startup-"))
    try:
        subprocess.run(
            [sys.executable, "-m", "bsscihub.cli", "init", "--config", str(REPO / "etc" / "hub.yaml")],
            cwd=home,
            env={**os.environ, "BSSCIHUB_DATA_DIR": str(home / "data")},
            check=True,
            capture_output=True,
        )
        results = [one_run(home) for _ in range(args.runs)]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    starts = [r[0] for r in results]
    rss = [r[1] for r in results]
    print(
        f"start-up to /health: median {statistics.median(starts):.2f} s (min {min(starts):.2f}, max {max(starts):.2f})"
    )
    print(f"idle RSS: median {statistics.median(rss):.1f} MiB (min {min(rss):.1f}, max {max(rss):.1f})")


if __name__ == "__main__":
    main()
