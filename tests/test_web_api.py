"""REST API routes without sockets (StubTreq): the role table on every route, precise errors, resources, audit.

The permission test walks the route table itself, so a route added later is checked without editing it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from bsscihub import audit, pki
from bsscihub.bus import Event
from bsscihub.family import installed_families
from bsscihub.protocols.bssci.identity import BINDINGS
from bsscihub.users import RANK
from bsscihub.web.routing import Route
from tests.test_web_support import ROLES, Harness, build_harness, fast_hashing, harness_fixture

EUI = "0011223344556677"
KEY = "000102030405060708090a0b0c0d0e0f"


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from harness_fixture(tmp_path, monkeypatch)


def lower_roles(route: Route) -> list[str]:
    return [r for r in ROLES if RANK[r] < RANK[route.role]] if route.role else []


async def session_for(h: Harness, role: str) -> tuple[dict[str, str], str]:
    return await h.login(role)


@pytest_twisted.ensureDeferred
async def test_every_route_refuses_anonymous_and_lower_roles(tmp_path: Path, monkeypatch: Any) -> None:
    """Every declared route of every installed family: anonymous 401 (pages: to the login), lower roles 403."""
    fast_hashing(monkeypatch)
    # Hundreds of requests from one address at one instant: the rate limits are not what this test is about.
    h = await build_harness(tmp_path, families=tuple(installed_families()),
                            web={"rate_limit": 0, "anonymous_rate_limit": 0})
    try:
        sessions = {role: await session_for(h, role) for role in ROLES}
        checked = 0
        for bound in h.web.routes:
            route = bound.route
            if route.role is None:
                continue
            path = route.example_path()
            h.clock.advance(1.0)  # a second between routes: the anonymous requests stay under the rate limit
            anonymous = await h.request(route.method, path)
            if route.kind == "api":
                assert anonymous.code == 401, (route.method, path, anonymous.code)
                assert anonymous.error["code"] == "unauthorized"
            else:
                assert anonymous.code == 303, (route.method, path, anonymous.code)
                assert (anonymous.header("Location") or "").startswith("/login")
            for role in lower_roles(route):
                if route.kind == "api":
                    reply = await h.request(route.method, path, role=role)
                else:
                    cookies, csrf = sessions[role]
                    reply = await h.request(route.method, path, cookies=cookies, headers={"X-CSRF-Token": csrf})
                assert reply.code == 403, (route.method, path, role, reply.code, reply.body[:200])
            checked += 1
        assert checked > 60
    finally:
        h.web.stop()
        await h.hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_the_right_role_gets_through(harness: Harness) -> None:
    """Core and mioty routes: the declared role (and admin) are never refused for their role."""
    tls = harness.hub.config.tls
    pki.create_ca(tls.ca, tls.ca_key)
    sessions = {role: await session_for(harness, role) for role in ROLES}
    for bound in harness.web.routes:
        route = bound.route
        if route.role is None or route.path in ("/logout", "/api/v1/auth/logout"):
            continue
        for role in (route.role, "admin"):
            if route.kind == "api":
                body = route.body_example
                reply = await harness.request(route.method, route.example_path(), role=role, json_body=body)
            else:
                cookies, csrf = sessions[role]
                reply = await harness.request(route.method, route.example_path(), cookies=cookies,
                                              headers={"X-CSRF-Token": csrf})
            assert reply.code not in (401, 403), (route.method, route.path, role, reply.code, reply.body[:300])
            assert reply.code < 500, (route.method, route.path, role, reply.body[:300])


def test_only_logging_in_and_the_api_document_are_anonymous(harness: Harness) -> None:
    anonymous = {(b.route.method, b.route.path) for b in harness.web.routes if b.route.role is None}
    assert anonymous == {
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/auth/token"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/login"),
        ("POST", "/login"),
    }


# -- precise errors


@pytest_twisted.ensureDeferred
async def test_bad_bodies_get_precise_errors(harness: Harness) -> None:
    h = harness
    reply = await h.request("POST", "/api/v1/users", role="admin", data="{not json",
                            headers={"Content-Type": "application/json"})
    assert (reply.code, reply.error["code"]) == (400, "bad_json")

    reply = await h.request("POST", "/api/v1/users", role="admin", data="name=x",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (reply.code, reply.error["code"]) == (415, "unsupported_media_type")

    reply = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "zoe"})
    assert (reply.code, reply.error["field"]) == (400, "role")
    assert reply.error["message"] == "role: missing"

    reply = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "zoe", "role": "boss"})
    assert reply.error["field"] == "role" and "admin, operator, viewer" in reply.error["message"]

    reply = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "zoe", "role": "viewer",
                                                                             "colour": "blue"})
    assert (reply.code, reply.error["field"]) == (400, "colour")

    reply = await h.request("POST", "/api/v1/users", role="admin", json_body=["zoe"])
    assert (reply.code, reply.error["code"]) == (400, "invalid_body")

    reply = await h.request("POST", "/api/v1/mioty/sensors", role="operator",
                            json_body={"eui": EUI, "nwKey": "xyz", "shortAddr": "1a2b", "bidi": True})
    assert reply.error == {"code": "invalid_field", "field": "nwKey", "message": "nwKey: expected 32 hex digits"}

    reply = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "x" * 70_000, "role": "viewer"})
    assert (reply.code, reply.error["code"]) == (413, "body_too_large")

    reply = await h.request("POST", "/api/v1/users", role="admin")
    assert (reply.code, reply.error["code"]) == (400, "missing_body")

    reply = await h.request("GET", "/api/v1/users?limit=0", role="admin")
    assert (reply.code, reply.error["field"]) == (400, "limit")
    reply = await h.request("GET", "/api/v1/users?limit=ten", role="admin")
    assert reply.error["message"] == "limit: expected a whole number"

    reply = await h.request("GET", "/api/v1/no/such/thing", role="admin")
    assert (reply.code, reply.error["code"]) == (404, "not_found")
    reply = await h.request("PUT", "/api/v1/users", role="admin", json_body={})
    assert (reply.code, reply.error["code"]) == (405, "method_not_allowed")

    reply = await h.request("GET", "/api/v1/users", token="bsh_000000000000_nope")
    assert (reply.code, reply.error["code"]) == (401, "unauthorized")
    assert reply.header("WWW-Authenticate", ) is not None
    reply = await h.request("GET", "/api/v1/users", headers={"Authorization": "Basic YWRtaW46eA=="})
    assert reply.code == 401 and "Bearer" in reply.error["message"]


@pytest_twisted.ensureDeferred
async def test_users_lifecycle_is_audited(harness: Harness) -> None:
    h = harness
    reply = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "zoe", "role": "operator"})
    assert reply.code == 201
    generated = reply.json()["password"]
    assert len(generated) >= 15 and reply.header("Location") == "/api/v1/users/zoe"
    again = await h.request("POST", "/api/v1/users", role="admin", json_body={"name": "zoe", "role": "viewer"})
    assert again.code == 409

    listed = (await h.request("GET", "/api/v1/users?role=operator", role="admin")).json()
    assert [u["name"] for u in listed["items"]] == ["operator", "zoe"] and listed["total"] == 2
    page = (await h.request("GET", "/api/v1/users?limit=1&offset=1", role="admin")).json()
    assert (page["total"], len(page["items"]), page["items"][0]["name"]) == (4, 1, "operator")

    reply = await h.request("PATCH", "/api/v1/users/zoe", role="admin", json_body={"role": "viewer",
                                                                                 "password": "another-secret"})
    assert reply.json()["role"] == "viewer"
    assert (await h.request("DELETE", "/api/v1/users/zoe", role="admin")).code == 204
    assert (await h.request("GET", "/api/v1/users/zoe", role="admin")).code == 404

    entries, _ = await audit.query(h.hub.store, target="zoe")
    assert [(e.actor, e.action, e.source) for e in reversed(entries)] == [
        ("admin", "user.add", "127.0.0.1"),
        ("admin", "user.update", "127.0.0.1"),
        ("admin", "user.delete", "127.0.0.1"),
    ]
    update = entries[1]
    assert update.detail == {"role": "viewer", "password": "changed"}
    assert "another-secret" not in str([e.to_json() for e in entries])


@pytest_twisted.ensureDeferred
async def test_the_last_admin_cannot_be_removed(harness: Harness) -> None:
    reply = await harness.request("DELETE", "/api/v1/users/admin", role="admin")
    assert reply.code == 409 and "last enabled admin" in reply.error["message"]
    reply = await harness.request("PATCH", "/api/v1/users/admin", role="admin", json_body={"role": "viewer"})
    assert reply.code == 409


@pytest_twisted.ensureDeferred
async def test_audit_log_filters_and_pages(harness: Harness) -> None:
    h = harness
    store = h.hub.store
    for i in range(5):
        await audit.record(store, "alice", "user.add", f"u{i}", {}, "10.0.0.1")
    await audit.record(store, "bob", "cert.revoke", "1a2b", {"reason": "lost"}, "10.0.0.2")
    reply = (await h.request("GET", "/api/v1/audit?actor=alice&limit=2&offset=1", role="admin")).json()
    assert reply["total"] == 5 and [e["target"] for e in reply["items"]] == ["u3", "u2"]
    reply = (await h.request("GET", "/api/v1/audit?action=cert.", role="admin")).json()
    assert [(e["actor"], e["detail"]) for e in reply["items"]] == [("bob", {"reason": "lost"})]
    assert (await h.request("GET", "/api/v1/audit?target=u4", role="admin")).json()["total"] == 1
    assert (await h.request("GET", "/api/v1/audit?since=2999-01-01", role="admin")).json()["total"] == 0
    assert (await h.request("GET", "/api/v1/audit?until=2000-01-01T00:00:00Z", role="admin")).json()["total"] == 0
    reply = await h.request("GET", "/api/v1/audit?since=yesterday", role="admin")
    assert (reply.code, reply.error["field"]) == (400, "since")


# -- mioty routes over the family service


@pytest_twisted.ensureDeferred
async def test_sensor_routes(harness: Harness) -> None:
    h, fake = harness, harness.mioty
    body = {"eui": EUI.upper(), "nwKey": KEY, "shortAddr": "1A2B", "bidi": True}
    reply = await h.request("POST", "/api/v1/mioty/sensors", role="operator", json_body=body)
    assert reply.code == 201 and reply.json()["epEui"] == EUI
    assert "nwKey" not in reply.json()  # the key goes in, never out
    assert fake.calls[-1] == ("attach", (EUI, "operator"))
    assert (await h.request("POST", "/api/v1/mioty/sensors", role="operator", json_body=body)).code == 409
    for i in range(3):
        await fake.attach(f"00000000000000{i:02x}", KEY, "0001", False, actor="t")

    page = (await h.request("GET", "/api/v1/mioty/sensors?limit=2", role="viewer")).json()
    assert page["total"] == 4 and len(page["items"]) == 2
    assert all("nwKey" not in s for s in page["items"])
    found = (await h.request("GET", "/api/v1/mioty/sensors?q=4455", role="viewer")).json()
    assert [s["epEui"] for s in found["items"]] == [EUI]
    assert "nwKey" not in (await h.request("GET", f"/api/v1/mioty/sensors/{EUI}", role="viewer")).json()
    assert (await h.request("GET", "/api/v1/mioty/sensors/ffffffffffffffff", role="viewer")).code == 404
    reply = await h.request("GET", "/api/v1/mioty/sensors/nothex", role="viewer")
    assert (reply.code, reply.error["field"]) == (400, "eui")

    reply = await h.request("POST", f"/api/v1/mioty/sensors/{EUI}/downlinks", role="operator",
                            json_body={"data": "01A2ff", "format": 3})
    assert reply.code == 202 and fake.queued[-1][1] == bytes.fromhex("01a2ff")
    reply = await h.request("POST", f"/api/v1/mioty/sensors/{EUI}/downlinks", role="operator",
                            json_body={"data": "abc"})
    assert reply.error["field"] == "data"
    downs = (await h.request("GET", f"/api/v1/mioty/sensors/{EUI}/downlinks", role="viewer")).json()
    assert downs["items"] == [{"queId": 1, "data": "01a2ff", "format": 3, "status": "accepted"}]
    one = await h.request("GET", f"/api/v1/mioty/sensors/{EUI}/downlinks/1", role="viewer")
    assert (one.code, one.json()) == (200, downs["items"][0])
    assert (await h.request("GET", f"/api/v1/mioty/sensors/{EUI}/downlinks/9", role="viewer")).code == 404
    reply = await h.request("POST", "/api/v1/mioty/sensors/0000000000000001/downlinks", role="operator",
                            json_body={"data": "00"})
    assert (reply.code, reply.error["code"]) == (409, "rejected")  # CommandError from the service
    reply = await h.request("DELETE", f"/api/v1/mioty/sensors/{EUI}/downlinks/1", role="operator")
    assert (reply.code, reply.json()["status"]) == (200, "revoked")
    assert fake.calls[-1] == ("revoke_downlink", (EUI, 1, "operator"))
    assert (await h.request("DELETE", f"/api/v1/mioty/sensors/{EUI}/downlinks/7", role="operator")).code == 409
    reply = await h.request("DELETE", f"/api/v1/mioty/sensors/{EUI}/downlinks/x", role="operator")
    assert (reply.code, reply.error["field"]) == (400, "queId")
    reply = await h.request("POST", f"/api/v1/mioty/sensors/{EUI}/dl-rx-status", role="operator")
    assert reply.code == 202 and fake.calls[-1] == ("dl_rx_status", EUI)

    fake.uplinks[EUI] = [{"epEui": EUI, "packetCnt": n, "receivers": [{"rssi": -90, "snr": 5}]} for n in range(5)]
    ups = (await h.request("GET", f"/api/v1/mioty/sensors/{EUI}/uplinks?limit=2", role="viewer")).json()
    assert [u["packetCnt"] for u in ups["items"]] == [4, 3]

    assert (await h.request("POST", f"/api/v1/mioty/sensors/{EUI}/detach", role="operator")).json()["attached"] is False
    reply = await h.request("POST", f"/api/v1/mioty/sensors/{EUI}/attach", role="operator",
                            json_body={"nwKey": KEY, "shortAddr": "1a2b", "bidi": False})
    assert reply.json()["attached"] is True and reply.json()["bidi"] is False
    assert (await h.request("DELETE", f"/api/v1/mioty/sensors/{EUI}", role="operator")).code == 204

    actions = [e.action for e in (await audit.query(h.hub.store, target=EUI))[0]]
    assert sorted(actions) == sorted(["mioty.sensor.create", "mioty.sensor.downlink", "mioty.sensor.downlink_revoke",
                                      "mioty.sensor.detach", "mioty.sensor.attach", "mioty.sensor.delete"])


@pytest_twisted.ensureDeferred
async def test_sensor_import_and_export(harness: Harness) -> None:
    h = harness
    del h.hub.services["mioty"]  # endpoints.py then works on the registry in the database
    doc = [{"eui": EUI, "nwKey": KEY, "shortAddr": "1a2b", "bidi": True},
           {"eui": "00000000000000AA", "nwKey": KEY.upper(), "shortAddr": "0001", "bidi": False}]
    reply = await h.request("POST", "/api/v1/mioty/sensors/import", role="operator", json_body=doc)
    assert reply.code == 200 and (reply.json()["imported"], reply.json()["created"]) == (2, 2)
    reply = await h.request("POST", "/api/v1/mioty/sensors/import", role="operator", json_body=[doc[0], doc[0]])
    assert (reply.code, reply.error["code"]) == (409, "conflict") and "appears already" in reply.error["message"]
    reply = await h.request("POST", "/api/v1/mioty/sensors/import", role="operator",
                            json_body=[{**doc[0], "extra": 1}])
    assert (reply.code, reply.error["field"]) == (400, "[0].extra")
    assert (await h.request("GET", "/api/v1/mioty/sensors/export", role="operator")).code == 403  # holds keys
    exported = await h.request("GET", "/api/v1/mioty/sensors/export", role="admin")
    assert exported.header("Content-Disposition") == 'attachment; filename="endpoints.json"'
    assert exported.json() == [{"eui": "00000000000000aa", "nwKey": KEY, "shortAddr": "0001", "bidi": False},
                               {"eui": EUI, "nwKey": KEY, "shortAddr": "1a2b", "bidi": True}]
    entries, _ = await audit.query(h.hub.store, action="mioty.sensor.import")
    assert [(e.actor, e.detail["created"]) for e in entries] == [("operator", 2)]


@pytest_twisted.ensureDeferred
async def test_sensor_import_and_export_as_csv(harness: Harness) -> None:
    h = harness  # the mioty service is a stand-in that is not running: endpoints.py uses the database
    text = f"eui;nwKey;shortAddr;bidi\r\n{EUI.upper()};{KEY.upper()};1A2B;true\r\n00000000000000aa;{KEY};1;false\r\n"
    cookies, csrf = await h.login("operator")

    async def upload(content: str) -> str:
        """The sensors page's import form, a file as a browser sends it; the page it leads to."""
        body = (f'--b0und\r\nContent-Disposition: form-data; name="_csrf"\r\n\r\n{csrf}\r\n'
                f'--b0und\r\nContent-Disposition: form-data; name="file"; filename="sensors.csv"\r\n'
                f"Content-Type: text/csv\r\n\r\n{content}\r\n--b0und--\r\n")  # fmt: skip
        reply = await h.request("POST", "/mioty/sensors/import", cookies=cookies, data=body,
                                headers={"Content-Type": "multipart/form-data; boundary=b0und"})
        assert reply.code == 303
        return (await h.request("GET", reply.header("Location") or "", cookies=cookies)).body.decode()

    shown = await upload(text)
    assert "imported 2 sensors" in shown
    assert "the CSV file: line 1: bidi: expected true or false, got &#39;perhaps&#39;" in await upload(
        f"{EUI},{KEY},1a2b,perhaps\n")
    assert (await h.request("GET", "/api/v1/mioty/sensors/export.csv", role="operator")).code == 403  # holds keys
    exported = await h.request("GET", "/api/v1/mioty/sensors/export.csv", role="admin")
    assert exported.header("Content-Disposition") == 'attachment; filename="sensors.csv"'
    assert exported.header("Content-Type") == "text/csv; charset=utf-8"
    assert exported.body.decode() == (f"eui,nwKey,shortAddr,bidi\r\n00000000000000AA,{KEY.upper()},0001,false\r\n"
                                      f"{EUI.upper()},{KEY.upper()},1A2B,true\r\n")
    entries, _ = await audit.query(h.hub.store, action="mioty.sensor.import")
    assert [(e.actor, e.detail["created"]) for e in entries] == [("operator", 2)]


