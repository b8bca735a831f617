"""Tests of BSSCI message values: the captured `con`, round trips of every message, validation errors.
Required fields below are copied from BSSCI.md, not from the code, so the two are checked against each other."""

from __future__ import annotations

import struct
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsscihub.protocols.bssci import messages
from bsscihub.protocols.bssci.framing import Framer, encode_frame
from bsscihub.protocols.bssci.messages import (
    EINVAL,
    ENOSYS,
    MESSAGE_CLASSES,
    AttPrp,
    Con,
    DlDataQue,
    Error,
    Message,
    MessageError,
    StatusRsp,
    Subpackets,
    UlData,
    decode,
    decode_bytes,
    encode,
    encode_bytes,
    eui_to_hex,
    hex_to_eui,
    parse_version,
)
from tests.captures import load_capture

SIGNED_UUID = [-61, 114, -59, 33, -89, 120, 73, -101, -117, 78, 41, -57, -125, -73, 53, -35]  # fmt: skip

# Every message of every operation in BSSCI.md, both directions.
OPERATIONS = [
    "con", "ping", "status", "att", "det", "attPrp", "detPrp", "ulData", "ulDataTx",
    "dlDataQue", "dlDataRev", "dlDataRes", "dlRxStat", "dlRxStatQry",
    # Variable MAC (the vm. sub-channel)
    "vm.activate", "vm.deactivate", "vm.status", "vm.ulData", "vm.dlData",
]  # fmt: skip
ALL_COMMANDS = {f"{op}{suffix}" for op in OPERATIONS for suffix in ("", "Rsp", "Cmp")}
ALL_COMMANDS |= {"error", "errorAck"}

# Mandatory fields (R) as BSSCI.md lists them.
REQUIRED = {
    "con": ["version", "bsEui", "bidi", "snBsUuid"],
    # The specification makes dlOpen, responseExp, dlAck (ulData) and dualChan, repetition,
    # wideCarrOff, longBlkDist (att) mandatory too; stations in the field omit them.
    "ulData": ["epEui", "rxTime", "packetCnt", "snr", "rssi", "userData"],
    "att": ["epEui", "rxTime", "attachCnt", "snr", "rssi", "nonce", "sign"],
    "statusRsp": ["code", "message", "time", "dutyCycle"],
}  # fmt: skip

# What a service center sends (BSSCI.md's operation table, both directions of each operation).
SC_SENT = {
    "conRsp", "ping", "pingRsp", "pingCmp", "status", "statusCmp", "attRsp", "detRsp", "attPrp", "attPrpCmp",
    "detPrp", "detPrpCmp", "ulDataRsp", "ulDataTx", "ulDataTxCmp", "dlDataQue", "dlDataQueCmp", "dlDataRev",
    "dlDataRevCmp", "dlDataResRsp", "dlRxStatRsp", "dlRxStatQry", "dlRxStatQryCmp", "error", "errorAck",
}  # fmt: skip

# --- strategies, one per field name (a field's name fixes its meaning) -------------

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
FLOAT = st.floats(allow_nan=False)
NUMBER = st.integers(-(2**53), 2**53) | FLOAT
TEXT = st.text(max_size=16)
BOOL = st.booleans()
MAP = st.dictionaries(st.text(max_size=6), I64 | st.text(max_size=6) | BOOL, max_size=3)


