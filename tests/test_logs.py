"""Log output: text for people, JSON lines for collectors, both filtered by level."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger

from bsscihub.logs import make_observer


def emit(level: str, fmt: str) -> str:
    out = io.StringIO()
    log = Logger(namespace="bsscihub.test", observer=make_observer(level, fmt, out))
    log.debug("hidden unless debug {n}", n=1)
    log.info("attached {epEui} to {bsEui}", epEui="0011223344556677", bsEui="70b3d59cd0000001")
    log.error("broken {what}", what="thing")
    return out.getvalue()


def test_text_lines_are_formatted_and_filtered() -> None:
    text = emit("info", "text")
    assert "attached 0011223344556677 to 70b3d59cd0000001" in text
    assert "broken thing" in text
    assert "hidden" not in text
    assert "hidden unless debug 1" in emit("debug", "text")
    assert "attached" not in emit("error", "text")


def test_json_lines_carry_the_fields() -> None:
    lines = [json.loads(line.strip("\x1e")) for line in emit("info", "json").splitlines() if line.strip()]
    assert len(lines) == 2
    first = lines[0]
    assert first["epEui"] == "0011223344556677"
    assert first["log_namespace"] == "bsscihub.test"
    assert first["log_level"]["name"] == "info"
