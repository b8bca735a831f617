"""BSSCI framing: cut a base station's byte stream into message maps, and frame maps to send.
Pure code without I/O: a connection feeds its bytes to a `Framer` and writes `encode_frame` output."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "Framer",
    "FramingError",
    "encode_frame",
    "to_json_frames",
]

MAGIC = b"MIOTYB01"
DEFAULT_MAX_PAYLOAD = 1 << 20

_HEADER = struct.Struct("<8sI")
# First bytes of a JSON payload: "{" or JSON whitespace before it (RFC 8259). None of them can start
# a MessagePack map (they are the fixints 9, 10, 13, 32 and 123), so the choice is unambiguous.
_JSON_FIRST = frozenset(b" \t\r\n{")
HEADER_SIZE = _HEADER.size  # 12: identifier + uint32 little-endian payload size

# One packer for the module: pack() is several times cheaper than packb(),
# which builds a new Packer per call. Not thread-safe; frames are encoded on
# the reactor thread.
_packer = msgpack.Packer(use_bin_type=True)
# For messages whose floats the specification makes single precision (float32 on the wire).
_single_packer = msgpack.Packer(use_bin_type=True, use_single_float=True)


class FramingError(Exception):
    """The byte stream broke the framing rules; the connection must be closed."""


@attrs.define
class Framer:
    """Incremental frame decoder for one connection.

    `feed` returns every complete message and keeps a trailing partial frame.
    After it raised `FramingError` the stream position is lost, so every
    later call raises too.
    """

    max_payload: int = DEFAULT_MAX_PAYLOAD
    magic: bytes = MAGIC
    """The 8-byte identifier: MIOTYB01 for BSSCI, MIOTYA01 for SCACI (application centers)."""
    speaks_json: bool = attrs.field(default=False, init=False)
    """Whether the peer has sent a JSON payload: it is then answered in JSON (`to_json_frames`)."""
    # Unconsumed bytes; only the tail of a partial frame lives here between
    # calls, so whole reads are parsed straight from the caller's bytes.
    _buffer: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _failure: str | None = attrs.field(default=None, init=False, repr=False)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._failure is not None:
            raise FramingError(
                f"framer unusable after an earlier error: {self._failure}"
            )
        buffer = self._buffer
        if buffer:
            buffer += data  # amortised append: what is already held is not copied
            source: bytes | bytearray = buffer
        else:
            source = data
        try:
            messages, offset = self._parse(source)
        except FramingError as e:
            self._failure = str(e)
            # Dropped, not cleared: the traceback still holds payload views
            # of it, and a bytearray with live views cannot be resized.
            self._buffer = bytearray()
            raise
        if buffer:
            del buffer[:offset]  # CPython advances the start pointer, no copy
        elif offset < len(data):
            buffer += data[offset:]
        return messages

    def _parse(self, source: bytes | bytearray) -> tuple[list[dict[str, Any]], int]:
        """Decode the complete frames in `source`; return them and the offset consumed."""
        messages: list[dict[str, Any]] = []
        max_payload = self.max_payload
        MAGIC = self.magic  # noqa: N806 (the module constant, or SCACI's)
        offset = 0
        end = len(source)
        # A memoryview slices payloads without copying; the with block
        # releases it before the caller resizes the bytearray.
        with memoryview(source) as view:
            while end - offset >= HEADER_SIZE:
                magic, size = _HEADER.unpack_from(view, offset)
                if magic != MAGIC:
                    raise FramingError(
                        f"bad frame identifier {magic!r}, expected {MAGIC!r}"
                    )
                if size > max_payload:
                    raise FramingError(
                        f"frame payload size {size} exceeds the limit of {max_payload} bytes"
                    )
                start = offset + HEADER_SIZE
                stop = start + size
                if stop > end:
                    return messages, offset
                payload = view[start:stop]
                if size and payload[0] in _JSON_FIRST:
                    self.speaks_json = True
                    messages.append(_decode_payload(payload, as_json=True))
                else:
                    messages.append(_decode_payload(payload, as_json=False))
                offset = stop
            # A partial header: reject a wrong identifier now rather than
            # after the peer sent all 12 bytes.
            head = view[offset : offset + len(MAGIC)]
            if not MAGIC.startswith(head):
                raise FramingError(
                    f"bad frame identifier {bytes(head)!r}, expected {MAGIC!r}"
                )
        return messages, offset


def _decode_payload(payload: memoryview, *, as_json: bool) -> dict[str, Any]:
    try:
        if as_json:
            # The specification says "JSON/MessagePack"; no known base
            # station sends JSON, but accepting it costs one compare.
            message = json.loads(bytes(payload))
        else:
            message = msgpack.unpackb(payload, raw=False)
    # The payload is untrusted: any decoder failure is a protocol error.
    except Exception as e:
        raise FramingError(
            f"undecodable frame payload ({len(payload)} bytes): {e}"
        ) from e
    if type(message) is not dict:
        raise FramingError(f"frame payload is a {type(message).__name__}, not a map")
    for key in message:
        if type(key) is not str:
            raise FramingError(f"frame payload has a non-string key {key!r}")
    return message


def encode_frame(message: Mapping[str, Any], *, single_float: bool = False, magic: bytes = MAGIC) -> bytes:
    """Frame one message map as MessagePack, the encoding every base station reads; with
    `single_float` its floats go out as float32 (else float64); `magic` is the identifier."""
    payload: bytes = (_single_packer if single_float else _packer).pack(message)
    return _HEADER.pack(magic, len(payload)) + payload


def to_json_frames(data: bytes) -> bytes:
    """The frames `data` holds (MessagePack, as encoded here), re-encoded as JSON frames: a station
    that speaks JSON is answered in JSON. Byte strings are already lists of integers on the wire."""
    out = []
    for message in Framer(max_payload=1 << 32).feed(data):
        payload = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
        out.append(_HEADER.pack(MAGIC, len(payload)) + payload)
    return b"".join(out)


def op_frame_encoder(command: str) -> Callable[[int], bytes]:
    """A fast encoder of the frame `{"command": command, "opId": op}`, most of what a session
    sends (Rsp/Cmp/ping): the map's constant part is packed once."""
    prefix = b"\x82" + _packer.pack("command") + _packer.pack(command) + _packer.pack("opId")
    pack = _packer.pack

    def frame(op: int) -> bytes:
        payload = prefix + pack(op)
        return MAGIC + len(payload).to_bytes(4, "little") + payload

    return frame
