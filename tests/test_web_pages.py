"""The admin pages through StubTreq: every page renders for its role, without inline script, escaped, with forms.

Forms post to the same handlers as the API; these tests follow a few of them end to end.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from bsscihub import audit, pki
from bsscihub.bus import Event
from tests.test_web_support import Harness, harness_fixture

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
EUI = "0011223344556677"
KEY = "000102030405060708090a0b0c0d0e0f"


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


def assert_no_inline_code(html: str, path: str) -> None:
    """What the CSP would block anyway; catching it here gives a readable failure."""
    for script in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in script, (path, script)
    assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html), path
    assert not re.search(r"\son[a-z]+\s*=", html), path
    assert not re.search(r"\sstyle\s*=", html), path
    assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", html), path  # no CDN: works offline


@pytest_twisted.ensureDeferred
async def test_every_page_renders_for_its_role(harness: Harness) -> None:
    h = harness
    tls = h.hub.config.tls
    pki.create_ca(tls.ca, tls.ca_key)
    await h.mioty.attach(EUI, KEY, "1a2b", True, actor="t")
    h.mioty.uplinks[EUI] = [{"epEui": EUI, "packetCnt": 7, "time": "2025-01-01T00:00:00Z", "rxTime": 1735689600 * 10**9,
                             "data": "00ff", "receivers": [{"bsEui": "70b3d59cd0000001", "rssi": -97.5, "snr": 4.25}]}]
    await h.mioty.vm.set_meter_key("dme-81795246", "00" * 16)  # the meter page's example renders
    sessions = {role: await h.login(role) for role in ("viewer", "operator", "admin")}
    pages = [b.route for b in h.web.routes if b.route.kind == "page" and b.route.method == "GET" and b.route.role]
    assert len(pages) == 15
    for route in pages:
        path = route.example_path().replace("0011223344556677", EUI)
        cookies, _ = sessions[route.role or "viewer"]
        reply = await h.request("GET", path, cookies=cookies)
        assert reply.code in (200, 404), (path, reply.code, reply.body[:300])
        html = reply.body.decode()
        assert reply.header("Content-Type") == "text/html; charset=utf-8"
        assert_no_inline_code(html, path)
        assert '<meta name="viewport"' in html and "/static/app.css" in html
    sensor = await h.request("GET", f"/mioty/sensors/{EUI}", cookies=sessions["viewer"][0])
    assert b"-97.5" in sensor.body and b"Queue a downlink" not in sensor.body  # viewers see, do not act
    operator = await h.request("GET", f"/mioty/sensors/{EUI}", cookies=sessions["operator"][0])
    assert b"Queue a downlink" in operator.body
    assert KEY.encode() not in operator.body
    # Decoded values: the last ones listed, any numeric one charted when chosen on the page.
    h.mioty.uplinks[EUI].append({
        "epEui": EUI, "packetCnt": 8, "time": "2025-01-01T00:10:00Z", "rxTime": 1735690200 * 10**9, "data": "0ba5",
        "receivers": [{"bsEui": "70b3d59cd0000001", "rssi": -96.0, "snr": 5.0}], "typeEui": "70b3d5677000a001",
        "decoded": {"temperature": {"value": 24.95, "unit": "°C"}, "door": {"value": True}}})
    charted = (await h.request("GET", f"/mioty/sensors/{EUI}?field=temperature", cookies=sessions["viewer"][0]))
    html = charted.body.decode()
    assert 'value="temperature" selected' in html and "24.95 °C" in html and 'value="door"' not in html
    assert "decoded.temperature.value" in html  # the chart's series follows the chosen field
    await h.mioty.blueprints.add((Path(__file__).parent / "data" / "blueprints" / "climate.json").read_text(), "t")
    listed = (await h.request("GET", "/mioty/blueprints", cookies=sessions["operator"][0])).body.decode()
    assert "70b3d5677000a001" in listed and "Indoor climate sensor" in listed and 'name="file"' in listed


@pytest_twisted.ensureDeferred
async def test_untrusted_text_is_escaped(harness: Harness) -> None:
    h = harness
    cookies, _ = await h.login("admin")
    await audit.record(h.hub.store, "<script>alert(1)</script>", "x", "<img src=x onerror=alert(1)>", {}, "")
    h.web.start()
    h.hub.bus.publish(Event("mioty", "up", "mioty/ep/x/up", {"data": "</td><script>alert(2)</script>"}))
    for path in ("/audit", "/"):
        html = (await h.request("GET", path, cookies=cookies)).body.decode()
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;" in html or "\\u003cscript" in html, path


@pytest_twisted.ensureDeferred
async def test_add_sensor_then_downlink_through_the_forms(harness: Harness) -> None:
    h = harness
    cookies, csrf = await h.login("operator")
    reply = await h.request("POST", "/mioty/sensors", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}&eui={EUI.upper()}&nwKey={KEY}&shortAddr=1A2B&bidi=on")
    assert (reply.code, reply.header("Location")) == (303, f"/mioty/sensors/{EUI}")
    page = await h.request("GET", f"/mioty/sensors/{EUI}", cookies=cookies)
    assert b"added and attached" in page.body  # the flash, shown once
    assert b"added and attached" not in (await h.request("GET", f"/mioty/sensors/{EUI}", cookies=cookies)).body
    reply = await h.request("POST", f"/mioty/sensors/{EUI}/downlink", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}&data=zz")
    page = await h.request("GET", reply.header("Location") or "", cookies=cookies)
    assert b"data: expected an even number of hex digits" in page.body
    await h.request("POST", f"/mioty/sensors/{EUI}/downlink", cookies=cookies, headers=FORM,
                    data=f"_csrf={csrf}&data=01ab&format=2")
    assert h.mioty.queued == [(EUI, b"\x01\xab", {"format": 2, "actor": "operator"})]
    page = await h.request("GET", f"/mioty/sensors/{EUI}", cookies=cookies)
    assert f'action="/mioty/sensors/{EUI}/downlinks/1/revoke"'.encode() in page.body
    reply = await h.request("POST", f"/mioty/sensors/{EUI}/downlinks/1/revoke", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}")
    page = await h.request("GET", reply.header("Location") or "", cookies=cookies)
    assert b"downlink 1 withdrawn" in page.body and h.mioty.calls[-1] == ("revoke_downlink", (EUI, 1, "operator"))
    reply = await h.request("POST", f"/mioty/sensors/{EUI}/dl-rx-status", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}")
    assert reply.code == 303 and h.mioty.calls[-1] == ("dl_rx_status", EUI)
    entries, _ = await audit.query(h.hub.store, target=EUI)
    assert [(e.action, e.actor) for e in entries] == [("mioty.sensor.downlink_revoke", "operator"),
                                                      ("mioty.sensor.downlink", "operator"),
                                                      ("mioty.sensor.create", "operator")]


@pytest_twisted.ensureDeferred
async def test_new_api_key_is_shown_once(harness: Harness) -> None:
    h = harness
    cookies, csrf = await h.login("viewer")
    reply = await h.request("POST", "/account/keys", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}&name=laptop&expiresInDays=7")
    assert reply.header("Location") == "/account"
    first = (await h.request("GET", "/account", cookies=cookies)).body.decode()
    secret = re.search(r"bsh_[0-9a-f]{12}_[A-Za-z0-9_-]+", first)
    assert secret is not None and "laptop" in first
    assert (await h.request("GET", "/api/v1/auth/me", token=secret.group(0))).json()["user"] == "viewer"
    again = (await h.request("GET", "/account", cookies=cookies)).body.decode()
    assert secret.group(0) not in again


@pytest_twisted.ensureDeferred
async def test_issue_certificate_download_from_the_page(harness: Harness) -> None:
    h = harness
    tls = h.hub.config.tls
    pki.create_ca(tls.ca, tls.ca_key)
    cookies, csrf = await h.login("admin")
    form = (await h.request("GET", "/certificates", cookies=cookies)).body.decode()
    # the families' binding kinds are offered, not a base-station EUI of the core's own
    assert '<option value="bssci.station">a base station (BSSCI)</option>' in form
    assert '<option value="scaci.ac">a mioty application center (SCACI)</option>' in form
    reply = await h.request("POST", "/certificates", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}&name=bs-1&kind=&subject=&days=30&format=pem")
    assert reply.code == 201 and reply.header("Content-Disposition") == 'attachment; filename="bs-1-bundle.pem"'
    reply = await h.request("POST", "/certificates", cookies=cookies, headers=FORM,
                            data=f"_csrf={csrf}&name=bs-2&kind=bssci.station&subject=70B3D59CD0000002&format=pem")
    assert reply.code == 201
    reply = await h.request("POST", "/certificates", cookies=cookies, headers=FORM, data=f"_csrf={csrf}&name=../x")
    assert reply.code == 303
    page = await h.request("GET", "/certificates", cookies=cookies)
    assert b"name: expected 1-64 letters" in page.body and b"bs-1" in page.body
    assert b'bssci.station</span> <span class="mono">70b3d59cd0000002' in page.body


@pytest_twisted.ensureDeferred
async def test_wrong_role_and_unknown_pages(harness: Harness) -> None:
    cookies, _ = await harness.login("viewer")
    reply = await harness.request("GET", "/users", cookies=cookies)
    assert reply.code == 403 and b"needs the admin role" in reply.body
    reply = await harness.request("GET", "/nowhere", cookies=cookies)
    assert reply.code == 404 and b"no such page" in reply.body
    page = (await harness.request("GET", "/", cookies=cookies)).body
    nav = page.split(b'<nav class="sidebar"')[1].split(b"</nav>")[0]
    assert b'href="/mioty/sensors"' in nav  # the menu shows what one may use ...
    assert b'href="/users"' not in nav and b'href="/users"' not in page  # ... and nothing else links there