def nbytes(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


def number_tuples(size: int) -> st.SearchStrategy[tuple[float, ...]]:
    return st.lists(NUMBER, min_size=size, max_size=size).map(tuple)


SUBPACKETS = st.integers(0, 4).flatmap(
    lambda m: st.builds(
        Subpackets,
        snr=number_tuples(m),
        rssi=number_tuples(m),
        frequency=number_tuples(m),
        phase=st.none() | number_tuples(m),
    )
)

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "version": st.tuples(*[st.integers(0, 99)] * 3).map(
        lambda v: ".".join(map(str, v))
    ),
    **dict.fromkeys(["bsEui", "scEui", "epEui"], U64),
    **dict.fromkeys(
        ["vendor", "model", "name", "swVersion", "profile", "mode", "message"], TEXT
    ),
    **dict.fromkeys(["info", "config"], MAP),
    **dict.fromkeys(
        [
            "bidi",
            "snResume",
            "dualChan",
            "repetition",
            "wideCarrOff",
            "longBlkDist",
            "dlOpen",
            "responseExp",
            "dlAck",
            "dlWindReq",
            "expOnly",
            "syncBurst",
        ],
        BOOL,
    ),
    "geoLocation": st.tuples(FLOAT, FLOAT, FLOAT),
    **dict.fromkeys(["snBsUuid", "snScUuid", "nwkSnKey"], nbytes(16)),
    **dict.fromkeys(["nonce", "sign"], nbytes(4)),
    "userData": st.binary(max_size=64),
    **dict.fromkeys(["snBsOpId", "snScOpId", "code"], I64),
    **dict.fromkeys(
        [
            "time",
            "rxTime",
            "txTime",
            "rxDuration",
            "attachCnt",
            "packetCnt",
            "lastPacketCnt",
        ],
        U64,
    ),
    **dict.fromkeys(["queId", "format"], U64),
    "uptime": NUMBER,
    **dict.fromkeys(
        ["temp", "cpuLoad", "memLoad", "dutyCycle", "snr", "rssi", "eqSnr", "prio", "responsePrio"],
        FLOAT,
    ),
    **dict.fromkeys(["dlRxSnr", "dlRxRssi"], FLOAT),
    "shAddr": st.integers(0, 0xFFFF),
    "subpackets": SUBPACKETS,
    "result": st.sampled_from(["sent", "expired", "invalid"]),
    "epClass": st.sampled_from(["z", "a", "b", "c"]),
    **dict.fromkeys(["macType", "trxTime", "sysTime", "carrSpace", "pattGrp", "pattNum", "carrOffRange", "tsi"], U64),
    **dict.fromkeys(["freqOff", "ulSnr", "ulRssi"], FLOAT),
    "macTypes": st.lists(U64, max_size=4).map(tuple),
    **dict.fromkeys(["crc", "ulCrc"], nbytes(2)),
}


def dl_data_que(
    opId: int, cnt_depend: bool, entries: int
) -> st.SearchStrategy[DlDataQue]:
    userData = st.lists(st.binary(max_size=16), min_size=entries, max_size=entries).map(
        tuple
    )
    counters = st.lists(U64, min_size=entries, max_size=entries).map(tuple)
    return st.builds(
        DlDataQue,
        opId=st.just(opId),
        epEui=U64,
        queId=U64,
        cntDepend=st.just(cnt_depend),
        packetCnt=counters if cnt_depend else st.none(),
        userData=userData,
        format=st.none() | U64,
        prio=st.none() | FLOAT,
        responseExp=st.none() | BOOL,
        responsePrio=st.none() | FLOAT,
        dlWindReq=st.none() | BOOL,
        expOnly=st.none() | BOOL,
    )


def values_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    if cls is DlDataQue:
        return st.tuples(I64, BOOL, st.integers(1, 4)).flatmap(
            lambda t: dl_data_que(t[0], t[1], t[2] if t[1] else 1)
        )
    kwargs: dict[str, st.SearchStrategy[Any]] = {"opId": I64}
    for field in attrs.fields(cls)[1:]:
        if cls is AttPrp and field.name in ("epClass", "syncBurst"):
            kwargs[field.name] = st.none()  # the 1.0 layout; 1.1 is tested below
        elif field.default is None:
            kwargs[field.name] = st.none() | FIELDS[field.name]
        else:
            kwargs[field.name] = FIELDS[field.name]
    return st.builds(cls, **kwargs)


def through_the_wire(message: Message, version: str = "1.0.0") -> Message:
    frames = Framer().feed(encode_frame(encode(message, version=version)))
    assert len(frames) == 1
    return decode(frames[0])


def contains_bytes(value: object) -> bool:
    if isinstance(value, bytes | bytearray):
        return True
    if isinstance(value, dict):
        return any(contains_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_bytes(v) for v in value)
    return False


def ul_data_wire(**changes: Any) -> dict[str, Any]:
    wire = {
        "command": "ulData",
        "opId": 42,
        "epEui": 0x70B3D5677000ABCD,
        "rxTime": 1_700_000_000_123_456_789,
        "packetCnt": 4711,
        "snr": 12.5,
        "rssi": -98.25,
        "userData": [1, 2, 3],
        "dlOpen": False,
        "responseExp": False,
        "dlAck": True,
    }
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not ...}


