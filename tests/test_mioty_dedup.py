"""Deduplication of uplink copies with a Clock: one event per uplink, late copies dropped with bounded
memory, one timer for all windows; and the uplink event payload built from the copies."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from bsscihub.protocols.bssci.dedup import FIRST, LATE, MERGED, Committing, Copy, Deduplicator, uplink_payload
from bsscihub.protocols.bssci.messages import Subpackets, UlData

EP = "0011223344556677"
RX = 1_700_000_000_123_000_000


def copy(bs: str, snr: float, received: float, cnt: int = 1, rx: int = RX, **over: Any) -> Copy:
    fields: dict[str, Any] = {
        "opId": 1, "epEui": int(EP, 16), "rxTime": rx, "packetCnt": cnt, "snr": snr, "rssi": -100.0 + snr,
        "userData": b"\x01\xab", "dlOpen": True, "responseExp": False, "dlAck": False, **over,
    }  # fmt: skip
    return Copy(bs, received, UlData(**fields))


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[tuple[str, int], list[Copy], float]] = []

    def __call__(self, key: tuple[str, int], copies: list[Copy], first: float) -> None:
        self.events.append((key, copies, first))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def sink() -> Sink:
    return Sink()


def test_copies_within_the_window_become_one_event(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 100, sink)
    assert dedup.add((EP, 1), copy("bs-a", 3.0, clock.seconds())) == FIRST
    clock.advance(0.3)
    assert dedup.add((EP, 1), copy("bs-b", 9.0, clock.seconds())) == MERGED
    assert dedup.add((EP, 2), copy("bs-a", 3.0, clock.seconds(), cnt=2)) == FIRST
    clock.advance(0.19)
    assert sink.events == []
    clock.advance(0.02)  # 0.5 s after the first copy, plus the sweep slack
    [(key, copies, first)] = sink.events
    assert key == (EP, 1) and [c.bs_eui for c in copies] == ["bs-a", "bs-b"] and first == 1000.0
    clock.advance(0.3)
    assert [e[0] for e in sink.events] == [(EP, 1), (EP, 2)]
    assert dedup.pending == 0


def test_a_window_waits_for_a_copy_received_inside_it_and_still_being_committed(clock: Clock, sink: Sink) -> None:
    # Commits slower than the window: A arrives, is committed 0.8 s later; B arrives 0.1 s after
    # A and waits for the next commit; C arrives after the window's end.
    committing = Committing(0.5, sink)
    dedup = Deduplicator(clock, 0.5, 100, committing.emit)
    key = (EP, 1)
    a = copy("bs-a", 3.0, clock.seconds())
    committing.receiving(key, a)
    clock.advance(0.1)
    b = copy("bs-b", 9.0, clock.seconds())
    committing.receiving(key, b)
    clock.advance(0.7)
    assert not committing.committed(key, a)
    assert dedup.add(key, a) == FIRST
    clock.advance(0.01)  # past A's window: the deduplicator closes it, B is still being committed
    assert dedup.pending == 0 and sink.events == []
    c = copy("bs-c", 1.0, clock.seconds())
    committing.receiving(key, c)
    clock.advance(0.8)
    assert committing.committed(key, b)  # joined the held window ...
    [(_, copies, first)] = sink.events  # ... which goes out without waiting for C, received too late
    assert [x.bs_eui for x in copies] == ["bs-a", "bs-b"] and first == 1000.0
    assert not committing.committed(key, c)
    assert dedup.add(key, c) == LATE and len(sink.events) == 1


def test_a_held_window_goes_out_when_its_last_copy_fails_or_at_stop(clock: Clock, sink: Sink) -> None:
    committing = Committing(0.5, sink)
    a, b = copy("bs-a", 3.0, clock.seconds()), copy("bs-b", 9.0, clock.seconds())
    for x in (a, b):
        committing.receiving((EP, 1), x)
    assert not committing.committed((EP, 1), a)
    committing.emit((EP, 1), [a], 1000.0)
    assert sink.events == []
    committing.failed((EP, 1), b)  # not stored, not acknowledged: the station sends it again
    assert [[x.bs_eui for x in e[1]] for e in sink.events] == [["bs-a"]]
    c, d = copy("bs-c", 3.0, clock.seconds(), cnt=2), copy("bs-d", 9.0, clock.seconds(), cnt=2)
    for x in (c, d):
        committing.receiving((EP, 2), x)
    assert not committing.committed((EP, 2), c)
    committing.emit((EP, 2), [c], 1000.0)
    committing.flush()
    assert [[x.bs_eui for x in e[1]] for e in sink.events] == [["bs-a"], ["bs-c"]]


def test_late_copy_is_dropped_and_counted_once(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 100, sink)
    dedup.add((EP, 1), copy("bs-a", 3.0, clock.seconds()))
    clock.advance(1)
    assert dedup.add((EP, 1), copy("bs-c", 1.0, clock.seconds(), rx=RX + 2_000_000)) == LATE
    clock.advance(600)  # much later, same transmission (buffered by a base station): still late
    assert dedup.add((EP, 1), copy("bs-d", 1.0, clock.seconds())) == LATE
    clock.advance(1)
    assert len(sink.events) == 1


def test_a_repeated_counter_with_another_rx_time_is_a_new_uplink(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 100, sink)
    dedup.add((EP, 1), copy("bs-a", 3.0, clock.seconds()))
    clock.advance(3600)
    # The sensor restarted and counts from 1 again, an hour later.
    assert dedup.add((EP, 1), copy("bs-a", 3.0, clock.seconds(), rx=RX + 3600 * 10**9)) == FIRST
    clock.advance(1)
    assert len(sink.events) == 2


def test_memory_is_bounded_and_forgets_the_oldest(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 3, sink)
    for cnt in range(1, 6):
        dedup.add((EP, cnt), copy("bs-a", 1.0, clock.seconds(), cnt=cnt))
    clock.advance(1)
    assert dedup.remembered == 3
    assert dedup.add((EP, 5), copy("bs-b", 1.0, clock.seconds(), cnt=5)) == LATE
    assert dedup.add((EP, 1), copy("bs-b", 1.0, clock.seconds(), cnt=1)) == FIRST  # forgotten


def test_remembered_keys_drop_late_copies_after_a_restart(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 10, sink)
    dedup.remember((EP, 7), RX)
    assert dedup.add((EP, 7), copy("bs-a", 1.0, clock.seconds(), cnt=7)) == LATE
    clock.advance(1)
    assert sink.events == []


def test_one_timer_serves_a_burst_of_windows(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 10_000, sink)
    for cnt in range(1000):
        dedup.add((EP, cnt), copy("bs-a", 1.0, clock.seconds(), cnt=cnt))
        clock.advance(0.0001)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.5)
    assert len(sink.events) == 1000
    assert [e[0][1] for e in sink.events] == list(range(1000))  # in arrival order
    assert clock.getDelayedCalls() == []


def test_flush_publishes_every_open_window(clock: Clock, sink: Sink) -> None:
    dedup = Deduplicator(clock, 0.5, 10, sink)
    dedup.add((EP, 1), copy("bs-a", 1.0, clock.seconds()))
    dedup.add((EP, 2), copy("bs-a", 1.0, clock.seconds(), cnt=2))
    dedup.flush()
    assert [e[0] for e in sink.events] == [(EP, 1), (EP, 2)]
    assert clock.getDelayedCalls() == []
    assert dedup.add((EP, 1), copy("bs-b", 1.0, clock.seconds())) == LATE


def test_uplink_payload_lists_receivers_best_snr_first() -> None:
    sub = Subpackets(snr=(1.0, 2.0), rssi=(-90.0, -91.0), frequency=(868_100_000, 868_200_000))
    copies = [
        copy("0000000000000001", 3.5, 1000.25),
        copy("0000000000000002", 11.0, 1000.4, mode="ulp", profile="eu1", eqSnr=14.0, subpackets=sub),
    ]
    payload = uplink_payload(EP, copies, 1000.25)
    assert payload == {
        "epEui": EP,
        "packetCnt": 1,
        "rxTime": RX,
        "time": "1970-01-01T00:16:40.250Z",
        "data": "01ab",
        "format": 0,
        "dlOpen": True,
        "responseExp": False,
        "dlAck": False,
        "receivers": [
            {"bsEui": "0000000000000002", "snr": 11.0, "rssi": -89.0, "eqSnr": 14.0, "rxTime": RX, "profile": "eu1",
             "mode": "ulp", "subpackets": {"snr": [1.0, 2.0], "rssi": [-90.0, -91.0],
                                           "frequency": [868_100_000, 868_200_000]}},
            {"bsEui": "0000000000000001", "snr": 3.5, "rssi": -96.5, "eqSnr": None, "rxTime": RX, "profile": None,
             "mode": None, "subpackets": None},
        ],
    }


def test_a_late_timer_does_not_hold_a_closed_window_open(clock: Clock, sink: Sink) -> None:
    # Under load the reactor runs timers late; the next arriving copy closes what is due.
    dedup = Deduplicator(clock, 0.5, 100, sink)
    dedup.add((EP, 1), copy("bs-a", 3.0, 1000.0))
    dedup.add((EP, 2), copy("bs-a", 3.0, 1000.4, cnt=2))
    dedup.sweep_due(1000.45)
    assert sink.events == []
    dedup.sweep_due(1000.5)  # the Clock has not moved: only the call closes the window
    assert [e[0] for e in sink.events] == [(EP, 1)] and dedup.pending == 1
    clock.advance(1.0)  # the timer fires too, and publishes nothing twice
    assert [e[0] for e in sink.events] == [(EP, 1), (EP, 2)] and dedup.pending == 0
