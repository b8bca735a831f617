"""The wM-Bus / OMS parser: link layer, CRC formats, ELL/AFL/TPL, security modes 5 and 7, records."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bsscihub.protocols.wmbus import WMBusError, manufacturer_code, manufacturer_id, parse_records, parse_telegram
from bsscihub.protocols.wmbus.records import RecordsError
from tests.captures import load_capture
from tests.wmbus_frames import (
    KEY,
    WATER_RECORDS,
    WATER_VALUES,
    mode5_frame,
    mode7_frame,
    plain_frame,
    with_format_a,
    with_format_b,
)


def capture_frame() -> bytes:
    wire = msgpack.unpackb(load_capture("diehl-wmbus-vm-uldata.hex")[12:], strict_map_key=False)
    return bytes(wire["userData"])


def test_the_real_diehl_frame_names_its_meter_and_says_why_it_stays_encrypted() -> None:
    t = parse_telegram(capture_frame())
    assert (t.manufacturer, t.meter_id, t.version, t.device_type, t.medium) == ("DME", "81795246", 0x76, 7, "water")
    assert t.key == "dme-81795246"
    assert t.crc == "B"  # L = 0x55 counts the CRC at the end
    assert t.ell == {"ci": 0x8C, "cc": 0x00, "acc": 0xB7}
    assert t.afl is not None and t.afl["messageCounter"] == 0x0011353E and t.afl["mac"] == "98caecc112422570"
    assert (t.ci, t.access_number, t.security_mode, t.encrypted, t.decrypted) == (0x7A, 0x1B, 7, True, False)
    assert t.records == ()
    assert t.error == "encrypted (security mode 7) and no key is set for this meter"
    assert "wrong key" in (parse_telegram(capture_frame(), bytes(16)).error or "")


@pytest.mark.parametrize("build", [mode5_frame, mode7_frame], ids=["mode5", "mode7"])
def test_an_encrypted_frame_decrypts_to_the_readings_put_in(build) -> None:
    t = parse_telegram(build(), KEY)
    assert t.error is None and t.encrypted and t.decrypted
    assert t.values() == WATER_VALUES
    assert (t.manufacturer, t.meter_id, t.medium) == ("DME", "12345678", "water")


@pytest.mark.parametrize(("build", "mode"), [(mode5_frame, 5), (mode7_frame, 7)], ids=["mode5", "mode7"])
def test_without_the_right_key_the_reason_is_given_and_nothing_is_made_up(build, mode: int) -> None:
    assert parse_telegram(build()).error == f"encrypted (security mode {mode}) and no key is set for this meter"
    wrong = parse_telegram(build(), bytes(range(16)))
    assert wrong.records == () and not wrong.decrypted
    if mode == 5:
        assert wrong.error == "decryption (security mode 5) did not give the 2F2F check bytes: wrong key?"
    else:  # the authentication layer's MAC is checked first
        assert wrong.error == "the authentication layer's MAC does not verify: wrong key, or the frame was altered"


def test_mode_7_frames_are_authenticated_by_the_afl_mac() -> None:
    good = parse_telegram(mode7_frame(), KEY)
    assert good.afl is not None and good.afl["macVerified"] is True
    # One byte changed in the last encrypted block: CBC would still give 2F2F in the first block.
    altered = bytearray(mode7_frame())
    altered[-3] ^= 0x40
    t = parse_telegram(bytes(altered), KEY)
    assert t.records == () and "MAC does not verify" in (t.error or "")
    assert t.afl is not None and t.afl["macVerified"] is False


def test_crc_formats_a_and_b_are_checked_and_removed() -> None:
    frame = mode5_frame()
    a, b = parse_telegram(with_format_a(frame), KEY), parse_telegram(with_format_b(frame), KEY)
    assert (a.crc, b.crc) == ("A", "B")
    assert a.values() == b.values() == WATER_VALUES
    broken = bytearray(with_format_a(frame))
    broken[20] ^= 0x01
    with pytest.raises(WMBusError, match="CRC error in block 2"):
        parse_telegram(bytes(broken))
    with pytest.raises(WMBusError, match="L-field"):
        parse_telegram(frame + b"\x00")


def test_records_follow_en_13757_3() -> None:
    records, vendor = parse_records(WATER_RECORDS + bytes.fromhex("0f0102"))
    by_field = {r.field: r for r in records}
    assert vendor == b"\x01\x02"
    volume = by_field["volume"]
    assert (volume.quantity, volume.value, volume.unit, volume.storage, volume.coding) == (
        "Volume", 12345.678, "m3", 0, "8-digit BCD")
    assert (by_field["volume_s1"].storage, by_field["volume_s2"].storage) == (1, 2)
    assert (by_field["volume_flow"].value, by_field["volume_flow"].unit) == (123.456, "m3.h-1")
    assert (by_field["flow_temperature"].value, by_field["flow_temperature"].unit) == (27.4, "Cel")
    assert (by_field["return_temperature"].value, by_field["energy"].unit) == (-1, "W.h")
    assert by_field["error_flags"].value == 5
    # 32-bit real data scaled by the VIF like any other (pymbusparser 0.5.3 leaves it unscaled).
    real, = parse_records(bytes.fromhex("05130000803f"))[0]
    assert (real.value, real.unit, real.coding) == (0.001, "m3", "32-bit real")
    assert parse_records(bytes.fromhex("055b0000c03f"))[0][0].value == 1.5  # 10^0 degC
    assert parse_records(bytes.fromhex("05060000803f"))[0][0].value == 1000  # 10^3 Wh
    tariff, = parse_records(bytes.fromhex("84101305000000"))[0]
    assert (tariff.field, tariff.tariff, tariff.value) == ("volume_t1", 1, 0.005)
    maximum, = parse_records(bytes.fromhex("125a0100"))[0]
    assert (maximum.field, maximum.function) == ("flow_temperature_maximum", "maximum")


@pytest.mark.parametrize(("record", "value"), [
    ("046d2b0a9f2c", "2020-12-31T10:43:00"),  # day 31 (a library this hub uses reads it as "every day")
    ("046d2b0a812c", "2020-12-01T10:43:00"),
    ("046dab0a812c", None),  # IV bit: the meter says its clock is invalid
    ("026c9f2c", "2020-12-31"),
    ("026c0000", None),  # day 0, month 0: no date
])  # fmt: skip
def test_dates_types_f_and_g(record: str, value: str | None) -> None:
    assert parse_records(bytes.fromhex(record))[0][0].value == value


def test_an_unencrypted_frame_and_an_unknown_transport_layer() -> None:
    assert parse_telegram(plain_frame()).values() == WATER_VALUES
    odd = bytearray(plain_frame())
    odd[10] = 0xA0
    t = parse_telegram(bytes(odd))
    assert t.meter_id == "12345678" and t.records == ()
    assert t.error == "CI field 0xa0 is not a transport layer this hub reads (0x72, 0x7a, 0x78)"


def test_manufacturer_codes() -> None:
    assert manufacturer_code(b"\xa5\x11") == "DME"
    assert manufacturer_id("kam") == bytes.fromhex("2d2c")
    for code in ("DME", "KAM", "ZRI", "AAA", "ZZZ"):
        assert manufacturer_code(manufacturer_id(code)) == code


@given(st.binary(max_size=300))
@example(b"\x0a\x44" + bytes(9))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        t = parse_telegram(data)
    except WMBusError:
        return
    assert len(t.meter_id) == 8


@given(st.integers(min_value=11, max_value=200), st.binary(min_size=1, max_size=4))
def test_a_cut_or_damaged_frame_is_reported_not_raised(cut: int, noise: bytes) -> None:
    frame = mode7_frame()[:cut]
    frame = bytes([len(frame) - 1]) + frame[1:]
    t = parse_telegram(frame, KEY)
    assert t.meter_id == "12345678"
    assert t.error is not None or t.values() == WATER_VALUES
    damaged = frame[:-len(noise)] + noise
    parse_telegram(damaged, KEY)


@given(st.binary(max_size=200))
@example(bytes.fromhex("0d7c03414243"))  # a text VIF without its data
@example(bytes.fromhex("0f"))
@example(bytes.fromhex("8484848484848484848484"))  # a DIFE chain longer than the standard allows
def test_arbitrary_application_data_gives_records_or_a_reason(data: bytes) -> None:
    try:
        records, _ = parse_records(data)
    except RecordsError as e:
        assert str(e).startswith("the data records do not parse: ")
        return
    assert all(r.field for r in records)


@given(st.binary(max_size=300))
def test_the_crc_is_that_of_en_13757_4(data: bytes) -> None:
    from bsscihub.protocols.wmbus import crc16
    from tests.wmbus_frames import crc16 as bitwise

    assert crc16(data) == bitwise(data)
    assert crc16(capture_frame()[:-2]) == 0x8A6C  # the Diehl frame's own CRC (format B)


def test_a_record_that_does_not_parse_keeps_the_readings_before_it() -> None:
    # The second record claims 8 BCD digits but holds hex digits a, b: not a value.
    records = bytes.fromhex("0c1378563412" "0c13ab000000" "025a1201")
    with pytest.raises(RecordsError) as e:
        parse_records(records)
    assert [(r.field, r.value) for r in e.value.records] == [("volume", 12345.678)]
    t = parse_telegram(mode5_frame(records), KEY)
    assert t.decrypted and t.values() == {"volume": 12345.678}
    assert (t.error or "").startswith("the data records do not parse: ") and "byte offset 6" in (t.error or "")


def test_error_flags_are_a_bit_field() -> None:
    assert parse_records(bytes.fromhex("04fd17ffffffff"))[0][0].value == 0xFFFFFFFF
    assert parse_records(bytes.fromhex("02fd170080"))[0][0].value == 0x8000

