"""The set-based (SQL) wall-clock scan against the Python rules on the same facts: the same
`triggers.fired.v1` bytes per customer, the same fired_triggers rows and the same marks, over
random facts built around the edges (time zones PostgreSQL reads differently, repeated and skipped
local midnights, 29 February, lateness bounds, microseconds, own replenishment cycles)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from pathlib import Path

import pytest

from services.triggers import rules as R
from services.triggers import store
from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot, Store
from services.triggers.handlers import TriggersHandler
from services.triggers.rules import RuleConfig
from shared.avro import AvroCodec, SchemaRegistry
from shared.clock import FixedClock
from shared.db import setup_database
from shared.rules import load_rules

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "triggers" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
CFG = RuleConfig.from_rules(load_rules(environ={}))
UTC = dt.UTC
AS_OF = dt.datetime(2026, 10, 24, 22, 30, tzinfo=UTC)  # European DST ends the next night
ZONES = [None, "", "UTC", "America/New_York", "Asia/Kathmandu", "America/Havana", "Atlantic/Azores",
         "Australia/Lord_Howe", "Pacific/Kiritimati", "Antarctica/Casey", "CET", "EST", "Bad/Zone",
         "America/Santiago", "Europe/London"]


def _facts(rng: random.Random, i: int, as_of: dt.datetime) -> CustomerFacts:
    def near(days: float) -> dt.datetime:
        return as_of + dt.timedelta(days=days, microseconds=rng.choice([0, 0, 1, 999_999, 123_456]))

    f = CustomerFacts(f"c{i:04d}", timezone=rng.choice(ZONES), home_store_id=rng.choice([None, "s1", "s2"]))
    day = (as_of + dt.timedelta(days=rng.randint(-3, 6))).date()
    f.birthday = rng.choice([None, f"--{day:%m-%d}", f"1990-{day:%m-%d}", "--02-29", "--12-31", "--01-01"])
    f.birthday_fired_for = rng.choice([None, None, 2025, 2026])
    if rng.random() < 0.7:
        f.orders_count = rng.randint(0, 4)
        f.last_purchase_at = near(-CFG.win_back_lapse.days - rng.choice([0, 0.001, 1, 15, 29.999, 30, 30.01, -0.01]))
        f.winback_fired_for = rng.choice([None, None, f.last_purchase_at])
    for k in range(rng.randint(0, 2)):
        f.carts[f"k{k}"] = Cart(f"k{k}", near(-rng.choice([0.04, 0.0416, 0.05, 0.9, 1.0417, 1.05, 2])),
                                rng.randint(1, 5), rng.choice([0, 5, 2500, 129990]),
                                rng.choice([None, "tea", ""]), rng.choice([None, "sku-1"]),
                                rng.choice(["open", "open", "abandoned"]))
    for name in rng.sample(["coffee", "tea", "beans", "Zeta", "\u00e9clair"], rng.randint(0, 3)):
        cycle = CFG.replenishment_cycles.get(name, 21)
        last = near(-(cycle - CFG.replenishment_days_before) - rng.choice([0, 0.5, 3, 6.99, 7.01, -0.5]))
        purchases = [last - dt.timedelta(days=rng.choice([9, 10, 11]) * n) for n in range(rng.choice([1, 1, 2, 3, 4]))]
        f.categories[name] = CategoryHistory(name, sorted(purchases), rng.randint(1, 9),
                                             rng.choice([None, None, last]))
    for k in range(rng.randint(0, 3)):
        f.lots.append(PointLot(f"l{k}", rng.choice([40, 60, 150]), near(rng.choice([-1, 1, 6.5, 7.2, 29.9, 30.1, 45]))))
    f.points_fired_for = rng.choice([None, None, "2026-10", "2026-11"])
    return f


async def _load(pool, facts: list[CustomerFacts]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await store.upsert_stores(conn, [Store("s1", "One", "Asia/Kathmandu"), Store("s2", "Two", "CET")])
        await store.save_facts(conn, facts, CFG)


async def _state(pool) -> dict:
    async with pool.acquire() as conn:
        out = await conn.fetch("SELECT key, value FROM outbox ORDER BY id")
        by_key: dict[bytes, list[bytes]] = {}
        for r in out:
            by_key.setdefault(r["key"], []).append(r["value"])
        return {
            "outbox": by_key,
            "fired": [tuple(r) for r in await conn.fetch(
                "SELECT trigger_id, kind, customer_id, period, fired_at, occurred_at, cause_event_id, context, offer "
                "FROM fired_triggers ORDER BY trigger_id")],
            "facts": [tuple(r) for r in await conn.fetch(
                "SELECT customer_id, birthday_fired_for, winback_fired_for, points_fired_for FROM customer_facts "
                "ORDER BY customer_id")],
            "carts": [tuple(r) for r in await conn.fetch(
                "SELECT customer_id, cart_id, status FROM carts WHERE status = 'open' ORDER BY 1, 2")],
            "categories": [tuple(r) for r in await conn.fetch(
                "SELECT customer_id, category, reminded_for FROM category_facts ORDER BY 1, 2")],
        }


@pytest.mark.parametrize("as_of", [AS_OF, dt.datetime(2026, 12, 29, 9, tzinfo=UTC),
                                   dt.datetime(2027, 2, 24, 18, tzinfo=UTC)], ids=["dst", "new-year", "feb-29"])
async def test_sql_scan_fires_what_the_python_rules_fire(database, unique, as_of, monkeypatch):
    sparse = [False]

    async def customers(conn):  # every other scan: the candidates as a small share of many customers
        sparse[0] = not sparse[0]
        return 10.0 ** 9 if sparse[0] else 0.0
    monkeypatch.setattr(store, "customers_estimate", customers)
    rng = random.Random(7)
    facts = [_facts(rng, i, as_of) for i in range(600)]
    pools = [await setup_database(database, f"trgsql_{unique}_{n}", MIGRATIONS) for n in ("sql", "py")]
    try:
        handlers = [TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(as_of)) for _ in pools]

        async def python_only(conn):
            return None
        handlers[1]._sql_zones = python_only  # the Python rules for every customer
        for pool in pools:
            await _load(pool, facts)
        totals = [0, 0]
        # Scans over three days: every lateness bound and local midnight above is crossed.
        for step in range(0, 72 * 60, 97):
            at = as_of + dt.timedelta(minutes=step)
            for n, (pool, handler) in enumerate(zip(pools, handlers, strict=True)):
                async with pool.acquire() as conn:
                    # Chunks on two connections at once, as the leader's timer job runs them.
                    totals[n] += await handler.scan(conn, at, chunk=137, pool=pool)
        assert totals[0] == totals[1] > 100
        sql, py = await _state(pools[0]), await _state(pools[1])
        assert sql["fired"] == py["fired"]
        assert sql["outbox"] == py["outbox"]
        assert sql == py
        kinds = {row[1] for row in sql["fired"]}
        assert kinds == {"birthday_coupon", "win_back", "abandoned_cart", "replenishment", "points_expiring"}
        # A repeated scan fires nothing new.
        for pool, handler in zip(pools, handlers, strict=True):
            async with pool.acquire() as conn:
                assert await handler.scan(conn, at) == 0
    finally:
        for pool in pools:
            await pool.close()


async def _lock_waiter(pool, pid: int, scan: asyncio.Task) -> None:
    """Returns once backend `pid` waits for a lock (polled, with a deadline)."""
    deadline = time.monotonic() + 30
    async with pool.acquire() as watcher:
        while await watcher.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) != "Lock":
            assert not scan.done(), "the scan ended without waiting for the batch's row lock"
            assert time.monotonic() < deadline, "the scan never waited for the batch's row lock"
            await asyncio.sleep(0.005)


async def test_sql_scan_judges_again_a_customer_whose_facts_changed_meanwhile(database, unique):
    """A batch commits a new purchase after the scan's statement read the facts and before it marked
    them: the mark skips the row (its version moved on), the SQL fires and marks nothing of it (not
    its cart either) and the Python rules judge the new facts."""
    pool = await setup_database(database, f"trgsql_{unique}", MIGRATIONS)
    try:
        f = CustomerFacts("c1", timezone="UTC", orders_count=2,
                          last_purchase_at=AS_OF - CFG.win_back_lapse - dt.timedelta(days=1))
        f.carts["k1"] = Cart("k1", AS_OF - CFG.cart_after - dt.timedelta(minutes=5), 1, 2500, None, None, "open")
        other = CustomerFacts("c2", timezone="UTC", orders_count=1, last_purchase_at=f.last_purchase_at)
        await _load(pool, [f, other])
        handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))
        async with pool.acquire() as batch, pool.acquire() as conn:
            tx = batch.transaction()
            await tx.start()
            await batch.execute("UPDATE customer_facts SET last_purchase_at = $1, winback_due_at = $2 "
                                "WHERE customer_id = 'c1'", AS_OF - dt.timedelta(days=1),
                                AS_OF - dt.timedelta(days=1) + CFG.win_back_lapse)
            scan = asyncio.create_task(handler.scan(conn, AS_OF))
            await _lock_waiter(pool, conn.get_server_pid(), scan)  # read the old facts, marking them waits
            await tx.commit()
            assert await scan == 2  # c2's win-back; c1 judged again on the new facts: its cart, no win-back
        async with pool.acquire() as conn:
            fired = await conn.fetch("SELECT customer_id, kind FROM fired_triggers ORDER BY 1")
            assert [tuple(r) for r in fired] == [("c1", "abandoned_cart"), ("c2", "win_back")]
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 2
            assert await conn.fetchval("SELECT winback_fired_for FROM customer_facts WHERE customer_id = 'c1'") is None
            assert await conn.fetchval("SELECT status FROM carts") == "abandoned"
    finally:
        await pool.close()


async def test_sql_scan_fires_once_when_the_batch_it_waited_for_changed_nothing_it_reads(database, unique):
    """The row the scan waited for was changed in a column no rule reads: judged again, it still fires once."""
    pool = await setup_database(database, f"trgsql_{unique}", MIGRATIONS)
    try:
        f = CustomerFacts("c1", timezone="UTC", orders_count=2,
                          last_purchase_at=AS_OF - CFG.win_back_lapse - dt.timedelta(days=1))
        await _load(pool, [f])
        handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))
        async with pool.acquire() as batch, pool.acquire() as conn:
            tx = batch.transaction()
            await tx.start()
            await batch.execute("UPDATE customer_facts SET city = 'Paris' WHERE customer_id = 'c1'")
            scan = asyncio.create_task(handler.scan(conn, AS_OF))
            await _lock_waiter(pool, conn.get_server_pid(), scan)
            await tx.commit()
            assert await scan == 1
            assert await handler.scan(conn, AS_OF) == 0
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM fired_triggers WHERE kind = 'win_back'") == 1
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
            assert await conn.fetchval("SELECT winback_fired_for FROM customer_facts") == f.last_purchase_at
    finally:
        await pool.close()


async def test_sql_scan_fires_nothing_twice_when_a_trigger_is_re_armed(database, unique):
    """Facts re-derived after an unmerge forget what fired: the scan finds the trigger due again, but
    its trigger_id is recorded already, so nothing new is sent (the facts are marked again)."""
    pool = await setup_database(database, f"trgsql_{unique}", MIGRATIONS)
    try:
        f = CustomerFacts("c1", timezone="UTC", orders_count=2,
                          last_purchase_at=AS_OF - CFG.win_back_lapse - dt.timedelta(days=1))
        await _load(pool, [f])
        handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))
        async with pool.acquire() as conn:
            assert await handler.scan(conn, AS_OF) == 1
            await conn.execute("UPDATE customer_facts SET winback_fired_for = NULL")
            assert await handler.scan(conn, AS_OF) == 0
            assert await conn.fetchval("SELECT count(*) FROM fired_triggers") == 1
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
            assert await conn.fetchval("SELECT winback_fired_for FROM customer_facts") == f.last_purchase_at
    finally:
        await pool.close()


async def test_sql_scan_judges_again_a_chunk_whose_trigger_was_recorded_meanwhile(database, unique):
    """A trigger_id recorded by another transaction while the chunk inserts it: the unique key rolls the
    chunk back, the Python rules judge it again and send nothing twice."""
    pool = await setup_database(database, f"trgsql_{unique}", MIGRATIONS)
    try:
        f = CustomerFacts("c1", timezone="UTC", orders_count=2,
                          last_purchase_at=AS_OF - CFG.win_back_lapse - dt.timedelta(days=1))
        await _load(pool, [f])
        handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))
        async with pool.acquire() as other, pool.acquire() as conn:
            tx = other.transaction()
            await tx.start()
            period = f.last_purchase_at.astimezone(UTC).isoformat()
            await other.execute(
                "INSERT INTO fired_triggers (trigger_id, kind, customer_id, period, fired_at) "
                "VALUES ($1, 'win_back', 'c1', $2, $3)", R.trigger_id("win_back", "c1", period), period, AS_OF)
            scan = asyncio.create_task(handler.scan(conn, AS_OF))
            await _lock_waiter(pool, conn.get_server_pid(), scan)  # its insert waits for the other's key
            await tx.commit()
            assert await scan == 0
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM fired_triggers") == 1
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
            assert await conn.fetchval("SELECT winback_fired_for FROM customer_facts") == f.last_purchase_at
    finally:
        await pool.close()
