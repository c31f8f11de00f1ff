"""The scan's candidates hold every customer a time-based rule finds due: the SQL and Python scans both
start from them, so a candidate query that missed someone would go unnoticed by comparing the two."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from services.triggers import rules as R
from services.triggers import store
from shared.db import setup_database
from tests.integration.test_triggers_scan_sql import AS_OF, CFG, MIGRATIONS, _facts, _load

pytestmark = pytest.mark.asyncio
UTC = dt.UTC


@pytest.mark.parametrize("as_of", [AS_OF, dt.datetime(2026, 12, 31, 11, tzinfo=UTC),
                                   dt.datetime(2027, 2, 26, 23, tzinfo=UTC)], ids=["dst", "new-year", "feb-29"])
async def test_candidates_hold_every_customer_with_a_trigger_due(database, unique, as_of):
    rng = random.Random(11)
    facts = [_facts(rng, i, as_of) for i in range(600)]
    pool = await setup_database(database, f"trgcand_{unique}", MIGRATIONS)
    try:
        await _load(pool, facts)
        async with pool.acquire() as conn, pool.acquire() as other:
            everyone = [f.customer_id for f in facts]
            seen = 0
            for step in range(0, 72 * 60, 97):  # three days of scan instants, past every window's edges
                at = as_of + dt.timedelta(minutes=step)
                loaded = await store.load_facts(conn, everyone, lock=False)
                due = {cid for cid, f in loaded.items() if R.time_based(f, at, CFG, None)}
                # Every other instant the two halves of the query on two connections at once.
                candidates = await store.scan_candidates(conn, at, CFG, other=other if step % 2 else None)
                assert candidates == sorted(set(candidates))  # sorted, each once
                assert due <= set(candidates), sorted(due - set(candidates))[:10]
                seen += len(due)
            assert seen > 500
    finally:
        await pool.close()
