"""The hub's BSSCI side checked against independent implementations instead of its own simulator:
frames, attach known answers, opId and version rules re-typed from their public tests (tests/data/interop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest
from twisted.internet.task import Clock

from bsscihub.protocols.bssci import messages as m
from bsscihub.protocols.bssci.crypto import attach_signature, session_key, verify_attach_signature
from bsscihub.protocols.bssci.framing import Framer, FramingError, encode_frame, op_frame_encoder
from bsscihub.protocols.bssci.session import EINVAL, ENOSYS
from tests.captures import load_capture
from tests.test_bssci_session import BS, BS_EUI, Center, errors, ul_data

DATA = Path(__file__).parent / "data" / "interop"


def rows(name: str) -> list[list[str]]:
    """The data lines of an interop file, split on whitespace; `#` lines are its source notes."""
    lines = (DATA / name).read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


SPLITSTACK = {name: bytes.fromhex(frame) for name, frame in rows("splitstack-frames.txt")}
KAT = {key: bytes.fromhex(value) for key, value in rows("kilo-attach-kat.txt")}


def payload(name: str) -> dict[str, Any]:
    [wire] = Framer().feed(SPLITSTACK[name])
    return wire


# -- frames


# What the hub makes of each base-station frame of the peer: the message class, or the error code.
# The peer's `dlDataRes` says result "success", no value of the specification ("sent", "expired",
# "invalid"); the peer itself reads an unknown result as "invalid". The hub refuses it (BSSCI.md:
# an optional field with an invalid value is a protocol error).
REFUSED = {"unsupported": ENOSYS, "dlDataRes": EINVAL}


@pytest.mark.parametrize("name", sorted(SPLITSTACK))
def test_every_frame_of_the_peer_is_read_as_the_peer_meant_it(name: str) -> None:
    wire = payload(name)
    if name in REFUSED:
        with pytest.raises(m.MessageError) as refused:
            m.decode(wire)
        assert refused.value.code == REFUSED[name] and refused.value.opId == wire["opId"]
        return
    msg = m.decode(wire)
    assert msg.command == wire["command"] and msg.opId == wire["opId"]
    # Every field the peer sent arrives: nothing it meant is dropped as unknown.
    assert set(wire) - {"command", "opId"} <= set(attrs_fields(msg))


def attrs_fields(msg: m.Message) -> list[str]:
    return [field.name for field in attrs.fields(type(msg))]


def test_the_peer_s_field_values_survive_decoding() -> None:
    con = m.decode(payload("con"))
    assert isinstance(con, m.Con)
    # A real Diehl gateway's con: signed int8 snBsUuid, EUI as uint64.
    assert con.bsEui == BS_EUI and con.vendor == "Diehl Metering" and con.model == "MIOTY Premium Gateway"
    assert con.snBsUuid == bytes.fromhex("c372c521a778499b8b4e29c783b735dd")
    att = m.decode(payload("att"))
    assert isinstance(att, m.Att)
    # EUI as a signed int64 (msgpack d3), nonce and sign as bin instead of integer lists.
    assert att.epEui == 0x0807060504030201 and att.nonce == b"\x04\x05\x06\x07" and att.sign == b"\x01\x02\x03\x04"
    assert att.shAddr == 0xFFFF and att.subpackets is not None and att.subpackets.phase == (10, 11, 12)
    ul = m.decode(payload("ulData"))
    assert isinstance(ul, m.UlData) and ul.userData == b"thisisalotofdatatosend" and ul.eqSnr == 4.0
    # Both Go peers keep EUIs in 64-bit integers and the adapter writes them signed (msgpack d3):
    # an EUI with the top bit set (one of the earlier service center's test sensors) arrives negative.
    signed = m.decode({**payload("ulData"), "epEui": 0xFCA84A030000130A - (1 << 64)})
    assert isinstance(signed, m.UlData) and signed.epEui == 0xFCA84A030000130A
    status = m.decode(payload("statusRsp"))
    assert isinstance(status, m.StatusRsp) and status.uptime == 1000 and status.memLoad == 0.6
    # The adapter's pasted field frame is the real capture the hub's own tests already use.
    assert SPLITSTACK["field-vm.ulData"] == load_capture("diehl-wmbus-vm-uldata.hex")
    field = m.decode(payload("field-vm.ulData"))
    assert isinstance(field, m.VmUlData)
    assert field.macType == 1 and len(field.userData) == 86 and field.userData[:2] == b"\x55\x44"
    assert field.crc == b"\x57\x8e" and field.sysTime == 1744394681234086798 and field.carrSpace == 1


def test_the_hub_frames_the_peer_s_short_messages_byte_for_byte() -> None:
    short = {name: frame for name, frame in SPLITSTACK.items() if set(payload(name)) == {"command", "opId"}}
    assert {"ping", "pingRsp", "pingCmp", "errorAck", "conCmp", "ulDataCmp"} <= set(short)
    for name, frame in short.items():
        wire = payload(name)
        assert encode_frame(wire) == frame, name
        assert op_frame_encoder(wire["command"])(wire["opId"]) == frame, name


def test_the_peer_s_codec_vectors() -> None:
    ping = SPLITSTACK["ping"]
    with pytest.raises(FramingError, match="bad frame identifier"):
        Framer().feed(b"MIOTYB0\x15" + ping[8:])
    # A header announcing one byte, then nothing; a header announcing 20 bytes, then one: a
    # stream reader waits for the rest (the peer's blocking reader reports a read error).
    assert Framer().feed(b"MIOTYB01\x01\x00\x00\x00") == []
    framer = Framer()
    assert framer.feed(ping[:13]) == []
    assert framer.feed(ping[13:]) == [{"command": "ping", "opId": 0}]


# -- a session fed the peer's frames


SPEC_CON_RSP = {"command", "opId", "version", "scEui", "vendor", "model", "name", "swVersion", "info", "snResume",
                "snScUuid"}


def renumbered(name: str, op: int, **over: Any) -> dict[str, Any]:
    """The peer's message with the opId a real station would use in an established session."""
    return {**payload(name), "opId": op, **over}


