"""The shared batch consumer on a real broker and PostgreSQL: exactly-once effects across a SIGKILL
mid-batch and across a rebalance between two workers; poison records dead-lettered, partition moving."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from shared.avro import AvroCodec, SchemaRegistry
from shared.kafka import ensure_topics, make_producer
from shared.topics import DEAD_LETTER, MERGE, Topic
from tests.conftest import ROOT
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
CODEC = AvroCodec(SchemaRegistry.load())


def merge_record(i: int, reason: str = "test") -> bytes:
    return CODEC.encode(MERGE, {
        "merge_id": f"m-{i}", "kind": "merged", "survivor": f"s{i % 50}", "merged": f"c{i}",
        "reason": reason, "cause_event_id": None,
        "occurred_at": dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    })


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap, "test-producer")
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=str(i % 97).encode()) for i, v in enumerate(values)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def start_worker(broker: str, database: str, *, schema: str, topic: str, group: str, dlq: str,
                 name: str, delay: float = 0.0, max_records: int = 500, lanes: int = 4) -> subprocess.Popen:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker, DATABASE_URL=database,
               TEST_SCHEMA=schema, TEST_TOPIC=topic, TEST_GROUP=group, TEST_DLQ=dlq,
               TEST_WORKER=name, TEST_HANDLER_DELAY=str(delay), TEST_MAX_RECORDS=str(max_records),
               TEST_LANES=str(lanes))
    log_dir = ROOT / ".omnicrm" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"worker-{schema}-{name}.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([sys.executable, "-m", "tests.support.counting_worker"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


async def applied_stats(database: str, schema: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(database)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1)", f"{schema}.applied")
        if not exists:
            return 0, 0, 0
        row = await conn.fetchrow(
            f"SELECT count(*) AS n, count(DISTINCT merge_id) AS d, (SELECT n FROM {schema}.counter) AS c "
            f"FROM {schema}.applied")
        return row["n"], row["d"], row["c"]
    finally:
        await conn.close()


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for msgs in batch.values():
                out.extend(msgs)
    finally:
        await consumer.stop()
    return out


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("lanes", [1, 4])
async def test_sigkill_mid_batch_applies_every_record_exactly_once(broker, database, unique, lanes):
    topic, dlq, schema = f"bc.kill.{unique}", f"bc.dlq.{unique}", f"bc_kill_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 20000
    poison_at = {1234, 9876}
    values = [merge_record(i, "poison" if i in poison_at else "test") for i in range(n)]
    values[5000] = b"\xc3\x01garbage-not-avro"  # unknown fingerprint
    await produce(broker, topic, values)
    good = n - len(poison_at) - 1

    worker = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}",
                          dlq=dlq, name="first", delay=0.02, lanes=lanes)
    try:
        # Kill it while it is part-way through, twice.
        await eventually(lambda: _above(database, schema, good // 4), timeout=60, message="first quarter applied")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        worker = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}",
                              dlq=dlq, name="second", delay=0.02, lanes=lanes)
        await eventually(lambda: _above(database, schema, good // 2), timeout=60, message="half applied")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        worker = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}",
                              dlq=dlq, name="third", lanes=lanes)
        await eventually(lambda: _above(database, schema, good - 1), timeout=90, message="all applied")
        rows, distinct, counter = await applied_stats(database, schema)
        assert (rows, distinct, counter) == (good, good, good)
        letters = await read_topic(broker, dlq, 3)
        reasons = sorted(CODEC.decode(m.value, DEAD_LETTER)["reason"] for m in letters)
        assert reasons == ["poison_record", "poison_record", "unknown_schema"]
    finally:
        stop(worker, signal.SIGKILL)


async def _above(database: str, schema: str, threshold: int) -> bool:
    rows, _, _ = await applied_stats(database, schema)
    return rows > threshold


async def produce_paced(bootstrap: str, topic: str, start: int, n: int, per_tick: int = 100,
                        tick: float = 0.05) -> None:
    """Publish n records at a steady rate, like live traffic (pacing, not synchronisation)."""
    producer = make_producer(bootstrap, "test-paced")
    await producer.start()
    try:
        for base in range(start, start + n, per_tick):
            futures = [await producer.send(topic, merge_record(i), key=str(i % 97).encode())
                       for i in range(base, min(base + per_tick, start + n))]
            await asyncio.gather(*futures)
            await asyncio.sleep(tick)
    finally:
        await producer.stop()


async def test_rebalance_between_two_workers_applies_every_record_once(broker, database, unique):
    topic, dlq, schema = f"bc.reb.{unique}", f"bc.rdlq.{unique}", f"bc_reb_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 30000  # about 15 s of traffic at 2000/s: both workers join and one leaves meanwhile
    traffic = asyncio.create_task(produce_paced(broker, topic, 0, n))
    a = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}", dlq=dlq,
                     name="a", delay=0.01)
    b = None
    try:
        await eventually(lambda: _above(database, schema, 1000), timeout=60, message="worker a applying")
        b = start_worker(broker, database, schema=schema, topic=topic, group=f"g-{unique}", dlq=dlq,
                         name="b", delay=0.01)

        async def both_applied() -> bool:
            conn = await asyncpg.connect(database)
            try:
                workers = {r["worker"] for r in await conn.fetch(f"SELECT DISTINCT worker FROM {schema}.applied")}
            finally:
                await conn.close()
            return workers == {"a", "b"}

        await eventually(both_applied, timeout=60, message="both workers applying after the rebalance")
        assert not traffic.done(), "traffic ended before the second rebalance: make it longer"
        stop(a)  # a leaves mid-stream: a second rebalance hands its partitions to b
        await traffic
        await eventually(lambda: _above(database, schema, n - 1), timeout=90, message="all applied")
        assert await applied_stats(database, schema) == (n, n, n)
    finally:
        traffic.cancel()
        stop(a)
        if b is not None:
            stop(b)


async def test_event_order_applies_partitions_merged_by_event_time(broker, database, unique):
    """Under the event clock the handler sees three partitions merged by event time, not partition by
    partition as fetches return them; the same again from a second group (a replay) gives the same
    sequence, and every record is applied once."""
    from shared.batch_consumer import BatchConsumer
    from shared.db import setup_database
    from shared.metrics import ServiceMetrics

    topic, dlq = f"bc.order.{unique}", f"bc.orderdlq.{unique}"
    await ensure_topics(broker, 3, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    t0 = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
    producer = make_producer(broker, "test-producer")
    await producer.start()
    expected = []
    try:
        for partition in range(3):  # each partition's log written whole, one after the other
            futures = []
            for i in range(200):
                minute = 3 * i + partition if i % 50 else 3 * i  # every 50th: one moment in all three
                value = CODEC.encode(MERGE, {
                    "merge_id": f"p{partition}-{i}", "kind": "merged", "survivor": "s", "merged": f"c{i}",
                    "reason": "order", "cause_event_id": None,
                    "occurred_at": t0 + dt.timedelta(minutes=minute)})
                futures.append(await producer.send(topic, value, partition=partition))
                expected.append((minute, partition, i, f"p{partition}-{i}"))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    expected = [m for *_, m in sorted(expected)]
    pool = await setup_database(database, f"bc_order_{unique}", None, max_size=2)

    async def consume(group: str) -> tuple[list[str], list[int]]:
        seen: list[str] = []
        sizes: list[int] = []

        async def handler(conn, records) -> None:
            seen.extend(r.value["merge_id"] for r in records)
            sizes.append(len(records))

        consumer = BatchConsumer(service="order", bootstrap=broker, group_id=group, topics=[Topic(topic, MERGE)],
                                 pool=pool, handler=handler, codec=CODEC, metrics=ServiceMetrics(f"order{group[-1]}"),
                                 dlq_topic=dlq, max_records=64, event_order=True, order_grace_ms=300,
                                 consumer_options={"max_partition_fetch_bytes": 2048})
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        try:
            await eventually(lambda: _at_least(seen, 600), timeout=60, message=f"{group} applied all")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await consumer.stop()
        return seen, sizes

    try:
        first, sizes = await consume(f"g-{unique}-1")
        second, _ = await consume(f"g-{unique}-2")
    finally:
        await pool.close()
    assert first == expected, "applied in event-time order across partitions"
    assert second == first, "a second reading of the same logs applies the same sequence"
    assert len(sizes) > 1 and max(sizes) <= 64


async def _at_least(items: list, n: int) -> bool:
    return len(items) >= n


async def test_a_position_moved_by_someone_else_is_read_again_not_overwritten(database, unique):
    """A worker advances the positions it stored itself in one statement, only where they are still
    what it stored. Moved under it (an offsets reset, a worker that lost the partition and wrote
    anyway), the batch reads the stored position under lock: records before it are not applied
    again and the position does not go back."""
    from collections import namedtuple

    from shared.batch_consumer import BatchConsumer
    from shared.db import setup_database
    from shared.metrics import ServiceMetrics

    Msg = namedtuple("Msg", "topic partition offset key value timestamp headers")
    topic = f"bc.moved.{unique}"
    pool = await setup_database(database, f"bc_moved_{unique}", None, max_size=2)
    applied: list[int] = []

    async def handler(conn, records) -> None:
        applied.extend(r.offset for r in records)

    consumer = BatchConsumer(service="moved", bootstrap="127.0.0.1:1", group_id=f"g-{unique}",
                             topics=[Topic(topic, MERGE)], pool=pool, handler=handler, codec=CODEC,
                             metrics=ServiceMetrics(f"moved{unique}"), dlq_topic=f"{topic}.dlq")

    def batch(lo: int, hi: int) -> list:
        return [Msg(topic, 0, i, None, merge_record(i), 0, []) for i in range(lo, hi)]

    async def stored() -> int:
        return await pool.fetchval("SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
                                   f"g-{unique}", topic)

    try:
        await consumer.process(batch(0, 10))
        await consumer.process(batch(10, 20))  # the one-statement advance
        assert applied == list(range(20)) and await stored() == 20
        await pool.execute("UPDATE consumer_offsets SET next_offset = 30 WHERE group_id = $1", f"g-{unique}")
        await consumer.process(batch(20, 35))  # 20..29 were applied elsewhere
        assert applied == list(range(20)) + list(range(30, 35))
        assert await stored() == 35
        await pool.execute("UPDATE consumer_offsets SET next_offset = 50 WHERE group_id = $1", f"g-{unique}")
        await consumer.process(batch(35, 40))  # all of it before the stored position
        assert applied[-1] == 34 and await stored() == 50, "the position never goes back"
        await consumer.process(batch(50, 52))
        assert applied[-2:] == [50, 51] and await stored() == 52
    finally:
        await pool.close()


async def run_until(consumer, probe, *, timeout: float) -> None:
    """Run an in-process consumer until `probe` holds, then stop it."""
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(probe, timeout=timeout, message="every record applied")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()


@pytest.mark.parametrize("lanes", [1, 4])
async def test_lanes_apply_different_partitions_at_once_and_each_partition_in_order(broker, database, unique, lanes):
    """With lanes, batches of different partitions are in the handler at the same time (a worker's
    database round trips overlap), while each partition's records still arrive in offset order and
    every record is applied once. With one lane, never two batches at once."""
    from shared.batch_consumer import BatchConsumer
    from shared.db import setup_database
    from shared.metrics import ServiceMetrics

    topic, dlq, schema = f"bc.lanes.{unique}", f"bc.lanesdlq.{unique}", f"bc_lanes_{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    n = 4000
    await produce(broker, topic, [merge_record(i) for i in range(n)])
    pool = await setup_database(database, schema, None, max_size=lanes + 1)
    await pool.execute("CREATE TABLE applied (topic text, partition int, \"offset\" bigint, PRIMARY KEY (topic, partition, \"offset\"))")
    order: dict[int, list[int]] = {}
    inside = peak = 0

    async def handler(conn, records) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        try:
            for r in records:
                order.setdefault(r.partition, []).append(r.offset)
            await conn.execute('INSERT INTO applied SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[])',
                               [r.topic for r in records], [r.partition for r in records],
                               [r.offset for r in records])
            await conn.execute("SELECT pg_sleep(0.01)")  # a handler with database work worth overlapping
        finally:
            inside -= 1

    consumer = BatchConsumer(service="lanes", bootstrap=broker, group_id=f"g-{unique}", topics=[Topic(topic, MERGE)],
                             pool=pool, handler=handler, codec=CODEC, metrics=ServiceMetrics(f"lanes{lanes}"),
                             dlq_topic=dlq, max_records=100, lanes=lanes)

    async def all_applied() -> bool:
        return await pool.fetchval("SELECT count(*) FROM applied") >= n

    await run_until(consumer, all_applied, timeout=90)
    try:
        assert await pool.fetchval("SELECT count(*) FROM applied") == n  # the primary key refuses a second
        assert sorted(order) == [0, 1, 2, 3]
        for partition, offsets in order.items():
            assert offsets == sorted(set(offsets)), f"partition {partition} applied out of order or twice"
        stored = await pool.fetch("SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1",
                                  f"g-{unique}")
        assert {r["partition"]: r["next_offset"] for r in stored} == {p: max(o) + 1 for p, o in order.items()}
        if lanes == 1:
            assert peak == 1
        else:
            assert peak >= 2, "no two partitions' batches were ever applied at once"
    finally:
        await pool.close()


async def test_lanes_share_one_batch_when_few_records_wait(broker, database, unique):
    """A light load is not cut into a transaction per lane: partitions with few records waiting go
    into one batch, as with one lane (a transaction per lane cost CPU and latency at 1,000/s)."""
    from shared.batch_consumer import BatchConsumer
    from shared.db import setup_database
    from shared.metrics import ServiceMetrics

    topic, dlq = f"bc.few.{unique}", f"bc.fewdlq.{unique}"
    await ensure_topics(broker, 4, [Topic(topic, MERGE), Topic(dlq, DEAD_LETTER)])
    producer = make_producer(broker, "test-producer")
    await producer.start()
    try:
        futures = [await producer.send(topic, merge_record(i), partition=i % 4) for i in range(40)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    pool = await setup_database(database, f"bc_few_{unique}", None, max_size=5)
    batches: list[list[tuple[int, int]]] = []

    async def handler(conn, records) -> None:
        batches.append([(r.partition, r.offset) for r in records])

    consumer = BatchConsumer(service="few", bootstrap=broker, group_id=f"g-{unique}", topics=[Topic(topic, MERGE)],
                             pool=pool, handler=handler, codec=CODEC, metrics=ServiceMetrics("few"),
                             dlq_topic=dlq, max_records=1000, lanes=4)

    async def all_seen() -> bool:
        return sum(len(b) for b in batches) >= 40

    try:
        await run_until(consumer, all_seen, timeout=60)
    finally:
        await pool.close()
    assert sorted(p for b in batches for p in b) == sorted((i % 4, i // 4) for i in range(40))
    assert any(len({p for p, _ in b}) > 1 for b in batches), f"one lane per batch: {[len(b) for b in batches]}"
