"""The network view: which base stations heard which sensors and meters, with link quality, from the stored copies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from bsscihub.protocols.bssci.network import quality
from tests.test_web_support import Harness, harness_fixture

A, B = "00000000000000aa", "00000000000000bb"
EP, METER = "0011223344556677", "dme-12345678"


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


def test_quality_classes() -> None:
    assert [quality(s) for s in (None, -5.0, 0.0, 9.9, 10.0, 25.0)] == ["none", "poor", "fair", "fair", "good",
                                                                       "good"]


async def _fill(store: Any, now: float) -> None:
    rows = [  # bs, seconds ago, snr, rssi
        (A, 100.0, 12.0, -90.0), (A, 90.0, 14.0, -88.0), (B, 90.0, -3.0, -120.0),
        (B, 40 * 86400.0, 30.0, -50.0),  # older than any window
    ]
    for i, (bs, ago, snr, rssi) in enumerate(rows):
        await store.execute(
            "INSERT INTO mioty_uplinks (ep_eui, packet_cnt, bs_eui, received, rx_time, snr, rssi, data, format,"
            " dl_open, response_exp, dl_ack) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0)",
            (EP, i, bs, now - ago, int((now - ago) * 1e9), snr, rssi, b"\x01"))
    reading = {"receivers": [{"bsEui": B, "snr": 5.5, "rssi": -101.0}]}
    for payload in (json.dumps(reading), "not json", json.dumps({"receivers": [{"bsEui": B, "snr": None}]})):
        await store.execute("INSERT INTO mioty_meter_readings (meter, received, payload) VALUES (?, ?, ?)",
                            (METER, now - 50, payload))


@pytest_twisted.ensureDeferred
async def test_coverage_by_rest_and_on_the_page(harness: Harness) -> None:
    h = harness
    await _fill(h.hub.store, reactor.seconds())
    reply = await h.request("GET", "/api/v1/mioty/network?hours=24", role="viewer")
    assert reply.code == 200
    result = reply.json()
    links = {(link["device"], link["bsEui"]): link for link in result["links"]}
    a = links[(EP, A)]
    assert (a["kind"], a["count"], a["snr"], a["rssi"], a["bestSnr"], a["quality"]) == ("sensor", 2, 13.0, -89.0,
                                                                                        14.0, "good")
    b = links[(EP, B)]
    assert (b["count"], b["snr"], b["quality"]) == (1, -3.0, "poor")  # the old copy is outside the window
    meter = links[(METER, B)]
    assert (meter["kind"], meter["count"], meter["snr"], meter["quality"]) == ("meter", 1, 5.5, "fair")
    assert [(s["bsEui"], s["state"], s["devices"]) for s in result["baseStations"]] == [(A, "offline", 1),
                                                                                        (B, "offline", 2)]
    assert (await h.request("GET", "/api/v1/mioty/network?hours=0", role="viewer")).code == 400
    cookies, _ = await h.login("viewer")
    page = (await h.request("GET", "/mioty/network", cookies=cookies)).body.decode()
    assert 'id="network-table"' in page and f'data-device="{EP}"' in page and f'data-device="{METER}"' in page
    assert 'data-quality="good"' in page and 'data-quality="poor"' in page and "13.0 dB" in page
