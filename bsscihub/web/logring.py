"""The recent log lines shown on the admin pages: a bounded ring filled by a twisted.logger observer.

Lines are formatted once, by the scrubber every log output uses (bsscihub.logs), before they are kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, LogLevel
from zope.interface import implementer

from bsscihub.logs import render, scrub

LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3, "critical": 4}
ACCESS = "bsscihub.web.access"


@implementer(ILogObserver)
class LogRing:
    def __init__(self, size: int = 1000, max_line: int = 2000) -> None:
        self._lines: deque[dict[str, Any]] = deque(maxlen=size)
        self.max_line = max_line
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # each new line, as kept (the live stream)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        name = getattr(level, "name", "info")
        if name == "debug":
            return
        text = render(event)
        failure = event.get("log_failure")
        if failure is not None:
            # One line about the error; tracebacks stay in the real log.
            text = f"{text}: {failure.type.__name__}: {scrub(failure.getErrorMessage())}"
        line = {
            "time": float(event.get("log_time") or 0.0),
            "level": name,
            "namespace": str(event.get("log_namespace", "")),
            "text": text[: self.max_line],
        }
        self._lines.append(line)
        for listener in self.listeners:
            listener(line)

    def lines(self, *, level: str = "info", limit: int = 200, access: bool = False) -> list[dict[str, Any]]:
        """Newest first, at or above `level`; HTTP access lines only if asked for."""
        floor = LEVELS.get(level, 1)
        out = []
        for line in reversed(self._lines):
            if not access and line["namespace"] == ACCESS:
                continue
            if LEVELS.get(line["level"], 1) >= floor:
                out.append(line)
                if len(out) >= limit:
                    break
        return out
