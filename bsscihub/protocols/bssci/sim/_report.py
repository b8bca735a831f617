"""What a simulation run prints: one line per second merged across workers, and the summary
(per phase: duration, ulData operations/s, latency percentiles; attPrp progress; downlinks; errors)."""

from __future__ import annotations

import math
from typing import Any, TextIO

from bsscihub.protocols.bssci.sim._stats import Counters, Histogram

__all__ = ["Aggregator", "describe"]

_PHASES = ("connecting", "warmup", "window", "drain")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _latency(h: Histogram) -> dict[str, Any]:
    return {
        "samples": h.total,
        "p50_ms": _ms(h.percentile(50)),
        "p90_ms": _ms(h.percentile(90)),
        "p99_ms": _ms(h.percentile(99)),
        "p999_ms": _ms(h.percentile(99.9)),
        "max_ms": _ms(h.percentile(100)),
    }


class Aggregator:
    """Merges the workers' per-second counts into lines and a timeline, and their summaries."""

    def __init__(self, options: Any, stream: TextIO | None) -> None:
        self.options = options
        self._stream = stream
        self._latest: dict[int, dict[str, Any]] = {}
        self._done: set[int] = set()
        self._second = 0
        self._counters = Counters()
        self._latency = Histogram()
        self._lag = 0.0
        self.timeline: list[dict[str, Any]] = []

    def add(self, snapshot: dict[str, Any]) -> None:
        self._latest[snapshot["worker"]] = snapshot
        self._latency.merge(Histogram.from_sparse(snapshot["latency"]))
        # The worst since the last line, not the latest: a worker may report twice in between.
        self._lag = max(self._lag, snapshot.get("loop_lag_ms", 0.0))
        self._emit()

    def worker_done(self, worker: int) -> None:
        self._done.add(worker)
        self._emit()

    def _emit(self) -> None:
        if len(self._latest) < self.options.processes:
            return
        running = [s["second"] for w, s in self._latest.items() if w not in self._done]
        second = min(running) if running else max(s["second"] for s in self._latest.values())
        if second <= self._second:
            return
        counters = Counters()
        for snap in self._latest.values():
            counters.add(Counters.from_dict(snap["counters"]))
        elapsed = second - self._second
        ops = (counters.ul_completed - self._counters.ul_completed) / elapsed
        phases = {s["phase"] for s in self._latest.values()}
        phase = next((p for p in (*_PHASES, "done") if p in phases), "done")
        entry = {
            "second": second,
            "phase": phase,
            "connected": sum(s["connected"] for s in self._latest.values()),
            "ul_ops_per_s": round(ops, 1),
            "p50_ms": _ms(self._latency.percentile(50)),
            "p99_ms": _ms(self._latency.percentile(99)),
            "att_prp": counters.att_prp,
            "att_prp_done": sum(s["att_prp_done"] for s in self._latest.values()),
            "outstanding": sum(s["outstanding"] for s in self._latest.values()),
            "errors_received": counters.errors_received,
            "anomalies": sum(counters.anomalies.values()),
            "loop_lag_ms": self._lag,
        }
        self.timeline.append(entry)
        self._second, self._counters, self._latency, self._lag = second, counters, Histogram(), 0.0
        if self._stream is not None:
            self._stream.write(_line(entry, self.options) + "\n")
            self._stream.flush()

    def summary(self, workers: list[dict[str, Any]]) -> dict[str, Any]:
        opts = self.options
        counters = Counters()
        for w in workers:
            counters.add(Counters.from_dict(w["counters"]))
        start_at = min(w["phases"].get("connecting", {}).get("start", math.inf) for w in workers)
        phases: dict[str, Any] = {}
        for name in _PHASES:
            parts = [w["phases"][name] for w in workers if name in w["phases"]]
            if not parts:
                continue
            delta = Counters()
            ops = unique = 0.0
            for part in parts:
                c = Counters.from_dict(part["counters"])
                delta.add(c)
                span = part["end"] - part["start"]
                if span > 0:
                    ops += c.ul_completed / span
                    unique += c.unique_acked / span
            latency, spread = Histogram(), Histogram()
            for w in workers:
                if name in w["latency"]:
                    latency.merge(Histogram.from_sparse(w["latency"][name]))
                    spread.merge(Histogram.from_sparse(w["copy_spread"][name]))
            phases[name] = {
                "start": min(p["start"] for p in parts),
                "end": max(p["end"] for p in parts),
                "seconds": round(max(p["end"] - p["start"] for p in parts), 3),
                "connected": sum(p["connected"] for p in parts),
                "ul_completed": delta.ul_completed,
                "ul_ops_per_s": round(ops, 1),
                "unique_uplinks_per_s": round(unique, 1),
                "att_prp": delta.att_prp,
                "errors_received": delta.errors_received,
                "latency": _latency(latency),
                "copy_spread_p99_ms": _ms(spread.percentile(99)),
                "copy_spread_max_ms": _ms(spread.percentile(100)),
            }
        stations_done = sum(w["att_prp_done"] for w in workers)
        last = [w["att_prp_last_at"] for w in workers if w["att_prp_last_at"] is not None]
        att_prp = {
            "expected_per_station": opts.expect_att_prp,
            "received": counters.att_prp,
            "stations_done": stations_done,
            "fewest_per_station": min(w["att_prp_per_station_min"] for w in workers),
            # From the moment every station started connecting.
            "all_done_after_s": (
                round(max(last) - start_at, 3)
                if opts.expect_att_prp and stations_done == opts.base_stations and last
                else None
            ),
        }
        return {
            "options": {
                "host": opts.host,
                "port": opts.port,
                "base_stations": opts.base_stations,
                "sensors": opts.sensors,
                "rate": opts.rate,
                "copies": opts.copies,
                "in_flight": opts.in_flight,
                "duration": opts.duration if math.isfinite(opts.duration) else None,
                "version": opts.version,
                "processes": opts.processes,
                "stack": opts.stack,
                "subpackets": opts.subpackets,
                "payload_size": opts.payload_size,
                "first_packet_cnt": opts.first_packet_cnt,
            },
            "start_at": start_at,
            "counters": counters.as_dict(),
            # The simulator's own event-loop lag in the window: past ~100 ms it,
            # not the service center, may be what limits the figures.
            "sim_loop_lag_max_ms": max(w["loop_lag_max_ms"] for w in workers),
            "phases": phases,
            "att_prp": att_prp,
            "timeline": self.timeline,
        }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _line(e: dict[str, Any], opts: Any) -> str:
    parts = [
        f"{e['second']:5d}s",
        f"{e['phase']:<10}",
        f"conn {e['connected']}/{opts.base_stations}",
        f"ul {e['ul_ops_per_s']:8.0f}/s",
        f"p50 {_fmt_ms(e['p50_ms']):>8}",
        f"p99 {_fmt_ms(e['p99_ms']):>8}",
    ]
    if e["att_prp"] or opts.expect_att_prp:
        done = f" ({e['att_prp_done']}/{opts.base_stations} done)" if opts.expect_att_prp else ""
        parts.append(f"attPrp {e['att_prp']}{done}")
    parts.append(f"err {e['errors_received']}")
    if e["loop_lag_ms"] >= 100:
        parts.append(f"sim lag {e['loop_lag_ms']:.0f}ms")
    if e["anomalies"]:
        parts.append(f"anomalies {e['anomalies']}")
    return "  ".join(parts)


