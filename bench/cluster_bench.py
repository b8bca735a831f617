"""The cluster benchmark: the same simulated load on 1 hub and on 2 hubs (twistd processes behind HAProxy,
on PostgreSQL, a private Redis and a private Mosquitto), in one run; a table and a JSON file."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from _common import free_port, log, port_open, stop
from bssci_load import DEDUP_HISTOGRAM, RESULTS, ROOT, UplinkWitness, histogram_quantile, metric_samples, proc_cpu

CONFIG = str(ROOT / "etc" / "hub.yaml")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout:g} s")
        time.sleep(0.1)


def pg(admin: str, sql: str) -> Any:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if sql.lstrip().upper().startswith("SELECT") else None


def redis_commands(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "stats"], capture_output=True, text=True).stdout
    return next(int(line.split(":")[1]) for line in out.splitlines() if line.startswith("total_commands_processed"))


def scrape(web: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=5) as r:
        return metric_samples(r.read().decode())


class Run:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port, self.mqtt_port = free_port(), free_port()
        self.database = f"bsscihub_bench_{uuid.uuid4().hex[:8]}"
        self.url = args.pg.rsplit("/", 1)[0] + "/" + self.database

    def start_services(self) -> None:
        from bsscihub.pki import create_ca, issue_server_cert

        certs = self.tmp / "certs"
        certs.mkdir()
        create_ca(certs / "ca.pem", certs / "ca.key")
        issue_server_cert(certs / "ca.pem", certs / "ca.key", certs / "hub.pem", certs / "hub.key")
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        (self.tmp / "mosquitto.conf").write_text(f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\n")
        self.mosquitto = subprocess.Popen(["mosquitto", "-c", str(self.tmp / "mosquitto.conf")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: port_open(self.redis_port) and port_open(self.mqtt_port), 10, "redis and mosquitto")
        pg(self.args.pg, f'CREATE DATABASE "{self.database}"')

    def env(self, node: str, bssci: int, web: int, clustered: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BSSCIHUB_")}
        env.update(
            BSSCIHUB_DATABASE=self.url, BSSCIHUB_FAMILIES="mioty", BSSCIHUB_DATA_DIR=str(self.tmp / node),
            BSSCIHUB_WEB_LISTEN=f"tcp:{web}:interface=127.0.0.1", BSSCIHUB_WEB_PUBLIC_HEALTH="true",
            BSSCIHUB_BSSCI_LISTEN=f"tcp:{bssci}:interface=127.0.0.1", BSSCIHUB_LOG_LEVEL="warn",
            BSSCIHUB_MQTT_URL=f"mqtt://127.0.0.1:{self.mqtt_port}", BSSCIHUB_BSSCI_SELF_REGISTER="true",
            BSSCIHUB_TLS_CA=str(self.tmp / "certs/ca.pem"), BSSCIHUB_TLS_CA_KEY=str(self.tmp / "certs/ca.key"),
            BSSCIHUB_TLS_CERT=str(self.tmp / "certs/hub.pem"), BSSCIHUB_TLS_KEY=str(self.tmp / "certs/hub.key"),
        )  # fmt: skip
        if clustered:
            env.update(BSSCIHUB_CLUSTER_REDIS=f"redis://127.0.0.1:{self.redis_port}/0", BSSCIHUB_CLUSTER_NODE=node)
        return env

    def scenario(self, hubs: int, clustered: bool) -> dict[str, Any]:
        pg(self.url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        ports, procs = [], []
        for i in range(hubs):
            node = f"hub{i + 1}-of{hubs}-{'cluster' if clustered else 'local'}"
            bssci, web = free_port(), free_port()
            (self.tmp / node).mkdir()
            log_file = (self.tmp / f"{node}.log").open("wb")
            proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "bsscihub", "--config", CONFIG], cwd=self.tmp,
                                    env=self.env(node, bssci, web, clustered), stdout=log_file, stderr=log_file)
            procs.append(proc)
            ports.append((bssci, web))
            wait(lambda web=web, bssci=bssci: port_open(web) and port_open(bssci), 60, node)
        front = free_port()
        servers = "\n".join(f"    server h{i} 127.0.0.1:{b}" for i, (b, _) in enumerate(ports))
        cfg = self.tmp / f"haproxy-{hubs}.cfg"
        cfg.write_text(f"defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n"
                       f"frontend f\n    bind 127.0.0.1:{front}\n    default_backend b\n"
                       f"backend b\n    balance roundrobin\n{servers}\n")
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait(lambda: port_open(front), 10, "haproxy")
        witness = UplinkWitness(self.mqtt_port)
        before = [scrape(web) for _, web in ports]
        cpu0 = [proc_cpu(p.pid) or 0.0 for p in procs]
        redis0 = redis_commands(self.redis_port)
        xact0 = pg(self.args.pg, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{self.database}'")[0][0]
        a = self.args
        sim = subprocess.run(
            [sys.executable, "-m", "bsscihub.cli", "--config", CONFIG, "sim", "--json", "--host", "127.0.0.1",
             "--port", str(front), "--ca", str(self.tmp / "certs/ca.pem"), "--cert-dir", str(self.tmp / "stations"),
             "--base-stations", str(a.base_stations), "--sensors", str(a.sensors), "--copies", str(a.copies),
             "--rate", str(a.rate), "--duration", str(a.duration)],
            cwd=self.tmp, env=self.env("sim", 1, 1, False), capture_output=True, text=True,
        )  # fmt: skip
        summary = json.loads(sim.stdout) if sim.stdout.strip() else {"error": sim.stderr[-2000:]}
        cpu = [(proc_cpu(p.pid) or 0.0) - c for p, c in zip(procs, cpu0, strict=True)]
        witness.settle(quiet=3.0, timeout=60)
        after = [scrape(web) for _, web in ports]
        redis_ops = redis_commands(self.redis_port) - redis0 - 1
        xact = pg(self.args.pg, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{self.database}'")[0][0]
        unpublished = pg(self.url, "SELECT count(*) FROM mioty_uplinks WHERE published = 0")[0][0]
        stored = pg(self.url, "SELECT count(DISTINCT (ep_eui, packet_cnt)) FROM mioty_uplinks")[0][0]
        for p in procs:
            stop(p)
        stop(haproxy)
        witness.close()
        c = summary.get("counters", {})
        ops = c.get("ul_completed", 0)
        uplinks = c.get("unique_acked", 0)
        p99 = [histogram_quantile(DEDUP_HISTOGRAM, b, x, 0.99) for b, x in zip(before, after, strict=True)]
        seconds = a.duration
        return {
            "hubs": hubs, "clustered": clustered, "ul_ops_per_s": round(ops / seconds, 1),
            "uplinks_acked": uplinks, "published": witness.messages, "published_unique": witness.unique,
            "duplicates": witness.duplicates, "stored_unique": stored, "left_unpublished": unpublished,
            "cpu_s_per_hub": [round(x, 2) for x in cpu],
            "cpu_ms_per_op_per_hub": [round(1000 * x / max(1, ops / hubs), 3) for x in cpu],
            "dedup_p99_le_s": [q["le_s"] if q else None for q in p99],
            "redis_ops_per_uplink": round(redis_ops / max(1, uplinks), 2),
            "pg_commits_per_uplink": round((xact - xact0) / max(1, uplinks), 3),
            "sim_error": summary.get("error"),
        }

    def close(self) -> None:
        stop(self.redis)
        stop(self.mosquitto)
        try:
            pg(self.args.pg, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except Exception as e:  # noqa: BLE001 - cleanup: say it, go on
            log(f"could not drop {self.database}: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default=os.environ.get("HUBTEST_PG", "postgresql://postgres@127.0.0.1:5432/test"),
                        help="an admin URL of PostgreSQL (a database is created and dropped)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--base-stations", type=int, default=8)
    parser.add_argument("--sensors", type=int, default=400)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0, help="unique uplinks/s (0: as fast as acknowledged)")
    parser.add_argument("--quick", action="store_true", help="5 s per scenario")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 5.0
    for tool in ("redis-server", "redis-cli", "mosquitto", "haproxy"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bsscihub-cluster-bench-"))
    run = Run(args, tmp)
    results: dict[str, Any] = {"options": vars(args), "scenarios": []}
    try:
        run.start_services()
        for hubs, clustered in ((1, False), (1, True), (2, True)):
            log(f"scenario: {hubs} hub(s), {'cluster' if clustered else 'local'}")
            results["scenarios"].append(run.scenario(hubs, clustered))
    finally:
        run.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"{'hubs':>4} {'mode':>7} {'ops/s':>9} {'uplinks':>8} {'dup':>4} {'unpub':>5} {'cpu ms/op/hub':>16}"
          f" {'dedup p99':>12} {'redis/up':>8} {'pg/up':>6}")
    for s in results["scenarios"]:
        print(f"{s['hubs']:>4} {'cluster' if s['clustered'] else 'local':>7} {s['ul_ops_per_s']:>9} "
              f"{s['uplinks_acked']:>8} {s['duplicates']:>4} {s['left_unpublished']:>5} "
              f"{str(s['cpu_ms_per_op_per_hub']):>16} {str(s['dedup_p99_le_s']):>12} "
              f"{s['redis_ops_per_uplink']:>8} {s['pg_commits_per_uplink']:>6}")
    print(f"JSON: {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
