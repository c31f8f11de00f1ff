"""Identity on the real broker: two workers in one group on a 4-partition topic with conflicting
events end with a consistent graph, every event resolved exactly once, and the merges reach a
downstream consumer of identity.merges.v1."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from services.identity.resolution import Guard
from shared.batch_consumer import BatchConsumer
from shared.db import setup_database
from shared.events import first_identifier, for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.topics import (
    DEAD_LETTER,
    EVENT,
    IDENTITY_EVENTS,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    Topic,
)
from tests.integration.test_identity_handler import CODEC, MIGRATIONS, SALE, Identity, event
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio


async def test_two_workers_on_four_partitions_end_consistent_and_merges_reach_downstream(
        broker, database, unique) -> None:
    source = Topic(f"ingest.sales.{unique}", EVENT)
    dlq = Topic(f"identity.dlq.{unique}", DEAD_LETTER)
    await ensure_topics(broker, 4, [source, dlq, IDENTITY_EVENTS, IDENTITY_PROFILES, IDENTITY_MERGES])
    schema = f"identity_{unique}"
    people = 40
    events = []
    for p in range(people):
        email, phone = f"{unique}-{p}@example.com", f"+1646{int(unique[:6], 16) % 1000:03d}{p:04d}"
        events += [event(f"{unique}-a{p}", "sale", p, None, SALE, email=email, loyalty_id=f"{unique}L{p}"),
                   event(f"{unique}-b{p}", "sale", p + 1, None, SALE, phone=phone),
                   event(f"{unique}-c{p}", "sale", p + 2, None, SALE, phone=phone, email=email)]
    mine = {e["event_id"] for e in events}

    downstream = AIOKafkaConsumer(IDENTITY_MERGES.name, IDENTITY_EVENTS.name, bootstrap_servers=broker,
                                  group_id=f"downstream-{uuid.uuid4().hex[:6]}",
                                  auto_offset_reset="latest", enable_auto_commit=False)
    await downstream.start()
    await eventually(lambda: asyncio.sleep(0, bool(downstream.assignment())), timeout=15,
                     message="downstream assignment")
    for tp in downstream.assignment():
        await downstream.position(tp)

    workers = []
    tasks = []
    try:
        for n in range(2):
            pool = await setup_database(database, schema, MIGRATIONS, max_size=4)
            ident = Identity(pool, Guard.from_rules({}))
            producer = make_producer(broker, f"identity-w{n}")
            await producer.start()
            relay = OutboxRelay(pool, producer, schema)
            consumer = BatchConsumer(
                service="identity", bootstrap=broker, group_id=f"identity.{unique}", topics=[source],
                pool=pool, handler=ident.handler, codec=CODEC, metrics=ServiceMetrics("identity"),
                dlq_topic=dlq.name, max_records=50, on_committed=relay.wake)
            workers.append((pool, producer, consumer, relay))
        # Joining together puts both members in the first generation (no rebalance wait).
        await asyncio.gather(*(c.start() for _, _, c, _ in workers))
        for _, _, consumer, relay in workers:
            tasks += [asyncio.create_task(consumer.run()), asyncio.create_task(relay.run())]

        producer = make_producer(broker, "identity-test-feed")
        await producer.start()
        try:
            futures = [await producer.send(source.name, CODEC.encode(EVENT, for_encoding(e)),
                                           key=first_identifier(e).encode()) for e in events]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

        resolved: dict[str, list[str]] = {}
        merges: list[dict] = []

        async def drained() -> bool:
            batch = await downstream.getmany(timeout_ms=200)
            for msgs in batch.values():
                for m in msgs:
                    value = CODEC.decode(m.value)
                    if m.topic == IDENTITY_MERGES.name:
                        if value["cause_event_id"] in mine:
                            merges.append(value)
                    elif value["event"]["event_id"] in mine:
                        resolved.setdefault(value["event"]["event_id"], []).append(m.key.decode())
            return len(resolved) == len(mine) and len(merges) >= 1

        await eventually(drained, timeout=18, interval=0, message="all events resolved downstream")
        assert all(len(keys) == 1 for keys in resolved.values()), "an event was emitted twice"
        assert all(c.applied > 0 for _, _, c, _ in workers), "both workers took part"
        pool = workers[0][0]
        per_email = await pool.fetch(
            "SELECT i.token, count(DISTINCT j.customer_id) AS n FROM identifiers i "
            "JOIN identifiers j ON j.customer_id = i.customer_id WHERE i.id_type = 'email' GROUP BY 1")
        assert len(per_email) == people
        assert await pool.fetchval("SELECT count(DISTINCT customer_id) FROM identifiers") == people
        assert await pool.fetchval("SELECT count(*) FROM identifiers") == 3 * people
        # Every merge seen downstream names a survivor that still owns the person's identifiers.
        survivors = {r["customer_id"] for r in await pool.fetch("SELECT DISTINCT customer_id FROM identifiers")}
        assert {m["survivor"] for m in merges} <= survivors
        assert all(m["kind"] == "merged" for m in merges)
        # The last resolved event of each person carries the surviving id.
        last = {e["event_id"]: e for e in events if e["event_id"].startswith(f"{unique}-c")}
        assert {resolved[eid][0] for eid in last} <= survivors
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool, producer, consumer, _ in workers:
            with contextlib.suppress(Exception):
                await consumer.stop()
            await producer.stop()
            await pool.close()
        await downstream.stop()
