"""The web benchmark: REST list latency with 10,000 sensors, and 1,000 WebSocket clients on a stream of uplinks.

Runs a private hub (twistd), mosquitto and `bsscihub sim` in a temp dir; results go to bench/results/web-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import free_port, log, port_open, stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the hub under test ------------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {"web": free_port(), "bssci": free_port(), "mqtt": free_port()}
        certs = tmp / "certs"
        self.env = {
            **os.environ,
            "BSSCIHUB_DATA_DIR": str(tmp / "var"),
            "BSSCIHUB_FAMILIES": "mioty",
            "BSSCIHUB_WEB_LISTEN": f"tcp:{self.ports['web']}:interface=127.0.0.1:backlog=1024",
            "BSSCIHUB_BSSCI_LISTEN": f"tcp:{self.ports['bssci']}:interface=127.0.0.1",
            "BSSCIHUB_MQTT_URL": f"mqtt://127.0.0.1:{self.ports['mqtt']}",
            "BSSCIHUB_TLS_CA": str(certs / "ca.pem"),
            "BSSCIHUB_TLS_CA_KEY": str(certs / "ca.key"),
            "BSSCIHUB_TLS_CERT": str(certs / "hub.pem"),
            "BSSCIHUB_TLS_KEY": str(certs / "hub.key"),
            # One token makes every measured request and ticket: no per-client limit; /metrics without a login.
            "BSSCIHUB_WEB_RATE_LIMIT": "0",
            "BSSCIHUB_WEB_PUBLIC_HEALTH": "true",
        }
        self.processes: list[subprocess.Popen[Any]] = []
        self.hub: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.ports['web']}"

    def cli(self, *argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "bsscihub.cli", *argv], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"bsscihub {argv[0]} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start_mosquitto(self) -> None:
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(f"persistence false\nallow_anonymous true\nlistener {self.ports['mqtt']} 127.0.0.1\n"
                        "log_dest stderr\n")
        mosquitto = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin") or "mosquitto"
        process = subprocess.Popen([mosquitto, "-c", str(conf)], cwd=self.tmp, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_for(lambda: port_open(self.ports["mqtt"]), 10, "mosquitto")

    def start_hub(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        out = (self.tmp / "hub.log").open("ab")
        self.hub = subprocess.Popen([str(twistd), "-n", "--pidfile=", "bsscihub"], cwd=self.tmp, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(self.hub)
        wait_for(lambda: port_open(self.ports["web"]), 60, "hub web listener")

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["web"], timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return json.loads(data) if data and response.getheader("Content-Type", "").startswith("application/json") \
            else data

    def metric(self, name: str) -> float:
        text = self.request("GET", "/metrics").decode()
        match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def seed_audit(database: Path, rows: int) -> None:
    """Audit history, written straight into SQLite before the hub starts (the API would take minutes)."""
    now = time.time()
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO audit_log (time, actor, action, target, detail, source) VALUES (?, ?, ?, ?, ?, ?)",
            [(now - i, random.choice(["admin", "ops", "cli"]), random.choice(["user.add", "mioty.sensor.attach",
              "cert.issue"]), f"{i:016x}", "{}", "10.0.0.1") for i in range(rows)],
        )


# --- phase 1: list latency -----------------------------------------------------------


def measure(
    bench: Bench, token: str, name: str, paths: list[str], *, threads: int = 1, count: int = 400
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", bench.ports["web"], timeout=30)
        headers = {"Authorization": f"Bearer {token}"}
        mine: list[float] = []
        for i in range(n):
            path = paths[i % len(paths)]
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            mine.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                with lock:
                    errors += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    worker(20)  # warm up: connection, caches
    latencies.clear()
    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    result = {
        "endpoint": name, "concurrency": threads, "requests": len(latencies), "errors": errors,
        "p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2), "rps": round(len(latencies) / elapsed, 1),
    }
    log(f"  {name:<38} c={threads} p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
        f"  {result['rps']:7.1f} req/s  errors {errors}")
    return result


def list_latency(bench: Bench, token: str, sensors: list[str]) -> list[dict[str, Any]]:
    offsets = [f"/api/v1/mioty/sensors?limit=50&offset={random.randrange(0, 9950)}" for _ in range(50)]
    searches = [f"/api/v1/mioty/sensors?q={eui[-5:]}&limit=50" for eui in random.sample(sensors, 50)]
    details = [f"/api/v1/mioty/sensors/{eui}" for eui in random.sample(sensors, 50)]
    audit_pages = [f"/api/v1/audit?limit=50&offset={random.randrange(0, 9900)}" for _ in range(50)]
    plan = [
        ("GET /mioty/sensors (page of 50)", offsets),
        ("GET /mioty/sensors?q= (search)", searches),
        ("GET /mioty/sensors/{eui}", details),
        ("GET /mioty/base-stations", ["/api/v1/mioty/base-stations"]),
        ("GET /audit (page of 50 of 10k)", audit_pages),
        ("GET /audit?action=cert.issue", ["/api/v1/audit?action=cert.issue&limit=50"]),
        ("GET /users", ["/api/v1/users"]),
        ("GET /api-keys", ["/api/v1/api-keys"]),
    ]
    results = [measure(bench, token, name, paths) for name, paths in plan]
    results.append(measure(bench, token, "GET /mioty/sensors (page of 50)", offsets, threads=8, count=800))
    return results


def under_load(bench: Bench, token: str, sensors: list[str], rate: float) -> dict[str, Any]:
    """The same lists while uplinks are stored and published: reads share the store with the writes."""
    sim = subprocess.Popen([sys.executable, "-m", "bsscihub.cli", "sim", "--base-stations", "2", "--sensors", "10000",
                            "--copies", "2", "--rate", str(rate), "--duration", "60", "--quiet",
                            "--cert-dir", str(bench.tmp / "stations")],
                           cwd=bench.tmp, env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.processes.append(sim)
    before = bench.metric("bsscihub_mioty_uplinks_total")
    wait_for(lambda: bench.metric("bsscihub_mioty_uplinks_total") > before + rate, 60, "uplinks flowing")
    offsets = [f"/api/v1/mioty/sensors?limit=50&offset={random.randrange(0, 9950)}" for _ in range(50)]
    audit_pages = [f"/api/v1/audit?limit=50&offset={random.randrange(0, 9900)}" for _ in range(50)]
    results = [
        measure(bench, token, "GET /mioty/sensors (page of 50)", offsets),
        measure(bench, token, "GET /audit (page of 50 of 10k)", audit_pages),
        measure(bench, token, "GET /mioty/sensors (page of 50)", offsets, threads=8, count=800),
    ]
    stop(sim, signal.SIGINT)
    # Let the last uplinks leave their dedup window: phase 2 counts from a quiet hub.
    last = -1.0
    while (now := bench.metric("bsscihub_mioty_uplinks_total")) != last:
        last = now
        time.sleep(1.5)
    published = last - before
    return {"uplinks_per_second": rate, "uplinks_published": int(published), "lists": results}


# --- phase 2: WebSocket fan-out ------------------------------------------------------


def ws_clients_main(args: argparse.Namespace) -> int:
    """Client process: N raw WebSocket clients (asyncio); counts event frames without decoding them."""
    counts = [0] * args.clients
    state = {"connected": 0, "closed": 0, "failed": 0}

    def frame(opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        head += bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + struct.pack("!H",
                                                                                                         len(payload))
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    async def client(index: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write((f"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                              "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                              f"Authorization: Bearer {args.token}\r\n\r\n").encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if b" 101 " not in head.split(b"\r\n", 1)[0]:
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                writer.write(frame(1, json.dumps({"subscribe": ["mioty/uplink"]}).encode()))
                state["connected"] += 1
            except Exception:
                state["failed"] += 1
                return
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                length = b1 & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await reader.readexactly(8))[0]
                payload = await reader.readexactly(length)
                opcode = b0 & 0x0F
                if opcode == 1 and payload.startswith(b'{"event"'):
                    counts[index] += 1
                elif opcode == 9:
                    writer.write(frame(10, payload))  # pong: the hub drops clients that stop answering
                elif opcode == 8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        state["closed"] += 1

    async def main() -> None:
        gate = asyncio.Semaphore(50)  # the listen backlog takes this many at once comfortably
        tasks = [asyncio.create_task(client(i, gate)) for i in range(args.clients)]
        while state["connected"] + state["failed"] < args.clients:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # the subscriptions are on their way
        print(json.dumps({"ready": state["connected"], "failed": state["failed"]}), flush=True)
        stop_event = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop_event.set)
        await stop_event.wait()
        print(json.dumps({"connected": state["connected"], "failed": state["failed"], "closed": state["closed"],
                          "received": sum(counts), "min": min(counts), "max": max(counts)}), flush=True)
        for task in tasks:
            task.cancel()

    asyncio.run(main())
    return 0


def ws_fanout(bench: Bench, token: str, clients: int, rate: float, duration: float) -> dict[str, Any]:
    assert bench.hub is not None
    pid = bench.hub.pid
    rss_before = rss_mb(pid)
    log(f"  connecting {clients} WebSocket clients")
    started = time.perf_counter()
    client = subprocess.Popen([sys.executable, __file__, "ws-clients", "--port", str(bench.ports["web"]),
                               "--token", token, "--clients", str(clients)],
                              stdout=subprocess.PIPE, text=True)
    bench.processes.append(client)
    assert client.stdout is not None
    ready = json.loads(client.stdout.readline())
    connect_s = time.perf_counter() - started
    rss_connected = rss_mb(pid)
    log(f"  {ready['ready']} connected in {connect_s:.1f} s ({ready['failed']} failed); hub RSS {rss_before} ->"
        f" {rss_connected} MB")
    uplinks_before = bench.metric("bsscihub_mioty_uplinks_total")
    slow_before = bench.metric("bsscihub_stream_slow_disconnects_total")
    sim = subprocess.Popen([sys.executable, "-m", "bsscihub.cli", "sim", "--base-stations", "2", "--sensors", "10000",
                            "--rate", str(rate), "--duration", str(duration), "--quiet", "--json",
                            "--cert-dir", str(bench.tmp / "stations")],
                           cwd=bench.tmp, env=bench.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    bench.processes.append(sim)
    peak = rss_connected
    window_start = None
    while sim.poll() is None:
        peak = max(peak, rss_mb(pid))
        if window_start is None and bench.metric("bsscihub_mioty_uplinks_total") > uplinks_before:
            window_start = time.perf_counter()
        time.sleep(0.5)
    time.sleep(2)  # the last events reach the clients
    window = time.perf_counter() - (window_start or time.perf_counter())
    uplinks = bench.metric("bsscihub_mioty_uplinks_total") - uplinks_before
    slow = bench.metric("bsscihub_stream_slow_disconnects_total") - slow_before
    client.send_signal(signal.SIGTERM)
    summary = json.loads(client.stdout.readline())
    client.wait(10)
    expected = uplinks * summary["connected"]
    result = {
        "clients": clients, "connected": summary["connected"], "connect_seconds": round(connect_s, 1),
        "uplinks_published": int(uplinks), "sim_rate_per_s": rate, "window_seconds": round(window, 1),
        "messages_expected": int(expected), "messages_received": summary["received"],
        "delivery_ratio": round(summary["received"] / expected, 4) if expected else None,
        "delivered_per_second": round(summary["received"] / window, 0) if window else None,
        "per_client_min": summary["min"], "per_client_max": summary["max"], "slow_disconnects": int(slow),
        "hub_rss_mb": {"before_clients": rss_before, "clients_connected": rss_connected, "peak_streaming": peak},
        "hub_rss_per_client_kb": round((rss_connected - rss_before) * 1024 / max(1, summary["connected"]), 1),
    }
    log(f"  {int(uplinks)} uplinks x {summary['connected']} clients: received {summary['received']} of {expected}"
        f" ({result['delivery_ratio']}), {result['delivered_per_second']} msg/s, slow drops {int(slow)};"
        f" hub RSS peak {peak} MB")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode")
    ws = sub.add_parser("ws-clients", help="(internal) the WebSocket client process")
    ws.add_argument("--port", type=int, required=True)
    ws.add_argument("--token", required=True)
    ws.add_argument("--clients", type=int, required=True)
    parser.add_argument("--sensors", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="uplinks per second during the fan-out phase")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of uplinks during the fan-out phase")
    parser.add_argument("--load-rate", type=float, default=100.0, help="uplinks per second during phase 1b")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (hub.log)")
    args = parser.parse_args()
    if args.mode == "ws-clients":
        return ws_clients_main(args)

    tmp = Path(tempfile.mkdtemp(prefix="bsscihub-web-bench-"))
    bench = Bench(tmp)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count()}
    try:
        bench.start_mosquitto()
        out = bench.cli("init")
        password = re.search(r"password \(shown only now\): (\S+)", out)
        assert password is not None, out
        bench.cli("sim", "--write-endpoints", str(tmp / "endpoints.json"), "--sensors", str(args.sensors))
        bench.cli("sensors", "import", str(tmp / "endpoints.json"))
        seed_audit(tmp / "var" / "hub.sqlite", 10_000)
        sensors = [e["eui"] for e in json.loads((tmp / "endpoints.json").read_text())]
        bench.start_hub()
        login = {"username": "admin", "password": password.group(1)}
        token = bench.request("POST", "/api/v1/auth/token", login)["token"]
        log(f"hub up with {len(sensors)} sensors; phase 1: list latency (bearer token, keep-alive)")
        results["list_latency"] = list_latency(bench, token, sensors)
        log(f"phase 1b: list latency while the sim sends {args.load_rate:g} uplinks/s")
        results["list_latency_under_uplinks"] = under_load(bench, token, sensors, args.load_rate)
        log(f"phase 2: {args.clients} WebSocket clients, sim at {args.rate:g} uplinks/s for {args.duration:g} s")
        results["websocket_fanout"] = ws_fanout(bench, token, args.clients, args.rate, args.duration)
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"web-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    log(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
