"""Tests of BSSCI framing: the captured `con` frame, the documented ping bytes, protocol errors.
Hypothesis checks that frames round-trip, that split points never matter and that junk never crashes."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsscihub.protocols.bssci.framing import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAGIC,
    Framer,
    FramingError,
    encode_frame,
)
from tests.captures import load_capture

# As the captures' README states it.
CAPTURED_UUID = [-61, 114, -59, 33, -89, 120, 73, -101, -117, 78, 41, -57, -125, -73, 53, -35]  # fmt: skip
CAPTURED_CON = {
    "command": "con",
    "opId": 0,
    "version": "1.0.0",
    "bsEui": 2025300426188787,
    "vendor": "Diehl Metering",
    "model": "MIOTY Premium Gateway",
    "name": "M0007327767F3",
    "bidi": True,
    "snBsUuid": CAPTURED_UUID,
}

# The example in BSSCI.md, spaces as printed there.
PING_FRAME_HEX = "4d494f5459423031 14000000 82a7636f6d6d616e64a470696e67a46f704964 00"


def header(size: int, magic: bytes = MAGIC) -> bytes:
    return magic + struct.pack("<I", size)


def raw_frame(payload: bytes) -> bytes:
    return header(len(payload)) + payload


def feed_all(framer: Framer, chunks: Iterable[bytes]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for chunk in chunks:
        messages.extend(framer.feed(chunk))
    return messages


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- examples ---------------------------------------------------------------------


def test_header_layout() -> None:
    assert MAGIC == bytes.fromhex("4d494f5459423031")
    assert HEADER_SIZE == 12
    assert DEFAULT_MAX_PAYLOAD == 1 << 20


def test_captured_con_frame_decodes_as_documented() -> None:
    data = load_capture("diehl-premium-gateway-con.hex")
    assert len(data) == 172
    assert data[:HEADER_SIZE] == header(160)
    assert Framer().feed(data) == [CAPTURED_CON]


def test_captured_con_frame_byte_by_byte() -> None:
    data = load_capture("diehl-premium-gateway-con.hex")
    framer = Framer()
    results = [framer.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [[]] * (len(data) - 1)
    assert results[-1] == [CAPTURED_CON]


def test_ping_example_encodes_to_the_documented_bytes() -> None:
    expected = bytes.fromhex(PING_FRAME_HEX.replace(" ", ""))
    assert encode_frame({"command": "ping", "opId": 0}) == expected
    assert Framer().feed(expected) == [{"command": "ping", "opId": 0}]


def test_bytes_are_encoded_as_bin() -> None:
    frame = encode_frame({"k": b"\x01\x02"})
    assert msgpack.unpackb(frame[HEADER_SIZE:], raw=False) == {"k": b"\x01\x02"}
    assert b"\xc4\x02\x01\x02" in frame  # bin 8, not a str


def test_many_frames_in_one_read_and_a_trailing_partial_one() -> None:
    frames = [encode_frame({"command": "ping", "opId": i}) for i in range(20)]
    data = b"".join(frames)
    framer = Framer()
    assert framer.feed(data + frames[0][:15]) == [
        {"command": "ping", "opId": i} for i in range(20)
    ]
    assert framer.feed(frames[0][15:]) == [{"command": "ping", "opId": 0}]
    assert framer.feed(b"") == []


def test_json_payload_is_accepted() -> None:
    payload = json.dumps({"command": "ping", "opId": 3}).encode()
    assert Framer().feed(raw_frame(payload)) == [{"command": "ping", "opId": 3}]


def test_payload_of_exactly_the_limit_is_accepted() -> None:
    payload = msgpack.packb({"x": b"a" * 90})
    framer = Framer(max_payload=len(payload))
    assert framer.feed(raw_frame(payload)) == [{"x": b"a" * 90}]


def test_large_frame_in_small_reads() -> None:
    message = {"command": "blob", "opId": 1, "data": bytes(range(256)) * 3000}
    data = encode_frame(message) * 2
    assert feed_all(Framer(), split(data, range(0, len(data), 1000))) == [
        message,
        message,
    ]


# --- protocol errors --------------------------------------------------------------


def test_bad_identifier() -> None:
    with pytest.raises(FramingError, match="identifier"):
        Framer().feed(header(2, magic=b"MIOTYB02") + b"\x80\x80")


def test_bad_identifier_is_caught_before_the_header_is_complete() -> None:
    framer = Framer()
    assert framer.feed(b"MIOTY") == []
    with pytest.raises(FramingError, match="identifier"):
        framer.feed(b"X")


def test_bad_identifier_after_a_good_frame() -> None:
    framer = Framer()
    with pytest.raises(FramingError, match="identifier"):
        framer.feed(encode_frame({"opId": 1}) + b"GET / HTTP/1.1\r\n")


def test_absurd_size_fails_at_once_without_the_body() -> None:
    with pytest.raises(FramingError, match="exceeds the limit"):
        Framer().feed(header(0xFFFFFFFF))
    with pytest.raises(FramingError, match="101 exceeds the limit of 100"):
        Framer(max_payload=100).feed(header(101))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),  # a never-used MessagePack byte
        (b"\x82\xa1a\x01", "undecodable"),  # a map of two entries holding one
        (b"\x80\x80", "undecodable"),  # two maps in one payload
        (b"\x81\xa1a\xa2\xff\xfe", "undecodable"),  # a str that is not UTF-8
        (b"{not json", "undecodable"),
        (b"\x92\x01\x02", "not a map"),
        (b"\xa1x", "not a map"),  # a str
        (b"\x81\x01\x02", "undecodable"),  # msgpack refuses an int key itself
        (b"\x81\xc4\x01k\x02", "non-string key"),
    ],
)
def test_bad_payload(payload: bytes, match: str) -> None:
    with pytest.raises(FramingError, match=match):
        Framer().feed(raw_frame(payload))


def test_framer_is_unusable_after_an_error() -> None:
    framer = Framer()
    with pytest.raises(FramingError):
        framer.feed(raw_frame(b"\xc1") + encode_frame({"opId": 1}))
    with pytest.raises(FramingError, match="unusable"):
        framer.feed(encode_frame({"opId": 2}))


# --- properties -------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
wire_maps = st.dictionaries(st.text(max_size=10), _values, max_size=6)


@given(wire_maps)
def test_frame_round_trip(message: dict[str, Any]) -> None:
    frame = encode_frame(message)
    assert frame[:8] == MAGIC
    assert struct.unpack("<I", frame[8:12])[0] == len(frame) - HEADER_SIZE
    assert Framer().feed(frame) == [message]


@settings(max_examples=200)
@given(messages=st.lists(wire_maps, min_size=1, max_size=5), data=st.data())
def test_split_points_never_matter(
    messages: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    assert feed_all(Framer(), split(stream, cuts)) == messages
    assert (
        feed_all(Framer(), (stream[i : i + 1] for i in range(len(stream)))) == messages
    )
    assert Framer().feed(stream) == messages


# Junk that gets past the header check often enough to reach the payload
# decoders: random payloads behind a valid header, maps and JSON that break off.
_junk_payloads = st.binary(max_size=40) | st.binary(max_size=40).map(
    lambda b: b"\x83" + b
)
_junk_chunks = (
    st.binary(max_size=40)
    | _junk_payloads.map(raw_frame)
    | st.tuples(st.integers(0, 80), st.binary(max_size=40)).map(
        lambda t: header(t[0]) + t[1]
    )
    | st.binary(max_size=40).map(lambda b: raw_frame(b"{" + b))
)


@settings(max_examples=300)
@given(st.lists(_junk_chunks, max_size=8))
def test_arbitrary_bytes_give_messages_or_framing_error(chunks: list[bytes]) -> None:
    framer = Framer(max_payload=64)
    try:
        for chunk in chunks:
            for message in framer.feed(chunk):
                assert type(message) is dict
                assert all(type(key) is str for key in message)
    except FramingError:
        pass


@given(
    magic=st.binary(min_size=8, max_size=8).filter(lambda m: m != MAGIC),
    message=wire_maps,
)
def test_any_wrong_identifier_is_refused(magic: bytes, message: dict[str, Any]) -> None:
    frame = magic + encode_frame(message)[8:]
    with pytest.raises(FramingError, match="identifier"):
        Framer().feed(frame)


@given(limit=st.integers(0, 1 << 20), excess=st.integers(1, 1 << 32))
def test_any_size_over_the_limit_is_refused(limit: int, excess: int) -> None:
    size = min(limit + excess, 0xFFFFFFFF)
    framer = Framer(max_payload=limit)
    assert framer.feed(header(size)[:11]) == []
    # Refused as soon as the header is complete, before any of the body.
    with pytest.raises(FramingError, match="exceeds the limit"):
        framer.feed(header(size)[11:])
