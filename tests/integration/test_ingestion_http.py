"""Ingestion over HTTP on the real broker and PostgreSQL: a Runtime opened in-process, the app driven
through httpx's ASGI transport, accepted events read back from the typed topics and decoded."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import FastAPI

from services.ingestion import shopify
from services.ingestion.api import build_router
from services.ingestion.app import build
from services.ingestion.config import IngestionConfig
from shared.avro import AvroCodec, SchemaRegistry
from shared.config import ApiKey, Settings
from shared.db import setup_database
from shared.errors import SchemaError
from shared.pii import contains_pii
from shared.replay import high_watermarks
from shared.runtime import Runtime
from shared.topics import DEAD_LETTER, EVENT, INGEST_RAW
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "services" / "ingestion" / "migrations"
FIXTURES = ROOT / "tests" / "fixtures" / "shopify"
CODEC = AvroCodec(SchemaRegistry.load())
POS_KEY, READ_KEY = "pos-secret-0123456789", "read-secret-0123456789"
KEYS = (ApiKey("pos", POS_KEY, frozenset({"ingest"})), ApiKey("reader", READ_KEY, frozenset({"read"})))
SHOPIFY_SECRET = "shopify-test-secret"
POS = {"Authorization": f"Bearer {POS_KEY}"}


@dataclass
class Service:
    runtime: Runtime
    app: FastAPI
    client: httpx.AsyncClient
    schema: str
    unique: str


async def _skip_existing_raw_records(database: str, broker: str, schema: str, group: str) -> None:
    """Start the raw consumer of this test at the end of ingest.raw.v1 (other tests wrote there)."""
    pool = await setup_database(database, schema, MIGRATIONS)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(INGEST_RAW.name) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(INGEST_RAW.name) or set()
        # Fetch high watermarks: the embedded broker answers ListOffsets(latest) short of the end.
        ends = await high_watermarks(broker, [TopicPartition(INGEST_RAW.name, p) for p in parts])
    finally:
        await consumer.stop()
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            [(group, tp.topic, tp.partition, off) for tp, off in ends.items()])
    await pool.close()


@contextlib.asynccontextmanager
async def running(broker: str, database: str, unique: str, *, shopify_secret: str | None = SHOPIFY_SECRET,
                  group: str | None = None) -> AsyncIterator[Service]:
    """An ingestion Runtime on its own schema and raw-consumer group, running until the block ends.

    A fresh group per start: a group whose member just left makes the broker wait out the old
    session before the new member joins, which costs a test ten seconds for nothing.
    """
    schema, group = f"ingestion_{unique}", group or f"ingestion-test-{unique}-{uuid.uuid4().hex[:6]}"
    settings = Settings(kafka_bootstrap_servers=broker, database_url=database, api_keys=KEYS,
                        shopify_webhook_secret=shopify_secret, partitions=4)
    from shared.kafka import ensure_topics
    await ensure_topics(broker, 4)
    await _skip_existing_raw_records(database, broker, schema, group)
    runtime = Runtime("ingestion", settings, migrations=MIGRATIONS, schema=schema, pool_size=4)
    app = build(runtime, IngestionConfig(rate_limit_per_second=0, raw_group=group))
    task = asyncio.create_task(runtime.run(None))

    async def started() -> bool:
        if task.done():
            task.result()
        return bool(runtime.consumers) and bool(runtime._running)

    await eventually(started, timeout=20, message="ingestion runtime started")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingestion")
    try:
        yield Service(runtime, app, client, schema, unique)
    finally:
        await client.aclose()
        runtime.stopping.set()
        await asyncio.wait_for(task, 30)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@pytest.fixture(scope="module")
async def svc(broker, database) -> AsyncIterator[Service]:
    """One running service for the tests of this module (each uses its own event ids)."""
    async with running(broker, database, uuid.uuid4().hex[:8]) as service:
        yield service


def now_iso(minutes: float = 0) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)).astimezone(
        dt.timezone(dt.timedelta(hours=8))).isoformat(timespec="seconds")


def sale(event_id: str, email: str, total: str = "129.90", **extra) -> dict:
    return {"event_id": event_id, "type": "sale", "occurred_at": now_iso(-1), "store_id": "soho",
            "customer": {"email": email, "loyalty_id": f"L-{event_id}"},
            "properties": {"order_id": f"o-{event_id}", "currency": "USD", "total": total,
                           "lines": [{"sku": "sku-1", "quantity": 1, "unit_price": total}]}, **extra}


async def read_topic(broker: str, topic: str) -> list:
    """Every record of `topic` up to its current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    out: list = []
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            return out
        ends = await high_watermarks(broker, parts)  # Tansu's ListOffsets(latest) falls short
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, msgs in batch.items():
                out.extend(msgs)
                if msgs and msgs[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


def decoded(messages: list, subject: str) -> list[tuple[object, dict]]:
    """(message, decoded value) of the records that decode; the session's topics also hold the
    poison records the fault suite wrote on purpose, which are not this test's to read."""
    out = []
    for m in messages:
        if m.value is None:
            continue
        try:
            out.append((m, CODEC.decode(m.value, subject)))
        except SchemaError:
            continue
    return out


async def events_on(broker: str, topic: str, ids: set[str]) -> list[tuple[str, dict]]:
    """(key, decoded Event) of the records of `topic` whose event_id is in `ids`."""
    found = []
    for m, value in decoded(await read_topic(broker, topic), EVENT):
        if value["event_id"] in ids:
            found.append((m.key.decode() if m.key else None, value))
    return found


async def partitions_of(broker: str, topic: str, ids: set[str]) -> dict[str, int]:
    return {v["event_id"]: m.partition for m, v in decoded(await read_topic(broker, topic), EVENT)
            if v["event_id"] in ids}


async def dead_letters(broker: str, ids: set[str]) -> list[dict]:
    return [letter for _, letter in decoded(await read_topic(broker, "ingest.dlq.v1"), DEAD_LETTER)
            if letter["event_id"] in ids]


async def wait_for_events(broker: str, topic: str, ids: set[str], timeout: float = 15) -> list:
    async def probe():
        found = await events_on(broker, topic, ids)
        return found if {v["event_id"] for _, v in found} >= ids else None
    return await eventually(probe, timeout=timeout, interval=0.2, message=f"{ids} on {topic}")


async def wait_for_dead_letters(broker: str, ids: set[str], timeout: float = 15) -> list[dict]:
    async def probe():
        found = await dead_letters(broker, ids)
        return found if {d["event_id"] for d in found} >= ids else None
    return await eventually(probe, timeout=timeout, interval=0.2, message=f"{ids} dead-lettered")


async def seen_ids(svc: Service, ids: list[str]) -> set[str]:
    async with svc.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT event_id FROM seen_events WHERE event_id = ANY($1::text[])", ids)
    return {r["event_id"] for r in rows}


# -- accepted, routed, read back ----------------------------------------------------------------

async def test_single_event_is_on_the_sales_topic_keyed_by_first_identifier(svc, broker):
    eid = f"pos-{svc.unique}-1"
    r = await svc.client.post("/v1/events", json=sale(eid, f"ann-{svc.unique}@example.com"), headers=POS)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": 0,
                        "results": [{"event_id": eid, "status": "accepted", "errors": []}]}
    # Accepted means acked by the broker: it is readable now, no waiting.
    [(key, event)] = await events_on(broker, "ingest.sales.v1", {eid})
    assert key == f"email:ann-{svc.unique}@example.com"
    assert event["properties"]["total"] == 12990
    assert event["source"] == "pos"  # the API key's name
    assert event["utc_offset_minutes"] == 480
    assert await seen_ids(svc, [eid]) == {eid}


