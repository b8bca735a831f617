"""The mioty family's counters and their Prometheus exposition (read at scrape time).
Plain integers on the hot path; nothing here is touched off the reactor thread."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from bsscihub.protocols.bssci.session import State

if TYPE_CHECKING:
    from bsscihub.protocols.bssci.service import MiotyService

__all__ = ["Counters", "Histogram", "MiotyMetrics"]


class Histogram:
    """A Prometheus histogram without locks (observed on the reactor thread only)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(set(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(bound), total))
        return out


@attrs.define
class Counters:
    copies: int = 0
    uplinks: int = 0
    merged: int = 0
    late: int = 0
    replayed: int = 0
    store_failures: int = 0
    publish_failures: int = 0
    connections: int = 0
    refused: int = 0
    resumed: int = 0
    latency: Histogram = attrs.field(factory=lambda: Histogram(()))


class MiotyMetrics:
    """Exposes the service's plain counters to Prometheus at scrape time."""

    def __init__(self, service: MiotyService) -> None:
        self._service = service

    def collect(self) -> Iterable[Any]:
        service = self._service
        c, stats = service.counters, service.stats
        p = "bsscihub_mioty_"

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(p + name, doc, value=value)

        yield counter("uplink_copies", "ulData copies received and stored (each acknowledged after commit)", c.copies)
        yield counter("uplinks", "unique uplinks published (copies merged)", c.uplinks)
        yield counter("duplicate_copies", "copies merged into an uplink inside its dedup window", c.merged)
        yield counter("late_copies", "copies arriving after their uplink was published: dropped", c.late)
        yield counter("uplinks_replayed", "uplinks stored but unpublished at the last stop, published at start",
                      c.replayed)
        yield counter("uplink_store_failures", "copies that could not be stored (answered with error)",
                      c.store_failures)
        yield counter("publish_failures", "uplink events the bus did not take durably", c.publish_failures)
        yield counter("connections", "base-station sessions accepted (con)", c.connections)
        yield counter("connections_refused", "con refused (revoked, certificate of another bsEui)", c.refused)
        yield counter("sessions_resumed", "sessions resumed (snResume) instead of starting afresh", c.resumed)
        yield counter("framing_errors", "connections closed for a framing error", stats.framing_errors)
        yield counter("invalid_messages", "messages that failed validation (answered with error)", stats.invalid)
        yield counter("operation_timeouts", "hub-initiated operations not answered in time", stats.op_timeouts)
        yield counter("ping_timeouts", "base stations dropped for not answering a ping", stats.ping_timeouts)
        ops = CounterMetricFamily(p + "operations", "BSSCI operations started, by command and initiator",
                                  labels=["command", "initiator"])
        for command, count in sorted(stats.received.items()):
            ops.add_metric([command, "bs"], count)
        for command, count in sorted(stats.sent.items()):
            ops.add_metric([command, "sc"], count)
        yield ops
        errors = CounterMetricFamily(p + "protocol_errors", "BSSCI error messages, by direction",
                                     labels=["direction"])
        errors.add_metric(["sent"], stats.errors_sent)
        errors.add_metric(["received"], stats.errors_received)
        yield errors
        yield GaugeMetricFamily(p + "connected_base_stations", "base stations with an established session",
                                value=sum(1 for s in service.sessions.values() if s.state is State.ESTABLISHED))
        yield GaugeMetricFamily(p + "propagations_pending", "attPrp/detPrp queued or in flight",
                                value=sum(s.propagation_pending for s in service.sessions.values()))
        yield GaugeMetricFamily(p + "uplinks_pending", "uplinks inside their dedup window", value=service.dedup.pending)
        yield GaugeMetricFamily(p + "sensors_attached", "attached end points",
                                value=sum(1 for s in service.registry.sensors.values() if s.attached))
        downlinks = service.downlink_queue
        pending = GaugeMetricFamily(p + "downlinks_pending", "downlinks not ended yet, by state", labels=["state"])
        held = Counter(d.state.value for d in downlinks.pending.values())
        for state in ("queued", "dispatched", "accepted", "expiring"):
            pending.add_metric([state], held[state])
        yield pending
        ended = CounterMetricFamily(p + "downlinks_ended", "downlinks that reached an end state, by state",
                                    labels=["state"])
        for state in ("sent", "expired", "invalid", "rejected", "revoked"):
            ended.add_metric([state], downlinks.ended[state])
        yield ended
        book = service.blueprints
        decoded = CounterMetricFamily(p + "blueprint_decodes", "uplinks of sensors with a Type EUI, by outcome",
                                      labels=["outcome"])
        decoded.add_metric(["decoded"], book.decoded)
        decoded.add_metric(["failed"], book.failed)
        yield decoded
        yield GaugeMetricFamily(p + "scaci_connections", "application centers connected over SCACI",
                                value=len(service.scaci.connections) if service.scaci is not None else 0)
        latency = c.latency
        yield HistogramMetricFamily(p + "dedup_latency_seconds", "first copy received to uplink event published",
                                    buckets=latency.buckets(), sum_value=latency.sum)
