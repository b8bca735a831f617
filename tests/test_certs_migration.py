"""Issued certificates move from a base-station EUI column to generic bindings (core migration 3),
on SQLite and on a real PostgreSQL database, and are listed and searched by their binding."""

from __future__ import annotations

import json

import pytest_twisted

from bsscihub.family import binding_kinds, installed_families
from bsscihub.pki import Binding
from bsscihub.store import Store
from bsscihub.store.schema import CORE_MIGRATIONS
from bsscihub.web import certs

BEFORE = [m for m in CORE_MIGRATIONS if (m.component, m.version) in {("core", 1), ("core", 2)}]
EUI = "70b3d59cd0000001"


@pytest_twisted.ensureDeferred
async def test_old_rows_become_bindings(store: Store) -> None:
    await store.migrate(BEFORE)
    rows = [("a1", "bs-roof", EUI), ("b2", "bs-loose", None), ("c3", "ac-cli", None), ("d4", "ac-web", None),
            ("e5", "bs-web", None)]
    await store.executemany(
        "INSERT INTO issued_certs (serial, name, bs_eui, not_after, issued_at, actor) VALUES (?, ?, ?, 2e9, ?, 'x')",
        [(serial, name, eui, 1000.0 + i) for i, (serial, name, eui) in enumerate(rows)],
    )
    # How application-center certificates were audited when issued (the CLI, the web); the rows say nothing.
    audited = [("c3", {"name": "ac-cli", "applicationCenter": True}),
               ("d4", {"name": "ac-web", "bsEui": None, "notAfter": 2e9, "kind": "application-center"}),
               ("e5", {"name": "bs-web", "bsEui": None, "notAfter": 2e9, "kind": "base-station"})]
    await store.executemany(
        "INSERT INTO audit_log (time, actor, action, target, detail) VALUES (1, 'x', 'cert.issue', ?, ?)",
        [(serial, json.dumps(detail, sort_keys=True)) for serial, detail in audited],
    )

    applied = await store.migrate(CORE_MIGRATIONS)
    assert ("core", 3) in [(m.component, m.version) for m in applied]
    moved = await store.fetchall("SELECT serial, name, binding_kind, binding_subject FROM issued_certs ORDER BY serial")
    assert moved == [("a1", "bs-roof", "bssci.station", EUI), ("b2", "bs-loose", None, ""),
                     ("c3", "ac-cli", "scaci.ac", ""), ("d4", "ac-web", "scaci.ac", ""), ("e5", "bs-web", None, "")]
    columns = await store.fetchall("SELECT * FROM issued_certs WHERE serial = 'a1'")
    assert len(columns[0]) == 7  # the EUI column is gone, not left beside the binding

    kinds = binding_kinds(installed_families())
    items, total = await certs.list_issued(store, kinds, q="D59C", limit=10, offset=0)
    assert total == 1 and items[0]["binding"] == {"kind": "bssci.station", "subject": EUI}
    assert items[0]["bsEui"] == EUI  # the family's field, as the listing had it before bindings
    items, _ = await certs.list_issued(store, kinds, q=None, limit=10, offset=0)
    assert {i["serial"]: (i["binding"], i["bsEui"]) for i in items}["c3"] == ({"kind": "scaci.ac", "subject": ""},
                                                                              None)
    # and new certificates are recorded with theirs
    await certs.record_issued(store, "f6", "thing", Binding("test.thing", "x-1"), 2e9, 2000.0, "admin")
    await certs.record_issued(store, "f7", "plain", None, 2e9, 2001.0, "admin")
    assert await store.fetchall("SELECT binding_kind, binding_subject FROM issued_certs WHERE serial IN ('f6', 'f7')"
                                " ORDER BY serial") == [("test.thing", "x-1"), (None, "")]
    revoked = await certs.revoke(store, "a1", "lost", "admin", 3000.0, kinds)
    assert (revoked["name"], revoked["binding"], revoked["bsEui"]) == ("bs-roof", {"kind": "bssci.station",
                                                                                  "subject": EUI}, EUI)
