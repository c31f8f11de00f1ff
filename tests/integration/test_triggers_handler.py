"""The triggers handler, scan and API on real PostgreSQL: every trigger kind from input records to
`triggers.fired.v1` outbox rows, exactly once, with merges, tombstones and erasure."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import httpx
import pytest

from services.triggers import store
from services.triggers.api import add_routes
from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot
from services.triggers.handlers import TriggersHandler
from services.triggers.rules import RuleConfig, trigger_id
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
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_STORES,
    LOYALTY,
    LOYALTY_EVENTS,
    MERGE,
    PROFILE,
    RESOLVED,
    TRIGGER,
)
from tests.support.cycles import cyclic_garbage

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "triggers" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
CFG = RuleConfig.from_rules(load_rules(environ={}))
UTC = dt.UTC
T0 = dt.datetime(2026, 6, 1, 14, 0, tzinfo=UTC)
_offsets = itertools.count(1)


def rec(topic, subject, value, key: str, partition: int = 0) -> Record:
    raw = CODEC.encode(subject, value) if value is not None else None
    decoded = CODEC.decode(raw, subject) if raw is not None else None
    return Record(topic.name, partition, next(_offsets), key.encode(), decoded, raw, 0)


def event(cid: str, event_id: str, kind: str, at: dt.datetime, props: dict | None, *, store_id=None,
          offset_minutes: int = -240, partition: int = 0) -> Record:
    ev = {"event_id": event_id, "type": kind, "occurred_at": at, "utc_offset_minutes": offset_minutes,
          "received_at": at, "source": "pos", "store_id": store_id, "customer": {"loyalty_id": f"L-{cid}"},
          "properties": props}
    return rec(IDENTITY_EVENTS, RESOLVED, {"customer_id": cid, "identifiers": [], "event": for_encoding(ev)},
               cid, partition)


def sale(cid: str, event_id: str, at: dt.datetime, total: int = 12000, *, category="coffee",
         store_id: str | None = "soho", channel="in_store", **kw) -> Record:
    return event(cid, event_id, "sale", at, {
        "order_id": f"o-{event_id}", "currency": "USD", "total": total, "channel": channel,
        "lines": [{"sku": "sku-1", "name": "Beans", "category": category, "quantity": 1, "unit_price": total}],
        "coupon_codes": [], "points_redeemed": 0, "discount": None}, store_id=store_id, **kw)


def store_record(kind: str, event_id: str, at: dt.datetime, props: dict) -> Record:
    ev = {"event_id": event_id, "type": kind, "occurred_at": at, "utc_offset_minutes": 0, "received_at": at,
          "source": "admin", "store_id": props.get("store_id") or props.get("store", {}).get("store_id"),
          "customer": {}, "properties": props}
    return rec(INGEST_STORES, EVENT, for_encoding(ev), ev["store_id"])


def soho(at: dt.datetime) -> Record:
    return store_record("store_upsert", "st-soho", at, {"store": {
        "store_id": "soho", "name": "SoHo", "timezone": "America/New_York", "country": "US",
        "city": "New York", "lat": 40.7233, "lon": -74.0030, "currency": "USD"}})


def profile(cid: str, *, version=1, birthday=None, tz="America/New_York", lat=None, lon=None,
            home_store_id=None, tags=(), consents=None, city="New York") -> Record:
    return rec(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid, "identifiers": {}, "birthday": birthday, "timezone": tz, "locale": "en",
        "home_store_id": home_store_id, "tags": list(tags), "consents": consents or {"sms": "opted_in"},
        "address": {"city": city, "region": None, "postal_code": None, "country": "US", "lat": lat, "lon": lon},
        "created_at": T0, "updated_at": T0, "version": version}, cid)


def loyalty(cid: str, event_id: str, kind: str, at: dt.datetime, **kw) -> Record:
    return rec(LOYALTY_EVENTS, LOYALTY, {"event_id": event_id, "kind": kind, "customer_id": cid,
                                         "occurred_at": at, **kw}, cid)


def merge(kind: str, survivor: str, merged: str, at: dt.datetime) -> Record:
    return rec(IDENTITY_MERGES, MERGE, {"merge_id": f"mg-{survivor}-{merged}", "kind": kind, "survivor": survivor,
                                        "merged": merged, "reason": "test", "occurred_at": at}, survivor)


class Harness:
    def __init__(self, pool, clock: FixedClock) -> None:
        self.pool = pool
        self.clock = clock
        self.handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=clock, metrics=ServiceMetrics("triggers_test"))

    async def feed(self, *records: Record) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self.handler(conn, list(records))

    async def scan(self, at: dt.datetime) -> int:
        async with self.pool.acquire() as conn:
            return await self.handler.scan(conn, at)

    async def fired(self) -> list[dict]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT key, value FROM outbox WHERE topic = 'triggers.fired.v1' ORDER BY id")
        out = []
        for r in rows:
            value = CODEC.decode(r["value"], TRIGGER)
            assert r["key"].decode() == value["customer_id"]
            out.append(value)
        return out

    async def facts(self, cid: str):
        async with self.pool.acquire() as conn:
            return await conn.fetchrow("SELECT * FROM customer_facts WHERE customer_id = $1", cid)


@pytest.fixture
async def harness(database, unique):
    pool = await setup_database(database, f"triggers_{unique}", MIGRATIONS)
    try:
        yield Harness(pool, FixedClock(T0))
    finally:
        await pool.close()


async def test_every_trigger_kind_fires_once_into_the_outbox(harness: Harness):
    h = harness
    await h.feed(soho(T0 - dt.timedelta(days=30)),
                 profile("ann", birthday="1990-06-20", lat=40.7306, lon=-73.9866),
                 event("ann", "u1", "signup", T0, {"first_name": None, "tags": [], "tags_removed": []}))
    h.clock.set(T0 + dt.timedelta(hours=1))
    await h.feed(sale("ann", "s1", T0 + dt.timedelta(minutes=30), category="coffee"),
                 event("ann", "a1", "cart_add", T0 + dt.timedelta(minutes=40),
                       {"cart_id": "k1", "sku": "x", "quantity": 1, "unit_price": 4500, "currency": "USD",
                        "category": "tea"}),
                 loyalty("ann", "l1", "tier_changed", T0 + dt.timedelta(minutes=31), old_tier="member",
                         new_tier="gold", trailing_spend=1600000),
                 loyalty("ann", "l2", "points_earned", T0 + dt.timedelta(minutes=31), points=120, balance=120,
                         expires_at=T0 + dt.timedelta(days=20)),
                 store_record("store_event", "se1", T0 + dt.timedelta(minutes=45), {
                     "store_id": "soho", "title": "Coffee tasting", "starts_at": T0 + dt.timedelta(days=3),
                     "radius_km": 5.0}))
    kinds = sorted(t["kind"] for t in await h.fired())
    assert kinds == ["geo_thank_you", "store_event_invite", "tier_upgrade", "welcome"]
    geo = next(t for t in await h.fired() if t["kind"] == "geo_thank_you")
    assert geo["context"]["store_name"] == "SoHo" and geo["period"] == "soho:2026-06-01"

    # Time-based: the cart (due 15:40) and the expiring points now; birthday, replenishment, win-back later.
    assert await h.scan(T0 + dt.timedelta(hours=2)) == 2
    assert await h.scan(T0 + dt.timedelta(hours=2)) == 0  # a second scan fires nothing new
    assert await h.scan(dt.datetime(2026, 6, 17, 12, tzinfo=UTC)) == 1  # birthday, 3 days before (New York)
    assert await h.scan(dt.datetime(2026, 6, 20, 12, tzinfo=UTC)) == 1  # coffee: 21-day cycle, 3 days before
    assert await h.scan(T0 + dt.timedelta(days=90, hours=1)) == 1  # win-back
    async with h.pool.acquire() as conn:
        result = await h.handler.run_campaign(conn, "summer", {"all": [{"field": "tier", "op": "eq", "value": "gold"}]},
                                              {"kind": "campaign", "offer": {"amount": "10"}}, T0)
        again = await h.handler.run_campaign(conn, "summer", {"all": [{"field": "tier", "op": "eq", "value": "gold"}]},
                                             {"kind": "campaign", "offer": {"amount": "10"}}, T0)
    assert result["fired"] == 1 and again["fired"] == 0
    fired = await h.fired()
    assert sorted(t["kind"] for t in fired) == sorted([
        "welcome", "geo_thank_you", "tier_upgrade", "store_event_invite", "abandoned_cart", "points_expiring",
        "birthday_coupon", "replenishment", "win_back", "campaign"])
    assert len({t["trigger_id"] for t in fired}) == len(fired)
    by_kind = {t["kind"]: t for t in fired}
    assert by_kind["birthday_coupon"]["offer"]["amount"] == 5000
    assert by_kind["birthday_coupon"]["trigger_id"] == trigger_id("birthday_coupon", "ann", "2026")
    assert by_kind["win_back"]["context"]["category"] == "coffee"
    assert by_kind["abandoned_cart"]["context"]["category"] == "tea"
    assert by_kind["campaign"]["offer"]["amount"] == 1000
    assert all(isinstance(v, str) for t in fired for v in t["context"].values())


@pytest.mark.parametrize(("minutes", "abandoned"), [(59, False), (61, True)])
async def test_cart_then_sale_in_one_batch_is_decided_at_the_due_time(harness: Harness, minutes, abandoned):
    h = harness
    add = event("bob", "a1", "cart_add", T0, {"cart_id": "k", "sku": "x", "quantity": 1, "unit_price": 100,
                                              "currency": "USD", "category": None})
    h.clock.set(T0 + dt.timedelta(minutes=minutes))
    await h.feed(add, sale("bob", "s1", T0 + dt.timedelta(minutes=minutes), store_id=None, channel="online"))
    await h.scan(T0 + dt.timedelta(hours=3))
    kinds = [t["kind"] for t in await h.fired()]
    assert ("abandoned_cart" in kinds) is abandoned


async def test_redelivered_event_is_folded_once_and_stale_sale_gets_no_thank_you(harness: Harness):
    h = harness
    h.clock.set(T0 + dt.timedelta(days=14))
    s = sale("cy", "s1", T0)
    await h.feed(s)
    await h.feed(sale("cy", "s1", T0))  # the same event again (an upstream outbox re-publish)
    row = await h.facts("cy")
    assert row["orders_count"] == 1 and row["lifetime_spend"] == 12000
    assert [t["kind"] for t in await h.fired()] == []  # two weeks old: no thank-you, no welcome


async def test_a_sale_or_return_sent_again_under_a_new_event_id_counts_once(harness: Harness):
    """A till's retry with a fresh event id is the same purchase, as loyalty counts it: one order,
    one return, whether the copy comes in a later batch or the same one; a merge's re-derivation
    from the stored events agrees."""
    h = harness
    h.clock.set(T0)
    first = sale("dee", "s1", T0 - dt.timedelta(days=3), store_id=None)
    props = {**first.value["event"]["properties"]}
    retry = event("dee", "s1-retry", "sale", T0 - dt.timedelta(days=3), props)
    await h.feed(first)
    await h.feed(retry)
    back = {"order_id": props["order_id"], "return_id": "ret-1", "currency": "USD", "total": 2000,
            "lines": []}
    await h.feed(event("dee", "r1", "return", T0 - dt.timedelta(days=1), back),
                 event("dee", "r1-retry", "return", T0 - dt.timedelta(days=1), back))
    row = await h.facts("dee")
    assert (row["orders_count"], row["lifetime_spend"]) == (1, 12000 - 2000)
    # Another order and another return of the same order are purchases and returns of their own.
    await h.feed(sale("dee", "s2", T0 - dt.timedelta(days=2), total=3000, store_id=None),
                 event("dee", "r2", "return", T0, {**back, "return_id": "ret-2", "total": 1000}))
    row = await h.facts("dee")
    assert (row["orders_count"], row["lifetime_spend"]) == (2, 12000 - 2000 + 3000 - 1000)
    await h.feed(sale("eve", "e1", T0 - dt.timedelta(days=4), total=500, store_id=None))
    await h.feed(merge("merged", "eve", "dee", T0))
    await h.feed(merge("unmerged", "eve", "dee", T0 + dt.timedelta(hours=1)))  # re-derived from events
    row = await h.facts("dee")
    assert (row["orders_count"], row["lifetime_spend"]) == (2, 12000)


async def test_merge_folds_and_unmerge_rederives_from_own_events(harness: Harness):
    h = harness
    h.clock.set(T0)
    await h.feed(sale("s", "s1", T0 - dt.timedelta(days=80), store_id=None),
                 sale("m", "m1", T0 - dt.timedelta(days=10), total=5000, store_id=None, category="tea"),
                 sale("m", "m2", T0 - dt.timedelta(days=5), total=5000, store_id=None, category="tea"))
    await h.feed(merge("merged", "s", "m", T0))
    s = await h.facts("s")
    assert s["orders_count"] == 3 and s["lifetime_spend"] == 22000
    assert s["last_purchase_at"] == T0 - dt.timedelta(days=5)
    assert await h.facts("m") is None
    # Merged mid-lapse: the survivor's 90 days count from the merged customer's later purchase.
    assert await h.scan(T0 + dt.timedelta(days=11)) == 0
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT sum(amount) FROM purchases WHERE customer_id = 's'") == 22000
    await h.feed(merge("merged", "s", "m", T0))  # re-delivered: nothing changes
    assert (await h.facts("s"))["orders_count"] == 3
    await h.feed(merge("unmerged", "s", "m", T0 + dt.timedelta(hours=1)))
    s, m = await h.facts("s"), await h.facts("m")
    assert (s["orders_count"], s["lifetime_spend"]) == (1, 12000)
    assert (m["orders_count"], m["lifetime_spend"], m["last_purchase_at"]) == (2, 10000, T0 - dt.timedelta(days=5))
    # Now the survivor alone has lapsed (80 + 11 days).
    assert await h.scan(T0 + dt.timedelta(days=11)) == 1


async def test_tombstone_forgets_and_erase_removes_stored_events(harness: Harness):
    h = harness
    await h.feed(profile("dee", birthday="--06-03"), sale("dee", "d1", T0 - dt.timedelta(days=1), store_id=None))
    await h.feed(rec(IDENTITY_PROFILES, PROFILE, None, "dee"))
    assert await h.facts("dee") is None
    assert await h.scan(dt.datetime(2026, 6, 1, 12, tzinfo=UTC)) == 0
    await h.feed(sale("eve", "e1", T0, store_id=None))
    await h.feed(event("eve", "x1", "erase_request", T0 + dt.timedelta(minutes=1), None))
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM customer_events WHERE owner = 'eve'") == 0
        assert await conn.fetchval("SELECT count(*) FROM purchases WHERE customer_id = 'eve'") == 0
    assert await h.facts("eve") is None


async def test_http_segments_campaigns_scan_and_triggers(harness: Harness):
    h = harness
    await h.feed(profile("p1", birthday="1980-12-05", tags=["vip"]), profile("p2", birthday="1985-07-01"),
                 sale("p1", "s1", T0 - dt.timedelta(days=10), total=600000, category="pet-health", store_id=None),
                 sale("p2", "s2", T0 - dt.timedelta(days=200), total=100, category="toys", store_id=None))
    keys = KeyRing([ApiKey("r", "read-secret", frozenset({"read"})),
                    ApiKey("a", "admin-secret", frozenset({"read", "admin"}))])
    app = create_app("triggers", keyring=keys, metrics=ServiceMetrics("triggers_http"), ready=_ready)
    add_routes(app, pool_of=lambda: h.pool, handler=h.handler)
    read, admin = {"Authorization": "Bearer read-secret"}, {"Authorization": "Bearer admin-secret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        q = {"all": [{"field": "birthday_month", "op": "eq", "value": 12},
                     {"field": "trailing_spend", "op": "gte", "value": "5000"},
                     {"field": "purchased_category", "op": "eq", "value": "pet-health"}]}
        r = await client.post("/v1/segments/query", json=q, headers=read)
        assert r.status_code == 200 and r.json() == {"count": 1, "customer_ids": ["p1"]}
        r = await client.post("/v1/segments/query", headers=read, json={"any": [
            {"field": "tag", "op": "eq", "value": "vip"}, {"field": "last_purchase_days_ago", "op": "gte", "value": 180}]})
        assert r.json()["count"] == 2
        r = await client.post("/v1/segments/query", headers=read, json={"all": [{"field": "nope", "op": "eq", "value": 1}]})
        assert r.status_code == 422 and r.json()["details"][0]["field"] == "all[0].field" and "nope" in r.json()["message"]
        r = await client.post("/v1/segments/query", headers=read, json={"all": [{"field": "tier", "op": "like", "value": "g"}]})
        assert r.status_code == 422 and "like" in r.json()["message"]
        assert (await client.post("/v1/segments/query", json=q)).status_code == 401
        body = {"name": "vip-dec", "segment": q, "message": {"kind": "campaign", "offer": {"amount": "25"}}}
        assert (await client.post("/v1/campaigns", json=body, headers=read)).status_code == 403
        r = await client.post("/v1/campaigns", json=body, headers=admin)
        assert r.status_code == 201 and r.json()["fired"] == 1
        r = await client.post("/v1/campaigns", json=body, headers=admin)
        assert r.status_code == 200 and r.json()["fired"] == 0
        r = await client.post("/v1/campaigns", json={**body, "segment": {"all": []}}, headers=admin)
        assert r.status_code == 409
        r = await client.post("/v1/triggers/scan", json={"as_of": "2026-12-02T12:00:00-05:00"}, headers=admin)
        assert r.status_code == 200 and r.json()["fired"] == 1  # p1's birthday coupon
        r = await client.post("/v1/triggers/scan", json={"as_of": "yesterday"}, headers=admin)
        assert r.status_code == 422
        r = await client.get("/v1/customers/p1/triggers", headers=read)
        assert [t["kind"] for t in r.json()["triggers"]] == ["birthday_coupon", "campaign"]
        assert r.json()["triggers"][1]["offer"]["amount"] == "25.00"


async def _ready() -> dict[str, bool]:
    return {"database": True}


# -- writing only what changed -------------------------------------------------------------------------

async def row_versions(conn, cid: str) -> dict[str, object]:
    """Row versions (xmin) of the customer's rows: a row written again has a new one."""
    out: dict[str, object] = {"facts": await conn.fetchval(
        "SELECT xmin::text FROM customer_facts WHERE customer_id = $1", cid)}
    for table, key in (("carts", "cart_id"), ("category_facts", "category"), ("point_lots", "lot_id")):
        for r in await conn.fetch(f"SELECT {key} AS k, xmin::text AS v FROM {table} WHERE customer_id = $1", cid):
            out[f"{table}:{r['k']}"] = r["v"]
    return out


