"""A scan chunk's decision (store._SCAN_DUE) reads each of its WITH queries once, on tables the planner
has statistics for: a WITH query read again for every row of another (a nested loop over CTE scans)
is quadratic in the chunk. A change to the facts read did exactly that at 100,000 customers (2.2 s
against 1.0 s for the scan) while the equivalence tests, on a few hundred customers, all passed."""

from __future__ import annotations

import orjson
import pytest

from bench.triggers_scan import _CATEGORIES, _CHILDREN, _FILL, _LOTS, AS_OF  # the benchmark's facts
from services.triggers import store
from shared.db import setup_database
from tests.integration.test_triggers_scan_sql import CFG, MIGRATIONS

pytestmark = pytest.mark.asyncio
CUSTOMERS = 20_000  # ~5,500 candidates, half of them one chunk: a per-row rescan shows; loads in ~1 s


def _rescanned_ctes(node: dict) -> list[str]:
    """The CTE scans of a plan (EXPLAIN ANALYZE, JSON) that ran more than once."""
    found = []
    if node.get("Node Type") == "CTE Scan" and node.get("Actual Loops", 1) > 1:
        found.append(f"{node['CTE Name']} x{node['Actual Loops']}")
    for child in node.get("Plans", []):
        found += _rescanned_ctes(child)
    return found


async def test_a_chunk_reads_each_of_its_with_queries_once(database, unique, monkeypatch):
    pool = await setup_database(database, f"trgscanplan_{unique}", MIGRATIONS, statement_timeout_ms=120_000)
    try:
        async with pool.acquire() as conn:
            for sql in (_FILL, _CHILDREN, _CATEGORIES, _LOTS):
                await conn.execute(sql, CUSTOMERS, AS_OF)
            await conn.execute("ANALYZE")  # as autovacuum keeps a live table
            ids = await store.scan_candidates(conn, AS_OF, CFG)
            assert len(ids) * 20 >= await store.customers_estimate(conn)  # a dense chunk, as in a large scan
            monkeypatch.setattr(store, "_SCAN_DUE", "EXPLAIN (ANALYZE, FORMAT JSON) " + store._SCAN_DUE)
            zones = sorted(await store.sql_zones(conn))
            tr = conn.transaction()
            await tr.start()
            try:
                rows = await store.scan_due_sql(conn, ids[: len(ids) // 2], AS_OF, CFG, zones, "UTC")
            finally:
                await tr.rollback()
        explained = rows[0][0]  # the pool decodes json itself
        plan = (orjson.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
        assert not _rescanned_ctes(plan), _rescanned_ctes(plan)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA trgscanplan_{unique} CASCADE")
        await pool.close()
