"""One worker's simulation, independent of the event loop: its base stations, the uplink
generator (open loop at a rate, or closed loop on the windows), the phases and the per-second counts."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from typing import Any

from bsscihub.protocols.bssci.sim._plan import WorkerPlan, bs_eui, sensor_eui
from bsscihub.protocols.bssci.sim._session import BaseStation, Uplink, ul_template
from bsscihub.protocols.bssci.sim._stats import Counters, Histogram

__all__ = ["RECONNECT_DELAY", "Run", "STOP_SIGNALS", "TICK"]

TICK = 0.005  # s between generator ticks: 200 small batches per second, no bursts
RECONNECT_DELAY = 1.0  # s, as a base station waits before dialling again
# What ends a run early, drained and with its summary: Ctrl-C, and the stop of a service manager or `kill`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Copies waiting per base station beyond its window; past this the offered
# rate is not being served, and further copies are skipped (and counted).
MAX_QUEUE = 1000


class Run:
    """A worker's base stations and load, driven by `tick` and `flush` from an event loop.

    Phases: connecting (until every station got conRsp), warmup (only with
    expect_att_prp: until every station received that many attPrp), window
    (`duration` seconds: the measured part), drain (no new uplinks; wait for
    the copies and downlink results still out), done. Uplinks flow from the
    first connected station on, so an attach storm is measured with load.
    """

    def __init__(
        self,
        plan: WorkerPlan,
        *,
        call_soon: Callable[[Callable[[], None]], Any],
        report: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        opts = plan.options
        self.plan = plan
        self.options = opts
        self._call_soon = call_soon
        self._report = report
        self._clock = clock
        self._wall = wall
        self.counters = Counters()
        self.latency_by_phase = {"warmup": Histogram(), "window": Histogram(), "drain": Histogram()}
        self.latency = self.latency_by_phase["warmup"]
        self.latency_second = Histogram()
        # Copies of one uplink leave as their stations' windows allow; a wide
        # spread is the simulator's doing, not late copies made by the hub.
        self.spread_by_phase = {"warmup": Histogram(), "window": Histogram(), "drain": Histogram()}
        self.copy_spread = self.spread_by_phase["warmup"]
        self.outstanding = 0
        self.ready_count = 0
        self.att_prp_done = 0
        self.stations = [
            BaseStation(
                plan.bs_start + i,
                bs_eui(opts.first_bs + plan.bs_start + i),
                self,
                version=opts.version,
                vendor=opts.vendor,
                model=opts.model,
                in_flight=opts.in_flight,
                expect_att_prp=opts.expect_att_prp,
                clock=clock,
            )
            for i in range(plan.bs_count)
        ]
        template = ul_template(opts.subpackets)
        for station in self.stations:
            station.set_ul_template(template)
        self._rng = random.Random(opts.seed * 1000 + plan.worker)
        n = plan.sensor_count
        self._sensor_euis = [sensor_eui(plan.sensor_start + i) for i in range(n)]
        self._packet_cnt = [opts.first_packet_cnt] * n
        self._payloads = [
            list((plan.sensor_start + i).to_bytes(4, "big") * (opts.payload_size // 4 + 1))[: opts.payload_size]
            for i in range(n)
        ]
        self._base_snr = [self._rng.uniform(0.0, 15.0) for _ in range(n)]
        self._next_sensor = 0
        self._copies = min(opts.copies, len(self.stations))
        # Closed loop: the next sensor of each home station (sensors i, i + N, ...).
        self._home_next = list(range(len(self.stations)))
        # ... and how many copies a station may hold: its window plus a short
        # queue, so the window never runs dry yet an uplink's copies leave
        # their stations close together, as they were heard.
        self._station_cap = opts.in_flight + max(1, opts.in_flight // 4)
        self._closed_loop = opts.rate <= 0
        self._generated = 0  # unique uplinks due so far in open loop
        self._dirty: list[BaseStation] = []
        self.dl_ack_due: dict[int, int] = {}
        self._flush_scheduled = False
        self.phase = "connecting"
        self.stopping = False  # drivers: stop reconnecting
        self.finished = False
        self._phase_started = plan.start_at
        self.phases: dict[str, dict[str, Any]] = {}
        self._phase_counters = self.counters.as_dict()
        self._second = 0
        self._last_ping_check = 0.0
        self._gen_started: float | None = None
        self._sweep = False  # closed loop: look at every station at the next tick
        self._last_sweep = 0.0
        self._last_tick = 0.0
        self._lag_second = 0.0  # worst tick lag this second
        self.lag_max = 0.0  # ... and over the measured window

    # --- called by the base stations -----------------------------------------

    def request_flush(self, station: BaseStation) -> None:
        self._dirty.append(station)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_soon(self.flush)

    def flush(self) -> None:
        """Once per loop turn: top up a closed loop, then one write per station with output."""
        dirty, self._dirty = self._dirty, []
        if self._closed_loop and self._generating():
            # A station with output probably completed an operation: its
            # neighbourhood may have room for new uplinks now.
            self._refill(dirty)
            dirty.extend(self._dirty)
            self._dirty = []
        self._flush_scheduled = False
        for station in dirty:
            station.flush()

    def station_ready(self, station: BaseStation) -> None:
        self.ready_count += 1
        self._sweep = True
        if self._gen_started is None:
            self._gen_started = self._clock()

    def station_att_prp_done(self, station: BaseStation) -> None:
        self.att_prp_done += 1

    # --- called by the drivers ---------------------------------------------------

    def connect_failed(self, error: BaseException) -> None:
        """A dial that failed (the driver retries after RECONNECT_DELAY); counted the same on every stack."""
        self.counters.connect_failures += 1
        self.counters.anomalies[f"connect failed: {type(error).__name__}: {str(error)[:80]}"] += 1

    def station_lost(self, station: BaseStation, *, by_us: bool) -> None:
        if station.ready:
            self.ready_count -= 1
        in_flight, queued = station.connection_lost()
        self.counters.ul_lost += in_flight + queued
        if not by_us:
            self.counters.disconnects += 1

    def tick(self) -> None:
        now, wall = self._clock(), self._wall()
        # How late this tick is: the simulator's own saturation, reported so
        # that a slow simulator is never mistaken for a slow hub.
        if self._last_tick:
            lag = now - self._last_tick - TICK
            if lag > self._lag_second:
                self._lag_second = lag
        self._last_tick = now
        self._advance(wall)
        if self._generating() and self.plan.sensor_count:
            if self._closed_loop:
                if self._sweep or now - self._last_sweep >= 1.0:
                    self._sweep, self._last_sweep = False, now
                    self._refill(self.stations)
            elif self._gen_started is not None:
                due = int(self.plan.rate * (now - self._gen_started)) - self._generated
                if due > 0:
                    self._generated += due
                    self._generate(due)
        if now - self._last_ping_check >= 1.0:
            self._last_ping_check = now
            opts = self.options
            for station in self.stations:
                station.check_idle(now, opts.ping_idle, opts.ping_timeout)
        second = int(wall - self.plan.start_at)
        if second > self._second:
            self._emit_second(second)

    def stop(self) -> None:
        """End early (STOP_SIGNALS): the window closes now, the copies still out drain."""
        if self._generating():
            self._enter("drain", self._wall())

    # --- phases ----------------------------------------------------------------

    def _generating(self) -> bool:
        return self.phase in ("connecting", "warmup", "window")

    def _advance(self, wall: float) -> None:
        opts, n = self.options, len(self.stations)
        elapsed = wall - self._phase_started
        if self.phase == "connecting":
            if self.ready_count >= n or elapsed > opts.connect_timeout:
                if opts.expect_att_prp:
                    self._enter("warmup", wall)
                else:
                    self._enter("window", wall)
        elif self.phase == "warmup":
            if self.att_prp_done >= n or elapsed > opts.warmup_timeout:
                self._enter("window", wall)
        elif self.phase == "window":
            if elapsed >= opts.duration:
                self._enter("drain", wall)
        elif self.phase == "drain":
            # Results too: one cut off by the end would leave its downlink pending at the SC.
            drained = self.outstanding <= 0 and not any(st.dl_results_pending for st in self.stations)
            if drained or elapsed > opts.drain_timeout:
                self._enter("done", wall)

    def _enter(self, phase: str, wall: float) -> None:
        now = self.counters.as_dict()
        self.phases[self.phase] = {
            "start": self._phase_started,
            "end": wall,
            "connected": self.ready_count,
            "counters": _delta(now, self._phase_counters),
        }
        self._phase_counters = now
        self._phase_started = wall
        self.phase = phase
        if phase in self.latency_by_phase:
            self.latency = self.latency_by_phase[phase]
            self.copy_spread = self.spread_by_phase[phase]
        if phase == "done":
            self.stopping = True
            self.finished = True
            self._emit_second(int(wall - self.plan.start_at) + 1)
            for station in self.stations:
                station.close()

    # --- uplinks ---------------------------------------------------------------

    def _refill(self, candidates: list[BaseStation]) -> None:
        """Closed loop: a new uplink whenever all k stations that hear it have room.

        Sensor s is heard by its home station s mod N and the k-1 after it,
        so a station that completed something is part of k neighbourhoods;
        each gets uplinks until one of its stations is full.
        """
        stations, n, k = self.stations, len(self.stations), self._copies
        n_sensors, cap, base = self.plan.sensor_count, self._station_cap, self.plan.bs_start
        homes = {(station.index - base - j) % n for station in candidates for j in range(k)}
        for home in homes:
            if home >= n_sensors:
                continue  # fewer sensors than stations: nobody lives here
            group = [stations[(home + j) % n] for j in range(k)]
            while all(st.ready and st.load < cap for st in group):
                sensor = self._home_next[home]
                nxt = sensor + n
                self._home_next[home] = nxt if nxt < n_sensors else home
                self._uplink(sensor)

    def _generate(self, count: int) -> None:
        """Open loop: `count` unique uplinks, sensors in turn, whatever the stations' load."""
        n_sensors = self.plan.sensor_count
        sensor = self._next_sensor
        for _ in range(count):
            self._uplink(sensor)
            sensor += 1
            if sensor == n_sensors:
                sensor = 0
        self._next_sensor = sensor

    def _uplink(self, sensor: int) -> None:
        """One unique uplink of `sensor`, offered to the k stations that hear it."""
        stations, n, counters, rng = self.stations, len(self.stations), self.counters, self._rng
        cnt = self._packet_cnt[sensor]
        self._packet_cnt[sensor] = cnt + 1
        uplink: Uplink = [self._sensor_euis[sensor], cnt, time.time_ns(), self._payloads[sensor], False, None, False]
        # The sensor's home station and its neighbours hear it: the same k
        # stations every time, like sensors that do not move.
        home = sensor % n
        base_snr = self._base_snr[sensor]
        offered = 0
        for j in range(self._copies):
            station = stations[(home + j) % n]
            if not station.ready or len(station.queue) >= MAX_QUEUE:
                counters.ul_skipped += 1
                continue
            snr = base_snr - 3.0 * j + rng.random()
            station.offer(uplink, snr, snr - 120.0 + rng.random())
            offered += 1
        if offered:
            counters.unique_generated += 1

    # --- reporting -------------------------------------------------------------

    def _emit_second(self, second: int) -> None:
        self._second = second
        if self._report is not None:
            self._report(
                {
                    "worker": self.plan.worker,
                    "second": second,
                    "phase": self.phase,
                    "connected": self.ready_count,
                    "att_prp_done": self.att_prp_done,
                    "outstanding": self.outstanding,
                    "counters": self.counters.as_dict(),
                    "latency": self.latency_second.sparse(),
                    "loop_lag_ms": round(self._lag_second * 1000.0, 1),
                }
            )
        if self.phase == "window" and self._lag_second > self.lag_max:
            self.lag_max = self._lag_second
        self.latency_second = Histogram()
        self._lag_second = 0.0

    def summary(self) -> dict[str, Any]:
        """Everything the parent needs to merge this worker into the run's summary (picklable)."""
        done_at = [s.att_prp_done_at for s in self.stations if s.att_prp_done_at is not None]
        return {
            "worker": self.plan.worker,
            "stations": len(self.stations),
            "counters": self.counters.as_dict(),
            "phases": self.phases,
            "latency": {phase: h.sparse() for phase, h in self.latency_by_phase.items()},
            "copy_spread": {phase: h.sparse() for phase, h in self.spread_by_phase.items()},
            "att_prp_done": len(done_at),
            "att_prp_last_at": max(done_at) if done_at else None,
            "att_prp_per_station_min": min((s.att_prp_count for s in self.stations), default=0),
            "loop_lag_max_ms": round(self.lag_max * 1000.0, 1),
        }


def _delta(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in now.items():
        if key == "anomalies":
            out[key] = {k: v - before[key].get(k, 0) for k, v in value.items() if v - before[key].get(k, 0)}
        else:
            out[key] = value - before[key]
    return out
