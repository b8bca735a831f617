"""The contract helpers every family shares: RFC 3339 times and the rule for numbers JSON cannot carry."""

from __future__ import annotations

import datetime
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsscihub.contract import finite_doc, masked_url, opt_time, rfc3339
from bsscihub.errors import CommandError
from bsscihub.mqtt.bridge import decode_command


@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
def test_rfc3339_is_utc_with_milliseconds(seconds: float) -> None:
    text = rfc3339(seconds)
    parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert text.endswith("Z") and len(text) == 24
    assert abs(parsed.timestamp() - seconds) < 0.001 + 1e-6
    assert parsed.timestamp() <= seconds + 1e-6, "truncated, never rounded up into the next second"


def test_opt_time_keeps_never_as_null() -> None:
    assert opt_time(None) is None and opt_time(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1700000000.25) == "2023-11-14T22:13:20.250Z"


def test_non_finite_numbers_become_null_with_the_reason() -> None:
    doc = {"temp": float("nan"), "load": [0.5, float("inf")], "deep": {"x": float("-inf")}, "raw": b"\x01\xff",
           "ok": 1.5, "n": None}
    cleaned = finite_doc(doc)
    assert cleaned == {"temp": None, "load": [0.5, None], "deep": {"x": None}, "raw": "01ff", "ok": 1.5, "n": None,
                       "invalid": {"temp": "NaN", "load.1": "Infinity", "deep.x": "-Infinity"}}
    json.dumps(cleaned, allow_nan=False)
    assert finite_doc({"a": 1}) == {"a": 1}, "a clean document gets no invalid field"


@pytest.mark.parametrize("payload", [b'{"data": NaN}', b'{"args": {"x": -Infinity}}', b'{"v": 1e400}'])
def test_commands_with_numbers_json_cannot_carry_are_refused_with_the_reason(payload: bytes) -> None:
    with pytest.raises(CommandError, match="NaN|Infinity|1e400"):
        decode_command(payload)
    assert decode_command(b'{"v": 1.5e3}') == {"v": 1500.0}


@pytest.mark.parametrize(("value", "expected"), [
    ("70B3D59CD0000001", "70b3d59cd0000001"), (0x70B3D59CD0000001, "70b3d59cd0000001"), (0, "0000000000000000"),
    ("70b3d59cd000001", None), ("70b3d59cd00000011", None), ("70b3d59cd000000g", None), (" 0b3d59cd0000001", None),
    ("0_b3d59cd0000001", None), (1 << 64, None), (-1, None), (True, None), (None, None), (1.0, None),
])  # fmt: skip
def test_eui64_is_sixteen_lower_case_hex_digits(value: object, expected: str | None) -> None:
    from bsscihub.contract import eui64

    assert eui64(value) == expected


def test_masked_url_hides_only_the_password() -> None:
    assert masked_url("postgresql://hub:s3cr@t@db:5432/hub") == "postgresql://hub:***@db:5432/hub"
    assert masked_url("mqtts://user:pw@broker:8883") == "mqtts://user:***@broker:8883"
    assert masked_url("https://hooks.example/x?token=1") == "https://hooks.example/x?token=1"  # no password
    assert masked_url("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert masked_url("http://[::1") == "http://[::1"  # does not parse: shown as it is