async def test_batch_routes_each_type_and_dead_letters_the_bad_one(svc, broker):
    u = svc.unique
    good_sale = sale(f"b-{u}-sale", f"bob-{u}@example.com", source="web")
    signup = {"event_id": f"b-{u}-signup", "type": "signup", "occurred_at": now_iso(),
              "customer": {"phone": "+1 212 555 0100"}, "properties": {"first_name": "Bob"}}
    store = {"event_id": f"b-{u}-store", "type": "store_upsert", "occurred_at": now_iso(),
             "properties": {"store": {"store_id": f"store-{u}", "name": "SoHo", "timezone": "America/New_York",
                                      "country": "US"}}}
    view = {"event_id": f"b-{u}-view", "type": "page_view", "occurred_at": now_iso(),
            "customer": {"anonymous_id": f"anon-{u}"}, "properties": {"url": "https://shop.example/"}}
    bad = sale(f"b-{u}-bad", f"carol-{u}@example.com", total=129.9)
    bad["customer"]["phone"] = "555-CALL-NOW"
    r = await svc.client.post("/v1/events", json={"events": [good_sale, bad, signup, store, view]}, headers=POS)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (4, 0, 1)
    assert [x["status"] for x in body["results"]] == ["accepted", "rejected", "accepted", "accepted", "accepted"]
    assert {e["field"] for e in body["results"][1]["errors"]} == {"properties.total", "properties.lines[0].unit_price",
                                                                  "customer.phone"}
    [(_, s)] = await events_on(broker, "ingest.sales.v1", {good_sale["event_id"]})
    assert s["source"] == "web"
    [(key, _)] = await events_on(broker, "ingest.profiles.v1", {signup["event_id"]})
    assert key == "phone:+1 212 555 0100"
    [(key, st)] = await events_on(broker, "ingest.stores.v1", {store["event_id"]})
    assert key == f"store-{u}" and st["store_id"] == f"store-{u}"
    [(key, _)] = await events_on(broker, "ingest.interactions.v1", {view["event_id"]})
    assert key == f"anon-{u}".join(["anonymous_id:", ""])
    [letter] = await wait_for_dead_letters(broker, {bad["event_id"]})
    assert letter["reason"] == "validation"
    assert letter["service"] == "ingestion"
    assert letter["source"] == "pos"
    assert letter["source_topic"] == "http:/v1/events"
    assert json.loads(letter["raw"])["event_id"] == bad["event_id"]
    assert {e["field"] for e in letter["errors"]} == {e["field"] for e in body["results"][1]["errors"]}
    assert contains_pii(json.dumps(letter["errors"])) == []
    assert contains_pii(r.text.replace(f"bob-{u}@example.com", "").replace(f"carol-{u}@example.com", "")) == []


