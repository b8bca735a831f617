"""The published contract as data the tests check: EventSpec payload texts and the docs' topic tables
read into key sets, and a checker for bus events against a family's declared EventSpecs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from bsscihub.bus import Event
from bsscihub.contract import Shape, event_problems, shape_of, topic_pattern
from bsscihub.family import EventSpec

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "docs" / name for name in ("mqtt.md", "families.md", "gate.md")]


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


def doc_problems(event: Event, rows: dict[str, list[DocRow]] | None = None) -> list[str]:
    """What the docs' topic tables say that `event` contradicts: its row, retained, the keys of its payload."""
    rows = doc_rows() if rows is None else rows
    found = [row for topic, listed in rows.items() if topic_pattern(topic).match(event.topic) for row in listed]
    if not found:
        return [f"{event.topic} is in no topic table of {', '.join(d.name for d in DOCS)}"]
    problems = []
    for row in found:
        if row.retained != event.retain:
            problems.append(f"{row.file}: {event.topic} retained {row.retained}, published {event.retain}")
        shape = shape_of(row.payload)
        if shape is None:
            continue
        missing, extra = shape.mismatch(event.payload)
        if missing:
            problems.append(f"{row.file}: {event.topic} lacks documented {missing}")
        if extra:
            problems.append(f"{row.file}: {event.topic} has undocumented {extra}")
    return problems


class ContractWitness:
    """Subscribed to a hub's bus: every event of `family` checked against its specs and the docs' topic
    tables as it is published."""

    def __init__(self, bus: Any, family: str, specs: Sequence[EventSpec]) -> None:
        self.family, self.specs = family, specs
        self.events: list[Event] = []
        self.problems: list[str] = []
        self._rows = doc_rows()
        self.unsubscribe = bus.subscribe(self)

    def __call__(self, event: Event) -> None:
        if event.family != self.family:
            return
        self.events.append(event)
        self.problems += event_problems(event, self.specs) + doc_problems(event, self._rows)

    def kinds(self) -> set[str]:
        return {e.kind for e in self.events}


violations = event_problems
__all__ = ["DOCS", "ContractWitness", "DocRow", "Shape", "doc_problems", "doc_rows", "shape_of", "topic_pattern",
           "violations"]
