"""With the event clock, when the leader's scan timer happens to run must not change what fires, nor
when it is said to fire (fired_at feeds the notification's schedule), nor does an admin scan at the
end of a replay depend on whether the timer had caught up first."""

from __future__ import annotations

import random

import pytest

from services.triggers.handlers import TriggersHandler
from shared.clock import EventClock
from shared.db import setup_database
from tests.integration.test_triggers_replay import (
    CFG,
    CODEC,
    MIGRATIONS,
    PARTITIONS,
    ROLES,
    as_records,
    interleave,
    world,
)

pytestmark = pytest.mark.asyncio


async def replay(database: str, schema: str, items, seed: int, max_batch: int, scan_odds: float) -> dict:
    """trigger_id -> (kind, fired_at) after a replay whose timer ticks with `scan_odds` per batch,
    ended by the admin scan at the clock's end."""
    pool = await setup_database(database, schema, MIGRATIONS)
    clock = EventClock()
    handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=clock, event_clock=True, partitions=PARTITIONS)
    rng = random.Random(seed)
    try:
        for batch in interleave(as_records(items, ROLES), rng, max_batch):
            async with pool.acquire() as conn, conn.transaction():
                await handler(conn, batch)
            if rng.random() < scan_odds:
                await handler.scheduled_scan(pool)
        async with pool.acquire() as conn:
            await handler.scan_on_demand(conn, clock.now())
            rows = await conn.fetch("SELECT trigger_id, kind, fired_at FROM fired_triggers")
        return {str(r["trigger_id"]): (r["kind"], r["fired_at"]) for r in rows}
    finally:
        await pool.close()


async def test_scan_timing_changes_neither_the_triggers_nor_their_fired_at(database, unique):
    items = world(seed=11)
    often = await replay(database, f"trg_st_a_{unique}", items, seed=1, max_batch=5, scan_odds=1.0)
    rarely = await replay(database, f"trg_st_b_{unique}", items, seed=2, max_batch=300, scan_odds=0.05)
    never = await replay(database, f"trg_st_c_{unique}", items, seed=3, max_batch=40, scan_odds=0.0)
    assert often == rarely == never
    kinds = {kind for kind, _ in often.values()}
    assert {"abandoned_cart", "replenishment", "birthday_coupon", "win_back"} <= kinds, kinds