@pytest_twisted.ensureDeferred
async def test_base_station_routes(harness: Harness) -> None:
    h, bs = harness, "70b3d59cd0000001"
    listed = (await h.request("GET", "/api/v1/mioty/base-stations?state=online", role="viewer")).json()
    assert [s["bsEui"] for s in listed["items"]] == [bs]
    assert (await h.request("GET", "/api/v1/mioty/base-stations?q=nothing", role="viewer")).json()["total"] == 0
    assert (await h.request("GET", f"/api/v1/mioty/base-stations/{bs}", role="viewer")).json()["name"] == "roof"
    assert (await h.request("POST", f"/api/v1/mioty/base-stations/{bs}/status", role="operator")).code == 200
    reply = await h.request("POST", f"/api/v1/mioty/base-stations/{bs}/revoke", role="admin",
                            json_body={"reason": "stolen"})
    assert reply.code == 200 and h.mioty.calls[-1] == ("revoke", (bs, "stolen", "admin"))
    assert (await h.request("POST", "/api/v1/mioty/base-stations/70b3d59cd0000009/status", role="operator")).code == 404


@pytest_twisted.ensureDeferred
async def test_mioty_routes_answer_503_without_the_service(harness: Harness) -> None:
    del harness.hub.services["mioty"]
    reply = await harness.request("GET", "/api/v1/mioty/sensors", role="viewer")
    assert (reply.code, reply.error["code"]) == (503, "unavailable")