def wire_of(command: str) -> dict[str, Any]:
    """A valid wire map of `command` with every optional field absent."""
    samples: dict[str, dict[str, Any]] = {
        "ulData": ul_data_wire(),
        "con": {"command": "con", "opId": 0, "version": "1.0.0", "bsEui": 1, "bidi": True,
                "snBsUuid": SIGNED_UUID},
        "att": {"command": "att", "opId": 5, "epEui": 2, "rxTime": 3, "attachCnt": 4,
                "snr": 1.0, "rssi": -2.0, "nonce": [1, 2, 3, 4], "sign": [5, 6, 7, 8],
                "dualChan": False, "repetition": False, "wideCarrOff": False,
                "longBlkDist": False},
        "statusRsp": {"command": "statusRsp", "opId": -7, "code": 0, "message": "ok",
                      "time": 1_700_000_000_000_000_000, "dutyCycle": 0.01},
    }  # fmt: skip
    return samples[command]


# --- the capture ------------------------------------------------------------------


def test_captured_con_decodes_as_documented() -> None:
    [wire] = Framer().feed(load_capture("diehl-premium-gateway-con.hex"))
    con = decode(wire)
    assert con == Con(
        opId=0,
        version="1.0.0",
        bsEui=0x00073200007767F3,
        vendor="Diehl Metering",
        model="MIOTY Premium Gateway",
        name="M0007327767F3",
        bidi=True,
        snBsUuid=bytes(b & 0xFF for b in SIGNED_UUID),
    )
    assert isinstance(con, Con)
    assert con.swVersion is None and con.info is None and con.geoLocation is None
    assert con.snBsOpId is None and con.snScOpId is None
    assert eui_to_hex(con.bsEui) == "00073200007767f3"
    assert con.snBsUuid.hex() == "c372c521a778499b8b4e29c783b735dd"
    # Sent back unsigned, as lists of ints 0..255.
    assert encode(con)["snBsUuid"] == [b & 0xFF for b in SIGNED_UUID]


# --- the catalogue ----------------------------------------------------------------


def test_every_message_of_every_operation_has_a_class() -> None:
    assert set(MESSAGE_CLASSES) == ALL_COMMANDS
    for command, cls in MESSAGE_CLASSES.items():
        assert cls.command == command
        assert attrs.has(cls) and issubclass(cls, Message)
        assert attrs.fields(cls)[0].name == "opId"
        # vm.ulData -> VmUlData: the sub-channel prefix becomes part of the name
        bare = command.removeprefix("vm.")
        prefix = "Vm" if bare != command else ""
        assert cls.__name__ == prefix + bare[0].upper() + bare[1:]
        assert cls is getattr(messages, cls.__name__)


def test_values_are_frozen() -> None:
    ping = MESSAGE_CLASSES["ping"](opId=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ping.opId = 2  # type: ignore[misc]


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(ALL_COMMANDS))
def test_round_trip(command: str) -> None:
    # @given on a parametrized test breaks under pytest-twisted (it re-wraps
    # the shared inner test per parameter), so the property is run from here.
    @settings(max_examples=25, deadline=None, database=None)
    @given(values_of(MESSAGE_CLASSES[command]))
    def check(message: Message) -> None:
        wire = encode(message)
        assert wire["command"] == command and wire["opId"] == message.opId
        assert not contains_bytes(wire), "byte strings go out as lists of ints"
        assert None not in wire.values(), "absent optional fields are left out"
        assert through_the_wire(message) == message

    check()


def test_encode_leaves_out_absent_optional_fields() -> None:
    ul = decode(ul_data_wire())
    assert encode(ul) == ul_data_wire()


def test_unknown_fields_are_ignored() -> None:
    assert decode(ul_data_wire(vendorThing=[1, {"x": 2}])) == decode(ul_data_wire())


def test_float_fields_are_sent_as_floats() -> None:
    status = StatusRsp(opId=1, code=0, message="ok", time=5, dutyCycle=0, uptime=12)
    wire = encode(status)
    assert type(wire["dutyCycle"]) is float
    assert type(wire["uptime"]) is int  # seconds, sent as given


