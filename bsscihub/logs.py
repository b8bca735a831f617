"""Log output for the hub: human-readable text by default, JSON lines with `log.format: json`.

Both filter by `log.level`; everything logs through twisted.logger.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


def make_observer(level: str, fmt: str, out: IO[str] | None = None) -> ILogObserver:
    out = sys.stdout if out is None else out
    inner = jsonFileLogObserver(out) if fmt == "json" else textFileLogObserver(out)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(_LEVELS[level])])


# twistd takes its log observer factory by dotted name, so the chosen settings wait here.
_twistd_settings = ("info", "text")


def use_for_twistd(level: str, fmt: str) -> str:
    """Remember the settings; returns the dotted name to hand to twistd's `logger` option."""
    global _twistd_settings
    _twistd_settings = (level, fmt)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    return make_observer(*_twistd_settings)
