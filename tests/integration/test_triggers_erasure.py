"""Triggers' erasure record on real PostgreSQL: an applied erase_request drops the customer's facts,
stored events and the context of what fired for them (ids and offers stay), is recorded once, and
is served to admins by `GET /v1/erasures/{customer_id}`."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import httpx
import pytest

from services.triggers.api import add_routes
from services.triggers.handlers import TriggersHandler
from services.triggers.rules import RuleConfig
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.db import setup_database
from shared.events import for_encoding
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.topics import (
    EVENT,
    IDENTITY_EVENTS,
    IDENTITY_PROFILES,
    INGEST_STORES,
    PROFILE,
    RESOLVED,
)

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "triggers" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
CFG = RuleConfig.from_rules(load_rules(environ={}))
UTC = dt.UTC
T0 = dt.datetime(2026, 6, 1, 14, 0, tzinfo=UTC)
_offsets = itertools.count(1)
READ = ApiKey("r", "read-secret", frozenset({"read"}))
ADMIN = ApiKey("a", "admin-secret", frozenset({"read", "admin"}))


def rec(topic, subject, value, key: str) -> Record:
    raw = CODEC.encode(subject, value)
    return Record(topic.name, 0, next(_offsets), key.encode(), CODEC.decode(raw, subject), raw, 0)


def event(cid: str, event_id: str, kind: str, at: dt.datetime, props: dict | None,
          store_id: str | None = None) -> Record:
    ev = {"event_id": event_id, "type": kind, "occurred_at": at, "utc_offset_minutes": -240,
          "received_at": at, "source": "pos", "store_id": store_id, "customer": {"loyalty_id": f"L-{cid}"},
          "properties": props}
    return rec(IDENTITY_EVENTS, RESOLVED, {"customer_id": cid, "identifiers": [], "event": for_encoding(ev)}, cid)


def sale(cid: str, event_id: str, at: dt.datetime) -> Record:
    return event(cid, event_id, "sale", at, {
        "order_id": f"o-{event_id}", "currency": "USD", "total": 12000, "channel": "in_store",
        "lines": [{"sku": "sku-1", "name": "Beans", "category": "coffee", "quantity": 1, "unit_price": 12000}],
        "coupon_codes": [], "points_redeemed": 0, "discount": None}, store_id="soho")


def soho(at: dt.datetime) -> Record:
    ev = {"event_id": "st-soho", "type": "store_upsert", "occurred_at": at, "utc_offset_minutes": 0,
          "received_at": at, "source": "admin", "store_id": "soho", "customer": {}, "properties": {"store": {
              "store_id": "soho", "name": "SoHo", "timezone": "America/New_York", "country": "US",
              "city": "New York", "lat": 40.7233, "lon": -74.0030, "currency": "USD"}}}
    return rec(INGEST_STORES, EVENT, for_encoding(ev), "soho")


def profile(cid: str) -> Record:
    return rec(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid, "identifiers": {}, "birthday": "1990-06-20", "timezone": "America/New_York",
        "locale": "en", "home_store_id": "soho", "tags": ["vip"], "consents": {"sms": "opted_in"},
        "address": {"city": "New York", "region": None, "postal_code": None, "country": "US",
                    "lat": 40.73, "lon": -73.98},
        "created_at": T0, "updated_at": T0, "version": 1}, cid)


@pytest.fixture
async def pool(database, unique):
    pool = await setup_database(database, f"triggers_erase_{unique}", MIGRATIONS)
    try:
        yield pool
    finally:
        await pool.close()


async def test_erase_request_drops_facts_and_context_and_is_recorded_once(pool):
    clock = FixedClock(T0 + dt.timedelta(minutes=5))
    handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=clock)

    async def feed(*records: Record) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    await feed(soho(T0 - dt.timedelta(days=30)), profile("ann"), profile("bob"),
               sale("ann", "s1", T0), sale("bob", "s2", T0))
    before = await pool.fetch("SELECT trigger_id, kind, context FROM fired_triggers "
                              "WHERE customer_id = 'ann' ORDER BY trigger_id")
    assert {r["kind"] for r in before} >= {"geo_thank_you"}
    assert all(r["context"] for r in before)

    clock.set(T0 + dt.timedelta(hours=1))
    # Cat's first sale fires in the same batch as her erasure: what fired loses its context too.
    await feed(sale("ann", "s3", T0 + dt.timedelta(minutes=50)),
               event("ann", "x1", "erase_request", T0 + dt.timedelta(minutes=55), None),
               sale("cat", "s4", T0 + dt.timedelta(minutes=50)),
               event("cat", "x2", "erase_request", T0 + dt.timedelta(minutes=55), None))
    rows = await pool.fetch("SELECT customer_id, erased_at, what FROM erasures ORDER BY customer_id")
    everything = ["facts", "stored_events", "purchases", "fired_context"]
    assert [(r["customer_id"], r["erased_at"], list(r["what"])) for r in rows] == [
        ("ann", T0 + dt.timedelta(hours=1), everything), ("cat", T0 + dt.timedelta(hours=1), everything)]
    cat = await pool.fetch("SELECT kind, context FROM fired_triggers WHERE customer_id = 'cat'")
    assert cat and all(r["context"] == {} for r in cat)
    after = await pool.fetch("SELECT trigger_id, context, offer FROM fired_triggers "
                             "WHERE customer_id = 'ann' ORDER BY trigger_id")
    assert {r["trigger_id"] for r in before} <= {r["trigger_id"] for r in after}  # ids stay
    assert all(r["context"] == {} for r in after)
    for table, column in (("customer_facts", "customer_id"), ("customer_events", "owner"),
                          ("purchases", "customer_id"), ("category_facts", "customer_id")):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = 'ann'") == 0, table
    # Bob is untouched.
    assert await pool.fetchval("SELECT count(*) FROM customer_facts WHERE customer_id = 'bob'") == 1
    assert await pool.fetchval("SELECT count(*) FROM fired_triggers WHERE customer_id = 'bob' "
                               "AND context <> '{}'::jsonb") >= 1

    # Re-delivered: nothing changes, the first record stays.
    clock.set(T0 + dt.timedelta(days=2))
    await feed(event("ann", "x1", "erase_request", T0 + dt.timedelta(minutes=55), None))
    assert await pool.fetchval("SELECT erased_at FROM erasures WHERE customer_id = 'ann'") == \
        T0 + dt.timedelta(hours=1)

    app = create_app("triggers", keyring=KeyRing([READ, ADMIN]), metrics=ServiceMetrics("triggers_erase"),
                     ready=lambda: None)
    add_routes(app, pool_of=lambda: pool, handler=handler)
    admin = {"Authorization": "Bearer admin-secret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get("/v1/erasures/ann", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"service": "triggers", "customer_id": "ann",
                            "erased_at": (T0 + dt.timedelta(hours=1)).isoformat(),
                            "what": ["facts", "stored_events", "purchases", "fired_context"]}
        missing = await client.get("/v1/erasures/bob", headers=admin)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert (await client.get("/v1/erasures/ann")).status_code == 401
        assert (await client.get("/v1/erasures/ann", headers={"Authorization": "Bearer read-secret"})).status_code == 403