@pytest.mark.parametrize(
    ("command", "fields"),
    [("ulData", ["dlOpen", "responseExp", "dlAck"]), ("att", ["dualChan", "repetition", "wideCarrOff", "longBlkDist"])],
)
def test_flags_stations_omit_default_to_false(command: str, fields: list[str]) -> None:
    wire = wire_of(command)
    for name in fields:
        wire[name] = True
    assert all(getattr(decode(wire), name) is True for name in fields)
    for name in fields:
        del wire[name]
    message = decode(wire)
    assert all(getattr(message, name) is False for name in fields)


def test_user_data_over_200_bytes_is_invalid() -> None:
    assert decode(ul_data_wire(userData=[7] * 200)).userData == bytes([7] * 200)  # type: ignore[attr-defined]
    too_long = ([7] * 201, bytes(201), [-1] * 300)  # the fast path, bin, signed bytes (the generic path)
    for wire in (ul_data_wire(userData=data) for data in too_long):
        with pytest.raises(MessageError) as info:
            decode(wire)
        assert (info.value.code, info.value.field, info.value.opId) == (EINVAL, "userData", wire["opId"])
        assert "at most 200 bytes" in info.value.message


def test_single_precision_floats_go_out_as_float32() -> None:
    # Every float the hub sends: prio and responsePrio of dlDataQue (no other SC message has one).
    que = DlDataQue(opId=-1, epEui=1, queId=2, cntDepend=False, userData=(b"",), prio=0.5, responsePrio=1.25)
    frame = encode_frame(encode(que), single_float=True)
    payload = frame[12:]
    assert payload.count(b"\xca") == 2 and b"\xcb" not in payload  # msgpack float32, never float64
    assert b"\xca" + struct.pack(">f", 0.5) in payload and b"\xca" + struct.pack(">f", 1.25) in payload
    [wire] = Framer().feed(frame)
    assert (wire["prio"], wire["responsePrio"]) == (0.5, 1.25)
    assert b"\xcb" in encode_frame(encode(que))[12:]  # the default packer writes float64
    sent_floats = {
        f.name for cls in MESSAGE_CLASSES.values() if cls.command in SC_SENT for f in attrs.fields(cls)
        if "float" in str(f.type)
    }
    assert sent_floats == {"prio", "responsePrio"}
    assert {cls.command for cls in MESSAGE_CLASSES.values() if cls.command in SC_SENT and any(
        "float" in str(f.type) for f in attrs.fields(cls))} == set(messages.SINGLE_FLOAT_COMMANDS)


def test_int_snr_decodes_as_float() -> None:
    ul = decode(ul_data_wire(snr=7, rssi=-90))
    assert isinstance(ul, UlData)
    assert (ul.snr, ul.rssi) == (7.0, -90.0)
    assert type(ul.snr) is float


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "field"),
    [(command, field) for command, fields in REQUIRED.items() for field in fields],
)
def test_missing_mandatory_field(command: str, field: str) -> None:
    wire = wire_of(command)
    decode(wire)  # valid as it is
    del wire[field]
    with pytest.raises(MessageError) as info:
        decode(wire)
    error = info.value
    assert error.code == EINVAL == 22
    assert error.field == field
    assert error.opId == wire["opId"]
    assert error.command == command
    assert (
        error.message == str(error) == f"{command}: missing mandatory field {field!r}"
    )


def test_nil_counts_as_missing() -> None:
    with pytest.raises(
        MessageError, match="ulData: missing mandatory field 'packetCnt'"
    ):
        decode(ul_data_wire(packetCnt=None))


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_only_mandatory_fields_are_mandatory(command: str) -> None:
    message = decode(wire_of(command))
    assert set(REQUIRED[command]) == {
        f.name for f in attrs.fields(type(message)) if f.default is attrs.NOTHING
    } - {"opId"}


def test_status_rsp_with_only_its_required_fields() -> None:
    status = decode(wire_of("statusRsp"))
    assert status == StatusRsp(
        opId=-7, code=0, message="ok", time=1_700_000_000_000_000_000, dutyCycle=0.01
    )
    assert isinstance(status, StatusRsp)
    optional = ["geoLocation", "uptime", "temp", "cpuLoad", "memLoad", "config"]
    assert [getattr(status, name) for name in optional] == [None] * len(optional)


