"""A worker process for the batch-consumer tests: applies a deliberately NON-idempotent effect.

Each record inserts a row into `applied` and bumps a counter, so any record applied twice shows
up as a duplicate row: only the batch consumer's stored positions keep effects exactly-once.
Usage: python -m tests.support.counting_worker  (configured by environment variables).
"""

from __future__ import annotations

import asyncio
import os
import signal

from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer, Record
from shared.db import setup_database
from shared.errors import PermanentError
from shared.kafka import make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.topics import MERGE, Topic

MIGRATION = """
CREATE TABLE IF NOT EXISTS applied (merge_id text NOT NULL, topic text, partition int, "offset" bigint, worker text);
CREATE TABLE IF NOT EXISTS counter (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counter VALUES (1, 0) ON CONFLICT DO NOTHING;
"""


async def main() -> None:
    import logging
    logging.basicConfig(level=logging.INFO)
    env = os.environ
    schema = env["TEST_SCHEMA"]
    worker = env.get("TEST_WORKER", "w")
    delay = float(env.get("TEST_HANDLER_DELAY", "0"))
    pool = await setup_database(env["DATABASE_URL"], schema, None, max_size=6)
    async with pool.acquire() as conn:
        await conn.execute(MIGRATION)
    codec = AvroCodec(SchemaRegistry.load())
    metrics = ServiceMetrics("testworker")

    async def handler(conn, records: list[Record]) -> None:
        for r in records:
            if r.value["reason"] == "poison":
                raise PermanentError("poison_record", "the test marked this record as poison")
        await conn.execute(
            'INSERT INTO applied SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::text[])',
            [r.value["merge_id"] for r in records], [r.topic for r in records],
            [r.partition for r in records], [r.offset for r in records], [worker] * len(records))
        await conn.execute("UPDATE counter SET n = n + $1 WHERE id = 1", len(records))
        if delay:
            await asyncio.sleep(delay)  # a slow handler widens the window a kill can land in

    producer = make_producer(env["KAFKA_BOOTSTRAP_SERVERS"], "testworker")
    await producer.start()
    relay = OutboxRelay(pool, producer, schema)
    consumer = BatchConsumer(
        service="testworker", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], group_id=env["TEST_GROUP"],
        topics=[Topic(env["TEST_TOPIC"], MERGE)], pool=pool, handler=handler, codec=codec,
        metrics=metrics, dlq_topic=env["TEST_DLQ"], max_records=int(env.get("TEST_MAX_RECORDS", "500")),
        on_committed=relay.wake, lanes=int(env.get("TEST_LANES", "4")))
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # SIGUSR1 prints every task's stack: how a stuck worker is diagnosed.
    loop.add_signal_handler(signal.SIGUSR1, lambda: [t.print_stack() for t in asyncio.all_tasks()])
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(relay.run())]
    print("worker started", flush=True)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not stopper and t.exception() is not None:
            raise t.exception()
    await consumer.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await relay.publish_once()
    await producer.stop()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
