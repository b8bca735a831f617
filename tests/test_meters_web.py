"""The meter routes: REST under /api/v1/mioty/meters and the admin pages, over the real Variable-MAC component
(its database and key sealing); readings come in as the service would publish them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.dedup import Copy
from bsscihub.protocols.bssci.meters_web import meter_points, numeric_fields
from tests.test_web_support import Harness, harness_fixture
from tests.wmbus_frames import KEY, mode5_frame

METER = "dme-12345678"


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


async def hear(h: Harness, frame: bytes, when: float, bs: str = "70b3d59cd0000001") -> None:
    """A frame as the service publishes it once its dedup window closed (stored, decoded, recorded)."""
    msg = m.VmUlData(opId=1, macType=1, userData=frame, sysTime=int(when * 1e9), snr=7.5, rssi=-101.0)
    await h.mioty.vm._emit(("k", 1), [Copy(bs, when, msg)], when, [])  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_keys_go_in_and_never_come_out(harness: Harness) -> None:
    h = harness
    assert (await h.request("PUT", f"/api/v1/mioty/meters/{METER}/key", role="viewer",
                            json_body={"key": KEY.hex()})).code == 403
    reply = await h.request("PUT", f"/api/v1/mioty/meters/{METER}/key", role="operator",
                            json_body={"key": KEY.hex(), "name": "cellar"})
    assert reply.code == 200, reply.body
    assert reply.json()["hasKey"] is True and reply.json()["name"] == "cellar"
    assert KEY.hex() not in reply.body.decode()
    reply = await h.request("PUT", f"/api/v1/mioty/meters/{METER}/key", role="operator", json_body={"key": "12"})
    assert reply.code == 400 and "32 hex digits" in reply.error["message"]
    reply = await h.request("PUT", "/api/v1/mioty/meters/dme-1234/key", role="operator", json_body={"key": KEY.hex()})
    assert reply.code == 400
    await hear(h, mode5_frame(), 1_700_000_100.0)
    await hear(h, mode5_frame(acc=0x2B, records=bytes.fromhex("0c1399999999")), 1_700_000_200.0)
    got = (await h.request("GET", f"/api/v1/mioty/meters/{METER}", role="viewer")).json()
    assert got["medium"] == "water" and got["lastReading"]["values"] == {"volume": 99999.999}
    assert "key" not in got and KEY.hex() not in str(got)
    readings = (await h.request("GET", f"/api/v1/mioty/meters/{METER}/readings?limit=1", role="viewer")).json()
    assert [r["values"]["volume"] for r in readings["items"]] == [99999.999]
    dashboard = (await h.request("GET", "/api/v1/dashboard", role="viewer")).json()
    assert dashboard["counts"]["mioty.meters"] == {"label": "Meters", "value": 1, "href": "/mioty/meters"}
    listed = (await h.request("GET", "/api/v1/mioty/meters?q=cell", role="viewer")).json()
    assert [x["meter"] for x in listed["items"]] == [METER] and listed["total"] == 1
    audit = (await h.request("GET", "/api/v1/audit?action=mioty.meter.key_set", role="admin")).json()
    assert audit["items"] and KEY.hex() not in str(audit)
    assert (await h.request("DELETE", f"/api/v1/mioty/meters/{METER}/key", role="operator")).json()["hasKey"] is False
    assert (await h.request("GET", "/api/v1/mioty/meters/abc-00000000", role="viewer")).code == 404
    reply = await h.request("POST", f"/api/v1/mioty/meters/{METER}/downlinks", role="operator",
                            json_body={"data": "cafe"})
    assert reply.code == 202 and reply.json()["status"] == "queued"
    assert (await h.request("POST", "/api/v1/mioty/meters/abc-00000000/downlinks", role="operator",
                            json_body={"data": "cafe"})).code == 404
    assert (await h.request("DELETE", f"/api/v1/mioty/meters/{METER}", role="operator")).code == 204
    assert (await h.request("GET", f"/api/v1/mioty/meters/{METER}", role="viewer")).code == 404


@pytest_twisted.ensureDeferred
async def test_the_meter_page_charts_a_chosen_field(harness: Harness) -> None:
    h = harness
    await h.mioty.vm.set_meter_key(METER, KEY.hex())
    for i, volume in enumerate(("00000010", "00000020")):
        records = bytes.fromhex("0c13" + bytes.fromhex(volume)[::-1].hex() + "025a1201")
        await hear(h, mode5_frame(acc=i, records=records), 1_700_000_000.0 + 60 * i)
    cookies, _ = await h.login("viewer")
    page = await h.request("GET", f"/mioty/meters/{METER}?field=flow_temperature", cookies=cookies)
    assert page.code == 200
    html = page.body.decode()
    assert '<option value="flow_temperature" selected>' in html and "data-chart=\"lines\"" in html
    assert '"v":[27.4]' in html and "values.flow_temperature" in html
    assert "Set key" not in html  # a viewer cannot
    listing = await h.request("GET", "/mioty/meters", cookies=cookies)
    assert METER in listing.body.decode()
    cookies, csrf = await h.login("operator")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await h.request("POST", f"/mioty/meters/{METER}/key", cookies=cookies, headers=form,
                            data=f"_csrf={csrf}&key={'00' * 16}&name=garden")
    assert reply.code == 303 and (reply.header("Location") or "").startswith(f"/mioty/meters/{METER}")
    assert (await h.mioty.vm.get_meter(METER))["name"] == "garden"
    reply = await h.request("POST", f"/mioty/meters/{METER}/key", cookies=cookies, headers=form,
                            data=f"_csrf={csrf}&key=zz")
    page = await h.request("GET", reply.header("Location") or "", cookies=cookies)
    assert b"key: expected 32 hex digits" in page.body
    page = await h.request("GET", f"/mioty/meters/{METER}", cookies=cookies)
    assert b"Set key" in page.body and b"Remove key" in page.body


def test_numeric_fields_and_points() -> None:
    readings: list[dict[str, Any]] = [
        {"time": "2026-12-07T10:00:00Z", "values": {"volume": 2.5, "date": "2026-12-01"},
         "records": [{"field": "volume", "value": 2.5, "unit": "m3"}, {"field": "date", "value": "2026-12-01"}]},
        {"time": "2026-12-07T09:00:00Z", "values": {"volume": 2.0}, "records": []},
    ]
    assert numeric_fields(readings) == [("volume", "m3")]
    points = meter_points(readings, "volume")
    assert [p["v"] for p in points] == [[2.0], [2.5]] and points[0]["t"] < points[1]["t"]