def test_a_session_serves_the_peer_s_messages() -> None:
    center, clock = Center(), Clock()
    bs = BS(center, clock)
    bs.protocol.dataReceived(SPLITSTACK["con"])
    [rsp] = bs.received()
    # Only the fields the specification defines (another service center's rule: no resume counters).
    assert rsp["command"] == "conRsp" and set(rsp) <= SPEC_CON_RSP
    assert rsp["snResume"] is False and bytes(rsp["snScUuid"]) != bytes.fromhex("c372c521a778499b8b4e29c783b735dd")
    bs.protocol.dataReceived(SPLITSTACK["conCmp"])
    [status] = [w for w in bs.received() if w["command"] == "status"]
    bs.protocol.dataReceived(encode_frame(renumbered("statusRsp", status["opId"])))
    assert bs.commands() == [("statusCmp", status["opId"])]

    bs.protocol.dataReceived(encode_frame(renumbered("ping", 1)))
    assert bs.commands() == [("pingRsp", 1)]
    bs.protocol.dataReceived(encode_frame(renumbered("pingCmp", 1)))
    bs.protocol.dataReceived(encode_frame(renumbered("ulData", 2)))
    [(uplink, stored)] = center.uplinks
    assert uplink.userData == b"thisisalotofdatatosend"
    stored.callback(None)
    assert bs.commands() == [("ulDataRsp", 2)]
    bs.protocol.dataReceived(encode_frame(renumbered("ulDataCmp", 2)))
    bs.protocol.dataReceived(encode_frame(renumbered("dlRxStat", 3)))
    assert bs.commands() == [("dlRxStatRsp", 3)]
    bs.protocol.dataReceived(encode_frame(renumbered("dlRxStatCmp", 3)))
    bs.protocol.dataReceived(encode_frame(renumbered("dlDataRes", 4)))
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (4, EINVAL) and "'result'" in message and "'sent'" in message
    bs.protocol.dataReceived(encode_frame(renumbered("errorAck", 4)))
    bs.protocol.dataReceived(encode_frame(renumbered("unsupported", 5)))
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (5, ENOSYS) and "unsupported" in message
    bs.protocol.dataReceived(encode_frame(renumbered("errorAck", 5)))
    # Refusals cost one operation each, never the connection.
    assert bs.received() == [] and not bs.closed


# -- attach cryptography


