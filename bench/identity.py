"""Identity throughput: resolved events/s for one worker with 100k customers in the graph, next to
a plain aiokafka consumer reading the same topic (the read ceiling).

The graph is seeded with 100k customers (email, phone, loyalty id) through the handler itself;
then a mixed stream is produced: sales and views of known customers (by one of their
identifiers), new shoppers, known shoppers showing a new identifier, and merges of two known
customers. One BatchConsumer + outbox relay (one worker) applies it.
Run: python -m bench.identity [EVENTS] [CUSTOMERS]."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import random
import sys
import time
import uuid
from pathlib import Path

import psutil

from bench.environment import (
    LoopThreadTime,
    bench_environment,
    consumer_lanes,
    plain_consume_rate,
    produce_values,
    save,
)
from services.identity.handlers import IdentityHandler, IdentityMetrics
from services.identity.normalise import Normaliser
from services.identity.resolution import Guard
from services.identity.wire import event_decoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer, Record
from shared.clock import WallClock
from shared.db import setup_database
from shared.events import first_identifier, for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.rules import load_rules
from shared.runtime import BATCH_RECORDS, tune_gc
from shared.topics import (
    DEAD_LETTER,
    EVENT,
    IDENTITY_EVENTS,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    Topic,
)

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "identity" / "migrations"
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
SALE = {"order_id": "o", "currency": "USD", "total": 12990, "lines": [
    {"sku": "sku-1", "name": "Coffee", "category": "coffee", "quantity": 1, "unit_price": 12990}]}


def person(i: int) -> dict:
    return {"email": f"shopper{i}@example.com", "phone": f"+1212{i:07d}", "loyalty_id": f"L{i:07d}"}


def ev(event_id: str, kind: str, at: dt.datetime, customer: dict, props: dict | None) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": at, "utc_offset_minutes": 0,
            "received_at": at, "source": "pos", "store_id": None, "customer": customer,
            "properties": props}


async def backend_cpu(pool, database: str, seen: dict[int, float]) -> None:
    """Add the CPU seconds so far of this database's client backends (the worker's pool) to `seen`."""
    async with pool.acquire() as conn:
        pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                                "AND backend_type = 'client backend'", database)
    for r in pids:
        try:
            t = psutil.Process(r["pid"]).cpu_times()
        except psutil.Error:
            continue
        seen[r["pid"]] = t.user + t.system


def pg_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def stream(n: int, customers: int, rnd: random.Random) -> list[dict]:
    out = []
    for k in range(n):
        at = T0 + dt.timedelta(days=30, seconds=k)
        roll = rnd.random()
        i = rnd.randrange(customers)
        p = person(i)
        if roll < 0.80:  # a known shopper by one of their identifiers
            kind = rnd.choice(("email", "phone", "loyalty_id"))
            sale = roll < 0.4
            out.append(ev(f"s-{k}", "sale" if sale else "page_view", at, {kind: p[kind]},
                          SALE if sale else {"url": "/p"}))
        elif roll < 0.90:  # a new shopper
            out.append(ev(f"s-{k}", "sale", at, {"email": f"new{k}@example.com"}, SALE))
        elif roll < 0.99:  # a known shopper with a new device id
            out.append(ev(f"s-{k}", "page_view", at, {"email": p["email"], "anonymous_id": f"anon-{k}"},
                          {"url": "/p"}))
        else:  # two known customers turn out to be one person
            j = rnd.randrange(customers)
            out.append(ev(f"s-{k}", "sale", at, {"email": p["email"], "loyalty_id": person(j)["loyalty_id"]},
                          SALE))
    return out


async def run(env, n: int, customers: int) -> dict:
    tune_gc()  # as shared.runtime.run_service does at every worker's start
    codec = AvroCodec(SchemaRegistry.load())
    rules = load_rules()["identity"]
    pool = await setup_database(env.dsn, "identity", MIGRATIONS, max_size=4)
    metrics = ServiceMetrics("identity")
    handler = IdentityHandler(codec=codec, normaliser=Normaliser.from_rules(rules),
                              guard=Guard.from_rules(rules), metrics=IdentityMetrics(metrics),
                              clock=WallClock())

    # Seed through the handler (no broker): every event creates a customer.
    seed_started = time.perf_counter()
    chunk = 2000
    for start in range(0, customers, chunk):
        records = []
        for i in range(start, min(start + chunk, customers)):
            e = ev(f"seed-{i}", "signup", T0 + dt.timedelta(seconds=i), person(i),
                   {"first_name": f"S{i}", "tags": []})
            raw = codec.encode(EVENT, for_encoding(e))
            records.append(Record("seed", 0, i, None, codec.decode(raw, EVENT), raw, 0))
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, records)
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM outbox_batches")
    seed_rate = customers / (time.perf_counter() - seed_started)
    async with pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE customers")
        await conn.execute("VACUUM ANALYZE identifiers")

    topic = f"bench.identity.{uuid.uuid4().hex[:6]}"
    await ensure_topics(env.bootstrap, 4, [Topic(topic, EVENT), Topic(topic + ".dlq", DEAD_LETTER),
                                           IDENTITY_EVENTS, IDENTITY_PROFILES, IDENTITY_MERGES])
    events = stream(n, customers, random.Random(7))
    values = [codec.encode(EVENT, for_encoding(e)) for e in events]
    produce = await produce_values(env.bootstrap, topic, values,
                                   [first_identifier(e).encode() for e in events])
    plain = await plain_consume_rate(env.bootstrap, topic, n)
    # The stream lives in Kafka now: drop the bench's own copy (a million objects the garbage
    # collector would otherwise walk on the worker's time, which no real worker carries).
    del events, values
    gc.collect()

    lanes = consumer_lanes()  # as the service runs: one lane per partition of the 4
    producer = make_producer(env.bootstrap, "bench-identity")
    await producer.start()
    relay = OutboxRelay(pool, producer, "identity", metrics)  # as the service runs it
    consumer = BatchConsumer(service="identity", bootstrap=env.bootstrap,
                             group_id=f"identity.bench.{uuid.uuid4().hex[:6]}",
                             topics=[Topic(topic, EVENT)], pool=pool, handler=handler, codec=codec,
                             metrics=metrics, dlq_topic=topic + ".dlq", max_records=BATCH_RECORDS,
                             decoder=event_decoder(codec),  # as services/identity/app.py wires it
                             on_committed=relay.wake, lanes=lanes)
    await consumer.start()
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(relay.run())]
    first = None
    cpu_first = 0.0
    loop_thread = LoopThreadTime()
    pg_before: dict[int, float] = {}
    pg_after: dict[int, float] = {}
    while consumer.applied < n:
        await asyncio.sleep(0.005)
        if first is None and consumer.applied:
            first = time.perf_counter()
            cpu_first = time.process_time()
            loop_thread.start()
            applied_first = consumer.applied
            await backend_cpu(pool, env.database, pg_before)
    resolved_at = time.perf_counter()
    thread = loop_thread.shares()
    await backend_cpu(pool, env.database, pg_after)
    # CPU of this process (consumer, handler, relay; not the broker or PostgreSQL) per event
    # resolved after the first batch: comparable across runs on a shared machine.
    cpu_us = (time.process_time() - cpu_first) / (n - applied_first) * 1e6
    # and of its PostgreSQL backends (the pool's; the relay shares it): the server side of the work
    pg_us = pg_cpu_between(pg_before, pg_after) / (n - applied_first) * 1e6
    async with pool.acquire() as conn:
        expected = await conn.fetchval("SELECT count(*) FROM outbox")
    while relay.published < expected:
        await asyncio.sleep(0.01)
    published_at = time.perf_counter()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await consumer.stop()
    await producer.stop()
    async with pool.acquire() as conn:
        stats = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM customers) AS customers, "
            "(SELECT count(*) FROM customers WHERE merged_into IS NOT NULL) AS merged, "
            "(SELECT count(*) FROM identifiers) AS identifiers, "
            "(SELECT count(*) FROM outbox WHERE topic = 'identity.events.v1') AS resolved")
    await pool.close()
    assert stats["resolved"] == n, f"resolved {stats['resolved']} of {n}"
    # The first batch's time is not counted (like the plain consumer, timing starts at the first record).
    rate = n / (resolved_at - first)
    return {
        "events": n, "customers_seeded": customers, "seed_through_handler_per_s": round(seed_rate),
        "kafka_produce_per_s": round(produce), "kafka_consume_per_s": round(plain),
        "resolved_events_per_s": round(rate), "ratio_to_plain_consumer": round(rate / plain, 3),
        "resolved_and_published_per_s": round(n / (published_at - first)),
        "worker_cpu_us_per_event": round(cpu_us, 1),
        "postgres_backend_cpu_us_per_event": round(pg_us, 1),
        "cpu_us_per_event_total": round(cpu_us + pg_us, 1),
        "worker_loop_thread": thread,
        "consumer_lanes": lanes, "target_per_s": 20000, "graph_after": dict(stats),
        "mix": "40% sales + 40% views of known shoppers, 10% new, 9% new device id, 1% merges",
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    customers = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with bench_environment() as env:
        result = asyncio.run(run(env, n, customers))
    path = save("identity", result)
    print(result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
