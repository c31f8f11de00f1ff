"""The raw topic `ingest.raw.v1`: JSON events validated like HTTP ones, accepted to the typed topics and
rejected to the DLQ through the outbox, de-duplicated with the same table."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import orjson
import pytest

from services.ingestion.config import IngestionConfig
from services.ingestion.handlers import Ingestor, decode_raw
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.db import setup_database
from shared.kafka import make_producer
from shared.metrics import ServiceMetrics
from shared.topics import DEAD_LETTER, EVENT, INGEST_RAW
from tests.integration.test_ingestion_http import (
    CODEC,
    MIGRATIONS,
    POS,
    decoded,
    events_on,
    partitions_of,
    read_topic,
    running,
    sale,
    wait_for_events,
)
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)


def raw_record(value: bytes, offset: int, key: bytes | None = b"k") -> Record:
    rec = Record(INGEST_RAW.name, 0, offset, key, None, value, 0)
    rec.value = decode_raw(INGEST_RAW, value)
    return rec


def event(event_id: str, **extra) -> dict:
    return {"event_id": event_id, "type": "cart_add", "occurred_at": "2026-11-22T10:00:00+08:00",
            "customer": {"web_customer_id": "w-1"},
            "properties": {"cart_id": "c-1", "sku": "s-1", "quantity": 1, "unit_price": "9.90", "currency": "EUR"},
            **extra}


async def test_handler_routes_accepted_and_dead_letters_rejected_through_the_outbox(database, unique):
    pool = await setup_database(database, f"ingestion_raw_{unique}", MIGRATIONS)
    ingestor = Ingestor(codec=CODEC, clock=FixedClock(NOW), metrics=ServiceMetrics("ingestion"),
                        config=IngestionConfig(), pool=lambda: pool, producer=lambda: None,
                        wake_relay=lambda: None)
    try:
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO seen_events (event_id) VALUES ('seen-before')")
        bad = event("bad-1", occurred_at="yesterday")
        records = [
            raw_record(orjson.dumps(event("ok-1")), 10),
            raw_record(orjson.dumps(bad), 11, key=b"pos-7"),
            raw_record(orjson.dumps(event("seen-before")), 12),
            raw_record(orjson.dumps({"events": [event("ok-2"), event("ok-2"), event("bad-2", type="nope")]}), 13),
        ]
        async with pool.acquire() as conn, conn.transaction():
            await ingestor.handle_raw(conn, records)
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT topic, key, value FROM outbox ORDER BY id")
            seen = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM seen_events")}
        published = [(r["topic"], r["key"].decode(), CODEC.decode(r["value"], EVENT)["event_id"])
                     for r in rows if r["topic"] != "ingest.dlq.v1"]
        assert published == [("ingest.interactions.v1", "web_customer_id:w-1", "ok-1"),
                             ("ingest.interactions.v1", "web_customer_id:w-1", "ok-2")]
        letters = [CODEC.decode(r["value"], DEAD_LETTER) for r in rows if r["topic"] == "ingest.dlq.v1"]
        assert [(d["event_id"], d["reason"], d["offset"]) for d in letters] == [
            ("bad-1", "validation", 11), ("bad-2", "validation", 13)]
        assert letters[0]["key"] == b"pos-7" and letters[0]["source_topic"] == "ingest.raw.v1"
        assert letters[0]["raw"] == records[1].raw
        assert json.loads(letters[1]["raw"])["event_id"] == "bad-2"  # one event of a batch record
        assert letters[0]["errors"] == [{"field": "occurred_at", "message": letters[0]["errors"][0]["message"]}]
        assert seen == {"seen-before", "ok-1", "ok-2"}
    finally:
        await pool.close()


async def test_raw_topic_end_to_end_with_http_dedupe(broker, database, unique):
    async with running(broker, database, unique) as svc:
        u = uuid.uuid4().hex[:8]
        email = f"raw-{u}@example.com"
        over_http = sale(f"raw-{u}-http", email)
        assert (await svc.client.post("/v1/events", json=over_http, headers=POS)).json()["accepted"] == 1
        good = sale(f"raw-{u}-good", email)
        bad = sale(f"raw-{u}-bad", email, total=12.5)
        marker = sale(f"raw-{u}-marker", email)
        junk = f"not json {u}".encode()
        producer = make_producer(broker, "raw-test")
        await producer.start()
        try:
            for value in (orjson.dumps(over_http), orjson.dumps(good), orjson.dumps(bad), junk,
                          orjson.dumps(marker)):
                await (await producer.send(INGEST_RAW.name, value, key=email.encode()))
        finally:
            await producer.stop()
        ids = {over_http["event_id"], good["event_id"], marker["event_id"]}
        found = await wait_for_events(broker, "ingest.sales.v1", ids)
        # The duplicate of the HTTP event was not published again (same key: ordered before the marker).
        assert sorted(v["event_id"] for _, v in found) == sorted(ids)
        [good_event] = [v for _, v in found if v["event_id"] == good["event_id"]]
        assert good_event["source"] is None and good_event["properties"]["total"] == 12990

        async def letters():
            out = [v for _, v in decoded(await read_topic(broker, "ingest.dlq.v1"), DEAD_LETTER)]
            mine = [d for d in out if d["event_id"] == bad["event_id"] or d["raw"] == junk]
            return mine if len(mine) == 2 else None

        got = await eventually(letters, timeout=15, interval=0.2, message="raw dead letters")
        reasons = {(d["event_id"], d["reason"]) for d in got}
        assert reasons == {(bad["event_id"], "validation"), (None, "malformed_json")}
        assert all(d["source_topic"] == "ingest.raw.v1" for d in got)
        again = await events_on(broker, "ingest.sales.v1", {over_http["event_id"]})
        assert len(again) == 1
        # HTTP produces its own record batches, the relay uses send(): one key, one partition.
        parts = await partitions_of(broker, "ingest.sales.v1", {over_http["event_id"], good["event_id"]})
        assert parts[over_http["event_id"]] == parts[good["event_id"]]
