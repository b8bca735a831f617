"""mioty Blueprints: the expression evaluator and the decoder, on blueprint files of several real-world shapes."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from bsscihub.protocols.bssci.blueprint import BlueprintError, DecodeError, parse_blueprint
from bsscihub.protocols.bssci.expr import ExprError, compile_expr

DATA = Path(__file__).parent / "data" / "blueprints"


def load(name: str):
    return parse_blueprint((DATA / name).read_text())


# -- the evaluator


@pytest.mark.parametrize(
    ("source", "values", "expected"),
    [
        ("$/256*1.3+3.0", {"": 128}, 3.65),
        ("$ / 10", {"": 235}, 23.5),
        ("$ / 10", {"": 230}, 23),
        ("($ & 0x80) ? -($ & 0x7f) : $", {"": 0x85}, -5),
        ("$flags >> 2 & 3", {"flags": 0b1100}, 3),
        ("$a | $b << 8", {"a": 0x34, "b": 0x12}, 0x1234),
        ("~$ & 0xff", {"": 0x0F}, 0xF0),
        ("$a ^ 0b1010", {"a": 0b0110}, 0b1100),
        ("$a == 1 && !$b", {"a": 1, "b": 0}, True),
        ("$a >= 2 || $a < -3", {"a": -4}, True),
        ("-7 % 3", {}, -1),
        ("Math.round($ * 10) / 10", {"": 1.26}, 1.3),
        ("max($a, $b, 3)", {"a": 1, "b": 2}, 3),
        ("$value * 2", {"": 21}, 42),
        ("1 ? 2 : 3 ? 4 : 5", {}, 2),
        ("0xffffffff >>> 28", {}, 15),
    ],
)
def test_expressions_compute_as_javascript_would(source, values, expected):
    assert compile_expr(source).evaluate(values) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("", "empty"),
        ("1 +", "ends too early"),
        ("eval(1)", "unknown name"),
        ("__import__('os')", "unexpected"),
        ("$.constructor", "unexpected character"),
        ("1 << 9999", "out of range"),
        ("1 / 0", "division by zero"),
        ("1e308 * 10", "not a finite"),
        ("(" * 50 + "1" + ")" * 50, "too deeply"),
        ("+".join(["1"] * 400), "too deeply"),
        ("$missing + 1", "not known"),
        ("1.5 & 1", "whole numbers"),
        ("x" * 2000, "longer than"),
    ],
)
def test_bad_expressions_give_a_reason(source, reason):
    with pytest.raises(ExprError, match=reason):
        compile_expr(source).evaluate({})


_ALPHABET = "0123456789$abxvalue+-*/%&|^~!<>=?:(), .Mathround" + "\t\"'\\\n{}[];"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=200), st.integers(-(2**64), 2**64),
       st.floats(allow_nan=True, allow_infinity=True))
def test_arbitrary_expressions_never_crash_nor_hang(source, raw, other):
    started = time.monotonic()
    try:
        expr = compile_expr(source)
        value = expr.evaluate({"": raw, "a": other, "b": raw})
    except ExprError:
        pass
    else:
        assert isinstance(value, (int, float, bool))
    assert time.monotonic() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_parser(source):
    try:
        compile_expr(source)
    except ExprError:
        pass


# -- the decoder


def test_component_map_and_formats_as_in_the_registry():
    bp = load("climate.json")
    assert bp.type_eui == "70b3d5677000a001" and bp.name == "Indoor climate sensor"
    assert sorted(bp.formats) == [0, 192]
    # 298.15 K + 0.1 -> 24.95 °C (raw 2981), 40 %, 1013.2 hPa
    data = (2981).to_bytes(2, "big") + bytes([40]) + (10132).to_bytes(2, "big")
    assert bp.decode(data, 0) == {
        "temperature": {"value": 24.95, "unit": "°C"},
        "humidity": {"value": 40, "unit": "%"},
        "pressure": {"value": 1013.2, "unit": "hPa"},
    }
    assert bp.decode(data + bytes([128]), 192)["battery"] == {"value": 3.65, "unit": "V"}


def test_bit_fields_and_conditions():
    bp = load("door-flags.json")
    # door open, no tamper, temperature present, humidity absent, battery 15/15
    head = 0b1010_1111
    decoded = bp.decode(bytes([head]) + (-1234).to_bytes(2, "big", signed=True), 0)
    assert decoded == {
        "door_open": {"value": True},
        "tamper": {"value": False},
        "battery_level": {"value": 100, "unit": "%"},
        "temperature": {"value": -12.34, "unit": "°C"},
        "alarm": {"value": False},
    }
    # both optional values present, tamper set
    head = 0b1111_0000
    decoded = bp.decode(bytes([head]) + (500).to_bytes(2, "big") + bytes([91]), 0)
    assert decoded["humidity"] == {"value": 45.5, "unit": "%"}
    assert decoded["alarm"] == {"value": True}
    assert decoded["battery_level"]["value"] == 0
    # neither: one byte only
    assert set(bp.decode(bytes([0b1000_0101]), 0)) == {"door_open", "tamper", "battery_level", "alarm"}


def test_little_endian_signed_float_and_hex_fields():
    bp = load("meter-le.json")
    data = (
        (123456).to_bytes(4, "little")
        + (42_500).to_bytes(4, "little")
        + (-155).to_bytes(2, "little", signed=True)
        + struct.pack("<f", 21.5)
        + bytes.fromhex("00c0ffee")
        + bytes([0x83])
    )
    assert bp.decode(data, 3) == {
        "pulses": {"value": 123456},
        "volume": {"value": 42.5, "unit": "m³"},
        "flow": {"value": -15.5, "unit": "l/h"},
        "temperature": {"value": 21.5, "unit": "°C"},
        "serial": {"value": "00c0ffee"},
        "status": {"value": -3},
    }


@pytest.mark.parametrize(
    ("name", "data", "fmt", "reason"),
    [
        ("climate.json", bytes(5), 7, "no uplink format 7"),
        ("climate.json", bytes(3), 0, "field 'pressure' needs 16 bits"),
        ("climate.json", bytes(6), 0, "8 bits left over"),
        ("door-flags.json", bytes([0b0010_0000]), 0, "field 'temperature' needs 16 bits"),
        ("meter-le.json", bytes(10) + b"\xff\xff\xff\xff" + bytes(5), 3, "not a finite number"),
    ],
)
def test_a_payload_that_does_not_match_says_why(name, data, fmt, reason):
    with pytest.raises(DecodeError, match=reason):
        load(name).decode(data, fmt)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("typeEui"), "typeEui"),
        (lambda d: d.pop("version"), "version is required"),
        (lambda d: d.update(uplink=[]), "uplink must be a list"),
        (lambda d: d["uplink"][0]["payload"][0].update(component="nope"), "not defined"),
        (lambda d: d["component"]["humidity"].update(type="string"), "type must be one of"),
        (lambda d: d["component"]["humidity"].update(size=0), "size must be a whole number"),
        (lambda d: d["component"]["humidity"].update(func="$ +"), "humidity.*ends too early"),
        (lambda d: d["component"]["humidity"].update(func="$later * 2"), "not an earlier field"),
        (lambda d: d["uplink"].append(d["uplink"][0]), "defined twice"),
        (lambda d: d["component"]["humidity"].update(littleEndian=True, size=4), "whole bytes"),
    ],
)
def test_bad_blueprints_are_refused_with_the_place(change, reason):
    doc = json.loads((DATA / "climate.json").read_text())
    change(doc)
    with pytest.raises(BlueprintError, match=reason):
        parse_blueprint(json.dumps(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 255), st.sampled_from(["climate.json", "door-flags.json",
                                                                       "meter-le.json"]))
def test_arbitrary_payloads_decode_or_give_a_reason(data, fmt, name):
    try:
        decoded = load(name).decode(data, fmt)
    except DecodeError as e:
        assert str(e)
    else:
        json.dumps(decoded, allow_nan=False)


def test_the_book_says_when_a_sensors_blueprint_is_missing():
    from bsscihub.protocols.bssci.blueprints import BlueprintBook

    book = BlueprintBook(None, None)
    book.types = {"0011223344556677": "70b3d5677000a001"}
    payload = {"data": "0ba528278c", "format": 0}
    book.annotate("0011223344556677", payload)
    assert payload["decodeError"] == "no blueprint imported for type 70b3d5677000a001"
    book.blueprints = {"70b3d5677000a001": load("climate.json")}
    payload = {"data": "0ba528278c", "format": 0}
    book.annotate("0011223344556677", payload)
    assert payload["decoded"]["temperature"] == {"value": 24.95, "unit": "°C"}
    other = {"data": "00", "format": 0}
    book.annotate("ffffffffffffffff", other)
    assert other == {"data": "00", "format": 0}  # a sensor without a type stays as it was


@pytest_twisted.ensureDeferred
async def test_the_book_is_stored_and_seen_by_another_writer(store) -> None:
    """On SQLite and PostgreSQL: blueprints and types survive a reload, and changes made by another process
    (the command line) reach a running hub's book at its next refresh."""
    from twisted.internet import reactor

    from bsscihub.protocols.bssci.blueprints import MIGRATIONS, BlueprintBook
    from bsscihub.store.schema import CORE_MIGRATIONS

    await store.migrate(CORE_MIGRATIONS + MIGRATIONS)
    hub_book, cli_book = BlueprintBook(store, reactor), BlueprintBook(store, reactor)
    await hub_book.load()
    assert hub_book.list() == []
    await cli_book.add((DATA / "climate.json").read_text(), "cli")
    await cli_book.add((DATA / "meter-le.json").read_bytes(), "cli")
    await cli_book.set_type("0011223344556677", "70B3D5677000A001")
    await hub_book.refresh()
    assert [b["typeEui"] for b in hub_book.list()] == ["70b3d5677000a001", "70b3d5677000a003"]
    assert hub_book.types == {"0011223344556677": "70b3d5677000a001"}
    assert hub_book.get("70b3d5677000a001")["sensors"] == 1
    payload = {"data": "0ba528278c", "format": 0}
    hub_book.annotate("0011223344556677", payload)
    assert payload["decoded"]["pressure"] == {"value": 1012.4, "unit": "hPa"}
    assert await cli_book.remove("70b3d5677000a003") and not await cli_book.remove("70b3d5677000a003")
    await cli_book.set_type("0011223344556677", None)
    await hub_book.refresh()
    assert [b["typeEui"] for b in hub_book.list()] == ["70b3d5677000a001"] and hub_book.types == {}