def test_status_rsp_with_every_optional_field() -> None:
    wire = wire_of("statusRsp") | {
        "geoLocation": [52.5, 13.4, 34],
        "uptime": 3600,
        "temp": 41.5,
        "cpuLoad": 0.25,
        "memLoad": 0.5,
        "config": {"channels": 2},
    }
    status = decode(wire)
    assert isinstance(status, StatusRsp)
    assert status.geoLocation == (52.5, 13.4, 34.0)
    assert (status.uptime, status.temp, status.cpuLoad, status.memLoad) == (
        3600,
        41.5,
        0.25,
        0.5,
    )
    assert status.config == {"channels": 2}


@pytest.mark.parametrize(
    ("wire", "field", "expected"),
    [
        (ul_data_wire(snr="high"), "snr", "ulData: field 'snr' must be a number"),
        (ul_data_wire(snr=True), "snr", "must be a number"),
        (ul_data_wire(eqSnr=[1.0]), "eqSnr", "must be a number"),
        (ul_data_wire(epEui=2**64), "epEui", "must be an EUI64"),
        (ul_data_wire(epEui="00073200007767f3"), "epEui", "must be an EUI64"),
        (ul_data_wire(packetCnt=-1), "packetCnt", "must be an unsigned 64-bit integer"),
        (ul_data_wire(rxTime=1.5e18), "rxTime", "must be an unsigned 64-bit integer"),
        (ul_data_wire(dlOpen=1), "dlOpen", "must be a boolean"),
        (ul_data_wire(userData=[256]), "userData", "must be a byte string"),
        (ul_data_wire(userData=[-129]), "userData", "must be a byte string"),
        (ul_data_wire(userData=[True]), "userData", "must be a byte string"),
        (ul_data_wire(userData=[1.0]), "userData", "must be a byte string"),
        (ul_data_wire(userData="abc"), "userData", "must be a byte string"),
        (ul_data_wire(mode=1), "mode", "must be a string"),
        (ul_data_wire(format=-1), "format", "must be an unsigned 64-bit integer"),
        (ul_data_wire(subpackets=[]), "subpackets", "must be a map"),
        (
            ul_data_wire(
                subpackets={"snr": [1.0], "rssi": [2.0, 3.0], "frequency": [1, 2]}
            ),
            "subpackets",
            "equally long",
        ),
        (
            ul_data_wire(subpackets={"snr": [], "rssi": []}),
            "subpackets",
            "must be a map",
        ),
        (wire_of("con") | {"version": "1.0"}, "version", "major.minor.patch"),
        (wire_of("con") | {"snBsUuid": SIGNED_UUID[:15]}, "snBsUuid", "of 16 bytes"),
        (
            wire_of("con") | {"geoLocation": [1.0, 2.0]},
            "geoLocation",
            "list of 3 numbers",
        ),
        (wire_of("con") | {"info": [1]}, "info", "must be a map"),
        (wire_of("con") | {"snScOpId": 2**63}, "snScOpId", "64-bit integer"),
        (wire_of("att") | {"nonce": [1, 2, 3, 4, 5]}, "nonce", "of 4 bytes"),
        (wire_of("att") | {"shAddr": 0x10000}, "shAddr", "0..65535"),
        (wire_of("statusRsp") | {"cpuLoad": "high"}, "cpuLoad", "must be a number"),
        (
            {
                "command": "dlDataRes",
                "opId": 3,
                "epEui": 1,
                "queId": 2,
                "result": "lost",
            },
            "result",
            "one of 'sent', 'expired', 'invalid'",
        ),
        (
            {"command": "error", "opId": 3, "code": 22, "message": 5},
            "message",
            "must be a string",
        ),
    ],
)
def test_invalid_field(wire: dict[str, Any], field: str, expected: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(wire)
    error = info.value
    assert (error.code, error.field, error.opId, error.command) == (
        EINVAL,
        field,
        wire["opId"],
        wire["command"],
    )
    assert expected in error.message
    assert error.message.startswith(f"{wire['command']}: field {field!r} must be ")


@pytest.mark.parametrize("command", ["foo", "ulDataX", "vm.foo", "vm.xyz"])
def test_unknown_and_sub_channel_commands(command: str) -> None:
    with pytest.raises(MessageError) as info:
        decode({"command": command, "opId": 17, "epEui": 1})
    error = info.value
    assert error.code == ENOSYS == 38
    assert (error.opId, error.command, error.field) == (17, command, None)
    if "." in command:
        assert error.message == f"unsupported sub-channel command {command!r}"
    else:
        assert error.message == f"unknown command {command!r}"


@pytest.mark.parametrize(
    ("wire", "field", "opId", "command"),
    [
        ({"opId": 1}, "command", 1, None),
        ({"command": 5, "opId": 1}, "command", 1, None),
        ({"command": "ping"}, "opId", None, "ping"),
        ({"command": "ping", "opId": True}, "opId", None, "ping"),
        ({"command": "ping", "opId": 1.0}, "opId", None, "ping"),
        ({"command": "ping", "opId": 2**63}, "opId", None, "ping"),
        ({"command": "ping", "opId": "1"}, "opId", None, "ping"),
    ],
)
def test_bad_command_or_opId(
    wire: dict[str, Any], field: str, opId: int | None, command: str | None
) -> None:
    with pytest.raises(MessageError) as info:
        decode(wire)
    error = info.value
    assert (error.code, error.field, error.opId, error.command) == (
        EINVAL,
        field,
        opId,
        command,
    )


def test_opId_range() -> None:
    assert decode({"command": "ping", "opId": -(2**63)}).opId == -(2**63)
    assert decode({"command": "ping", "opId": 2**63 - 1}).opId == 2**63 - 1


def test_error_without_text() -> None:
    assert decode({"command": "error", "opId": -3, "code": 22}) == Error(
        opId=-3, code=22
    )
    assert encode(Error(opId=-3, code=22, message="bad key")) == {
        "command": "error",
        "opId": -3,
        "code": 22,
        "message": "bad key",
    }


def test_signed_eui_is_masked() -> None:
    ul = decode(ul_data_wire(epEui=-1))
    assert isinstance(ul, UlData)
    assert ul.epEui == 2**64 - 1
    with pytest.raises(MessageError, match="epEui"):
        decode(ul_data_wire(epEui=-(2**63) - 1))


# --- byte strings -----------------------------------------------------------------


def test_signed_sn_bs_uuid_is_masked() -> None:
    con = decode(wire_of("con"))
    assert isinstance(con, Con)
    assert list(con.snBsUuid) == [b & 0xFF for b in SIGNED_UUID]
    unsigned = decode(wire_of("con") | {"snBsUuid": [b & 0xFF for b in SIGNED_UUID]})
    as_bin = decode(wire_of("con") | {"snBsUuid": bytes(b & 0xFF for b in SIGNED_UUID)})
    assert con == unsigned == as_bin


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], b""),
        ([0, 127, 128, 255], b"\x00\x7f\x80\xff"),
        ([-128, -1, 0, 1], b"\x80\xff\x00\x01"),
        ([-1, 255], b"\xff\xff"),
        (b"\x01\x02", b"\x01\x02"),
    ],
)
def test_decode_bytes(value: object, expected: bytes) -> None:
    assert decode_bytes(value) == expected


