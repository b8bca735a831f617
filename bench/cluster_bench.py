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


def redis_info(port: int) -> dict[str, Any]:
    """Commands by name (a script's own calls count under their names) and CPU seconds of the Redis process."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "all"], capture_output=True, text=True).stdout
    info: dict[str, Any] = {"calls": {}, "usec": {}, "cpu_s": 0.0}
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key.startswith("cmdstat_") and key != "cmdstat_info":  # the bench's own INFO is not the hubs' load
            fields = dict(f.split("=", 1) for f in value.split(","))
            info["calls"][key[len("cmdstat_"):]] = int(fields["calls"])
            info["usec"][key[len("cmdstat_"):]] = int(fields["usec"])
        elif key in ("used_cpu_sys", "used_cpu_user"):
            info["cpu_s"] += float(value)
    return info


PG_ROWS = ("tup_inserted", "tup_updated", "tup_deleted", "tup_fetched", "tup_returned", "xact_commit")


def pg_rows(admin: str, database: str) -> dict[str, int]:
    """The database's row and commit counters (pg_stat_database: no extension, no superuser setting needed)."""
    row = pg(admin, f"SELECT {', '.join(PG_ROWS)} FROM pg_stat_database WHERE datname = '{database}'")[0]
    return dict(zip(PG_ROWS, (int(x) for x in row), strict=True))


TABLE_ROWS = ("ins", "upd", "del", "seq_read", "idx_fetch")


def pg_tables(url: str) -> dict[str, tuple[int, ...]]:
    """Rows inserted, updated, deleted, read by sequential scans and fetched by index, per table of the hub."""
    rows = pg(url, "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, seq_tup_read, coalesce(idx_tup_fetch, 0) "
                   "FROM pg_stat_user_tables")  # fmt: skip
    return {name: tuple(int(x) for x in counts) for name, *counts in rows}


def pg_indexes(url: str) -> dict[str, tuple[int, int]]:
    """Scans of each index of the hub and entries read in it (where a per-uplink read grows with the table)."""
    rows = pg(url, "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes")
    return {name: (int(scans), int(reads)) for name, scans, reads in rows}


def pg_backends(admin: str, database: str) -> list[int]:
    """Process ids of the client backends serving the hubs (their CPU is read from /proc when PostgreSQL is local)."""
    rows = pg(admin, f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}' "
                     "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")  # fmt: skip
    return [int(pid) for (pid,) in rows]


def per(value: float, uplinks: int, digits: int = 3) -> float:
    return round(value / max(1, uplinks), digits)


def limit(cores: float, cpu_s_per_uplink: float | None) -> float | None:
    """Uplinks/s at which `cores` cores of an engine are busy, at the measured CPU seconds per uplink."""
    return round(cores / cpu_s_per_uplink) if cpu_s_per_uplink else None


