"""Replays with the event clock fire the identical set of trigger ids, however the records are batched,
interleaved across partitions, or scanned: 30 generated days, on PostgreSQL and on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from services.triggers.handlers import TriggersHandler
from services.triggers.rules import RuleConfig
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer, Record
from shared.clock import EventClock
from shared.db import setup_database
from shared.events import for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.rules import load_rules
from shared.topics import DEAD_LETTER, EVENT, LOYALTY, MERGE, PROFILE, RESOLVED, TRIGGER, Topic
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "triggers" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
CFG = RuleConfig.from_rules(load_rules(environ={}))
UTC = dt.UTC
START = dt.datetime(2026, 3, 1, tzinfo=UTC)
PARTITIONS = 4
SUBJECTS = {"events": RESOLVED, "profiles": PROFILE, "merges": MERGE, "loyalty": LOYALTY, "stores": EVENT}
STORES = {
    "soho": ("SoHo", "America/New_York", 40.7233, -74.0030),
    "pudong": ("Pudong", "Asia/Shanghai", 31.2304, 121.4737),
}
CATEGORIES = ("coffee", "pet-food", "tea", "skincare")


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    return zlib.crc32(key.encode()) % partitions


def _offset(at: dt.datetime, tz: str) -> int:
    from zoneinfo import ZoneInfo
    return int(at.astimezone(ZoneInfo(tz)).utcoffset().total_seconds() // 60)


def world(seed: int = 7, customers: int = 60, days: int = 30) -> list[tuple[str, str, dict]]:
    """(role, key, value) records of a small retailer's month, in event-time order.

    Merges are left out: a merge arrives on its own topic, and which of the merged customer's
    earlier events a consumer reads before it is a race that no replay can pin down (the merge
    behaviour has its own tests).
    """
    rng = random.Random(seed)
    out: list[tuple[dt.datetime, int, str, str, dict]] = []
    seq = iter(range(10**9))

    def add(at: dt.datetime, role: str, key: str, value: dict) -> None:
        out.append((at, next(seq), role, key, value))

    def ev(cid: str, eid: str, kind: str, at: dt.datetime, props, store_id=None, tz="UTC") -> None:
        e = {"event_id": eid, "type": kind, "occurred_at": at, "utc_offset_minutes": _offset(at, tz),
             "received_at": at, "source": "pos", "store_id": store_id, "customer": {"loyalty_id": f"L{cid}"},
             "properties": props}
        add(at, "events", cid, {"customer_id": cid, "identifiers": [], "event": for_encoding(e)})

    before = START - dt.timedelta(days=1)
    for sid, (name, tz, lat, lon) in STORES.items():
        e = {"event_id": f"st-{sid}", "type": "store_upsert", "occurred_at": before, "utc_offset_minutes": 0,
             "received_at": before, "source": "admin", "store_id": sid, "customer": {}, "properties": {
                 "store": {"store_id": sid, "name": name, "timezone": tz, "country": "US", "city": name,
                           "lat": lat, "lon": lon, "currency": "USD"}}}
        add(before - dt.timedelta(days=1), "stores", sid, for_encoding(e))
    for i in range(customers):
        cid = f"c{i:03d}"
        home = rng.choice(list(STORES))
        tz = STORES[home][1]
        bday = START + dt.timedelta(days=rng.randrange(0, days + 5))
        birthday = "2000-02-29" if i == 5 else f"19{rng.randrange(60, 99)}-{bday.month:02d}-{bday.day:02d}"
        lat, lon = STORES[home][2] + rng.uniform(-0.05, 0.05), STORES[home][3] + rng.uniform(-0.05, 0.05)
        add(before, "profiles", cid, {
            "customer_id": cid, "identifiers": {}, "birthday": birthday, "timezone": tz, "locale": "en",
            "home_store_id": home, "tags": [], "consents": {"sms": "opted_in"},
            "address": {"city": None, "region": None, "postal_code": None, "country": "US", "lat": lat, "lon": lon},
            "created_at": before, "updated_at": before, "version": 1})
        if rng.random() < 0.4:  # an old purchase: these lapse during the month unless they come back
            at = START - dt.timedelta(days=rng.randrange(65, 88), hours=rng.randrange(24))
            ev(cid, f"{cid}-old", "sale", at, _sale(rng, f"{cid}-old"), home, tz)
        if rng.random() < 0.3:  # points earned last year expire this month
            at = START - dt.timedelta(days=340, hours=i)
            add(at, "loyalty", cid, {"event_id": f"{cid}-pts", "kind": "points_earned", "customer_id": cid,
                                     "occurred_at": at, "points": 150, "balance": 150,
                                     "expires_at": at + dt.timedelta(days=365)})
        spend = 0
        tier = "member"
        for day in range(days):
            base = START + dt.timedelta(days=day, hours=rng.randrange(0, 24), minutes=rng.randrange(60))
            if day == i % days and rng.random() < 0.5:
                ev(cid, f"{cid}-signup", "signup", base, {"first_name": None, "tags": [], "tags_removed": []}, None, tz)
            r = rng.random()
            if r < 0.08:
                eid = f"{cid}-s{day}"
                props = _sale(rng, eid)
                ev(cid, eid, "sale", base, props, home if rng.random() < 0.7 else None, tz)
                spend += props["total"]
                new_tier = "gold" if spend >= 1_500_000 else "silver" if spend >= 500_000 else "member"
                if new_tier != tier:
                    at = base + dt.timedelta(seconds=5)
                    add(at, "loyalty", cid, {"event_id": f"{cid}-tier{day}", "kind": "tier_changed", "customer_id": cid,
                                             "occurred_at": at, "old_tier": tier, "new_tier": new_tier,
                                             "trailing_spend": spend})
                    tier = new_tier
            elif r < 0.14:
                cart = f"{cid}-k{day}"
                ev(cid, f"{cart}-add", "cart_add", base, {"cart_id": cart, "sku": "x", "quantity": 1,
                                                          "unit_price": 2500, "currency": "USD", "category": "tea"})
                later = rng.choice((None, 20, 59, 61, 95))
                if later is not None:
                    ev(cid, f"{cart}-sale", "sale", base + dt.timedelta(minutes=later), _sale(rng, f"{cart}-sale"),
                       None, tz)
    ev_at = START + dt.timedelta(days=12)
    e = {"event_id": "se-soho-1", "type": "store_event", "occurred_at": ev_at, "utc_offset_minutes": 0,
         "received_at": ev_at, "source": "admin", "store_id": "soho", "customer": {}, "properties": {
             "store_id": "soho", "title": "Spring tasting", "starts_at": ev_at + dt.timedelta(days=3), "radius_km": 10.0}}
    add(ev_at, "stores", "soho", for_encoding(e))
    out.sort(key=lambda x: (x[0], x[1]))
    return [(role, key, value) for _, _, role, key, value in out]


def _sale(rng: random.Random, eid: str) -> dict:
    total = rng.choice((4500, 12000, 56000, 250000))
    return {"order_id": f"o-{eid}", "currency": "USD", "total": total, "channel": "in_store",
            "lines": [{"sku": "s", "name": None, "category": rng.choice(CATEGORIES), "quantity": 1, "unit_price": total}],
            "coupon_codes": [], "points_redeemed": 0, "discount": None}


def as_records(items, topics: dict[str, str]) -> dict[tuple[str, int], list[Record]]:
    """Per (topic, partition) queues of records, in the order a producer would have written them."""
    queues: dict[tuple[str, int], list[Record]] = {}
    for role, key, value in items:
        raw = CODEC.encode(SUBJECTS[role], value)
        part = 0 if role == "stores" else partition_of(key)
        q = queues.setdefault((topics[role], part), [])
        q.append(Record(topics[role], part, len(q), key.encode(), CODEC.decode(raw, SUBJECTS[role]), raw, 0))
    return queues


def interleave(queues: dict[tuple[str, int], list[Record]], rng: random.Random, max_batch: int) -> Iterator[list[Record]]:
    """Batches the way a consumer might fetch them: partitions in any order, each in its own order."""
    pos = {k: 0 for k in queues}
    while any(pos[k] < len(q) for k, q in queues.items()):
        batch: list[Record] = []
        for k in rng.sample(sorted(queues), rng.randrange(1, len(queues) + 1)):
            n = rng.randrange(1, max_batch + 1)
            batch += queues[k][pos[k]:pos[k] + n]
            pos[k] += n
        if batch:
            yield batch


ROLES = {"events": "identity.events.v1", "profiles": "identity.profiles.v1", "merges": "identity.merges.v1",
         "loyalty": "loyalty.events.v1", "stores": "ingest.stores.v1", "fired": "triggers.fired.v1"}


async def replay_in_process(database: str, schema: str, items, seed: int, max_batch: int) -> set[str]:
    pool = await setup_database(database, schema, MIGRATIONS)
    handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=EventClock(), event_clock=True, partitions=PARTITIONS)
    rng = random.Random(seed)
    try:
        for batch in interleave(as_records(items, ROLES), rng, max_batch):
            async with pool.acquire() as conn, conn.transaction():
                await handler(conn, batch)
            if rng.random() < 0.5:  # the leader's timer ticks whenever it likes
                await handler.scheduled_scan(pool)
        await handler.scheduled_scan(pool)
        async with pool.acquire() as conn:
            return {str(r["trigger_id"]) for r in await conn.fetch("SELECT trigger_id FROM fired_triggers")}
    finally:
        await pool.close()


async def test_replay_with_event_clock_fires_identical_trigger_ids_however_batched(database, unique):
    items = world()
    first = await replay_in_process(database, f"trg_replay_a_{unique}", items, seed=1, max_batch=400)
    second = await replay_in_process(database, f"trg_replay_b_{unique}", items, seed=2, max_batch=7)
    assert first == second
    assert len(first) > 50


async def test_replay_on_the_broker_twice_from_scratch_identical_and_every_kind(broker, database, unique):
    items = world()
    runs = []
    for run in ("a", "b"):
        topics = {role: f"{name}.{unique}{run}" for role, name in ROLES.items()}
        fired, kinds = await _replay_on_broker(broker, database, f"trg_bk{run}_{unique}", topics, items)
        runs.append(fired)
    assert runs[0] == runs[1]
    assert kinds >= {"welcome", "geo_thank_you", "tier_upgrade", "abandoned_cart", "win_back", "birthday_coupon",
                     "replenishment", "points_expiring", "store_event_invite"}
    in_process = await replay_in_process(database, f"trg_replay_c_{unique}", items, seed=3, max_batch=50)
    assert runs[0] == in_process


async def _replay_on_broker(broker: str, database: str, schema: str, topics: dict[str, str], items):
    inputs = [Topic(topics[r], SUBJECTS[r], partitioned=r != "stores") for r in ("events", "profiles", "merges", "loyalty", "stores")]
    dlq = Topic(f"{topics['fired']}.dlq", DEAD_LETTER)
    fired_topic = Topic(topics["fired"], TRIGGER)
    await ensure_topics(broker, PARTITIONS, [*inputs[:4], fired_topic, dlq])
    await ensure_topics(broker, 1, [inputs[4]])
    pool = await setup_database(database, schema, MIGRATIONS, max_size=4)
    handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=EventClock(), event_clock=True, topics=topics,
                              partitions=PARTITIONS)
    producer = make_producer(broker, f"trg-{schema}")
    await producer.start()
    relay = OutboxRelay(pool, producer, schema)
    consumer = BatchConsumer(service="triggers", bootstrap=broker, group_id=f"triggers.{schema}", topics=inputs,
                             pool=pool, handler=handler, codec=CODEC, metrics=ServiceMetrics("triggers"),
                             dlq_topic=dlq.name, max_records=300, on_committed=relay.wake)
    queues = as_records(items, topics)
    total = sum(len(q) for q in queues.values())
    tasks: list[asyncio.Task] = []

    async def timer() -> None:
        while True:
            await handler.scheduled_scan(pool)
            await asyncio.sleep(0.05)

    reader = AIOKafkaConsumer(fired_topic.name, bootstrap_servers=broker, auto_offset_reset="earliest",
                              enable_auto_commit=False, group_id=None)
    try:
        for (topic, part), q in queues.items():
            for r in q:
                await producer.send(topic, value=r.raw, key=r.key, partition=part)
        await producer.flush()
        await consumer.start()
        tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(relay.run()), asyncio.create_task(timer())]
        await eventually(lambda: asyncio.sleep(0, consumer.applied >= total), timeout=15, message="all consumed")

        async def scanned_to_the_end() -> bool:
            async with pool.acquire() as conn:
                low = await conn.fetchval("SELECT min(watermark) FROM partition_watermarks WHERE topic = $1", topics["events"])
                last = await conn.fetchval("SELECT as_of FROM scan_state WHERE name = 'scan'")
                unsent = await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            return last is not None and low - last < dt.timedelta(minutes=15) and unsent == 0
        await eventually(scanned_to_the_end, timeout=10, message="final scan published")
        async with pool.acquire() as conn:
            expected = await conn.fetchval("SELECT count(*) FROM fired_triggers")
        await reader.start()
        got: dict[str, str] = {}
        while len(got) < expected:
            for msgs in (await reader.getmany(timeout_ms=1000)).values():
                for m in msgs:
                    value = CODEC.decode(m.value, TRIGGER)
                    assert m.key.decode() == value["customer_id"]
                    got[value["trigger_id"]] = value["kind"]
        return set(got), set(got.values())
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await reader.stop()
        await consumer.stop()
        await producer.stop()
        await pool.close()
