"""SIGKILL of the identity process mid-stream, twice, on the real broker and PostgreSQL.

The identity service runs as its own process (`python -m services.identity`, as deployed) on a
fresh database. A few thousand Avro events are fed to ingest.sales.v1 / ingest.interactions.v1 /
ingest.profiles.v1 while it works; it is SIGKILLed twice mid-stream and restarted each time.

What is guaranteed, and so what is asserted (shared/outbox.py, shared/batch_consumer.py):
- Effects exactly once. A batch's graph writes, its `processed_events` claims, its outbox rows and
  its stored consumer positions commit in one transaction, so a batch re-read after the kill is
  skipped: the database records every produced event exactly once (one `processed_events` row and
  one identity.events.v1 outbox row per event id) and the graph holds one customer per person.
- Output at least once, duplicates identical. The relay marks rows sent only after the broker
  acknowledged them; a kill between the acknowledgement and that commit makes the next relay
  publish the same rows again. So identity.events.v1 carries every event at least once, and any
  copy of an event is the same bytes: the same customer id, never a second one.
- Deterministic ids: each person's events go to one partition of one topic (keyed by the email),
  so the person's first event creates the customer, whose id is uuid5 of that event's id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.identity.resolution import customer_id_for
from shared.avro import AvroCodec, SchemaRegistry
from shared.db import setup_database
from shared.events import first_identifier, for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.stack import create_database, drop_database
from shared.topics import (
    EVENT,
    IDENTITY_EVENTS,
    INGEST_INTERACTIONS,
    INGEST_PROFILES,
    INGEST_SALES,
    INGEST_STORES,
    ROUTES,
)
from tests.conftest import ROOT
from tests.support.pipeline import Pipeline
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio

CODEC = AvroCodec(SchemaRegistry.load())
MIGRATIONS = ROOT / "services" / "identity" / "migrations"
T0 = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC)
# 18,000 events: 12,000 wait when the worker starts, more than one round of its lanes applies at once
# (4 lanes x 2000 records), so each kill lands with events produced and not yet processed.
PEOPLE = 4500
EVENTS_PER_PERSON = 4
CHUNK = 500                    # events produced per step while the service works
SALE = {"order_id": "o-1", "currency": "USD", "total": 4990, "lines": []}
# One event type per topic: a person's events all go to one topic, so one partition, in order.
KINDS = (("sale", SALE), ("page_view", {"url": "/p"}), ("profile_update", {"first_name": "Kim"}))


def person_events(unique: str, p: int) -> list[dict]:
    kind, props = KINDS[p % 3]
    out = []
    for k in range(EVENTS_PER_PERSON):
        customer = {"email": f"kill-{unique}-{p}@example.com"}
        if k >= 2:  # from the third event on the person shows a loyalty id: attached, then matched
            customer["loyalty_id"] = f"KL-{unique}-{p}"
        out.append({"event_id": f"{unique}-{p}-{k}", "type": kind,
                    "occurred_at": T0 + dt.timedelta(minutes=p, seconds=k), "utc_offset_minutes": 0,
                    "received_at": T0, "source": "pos", "store_id": None, "customer": customer,
                    "properties": props})
    return out


async def mark_ends(producer, broker: str, topics: list[str], key: bytes) -> dict[TopicPartition, int]:
    """Append an empty marker record to every partition of `topics`; returns each marker's offset.

    Markers rather than `end_offsets`: the embedded Tansu broker answers the latest offset as the
    last record batch's base offset + 1, which is short of the end after a multi-record batch."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
    finally:
        await consumer.stop()
    futures = [await producer.send(tp.topic, b"", key=key, partition=tp.partition) for tp in tps]
    return {tp: meta.offset for tp, meta in zip(tps, await asyncio.gather(*futures), strict=True)}


