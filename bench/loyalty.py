"""Loyalty ledger throughput on one worker: resolved sale/return events through the shared batch
consumer and the loyalty handler (ledger, lots, orders, accounts, outbox) with the outbox relay
publishing alongside, next to the plain-consumer and PostgreSQL COPY ceilings.
Run: python -m bench.loyalty [N]."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sys
import time
import uuid
from pathlib import Path

from bench.environment import bench_environment, copy_rate, plain_consume_rate, produce_values, save
from services.loyalty.handlers import LoyaltyHandler
from services.loyalty.rules import LoyaltyRules
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer
from shared.clock import FixedClock
from shared.db import setup_database
from shared.events import for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.rules import load_rules
from shared.topics import DEAD_LETTER, LOYALTY, RESOLVED, Topic

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "loyalty" / "migrations"
T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def workload(n: int, customers: int, seed: int = 7) -> tuple[list[dict], list[str]]:
    """n resolved events: ~85% sales (some redeeming points), ~15% returns of earlier orders."""
    rng = random.Random(seed)
    events, keys, orders = [], [], []
    for i in range(n):
        cid = f"cust-{rng.randrange(customers)}"
        at = T0 + dt.timedelta(seconds=i)
        if orders and rng.random() < 0.15:
            owner, order_id, total = orders[rng.randrange(len(orders))]
            props = {"order_id": order_id, "return_id": f"ret-{i}", "currency": "USD",
                     "total": rng.randint(1, total), "lines": []}
            kind, cid = "return", owner
        else:
            total = rng.randint(5_00, 900_00)
            currency = rng.choice(("USD", "USD", "USD", "EUR", "JPY"))
            props = {"order_id": f"ord-{i}", "currency": currency,
                     "total": total if currency != "JPY" else total // 2,
                     "lines": [{"sku": f"sku-{i % 50}", "quantity": 1, "unit_price": total}],
                     "points_redeemed": rng.choice((0, 0, 0, 0, 100)), "channel": "in_store"}
            kind = "sale"
            if currency == "USD":
                orders.append((cid, props["order_id"], total))
        events.append({"customer_id": cid, "identifiers": [{"type": "loyalty_id", "value": cid}],
                       "event": for_encoding({"event_id": f"ev-{i}", "type": kind, "occurred_at": at,
                                              "source": "pos", "store_id": "soho",
                                              "customer": {"loyalty_id": cid}, "properties": props})})
        keys.append(cid)
    return events, keys


async def run(env, n: int) -> dict:
    codec = AvroCodec(SchemaRegistry.load())
    suffix = uuid.uuid4().hex[:6]
    source, out = f"bench.loyalty.in.{suffix}", f"bench.loyalty.out.{suffix}"
    await ensure_topics(env.bootstrap, 4, [Topic(source, RESOLVED), Topic(out, LOYALTY),
                                           Topic(source + ".dlq", DEAD_LETTER)])
    events, keys = workload(n, customers=max(1000, n // 20))
    values = [codec.encode(RESOLVED, e) for e in events]
    produce = await produce_values(env.bootstrap, source, values, [k.encode() for k in keys])
    print(f"produced {n} at {produce:.0f}/s", flush=True)
    plain = await plain_consume_rate(env.bootstrap, source, n)
    print(f"plain consumer {plain:.0f}/s", flush=True)
    copy = await copy_rate(env.dsn, [(uuid.uuid4(), f"cust-{i}", "earn", i, i, f"ev-{i}", T0)
                                     for i in range(min(n, 200_000))],
                           ["entry_id", "customer_id", "kind", "points", "balance_after", "event_id",
                            "occurred_at"],
                           ["uuid", "text", "text", "bigint", "bigint", "text", "timestamptz"])

    schema = f"loyalty_bench_{suffix}"
    pool = await setup_database(env.dsn, schema, MIGRATIONS, max_size=4)
    metrics = ServiceMetrics("loyalty")
    handler = LoyaltyHandler(LoyaltyRules.from_config(load_rules()), codec, FixedClock(T0),
                             metrics=metrics, topic=out)
    producer = make_producer(env.bootstrap, "bench-loyalty")
    await producer.start()
    relay = OutboxRelay(pool, producer, schema, metrics)
    consumer = BatchConsumer(service="loyalty", bootstrap=env.bootstrap, group_id=f"bench-{suffix}",
                             topics=[Topic(source, RESOLVED)], pool=pool, handler=handler,
                             codec=codec, metrics=metrics, dlq_topic=source + ".dlq",
                             max_records=2000, on_committed=relay.wake)
    await consumer.start()
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(relay.run())]
    started, first = time.perf_counter(), None
    last, moved_at = -1, time.perf_counter()
    while consumer.applied < n:
        await asyncio.sleep(0.01)
        if first is None and consumer.applied:
            first = time.perf_counter()
        if consumer.applied != last:
            last, moved_at = consumer.applied, time.perf_counter()
        elif time.perf_counter() - moved_at > 60:
            dead = sum(s.value for m in metrics.dlq.collect() for s in m.samples
                       if s.name.endswith("_total"))
            raise RuntimeError(f"stalled at {consumer.applied}/{n} applied ({dead} dead-lettered)")
    elapsed = time.perf_counter() - (first or started)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await consumer.stop()
    async with pool.acquire() as conn:
        entries = await conn.fetchval("SELECT count(*) FROM ledger")
        notices = await conn.fetchval("SELECT count(*) FROM outbox")
        published = await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM accounts a WHERE a.balance <> "
            "(SELECT coalesce(sum(points), 0) FROM ledger l WHERE l.customer_id = a.customer_id)")
    await producer.stop()
    await pool.close()
    assert mismatched == 0, f"{mismatched} accounts whose balance is not their ledger"
    rate = n / elapsed
    return {"events": n, "ledger_entries": entries, "loyalty_events": notices,
            "loyalty_events_published_during_run": published,
            "kafka_produce_per_s": round(produce), "kafka_consume_per_s": round(plain),
            "postgres_copy_rows_per_s": round(copy), "loyalty_events_per_s_one_worker": round(rate),
            "ratio_to_plain_consumer": round(rate / plain, 3), "target_per_s": 25_000,
            "meets_target": rate >= 25_000}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with bench_environment() as env:
        result = asyncio.run(run(env, n))
    path = save("loyalty", result)
    for k, v in result.items():
        print(f"{k:>38}: {v}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
