"""The BSSCI benchmark in one run: a private hub and mosquitto in a temp dir, the simulator as the
load (sustained load, attach storm, idle connections), and the bare ceiling server for comparison."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
from _common import free_port, log, port_open, stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEDUP_HISTOGRAM = "bsscihub_mioty_dedup_latency_seconds"
MQTT_PREFIX = "bsscihub"
# Histogram buckets and creation timestamps: not counts to subtract.
_NOT_COUNTS = ("}", "_created")
_COUNTS = ("_total", "_count", "_sum")


def wait_for(check: Any, timeout: float, what: str, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


# --- what the hub process costs -----------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.define
class Sample:
    t: float
    rss_kb: int | None
    cpu_s: float | None


class Monitor(threading.Thread):
    """Samples a process's RSS and CPU every 0.5 s and, optionally, its /metrics every second."""

    def __init__(self, pid: int, metrics_url: str | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.metrics_url = pid, metrics_url
        self.samples: list[Sample] = []
        self.scrapes: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        last_scrape = 0.0
        while not self._halt.is_set():
            now = time.time()
            self.samples.append(Sample(now, proc_status(self.pid).get("VmRSS"), proc_cpu(self.pid)))
            if self.metrics_url and now - last_scrape >= 1.0:
                last_scrape = now
                text = scrape(self.metrics_url)
                if text is not None:
                    self.scrapes.append((now, text))
            self._halt.wait(0.5)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]

    def cpu_cores(self, start: float, end: float) -> float | None:
        inside = [s for s in self.between(start, end) if s.cpu_s is not None]
        if len(inside) < 2 or inside[-1].t <= inside[0].t:
            return None
        return round((inside[-1].cpu_s - inside[0].cpu_s) / (inside[-1].t - inside[0].t), 2)  # type: ignore[operator]

    def max_rss_mb(self, start: float, end: float) -> float | None:
        values = [s.rss_kb for s in self.between(start, end) if s.rss_kb]
        return round(max(values) / 1024, 1) if values else None

    def rss_every(self, start: float, end: float, step: float = 60.0) -> list[float]:
        """VmRSS (MB) at the window's start and every `step` seconds after: does memory level off?"""
        inside = [s for s in self.between(start, end) if s.rss_kb]
        marks, out = start, []
        for sample in inside:
            if sample.t >= marks:
                out.append(round(sample.rss_kb / 1024, 1))  # type: ignore[operator]
                marks += step
        return out

    def scrape_near(self, t: float, *, before: bool) -> str | None:
        if not self.scrapes:
            return None
        if before:
            older = [s for s in self.scrapes if s[0] <= t]
            return (older[-1] if older else self.scrapes[0])[1]
        newer = [s for s in self.scrapes if s[0] >= t]
        return (newer[0] if newer else self.scrapes[-1])[1]


# --- prometheus ---------------------------------------------------------------------


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')


def metric_samples(text: str | None) -> dict[str, float]:
    """Every sample of the hub's own metrics, summed over labels except `le`."""
    out: dict[str, float] = {}
    for line in (text or "").splitlines():
        match = _SAMPLE.match(line)
        if match is None or not match.group(1).startswith("bsscihub_"):
            continue
        name, labels, value = match.groups()
        le = _LE.search(labels or "")
        key = f"{name}{{le={le.group(1)}}}" if le else name
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def histogram_buckets(name: str, before: dict[str, float], after: dict[str, float]) -> list[tuple[float, int]]:
    """Cumulative (upper bound, count) of a histogram between two scrapes."""
    prefix = f"{name}_bucket{{le="
    return sorted(
        (
            math.inf if key[len(prefix) : -1] == "+Inf" else float(key[len(prefix) : -1]),
            int(value - before.get(key, 0.0)),
        )
        for key, value in after.items()
        if key.startswith(prefix)
    )


def share_within(buckets: list[tuple[float, int]], bound: float) -> float | None:
    """Fraction of the observations at or below `bound`, if `bound` is a bucket edge."""
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if abs(le - bound) < 1e-9 and total:
            return round(count / total, 5)
    return None


