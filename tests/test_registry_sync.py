"""bsscihub.registry_sync on its own, on both backends: a registry edit noted on one hub is applied once on
each other hub, never on its own nor by another family, nothing is written for one hub, and notes go after
an hour."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from bsscihub.registry_sync import KEEP, RegistryChanges, note_change, noted
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS


@pytest_twisted.ensureDeferred
async def test_an_edit_noted_on_one_hub_is_applied_once_on_the_others(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS)
    clock = Clock()
    clock.advance(1_000_000.0)
    applied: dict[str, list[tuple[str, list[str]]]] = {}

    def changes(node: str, family: str = "devices", clustered: bool = True) -> RegistryChanges:
        async def apply(kind: str, keys: Sequence[str]) -> None:
            applied.setdefault(f"{node}/{family}", []).append((kind, list(keys)))

        hub: Any = SimpleNamespace(store=store, reactor=clock,
                                   cluster=SimpleNamespace(clustered=clustered, node=node))
        return RegistryChanges(hub, family, apply)

    one, two, three, other_family = changes("hub-1"), changes("hub-2"), changes("hub-3"), changes("hub-2", "ble")
    for kind, key in (("device", "d1"), ("device", "d1"), ("device", "d2"), ("gateway", "g1")):
        await one.note(kind, key)
    for hub in (one, two, three, other_family):
        await hub.poll()
    assert applied == {"hub-2/devices": [("device", ["d1", "d2"]), ("gateway", ["g1"])],
                       "hub-3/devices": [("device", ["d1", "d2"]), ("gateway", ["g1"])]}
    await two.poll()  # each note once
    assert len(applied["hub-2/devices"]) == 2

    clock.advance(5.0)
    await two.note("device", "d1")  # the other way round, later
    await one.poll()
    await two.poll()
    assert applied.get("hub-1/devices") == [("device", ["d1"])] and len(applied["hub-2/devices"]) == 2

    # One hub writes nothing; an hour on, the notes are deleted.
    await changes("alone", clustered=False).note("device", "d9")
    assert await store.fetchall("SELECT COUNT(*) FROM registry_changes") == [(5,)]
    clock.advance(KEEP + 1.0)
    await three.poll()
    assert await store.fetchall("SELECT COUNT(*) FROM registry_changes") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_which_of_a_bulk_removal_a_hub_noted_is_asked_within_the_databases_parameter_count(
        store: Store) -> None:
    # mioty's sync asks about every sensor removed since its last round: one query with 70,000 of them was
    # more parameters than PostgreSQL takes (65,535).
    await store.migrate(CORE_MIGRATIONS)
    euis = [f"{n:016x}" for n in range(70_000)]
    for eui in (euis[3], euis[-1]):
        await store.interaction(note_change, "mioty", "sensor", eui, "hub-1", 1.0)
    assert await noted(store, "mioty", "sensor", euis) == {euis[3], euis[-1]}
    assert await noted(store, "mioty", "sensor", []) == set()