# -- certificates


@pytest.mark.parametrize(("filename", "sent"), [
    ("bs-roof.zip", "bs-roof.zip"),
    ('a"b.csv', "a_b.csv"),  # a quote would end the header's quoted name early
    ("x\r\nSet-Cookie: s=1.csv", "x__Set-Cookie__s_1.csv"),  # no header of the sender's own
    ("m\u00e4rz \u6771.csv", "m_rz__.csv"),  # outside ASCII: read differently by each browser
    ("../../etc/passwd", ".._.._etc_passwd"),
    ("", "download"),
    ("n" * 150 + ".csv", "n" * 100),
])
def test_a_download_is_named_only_with_characters_no_browser_or_shell_misreads(filename: str, sent: str) -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from bsscihub.web.dispatch import send_download
    from bsscihub.web.routing import Download

    request = DummyRequest([b""])
    body = send_download(request, Download(b"data", filename, "text/csv", status=201))
    assert (body, request.responseCode) == (b"data", 201)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/csv"]
    assert request.responseHeaders.getRawHeaders(b"content-disposition") == [
        f'attachment; filename="{sent}"'.encode()]


@pytest_twisted.ensureDeferred
async def test_certificates_issue_list_revoke(harness: Harness) -> None:
    h = harness
    tls = h.hub.config.tls
    reply = await h.request("GET", "/api/v1/certificates/ca", role="operator")
    assert (reply.code, reply.error["code"]) == (503, "no_ca")
    pki.create_ca(tls.ca, tls.ca_key)
    ca = (await h.request("GET", "/api/v1/certificates/ca", role="operator")).json()
    assert ca["isCa"] is True and ca["canIssue"] is True

    reply = await h.request("POST", "/api/v1/certificates", role="admin",
                            json_body={"name": "bs-roof", "bsEui": "70B3D59CD0000001", "days": 30})
    assert reply.code == 201 and reply.header("Content-Type") == "application/zip"
    assert reply.header("Content-Disposition") == 'attachment; filename="bs-roof.zip"'
    with zipfile.ZipFile(io.BytesIO(reply.body)) as archive:
        assert sorted(archive.namelist()) == ["bs-roof.key", "bs-roof.pem", "ca.pem"]
        assert (archive.getinfo("bs-roof.key").external_attr >> 16) & 0o777 == 0o600
        cert_pem = archive.read("bs-roof.pem")
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    serial = format(cert.serial_number, "x")
    station = pki.Binding("bssci.station", "70b3d59cd0000001")
    assert pki.cert_bindings(cert, BINDINGS) == (station,)

    pem = await h.request("POST", "/api/v1/certificates", role="admin", json_body={"name": "bs-2", "format": "pem"})
    assert pem.body.count(b"-----BEGIN CERTIFICATE-----") == 2 and b"PRIVATE KEY-----" in pem.body
    assert pki.cert_bindings(x509.load_pem_x509_certificate(pem.body), BINDINGS) == ()
    # An application center's certificate (SCACI): bound to that kind, to no station; by the kind's name or
    # by the name the request gave it before bindings.
    for name, kind in (("ac-1", "application-center"), ("ac-2", "scaci.ac")):
        ac = await h.request("POST", "/api/v1/certificates", role="admin",
                             json_body={"name": name, "format": "pem", "kind": kind})
        assert ac.code == 201
        assert pki.cert_bindings(x509.load_pem_x509_certificate(ac.body), BINDINGS) == (pki.Binding("scaci.ac"),)
    both = await h.request("POST", "/api/v1/certificates", role="admin",
                           json_body={"name": "ac-3", "bsEui": "70B3D59CD0000001", "kind": "application-center"})
    assert both.code == 409 and "bsEui binds the certificate to bssci.station, not to scaci.ac" in both.error["message"]
    # The generic form is the same binding as the family's own field.
    generic = await h.request("POST", "/api/v1/certificates", role="admin", json_body={
        "name": "bs-3", "format": "pem", "kind": "bssci.station", "subject": "70b3-d59c-d000-0003"})
    assert pki.cert_bindings(x509.load_pem_x509_certificate(generic.body), BINDINGS) == (
        pki.Binding("bssci.station", "70b3d59cd0000003"),)
    for body, field, message in (
        ({"kind": "bssci.station"}, "subject", "expected the station's bsEui"),
        ({"kind": "bssci.station", "subject": "70b3"}, "subject", "bad bssci.station subject '70b3'"),
        ({"bsEui": "xyz"}, "bsEui", "bad bssci.station subject 'xyz'"),
        ({"kind": "scaci.ac", "subject": "x"}, "subject", "takes no subject"),
        ({"kind": "ble.tag"}, "kind", None),
        ({"subject": "70b3d59cd0000003"}, "subject", "needs the kind"),
    ):
        bad = await h.request("POST", "/api/v1/certificates", role="admin", json_body={"name": "bad", **body})
        assert (bad.code, bad.error.get("field")) == (400, field), (body, bad.error)
        assert message is None or message in bad.error["message"], (body, bad.error)
    kinds = (await h.request("GET", "/api/v1/certificates/bindings", role="operator")).json()["items"]
    assert {k["kind"]: k["field"] for k in kinds} == {"bssci.station": "bsEui", "scaci.ac": None}

    issued = (await h.request("GET", "/api/v1/certificates?q=roof", role="operator")).json()
    assert [(c["serial"], c["revokedAt"], c["binding"], c["bsEui"]) for c in issued["items"]] == [
        (serial, None, station.to_json(), station.subject)]
    by_subject = (await h.request("GET", "/api/v1/certificates?q=D000-0003", role="operator")).json()["items"]
    assert by_subject == []  # the subject as stored: 16 hex digits, searched in any case
    by_subject = (await h.request("GET", "/api/v1/certificates?q=D0000003", role="operator")).json()["items"]
    assert [c["name"] for c in by_subject] == ["bs-3"]
    listed = {c["name"]: c["binding"] for c in
              (await h.request("GET", "/api/v1/certificates", role="operator")).json()["items"]}
    assert listed["ac-1"] == listed["ac-2"] == {"kind": "scaci.ac", "subject": ""} and listed["bs-2"] is None
    reply = await h.request("POST", f"/api/v1/certificates/0x{serial.upper()}/revoke", role="admin",
                            json_body={"reason": "lost"})
    assert (reply.json()["name"], reply.json()["binding"], reply.json()["bsEui"]) == (
        "bs-roof", station.to_json(), station.subject)
    assert h.mioty.calls[-1] == ("revoke_certificate", (int(serial, 16), "lost", "admin"))  # the family refuses it
    assert (await h.request("POST", f"/api/v1/certificates/{serial}/revoke", role="admin")).code == 409
    revoked = (await h.request("GET", "/api/v1/certificates/revoked", role="operator")).json()
    assert [r["serial"] for r in revoked["items"]] == [serial]
    entries, _ = await audit.query(h.hub.store, action="cert.")
    assert {e.action for e in entries} == {"cert.issue", "cert.issue.refused", "cert.revoke"}  # refused: the bad ones
    assert [e.detail["binding"] for e in entries if e.target == serial and e.action == "cert.issue"] == [
        station.to_json()]
    assert "PRIVATE" not in str([e.to_json() for e in entries])
    # The hub keeps no copy of issued keys.
    assert not list(Path(tls.ca).parent.glob("bs-roof*"))


