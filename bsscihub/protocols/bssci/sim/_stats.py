"""Counters and latency histograms of a simulation run, cheap to update on the hot path
and mergeable across worker processes (plain ints and sparse bucket maps)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import attrs

__all__ = ["Counters", "Histogram"]

_MIN = 1e-6  # 1 µs: the first bucket holds everything below
_RATIO = 1.02  # bucket width: percentiles are exact to about ±1 %
_INV_LOG_RATIO = 1.0 / math.log(_RATIO)
_BUCKETS = int(math.log(1000.0 / _MIN) * _INV_LOG_RATIO) + 2  # up to 1000 s


@attrs.define
class Histogram:
    """Log-bucketed latencies in seconds; a bucket reports its geometric middle."""

    counts: list[int] = attrs.field(factory=lambda: [0] * _BUCKETS, repr=False)
    total: int = 0

    def record(self, seconds: float) -> None:
        if seconds > _MIN:
            i = int(math.log(seconds / _MIN) * _INV_LOG_RATIO)
            if i >= _BUCKETS:
                i = _BUCKETS - 1
        else:
            i = 0
        self.counts[i] += 1
        self.total += 1

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), or None without samples."""
        if not self.total:
            return None
        rank = max(1, math.ceil(self.total * q / 100.0))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return float(_MIN * _RATIO ** (i + 0.5))
        raise AssertionError("unreachable: rank exceeds total")

    def merge(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            if count:
                self.counts[i] += count
        self.total += other.total

    def sparse(self) -> dict[int, int]:
        """Non-empty buckets only: what crosses process boundaries and goes into JSON."""
        return {i: c for i, c in enumerate(self.counts) if c}

    @classmethod
    def from_sparse(cls, buckets: dict[Any, int]) -> Histogram:
        h = cls()
        for i, count in buckets.items():
            h.counts[int(i)] += count
            h.total += count
        return h


@attrs.define
class Counters:
    """Cumulative counts of one worker (or, merged, of a whole run)."""

    connects: int = 0  # conRsp received and conCmp sent
    disconnects: int = 0  # connections lost that we did not close
    connect_failures: int = 0  # TCP or TLS never came up
    ul_sent: int = 0  # ulData copies sent
    ul_completed: int = 0  # ulDataRsp received and ulDataCmp sent
    ul_errors: int = 0  # `error` received instead of ulDataRsp
    ul_lost: int = 0  # copies in flight or queued when their connection dropped
    ul_skipped: int = 0  # copies not offered: base station offline or its queue full
    unique_generated: int = 0  # distinct (epEui, packetCnt) created
    unique_acked: int = 0  # ... of which at least one copy got its ulDataRsp
    att_prp: int = 0  # attPrp answered with attPrpRsp
    det_prp: int = 0
    sc_ops: int = 0  # SC-initiated operations answered (attPrp included)
    sc_completed: int = 0  # ... and closed by the SC with Cmp or errorAck
    errors_received: int = 0  # `error` messages from the SC, any operation
    errors_sent: int = 0  # `error` we sent (invalid or unsupported SC messages)
    dl_queued: int = 0  # dlDataQue kept until an uplink of its sensor
    dl_revoked: int = 0  # ... removed by dlDataRev before that
    dl_forgotten: int = 0  # ... dropped, as base stations do, by an attPrp for its sensor or a new session
    dl_sent: int = 0  # ... sent with an uplink (dlOpen), to be reported "sent" in dlDataRes
    dl_expired: int = 0  # ... whose counters (cntDepend) all passed, to be reported "expired"
    dl_reported: int = 0  # dlDataRes answered with dlDataResRsp and completed
    dl_errors: int = 0  # `error` received instead of dlDataResRsp
    dl_acked: int = 0  # uplinks acknowledging the downlink their sensor got with the one before (dlAck)
    pings_sent: int = 0
    pings_answered: int = 0
    ping_timeouts: int = 0
    # Protocol rules the SC broke, by short description (opId order, unknown opIds...).
    anomalies: Counter[str] = attrs.field(factory=Counter)

    def add(self, other: Counters) -> None:
        for field in attrs.fields(Counters):
            if field.name == "anomalies":
                self.anomalies.update(other.anomalies)
            else:
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["anomalies"] = dict(self.anomalies)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        values = dict(d)
        values["anomalies"] = Counter(values.get("anomalies", {}))
        return cls(**values)
