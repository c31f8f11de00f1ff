"""The loyalty worker as a real process on the real broker and PostgreSQL: SIGKILLed in the middle
of 50k events and restarted, its final balances, spend and tiers equal an independent computation
from the input, with every loyalty event emitted exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
from collections import Counter

import asyncpg
import pytest

from shared.avro import AvroCodec, SchemaRegistry
from shared.events import for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.stack import create_database, drop_database
from shared.topics import IDENTITY_EVENTS, LOYALTY, RESOLVED
from tests.conftest import ROOT
from tests.support.pipeline import Pipeline
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
CODEC = AvroCodec(SchemaRegistry.load())
EVENTS = int(os.environ.get("OMNICRM_LOYALTY_KILL_EVENTS", "50000"))


def generate(n: int, prefix: str, start: dt.datetime, seed: int = 5):
    """Sales (some redeeming), whole-order returns; and the expected outcome, computed without
    any loyalty code: 1 point per whole dollar, redemptions within the balance, returns taking
    back the order's points and spend."""
    rng = random.Random(seed)
    customers = [f"{prefix}-{i}" for i in range(max(50, n // 25))]
    model = {c: {"balance": 0, "spend": 0, "orders": []} for c in customers}
    counts: Counter = Counter()
    records = []
    for i in range(n):
        cid = rng.choice(customers)
        m = model[cid]
        at = start + dt.timedelta(milliseconds=10 * i)
        returnable = [o for o in m["orders"] if not o["returned"] and o["points"] <= m["balance"]]
        if returnable and rng.random() < 0.12:
            o = rng.choice(returnable)
            o["returned"] = True
            m["balance"] -= o["points"]
            m["spend"] -= o["total"]
            counts["points_reversed"] += o["points"] > 0
            kind, props = "return", {"order_id": o["order_id"], "return_id": f"r{i}",
                                     "currency": "USD", "total": o["total"], "lines": []}
        else:
            total = rng.randint(50, 1_200_00)
            redeem = rng.choice([0, 0, 0, rng.randint(0, m["balance"])])
            points = total // 100
            m["balance"] += points - redeem
            m["spend"] += total
            m["orders"].append({"order_id": f"{prefix}-o{i}", "total": total, "points": points,
                                "returned": False})
            counts["points_earned"] += points > 0
            counts["points_redeemed"] += redeem > 0
            kind, props = "sale", {"order_id": f"{prefix}-o{i}", "currency": "USD", "total": total,
                                   "lines": [], "points_redeemed": redeem}
        event = {"event_id": f"{prefix}-e{i}", "type": kind, "occurred_at": at, "source": "pos",
                 "customer": {"loyalty_id": cid}, "properties": props}
        records.append((cid, CODEC.encode(RESOLVED, {"customer_id": cid, "identifiers": [],
                                                     "event": for_encoding(event)})))
    return records, model, counts


def tier(spend: int) -> str:
    return "gold" if spend >= 15000_00 else "silver" if spend >= 5000_00 else "member"


async def test_sigkill_mid_stream_then_restart_gives_the_independently_computed_balances(
        broker, pg_server, unique):
    dbname = f"loyalty_kill_{unique}"
    dsn = await create_database(pg_server, dbname)
    prefix = f"k{unique}"
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
    records, model, counts = generate(EVENTS, prefix, start)
    await ensure_topics(broker, 4)
    producer = make_producer(broker, "loyalty-kill-test")
    await producer.start()
    try:
        futures = [await producer.send(IDENTITY_EVENTS.name, value, key=cid.encode())
                   for cid, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()

    pipeline = Pipeline(broker, dsn, ROOT / ".omnicrm" / "test-logs" / f"loyalty-kill-{unique}")
    conn = None
    try:
        pipeline.start("loyalty")

        async def orders_applied() -> int:
            nonlocal conn
            try:
                conn = conn or await asyncpg.connect(dsn)
                return await conn.fetchval(
                    "SELECT count(*) FROM loyalty.orders WHERE sale_event_id LIKE $1", f"{prefix}-%")
            except (asyncpg.PostgresError, OSError):
                return 0

        sales = EVENTS - counts["points_reversed"]
        at_kill = await eventually(
            lambda: _at_least(orders_applied, sales // 4), timeout=60, interval=0.02,
            message="a quarter of the sales applied")
        pipeline.kill("loyalty")
        assert at_kill < sales, "the worker finished before it could be killed mid-stream"
        pipeline.restart("loyalty")

        async def all_applied() -> bool:
            rows = await conn.fetch(
                "SELECT customer_id, balance, tier, trailing_spend FROM loyalty.accounts "
                "WHERE customer_id LIKE $1", f"{prefix}-%")
            got = {r["customer_id"]: (r["balance"], r["tier"], r["trailing_spend"]) for r in rows}
            want = {c: (m["balance"], tier(m["spend"]), m["spend"]) for c, m in model.items() if m["orders"]}
            return got == want

        await eventually(all_applied, timeout=90, interval=0.2, message="balances equal the model")
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM loyalty.accounts a WHERE customer_id LIKE $1 AND balance <> "
            "(SELECT coalesce(sum(points), 0) FROM loyalty.ledger l WHERE l.customer_id = a.customer_id)",
            f"{prefix}-%")
        assert mismatched == 0
        values = [r["value"] for r in await conn.fetch(
            "SELECT value FROM loyalty.outbox WHERE convert_from(key, 'UTF8') LIKE $1", f"{prefix}-%")]
        notices = [CODEC.decode(v, LOYALTY) for v in values]
        assert len({n["event_id"] for n in notices}) == len(notices), "a loyalty event was emitted twice"
        kinds = Counter(n["kind"] for n in notices)
        for kind in ("points_earned", "points_redeemed", "points_reversed"):
            assert kinds[kind] == counts[kind], kind
    finally:
        pipeline.stop()
        if conn is not None:
            await conn.close()
        await drop_database(pg_server, dbname)


async def _at_least(probe, n: int):
    value = await probe()
    return value if value >= n else 0