async def _versions(h: Harness, cid: str) -> dict[str, object]:
    async with h.pool.acquire() as conn:
        return await row_versions(conn, cid)


async def test_facts_round_trip_and_only_what_changed_is_written(harness: Harness):
    h = harness
    await h.feed(profile("eve", tags=["vip", 'q"uote\\', "\u00e9t\u00e9", "{a,b}"],
                         consents={"sms": "opted_in", "email": "opted_out"}, lat=40.5, lon=-73.25),
                 sale("eve", "s1", T0 - dt.timedelta(days=30), category="coffee"),
                 sale("eve", "s2", T0 - dt.timedelta(days=3, microseconds=7), category="coffee"),
                 sale("eve", "s3", T0 - dt.timedelta(days=3), category="tea"),
                 event("eve", "a1", "cart_add", T0, {"cart_id": "k1", "sku": "x", "quantity": 2, "unit_price": 450,
                                                     "currency": "USD", "category": "tea"}),
                 loyalty("eve", "l1", "points_earned", T0, points=120, balance=120, order_id="o-s1",
                         expires_at=T0 + dt.timedelta(days=200)))
    async with h.pool.acquire() as conn, conn.transaction():
        f = (await store.load_facts(conn, ["eve"]))["eve"]
        # What was read is what a save would write: nothing to do.
        plan = store.plan_save([f], CFG)
        assert not plan.rows and not plan.touch and not any(plan.put.values()) and not any(plan.gone.values())
    assert f.tags == sorted(["vip", 'q"uote\\', "\u00e9t\u00e9", "{a,b}"]) and f.consents["email"] == "opted_out"
    assert f.categories["coffee"].purchases == [T0 - dt.timedelta(days=30), T0 - dt.timedelta(days=3, milliseconds=1)]
    assert f.carts["k1"].items == 2 and [lot.lot_id for lot in f.lots] == ["l1"]
    before = await _versions(h, "eve")

    # The same profile again (a re-delivery) changes nothing: no row is written.
    await h.feed(profile("eve", tags=["vip", 'q"uote\\', "\u00e9t\u00e9", "{a,b}"],
                         consents={"sms": "opted_in", "email": "opted_out"}, lat=40.5, lon=-73.25))
    assert await _versions(h, "eve") == before

    # Points: the new lot alone is inserted; the customer's row gets a new version (for the SQL scan).
    await h.feed(loyalty("eve", "l2", "points_earned", T0, points=30, balance=150,
                         expires_at=T0 + dt.timedelta(days=100)))
    after = await _versions(h, "eve")
    assert after["facts"] != before["facts"] and "point_lots:l2" in after
    assert {k: v for k, v in after.items() if k not in ("facts", "point_lots:l2")} == \
           {k: v for k, v in before.items() if k != "facts"}

    # A sale converts the cart (its row goes) and adds to a category; the others stay as they are.
    await h.feed(sale("eve", "s4", T0 + dt.timedelta(minutes=30), category="tea"))
    final = await _versions(h, "eve")
    assert "carts:k1" not in final and final["category_facts:tea"] != after["category_facts:tea"]
    assert final["category_facts:coffee"] == after["category_facts:coffee"]
    assert final["point_lots:l1"] == after["point_lots:l1"]
    row = await h.facts("eve")
    assert row["orders_count"] == 4 and row["tags"] == sorted(["vip", 'q"uote\\', "\u00e9t\u00e9", "{a,b}"])
    assert row["consented_channels"] == ["sms"] and row["lat"] == 40.5


