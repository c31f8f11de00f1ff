"""Every batch reads (and touches) its customers' facts and child rows by key, whatever the planner knows.

The tables grow faster than autovacuum analyses them: with `customer_id = ANY($1)` the planner read
the whole table for each batch (the custom plans), or compared every row with every id of the batch
(the cached generic plan), ~100 ms a batch at 20,000 customers. A table read whole shows up as a
sequential scan of it in the plan.
"""

from __future__ import annotations

import pytest

from services.triggers import store
from shared.db import setup_database
from tests.integration.test_triggers_handler import MIGRATIONS

pytestmark = pytest.mark.asyncio

_SEED = """
INSERT INTO customer_facts (customer_id, orders_count, last_purchase_at)
SELECT 'c' || g, 1, now() FROM generate_series(1, 5000) g;
INSERT INTO carts (customer_id, cart_id, last_activity_at, due_at) SELECT 'c' || g, 'k', now(), now()
FROM generate_series(1, 5000) g;
INSERT INTO category_facts (customer_id, category, purchases) SELECT 'c' || g, 'coffee', ARRAY[now()]
FROM generate_series(1, 5000) g;
INSERT INTO point_lots (customer_id, lot_id, points, expires_at) SELECT 'c' || g, 'l', 10, now()
FROM generate_series(1, 5000) g;
"""
_TABLES = ("customer_facts", "carts", "category_facts", "point_lots")


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("name", ["_LOAD_FACTS", "_LOAD_FACTS_LOCKED", "_LOAD_CHILDREN", "_TOUCH_FACTS"])
async def test_facts_are_read_by_key_without_statistics(database, unique, mode, name):
    pool = await setup_database(database, f"trgplan_{unique}", MIGRATIONS)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_SEED)  # and no ANALYZE: as a young database's tables are
            await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            await conn.execute(f"PREPARE load_plan_{unique}(text[]) AS {getattr(store, name)}")
            ids = ",".join(f"c{i}" for i in range(1000, 1700))
            plan = "\n".join(r[0] for r in await conn.fetch(
                f"EXPLAIN (ANALYZE, COSTS false) EXECUTE load_plan_{unique}('{{{ids}}}')"))
            await conn.execute(f"DEALLOCATE load_plan_{unique}")
        read_whole = [t for t in _TABLES if f"Seq Scan on {t}" in plan]
        assert not read_whole, plan
        # and it reads what the batch asked for
        async with pool.acquire() as conn:
            loaded = await store.load_facts(conn, [f"c{i}" for i in range(1000, 1700)] + ["nobody"])
        assert sorted(loaded) == sorted(f"c{i}" for i in range(1000, 1700))
        f = loaded["c1234"]
        assert list(f.carts) == ["k"] and list(f.categories) == ["coffee"] and [lot.lot_id for lot in f.lots] == ["l"]
    finally:
        await pool.close()
