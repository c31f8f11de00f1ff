"""Batch-consumer throughput: decode + one `unnest` upsert per batch + stored offsets, next to a plain
aiokafka consumer reading the same topic. Run: python -m bench.batch_consumer [N]."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
import uuid

from bench.environment import (
    bench_environment,
    consumer_lanes,
    plain_consume_rate,
    produce_values,
    save,
)
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer, Record
from shared.db import setup_database
from shared.kafka import ensure_topics
from shared.metrics import ServiceMetrics
from shared.topics import DEAD_LETTER, MERGE, Topic


async def run(env, n: int) -> dict:
    codec = AvroCodec(SchemaRegistry.load())
    if True:
        topic = f"bench.bc.{uuid.uuid4().hex[:6]}"
        await ensure_topics(env.bootstrap, 4, [Topic(topic, MERGE), Topic(topic + ".dlq", DEAD_LETTER)])
        at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
        values = [codec.encode(MERGE, {"merge_id": f"m-{i}", "kind": "merged", "survivor": f"s{i % 5000}",
                                       "merged": f"c{i}", "reason": "bench", "occurred_at": at}) for i in range(n)]
        produce = await produce_values(env.bootstrap, topic, values, [str(i % 997).encode() for i in range(n)])
        plain = await plain_consume_rate(env.bootstrap, topic, n)

        pool = await setup_database(env.dsn, "bench", None, max_size=4)
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE survivors (survivor text PRIMARY KEY, merges bigint NOT NULL, last text)")

        async def handler(conn, records: list[Record]) -> None:
            # One set-based statement per batch: aggregate in SQL, upsert.
            await conn.execute(
                "INSERT INTO survivors (survivor, merges, last) "
                "SELECT s, count(*), max(m) FROM unnest($1::text[], $2::text[]) AS u(s, m) GROUP BY s ORDER BY s "
                "ON CONFLICT (survivor) DO UPDATE SET merges = survivors.merges + EXCLUDED.merges, last = EXCLUDED.last",
                [r.value["survivor"] for r in records], [r.value["merged"] for r in records])

        same_work = await plain_loop_same_work(env.bootstrap, topic, n, codec, pool, handler)
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE survivors")

        consumer = BatchConsumer(service="bench", bootstrap=env.bootstrap, group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                 topics=[Topic(topic, MERGE)], pool=pool, handler=handler, codec=codec,
                                 metrics=ServiceMetrics("bench"), dlq_topic=topic + ".dlq", max_records=2000,
                                 lanes=consumer_lanes())
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        started = time.perf_counter()
        first = None
        while consumer.applied < n:
            await asyncio.sleep(0.01)
            if first is None and consumer.applied:
                first = time.perf_counter()
        # Like the plain consumer, count from the first record (group join is not throughput).
        elapsed = time.perf_counter() - (first or started)
        join_s = (first or started) - started
        task.cancel()
        await consumer.stop()
        async with pool.acquire() as conn:
            total = await conn.fetchval("SELECT sum(merges) FROM survivors")
        await pool.close()
        assert total == n, f"applied {total} of {n}"
        rate = n / elapsed
        return {"records": n, "kafka_produce_per_s": round(produce), "kafka_consume_per_s": round(plain),
                "batch_consumer_per_s": round(rate), "group_join_s": round(join_s, 2), "ratio_to_plain_consumer": round(rate / plain, 3),
                "plain_loop_same_work_per_s": round(same_work),
                "ratio_to_plain_loop_same_work": round(rate / same_work, 3), "consumer_lanes": consumer_lanes()}


async def plain_loop_same_work(bootstrap, topic, n, codec, pool, handler) -> float:
    """A hand-written aiokafka loop doing the same decode and upsert per batch, without the
    shared consumer's stored offsets, dead-lettering and metrics: what the framework costs."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"loop-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)
    await consumer.start()
    seen, started = 0, None
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batch:
                continue
            started = started or time.perf_counter()
            records = [Record(m.topic, m.partition, m.offset, m.key, codec.decode(m.value, MERGE), m.value, m.timestamp)
                       for msgs in batch.values() for m in msgs]
            async with pool.acquire() as conn, conn.transaction():
                await handler(conn, records)
            await consumer.commit()
            seen += len(records)
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with bench_environment() as env:
        result = asyncio.run(run(env, n))
    path = save("batch_consumer", result)
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
