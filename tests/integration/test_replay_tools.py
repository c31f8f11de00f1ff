"""export / replay / offsets on the real broker and PostgreSQL: what a developer replaying last
week's topics into a test cluster relies on."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.avro import AvroCodec, SchemaRegistry
from shared.db import setup_database
from shared.events import for_encoding
from shared.kafka import ensure_topics, make_producer
from shared.replay import read_range, replay_export, reset_offsets, show_offsets, write_export
from shared.topics import EVENT, Topic

pytestmark = pytest.mark.asyncio
CODEC = AvroCodec(SchemaRegistry.load())
T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)


def sale(i: int) -> dict:
    return {"event_id": f"e-{i}", "type": "sale", "occurred_at": T0 + dt.timedelta(minutes=i),
            "utc_offset_minutes": 480, "received_at": T0 + dt.timedelta(minutes=i), "source": "pos",
            "store_id": "soho", "customer": {"loyalty_id": f"L-{i % 7}"},
            "properties": {"order_id": f"o-{i}", "currency": "USD", "total": 12990 + i,
                           "lines": [], "coupon_codes": [], "discount": 0, "points_redeemed": 0,
                           "channel": "in_store"}}


async def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = make_producer(bootstrap, "replay-test")
    await producer.start()
    try:
        for i in range(n):
            value = CODEC.encode(EVENT, for_encoding(sale(i)))
            await (await producer.send(topic, value, key=f"loyalty_id:L-{i % 7}".encode()))
    finally:
        await producer.stop()


@pytest.mark.parametrize("fmt", ["jsonl", "avro"])
async def test_export_then_replay_reproduces_the_topic(broker, unique, tmp_path, fmt):
    src, dst = Topic(f"replay.src.{unique}", EVENT), Topic(f"replay.dst.{unique}", EVENT)
    await ensure_topics(broker, 3, [src, dst])
    await produce(broker, src.name, 40)
    exported = await read_range(broker, src)
    assert len(exported) == 40
    path = tmp_path / f"export.{fmt}"
    assert write_export(exported, path, fmt, src) == 40
    assert await replay_export(path, broker, to_topic=dst) == 40
    replayed = await read_range(broker, dst)
    assert sorted(r.value["event_id"] for r in replayed) == sorted(r.value["event_id"] for r in exported)
    original = {r.value["event_id"]: r.value for r in exported}
    for r in replayed:
        assert r.value == original[r.value["event_id"]]


async def test_replay_can_rebase_event_times_to_now(broker, unique, tmp_path):
    src, dst = Topic(f"rebase.src.{unique}", EVENT), Topic(f"rebase.dst.{unique}", EVENT)
    await ensure_topics(broker, 1, [src, dst])
    await produce(broker, src.name, 5)
    path = tmp_path / "export.jsonl"
    write_export(await read_range(broker, src), path, "jsonl", src)
    now = dt.datetime(2027, 1, 1, 12, 0, tzinfo=dt.UTC)
    await replay_export(path, broker, to_topic=dst, rebase=True, now=lambda: now)
    times = sorted(r.value["occurred_at"] for r in await read_range(broker, dst))
    assert times[0] == now and times[-1] == now + dt.timedelta(minutes=4)


async def test_reset_offsets_moves_stored_positions_and_the_kafka_group(broker, database, unique):
    topic = Topic(f"offsets.{unique}", EVENT)
    await ensure_topics(broker, 2, [topic])
    await produce(broker, topic.name, 10)
    schema, group = f"offsets_{unique}", f"svc-{unique}"
    pool = await setup_database(database, schema, None)
    await pool.close()
    before = await show_offsets(broker, database, schema, group, [topic.name])
    assert sum(p.end for p in before) == 10 and all(p.stored is None for p in before)
    after = await reset_offsets(broker, database, schema, group, [topic.name], dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert all(p.stored == 0 and p.committed == 0 for p in after)
    assert sum(p.lag for p in after) == 10
    future = await reset_offsets(broker, database, schema, group, [topic.name], dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    assert sum(p.lag for p in future) == 0 and all(p.stored == p.end for p in future)