@pytest.mark.parametrize(
    "value", [[256], [-129], [True], [1.0], ["a"], [None], "ab", None, 5, {"a": 1}]
)
def test_decode_bytes_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="-128..255"):
        decode_bytes(value)


@given(st.binary(max_size=64))
def test_bytes_round_trip(data: bytes) -> None:
    wire = encode_bytes(data)
    assert all(type(b) is int and 0 <= b <= 255 for b in wire)
    assert decode_bytes(wire) == data
    assert decode_bytes([b - 256 if b > 127 else b for b in wire]) == data


# --- EUIs and versions ----------------------------------------------------------------


def test_eui_hex() -> None:
    assert eui_to_hex(0x00073200007767F3) == "00073200007767f3"
    assert hex_to_eui("00073200007767F3") == 0x00073200007767F3
    assert eui_to_hex(0) == "0" * 16
    assert eui_to_hex(2**64 - 1) == "f" * 16


@given(U64)
def test_eui_hex_round_trip(eui: int) -> None:
    text = eui_to_hex(eui)
    assert len(text) == 16 and text == text.lower()
    assert hex_to_eui(text) == eui == int.from_bytes(bytes.fromhex(text), "big")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "73200007767f3",
        "0x073200007767f3",
        "00073200007767f3 ",
        "+0073200007767f3",
        "0007_3200007767f3",
        "00-07-32-00-00-77-67-f3",
        "g" * 16,
        "0" * 17,
        "０" * 16,  # full-width digits: int() takes them, an EUI must not
    ],
)
def test_hex_to_eui_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="16 hexadecimal digits"):
        hex_to_eui(text)


