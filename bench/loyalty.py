"""Loyalty ledger throughput on one worker: resolved sale/return events through the shared batch
consumer and the loyalty handler (ledger, lots, orders, accounts, outbox) with the outbox relay
publishing alongside, next to the plain-consumer and PostgreSQL COPY ceilings.
Run: python -m bench.loyalty [N [DEADLINE_S]].

Every phase has a deadline and reports what it saw when it misses it. (The run of 2026-11-25 that
make bench killed hung after the last event was applied: the outbox relay swallowed its cancel,
see shared/outbox.py, and nothing bounded the wait for it.)"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from bench.environment import (
    LoopThreadTime,
    bench_environment,
    consumer_lanes,
    copy_rate,
    produce_values,
    save,
)
from services.loyalty.handlers import LoyaltyHandler
from services.loyalty.rules import LoyaltyRules
from services.loyalty.wire import resolved_decoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer
from shared.clock import FixedClock
from shared.db import setup_database
from shared.events import for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.rules import load_rules
from shared.runtime import BATCH_RECORDS, tune_gc
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


class BenchFailure(RuntimeError):
    """A phase missed its deadline or its count: the run reports this instead of hanging."""


async def _within(phase: str, seconds: float, awaitable):
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise BenchFailure(f"{phase}: no result within {seconds:.0f} s") from None


async def plain_consume(bootstrap: str, topic: str, expected: int, deadline_s: float) -> tuple[float, int]:
    """Records/s of a plain aiokafka getmany consumer reading `topic` from the start (the read
    ceiling). Done when every partition's position reached the high watermark its fetches report
    (Tansu answers ListOffsets(latest) wrongly, so that is not asked) and `expected` were seen;
    raises BenchFailure with what it saw when the deadline passes first."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"plain-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)
    await _within("plain consumer start", 30, consumer.start())
    seen, started, give_up = 0, None, time.perf_counter() + deadline_s
    next_offset: dict = {}
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            if started is None and batch:
                started = time.perf_counter()
            for tp, msgs in batch.items():
                seen += len(msgs)
                next_offset[tp] = msgs[-1].offset + 1
            parts = consumer.assignment()
            highs = {tp: consumer.highwater(tp) for tp in parts}
            caught_up = bool(parts) and all(h is not None and next_offset.get(tp, 0) >= h
                                            for tp, h in highs.items())
            if seen >= expected and caught_up:
                return expected / (time.perf_counter() - (started or time.perf_counter())), seen
            if time.perf_counter() > give_up:
                raise BenchFailure(f"plain consumer: {seen}/{expected} records in {deadline_s:.0f} s "
                                   f"(assigned {len(parts)} partitions, high watermarks "
                                   f"{sorted((tp.partition, h) for tp, h in highs.items())})")
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