async def test_duplicates_answer_duplicate_and_are_not_republished(svc, broker):
    u = svc.unique
    email = f"dee-{u}@example.com"
    first = sale(f"d-{u}-1", email)
    r = await svc.client.post("/v1/events", json=first, headers=POS)
    assert r.json()["accepted"] == 1
    again = await svc.client.post("/v1/events", json={"events": [first, sale(f"d-{u}-2", email),
                                                                  sale(f"d-{u}-2", email)]}, headers=POS)
    assert again.status_code == 202
    assert [x["status"] for x in again.json()["results"]] == ["duplicate", "accepted", "duplicate"]
    # Same key, same partition: everything published before the marker is visible with it.
    marker = sale(f"d-{u}-marker", email)
    assert (await svc.client.post("/v1/events", json=marker, headers=POS)).json()["accepted"] == 1
    found = await events_on(broker, "ingest.sales.v1", {first["event_id"], f"d-{u}-2", marker["event_id"]})
    assert sorted(v["event_id"] for _, v in found) == sorted([first["event_id"], f"d-{u}-2", marker["event_id"]])


async def test_dedupe_survives_a_restart(broker, database, unique):
    eid = f"restart-{unique}"
    async with running(broker, database, unique) as svc:
        assert (await svc.client.post("/v1/events", json=sale(eid, "r@example.com"), headers=POS)).json()[
            "accepted"] == 1
    async with running(broker, database, unique) as svc:
        r = await svc.client.post("/v1/events", json=sale(eid, "r@example.com"), headers=POS)
        assert r.json()["results"][0]["status"] == "duplicate"