@pytest.mark.parametrize("value", [-1, 2**64, True, 1.0])
def test_eui_to_hex_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="EUI64"):
        eui_to_hex(value)


def test_parse_version() -> None:
    assert parse_version("1.0.0") == (1, 0, 0)
    assert parse_version("1.1.12") == (1, 1, 12)


@pytest.mark.parametrize(
    "version",
    ["", "1.0", "1.0.0.0", "v1.0.0", "1.a.0", " 1.0.0", "1.0.0\n", "1..0", None, 100],
)
def test_parse_version_refuses(version: Any) -> None:
    with pytest.raises(MessageError, match="malformed version") as info:
        parse_version(version)
    assert (info.value.code, info.value.field) == (EINVAL, "version")


# --- attPrp: the 1.0 and 1.1 layouts ---------------------------------------------------


def att_prp(**changes: Any) -> AttPrp:
    values: dict[str, Any] = {
        "opId": -1,
        "epEui": 0x70B3D5677000ABCD,
        "bidi": True,
        "nwkSnKey": bytes(range(16)),
        "shAddr": 0x1234,
        "lastPacketCnt": 99,
        "dualChan": False,
        "repetition": True,
        "wideCarrOff": False,
        "longBlkDist": False,
    }
    return AttPrp(**(values | changes))


@pytest.mark.parametrize("version", ["1.0.0", "1.0.7", "0.9.0"])
def test_att_prp_1_0_layout(version: str) -> None:
    wire = encode(att_prp(), version=version)
    assert wire == {
        "command": "attPrp",
        "opId": -1,
        "epEui": 0x70B3D5677000ABCD,
        "bidi": True,
        "nwkSnKey": list(range(16)),
        "shAddr": 0x1234,
        "lastPacketCnt": 99,
        "dualChan": False,
        "repetition": True,
        "wideCarrOff": False,
        "longBlkDist": False,
    }
    # A 1.0 base station is never sent the 1.1 fields, even when set.
    assert encode(att_prp(epClass="c", syncBurst=True), version=version) == wire


@pytest.mark.parametrize(
    ("value", "epClass", "syncBurst"),
    [
        (att_prp(bidi=True), "a", False),
        (att_prp(bidi=False), "z", False),
        (att_prp(bidi=True, epClass="c", syncBurst=True), "c", True),
    ],
)
@pytest.mark.parametrize("version", ["1.1.0", "1.1.5"])
def test_att_prp_1_1_layout(
    value: AttPrp, epClass: str, syncBurst: bool, version: str
) -> None:
    wire = encode(value, version=version)
    assert "bidi" not in wire
    assert (wire["epClass"], wire["syncBurst"]) == (epClass, syncBurst)
    decoded = decode(wire)
    assert decoded == attrs.evolve(value, epClass=epClass, syncBurst=syncBurst)


def test_att_prp_1_1_decoding_derives_bidi() -> None:
    wire = encode(att_prp(), version="1.1.0")
    for epClass, bidi in [("z", False), ("a", True), ("b", True), ("c", True)]:
        decoded = decode(wire | {"epClass": epClass})
        assert isinstance(decoded, AttPrp)
        assert decoded.bidi is bidi


@pytest.mark.parametrize(
    ("drop", "change", "field"),
    [
        ("syncBurst", {}, "syncBurst"),
        ("epClass", {}, "bidi"),
        (None, {"epClass": "x"}, "epClass"),
        (None, {"syncBurst": "yes"}, "syncBurst"),
    ],
)
def test_att_prp_1_1_invalid(
    drop: str | None, change: dict[str, Any], field: str
) -> None:
    wire = encode(att_prp(), version="1.1.0") | change
    wire.pop(drop or "", None)
    with pytest.raises(MessageError) as info:
        decode(wire)
    assert (info.value.code, info.value.field, info.value.opId) == (EINVAL, field, -1)


