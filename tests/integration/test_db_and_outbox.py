"""Migrations under concurrent starts, and the outbox relay publishing in order, exactly what was committed."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from shared.db import RUNTIME_MIGRATIONS, TRANSIENT_DB_ERRORS, create_pool, migrate, setup_database
from shared.kafka import ensure_topics, make_producer
from shared.outbox import (
    MARK_SENT,
    READ_ROWS,
    OutboxMessage,
    OutboxRelay,
    add_to_outbox,
    event_at_of,
    outbox_backlog,
)
from shared.topics import Topic

pytestmark = pytest.mark.asyncio
MERGED_AT = dt.datetime(2026, 9, 3, 14, 5, 7, 123000, tzinfo=dt.UTC)


async def test_two_workers_starting_together_apply_each_migration_once(database, unique, tmp_path):
    schema = f"mig_{unique}"
    migrations = tmp_path / "svc" / "migrations"
    migrations.mkdir(parents=True)
    (migrations / "001_init.sql").write_text(
        "CREATE TABLE things (id int PRIMARY KEY); INSERT INTO things VALUES (1);")
    (migrations / "002_more.sql").write_text("ALTER TABLE things ADD COLUMN name text;")
    pools = [await create_pool(database, schema) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(p, schema, [migrations]) for p in pools))
        assert sorted(len(r) for r in results) == [0, 0, 0, 2]
        async with pools[0].acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM things") == 1
            names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
        assert names == ["svc/001_init.sql", "svc/002_more.sql"]
        # A restart finds nothing to do; a new file is applied.
        (migrations / "003_index.sql").write_text("CREATE INDEX things_name ON things (name);")
        assert await migrate(pools[1], schema, [migrations]) == ["svc/003_index.sql"]
    finally:
        for p in pools:
            await p.close()


async def test_a_service_pool_never_jit_compiles_a_statement_whatever_its_estimated_cost(database, unique):
    # Three series of unknown length, estimated at 1,000 rows each: a billion rows expected for 27, far
    # past jit_above_cost (as an unnest-fed batch statement's estimate runs away). No JIT in a pool.
    pool = await create_pool(database, f"jit_{unique}")
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW jit") == "off"
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM generate_series(1, (3 + random() * 0)::int) a, "
                "generate_series(1, (3 + random() * 0)::int) b, generate_series(1, (3 + random() * 0)::int) c")
            plan = plan if isinstance(plan, list) else orjson.loads(plan)
            assert plan[0]["Plan"]["Total Cost"] > 100_000
            assert "JIT" not in plan[0]
    finally:
        await pool.close()


async def test_relay_publishes_committed_rows_in_order_and_never_rolled_back_ones(broker, database, unique):
    topic = f"outbox.{unique}"
    await ensure_topics(broker, 1, [Topic(topic, None)])
    schema = f"ob_{unique}"
    pool = await setup_database(database, schema, None)
    producer = make_producer(broker, "outbox-test")
    await producer.start()
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await add_to_outbox(conn, [OutboxMessage(topic, f"k{i % 3}", f"v{i}".encode()) for i in range(50)])
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await add_to_outbox(conn, [OutboxMessage(topic, "k", b"rolled-back")])
                    raise RuntimeError("the business transaction failed")
            async with conn.transaction():  # a tombstone that says when it happened
                await add_to_outbox(conn, [OutboxMessage(topic, "k0", None, at=MERGED_AT)])
        relay = OutboxRelay(pool, producer, schema, batch_size=20)
        published = 0
        while (n := await relay.publish_once()):
            published += n
        assert published == 51
        async with pool.acquire() as conn:
            assert await outbox_backlog(conn) == 0
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker, auto_offset_reset="earliest")
        await consumer.start()
        got = []
        try:
            while len(got) < 51:
                for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                    got.extend(msgs)
        finally:
            await consumer.stop()
        assert [m.value for m in got[:50]] == [f"v{i}".encode() for i in range(50)]
        assert got[50].value is None and got[50].key == b"k0"
        assert event_at_of(got[50].headers) == MERGED_AT and event_at_of(got[0].headers) is None
        assert b"rolled-back" not in [m.value for m in got]
    finally:
        await producer.stop()
        await pool.close()


async def test_two_relays_on_one_schema_do_not_double_publish(broker, database, unique):
    topic = f"outbox2.{unique}"
    await ensure_topics(broker, 1, [Topic(topic, None)])
    schema = f"ob2_{unique}"
    pool = await setup_database(database, schema, None)
    producer = make_producer(broker, "outbox-test-2")
    await producer.start()
    try:
        async with pool.acquire() as conn, conn.transaction():
            await add_to_outbox(conn, [OutboxMessage(topic, "k", f"{i}".encode()) for i in range(2000)])
        relays = [OutboxRelay(pool, producer, schema, batch_size=100) for _ in range(2)]

        async def drain(relay: OutboxRelay) -> int:
            total = 0
            for _ in range(200):
                total += await relay.publish_once()
                async with pool.acquire() as conn:
                    if await outbox_backlog(conn) == 0:
                        return total
            return total

        counts = await asyncio.gather(*(drain(r) for r in relays))
        assert sum(counts) == 2000
        conn = await asyncpg.connect(database)
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NOT NULL") == 2000
        finally:
            await conn.close()
    finally:
        await producer.stop()
        await pool.close()


class _FailingOnce:
    """The real producer, except that its first send raises something nobody planned for."""

    def __init__(self, producer) -> None:
        self.producer, self.failed = producer, False

    async def send(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("unplanned failure in the publish path")
        return await self.producer.send(*args, **kwargs)


async def test_relay_outlives_unplanned_errors_and_terminated_backends(broker, database, unique):
    """Regression: a terminated backend surfaced as asyncpg InternalClientError and killed the relay
    task, and with it the whole service (found by tests/faults/test_pipeline_faults.py)."""
    topic = f"outbox.survive.{unique}"
    await ensure_topics(broker, 1, [Topic(topic, None)])
    schema = f"obs_{unique}"
    pool = await setup_database(database, schema, None, max_size=3)
    producer = make_producer(broker, "outbox-survive")
    await producer.start()
    relay = OutboxRelay(pool, _FailingOnce(producer), schema, batch_size=10)
    task = asyncio.create_task(relay.run())
    admin = await asyncpg.connect(database)
    try:
        for round_ in range(5):
            for _attempt in range(5):  # the test's own pooled connections get terminated too
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await add_to_outbox(conn, [OutboxMessage(topic, "k", f"{round_}-{i}".encode())
                                                   for i in range(20)])
                    break
                except TRANSIENT_DB_ERRORS:
                    continue
            relay.wake()
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")

        async def drained() -> bool:
            assert not task.done(), f"the relay died: {task.exception()!r}"
            try:
                async with pool.acquire() as conn:
                    return await outbox_backlog(conn) == 0
            except Exception:  # noqa: BLE001 - the test's own pool connections were terminated too
                return False

        from tests.support.polling import eventually

        await eventually(drained, timeout=30, message="every row published despite the faults")
        assert relay.published >= 100
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await admin.close()
        await producer.stop()
        await pool.close()


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_the_relay_reads_and_marks_only_unsent_rows_whatever_the_outbox_holds(database, unique, mode):
    """The relay reads and marks its rows through the small index of unsent rows, not by reading the sent
    rows the retention keeps (an hour of them), with or without statistics, in custom and cached plans."""
    pool = await setup_database(database, f"ob_plan_{unique}", None)
    one_row = "SELECT 't', 1, '{{NULL}}'::bytea[], '{{v}}'::bytea[]{sent} FROM generate_series(1, {n})"
    try:
        async with pool.acquire() as conn, conn.transaction():
            # a young outbox: prepared (and, for the generic plan, planned) while it is small
            await conn.execute("INSERT INTO outbox_batches (topic, n, keys, vals) " + one_row.format(sent="", n=20))
            await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            await conn.execute(f"PREPARE mark_{unique}(bigint[]) AS {MARK_SENT}")
            await conn.execute(f"PREPARE read_{unique}(bigint[]) AS {READ_ROWS}")
            await conn.execute(f"EXECUTE read_{unique}('{{1,2,3}}')")
            await conn.execute(f"EXECUTE mark_{unique}('{{1,2,3}}')")
            # then it keeps 20,000 sent rows, no ANALYZE, and 500 wait
            await conn.execute("INSERT INTO outbox_batches (topic, n, keys, vals, sent_at) "
                               + one_row.format(sent=", now()", n=20_000))
            await conn.execute("INSERT INTO outbox_batches (topic, n, keys, vals) " + one_row.format(sent="", n=500))
            unsent = [r[0] for r in await conn.fetch("SELECT id FROM outbox_batches WHERE sent_at IS NULL ORDER BY id")]
            batch = unsent[:300]
            ids = ",".join(map(str, batch))
            for statement in (f"read_{unique}", f"mark_{unique}"):
                plan = "\n".join(r[0] for r in await conn.fetch(
                    f"EXPLAIN (ANALYZE, COSTS false) EXECUTE {statement}('{{{ids}}}')"))
                assert "Seq Scan on outbox" not in plan and "outbox_batches_unsent" in plan, plan
            # exactly the batch was marked: the rest still waits
            assert [r[0] for r in await conn.fetch("SELECT id FROM outbox_batches WHERE sent_at IS NULL ORDER BY id")] \
                == unsent[300:]
    finally:
        await pool.close()


async def test_the_purge_drops_only_rows_sent_longer_ago_than_the_retention(database, unique):
    pool = await setup_database(database, f"ob_purge_{unique}", None)
    try:
        relay = OutboxRelay(pool, producer=None, schema=f"ob_purge_{unique}", retention_seconds=3600)
        async with pool.acquire() as conn:
            await conn.execute("""
                INSERT INTO outbox_batches (topic, n, keys, vals, sent_at) VALUES
                    ('t', 1, '{NULL}', '{old}', now() - interval '2 hours'),
                    ('t', 1, '{NULL}', '{recent}', now() - interval '10 minutes'),
                    ('t', 2, '{NULL,NULL}', '{waiting,"waiting too"}', NULL)""")
            await relay._purge_and_measure(purge=False)  # the metrics alone: nothing goes
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 4
            await relay._purge_and_measure()
            assert sorted(r[0] for r in await conn.fetch("SELECT value FROM outbox")) == \
                [b"recent", b"waiting", b"waiting too"]
            assert await outbox_backlog(conn) == 2
    finally:
        await pool.close()


async def test_a_transaction_s_records_are_one_row_per_topic_read_back_one_by_one_in_order(database, unique):
    pool = await setup_database(database, f"ob_rows_{unique}", None)
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await add_to_outbox(conn, [OutboxMessage("a", f"k{i}", f"a{i}".encode()) if i % 2 else
                                           OutboxMessage("b", None, f"b{i}".encode()) for i in range(6)])
            async with conn.transaction():  # a tombstone with its event time, and an unkeyed record
                await add_to_outbox(conn, [OutboxMessage("a", "k1", None, at=MERGED_AT),
                                           OutboxMessage("a", None, b"a6")])
            rows = await conn.fetch("SELECT topic, n FROM outbox_batches ORDER BY id")
            assert [tuple(r) for r in rows] == [("b", 3), ("a", 3), ("a", 2)]
            records = await conn.fetch("SELECT topic, key, value, event_at, sent_at FROM outbox ORDER BY id")
        assert [tuple(r) for r in records] == [
            ("b", None, b"b0", None, None), ("b", None, b"b2", None, None), ("b", None, b"b4", None, None),
            ("a", b"k1", b"a1", None, None), ("a", b"k3", b"a3", None, None), ("a", b"k5", b"a5", None, None),
            ("a", b"k1", None, MERGED_AT, None), ("a", None, b"a6", None, None)]
    finally:
        await pool.close()


class _Recorder:
    """A producer that keeps what it is asked to send (the relay's rounds, not the broker, are tested)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send(self, topic, value=None, key=None, headers=None):
        self.sent.append((topic, key, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_relay_round_takes_whole_rows_up_to_its_budget_and_goes_on_at_once_while_rows_wait(
        database, unique):
    schema = f"ob_budget_{unique}"
    pool = await setup_database(database, schema, None)
    try:
        async with pool.acquire() as conn:
            for size in (3, 3, 5, 1):
                async with conn.transaction():
                    await add_to_outbox(conn, [OutboxMessage("t", "k", f"{size}-{i}".encode()) for i in range(size)])
        producer = _Recorder()
        relay = OutboxRelay(pool, producer, schema, batch_size=4)
        rounds = []
        while (n := await relay.publish_once()):
            rounds.append((n, relay.more_waiting))
        # 3 (the next row would pass 4), 3, then the row of 5 alone (larger than the budget), then 1
        assert rounds == [(3, True), (3, True), (5, True), (1, False)]
        assert [v for _, _, v in producer.sent] == [f"{size}-{i}".encode() for size in (3, 3, 5, 1)
                                                    for i in range(size)]
        async with pool.acquire() as conn:
            assert await outbox_backlog(conn) == 0
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == 12
    finally:
        await pool.close()


async def test_records_of_the_per_record_outbox_move_into_rows_in_order_when_it_is_migrated(
        database, unique, tmp_path):
    """An outbox written before 003_outbox_batches.sql: its unsent records still go, in order, once."""
    old = tmp_path / "shared" / "migrations"
    old.mkdir(parents=True)
    for name in ("001_runtime.sql", "002_outbox_event_time.sql"):
        (old / name).write_text((RUNTIME_MIGRATIONS / name).read_text())
    schema = f"ob_mig_{unique}"
    pool = await create_pool(database, schema)
    try:
        await migrate(pool, schema, [old])
        async with pool.acquire() as conn:
            await conn.execute("""
                INSERT INTO outbox (topic, key, value, event_at, sent_at) VALUES
                    ('a', 'k1', 'sent', NULL, now()), ('a', 'k1', 'a1', NULL, NULL), ('b', NULL, 'b1', NULL, NULL),
                    ('a', 'k2', NULL, '2026-09-03 14:05:07.123+00', NULL), ('b', 'k3', 'b2', NULL, NULL)""")
        assert await migrate(pool, schema, [RUNTIME_MIGRATIONS]) == ["shared/003_outbox_batches.sql"]
        async with pool.acquire() as conn:
            assert await outbox_backlog(conn) == 4
            records = await conn.fetch("SELECT topic, key, value, event_at, sent_at IS NOT NULL FROM outbox ORDER BY id")
        assert [tuple(r) for r in records] == [
            ("a", b"k1", b"sent", None, True),
            ("a", b"k1", b"a1", None, False), ("a", b"k2", None, MERGED_AT, False),
            ("b", None, b"b1", None, False), ("b", b"k3", b"b2", None, False)]
        producer = _Recorder()
        assert await OutboxRelay(pool, producer, schema).publish_once() == 4
        assert producer.sent == [("a", b"k1", b"a1"), ("a", b"k2", None), ("b", None, b"b1"), ("b", b"k3", b"b2")]
    finally:
        await pool.close()