def test_attach_known_answers_of_a_peer() -> None:
    psk, eui = KAT["psk"], int.from_bytes(KAT["ep_eui"], "big")
    cnt = int.from_bytes(KAT["attach_cnt"], "big")
    assert attach_signature(psk, eui, cnt) == KAT["sign"]
    assert verify_attach_signature(psk, eui, cnt, KAT["sign"])
    assert session_key(psk, eui, KAT["nonce"], KAT["sign"]) == KAT["session_key"]
    # The signature over the old 15-byte IV, which real end points do not produce, is refused.
    assert not verify_attach_signature(psk, eui, cnt, KAT["legacy_sign"])


# -- opId and version rules


@pytest.mark.parametrize(("previous", "new", "peer", "hub"), [tuple(row) for row in rows("kilo-op-ids.txt")])
def test_base_station_op_id_rules_of_a_peer(previous: str, new: str, peer: str, hub: str) -> None:
    bs = BS(Center(), Clock())
    bs.connect()
    bs.received()
    if int(previous) > 0:
        bs.send("ping", int(previous))
        assert bs.commands() == [("pingRsp", int(previous))]
        bs.send("pingCmp", int(previous))
    bs.send("ping", int(new))
    out = bs.received()
    if hub == "accept":
        assert [(w["command"], w["opId"]) for w in out] == [("pingRsp", int(new))]
    else:
        [(op, code, _)] = errors(out)
        assert (op, code) == (int(new), EINVAL)
    assert not bs.closed


@pytest.mark.parametrize(("version", "layout"), [tuple(row) for row in rows("plasmonized-attprp-versions.txt")])
def test_att_prp_layout_per_con_version_of_a_peer(version: str, layout: str) -> None:
    bs = BS(Center(), Clock())
    bs.send("con", 0, version=version, bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    assert bs.received()[0]["command"] == "conRsp"
    bs.send("conCmp", 0)
    [prp, *_] = [w for w in bs.received() if w["command"] == "attPrp"]
    if layout == "bidi":
        assert prp["bidi"] is True and "epClass" not in prp and "syncBurst" not in prp
    else:
        assert "bidi" not in prp and prp["epClass"] == "a" and prp["syncBurst"] is False


def test_a_malformed_version_is_refused_not_guessed() -> None:
    bs = BS(Center(), Clock())
    bs.send("con", 0, version="1.0", bsEui=BS_EUI, bidi=True, snBsUuid=[0] * 16)
    [(op, code, message)] = errors(bs.received())
    assert (op, code) == (0, EINVAL) and "'version'" in message


# -- JSON


def json_frame(text: str) -> bytes:
    body = text.encode()
    return b"MIOTYB01" + len(body).to_bytes(4, "little") + body


def sent_payloads(bs: BS) -> list[bytes]:
    data, out = bs.transport.value(), []
    bs.transport.clear()
    while data:
        size = int.from_bytes(data[8:12], "little")
        out.append(data[12 : 12 + size])
        data = data[12 + size :]
    return out


def test_a_station_that_speaks_json_is_answered_in_json() -> None:
    center = Center()
    bs = BS(center, Clock())
    # Leading JSON whitespace (RFC 8259) is JSON too, as another service center reads it.
    con = {"command": "con", "opId": 0, "version": "1.0.0", "bsEui": BS_EUI, "bidi": True, "snBsUuid": [0] * 16}
    bs.protocol.dataReceived(json_frame("\r\n " + json.dumps(con)))
    [rsp] = [json.loads(p) for p in sent_payloads(bs)]
    assert rsp["command"] == "conRsp" and rsp["opId"] == 0 and len(rsp["snScUuid"]) == 16
    bs.protocol.dataReceived(json_frame('{"command": "conCmp", "opId": 0}'))
    after = [json.loads(p) for p in sent_payloads(bs)]  # propagations (sent together) and the status poll
    assert {w["command"] for w in after} == {"attPrp", "status"}
    assert [w["nwkSnKey"] for w in after if w["command"] == "attPrp"][0] == list(range(16))
    bs.protocol.dataReceived(json_frame(json.dumps({"command": "ulData", "opId": 1, **ul_data()})))
    center.uplinks[0][1].callback(None)
    assert [json.loads(p) for p in sent_payloads(bs)] == [{"command": "ulDataRsp", "opId": 1}]


def test_a_message_pack_station_stays_message_pack() -> None:
    bs = BS(Center(), Clock())
    bs.protocol.dataReceived(SPLITSTACK["con"])
    [rsp] = sent_payloads(bs)
    assert msgpack.unpackb(rsp)["command"] == "conRsp" and rsp[:1] != b"{"
