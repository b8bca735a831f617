"""`bsscihub sim`: simulated mioty base stations over real mutual TLS, to try the hub without
hardware and to load it (N stations × M sensors, a rate, K copies per uplink, several processes)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Simulate mioty base stations against a hub (or any BSSCI service center): each one a "
        "mutual-TLS client with its own certificate that connects, answers every operation of "
        "the service center, sends ulData and sends each queued downlink with its sensor's next "
        "uplink (reported in dlDataRes). Prints a line per second and a summary."
    )
    where = parser.add_argument_group("where")
    where.add_argument("--host", default="127.0.0.1", help="service center address (default 127.0.0.1)")
    where.add_argument("--port", type=int, help="service center port (default: the port of bssci.listen)")
    tls = parser.add_argument_group("certificates")
    tls.add_argument("--ca", help="CA certificate to trust for the hub (default: tls.ca)")
    tls.add_argument(
        "--cert",
        help="one client certificate for every station (default: issue one per station from tls.ca/tls.ca_key)",
    )
    tls.add_argument("--key", help="key of --cert")
    tls.add_argument(
        "--cert-dir",
        help="keep the per-station certificates here and reuse them next time (default: a temporary directory)",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--base-stations", type=int, default=2, metavar="N", help="simulated base stations (default 2)")
    load.add_argument(
        "--sensors",
        type=int,
        default=10,
        metavar="M",
        help="simulated sensors, EUIs 70b3d59ce0000000 + i (default 10; 0: idle stations that only ping)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="unique uplinks per second, all sensors together (default 1; 0: as fast as the windows allow)",
    )
    load.add_argument(
        "--copies",
        type=int,
        default=1,
        metavar="K",
        help="base stations hearing each uplink, each with its own SNR/RSSI (default 1)",
    )
    load.add_argument("--in-flight", type=int, default=8, help="ulData operations in flight per connection (default 8)")
    load.add_argument(
        "--duration",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to measure once every station is connected (default 0: until Ctrl-C)",
    )
    load.add_argument(
        "--expect-attprp",
        type=int,
        metavar="N",
        help="attPrp each station should receive (the hub's attached sensors): report when they all "
        "arrived, and start the measured window only then",
    )
    load.add_argument(
        "--warmup-timeout", type=float, default=300.0, help="longest wait for --expect-attprp (default 300 s)"
    )
    load.add_argument(
        "--processes", type=int, default=1, metavar="P", help="worker processes sharing the stations (default 1)"
    )
    station = parser.add_argument_group("stations")
    station.add_argument("--version", default="1.0.0", help="BSSCI version sent in con (default 1.0.0)")
    station.add_argument("--vendor", default="bsscihub", help="vendor sent in con")
    station.add_argument("--model", default="sim", help="model sent in con")
    station.add_argument(
        "--first-bs", type=int, default=0, help="index of the first station's EUI, 70b3d59cb0000000 + i (default 0)"
    )
    station.add_argument(
        "--first-packet-cnt",
        type=int,
        help="first packet counter of every sensor (default: from the clock, so later runs never repeat a counter)",
    )
    station.add_argument("--payload-size", type=int, default=10, help="userData bytes per uplink (default 10)")
    station.add_argument("--subpackets", type=int, default=0, help="subpackets per ulData (default 0: none sent)")
    station.add_argument(
        "--ping-idle", type=float, default=30.0, help="ping the hub after this many idle seconds (default 30)"
    )
    station.add_argument(
        "--stack", choices=["asyncio", "twisted"], default="asyncio", help="client TLS stack (default asyncio)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout (per-second lines go to stderr)"
    )
    out.add_argument("--quiet", action="store_true", help="no per-second lines")
    out.add_argument(
        "--write-endpoints",
        metavar="FILE",
        help="write the --sensors simulated sensors as endpoints.json (for `bsscihub sensors import`;"
        " bidirectional, so they take downlinks) and exit",
    )


class SimError(Exception):
    """A bad option or missing file: one line for the user."""


def run(config: Any, args: argparse.Namespace) -> int:
    """Run the simulation `args` describes against the hub `config` points at."""
    try:
        if args.write_endpoints:
            return _write_endpoints(args)
        cert_dir, temporary = _cert_dir(args)
        try:
            options = _options(config, args, cert_dir)
            summary = _simulate(options, args)
        finally:
            if temporary:
                shutil.rmtree(cert_dir, ignore_errors=True)
    except SimError as e:
        print(f"bsscihub sim: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_describe(summary))
    return 0 if summary["counters"]["connects"] else 1


# --- options ---------------------------------------------------------------------


def _write_endpoints(args: argparse.Namespace) -> int:
    from bsscihub.protocols.bssci.sim._plan import endpoints

    text = json.dumps(endpoints(args.sensors, bidi=True), indent=1) + "\n"
    if args.write_endpoints == "-":
        sys.stdout.write(text)
    else:
        Path(args.write_endpoints).write_text(text)
        print(f"wrote {args.sensors} sensors to {args.write_endpoints}", file=sys.stderr)
    return 0


def _cert_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    if args.cert or args.cert_dir is None:
        return Path(tempfile.mkdtemp(prefix="bsscihub-sim-")), True
    return Path(args.cert_dir), False


def _listen_port(listen: str) -> int:
    match = re.match(r"^(?:tcp6?|ssl):(?:port=)?(\d+)", listen)
    if match is None:
        raise SimError(f"cannot tell the port from bssci.listen = {listen!r}: pass --port")
    return int(match.group(1))


def _options(config: Any, args: argparse.Namespace, cert_dir: Path) -> Any:
    from bsscihub.protocols.bssci.sim._plan import SimOptions, bs_eui

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise SimError(message)

    check(args.base_stations >= 1, "--base-stations must be at least 1")
    check(args.sensors >= 0, "--sensors must not be negative")
    check(args.rate >= 0, "--rate must not be negative")
    check(args.in_flight >= 1, "--in-flight must be at least 1")
    check(args.duration >= 0, "--duration must not be negative")
    check(1 <= args.processes <= args.base_stations, "--processes must be between 1 and --base-stations")
    per_worker = args.base_stations // args.processes
    check(
        1 <= args.copies <= per_worker,
        f"--copies must be between 1 and the stations per process ({per_worker})",
    )
    check(args.sensors == 0 or args.sensors >= args.processes, "--sensors must be 0 or at least --processes")
    check(bool(args.cert) == bool(args.key), "--cert and --key go together")
    port = args.port if args.port is not None else _listen_port(config.section("bssci").listen)
    ca = args.ca or str(config.tls.ca)
    check(Path(ca).exists(), f"no CA certificate at {ca}: run `bsscihub init` or pass --ca")
    euis = [bs_eui(args.first_bs + i) for i in range(args.base_stations)]
    if args.cert:
        certs = [(args.cert, args.key)] * args.base_stations
    else:
        ca_key = str(config.tls.ca_key)
        check(
            Path(ca_key).exists(),
            f"no CA key at {ca_key} to issue station certificates: run `bsscihub init` or pass --cert/--key",
        )
        from bsscihub.protocols.bssci.sim._certs import station_certs

        began = time.monotonic()
        certs = station_certs(ca, ca_key, euis, cert_dir)
        spent = time.monotonic() - began
        if spent > 2 and not args.quiet:
            print(f"issued station certificates in {spent:.1f} s ({cert_dir})", file=sys.stderr)
    first_cnt = args.first_packet_cnt
    if first_cnt is None:
        # Milliseconds since 2024: unless a sensor sends over 1,000 uplinks a
        # second, a later run never repeats an earlier run's counter, which
        # the hub would drop as a late duplicate.
        first_cnt = int((time.time() - 1_704_067_200) * 1000)
    return SimOptions(
        host=args.host,
        port=port,
        base_stations=args.base_stations,
        sensors=args.sensors,
        rate=args.rate,
        copies=args.copies,
        in_flight=args.in_flight,
        duration=args.duration if args.duration > 0 else float("inf"),
        version=args.version,
        vendor=args.vendor,
        model=args.model,
        ca=ca,
        certs=tuple(certs),
        first_bs=args.first_bs,
        processes=args.processes,
        expect_att_prp=args.expect_attprp,
        warmup_timeout=args.warmup_timeout,
        ping_idle=args.ping_idle,
        payload_size=args.payload_size,
        subpackets=args.subpackets,
        first_packet_cnt=first_cnt,
        stack=args.stack,
    )


# --- running ---------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """A thousand stations need a thousand sockets; the soft limit is often 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _simulate(options: Any, args: argparse.Namespace) -> dict[str, Any]:
    from bsscihub.protocols.bssci.sim._plan import split
    from bsscihub.protocols.bssci.sim._report import Aggregator

    _raise_fd_limit()
    stream = sys.stderr if args.json else sys.stdout
    aggregator = Aggregator(options, None if args.quiet else stream)
    if options.processes == 1:
        plan = split(options, time.time() + 0.1)[0]
        summaries = [_in_process(plan, aggregator)]
    else:
        summaries = _in_workers(options, aggregator)
    return aggregator.summary(summaries)