async def test_saved_facts_read_back_exactly(harness: Harness):
    at = dt.datetime(2026, 3, 29, 1, 59, 59, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45)))
    f = CustomerFacts("zed", birthday="--02-29", tags=["", "NULL", "a b", "x,y"], consents={},
                      profile_at=at, last_event_at=at, orders_count=1, last_purchase_at=at, lifetime_spend=-5,
                      winback_fired_for=at, birthday_fired_for=2026, points_fired_for="2026-04")
    f.categories["\u00e9clair"] = CategoryHistory("\u00e9clair", [at - dt.timedelta(microseconds=1), at], 2, at)
    f.carts["k"] = Cart("k", at, 0, 0, None, None, "abandoned")
    f.lots.append(PointLot("l", 1, at))
    async with harness.pool.acquire() as conn, conn.transaction():
        await store.save_facts(conn, [f], CFG)
        back = (await store.load_facts(conn, ["zed"]))["zed"]
        assert back.categories["\u00e9clair"].purchases == [at - dt.timedelta(microseconds=1), at]
        assert back.tags == ["", "NULL", "a b", "x,y"] and back.points_fired_for == "2026-04"
        assert back.carts == {}  # an abandoned cart is done with: not read back, dropped at the next save
        back.carts["k"] = f.carts["k"]
        plan = store.plan_save([back], CFG)
        assert not plan.rows and not plan.touch and not any(plan.put.values()) and not any(plan.gone.values())
        back.birthday, back.points_fired_for, back.tags = None, None, []  # values that go: NULL columns
        await store.save_facts(conn, [back], CFG)
        row = await conn.fetchrow("SELECT * FROM customer_facts WHERE customer_id = 'zed'")
        assert (row["birthday"], row["birthday_month"], row["points_fired_for"], row["tags"]) == (None, None, None, [])
        assert row["birthday_fired_for"] == 2026 and row["lifetime_spend"] == -5