def histogram_quantile(name: str, before: dict[str, float], after: dict[str, float], q: float) -> dict[str, Any] | None:
    """The q-quantile of a histogram between two scrapes, as the upper bound of its bucket."""
    prefix = f"{name}_bucket{{le="
    buckets = sorted(
        (math.inf if key[len(prefix) : -1] == "+Inf" else float(key[len(prefix) : -1]), value - before.get(key, 0.0))
        for key, value in after.items()
        if key.startswith(prefix)
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return {"le_s": bound, "count": int(total)}
    return None


# --- profile -------------------------------------------------------------------------


def find_py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


class Profiler:
    """py-spy on the hub (`--profile`): one recording per interesting phase of the load run."""

    PHASES = ("warmup", "window")

    def __init__(self, pid: int, prefix: Path) -> None:
        self.pid, self.prefix = pid, prefix
        self.exe = find_py_spy()
        self.files: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}
        self._current: subprocess.Popen[bytes] | None = None
        self._phase: str | None = None
        self._started = 0.0

    def phase(self, phase: str) -> None:
        """Called as the simulator enters a phase: stop the last recording, maybe start one."""
        self.stop()
        if phase in self.PHASES and self.exe is not None:
            path = Path(f"{self.prefix}-{phase}.txt")
            self.files[phase] = path
            self._phase, self._started = phase, time.monotonic()
            # --nonblocking: never pause the hub, at the cost of the odd torn sample.
            self._current = subprocess.Popen(
                [self.exe, "record", "-p", str(self.pid), "-r", "100", "--nonblocking", "-f", "raw", "-o", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self._current is not None:
            if self._phase is not None:
                self.seconds[self._phase] = time.monotonic() - self._started
            self._current.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self._current.wait(30)
            except subprocess.TimeoutExpired:
                self._current.kill()
            self._current = None

    def summary(self, top: int = 15) -> dict[str, Any]:
        return {
            phase: summarize_profile(path, self.seconds.get(phase), top)
            for phase, path in self.files.items()
            if path.exists()
        }


_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
_RATE = 100  # py-spy samples per second, as recorded above


def summarize_profile(path: Path, seconds: float | None, top: int = 15) -> dict[str, Any]:
    """Where the reactor thread spends its time, and how busy it and the other threads are.

    Shares are of the reactor thread's samples; `busy` is samples / (rate × seconds):
    1.0 means that thread never waited, so it is what bounds the throughput.
    """
    own: dict[str, int] = {}
    inside: dict[str, int] = {}
    reactor = others = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        raw = stack.split(";")
        # twistd's main thread runs the reactor; the rest are thread pools (storage, DNS...).
        if not raw[0].startswith("<module> (twistd"):
            others += n
            continue
        reactor += n
        frames = []
        for frame in raw:
            match = _FRAME.match(frame)
            frames.append(f"{match.group(1)} ({_short(match.group(2))})" if match else frame)
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for name in set(frames):
            if "bsscihub/" in name:
                inside[name] = inside.get(name, 0) + n

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100.0 * n / reactor, 1)) for name, n in best]

    if not reactor:
        return {}
    span = _RATE * seconds if seconds else None
    return {
        "file": str(path),
        "seconds": round(seconds, 1) if seconds else None,
        "reactor_samples": reactor,
        "reactor_busy": round(reactor / span, 2) if span else None,
        "other_threads_busy": round(others / span, 2) if span else None,
        "reactor_self": ranked(own),
        "reactor_in_hub_code": ranked(inside),
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename.split(f"{ROOT}/", 1)[-1]  # the checkout's own files, relative to it


# --- MQTT witness -------------------------------------------------------------------


class UplinkWitness:
    """Counts `.../mioty/ep/+/up` messages on the private broker, and the duplicates among them."""

    _COUNTER = re.compile(rb'"packetCnt"\s*:\s*(\d+)')

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages = 0
        self.duplicates = 0
        self.unparsed = 0
        self._seen: set[tuple[str, int]] = set()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-witness-{os.getpid()}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(f"{MQTT_PREFIX}/mioty/ep/+/up", qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages += 1
        found = self._COUNTER.search(message.payload)
        if found is None:
            self.unparsed += 1
            return
        key = (message.topic.split("/")[-2], int(found.group(1)))
        if key in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(key)

    @property
    def unique(self) -> int:
        return len(self._seen)

    def settle(self, quiet: float = 3.0, timeout: float = 300.0) -> None:
        """Wait until no message arrived for `quiet` seconds (the hub flushed its outbox)."""
        deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.messages != last:
                last, since = self.messages, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.2)

    def reset(self) -> None:
        self.messages = self.duplicates = self.unparsed = 0
        self._seen = set()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# --- the benchmark ---------------------------------------------------------------------


@attrs.define
class Bench:
    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    ports: dict[str, int]
    pki: Path
    results: dict[str, Any] = attrs.Factory(dict)
    hub: subprocess.Popen[bytes] | None = None
    monitor: Monitor | None = None
    stamp: str = attrs.Factory(lambda: time.strftime("%Y%m%d-%H%M%S"))
    dedup_window: float = 0.5  # mioty.dedup_window of the hub under test
    mqtt_drain_s: float | None = None

    # --- processes -----------------------------------------------------------

    def cli(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bsscihub.cli", *argv],
            cwd=self.tmp,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_mosquitto(self) -> subprocess.Popen[bytes]:
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    "persistence false",
                    "allow_anonymous true",
                    # The witness subscribes with QoS 1: never drop what it must count.
                    "max_queued_messages 0",
                    f"listener {self.ports['mqtt']} 127.0.0.1",
                    # stderr: run as root, mosquitto drops to a user that cannot write here.
                    "log_dest stderr",
                ]
            )
            + "\n"
        )
        mosquitto = shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin") or "mosquitto"
        out = (self.tmp / "mosquitto.log").open("ab")
        process = subprocess.Popen([mosquitto, "-c", str(conf)], cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.ports["mqtt"]), 10, "mosquitto", process)
        return process

    def start_hub(self, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        twistd = Path(sys.executable).with_name("twistd")
        out = (self.tmp / f"{name}.log").open("ab")
        hub = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "bsscihub"], cwd=self.tmp, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        web = f"http://127.0.0.1:{self.ports['web']}/health"
        try:
            wait_for(lambda: scrape(web) is not None or _http_status(web) is not None, 60, "hub web listener", hub)
            wait_for(lambda: port_open(self.ports["bssci"]), 30, "hub BSSCI listener", hub)
        except RuntimeError as e:
            stop(hub)
            raise RuntimeError(f"{e}; last lines of {name}.log:\n{self.tail(name)}") from None
        self.hub = hub
        self.monitor = Monitor(hub.pid, f"http://127.0.0.1:{self.ports['web']}/metrics")
        self.monitor.start()
        return hub

    def stop_hub(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.hub is not None:
            hwm = proc_status(self.hub.pid).get("VmHWM")
            info["peak_rss_mb"] = round(hwm / 1024, 1) if hwm else None
            stop(self.hub)
        if self.monitor is not None:
            self.monitor.stop()
        self.hub = None
        return info

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.tmp / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def sim(self, *argv: str, name: str, on_phase: Any = None) -> dict[str, Any]:
        """Run `bsscihub sim ... --json`, echo its per-second lines, return its summary.

        on_phase(phase) is called from the reader thread when a new phase shows up in the lines.
        """
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        command = [
            sys.executable,
            "-m",
            "bsscihub.cli",
            "sim",
            "--json",
            "--cert-dir",
            str(self.pki / "stations"),
            *argv,
        ]
        log(f"sim {name}: {' '.join(command[3:])}")
        process = subprocess.Popen(
            command, cwd=self.tmp, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines: list[str] = []

        def echo() -> None:
            assert process.stderr is not None
            phase = None
            for line in process.stderr:
                lines.append(line)
                fields = line.split()
                second = fields[0][:-1] if fields and fields[0].endswith("s") else ""
                if not second.isdigit():
                    continue
                if on_phase is not None and fields[1] != phase:
                    phase = fields[1]
                    on_phase(phase)
                if self.args.verbose or int(second) % 5 == 0:
                    print(f"    {line.rstrip()}", flush=True)

        # This thread alone reads stderr; communicate() would read it too and steal lines.
        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        assert process.stdout is not None
        out = process.stdout.read()
        process.wait()
        reader.join(5)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        (self.tmp / f"sim-{name}.log").write_text("".join(lines))
        if process.returncode not in (0, 1) or not out.strip():
            raise RuntimeError(f"sim exited with {process.returncode}: {''.join(lines[-10:])}")
        summary: dict[str, Any] = json.loads(out)
        summary["sim_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
        self.results.setdefault("sim_timelines", {})[name] = summary["timeline"]
        return summary

    # --- scenarios -------------------------------------------------------------

    def load_args(self, *, attprp: bool) -> list[str]:
        a = self.args
        argv = [
            "--port",
            str(self.ports["bssci"]),
            "--base-stations",
            str(a.base_stations),
            "--sensors",
            str(a.sensors),
            "--copies",
            str(a.copies),
            "--in-flight",
            str(a.in_flight),
            "--rate",
            str(a.rate),
            "--duration",
            str(a.duration),
            "--processes",
            str(a.sim_processes),
        ]
        if attprp:
            argv += ["--expect-attprp", str(a.sensors), "--warmup-timeout", str(a.warmup_timeout)]
        return argv

    def storm_and_load(self, registered: bool) -> None:
        """(b) then (a), one simulator run: the storm is its warm-up, the sustained load its window.

        Every connect propagates every registered sensor, so (a) is only
        measured after the storm in any case; one run saves a second storm.
        """
        assert self.monitor is not None
        witness = UplinkWitness(self.ports["mqtt"]) if self.args.mqtt_check else None
        profiler = None
        if self.args.profile and self.hub is not None:
            profiler = Profiler(self.hub.pid, RESULTS / f"hub-profile-{self.stamp}")
        try:
            summary = self.sim(
                *self.load_args(attprp=registered),
                name="hub-load",
                on_phase=profiler.phase if profiler is not None else None,
            )
            if profiler is not None:
                profiler.stop()
            if witness is not None:
                began = time.monotonic()
                witness.settle()
                self.mqtt_drain_s = round(time.monotonic() - began, 1)
        finally:
            if profiler is not None:
                profiler.stop()
                self.results["hub_profile"] = profiler.summary()
            if witness is not None:
                witness.close()
        time.sleep(1.5)  # one more scrape after the last event
        phases = summary["phases"]
        monitor = self.monitor
        storm = phases.get("warmup")
        if "b" not in self.args.scenarios:
            pass
        elif storm is not None:
            self.results["b_attach_storm"] = {
                "att_prp_expected": self.args.sensors * self.args.base_stations,
                "att_prp_received": summary["att_prp"]["received"],
                "all_propagated_after_s": summary["att_prp"]["all_done_after_s"],
                "stations_complete": summary["att_prp"]["stations_done"],
                "uplink_ops_per_s_meanwhile": storm["ul_ops_per_s"],
                "uplink_p99_ms_meanwhile": storm["latency"]["p99_ms"],
                "slowest_second_ops": _slowest_second(summary, "warmup"),
                "sim_loop_lag_max_ms": _max_lag(summary, "warmup"),
                "hub_cpu_cores": monitor.cpu_cores(storm["start"], storm["end"]),
                "hub_max_rss_mb": monitor.max_rss_mb(summary["start_at"], storm["end"]),
            }
        elif registered:
            self.results["b_attach_storm"] = {"error": "the simulator reported no warm-up phase"}
        window = phases.get("window")
        if "a" not in self.args.scenarios:
            return
        if window is None:
            self.results["a_sustained"] = {"error": "no measured window", "sim": _brief(summary)}
            return
        before = metric_samples(monitor.scrape_near(window["start"], before=True))
        after = metric_samples(monitor.scrape_near(window["end"], before=False))
        final = metric_samples(monitor.scrapes[-1][1] if monitor.scrapes else None)
        a: dict[str, Any] = {
            "seconds": window["seconds"],
            "connected": window["connected"],
            "ul_ops_per_s": window["ul_ops_per_s"],
            "unique_uplinks_per_s": window["unique_uplinks_per_s"],
            "slowest_second_ops": _slowest_second(summary, "window"),
            "latency_p50_ms": window["latency"]["p50_ms"],
            "latency_p99_ms": window["latency"]["p99_ms"],
            "copy_spread_p99_ms": window["copy_spread_p99_ms"],
            "dedup_latency_p99": histogram_quantile(DEDUP_HISTOGRAM, before, after, 0.99),
            # The issue's target: within the dedup window + 50 ms.
            "dedup_within_target": share_within(
                histogram_buckets(DEDUP_HISTOGRAM, before, after), self.dedup_window + 0.05
            ),
            "dedup_buckets": histogram_buckets(DEDUP_HISTOGRAM, before, after),
            "hub_cpu_cores": monitor.cpu_cores(window["start"], window["end"]),
            "hub_max_rss_mb": monitor.max_rss_mb(window["start"], window["end"]),
            "hub_rss_by_minute_mb": monitor.rss_every(window["start"], window["end"]),
            "sim_cpu_s": summary["sim_cpu_s"],
            "sim_loop_lag_max_ms": summary["sim_loop_lag_max_ms"],
            "errors_received": summary["counters"]["errors_received"],
            "anomalies": summary["counters"]["anomalies"],
            # Counters over the window; gauges as they were at its end.
            "hub_counters_in_window": {
                k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if k.endswith(_COUNTS)
            },
            "hub_gauges_at_window_end": {
                k: v for k, v in after.items() if not k.endswith(_COUNTS) and not k.endswith(_NOT_COUNTS)
            },
        }
        c = summary["counters"]
        uniqueness: dict[str, Any] = {"sim_unique_acked": c["unique_acked"], "sim_ul_completed": c["ul_completed"]}
        if witness is not None:
            uniqueness.update(
                mqtt_up_messages=witness.messages,
                mqtt_unique=witness.unique,
                mqtt_duplicates=witness.duplicates,
                mqtt_unparsed=witness.unparsed,
                # After the simulator ended: how long the hub kept publishing its backlog.
                mqtt_drain_s=self.mqtt_drain_s,
                # None: nothing reached the broker, so nothing can be judged.
                exactly_once=(witness.duplicates == 0 and witness.unique == c["unique_acked"])
                if witness.messages
                else None,
            )
        uniqueness["hub_metrics_total"] = {k: v for k, v in final.items() if k.endswith(_COUNTS) and "uplink" in k}
        a["uniqueness"] = uniqueness
        self.results["a_sustained"] = a

    def idle(self, env: dict[str, str]) -> None:
        """(c): a fresh hub without sensors, then idle stations: RSS per connection."""
        n = self.args.idle
        hub = self.start_hub(env, "hub-idle")
        assert self.monitor is not None
        time.sleep(3)
        baseline = proc_status(hub.pid).get("VmRSS", 0)
        summary = self.sim(
            "--port",
            str(self.ports["bssci"]),
            "--base-stations",
            str(n),
            "--sensors",
            "0",
            "--duration",
            str(self.args.idle_duration),
            "--processes",
            str(self.args.sim_processes),
            "--first-bs",
            "0",
            name="hub-idle",
        )
        window = summary["phases"].get("window")
        samples = self.monitor.between(window["start"], window["end"]) if window else []
        rss = [s.rss_kb for s in samples if s.rss_kb]
        connected = window["connected"] if window else 0
        steady = sum(rss) / len(rss) if rss else None
        info = self.stop_hub()
        self.results["c_idle"] = {
            "stations": n,
            "connected": connected,
            "connect_seconds": summary["phases"].get("connecting", {}).get("seconds"),
            "hub_rss_before_mb": round(baseline / 1024, 1),
            "hub_rss_connected_mb": round(steady / 1024, 1) if steady else None,
            "rss_per_connection_kb": round((steady - baseline) / connected, 1) if steady and connected else None,
            "hub_cpu_cores_idle": self.monitor.cpu_cores(window["start"], window["end"]) if window else None,
            "pings_answered": summary["counters"]["pings_answered"],
            **info,
        }

    def ceiling(self) -> None:
        """(d): the same load against the bare ceiling server."""
        port_file = self.tmp / "ceiling.port"
        out = (self.tmp / "ceiling.log").open("ab")
        server = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "ceiling_server.py"),
                "--listen",
                f"tcp:{self.ports['ceiling']}:interface=127.0.0.1",
                "--ca",
                "certs/ca.pem",
                "--cert",
                "certs/hub.pem",
                "--key",
                "certs/hub.key",
                "--port-file",
                str(port_file),
            ],
            cwd=self.tmp,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        monitor = Monitor(server.pid, None)
        try:
            wait_for(port_file.exists, 30, "ceiling server", server)
            monitor.start()
            argv = self.load_args(attprp=False)
            argv[argv.index("--port") + 1] = str(self.ports["ceiling"])
            summary = self.sim(*argv, name="ceiling")
        finally:
            hwm = proc_status(server.pid).get("VmHWM")
            stop(server)
            monitor.stop()
        window = summary["phases"]["window"]
        self.results["d_ceiling"] = {
            "seconds": window["seconds"],
            "ul_ops_per_s": window["ul_ops_per_s"],
            "unique_uplinks_per_s": window["unique_uplinks_per_s"],
            "slowest_second_ops": _slowest_second(summary, "window"),
            "latency_p50_ms": window["latency"]["p50_ms"],
            "latency_p99_ms": window["latency"]["p99_ms"],
            "server_cpu_cores": monitor.cpu_cores(window["start"], window["end"]),
            "server_peak_rss_mb": round(hwm / 1024, 1) if hwm else None,
            "sim_cpu_s": summary["sim_cpu_s"],
            "sim_loop_lag_max_ms": summary["sim_loop_lag_max_ms"],
        }


def stored_uplinks(database: Path, uniqueness: dict[str, Any]) -> dict[str, Any]:
    """What the stopped hub's database holds for the run: every acknowledged copy stored once,
    every unique uplink marked published (nothing left for a replay)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        copies, unique, unpublished = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT ep_eui || ':' || packet_cnt), SUM(published = 0) FROM mioty_uplinks"
        ).fetchone()
        repeated = db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM mioty_uplinks GROUP BY ep_eui, packet_cnt, bs_eui HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    return {
        "db_copies": copies,
        "db_unique": unique,
        "db_unpublished": unpublished or 0,
        "db_repeated_copies": repeated,
        "stored_exactly_once": unique == uniqueness["sim_unique_acked"] and copies == uniqueness["sim_ul_completed"]
        and repeated == 0 and not unpublished,
    }


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def _slowest_second(summary: dict[str, Any], phase: str) -> float | None:
    """The fewest ulData operations completed in one whole second of the phase."""
    rates = [e["ul_ops_per_s"] for e in summary.get("timeline", []) if e["phase"] == phase]
    # The first and last seconds of a phase are partly another phase.
    return min(rates[1:-1] or rates) if rates else None


def _max_lag(summary: dict[str, Any], phase: str) -> float | None:
    lags = [e["loop_lag_ms"] for e in summary.get("timeline", []) if e["phase"] == phase]
    return max(lags) if lags else None


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {"counters": summary.get("counters"), "phases": list(summary.get("phases", {}))}


def _pki(tmp: Path, cache: Path | None) -> Path:
    """Reuse the CA, hub and station certificates of earlier runs: RSA keys are slow to make."""
    if cache is not None and (cache / "certs" / "ca.pem").exists():
        shutil.copytree(cache / "certs", tmp / "certs")
        return cache
    return cache if cache is not None else tmp / "pki"


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []

    def row(label: str, value: Any, unit: str = "") -> None:
        if value is None:
            text = "n/a"
        elif isinstance(value, bool):
            text = "yes" if value else "NO"
        elif isinstance(value, float):
            text = f"{value:,.1f}{unit}"
        elif isinstance(value, int):
            text = f"{value:,}{unit}"
        else:
            text = f"{value}{unit}"
        rows.append((label, text))

    for key, title in (
        ("a_sustained", "(a) sustained load"),
        ("b_attach_storm", "(b) attach storm"),
        ("c_idle", "(c) idle connections"),
        ("d_ceiling", "(d) ceiling server"),
    ):
        r = results.get(key)
        rows.append((title, ""))
        if r is None:
            row("  result", "not run")
            continue
        if "error" in r:
            # The JSON keeps all of it (a traceback, say); the table its last line.
            lines = str(r["error"]).strip().splitlines()
            row("  error", lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}")
            continue
        if key == "a_sustained":
            row("  ulData ops/s completed", r["ul_ops_per_s"])
            row("  slowest second (ops)", r["slowest_second_ops"])
            row("  unique uplinks/s", r["unique_uplinks_per_s"])
            row("  ulData→Rsp p50 / p99", f"{r['latency_p50_ms']} / {r['latency_p99_ms']}", " ms")
            d = r["dedup_latency_p99"]
            row("  dedup latency p99", None if d is None else f"≤ {d['le_s']} s ({d['count']:,} events)")
            w = r["dedup_within_target"]
            row("  dedup ≤ window + 50 ms", None if w is None else f"{100 * w:.2f} % of events")
            row("  hub CPU (cores)", r["hub_cpu_cores"])
            row("  hub RSS max in window", r["hub_max_rss_mb"], " MB")
            if len(r.get("hub_rss_by_minute_mb") or ()) > 2:
                row("  hub RSS each minute", " → ".join(map(str, r["hub_rss_by_minute_mb"])), " MB")
            row("  sim loop lag max", r["sim_loop_lag_max_ms"], " ms")
            u = r["uniqueness"]
            if "mqtt_unique" in u:
                row(
                    "  MQTT up: unique / dup / sim acked",
                    f"{u['mqtt_unique']:,} / {u['mqtt_duplicates']:,} / {u['sim_unique_acked']:,}",
                )
                row("  exactly once", "no uplink reached MQTT" if u["exactly_once"] is None else u["exactly_once"])
            if "db_unique" in u:
                row(
                    "  stored: copies / unique / unpublished",
                    f"{u['db_copies']:,} / {u['db_unique']:,} / {u['db_unpublished']:,}",
                )
                row("  stored exactly once", u["stored_exactly_once"])
        elif key == "b_attach_storm":
            row("  attPrp received / expected", f"{r['att_prp_received']:,} / {r['att_prp_expected']:,}")
            row("  all propagated after", r["all_propagated_after_s"], " s")
            row("  uplink ops/s meanwhile", r["uplink_ops_per_s_meanwhile"])
            row("  slowest second (ops)", r["slowest_second_ops"])
            row("  hub CPU (cores)", r["hub_cpu_cores"])
            row("  sim loop lag max", r["sim_loop_lag_max_ms"], " ms")
        elif key == "c_idle":
            row("  connected", f"{r['connected']} / {r['stations']}")
            row("  connect time", r["connect_seconds"], " s")
            row("  hub RSS before / connected", f"{r['hub_rss_before_mb']} / {r['hub_rss_connected_mb']}", " MB")
            row("  RSS per connection", r["rss_per_connection_kb"], " kB")
        elif key == "d_ceiling":
            row("  ulData ops/s completed", r["ul_ops_per_s"])
            row("  slowest second (ops)", r["slowest_second_ops"])
            row("  ulData→Rsp p50 / p99", f"{r['latency_p50_ms']} / {r['latency_p99_ms']}", " ms")
            row("  server CPU (cores)", r["server_cpu_cores"])
            row("  sim loop lag max", r["sim_loop_lag_max_ms"], " ms")
    for phase, profile in results.get("hub_profile", {}).items():
        if profile:
            rows.append(
                (
                    f"hub profile, {phase}",
                    f"reactor thread busy {profile['reactor_busy']}, other threads {profile['other_threads_busy']}"
                    " (self time of the reactor thread:)",
                )
            )
            for name, share in profile["reactor_self"][:10]:
                rows.append((f"  {share:5.1f}%", name[:110]))
    if "hub" in results:
        row("hub peak RSS (VmHWM, load hub)", results["hub"].get("peak_rss_mb"), " MB")
    if "ratio_hub_to_ceiling" in results:
        row("hub / ceiling ops/s", results["ratio_hub_to_ceiling"])
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds of (a) and (d) (default 30)")
    parser.add_argument("--base-stations", type=int, default=100, help="stations for (a), (b), (d) (default 100)")
    parser.add_argument("--sensors", type=int, default=3000, help="sensors, all registered in the hub (default 3000)")
    parser.add_argument("--copies", type=int, default=3, help="stations hearing each uplink (default 3)")
    parser.add_argument("--in-flight", type=int, default=8, help="ulData in flight per connection (default 8)")
    parser.add_argument("--rate", type=float, default=0.0, help="unique uplinks/s (default 0: as fast as possible)")
    parser.add_argument("--idle", type=int, default=1000, help="idle stations for (c) (default 1000)")
    parser.add_argument("--idle-duration", type=float, default=15.0, help="seconds the idle stations stay (default 15)")
    parser.add_argument("--sim-processes", type=int, default=2, help="simulator worker processes (default 2)")
    parser.add_argument(
        "--warmup-timeout", type=float, default=300.0, help="longest wait for the attach storm (default 300 s)"
    )
    parser.add_argument(
        "--scenarios", default="abcd", help="which scenarios to run, e.g. ad (default abcd; a and b run together)"
    )
    parser.add_argument("--quick", action="store_true", help="a 5-second small run: smoke test of the whole benchmark")
    parser.add_argument(
        "--no-mqtt-check", dest="mqtt_check", action="store_false", help="skip the MQTT exactly-once witness"
    )
    parser.add_argument(
        "--pki-cache",
        default=str(RESULTS / "pki"),
        help="reuse certificates from here (default bench/results/pki; '' for none)",
    )
    parser.add_argument(
        "--hub-env", action="append", default=[], metavar="KEY=VALUE", help="extra BSSCIHUB_* settings for the hub"
    )
    parser.add_argument(
        "--bssci-backlog",
        type=int,
        default=1024,
        help="listen backlog of the hub's BSSCI port (appended to bssci.listen), 1024 as in the hub's default; "
        "0 for Twisted's default of 50",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    parser.add_argument("--verbose", action="store_true", help="echo every per-second line of the simulator")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the hub with py-spy during the storm and the window (bench/results/hub-profile-*.txt)",
    )
    args = parser.parse_args(argv)
    if args.profile and find_py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    if args.quick:
        args.duration, args.base_stations, args.sensors, args.idle = 5.0, 10, 300, 50
        args.idle_duration, args.warmup_timeout, args.sim_processes = 5.0, 60.0, 1

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the hub inherits it: 1,000 sockets
    tmp = Path(tempfile.mkdtemp(prefix="bsscihub-bench-"))
    cache = Path(args.pki_cache) if args.pki_cache else None
    pki = _pki(tmp, cache)
    ports = {name: free_port() for name in ("bssci", "web", "mqtt", "ceiling")}
    env = {
        **os.environ,
        "BSSCIHUB_DATA_DIR": str(tmp / "var"),
        "BSSCIHUB_BSSCI_LISTEN": f"tcp:{ports['bssci']}:interface=127.0.0.1"
        + (f":backlog={args.bssci_backlog}" if args.bssci_backlog else ""),
        "BSSCIHUB_WEB_LISTEN": f"tcp:{ports['web']}:interface=127.0.0.1",
        "BSSCIHUB_MQTT_URL": f"mqtt://127.0.0.1:{ports['mqtt']}",
        "BSSCIHUB_MQTT_PREFIX": MQTT_PREFIX,
        "BSSCIHUB_MQTT_CLIENT_ID": "bsscihub-bench",
        # The monitor reads /metrics without logging in.
        "BSSCIHUB_WEB_PUBLIC_HEALTH": "true",
    }
    for item in args.hub_env:
        key, _, value = item.partition("=")
        env[key] = value
    bench = Bench(args, tmp, env, ports, pki)
    if "BSSCIHUB_MIOTY_DEDUP_WINDOW" in env:
        from bsscihub.config import duration

        bench.dedup_window = duration(env["BSSCIHUB_MIOTY_DEDUP_WINDOW"])
    started = time.time()
    results = bench.results
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "git": _git_revision(),
        "options": {k: v for k, v in vars(args).items() if k != "hub_env"},
    }
    mosquitto = None
    log(f"work dir {tmp}")
    try:
        mosquitto = bench.start_mosquitto()
        done = bench.cli("init")
        if cache is not None and not (cache / "certs" / "ca.pem").exists() and (tmp / "certs" / "ca.pem").exists():
            shutil.copytree(tmp / "certs", cache / "certs", dirs_exist_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"bsscihub init failed: {_last_line(done)}")
        log("issuing station certificates (cached in %s)" % (pki / "stations"))
        from bsscihub.protocols.bssci.sim._certs import station_certs
        from bsscihub.protocols.bssci.sim._plan import bs_eui, endpoints

        t0 = time.monotonic()
        count = max(args.base_stations, args.idle if "c" in args.scenarios else 0)
        station_certs(
            str(tmp / "certs/ca.pem"), str(tmp / "certs/ca.key"), [bs_eui(i) for i in range(count)], pki / "stations"
        )
        results["meta"]["cert_seconds"] = round(time.monotonic() - t0, 1)
        if {"a", "b"} & set(args.scenarios):
            # Registered for (a) too: base stations only forward uplinks of
            # attached sensors, and every connect then propagates them all.
            registered = True
            try:
                (tmp / "endpoints.json").write_text(json.dumps(endpoints(args.sensors)))
                done = bench.cli("sensors", "import", "endpoints.json")
                if done.returncode != 0:
                    results["b_attach_storm"] = {"error": f"sensors import failed: {_last_line(done)}"}
                    registered = False
                log("starting the hub")
                bench.start_hub(env, "hub")
                bench.storm_and_load(registered)
            except Exception as e:  # noqa: BLE001 - record, then go on to the other scenarios
                results.setdefault("a_sustained", {"error": str(e)})
                log(f"hub load failed: {e}")
            finally:
                results["hub"] = bench.stop_hub()
                results["hub"]["log_bytes"] = (tmp / "hub.log").stat().st_size if (tmp / "hub.log").exists() else None
            uniqueness = results.get("a_sustained", {}).get("uniqueness")
            if uniqueness is not None:
                uniqueness.update(stored_uplinks(tmp / "var" / "hub.sqlite", uniqueness))
        if "c" in args.scenarios:
            idle_env = {**env, "BSSCIHUB_DATA_DIR": str(tmp / "var-idle")}
            try:
                done = bench.cli("init", env=idle_env)
                if done.returncode != 0:
                    raise RuntimeError(f"bsscihub init failed: {_last_line(done)}")
                bench.idle(idle_env)
            except Exception as e:  # noqa: BLE001
                results["c_idle"] = {"error": str(e)}
                log(f"idle scenario failed: {e}")
                bench.stop_hub()
    except Exception as e:  # noqa: BLE001
        results["error"] = str(e)
        log(f"hub scenarios not run: {e}")
    finally:
        bench.stop_hub()  # after Ctrl-C too: never leave a hub behind
        stop(mosquitto)
    if "d" in args.scenarios and (tmp / "certs" / "hub.pem").exists():
        try:
            bench.ceiling()
        except Exception as e:  # noqa: BLE001
            results["d_ceiling"] = {"error": str(e)}
    a, d = results.get("a_sustained", {}), results.get("d_ceiling", {})
    if a.get("ul_ops_per_s") and d.get("ul_ops_per_s"):
        results["ratio_hub_to_ceiling"] = round(a["ul_ops_per_s"] / d["ul_ops_per_s"], 3)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bssci-{bench.stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(results))
    print(f"\nJSON: {out}")
    if args.keep:
        print(f"work dir kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if "error" not in results else 1


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def _git_revision() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
