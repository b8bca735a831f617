"""Marking uplink copies published on PostgreSQL: one index probe per key whatever the batch size,
never a read of the whole partial index with its dead entries, and only the named copies marked."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from bsscihub.protocols.bssci.registry import _MARK_PUBLISHED, Registry
from bsscihub.protocols.bssci.schema import MIGRATIONS
from bsscihub.store import Cursor, Store, row_statements
from bsscihub.store.schema import CORE_MIGRATIONS

PUBLISHED = 20_000  # copies marked already: dead entries of the partial index until a vacuum
PENDING = 1_500  # uplinks with two unpublished copies each
MARKED = 1_000  # of those, marked in one batch

_COPY = (
    "INSERT INTO mioty_uplinks (ep_eui, packet_cnt, bs_eui, received, rx_time, snr, rssi, data, format,"
    " dl_open, response_exp, dl_ack, published)"
    " SELECT lpad(to_hex(mod(n, 400)), 16, '0'), {cnt}, {bs}, n, n, 1.0, -100.0, '\\x00'::bytea, 0, 0, 0, 0, 0"
    " FROM generate_series(?::bigint, ?::bigint) AS n"
)


def _ep(n: int) -> str:
    return format(n % 400, "016x")


def _fill(c: Cursor) -> None:
    # No vacuum during the test: the dead entries stay in the index, as between two autovacuums.
    c.execute("ALTER TABLE mioty_uplinks SET (autovacuum_enabled = false)")
    c.execute(_COPY.format(cnt="n", bs="'a'"), (1, PUBLISHED))
    c.execute("UPDATE mioty_uplinks SET published = 1")
    for bs in ("'a'", "'b'"):
        c.execute(_COPY.format(cnt="n", bs=bs), (PUBLISHED + 1, PUBLISHED + PENDING))
    c.execute("ANALYZE mioty_uplinks")


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a plan that reads mioty_uplinks."""
    found = [plan] if plan.get("Relation Name") == "mioty_uplinks" and plan["Node Type"] != "ModifyTable" else []
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


def _assert_probes_per_key(plan: dict[str, Any]) -> None:
    scans = _scans(plan)
    assert scans
    for scan in scans:
        # An Index Scan with a condition on the marked key or the found copy's ctid; a Seq Scan,
        # a Bitmap Heap Scan or an Index Scan without a condition (the whole index) would fail here.
        assert scan["Node Type"] in ("Index Scan", "Tid Scan"), scan["Node Type"]
        if scan["Node Type"] == "Index Scan":
            assert scan["Index Name"] == "mioty_uplinks_unpublished"
            assert ".column1" in scan["Index Cond"] and ".column2" in scan["Index Cond"]
            assert scan["Parent Relationship"] == "Inner"  # run once per outer row, i.e. per key
        else:
            assert "TID Cond" in scan


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_marking_a_batch_probes_the_index_per_key_and_marks_only_those_copies(store: Store) -> None:
    await store.migrate(CORE_MIGRATIONS + MIGRATIONS)
    await store.interaction(_fill)
    sql = _MARK_PUBLISHED[store.dialect]
    keys = [(_ep(n), n) for n in range(PUBLISHED + 1, PUBLISHED + 1 + MARKED)]
    # The statements the batch writer runs for a batch, and the whole batch in one statement.
    statements = list(row_statements(sql, keys))
    statements.append((sql.replace("{rows}", ", ".join(["(?, ?)"] * len(keys))),
                       [v for key in keys for v in key]))
    for statement, params in statements:
        (explained,) = await store.fetchone("EXPLAIN (FORMAT JSON) " + statement, params) or (None,)
        _assert_probes_per_key(explained[0]["Plan"])

    r = Registry(store, reactor)
    await r.load()
    for ep, cnt in keys:
        r.mark_published(ep, cnt)
    r.mark_published(_ep(5), 5)  # published already
    r.mark_published(_ep(7), 10**9)  # no such uplink
    await r.flush()
    left = {(row[1], row[2], row[3]) for row in await r.unpublished()}
    assert left == {(_ep(n), n, bs) for n in range(PUBLISHED + 1 + MARKED, PUBLISHED + 1 + PENDING)
                    for bs in ("a", "b")}
    assert await store.fetchone("SELECT count(*) FROM mioty_uplinks WHERE published = 1") == (
        PUBLISHED + 2 * MARKED,)
