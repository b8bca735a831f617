"""endpoints.json import and export on SQLite and PostgreSQL: strict validation naming entry and field,
idempotent import with counts, export readable by its owner only, never a key in a message."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from bsscihub.family import installed_families
from bsscihub.hub import Hub, make_hub
from bsscihub.protocols.bssci import endpoints
from bsscihub.protocols.bssci.endpoints import EndpointsError, parse_endpoints
from bsscihub.protocols.bssci.registry import Registry
from tests.conftest import make_config

KEY = "000102030405060708090a0b0c0d0e0f"
SECRET = "5ec7e75ec7e75ec7e75ec7e75ec7e7ff"


def entry(eui: str = "0011223344556677", **over: Any) -> dict[str, Any]:
    return {"eui": eui, "nwKey": KEY, "shortAddr": "1a2b", "bidi": True, **over}


@pytest_twisted.async_yield_fixture
async def hub(database_url: str, tmp_path: Path) -> AsyncIterator[Hub]:
    config = make_config(tmp_path, database=database_url, families=["mioty"])
    hub = make_hub(config, reactor, {"mioty": installed_families()["mioty"]})
    hub.store.start()
    await hub.store.migrate(hub.migrations())
    yield hub
    await hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_validation_names_the_entry_and_the_field() -> None:
    cases = [
        ({"eui": "0011223344556677"}, "endpoints.json must hold a JSON list of end points, not an object"),
        ([entry(), "x"], "endpoints[1]: expected an object with eui, nwKey, shortAddr, bidi, got a string"),
        ([entry(name="roof")], "endpoints[0]: unknown field 'name' (known: eui, nwKey, shortAddr, bidi)"),
        ([{k: v for k, v in entry().items() if k != "bidi"}], "endpoints[0]: missing field 'bidi'"),
        ([entry(eui="00112233445566")], "endpoints[0].eui: expected 16 hexadecimal digits, got '00112233445566'"),
        ([entry(), entry(eui="001122334455667g")], "endpoints[1].eui: expected 16 hexadecimal digits"),
        ([entry(nwKey=SECRET[:-1] + "x")], "endpoints[0].nwKey: expected 32 hexadecimal digits"),
        ([entry(shortAddr=6699)], "endpoints[0].shortAddr: expected 4 hexadecimal digits, got 6699"),
        ([entry(bidi="yes")], "endpoints[0].bidi: expected true or false, got 'yes'"),
        ([entry(), entry(eui="0011223344556677".upper())],
         "endpoints[1].eui: 0011223344556677 appears already in endpoints[0]"),
    ]
    for doc, expected in cases:
        with pytest.raises(EndpointsError) as caught:
            parse_endpoints(doc)
        assert str(caught.value).startswith(expected), (str(caught.value), expected)
        assert SECRET[:-1] not in str(caught.value)
    [parsed] = parse_endpoints([entry(eui="00112233445566AA", nwKey=KEY.upper(), shortAddr="FFFF", bidi=False)])
    assert (parsed.eui, parsed.nw_key.hex(), parsed.short_addr, parsed.bidi) == ("00112233445566aa", KEY, 0xFFFF,
                                                                                  False)
    assert KEY not in repr(parsed)


@pytest_twisted.ensureDeferred
async def test_import_is_idempotent_and_counts(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps([entry(), entry("00112233445566aa", bidi=False)]))
    assert await endpoints.import_file(hub, str(path)) == 0
    assert capsys.readouterr().out == f"imported 2 end points from {path}: 2 new, 0 updated, 0 unchanged\n"
    path.write_text(json.dumps([entry(shortAddr="0001"), entry("00112233445566aa", bidi=False)]))
    assert await endpoints.import_file(hub, str(path)) == 0
    assert "0 new, 1 updated, 1 unchanged" in capsys.readouterr().out
    sensors = {s.eui: s for s in await Registry(hub.store, reactor).all_sensors()}
    assert sensors["0011223344556677"].short_addr == 1 and sensors["0011223344556677"].attached
    assert sensors["00112233445566aa"].bidi is False
    audit = await hub.store.fetchall("SELECT actor, action, detail FROM audit_log ORDER BY id")
    assert [(a, b) for a, b, _ in audit] == [("cli", "mioty.sensor.import")] * 2
    assert json.loads(audit[1][2]) == {"imported": 2, "created": 0, "updated": 1, "unchanged": 1}


@pytest_twisted.ensureDeferred
async def test_a_bad_file_imports_nothing(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps([entry(), entry("00112233445566aa", nwKey=SECRET[:30])]))
    assert await endpoints.import_file(hub, str(path)) == 1
    err = capsys.readouterr().err
    assert err == f"bsscihub: {path}: endpoints[1].nwKey: expected 32 hexadecimal digits\n"
    assert await Registry(hub.store, reactor).all_sensors() == []
    path.write_text("[{")
    assert await endpoints.import_file(hub, str(path)) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert await endpoints.import_file(hub, str(tmp_path / "missing.json")) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_export_round_trips_and_is_private(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = [entry("00112233445566aa", nwKey=SECRET, bidi=False), entry()]
    result = await endpoints.import_endpoints(hub, doc, actor="alice")
    assert result == {"imported": 2, "created": 2, "updated": 0, "unchanged": 0, "errors": []}
    out = tmp_path / "export.json"
    assert await endpoints.export_file(hub, str(out)) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    exported = json.loads(out.read_text())
    assert exported == sorted(doc, key=lambda e: e["eui"])
    capsys.readouterr()
    assert await endpoints.export_file(hub, "-") == 0
    assert json.loads(capsys.readouterr().out) == exported
    # Exported, imported again: nothing changes.
    again = await endpoints.import_endpoints(hub, exported)
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 2)


# -- CSV, as the earlier service center's users keep their sensors -------------------------------


def test_csv_as_the_earlier_service_center_wrote_and_read_it() -> None:
    exported = "eui,nwKey,shortAddr,bidi\r\nFCA84A0300001234,00112233445566778899AABBCCDDEEFF,1234,true\r\n"
    assert endpoints.parse_csv(exported) == [
        {"eui": "FCA84A0300001234", "nwKey": "00112233445566778899AABBCCDDEEFF", "shortAddr": "1234", "bidi": True}
    ]
    # semicolons (a German spreadsheet) or tabs, other column names in another order, a byte-order mark,
    # blank lines, bidi left out or spelled 1/yes/no, a shortAddr whose leading zeros a spreadsheet dropped
    variants = [
        "\ufeffMAC;Network_Key;Short_Addr;Bidirectional\n0011223344556677;" + KEY + ";1A2B;1\n\n",
        "bidi\tshort_addr\tkey\teui\nyes\t1a2b\t" + KEY + "\t0011223344556677\n",
        "0011223344556677," + KEY + ",1a2b,TRUE\n",
    ]
    for text in variants:
        assert endpoints.parse_csv(text) == [entry(shortAddr=entry()["shortAddr"].upper()
                                                   if "1A2B" in text else "1a2b")], text
    [short] = endpoints.parse_csv(f"eui,nwKey,shortAddr\n0011223344556677,{KEY},ff\n")
    assert short == {"eui": "0011223344556677", "nwKey": KEY, "shortAddr": "00ff", "bidi": False}
    assert endpoints.parse_csv("eui,nwKey,shortAddr,bidi\n") == []


def test_bad_csv_names_the_line_and_the_field() -> None:
    head = "eui,nwKey,shortAddr,bidi\n"
    cases = [
        (head + f"0011223344556677,{KEY},1a2b,true\n001122334455667,{KEY},1a2b,true\n",
         "line 3: eui: expected 16 hexadecimal digits, got '001122334455667'"),
        (head + f"0011223344556677,{SECRET[:-1]}x,1a2b,false\n", "line 2: nwKey: expected 32 hexadecimal digits"),
        (head + f"0011223344556677,{KEY},1a2b,maybe\n", "line 2: bidi: expected true or false, got 'maybe'"),
        (head + f"0011223344556677,{KEY}\n", "line 2: expected the columns eui, nwKey, shortAddr and bidi, got 2"),
        (head + f"0011223344556677,{KEY},1,1\n\n0011223344556677,{KEY},2,0\n",
         "line 4: end point 0011223344556677 appears already on line 2"),
        ("eui;shortAddr\n0011223344556677;1a2b\n", "line 1: the header has no nwKey column"),
        ('"0011"22,x\n', "not CSV: "),
    ]
    for text, expected in cases:
        with pytest.raises(EndpointsError) as caught:
            endpoints.parse_csv(text)
        assert str(caught.value).startswith(expected), (str(caught.value), expected)
        assert SECRET[:-1] not in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_csv_import_and_export_round_trip(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sensors.csv"
    path.write_text(f"eui;nwKey;shortAddr;bidi\n0011223344556677;{KEY.upper()};1A2B;true\n"
                    f"00112233445566AA;{SECRET};0001;false\n")
    assert await endpoints.import_file(hub, str(path)) == 0
    assert capsys.readouterr().out == f"imported 2 end points from {path}: 2 new, 0 updated, 0 unchanged\n"
    out = tmp_path / "export.csv"
    assert await endpoints.export_file(hub, str(out)) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text() == (f"eui,nwKey,shortAddr,bidi\n0011223344556677,{KEY.upper()},1A2B,true\n"
                               f"00112233445566AA,{SECRET.upper()},0001,false\n")
    capsys.readouterr()
    assert await endpoints.export_file(hub, "-", "csv") == 0
    assert capsys.readouterr().out.splitlines()[0] == "eui,nwKey,shortAddr,bidi"
    # the CSV export imported again (as a .txt, as that service center also took) changes nothing
    again = tmp_path / "again.txt"
    again.write_text(out.read_text())
    assert await endpoints.import_file(hub, str(again)) == 0
    assert "0 new, 0 updated, 2 unchanged" in capsys.readouterr().out
    # a bad line imports nothing, and says where
    path.write_text(f"eui,nwKey,shortAddr,bidi\n00112233445566bb,{KEY},1a2b,true\n00112233445566cc,{KEY},xyz,true\n")
    assert await endpoints.import_file(hub, str(path), "csv") == 1
    err = capsys.readouterr().err
    assert err == f"bsscihub: {path}: line 3: shortAddr: expected 4 hexadecimal digits, got '0xyz'\n"
    assert len(await Registry(hub.store, reactor).all_sensors()) == 2