def model(s: dict[str, Any], pg_cores: float) -> dict[str, Any]:
    """Where N hubs (one core each) stop scaling: the first engine whose cores are busy at N hubs' rate.

    Redis and Mosquitto run one thread, so one core each; PostgreSQL gets `pg_cores` for its backends.
    Per-uplink costs are taken as measured (they do not grow with N), the hub tier's as the sum over hubs."""
    cost = {k: (v / 1000 if v is not None else None) for k, v in s["cpu_ms_per_uplink"].items()}
    per_hub = limit(1, cost["hubs"])
    engines = {"redis": limit(1, cost["redis"]), "postgresql": limit(pg_cores, cost["postgresql"]),
               "mosquitto": limit(1, cost["mosquitto"])}  # fmt: skip
    stops = {k: round(v / per_hub, 1) if v and per_hub else None for k, v in engines.items()}
    known = {k: v for k, v in stops.items() if v is not None}
    first = min(known, key=lambda k: known[k]) if known else None
    return {
        "from": f"{s['hubs']} hub(s), {'cluster' if s['clustered'] else 'local'}", "pg_cores": pg_cores,
        "uplinks_per_s_per_hub_core": per_hub, "engine_saturates_at_uplinks_per_s": engines,
        "hubs_at_saturation": stops, "first_limit": first,
        "max_uplinks_per_s": engines[first] if first else None,
    }  # fmt: skip


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
        time.sleep(2.0)  # a backend flushes its statistics at most once a second: let start-up's land before
        before = [scrape(web) for _, web in ports]
        tables0, indexes0 = pg_tables(self.url), pg_indexes(self.url)
        rows0 = pg_rows(self.args.pg, self.database)
        backends = pg_backends(self.args.pg, self.database)
        engines0 = self.engine_cpu(procs, backends)
        redis0 = redis_info(self.redis_port)
        t0 = time.monotonic()
        a = self.args
        sim = subprocess.run(
            [sys.executable, "-m", "bsscihub.cli", "--config", CONFIG, "sim", "--json", "--host", "127.0.0.1",
             "--port", str(front), "--ca", str(self.tmp / "certs/ca.pem"), "--cert-dir", str(self.tmp / "stations"),
             "--base-stations", str(a.base_stations), "--sensors", str(a.sensors), "--copies", str(a.copies),
             "--rate", str(a.rate), "--duration", str(a.duration)],
            cwd=self.tmp, env=self.env("sim", 1, 1, False), capture_output=True, text=True,
        )  # fmt: skip
        summary: dict[str, Any] = json.loads(sim.stdout) if sim.stdout.strip() else {"error": sim.stderr[-2000:]}
        # Every cost is taken from before the load until the hubs flushed their outbox (the settle), so an
        # uplink's whole work counts, also what is published after the simulator stopped.
        witness.settle(quiet=3.0, timeout=60)
        window = time.monotonic() - t0
        redis1 = redis_info(self.redis_port)
        engines1 = self.engine_cpu(procs, pg_backends(self.args.pg, self.database))
        after = [scrape(web) for _, web in ports]
        for p in procs:
            stop(p)
        stop(haproxy)
        witness.close()
        # A backend flushes its statistics when it exits: read the rows after the hubs stopped.
        try:
            wait(lambda: not pg_backends(self.args.pg, self.database), 10, "the hubs' PostgreSQL connections closing")
        except RuntimeError as e:
            log(f"{e}: their last rows may be missing from the counts")
        rows = {k: v - rows0[k] for k, v in pg_rows(self.args.pg, self.database).items()}
        tables = {name: [x - y for x, y in zip(n, tables0.get(name, (0,) * len(TABLE_ROWS)), strict=True)]
                  for name, n in pg_tables(self.url).items()}  # fmt: skip
        indexes = {name: (scans - indexes0.get(name, (0, 0))[0], reads - indexes0.get(name, (0, 0))[1])
                   for name, (scans, reads) in pg_indexes(self.url).items()}  # fmt: skip
        unpublished = pg(self.url, "SELECT count(*) FROM mioty_uplinks WHERE published = 0")[0][0]
        stored = pg(self.url, "SELECT count(DISTINCT (ep_eui, packet_cnt)) FROM mioty_uplinks")[0][0]
        c = summary.get("counters", {})
        ops = c.get("ul_completed", 0)
        uplinks = c.get("unique_acked", 0)
        cpu = [x - y for x, y in zip(engines1["hubs"], engines0["hubs"], strict=True)]
        # A backend gone between the two reads is lost to the sum; one that came later counts from zero.
        pg_cpu = (sum(v - engines0["postgresql"].get(pid, 0.0) for pid, v in engines1["postgresql"].items())
                  if engines1["postgresql"] or not backends else None)  # fmt: skip
        redis_calls = {k: v - redis0["calls"].get(k, 0) for k, v in redis1["calls"].items()}
        redis_usec = {k: v - redis0["usec"].get(k, 0) for k, v in redis1["usec"].items()}
        engine_cpu = {"redis": redis1["cpu_s"] - redis0["cpu_s"], "postgresql": pg_cpu,
                      "mosquitto": engines1["mosquitto"] - engines0["mosquitto"]}  # fmt: skip
        p99 = [histogram_quantile(DEDUP_HISTOGRAM, b, x, 0.99) for b, x in zip(before, after, strict=True)]
        seconds = a.duration
        clustered_redis = clustered or any(redis_calls.values())
        return {
            "hubs": hubs, "clustered": clustered, "ul_ops_per_s": round(ops / seconds, 1),
            "uplinks_acked": uplinks, "published": witness.messages, "published_unique": witness.unique,
            "duplicates": witness.duplicates, "stored_unique": stored, "left_unpublished": unpublished,
            "window_s": round(window, 2),
            "cpu_s_per_hub": [round(x, 2) for x in cpu],
            "cpu_ms_per_op_per_hub": [round(1000 * x / max(1, ops / hubs), 3) for x in cpu],
            "dedup_p99_le_s": [q["le_s"] if q else None for q in p99],
            "redis_ops_per_uplink": per(sum(redis_calls.values()), uplinks, 2),
            "redis_commands_per_uplink": {k: per(v, uplinks) for k, v in sorted(redis_calls.items()) if v},
            # A script's time includes its own calls' (counted again under their names): not to be summed.
            "redis_usec_per_uplink": {k: per(v, uplinks, 2) for k, v in sorted(redis_usec.items()) if v},
            "pg_commits_per_uplink": per(rows["xact_commit"], uplinks),
            "pg_rows_per_uplink": {k[len("tup_"):]: per(v, uplinks) for k, v in rows.items() if k.startswith("tup_")},
            "pg_rows_written_per_uplink": per(rows["tup_inserted"] + rows["tup_updated"] + rows["tup_deleted"],
                                              uplinks),
            "pg_table_rows_per_uplink": {name: {k: per(v, uplinks) for k, v in zip(TABLE_ROWS, n, strict=True)}
                                         for name, n in sorted(tables.items()) if any(n)},
            "pg_index_reads_per_uplink": {name: per(n, uplinks) for name, (_, n) in sorted(indexes.items()) if n},
            "pg_index_scans_per_uplink": {name: per(n, uplinks) for name, (n, _) in sorted(indexes.items()) if n},
            "pg_backends": len(backends),
            "engine_cpu_s": {k: round(v, 3) if v is not None else None for k, v in engine_cpu.items()},
            "cpu_ms_per_uplink": {
                "hubs": per(1000 * sum(cpu), uplinks, 4),
                "redis": per(1000 * engine_cpu["redis"], uplinks, 4) if clustered_redis else None,
                "postgresql": per(1000 * pg_cpu, uplinks, 4) if pg_cpu is not None else None,
                "mosquitto": per(1000 * engine_cpu["mosquitto"], uplinks, 4),
            },
            "sim_error": summary.get("error"),
        }

    def engine_cpu(self, hubs: list[subprocess.Popen[bytes]], backends: list[int]) -> dict[str, Any]:
        """CPU seconds so far of the hubs, of the broker and of each PostgreSQL backend readable in /proc here."""
        found = {pid: proc_cpu(pid) for pid in backends}
        return {"hubs": [proc_cpu(p.pid) or 0.0 for p in hubs], "mosquitto": proc_cpu(self.mosquitto.pid) or 0.0,
                "postgresql": {pid: v for pid, v in found.items() if v is not None}}  # fmt: skip

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
    parser.add_argument("--pg-cores", type=float, default=1.0,
                        help="cores the scaling model gives PostgreSQL's backends (Redis and Mosquitto get one)")
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
    results["model"] = [model(s, args.pg_cores) for s in results["scenarios"] if s["clustered"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    report(results)
    print(f"JSON: {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def mode(s: dict[str, Any]) -> str:
    return "cluster" if s["clustered"] else "local"


def report(results: dict[str, Any]) -> None:
    print(f"{'hubs':>4} {'mode':>7} {'ops/s':>9} {'uplinks':>8} {'dup':>4} {'unpub':>5} {'cpu ms/op/hub':>16}"
          f" {'dedup p99':>12} {'redis/up':>8} {'pg/up':>6} {'rows/up':>7}")
    for s in results["scenarios"]:
        print(f"{s['hubs']:>4} {mode(s):>7} {s['ul_ops_per_s']:>9} "
              f"{s['uplinks_acked']:>8} {s['duplicates']:>4} {s['left_unpublished']:>5} "
              f"{str(s['cpu_ms_per_op_per_hub']):>16} {str(s['dedup_p99_le_s']):>12} "
              f"{s['redis_ops_per_uplink']:>8} {s['pg_commits_per_uplink']:>6} {s['pg_rows_written_per_uplink']:>7}")
    print("\nPer uplink: CPU ms in each part, Redis commands by name, PostgreSQL rows")
    print(f"{'hubs':>4} {'mode':>7} {'hubs ms':>8} {'redis ms':>8} {'pg ms':>8} {'mqtt ms':>8}"
          "  redis commands; pg rows")
    for s in results["scenarios"]:
        c = s["cpu_ms_per_uplink"]
        cols = " ".join(f"{'-' if c[k] is None else c[k]:>8}" for k in ("hubs", "redis", "postgresql", "mosquitto"))
        commands = " ".join(f"{k}={v}" for k, v in s["redis_commands_per_uplink"].items()) or "-"
        rows = " ".join(f"{k}={v}" for k, v in s["pg_rows_per_uplink"].items())
        print(f"{s['hubs']:>4} {mode(s):>7} {cols}  {commands}; {rows}")
    print("\nScaling model: uplinks/s at which each part's cores are busy, and the hubs (one core each) that reach it")
    print(f"{'from':>18} {'per hub':>8} {'redis':>16} {'postgresql':>16} {'mosquitto':>16}  first limit")
    for m in results["model"]:
        e, n = m["engine_saturates_at_uplinks_per_s"], m["hubs_at_saturation"]
        cols = " ".join(f"{'-' if e[k] is None else f'{e[k]} ({n[k]} hubs)':>16}"
                        for k in ("redis", "postgresql", "mosquitto"))
        print(f"{m['from']:>18} {m['uplinks_per_s_per_hub_core'] or '-':>8} {cols}  "
              f"{m['first_limit'] or '-'} at {m['max_uplinks_per_s'] or '-'} uplinks/s")
    print(f"(PostgreSQL with {results['options']['pg_cores']:g} core(s) for its backends; --pg-cores changes it)")


if __name__ == "__main__":
    sys.exit(main())
