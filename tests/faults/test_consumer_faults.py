"""The shared batch consumer under broker and database faults: connections dropped, a stalled and a
slow broker, backends terminated mid-batch. Every record is applied exactly once and none is stuck."""

from __future__ import annotations

import asyncio
import random
import signal

import asyncpg
import pytest

from shared.kafka import ensure_topics
from shared.topics import DEAD_LETTER, MERGE, Topic
from tests.integration.test_batch_consumer import (
    _above,
    applied_stats,
    merge_record,
    produce,
    start_worker,
    stop,
)
from tests.support import fault_report as report
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio


async def test_dropped_stalled_and_slow_broker_connections_lose_and_duplicate_nothing(proxied_broker, database, unique):
    bootstrap, proxy = proxied_broker.bootstrap, proxied_broker.proxy
    topic, dlq, schema = f"fault.net.{unique}", f"fault.netdlq.{unique}", f"fault_net_{unique}"
    await ensure_topics(bootstrap, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 8000
    await produce(bootstrap, topic, [merge_record(i) for i in range(n)])
    worker = start_worker(bootstrap, database, schema=schema, topic=topic, group=f"g-{unique}",
                          dlq=dlq, name="w", delay=0.05, max_records=50)
    rng = random.Random(unique)
    try:
        await eventually(lambda: _above(database, schema, 500), timeout=60, message="worker applying")
        for round_ in range(3):
            proxy.drop_all()
            threshold = (await applied_stats(database, schema))[0] + 100
            await eventually(lambda t=threshold: _above(database, schema, t), timeout=45,
                             message=f"progress after drop {round_}")
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random moment for the next fault
        proxy.stall(True)
        await asyncio.sleep(2.0)  # the fault's duration, not synchronisation
        proxy.stall(False)
        proxy.set_latency(0.05)
        threshold = (await applied_stats(database, schema))[0] + 100
        await eventually(lambda: _above(database, schema, threshold), timeout=60, message="progress under latency")
        proxy.set_latency(0.0)
        assert (await applied_stats(database, schema))[0] < n, "the faults must land mid-stream"
        await eventually(lambda: _above(database, schema, n - 1), timeout=120, message="all applied")
        assert report.invariant("consumer applies exactly once under broker faults",
                                await applied_stats(database, schema) == (n, n, n))
        assert worker.poll() is None, "the worker died instead of reconnecting"
        report.fault("broker connections dropped", 3)
        report.fault("broker stalled", 1)
        report.fault("broker latency", 1)
        report.events("consumer records", n)
    finally:
        proxy.stall(False)
        proxy.set_latency(0.0)
        stop(worker)


async def test_database_backends_terminated_mid_batch_lose_and_duplicate_nothing(broker, database, unique):
    topic, dlq, schema = f"fault.db.{unique}", f"fault.dbdlq.{unique}", f"fault_db_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 8000
    await produce(broker, topic, [merge_record(i) for i in range(n)])
    worker = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}",
                          dlq=dlq, name="w", delay=0.05, max_records=50)
    admin = await asyncpg.connect(database)
    try:
        await eventually(lambda: _above(database, schema, 500), timeout=60, message="worker applying")
        for round_ in range(3):
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend' AND query NOT ILIKE '%pg_stat_activity%'")
            assert killed >= 1
            threshold = (await applied_stats(database, schema))[0] + 100
            await eventually(lambda t=threshold: _above(database, schema, t), timeout=45,
                             message=f"progress after terminating backends ({round_})")
        assert (await applied_stats(database, schema))[0] < n, "the faults must land mid-stream"
        await eventually(lambda: _above(database, schema, n - 1), timeout=120, message="all applied")
        assert report.invariant("consumer applies exactly once under database faults",
                                await applied_stats(database, schema) == (n, n, n))
        assert worker.poll() is None, "the worker died instead of reconnecting"
        report.fault("database backends terminated mid-batch", 3)
        report.events("consumer records", n)
    finally:
        await admin.close()
        stop(worker)