def describe(summary: dict[str, Any]) -> str:
    """The summary for people: a few lines."""
    c, phases, opts = summary["counters"], summary["phases"], summary["options"]
    lines = []
    connecting = phases.get("connecting")
    if connecting:
        lines.append(
            f"connected {connecting['connected']} of {opts['base_stations']} base stations"
            f" in {connecting['seconds']:.1f} s"
        )
    for name, label in (("warmup", "while attPrp arrived"), ("window", "measured window")):
        p = phases.get(name)
        if p:
            lat = p["latency"]
            lines.append(
                f"{label}: {p['seconds']:.1f} s, {p['ul_ops_per_s']:,.0f} ulData ops/s"
                f" ({p['unique_uplinks_per_s']:,.0f} unique uplinks/s),"
                f" latency p50 {_fmt_ms(lat['p50_ms'])} p99 {_fmt_ms(lat['p99_ms'])}"
                + (f", copies sent within {_fmt_ms(p['copy_spread_p99_ms'])} (p99)" if opts["copies"] > 1 else "")
            )
    a = summary["att_prp"]
    if a["received"] or a["expected_per_station"]:
        text = f"attPrp received: {a['received']:,}"
        if a["expected_per_station"]:
            if a["all_done_after_s"] is not None:
                text += f"; every station had {a['expected_per_station']:,} after {a['all_done_after_s']:.1f} s"
            else:
                text += (
                    f"; only {a['stations_done']} of {opts['base_stations']} stations got"
                    f" {a['expected_per_station']:,} (fewest: {a['fewest_per_station']:,})"
                )
        lines.append(text)
    lines.append(
        f"totals: {c['ul_completed']:,} ulData completed, {c['unique_acked']:,} unique uplinks acknowledged,"
        f" {c['ul_errors']} answered with error, {c['ul_lost']} lost with a connection,"
        f" {c['ul_skipped']} skipped (station offline or queue full)"
    )
    lines.append(
        f"service center: {c['sc_ops']:,} operations answered ({c['sc_completed']:,} completed),"
        f" {c['errors_received']} errors received, {c['pings_sent']} pings sent"
        f" ({c['pings_answered']} answered), {c['disconnects']} disconnects, {c['connect_failures']} failed connects"
    )
    if c["dl_queued"] or c["dl_reported"]:
        lines.append(
            f"downlinks: {c['dl_queued']} queued, {c['dl_sent']} sent, {c['dl_expired']} expired,"
            f" {c['dl_revoked']} revoked, {c['dl_forgotten']} forgotten; {c['dl_reported']} results completed,"
            f" {c['dl_errors']} answered with error;"
            f" {c['dl_acked']} acknowledged by the sensor's next uplink"
        )
    if summary["sim_loop_lag_max_ms"] >= 100:
        lines.append(
            f"warning: the simulator's event loop lagged up to {summary['sim_loop_lag_max_ms']:.0f} ms in the"
            " window: it may be the bottleneck (try --processes)"
        )
    anomalies = c["anomalies"]
    if anomalies:
        lines.append("protocol anomalies:")
        lines.extend(f"  {n:>8}  {what}" for what, n in sorted(anomalies.items(), key=lambda kv: -kv[1]))
    return "\n".join(lines)