async def test_all_rejected_is_422_with_field_errors_and_dead_letters(svc, broker):
    u = svc.unique
    bad1 = sale(f"r-{u}-1", "x@example.com", occurred_at=now_iso(minutes=30))
    bad2 = {"event_id": f"r-{u}-2", "type": "sale", "occurred_at": now_iso()}
    r = await svc.client.post("/v1/events", json={"events": [bad1, bad2]}, headers=POS)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "validation" and body["rejected"] == 2
    fields = {d["field"] for d in body["details"]}
    assert "events[0].occurred_at" in fields and "events[1].customer" in fields
    assert "events[1].properties.order_id" in fields
    letters = await wait_for_dead_letters(broker, {bad1["event_id"], bad2["event_id"]})
    assert {d["reason"] for d in letters} == {"validation"}
    assert await seen_ids(svc, [bad1["event_id"], bad2["event_id"]]) == set()


# -- the edge ------------------------------------------------------------------------------------

async def test_malformed_json_is_400(svc):
    r = await svc.client.post("/v1/events", content=b'{"event_id": ', headers={**POS, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = await svc.client.post("/v1/events", content=b"\xff\xfe", headers={**POS, "content-type": "application/json"})
    assert r.status_code == 400


async def test_json_nesting_beyond_32_is_400(svc):
    deep: object = "x"
    for _ in range(33):
        deep = {"a": deep}
    event = sale(f"deep-{svc.unique}", "d@example.com")
    event["properties"]["deep"] = deep
    r = await svc.client.post("/v1/events", json=event, headers=POS)
    assert r.status_code == 400 and r.json()["error"] == "too_deep"


async def test_nesting_in_a_field_validation_ignores_is_still_400(svc):
    # The nesting walk is skipped for events that validate; a derived field's input is ignored by
    # validation, so a deep value there must still be found.
    deep: object = "x"
    for _ in range(33):
        deep = [deep]
    event = {**sale(f"deep-derived-{svc.unique}", "d@example.com"), "received_at": deep}
    for body in (event, {"events": [sale(f"deep-ok-{svc.unique}", "d@example.com"), event]}):
        r = await svc.client.post("/v1/events", json=body, headers=POS)
        assert r.status_code == 400 and r.json()["error"] == "too_deep"
    shallow = {**sale(f"shallow-derived-{svc.unique}", "d@example.com"), "received_at": [["x"]]}
    r = await svc.client.post("/v1/events", json=shallow, headers=POS)
    assert r.status_code == 202 and r.json()["accepted"] == 1


async def test_too_deep_is_400_before_429_and_spends_no_tokens(svc):
    app = svc.runtime.http()
    app.include_router(build_router(svc.app.state.ingestor, IngestionConfig(rate_limit_per_second=10),
                                    shopify_secret=None, pool=lambda: svc.runtime.pool, monotonic=lambda: 0.0))
    deep: object = "x"
    for _ in range(33):
        deep = {"a": deep}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        bad = sale(f"rd-{svc.unique}-deep", "rd@example.com")
        bad["properties"]["deep"] = deep
        events = [sale(f"rd-{svc.unique}-{i}", "rd@example.com") for i in range(19)]
        r = await client.post("/v1/events", json={"events": [*events, bad]}, headers=POS)
        assert r.status_code == 400 and r.json()["error"] == "too_deep"
        # The refused request took nothing from the bucket of 20.
        r = await client.post("/v1/events", json={"events": [*events, sale(f"rd-{svc.unique}-x", "rd@example.com")]},
                              headers=POS)
        assert r.status_code == 202 and r.json()["accepted"] == 20
        r = await client.post("/v1/events", json=bad, headers=POS)  # bucket empty, and too deep
        assert r.status_code == 400 and r.json()["error"] == "too_deep"
        r = await client.post("/v1/events", json=sale(f"rd-{svc.unique}-y", "rd@example.com"), headers=POS)
        assert r.status_code == 429


async def test_missing_or_wrong_key_is_401_and_wrong_scope_403(svc):
    body = sale(f"auth-{svc.unique}", "a@example.com")
    assert (await svc.client.post("/v1/events", json=body)).status_code == 401
    assert (await svc.client.post("/v1/events", json=body, headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (await svc.client.post("/v1/events", json=body, headers={"Authorization": POS_KEY})).status_code == 401
    r = await svc.client.post("/v1/events", json=body, headers={"Authorization": f"Bearer {READ_KEY}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


async def test_body_over_5_mib_is_413_by_length_and_by_stream(svc):
    big = b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = await svc.client.post("/v1/events", content=big, headers={**POS, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    async def chunks():  # no Content-Length: chunked, counted as it streams
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    r = await svc.client.post("/v1/events", content=chunks(), headers={**POS, "content-type": "application/json"})
    assert r.status_code == 413


async def test_non_json_content_type_is_415(svc):
    body = json.dumps(sale(f"ct-{svc.unique}", "c@example.com")).encode()
    for ct in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = dict(POS)
        if ct:
            headers["content-type"] = ct
        r = await svc.client.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 415, ct


async def test_more_than_1000_events_is_422_naming_events(svc):
    events = [sale(f"many-{svc.unique}-{i}", "m@example.com") for i in range(1001)]
    r = await svc.client.post("/v1/events", json={"events": events}, headers=POS)
    assert r.status_code == 422
    assert r.json()["details"] == [{"field": "events", "message": "must hold at most 1000 events (got 1001)"}]


async def test_rate_limit_is_429_with_retry_after(svc):
    app = svc.runtime.http()
    now = [0.0]
    app.include_router(build_router(svc.app.state.ingestor, IngestionConfig(rate_limit_per_second=10),
                                    shopify_secret=None, pool=lambda: svc.runtime.pool, monotonic=lambda: now[0]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        events = [sale(f"rl-{svc.unique}-{i}", "rl@example.com") for i in range(20)]
        assert (await client.post("/v1/events", json={"events": events}, headers=POS)).status_code == 202
        r = await client.post("/v1/events", json=sale(f"rl-{svc.unique}-x", "rl@example.com"), headers=POS)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"] == "rate_limited"
        now[0] = 0.2  # two tokens later
        r = await client.post("/v1/events", json=sale(f"rl-{svc.unique}-x", "rl@example.com"), headers=POS)
        assert r.status_code == 202


async def test_broker_failure_is_503_and_nothing_is_marked_seen(broker, database, unique):
    async with running(broker, database, unique) as svc:
        await svc.runtime.producer.stop()  # the broker connection is gone
        eid = f"down-{unique}"
        r = await svc.client.post("/v1/events", json=sale(eid, "down@example.com"), headers=POS)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert await seen_ids(svc, [eid]) == set()


async def test_ops_endpoints_and_openapi(svc):
    assert (await svc.client.get("/health")).json()["status"] == "ok"
    ready = await svc.client.get("/ready")
    assert ready.status_code == 200, ready.text
    await svc.client.post("/v1/events", json=sale(f"m-{svc.unique}", "m@example.com"), headers=POS)
    metrics = (await svc.client.get("/metrics")).text
    assert 'omnicrm_ingestion_events_total{status="accepted",via="http"}' in metrics
    doc = (await svc.client.get("/openapi.json")).json()
    schema = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["oneOf"][0]["required"] == ["event_id", "type", "occurred_at"]
    assert {"413", "415", "429"} <= set(doc["paths"]["/v1/events"]["post"]["responses"])


# -- Shopify -------------------------------------------------------------------------------------

def shopify_post(client: httpx.AsyncClient, path: str, payload: dict, *, webhook_id: str | None = None,
                 secret: str = SHOPIFY_SECRET, topic: str = "orders/paid"):
    body = orjson.dumps(payload)
    headers = {"content-type": "application/json", "X-Shopify-Hmac-Sha256": shopify.sign(secret, body),
               "X-Shopify-Topic": topic, "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4())}
    return client.post(path, content=body, headers=headers)


def load(name: str, order_id: int | None = None) -> dict:
    payload = json.loads((FIXTURES / f"{name}.json").read_text())
    if order_id is not None:
        if name.startswith("refund"):
            payload["order_id"] = order_id
            payload["id"] = order_id + 1
        else:
            payload["id"] = order_id
    return payload


async def test_shopify_order_create_and_paid_count_once_and_the_refund_follows(svc, broker):
    order_id = int(uuid.uuid4().int % 10**15)
    paid = load("orders_paid", order_id)
    created = dict(paid)  # a card order: paid at creation, then orders/paid for the same order
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", created, topic="orders/create")
    assert r.status_code == 200 and r.json()["results"][0] == {
        "event_id": f"shopify-order-{order_id}", "status": "accepted", "errors": []}
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", paid, topic="orders/paid")
    assert r.json()["results"][0]["status"] == "duplicate"
    [(key, sale_event)] = await events_on(broker, "ingest.sales.v1", {f"shopify-order-{order_id}"})
    assert key == "email:jon@example.com"
    assert sale_event["source"] == "shopify" and sale_event["properties"]["total"] == 38800

    refund = load("refunds_create", order_id)
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/refunds", refund, topic="refunds/create")
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    [(key, ret)] = await events_on(broker, "ingest.sales.v1", {f"shopify-refund-{order_id + 1}"})
    assert ret["type"] == "return" and ret["properties"]["order_id"] == str(order_id)
    assert ret["customer"]["web_customer_id"] == "115310627314723954"
    assert ret["properties"]["total"] == 24998


async def test_shopify_redelivery_with_the_same_webhook_id_is_a_duplicate(svc):
    order = load("orders_paid", int(uuid.uuid4().int % 10**15))
    hook = f"hook-{svc.unique}"
    first = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", order, webhook_id=hook)
    assert first.json()["accepted"] == 1
    again = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", order, webhook_id=hook)
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    async with svc.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM shopify_webhooks WHERE webhook_id = $1", hook) == 1


async def test_shopify_bad_hmac_is_401_and_cancelled_order_is_ignored(svc):
    order = load("orders_paid", int(uuid.uuid4().int % 10**15))
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", order, secret="wrong")
    assert r.status_code == 401
    r = await svc.client.post("/v1/webhooks/shopify/orders", content=orjson.dumps(order),
                              headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", load("orders_create"), topic="orders/create")
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "ignored"


async def test_shopify_refund_of_unknown_order_goes_to_the_dlq_with_200(svc, broker):
    order_id = int(uuid.uuid4().int % 10**15)
    r = await shopify_post(svc.client, "/v1/webhooks/shopify/refunds", load("refunds_create", order_id))
    assert r.status_code == 200 and r.json()["rejected"] == 1
    [letter] = await wait_for_dead_letters(broker, {f"shopify-refund-{order_id + 1}"})
    assert letter["source"] == "shopify" and letter["errors"][0]["field"] == "customer"


async def test_shopify_without_a_secret_is_503(broker, database, unique):
    async with running(broker, database, unique, shopify_secret=None) as svc:
        r = await shopify_post(svc.client, "/v1/webhooks/shopify/orders", load("orders_paid"))
        assert r.status_code == 503 and r.json()["error"] == "shopify_not_configured"
