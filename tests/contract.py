"""The published contract as data the tests check: EventSpec payload texts and the docs' topic tables
read into key sets, and a checker for bus events against a family's declared EventSpecs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from bsscihub.bus import Event
from bsscihub.family import EventSpec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "docs" / name for name in ("mqtt.md", "families.md", "gate.md")]
TIME_KEYS = {"time", "since", "lastSeen"}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@attrs.frozen
class Shape:
    """The top-level keys an object payload has: `required` always, `optional` (written "key"?) sometimes."""

    required: frozenset[str]
    optional: frozenset[str]
    open: bool = False
    """Written with `...`: other keys may follow (the fields of an event's kind)."""


def shape_of(text: str) -> Shape | None:
    """The keys of a payload written as the docs and EventSpecs write it, e.g.
    `{"mac", "time", "values": {quantity: number}, "invalid"?} (note)`; None for a prose description."""
    text = text.strip().strip("`").strip()
    if not text.startswith("{"):
        return None
    required: set[str] = set()
    optional: set[str] = set()
    depth, i, expecting_key, is_open = 0, 0, False, False
    while i < len(text):
        ch = text[i]
        if text.startswith("...", i) and depth == 1:
            is_open, i = True, i + 3
            continue
        if ch in "{[":
            depth += 1
            expecting_key = depth == 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                break
        elif ch == "," and depth == 1:
            expecting_key = True
        elif ch == '"':
            end = text.index('"', i + 1)
            if depth == 1 and expecting_key:
                rest = text[end + 1:].lstrip()
                (optional if rest.startswith("?") else required).add(text[i + 1:end])
                expecting_key = False
            i = end
        elif not ch.isspace() and depth == 1:
            expecting_key = False
        i += 1
    return Shape(frozenset(required), frozenset(optional), is_open)


@attrs.frozen
class DocRow:
    file: str
    topic: str
    retained: bool
    payload: str


def doc_rows(files: Sequence[Path] = DOCS) -> dict[str, list[DocRow]]:
    """Every `| \\`{p}/topic\\` | yes/no | payload |` row of the docs' topic tables, by topic (without {p}/)."""
    rows: dict[str, list[DocRow]] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) < 3 or not cells[0].startswith("`{p}/") or cells[1] not in ("yes", "no"):
                continue
            topic = cells[0].strip("`")[len("{p}/"):]
            payload = cells[2].replace("\\|", "|")
            rows.setdefault(topic, []).append(DocRow(path.name, topic, cells[1] == "yes", payload))
    return rows


def topic_pattern(spec_topic: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(spec_topic)) + "$")


def violations(event: Event, specs: Iterable[EventSpec]) -> list[str]:
    """What is wrong with `event` against the family's specs (empty: it conforms)."""
    candidates = [s for s in specs if s.kind == event.kind]
    if not candidates:
        return [f"{event.family}: kind {event.kind!r} ({event.topic}) is declared by no EventSpec"]
    problems: list[str] = []
    for spec in candidates:
        problems = []
        if not topic_pattern(spec.topic).match(event.topic):
            problems.append(f"topic {event.topic} does not match {spec.topic}")
        if spec.retained != event.retain:
            problems.append(f"{event.topic}: retain {event.retain}, declared {spec.retained}")
        shape = shape_of(spec.payload)
        if shape is not None:
            keys = set(event.payload)
            if missing := shape.required - keys:
                problems.append(f"{event.topic}: missing {sorted(missing)}")
            if not shape.open and (extra := keys - shape.required - shape.optional):
                problems.append(f"{event.topic}: undeclared {sorted(extra)}")
        problems += time_problems(event.topic, event.payload)
        if not problems:
            return []
    return problems


def time_problems(where: str, payload: Mapping[str, Any]) -> list[str]:
    """Times in a payload are RFC 3339 strings (or null), never epoch numbers."""
    return [
        f"{where}: {key} = {payload[key]!r} is not RFC 3339"
        for key in TIME_KEYS & set(payload)
        if payload[key] is not None and not (isinstance(payload[key], str) and RFC3339.match(payload[key]))
    ]


class ContractWitness:
    """Subscribed to a hub's bus: every event of `family` checked against its specs as it is published."""

    def __init__(self, bus: Any, family: str, specs: Sequence[EventSpec]) -> None:
        self.family, self.specs = family, specs
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.unsubscribe = bus.subscribe(self)

    def __call__(self, event: Event) -> None:
        if event.family != self.family:
            return
        self.events.append(event)
        self.problems += violations(event, self.specs)

    def kinds(self) -> set[str]:
        return {e.kind for e in self.events}