async def test_worker_killed_during_a_rebalance_loses_and_duplicates_nothing(broker, database, unique):
    topic, dlq, schema = f"fault.reb.{unique}", f"fault.rebdlq.{unique}", f"fault_reb_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 6000
    await produce(broker, topic, [merge_record(i) for i in range(n)])
    a = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}", dlq=dlq,
                     name="a", delay=0.05, max_records=50)
    b = None
    try:
        await eventually(lambda: _above(database, schema, 300), timeout=60, message="worker a applying")
        b = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}", dlq=dlq,
                         name="b", delay=0.05, max_records=50)
        # b's join starts a rebalance; kill a while the group is rebalancing (b's start takes ~1 s)
        await asyncio.sleep(1.5)
        stop(a, signal.SIGKILL)
        assert (await applied_stats(database, schema))[0] < n, "the kill must land mid-stream"
        await eventually(lambda: _above(database, schema, n - 1), timeout=120, message="all applied by b")
        assert report.invariant("exactly once across a kill during a rebalance",
                                await applied_stats(database, schema) == (n, n, n))
        report.fault("worker SIGKILLed during a rebalance", 1)
        report.events("consumer records", n)
    finally:
        stop(a, signal.SIGKILL)
        if b is not None:
            stop(b)


async def test_statement_timeouts_under_lock_contention_are_retried_not_lost(broker, database, unique):
    topic, dlq, schema = f"fault.st.{unique}", f"fault.stdlq.{unique}", f"fault_st_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 4000
    await produce(broker, topic, [merge_record(i) for i in range(n)])
    admin = await asyncpg.connect(database)
    db = await admin.fetchval("SELECT current_database()")
    await admin.execute(f'ALTER DATABASE "{db}" SET statement_timeout = 300')
    worker = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}",
                          dlq=dlq, name="w", delay=0.05, max_records=50)
    try:
        await eventually(lambda: _above(database, schema, 300), timeout=60, message="worker applying")
        # Hold the table the handler writes for 2 s: its statements hit the 300 ms timeout.
        async with admin.transaction():
            await admin.execute(f"LOCK TABLE {schema}.applied IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(2.0)  # the fault's duration, not synchronisation
        await eventually(lambda: _above(database, schema, n - 1), timeout=120, message="all applied")
        assert report.invariant("exactly once across statement timeouts",
                                await applied_stats(database, schema) == (n, n, n))
        assert worker.poll() is None
        report.fault("statement timeouts (lock contention)", 1)
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" RESET statement_timeout')
        await admin.close()
        stop(worker)


async def test_a_full_connection_pool_delays_batches_but_loses_nothing(broker, database, unique):
    """Every connection of the worker's pool held by other work (an HTTP burst, a scan) for 2 s:
    batches wait for a connection, then apply; nothing lost, nothing twice, the consumer alive."""
    from shared.avro import AvroCodec, SchemaRegistry
    from shared.batch_consumer import BatchConsumer
    from shared.db import setup_database
    from shared.metrics import ServiceMetrics

    topic, dlq, schema = f"fault.pool.{unique}", f"fault.pooldlq.{unique}", f"fault_pool_{unique}"
    await ensure_topics(broker, 2, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 3000
    await produce(broker, topic, [merge_record(i) for i in range(n)])
    pool = await setup_database(database, schema, None, max_size=2)
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE seen (merge_id text PRIMARY KEY)")

    async def handler(conn, records) -> None:
        await conn.execute("INSERT INTO seen SELECT unnest($1::text[])", [r.value["merge_id"] for r in records])

    consumer = BatchConsumer(service="faults", bootstrap=broker, group_id=f"g-{unique}", topics=[Topic(topic, MERGE)],
                             pool=pool, handler=handler, codec=AvroCodec(SchemaRegistry.load()),
                             metrics=ServiceMetrics("faults"), dlq_topic=dlq, max_records=100)
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: _count(pool, 200), timeout=30, message="consumer applying")
        held = [await pool.acquire() for _ in range(2)]  # the whole pool
        stalled_at = consumer.applied
        await asyncio.sleep(2.0)  # the fault's duration, not synchronisation
        assert consumer.applied - stalled_at <= 100, "no batch applies without a connection"
        for conn in held:
            await pool.release(conn)
        await eventually(lambda: _count(pool, n), timeout=60, message="all applied after the pool frees")
        assert not task.done()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM seen") == n
        report.invariant("exactly once across an exhausted connection pool", True)
        report.fault("connection pool exhausted", 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await pool.close()


async def _count(pool, at_least: int) -> bool:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM seen") >= at_least