def _in_process(plan: Any, aggregator: Any) -> dict[str, Any]:
    from bsscihub.protocols.bssci.sim import _worker
    from bsscihub.protocols.bssci.sim._run import STOP_SIGNALS

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        return _worker.run_plan(plan, aggregator.add, stop_on_signals=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _in_workers(options: Any, aggregator: Any) -> list[dict[str, Any]]:
    import multiprocessing

    from bsscihub.protocols.bssci.sim import _worker
    from bsscihub.protocols.bssci.sim._plan import split

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # Spawned interpreters need a moment to import; they all wait for start_at.
    plans = split(options, time.time() + 1.5 + 0.2 * options.processes)
    workers = [context.Process(target=_worker.main, args=(plan, queue), daemon=True) for plan in plans]
    # Ctrl-C reaches the whole process group: the workers drain and report; we wait.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM reaches this process alone: it passes a Ctrl-C on to each worker.
    terminated: list[int] = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, _: terminated.append(signum))
    try:
        for w in workers:
            w.start()
        summaries: dict[int, dict[str, Any]] = {}
        told = float("-inf")
        while len(summaries) < len(workers):
            if terminated and time.monotonic() - told >= 1.0:
                # Each second again: a worker still starting up ignores it (SIGINT ignored until its run starts).
                told = time.monotonic()
                _interrupt([w for i, w in enumerate(workers) if i not in summaries])
            try:
                kind, worker, payload = queue.get(timeout=1.0)
            except Exception:  # queue.Empty
                dead = [p for i, p in enumerate(workers) if not p.is_alive() and i not in summaries]
                if dead:
                    raise SimError(
                        f"a worker process exited with status {dead[0].exitcode} without a summary"
                    ) from None
                continue
            if kind == "second":
                aggregator.add(payload)
            else:
                summaries[worker] = payload
                aggregator.worker_done(worker)
        for w in workers:
            w.join(timeout=10)
        return [summaries[i] for i in sorted(summaries)]
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        for w in workers:
            if w.is_alive():
                w.terminate()


def _interrupt(workers: list[Any]) -> None:
    """Ctrl-C for each worker still running: it drains and reports its summary."""
    for w in workers:
        if w.pid is not None and w.is_alive():
            os.kill(w.pid, signal.SIGINT)


def _describe(summary: dict[str, Any]) -> str:
    from bsscihub.protocols.bssci.sim._report import describe

    return describe(summary)
