"""docs/cluster.md, "Without containers", run as a user would: every shell block of the section, as
written and in order, on the test's own PostgreSQL database, Redis, Mosquitto and free ports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.broker import Mosquitto, Subscriber, free_port
from tests.cluster import HAPROXY, ready
from tests.conftest import _reset_pg_schema
from tests.helpers import clean_env, wait_until
from tests.redis_server import redis_url

__all__ = ["redis_url"]  # fixture

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cluster.md"
PIDS = ("haproxy.pid", "hub1.pid", "hub2.pid")


def section_blocks() -> list[str]:
    """The ```sh blocks of the section "Without containers", in order."""
    section = DOC.read_text().split("\n## Without containers\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def settings_names(block: str) -> list[str]:
    """The variables the settings block exports, in order."""
    return [name for line in block.splitlines() if line.startswith("export ")
            for name in re.findall(r"(\w+)=", line)]


class Docs:
    """Runs the section's blocks in the directory and environment its settings block describes."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.outputs: list[str] = []

    def run(self, block: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=self.home, env=self.env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"not done in {timeout:g} s: {block}\n{self.logs()}") from e
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{block}\n{done.stdout}{done.stderr}\n{self.logs()}"
        return done

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in self.home.glob("*.log"))

    def pids(self) -> dict[str, int]:
        return {name: int((self.home / name).read_text()) for name in PIDS if (self.home / name).exists()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of ours that exited stays until reaped; the hubs and HAProxy are not ours (bash started them).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def threads_of(pids: dict[str, int]) -> str:
    """What each thread of the processes waits in (name, state, kernel wait channel): says where a stop hangs."""
    lines = []
    for name, pid in pids.items():
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            try:
                comm = (task / "comm").read_text().strip()
                state = (task / "stat").read_text().split(") ", 1)[1][0]
                wchan = (task / "wchan").read_text().strip()
            except OSError:
                continue
            lines.append(f"{name} thread {task.name} {comm}: {state} {wchan}")
    return "\n".join(lines)


@pytest.fixture
def cluster_home(tmp_path: Path) -> Iterator[Path]:
    """The directory the docs run in (`cluster`, inside a checkout's layout); whatever the docs
    started is killed at the end, whatever happened."""
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    home = tmp_path / "cluster"
    home.mkdir()
    started: dict[str, int] = {}
    yield home
    for name in PIDS:
        if (home / name).exists():
            started[name] = int((home / name).read_text())
    for pid in started.values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_documented_two_hub_cluster_runs_without_containers(
    cluster_home: Path, postgres_url: str, redis_url: str, mosquitto: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
) -> None:
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (./dev test installs it; or: apt-get install haproxy)")
    settings, init, start, haproxy, sim, stop = section_blocks()
    _reset_pg_schema(postgres_url)
    # A password in the URL (trust authentication ignores it): it must show in no output.
    parts = urlsplit(postgres_url)
    secret = parts.password or "docs-pg-secret-7f3a"
    database = postgres_url.replace(f"{parts.username}@", f"{parts.username}:{secret}@", 1)
    ours = {
        "BSSCIHUB_DATABASE": database, "BSSCIHUB_CLUSTER_REDIS": redis_url,
        "BSSCIHUB_MQTT_URL": f"mqtt://127.0.0.1:{mosquitto.port}", "BSSCIHUB_KEYS_DIR": "keys",
        "FRONT_HOST": "127.0.0.1", "FRONT_BSSCI": str(free_port()), "FRONT_WEB": str(free_port()),
        "HUB1_HOST": "127.0.0.1", "HUB1_BSSCI": str(free_port()), "HUB1_WEB": str(free_port()),
        "HUB2_HOST": "127.0.0.1", "HUB2_BSSCI": str(free_port()), "HUB2_WEB": str(free_port()),
        "HAPROXY_MAXCONN": "1000",
    }  # fmt: skip
    assert settings.splitlines()[0] == "mkdir -p cluster && cd cluster"
    assert settings_names(settings) == list(ours), "the test sets what the settings block sets"
    bin_dir = Path(sys.executable).parent  # this venv's bsscihub and twistd
    # PYTHONFAULTHANDLER: a hub that does not stop is made to show where it waits (below)
    path = os.pathsep.join([str(bin_dir), "/usr/sbin", os.environ["PATH"]])
    docs = Docs(cluster_home, clean_env(**ours, PYTHONFAULTHANDLER="1", PATH=path))

    out = docs.run(init, timeout=120).stdout
    assert "user admin created; its password is in initial-admin-password" in out
    password = (cluster_home / "initial-admin-password").read_text().strip()
    assert password not in out

    docs.run(start, timeout=120)
    web = {"hub1": int(ours["HUB1_WEB"]), "hub2": int(ours["HUB2_WEB"])}
    assert all(ready(port) for port in web.values())
    assert set(docs.pids()) == {"hub1.pid", "hub2.pid"}
    # One set of key files for both hubs, none in either hub's own data directory.
    assert {p.name for p in (cluster_home / "keys").iterdir()} >= {"gate.key", "meter-keys.secret",
                                                                  "webhook-keys.secret"}
    assert not [p for node in ("hub1", "hub2") for p in (cluster_home / node).glob("*.secret")]
    assert not [p for node in ("hub1", "hub2") for p in (cluster_home / node).glob("gate.key")]

    witness = subscriber_factory(mosquitto, "bsscihub/mioty/ep/+/up")
    docs.run(haproxy, timeout=30)
    assert set(docs.pids()) == set(PIDS)
    wait_until(lambda: ready(int(ours["FRONT_WEB"])), "HAProxy serving the web (its first health checks)",
               timeout=10, interval=0.2)

    summary = docs.run(sim, timeout=120).stdout
    totals = re.search(r"totals: ([\d,]+) ulData completed, ([\d,]+) unique uplinks acknowledged", summary)
    assert totals is not None, summary
    acknowledged = int(totals.group(2).replace(",", ""))
    assert acknowledged >= 20, summary  # 20 a second for 5 s, on a loaded machine at least a fifth of it
    deadline = time.monotonic() + 15
    while len(witness.messages) < acknowledged and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # what would come twice
    published = [json.loads(m.payload) for m in witness.messages]
    counts = Counter((p["epEui"], p["packetCnt"]) for p in published)
    assert len(counts) == acknowledged, f"{acknowledged} acknowledged, {len(counts)} published"
    assert max(counts.values()) == 1, "each uplink once"
    stations = Counter(len(p["receivers"]) for p in published)
    assert stations[2] == len(published), f"receivers per uplink: {dict(stations)}"
    # HAProxy put one station on each hub.
    for node in ("hub1", "hub2"):
        log = (cluster_home / f"{node}.log").read_text()
        connected = re.findall(r"base station [0-9a-f]{16} \(bsscihub sim, BSSCI 1\.0\.0\) connected from", log)
        assert len(connected) == 1, log

    # The web: each hub, and HAProxy; a token made through HAProxy works on both hubs (one database).
    front = f"http://127.0.0.1:{ours['FRONT_WEB']}"
    with urllib.request.urlopen(f"{front}/login", timeout=5) as r:
        assert r.status == 200
    asked = urllib.request.Request(f"{front}/api/v1/auth/token", method="POST",
                                   headers={"Content-Type": "application/json"},
                                   data=json.dumps({"username": "admin", "password": password}).encode())
    with urllib.request.urlopen(asked, timeout=10) as r:
        token = json.load(r)["token"]
    for node, port in web.items():
        users = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/users",
                                       headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(users, timeout=5) as r:
            assert [u["name"] for u in json.load(r)["items"]] == ["admin"], node

    pids = docs.pids()
    docs.run(stop, timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids.values()):
        stuck = {n: p for n, p in pids.items() if alive(p)}
        if time.monotonic() > deadline:
            states = threads_of(stuck)
            for name, pid in stuck.items():
                if name != "haproxy.pid":
                    os.kill(pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: its stacks, unless exiting
            time.sleep(2)
            raise AssertionError(f"still running: {sorted(stuck)}\n{states}\n{docs.logs(tail=20000)}")
        time.sleep(0.1)
    logs = docs.logs()
    assert "Traceback" not in logs, logs
    assert "keys_dir is this hub's data_dir" not in logs
    for text in [*docs.outputs, logs]:
        assert secret not in text, "the database password is in an output"
