"""`publish_kafka` on the real broker: every generated event lands on the raw topic as its JSON."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from shared.generator import generate, to_jsonl_line
from shared.kafka import ensure_topics
from shared.publish import publish_kafka
from shared.topics import Topic
from tests.integration.test_batch_consumer import read_topic

pytestmark = pytest.mark.asyncio


async def test_generated_world_is_produced_as_json(broker, unique):
    topic = f"ingest.raw.{unique}"
    await ensure_topics(broker, 2, [Topic(topic, None)])
    world = list(generate(8, 40, 2, dt.date(2026, 3, 2)))
    result = await publish_kafka(world, broker, topic=topic)
    assert result.sent == len(world)
    records = await read_topic(broker, topic, len(world), timeout=15)
    got = sorted((orjson.loads(r.value) for r in records), key=to_jsonl_line)
    assert len(got) == len(world)
    assert got == sorted(world, key=to_jsonl_line)
    assert all(r.key for r in records)
