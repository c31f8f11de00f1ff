"""The notifications batch handler on real PostgreSQL: decisions recorded and published through the
outbox, contacts kept and forgotten, merges counted for caps, replays changing nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest

from services.notifications.api import install_routes
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import NotificationRules, notification_id
from services.notifications.providers import ProviderConfig
from services.notifications.templates import Templates
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.db import setup_database
from shared.events import for_encoding
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.pii import contains_pii
from shared.rules import load_rules
from shared.topics import (
    EVENT,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_STORES,
    MERGE,
    OUTCOME,
    PROFILE,
    TRIGGER,
    TRIGGERS_FIRED,
)
from tests.support.cycles import cyclic_garbage

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "notifications" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = NotificationRules.from_rules(load_rules(environ={}))
TEMPLATES = Templates(RULES.kinds, RULES.locales)
NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
EMAIL, PHONE = "mei.chen@example.com", "+8613812345678"


def record(topic, subject, value, key: str, offset=[0]) -> Record:  # noqa: B006 - a counter
    offset[0] += 1
    raw = CODEC.encode(subject, value) if value is not None else None
    decoded = CODEC.decode(raw, subject) if raw is not None else None
    return Record(topic.name, 0, offset[0], key.encode(), decoded, raw, 0)


def profile(cid: str, *, consents=None, tz="UTC", locale="zh-CN", preferred=None, version=1,
            home_store_id=None, erased=False) -> Record:
    return record(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid, "identifiers": {"email": [EMAIL], "phone": [PHONE]},
        "first_name": "Mei", "locale": locale, "timezone": tz, "home_store_id": home_store_id,
        "preferred_channel": preferred,
        "consents": consents if consents is not None else {"sms": "opted_in", "email": "opted_in"},
        "erased": erased, "created_at": NOON, "updated_at": NOON, "version": version}, cid)


def tombstone(cid: str) -> Record:
    return record(IDENTITY_PROFILES, PROFILE, None, cid)


def trigger(tid: str, cid: str, kind="birthday_coupon", at=NOON, period="2026") -> Record:
    return record(TRIGGERS_FIRED, TRIGGER, {
        "trigger_id": tid, "kind": kind, "customer_id": cid, "fired_at": at, "period": period,
        "context": {"store_name": "SoHo"},
        "offer": {"code": "BDAY-1", "description": "Birthday", "amount": 5000, "min_spend": 30000,
                  "currency": "USD", "expires_at": at + dt.timedelta(days=14)},
        "cause_event_id": None, "occurred_at": at - dt.timedelta(seconds=2)}, cid)


def merge(survivor: str, merged: str) -> Record:
    return record(IDENTITY_MERGES, MERGE, {
        "merge_id": f"m-{merged}", "kind": "merged", "survivor": survivor, "merged": merged,
        "reason": "email", "cause_event_id": None, "occurred_at": NOON}, survivor)


def store_upsert(store_id: str, tz: str) -> Record:
    event = {"event_id": f"store-{store_id}", "type": "store_upsert", "occurred_at": NOON,
             "utc_offset_minutes": 0, "received_at": NOON,
             "source": "admin", "store_id": store_id, "customer": {},
             "properties": {"store": {"store_id": store_id, "name": "Shanghai", "timezone": tz,
                                      "country": "CN"}}}
    return record(INGEST_STORES, EVENT, for_encoding(event), store_id)


@pytest.fixture
async def env(database, unique):
    pool = await setup_database(database, f"notif_{unique}", MIGRATIONS)
    clock = FixedClock(NOON)
    metrics = NotificationMetrics(ServiceMetrics("notifications"))
    handler = NotificationHandler(codec=CODEC, clock=clock, rules=RULES, templates=TEMPLATES,
                                  metrics=metrics)

    async def apply(*records: Record) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    try:
        yield pool, apply, clock, metrics
    finally:
        await pool.close()


async def outcomes(pool) -> list[dict]:
    rows = await pool.fetch("SELECT key, value FROM outbox WHERE topic = 'notifications.outcomes.v1' ORDER BY id")
    return [CODEC.decode(r["value"], OUTCOME) for r in rows]


async def test_decisions_are_recorded_and_published_with_deterministic_ids(env):
    pool, apply, _, metrics = env
    await apply(profile("c1"), profile("c2", consents={}), trigger("t1", "c1"), trigger("t2", "c2"),
                trigger("t3", "c3"))
    rows = {r["trigger_id"]: r for r in await pool.fetch("SELECT * FROM notifications")}
    assert rows["t1"]["status"] == "pending" and rows["t1"]["channel"] == "sms"
    assert str(rows["t1"]["notification_id"]) == notification_id("t1", "sms")
    assert list(rows["t1"]["fallbacks"]) == ["email"]
    assert "生日快乐" in rows["t1"]["body"] and rows["t1"]["locale"] == "zh-Hans"
    assert (rows["t2"]["status"], rows["t2"]["reason"]) == ("suppressed", "no_consent")
    # c3's profile has not arrived (yet): its trigger waits for it, with no channel.
    assert (rows["t3"]["status"], rows["t3"]["reason"], rows["t3"]["channel"]) == (
        "pending", "awaiting_profile", None)
    published = await outcomes(pool)
    assert {(o["trigger_id"], o["status"], o["reason"]) for o in published} == {
        ("t1", "pending", None), ("t2", "suppressed", "no_consent"), ("t3", "pending", "awaiting_profile")}
    t1 = next(o for o in published if o["trigger_id"] == "t1")
    assert t1["trigger_occurred_at"] == NOON - dt.timedelta(seconds=2) and t1["channel"] == "sms"
    keys = {r["key"] for r in await pool.fetch("SELECT key FROM outbox")}
    assert keys == {b"c1", b"c2", b"c3"}
    # Never a phone number or email address in an outcome or the decision table's text.
    for r in await pool.fetch("SELECT value FROM outbox"):
        assert EMAIL.encode() not in r["value"] and PHONE.encode() not in r["value"]
    for r in await pool.fetch("SELECT body, subject, reason FROM notifications"):
        assert not contains_pii(" ".join(filter(None, r.values())))
    exposition = metrics.base.exposition()[0].decode()
    assert 'omnicrm_notifications_decisions_total{channel="sms",reason="none",status="pending"} 1.0' in exposition
    assert "omnicrm_notifications_e2e_latency_seconds_count 2.0" in exposition  # not the held one


async def test_a_trigger_seen_again_changes_nothing(env):
    pool, apply, _, _ = env
    await apply(profile("c1"), trigger("t1", "c1"))
    before = await pool.fetchval("SELECT count(*) FROM outbox")
    await apply(trigger("t1", "c1"))
    await apply(trigger("t1", "c1"), trigger("t1", "c1"))
    assert await pool.fetchval("SELECT count(*) FROM notifications") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox") == before


async def test_quiet_hours_in_the_home_store_zone_and_caps_per_local_day(env):
    pool, apply, clock, _ = env
    evening = dt.datetime(2026, 6, 10, 14, 0, tzinfo=dt.UTC)  # 22:00 in Shanghai
    clock.set(evening)
    await apply(store_upsert("sh-1", "Asia/Shanghai"), profile("c1", tz=None, home_store_id="sh-1"),
                trigger("t1", "c1", at=evening), trigger("t2", "c1", kind="win_back", at=evening, period="lapse"),
                trigger("t3", "c1", kind="welcome", at=evening, period=""))
    rows = {r["trigger_id"]: r for r in await pool.fetch("SELECT * FROM notifications")}
    assert rows["t1"]["status"] == "deferred" and rows["t1"]["reason"] == "quiet_hours"
    assert rows["t1"]["scheduled_for"] == dt.datetime(2026, 6, 11, 1, 0, tzinfo=dt.UTC)
    assert rows["t1"]["due_at"] == rows["t1"]["scheduled_for"]
    assert (rows["t2"]["status"], rows["t2"]["reason"]) == ("suppressed", "frequency_cap")
    assert rows["t3"]["status"] == "deferred"  # service kind: not capped, still quiet hours


async def test_tombstone_forgets_contacts_stops_waiting_messages_and_suppresses_later_ones(env):
    pool, apply, clock, _ = env
    clock.set(dt.datetime(2026, 6, 10, 22, 0, tzinfo=dt.UTC))
    await apply(profile("c1"), trigger("t1", "c1", at=clock.now()))
    assert await pool.fetchval("SELECT status FROM notifications") == "deferred"
    await apply(tombstone("c1"))
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
    row = await pool.fetchrow("SELECT status, reason, body FROM notifications WHERE trigger_id = 't1'")
    assert (row["status"], row["reason"], row["body"]) == ("suppressed", "erased", None)
    await apply(trigger("t2", "c1", kind="welcome", period=""))
    assert await pool.fetchval("SELECT reason FROM notifications WHERE trigger_id = 't2'") == "erased"
    assert [(o["trigger_id"], o["status"], o["reason"]) for o in await outcomes(pool)][-2:] == [
        ("t1", "suppressed", "erased"), ("t2", "suppressed", "erased")]


async def test_merged_customers_history_counts_for_the_survivor(env):
    pool, apply, _, _ = env
    await apply(profile("old"), trigger("t-old", "old", kind="win_back", period="lapse-1"))
    await apply(merge("new", "old"), profile("new"), trigger("t-new", "new", kind="campaign", period="spring"))
    assert await pool.fetchval("SELECT reason FROM notifications WHERE trigger_id = 't-new'") == "frequency_cap"
    # The same birthday fired for both ids before the merge was known is one birthday.
    await apply(trigger("b-old", "old", period="2027", at=NOON + dt.timedelta(days=8)))
    await apply(trigger("b-new", "new", period="2027", at=NOON + dt.timedelta(days=9)))
    assert await pool.fetchval("SELECT reason FROM notifications WHERE trigger_id = 'b-new'") == "duplicate"


async def test_read_api_lists_a_customers_notifications_with_scope(env):
    pool, apply, clock, metrics = env
    await apply(profile("c1"), trigger("t1", "c1"), trigger("t2", "c1", kind="win_back", period="x"))
    keys = KeyRing([ApiKey("reader", "r-secret", frozenset({"read"})), ApiKey("pos", "i-secret", frozenset({"ingest"}))])
    app = create_app("notifications", keyring=keys, metrics=metrics.base, ready=lambda: None)
    install_routes(app, pool=lambda: pool, codec=CODEC, clock=clock, config=ProviderConfig(), metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get("/v1/customers/c1/notifications", headers={"Authorization": "Bearer r-secret"})
        assert r.status_code == 200
        items = r.json()["notifications"]
        assert {(i["trigger_id"], i["status"], i["reason"]) for i in items} == {
            ("t1", "pending", None), ("t2", "suppressed", "frequency_cap")}
        assert all(set(i) >= {"notification_id", "kind", "channel", "scheduled_for", "sent_at", "body"} for i in items)
        assert (await client.get("/v1/customers/c1/notifications")).status_code == 401
        forbidden = await client.get("/v1/customers/c1/notifications", headers={"Authorization": "Bearer i-secret"})
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"


async def test_a_trigger_is_decided_on_the_profile_it_was_fired_on_not_a_later_one_in_the_batch(env):
    pool, apply, _, _ = env
    await apply(profile("c1", consents={}), trigger("t1", "c1", kind="welcome", period=""),
                profile("c1", consents={"email": "opted_in"}, version=2),
                trigger("t2", "c1", kind="tier_upgrade", period="gold"))
    rows = {r["trigger_id"]: r for r in await pool.fetch("SELECT trigger_id, status, reason FROM notifications")}
    assert (rows["t1"]["status"], rows["t1"]["reason"]) == ("suppressed", "no_consent")
    assert rows["t2"]["status"] != "suppressed"  # fired after the consent arrived
    assert await pool.fetchval("SELECT consents->>'email' FROM contacts WHERE customer_id = 'c1'") == "opted_in"


async def test_batches_are_freed_without_the_cyclic_collector(env):
    """Everything a batch builds (decisions, and triggers held for a profile and released by it) is
    freed by reference counting as it ends, compiled or not: none of it waits for the collector,
    which the service runs rarely (tests/support/cycles.py)."""
    pool, apply, clock, metrics = env
    await apply(profile("gc-0"), trigger("gc-t0", "gc-0"))  # statements prepared, caches filled
    with cyclic_garbage() as left:
        for n in (1, 2, 3):
            await apply(trigger(f"gc-t{n}", f"gc-{n}"))  # held: no profile yet
            await apply(profile(f"gc-{n}"), trigger(f"gc-u{n}", "gc-0", period=f"gc-{n}"))  # released
    assert len({o["trigger_id"] for o in await outcomes(pool)}) == 7
    assert sum(left.values()) == 0, left.most_common(8)
