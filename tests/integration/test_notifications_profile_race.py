"""A trigger that reaches notifications before its customer's profile (a new signup's welcome) waits
for it: decided on the profile when it arrives, in a later batch or the same one in either order,
or `no_contact` when the grace period passes first. Real PostgreSQL, the real handler and sweep."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from services.notifications.api import install_routes
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import notification_id
from services.notifications.providers import ProviderConfig
from services.notifications.sender import Dispatcher
from shared.auth import KeyRing
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.db import setup_database
from shared.http import create_app
from shared.metrics import ServiceMetrics
from tests.integration.test_notifications_handler import (
    CODEC,
    MIGRATIONS,
    NOON,
    RULES,
    TEMPLATES,
    outcomes,
    profile,
    tombstone,
    trigger,
)

pytestmark = pytest.mark.asyncio
GRACE = dt.timedelta(seconds=RULES.profile_grace_seconds)


@pytest.fixture
async def env(database, unique):
    pool = await setup_database(database, f"notif_race_{unique}", MIGRATIONS)
    clock = FixedClock(NOON)
    metrics = NotificationMetrics(ServiceMetrics("notifications"))
    handler = NotificationHandler(codec=CODEC, clock=clock, rules=RULES, templates=TEMPLATES,
                                  metrics=metrics)

    async def apply(*records) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    try:
        yield pool, apply, clock, metrics
    finally:
        await pool.close()


def welcome(tid: str, cid: str, at: dt.datetime = NOON):
    return trigger(tid, cid, kind="welcome", at=at, period="")


async def rows_of(pool, tid: str) -> list[dict]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM notifications WHERE trigger_id = $1", tid)]


async def listed(pool, clock, metrics, cid: str, query: str = "") -> list[dict]:
    """GET /v1/customers/{id}/notifications, as the e2e tests read it."""
    app = create_app("notifications", keyring=KeyRing([ApiKey("r", "r-secret", frozenset({"read"}))]),
                     metrics=metrics.base, ready=lambda: None)
    install_routes(app, pool=lambda: pool, codec=CODEC, clock=clock, config=ProviderConfig(), metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get(f"/v1/customers/{cid}/notifications{query}", headers={"Authorization": "Bearer r-secret"})
        assert r.status_code == 200
        return r.json()["notifications"]


def sweeper(pool, clock, metrics) -> Dispatcher:
    """The dispatcher, with no providers: only its sweep of held triggers runs."""
    return Dispatcher(pool, None, providers={}, codec=CODEC, clock=clock, rules=RULES, metrics=metrics,
                      sweep_interval=0.0)


async def test_trigger_then_profile_in_a_later_batch_is_decided_on_the_profiles_consents(env):
    pool, apply, clock, metrics = env
    await apply(welcome("w1", "c1"), welcome("w2", "c2"))
    held = await rows_of(pool, "w1")
    assert [(r["status"], r["reason"], r["channel"]) for r in held] == [("pending", "awaiting_profile", None)]
    assert str(held[0]["notification_id"]) == notification_id("w1", None)
    assert held[0]["due_at"] == NOON + GRACE and held[0]["scheduled_for"] is None
    await apply(welcome("w1", "c1"))  # redelivered while held: nothing new
    assert len(await rows_of(pool, "w1")) == 1
    # Not a decision yet: the list shows it only when asked, so a reader never takes it for one.
    assert await listed(pool, clock, metrics, "c1") == []
    [item] = await listed(pool, clock, metrics, "c1", "?include_held=true")
    assert (item["trigger_id"], item["status"], item["reason"], item["channel"]) == (
        "w1", "pending", "awaiting_profile", None)

    arrival = NOON + dt.timedelta(minutes=2)
    clock.set(arrival)
    await apply(profile("c1", consents={"email": "opted_in"}, locale="en"),
                profile("c2", consents={"email": "opted_out"}))
    [w1] = await rows_of(pool, "w1")
    assert (w1["status"], w1["reason"], w1["channel"]) == ("pending", None, "email")
    assert str(w1["notification_id"]) == notification_id("w1", "email")  # the real notification
    assert w1["scheduled_for"] == arrival == w1["due_at"] and w1["decided_at"] == arrival
    assert w1["body"].startswith("Welcome, Mei") and w1["held_trigger"] is None
    [w2] = await rows_of(pool, "w2")  # refused: the held row itself, updated
    assert (w2["status"], w2["reason"], str(w2["notification_id"])) == (
        "suppressed", "no_consent", notification_id("w2", None))

    published = [(o["trigger_id"], o["notification_id"], o["channel"], o["status"], o["reason"])
                 for o in await outcomes(pool)]
    assert published == [
        ("w1", notification_id("w1", None), None, "pending", "awaiting_profile"),
        ("w2", notification_id("w2", None), None, "pending", "awaiting_profile"),
        ("w1", notification_id("w1", "email"), "email", "pending", None),
        ("w2", notification_id("w2", None), None, "suppressed", "no_consent")]
    items = await listed(pool, clock, metrics, "c1")
    assert [(i["trigger_id"], i["status"], i["channel"]) for i in items] == [("w1", "pending", "email")]

    # A later profile update finds nothing held: the decision stands.
    await apply(profile("c1", consents={}, version=2))
    assert len(await outcomes(pool)) == 4


async def test_no_profile_within_the_grace_period_ends_no_contact(env):
    pool, apply, clock, metrics = env
    await apply(welcome("w1", "c1"))
    dispatcher = sweeper(pool, clock, metrics)
    await dispatcher.start()
    try:
        clock.set(NOON + GRACE - dt.timedelta(seconds=1))
        assert await dispatcher.dispatch_once() == 0 and await dispatcher.expire_held() == 0
        assert (await rows_of(pool, "w1"))[0]["status"] == "pending"
        clock.set(NOON + GRACE)
        await dispatcher.dispatch_once()  # its loop sweeps
        assert await dispatcher.expire_held() == 0  # once
    finally:
        await dispatcher.stop()
    [w1] = await rows_of(pool, "w1")
    assert (w1["status"], w1["reason"], w1["channel"], w1["due_at"], w1["attempt"]) == (
        "suppressed", "no_contact", None, None, 0)
    assert w1["held_trigger"] is None
    # The profile turns up too late: the trigger was ended, nothing is decided again.
    await apply(profile("c1"))
    assert [(o["trigger_id"], o["status"], o["reason"], o["notification_id"]) for o in await outcomes(pool)] == [
        ("w1", "pending", "awaiting_profile", notification_id("w1", None)),
        ("w1", "suppressed", "no_contact", notification_id("w1", None))]
    items = await listed(pool, clock, metrics, "c1")
    assert [(i["trigger_id"], i["status"], i["reason"]) for i in items] == [("w1", "suppressed", "no_contact")]


async def test_profile_arriving_after_the_grace_period_before_the_sweep_is_still_no_contact(env):
    """The end of the grace period is a business time: whether the sweep ran first does not matter."""
    pool, apply, clock, _ = env
    await apply(welcome("w1", "c1"))
    clock.set(NOON + GRACE + dt.timedelta(seconds=5))
    await apply(profile("c1"))
    [w1] = await rows_of(pool, "w1")
    assert (w1["status"], w1["reason"], w1["channel"]) == ("suppressed", "no_contact", None)
    assert [(o["status"], o["reason"]) for o in await outcomes(pool)] == [
        ("pending", "awaiting_profile"), ("suppressed", "no_contact")]


@pytest.mark.parametrize("consents,expected", [
    ({"sms": "opted_in", "email": "opted_in"}, ("pending", None, "sms")),
    ({}, ("suppressed", "no_consent", None)),
])
async def test_trigger_and_profile_in_one_batch_in_either_order_decide_the_same(env, consents, expected):
    pool, apply, clock, metrics = env
    clock.set(NOON + dt.timedelta(seconds=30))
    await apply(welcome("first", "a"), profile("a", consents=consents))  # trigger overtook the profile
    await apply(profile("b", consents=consents), welcome("second", "b"))  # the usual order
    finals = {}
    for tid, cid in (("first", "a"), ("second", "b")):
        [row] = await rows_of(pool, tid)
        assert str(row["notification_id"]) == notification_id(tid, row["channel"])
        finals[tid] = (row["status"], row["reason"], row["channel"], row["scheduled_for"], row["body"],
                       row["decided_at"], list(row["fallbacks"]))
        [item] = await listed(pool, clock, metrics, cid)
        assert (item["status"], item["reason"], item["channel"]) == expected
    assert finals["first"] == finals["second"]
    last = {}
    for o in await outcomes(pool):
        last[o["trigger_id"]] = (o["status"], o["reason"], o["channel"], o["scheduled_for"])
    assert last["first"] == last["second"] == (*expected, finals["first"][3])


async def test_an_erased_customer_is_still_erased_and_a_held_trigger_stops_at_the_erasure(env):
    pool, apply, _, _ = env
    await apply(profile("gone"))
    await apply(tombstone("gone"))
    await apply(welcome("w1", "gone"))
    [w1] = await rows_of(pool, "w1")
    assert (w1["status"], w1["reason"]) == ("suppressed", "erased")

    await apply(welcome("w2", "never-seen"))
    await apply(tombstone("never-seen"))
    [w2] = await rows_of(pool, "w2")
    assert (w2["status"], w2["reason"], w2["held_trigger"]) == ("suppressed", "erased", None)
    assert [(o["trigger_id"], o["status"], o["reason"]) for o in await outcomes(pool)][-3:] == [
        ("w1", "suppressed", "erased"), ("w2", "pending", "awaiting_profile"), ("w2", "suppressed", "erased")]


async def test_held_offers_compete_for_the_day_once_the_profile_arrives(env):
    """Two offers held for one customer: neither blocked the other while waiting; then by priority."""
    pool, apply, clock, _ = env
    await apply(trigger("wb", "c1", kind="win_back", period="lapse"))
    await apply(trigger("bd", "c1", kind="birthday_coupon", period="2026"))
    clock.set(NOON + dt.timedelta(minutes=1))
    await apply(profile("c1"))
    got = {r["trigger_id"]: (r["status"], r["reason"]) for r in await pool.fetch("SELECT * FROM notifications")}
    assert got == {"bd": ("pending", None), "wb": ("suppressed", "frequency_cap")}
