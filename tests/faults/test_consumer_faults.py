"""The shared batch consumer under broker and database faults: connections dropped, a stalled and a
slow broker, backends terminated mid-batch. Every record is applied exactly once and none is stuck."""

from __future__ import annotations

import asyncio
import random

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
        assert await applied_stats(database, schema) == (n, n, n)
        assert worker.poll() is None, "the worker died instead of reconnecting"
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
        assert await applied_stats(database, schema) == (n, n, n)
        assert worker.poll() is None, "the worker died instead of reconnecting"
    finally:
        await admin.close()
        stop(worker)
