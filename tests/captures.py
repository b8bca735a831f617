"""Frames captured from real base stations (copies kept under tests/data/captures).

The tests read them from here, never from outside the checkout, so a user's clone runs them all.
"""

from __future__ import annotations

from pathlib import Path

CAPTURES = Path(__file__).parent / "data" / "captures"


def load_capture(name: str) -> bytes:
    """The whole frame (header and payload) of capture `name`, as bytes."""
    return bytes.fromhex("".join((CAPTURES / name).read_text().split()))