async def test_a_cart_done_with_by_a_scan_goes_at_the_next_write(harness: Harness):
    h = harness
    await h.feed(profile("kim"), event("kim", "a1", "cart_add", T0, {
        "cart_id": "k1", "sku": "x", "quantity": 1, "unit_price": 100, "currency": "USD", "category": None}))
    assert await h.scan(T0 + dt.timedelta(hours=2)) == 1  # abandoned_cart: the row stays, as abandoned
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT status FROM carts WHERE customer_id = 'kim'") == "abandoned"
    await h.feed(loyalty("kim", "l1", "points_earned", T0 + dt.timedelta(hours=3), points=5, balance=5,
                         expires_at=T0 + dt.timedelta(days=30)))
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM carts WHERE customer_id = 'kim'") == 0
        assert await conn.fetchval("SELECT count(*) FROM point_lots WHERE customer_id = 'kim'") == 1


async def test_events_of_a_merged_customer_fold_into_its_survivor(harness: Harness):
    h = harness
    await h.feed(sale("s", "s1", T0 - dt.timedelta(days=3), store_id=None),
                 sale("m", "m1", T0 - dt.timedelta(days=2), store_id=None))
    await h.feed(merge("merged", "s", "m", T0 - dt.timedelta(days=1)))
    # Resolved to the merged id before identity merged it: through the alias to the survivor.
    await h.feed(sale("m", "m2", T0, total=3000, store_id=None, category="tea"),
                 loyalty("m", "lm", "points_earned", T0, points=30, balance=30, expires_at=T0 + dt.timedelta(days=9)))
    s = await h.facts("s")
    assert (s["orders_count"], s["lifetime_spend"]) == (3, 27000) and await h.facts("m") is None
    async with h.pool.acquire() as conn:
        assert await conn.fetchval("SELECT customer_id FROM point_lots WHERE lot_id = 'lm'") == "s"
        # (A sale is stored under its order: handlers._event_key.)
        assert await conn.fetchval("SELECT owner FROM customer_events WHERE event_id = 'o-m2'") == "m"


async def test_batches_and_scans_are_freed_without_the_cyclic_collector(harness: Harness):
    """Everything a batch or a scan builds is freed by reference counting as it ends, compiled or
    not: none of it waits for the collector, which the service runs rarely (tests/support/cycles.py)."""
    h = harness

    def batch(n: int) -> list[Record]:
        out = []
        for i in range(n * 40, n * 40 + 40):
            cid, at = f"gc-{i}", T0 + dt.timedelta(seconds=i)
            out += [profile(cid), sale(cid, f"gc-s{i}", at),
                    loyalty(cid, f"gc-l{i}", "points_earned", at, points=42, balance=42,
                            expires_at=at + dt.timedelta(days=365))]
        return out

    await h.feed(soho(T0 - dt.timedelta(days=30)), *batch(0))  # statements prepared, caches filled
    assert await h.scan(T0 + dt.timedelta(days=91)) == 40
    with cyclic_garbage() as left:
        for n in (1, 2, 3):
            await h.feed(*batch(n))
        fired = await h.scan(T0 + dt.timedelta(days=92))
    assert fired == 120  # the win-backs of the three batches' customers
    assert sum(left.values()) == 0, left.most_common(8)