async def test_identity_sigkilled_twice_mid_stream_loses_and_duplicates_no_effect(
        broker, pg_server, unique, tmp_path) -> None:
    name = f"omnicrm_idkill_{unique}"
    dsn = await create_database(pg_server, name)
    sources = [INGEST_SALES.name, INGEST_INTERACTIONS.name, INGEST_PROFILES.name]
    await ensure_topics(broker, 4)
    # The service's own schema, its stored positions at the end of the ingest topics (other tests
    # of this session wrote there): it consumes exactly the events of this test.
    pool = await setup_database(dsn, "identity", MIGRATIONS, max_size=2)
    producer = make_producer(broker, f"identity-kill-feed-{unique}")
    await producer.start()
    marker = f"marker-{unique}".encode()
    starts = await mark_ends(producer, broker, [*sources, INGEST_STORES.name], marker)
    await pool.executemany(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)",
        [("identity.stores" if tp.topic == INGEST_STORES.name else "identity.hot", tp.topic,
          tp.partition, off + 1) for tp, off in starts.items()])
    out_start = await mark_ends(producer, broker, [IDENTITY_EVENTS.name], marker)

    events = [e for p in range(PEOPLE) for e in person_events(unique, p)]
    # Interleave the people so that every chunk touches many persons on all three topics.
    events.sort(key=lambda e: (int(e["event_id"].rsplit("-", 1)[1]), e["event_id"]))
    produced: set[str] = set()

    async def feed(upto: int) -> None:
        """Produce events until `upto` of them are acknowledged by the broker."""
        while len(produced) < upto:
            chunk = events[len(produced):min(upto, len(produced) + CHUNK)]
            futures = [await producer.send(ROUTES[e["type"]].name, CODEC.encode(EVENT, for_encoding(e)),
                                           key=first_identifier(e).encode()) for e in chunk]
            await asyncio.gather(*futures)
            produced.update(e["event_id"] for e in chunk)

    async def processed() -> int:
        return await pool.fetchval("SELECT count(*) FROM processed_events WHERE event_id LIKE $1",
                                   f"{unique}-%")

    def processed_at_least(n: int):
        async def probe() -> bool:
            return await processed() >= n
        return probe

    pipeline = Pipeline(broker, dsn, tmp_path / "logs")
    at_kill: list[tuple[int, int]] = []  # (processed, produced) when the process was killed
    try:
        await feed(2 * len(events) // 3)
        for mark in (len(events) // 12, len(events) // 3):
            pipeline.start("identity")
            await asyncio.to_thread(pipeline.wait_ready, "identity", timeout=60)
            await eventually(processed_at_least(mark), timeout=90, interval=0.01,
                             message=f"{mark} events processed")
            pipeline.kill("identity")  # SIGKILL: batches, relay sends and commits in flight are cut
            at_kill.append((await processed(), len(produced)))
            await feed(len(events))  # the rest arrives while it is down
        pipeline.start("identity")
        await asyncio.to_thread(pipeline.wait_ready, "identity", timeout=60)
        await eventually(processed_at_least(len(events)), timeout=120, interval=0.2,
                         message="every event processed after the restarts")
        await eventually(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE sent_at IS NULL"),
                         timeout=60, interval=0.1, message="outbox drained")
        # Everything the relay published is now before these markers.
        out_end = await mark_ends(producer, broker, [IDENTITY_EVENTS.name], marker)
        copies = await read_resolved(broker, out_start, out_end, f"{unique}-")
        rows = await pool.fetch("SELECT value FROM outbox WHERE topic = $1", IDENTITY_EVENTS.name)
        in_outbox = Counter(CODEC.decode(r["value"])["event"]["event_id"] for r in rows)
        claimed = Counter(r["event_id"] for r in await pool.fetch(
            "SELECT event_id FROM processed_events WHERE event_id LIKE $1", f"{unique}-%"))
        owners = await pool.fetch(
            "SELECT value, customer_id, home_customer_id, event_id FROM identifiers "
            "WHERE id_type = 'loyalty_id' AND value LIKE $1", f"KL-{unique}-%")
        customers = await pool.fetch("SELECT customer_id, created_by, merged_into FROM customers")
    finally:
        pipeline.stop()
        await producer.stop()
        await pool.close()
        await drop_database(pg_server, name)

    ids = {e["event_id"] for e in events}
    # The kills happened mid-stream: each one left events produced but not yet processed.
    assert all(0 < done < available for done, available in at_kill), at_kill
    assert produced == ids
    # Effects exactly once.
    assert set(claimed) == ids and set(claimed.values()) == {1}
    assert set(in_outbox) == ids and set(in_outbox.values()) == {1}, "an event resolved twice"
    # Output at least once; every copy of an event is the same record (one customer id).
    assert set(copies) == ids, f"{len(ids - set(copies))} events never reached identity.events.v1"
    assert all(len(set(c)) == 1 for c in copies.values()), "copies of one event differ"
    # One customer per person, created by the person's first event (uuid5 of its id).
    expected = {p: customer_id_for(f"{unique}-{p}-0") for p in range(PEOPLE)}
    for event_id, values in copies.items():
        p = int(event_id.split("-")[1])
        assert values[0][0] == expected[p], f"{event_id} resolved to another customer"
    mine = {c["customer_id"]: c for c in customers if c["created_by"] in ids}
    assert set(mine) == set(expected.values())
    assert all(c["merged_into"] is None for c in mine.values())
    assert {r["value"]: r["customer_id"] for r in owners} == {
        f"KL-{unique}-{p}": expected[p] for p in range(PEOPLE)}
    assert all(r["event_id"] == f"{unique}-{r['value'].rsplit('-', 1)[1]}-2" for r in owners)
    duplicates = sum(len(c) - 1 for c in copies.values())
    print(f"processed at the kills: {at_kill}; duplicate copies on identity.events.v1: {duplicates}")


async def read_resolved(broker: str, start: dict[TopicPartition, int], end: dict[TopicPartition, int],
                        prefix: str) -> dict[str, list[tuple[str, bytes]]]:
    """Every copy of this test's events on identity.events.v1 between the markers: event id ->
    [(customer id, record bytes)]."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False,
                                group_id=None, max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    copies: dict[str, list[tuple[str, bytes]]] = {}
    try:
        tps = [tp for tp in end if end[tp] > start.get(tp, 0) + 1]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start.get(tp, -1) + 1)

        async def done() -> bool:
            for msgs in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                for m in msgs:
                    if m.offset >= end[TopicPartition(m.topic, m.partition)]:
                        continue
                    value = CODEC.decode(m.value)
                    event_id = value["event"]["event_id"]
                    if event_id.startswith(prefix):
                        assert m.key.decode() == value["customer_id"]
                        copies.setdefault(event_id, []).append((value["customer_id"], m.value))
            for tp in tps:
                if await consumer.position(tp) < end[tp]:
                    return False
            return True

        await eventually(done, timeout=60, interval=0, message="identity.events.v1 read to its end")
    finally:
        await consumer.stop()
    return copies