def test_att_prp_needs_a_well_formed_version() -> None:
    with pytest.raises(MessageError, match="malformed version"):
        encode(att_prp(), version="1.1")


@settings(max_examples=50, deadline=None)
@given(
    value=values_of(AttPrp),
    epClass=st.none() | FIELDS["epClass"],
    syncBurst=st.none() | BOOL,
)
def test_att_prp_1_1_round_trip(
    value: AttPrp, epClass: str | None, syncBurst: bool | None
) -> None:
    value = attrs.evolve(value, epClass=epClass, syncBurst=syncBurst)
    sent_class = epClass or ("a" if value.bidi else "z")
    expected = attrs.evolve(
        value, bidi=sent_class != "z", epClass=sent_class, syncBurst=bool(syncBurst)
    )
    assert through_the_wire(value, version="1.1.0") == expected


# --- dlDataQue: userData entries against cntDepend ---------------------------------------


def dl_wire(**changes: Any) -> dict[str, Any]:
    wire = {
        "command": "dlDataQue",
        "opId": -4,
        "epEui": 1,
        "queId": 2,
        "cntDepend": False,
    }
    return wire | {"userData": [[1, 2]]} | changes


def test_dl_data_que_entries() -> None:
    assert decode(dl_wire(userData=[[]])) == DlDataQue(
        opId=-4, epEui=1, queId=2, cntDepend=False, userData=(b"",)
    )
    counted = decode(dl_wire(cntDepend=True, packetCnt=[7, 8], userData=[[1], [-1]]))
    assert counted == DlDataQue(
        opId=-4,
        epEui=1,
        queId=2,
        cntDepend=True,
        packetCnt=(7, 8),
        userData=(b"\x01", b"\xff"),
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"userData": [[1], [2]]}, "userData"),
        ({"userData": []}, "userData"),
        ({"userData": [1, 2]}, "userData"),
        ({"cntDepend": True}, "packetCnt"),
        ({"cntDepend": True, "packetCnt": [1, 2]}, "packetCnt"),
        ({"cntDepend": True, "packetCnt": [], "userData": []}, "packetCnt"),
        ({"cntDepend": True, "packetCnt": [-1]}, "packetCnt"),
    ],
)
def test_dl_data_que_invalid(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(dl_wire(**changes))
    assert (info.value.code, info.value.field, info.value.opId) == (EINVAL, field, -4)


# --- the ulData fast path agrees with the generic decoder ---------------------------------

_odd_values = st.sampled_from(
    [None, True, False, 0, 1, -1, 7.5, 2**64, -(2**63) - 1, "x", "", [], [1, 2], [-1, 200],
     [True], [1.0], [256], b"\x01", {}, {"snr": [1.0], "rssi": [2], "frequency": [3]},
     {"snr": [1.0], "rssi": [], "frequency": [3]}]
)  # fmt: skip
_ul_fields = [
    "epEui", "rxTime", "rxDuration", "packetCnt", "snr", "rssi", "eqSnr", "profile", "mode",
    "subpackets", "userData", "format", "dlOpen", "responseExp", "dlAck", "other",
]  # fmt: skip


def outcome(decoder: Any, wire: dict[str, Any]) -> object:
    try:
        return decoder(wire, 7)
    except MessageError as e:
        return (e.code, e.message, e.field, e.opId, e.command)


@settings(max_examples=300, deadline=None)
@given(
    value=values_of(UlData),
    changes=st.dictionaries(st.sampled_from(_ul_fields), _odd_values, max_size=3),
    drop=st.lists(st.sampled_from(_ul_fields), max_size=2),
)
def test_ul_data_fast_path_matches_generic(
    value: UlData, changes: dict[str, Any], drop: list[str]
) -> None:
    wire = encode(value) | changes
    for name in drop:
        wire.pop(name, None)
    fast = outcome(messages._decode_ul_data, wire)
    assert fast == outcome(messages._slow_ul_data, wire)
    if not changes and not drop:
        assert fast == attrs.evolve(value, opId=7)