async def _backend_cpu(pool) -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL backend of this database (when the server runs
    on this machine; {} otherwise): what the worker's statements cost the server, which the
    worker's own CPU time does not show."""
    async with pool.acquire() as conn:
        pids = [r[0] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def _stop(tasks: list[asyncio.Task], seconds: float = 10) -> list[str]:
    """Cancel `tasks` and wait for them with a bound; names the ones that would not stop."""
    for t in tasks:
        t.cancel()
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    return [t.get_name() for t in pending]


async def run(env, n: int, deadline_s: float) -> dict:
    codec = AvroCodec(SchemaRegistry.load())
    suffix = uuid.uuid4().hex[:6]
    source, out = f"bench.loyalty.in.{suffix}", f"bench.loyalty.out.{suffix}"
    await _within("create topics", 60, ensure_topics(env.bootstrap, 4, [
        Topic(source, RESOLVED), Topic(out, LOYALTY), Topic(source + ".dlq", DEAD_LETTER)]))
    events, keys = workload(n, customers=max(1000, n // 20))
    values = [codec.encode(RESOLVED, e) for e in events]
    produce = await _within("produce", 300, produce_values(env.bootstrap, source, values,
                                                           [k.encode() for k in keys]))
    print(f"produced {n} at {produce:.0f}/s", flush=True)
    plain, _ = await plain_consume(env.bootstrap, source, n, deadline_s=120)
    print(f"plain consumer {plain:.0f}/s", flush=True)
    copy = await _within("copy", 120, copy_rate(
        env.dsn, [(uuid.uuid4(), f"cust-{i}", "earn", i, i, f"ev-{i}", T0) for i in range(min(n, 200_000))],
        ["entry_id", "customer_id", "kind", "points", "balance_after", "event_id", "occurred_at"],
        ["uuid", "text", "text", "bigint", "bigint", "text", "timestamptz"]))
    print(f"postgres copy {copy:.0f} rows/s", flush=True)
    # The workload's 2n objects are the benchmark's, not the worker's: keep the collector off them.
    del events, values, keys
    tune_gc()  # frozen, and the worker's gen-0 threshold, as shared.runtime.run_service sets it

    schema = f"loyalty_bench_{suffix}"
    pool = await setup_database(env.dsn, schema, MIGRATIONS, max_size=4)
    metrics = ServiceMetrics("loyalty")
    handler = LoyaltyHandler(LoyaltyRules.from_config(load_rules()), codec, FixedClock(T0),
                             metrics=metrics, topic=out)
    producer = make_producer(env.bootstrap, "bench-loyalty")
    await _within("producer start", 30, producer.start())
    relay = OutboxRelay(pool, producer, schema, metrics)
    consumer = BatchConsumer(service="loyalty", bootstrap=env.bootstrap, group_id=f"bench-{suffix}",
                             topics=[Topic(source, RESOLVED)], pool=pool, handler=handler,
                             codec=codec, metrics=metrics, dlq_topic=source + ".dlq",
                             decoder=resolved_decoder(codec),  # as services/loyalty/app.py wires it
                             max_records=BATCH_RECORDS, on_committed=relay.wake, lanes=consumer_lanes())
    await _within("consumer start", 60, consumer.start())
    tasks = [asyncio.create_task(consumer.run(), name="consumer"),
             asyncio.create_task(relay.run(), name="relay")]
    started, first, cpu_first, counted_from = time.perf_counter(), None, None, 0
    loop_thread = LoopThreadTime()
    pg_first: dict[int, float] = {}
    last, moved_at, give_up = -1, time.perf_counter(), time.perf_counter() + deadline_s
    failure = None
    try:
        while consumer.applied < n:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            if first is None and consumer.applied:
                first, cpu_first, counted_from = now, time.process_time(), consumer.applied
                loop_thread.start()
                pg_first = await _backend_cpu(pool)
            for t in tasks:
                if t.done():
                    raise BenchFailure(f"{t.get_name()} stopped: {t.exception()!r}")
            if consumer.applied != last:
                last, moved_at = consumer.applied, now
            elif now - moved_at > 60 or now > give_up:
                dead = sum(s.value for m in metrics.dlq.collect() for s in m.samples
                           if s.name.endswith("_total"))
                why = "no progress for 60 s" if now - moved_at > 60 else f"deadline of {deadline_s:.0f} s"
                raise BenchFailure(f"worker: {why} at {consumer.applied}/{n} applied "
                                   f"({dead:.0f} dead-lettered)")
        elapsed = time.perf_counter() - (first or started)
        cpu = time.process_time() - (cpu_first or 0.0)
        thread = loop_thread.shares()
        pg_last = await _backend_cpu(pool)
        pg_cpu = sum(t - pg_first.get(pid, 0.0) for pid, t in pg_last.items()) if pg_last else None
    except BenchFailure as exc:
        failure = exc
    stuck = await _stop(tasks)
    if stuck:
        print(f"tasks that would not stop: {stuck}", flush=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(consumer.stop(), 15)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), 15)
    if failure is not None:
        await asyncio.wait_for(pool.close(), 15)
        raise failure
    async with pool.acquire() as conn:
        entries = await conn.fetchval("SELECT count(*) FROM ledger")
        notices = await conn.fetchval("SELECT count(*) FROM outbox")
        published = await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM accounts a WHERE a.balance <> "
            "(SELECT coalesce(sum(points), 0) FROM ledger l WHERE l.customer_id = a.customer_id)")
    await asyncio.wait_for(pool.close(), 15)
    if mismatched:
        raise BenchFailure(f"{mismatched} accounts whose balance is not their ledger")
    # Measured from the end of the first batch (group join and first fetch excluded).
    rate = (n - counted_from) / elapsed
    return {"events": n, "ledger_entries": entries, "loyalty_events": notices,
            "loyalty_events_published_during_run": published,
            "kafka_produce_per_s": round(produce), "kafka_consume_per_s": round(plain),
            "postgres_copy_rows_per_s": round(copy), "loyalty_events_per_s_one_worker": round(rate),
            "worker_cpu_us_per_event": round(cpu / (n - counted_from) * 1e6, 1),
            "postgres_cpu_us_per_event": None if pg_cpu is None else round(pg_cpu / (n - counted_from) * 1e6, 1),
            "worker_loop_thread": thread,
            "ratio_to_plain_consumer": round(rate / plain, 3),
            "ratio_to_read_then_copy": round(rate * (1 / plain + 1 / copy), 3),
            "consumer_lanes": consumer_lanes(), "target_per_s": 25_000, "meets_target": rate >= 25_000}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    # Deadline of the worker phase: generous (500 events/s), so only a stuck run hits it.
    deadline = float(sys.argv[2]) if len(sys.argv) > 2 else max(120.0, n / 500)
    with bench_environment() as env:
        try:
            result = asyncio.run(run(env, n, deadline))
        except BenchFailure as exc:
            print(f"loyalty benchmark failed: {exc}", file=sys.stderr, flush=True)
            save("loyalty", {"events": n, "failed": str(exc)})
            raise SystemExit(2) from None
    path = save("loyalty", result)
    for k, v in result.items():
        print(f"{k:>38}: {v}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