# -- hub state


@pytest_twisted.ensureDeferred
async def test_hub_resources(harness: Harness) -> None:
    h = harness
    config = (await h.request("GET", "/api/v1/config", role="operator")).json()
    assert config["tls"]["key"] == "***" and config["web"]["session_idle"] == 1800.0
    assert (await h.request("GET", "/api/v1/health", role="viewer")).json()["components"]["storage"]["up"] is True
    metrics = await h.request("GET", "/api/v1/metrics", role="viewer")
    assert metrics.code == 200 and b"bsscihub_web_request_seconds" in metrics.body
    h.web.start()
    h.hub.bus.publish(Event("mioty", "up", f"mioty/ep/{EUI}/up", {"epEui": EUI, "nwKey": KEY, "packetCnt": 1}))
    dashboard = (await h.request("GET", "/api/v1/dashboard", role="viewer")).json()
    assert dashboard["recent"][0]["payload"] == {"epEui": EUI, "nwKey": "***", "packetCnt": 1}
    assert dashboard["rates"]["series"]["mioty/up"][-1] == 1
    assert dashboard["recent"][0]["time"].endswith("Z") and dashboard["rates"]["start"].endswith("Z")
    assert dashboard["counts"]["mioty.baseStations"]["value"] == "1 / 1"
    from twisted.logger import Logger

    Logger(namespace="test").info("login with password={pw} token {t}", pw="hunter22", t="bsh_0123456789ab_SECRET")
    lines = (await h.request("GET", "/api/v1/logs", role="admin")).json()["items"]
    assert "password=***" in lines[0]["text"] and "hunter22" not in str(lines) and "SECRET" not in str(lines)
    assert (await h.request("GET", "/health")).json() == {"status": "ok", "version": h.hub.version}
    assert (await h.request("GET", "/health", role="viewer")).json()["components"]["storage"]["up"] is True
    assert (await h.request("GET", "/metrics")).code == 401
    assert (await h.request("GET", "/metrics", role="viewer")).code == 200


@pytest_twisted.ensureDeferred
async def test_security_headers_on_every_kind_of_response(harness: Harness) -> None:
    for path in ("/health", "/api/v1/users", "/api/v1/nope", "/login", "/static/app.css", "/no-such-page", "/"):
        reply = await harness.request("GET", path)
        csp = reply.header("Content-Security-Policy") or ""
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, path
        assert reply.header("X-Frame-Options") == "DENY", path
        assert reply.header("X-Content-Type-Options") == "nosniff", path
        assert reply.header("Referrer-Policy") == "no-referrer", path
    assert (await harness.request("GET", "/static/app.js")).header("Content-Type") == "text/javascript"
    assert (await harness.request("GET", "/static/")).code == 403  # no directory listing


def test_api_key_secrets_are_stored_hashed() -> None:
    from bsscihub.web import auth

    token, stored = auth.TOKENS.mint(auth.hash_secret)
    secret = token.text.split("_", 2)[2]
    assert len(secret) >= 43  # 32 random bytes
    assert stored == "sha256:" + hashlib.sha256(secret.encode()).hexdigest() and secret not in stored
    assert auth.TOKENS.parse(token.text) == token and len(token.prefix) == 12
    assert auth.TOKENS.parse("bsh_short_x") is None
