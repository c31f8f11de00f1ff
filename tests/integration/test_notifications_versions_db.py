"""Event clock on real PostgreSQL: each trigger is decided on the profile version in force at its
fired_at, so trigger-then-profile and profile(s)-then-trigger, in one batch or several, give the
same decision (issue 8: replays decide identically); versions are erased with the customer, keep no
contact point, and are pruned once superseded long ago."""

from __future__ import annotations

import datetime as dt

import pytest

from services.notifications import store
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import EVENT_HORIZON, notification_id
from shared.clock import EventClock
from shared.db import setup_database
from shared.metrics import ServiceMetrics
from shared.topics import PROFILE
from tests.integration.test_notifications_at_rest import clear_contact_data
from tests.integration.test_notifications_handler import (
    CODEC,
    EMAIL,
    IDENTITY_PROFILES,
    MIGRATIONS,
    PHONE,
    RULES,
    TEMPLATES,
    outcomes,
    record,
    tombstone,
    trigger,
)

pytestmark = pytest.mark.asyncio
SIGNUP = dt.datetime(2026, 9, 6, 12, 0, tzinfo=dt.UTC)  # 12:00 UTC: not quiet hours
SEC = dt.timedelta(seconds=1)


@pytest.fixture
async def env(database, unique):
    pool = await setup_database(database, f"notif_ver_{unique}", MIGRATIONS)
    clock = EventClock()
    handler = NotificationHandler(codec=CODEC, clock=clock, rules=RULES, templates=TEMPLATES,
                                  metrics=NotificationMetrics(ServiceMetrics("notifications")))

    async def apply(*records) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    try:
        yield pool, apply, clock
    finally:
        await pool.close()


def profile(cid: str, at: dt.datetime, version: int, consents=None, tz="UTC", first_name="Mei"):
    return record(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid, "identifiers": {"email": [EMAIL], "phone": [PHONE]},
        "first_name": first_name, "locale": "en", "timezone": tz, "home_store_id": None,
        "preferred_channel": None, "consents": consents or {}, "erased": False,
        "created_at": SIGNUP, "updated_at": at, "version": version}, cid)


def welcome(cid: str, at: dt.datetime = SIGNUP):
    return trigger(f"w-{cid}", cid, kind="welcome", at=at, period="")


async def decision(pool, tid: str) -> tuple:
    """The trigger's decision as the replay test compares it, and its rendered body."""
    rows = await pool.fetch("SELECT * FROM notifications WHERE trigger_id = $1", tid)
    assert len(rows) == 1, rows
    r = rows[0]
    assert str(r["notification_id"]) == notification_id(tid, r["channel"])
    return (r["status"], r["reason"], r["channel"], r["scheduled_for"], r["decided_at"],
            list(r["fallbacks"]), r["body"])


async def test_the_consent_given_after_the_signup_does_not_count_whichever_arrived_first(env):
    """Signup at 12:00:00 (no consent), consent at 12:00:10; the welcome fired at the signup."""
    pool, apply, _ = env

    def signup(cid):
        return profile(cid, SIGNUP, 1)

    def consent(cid):
        return profile(cid, SIGNUP + 10 * SEC, 2, consents={"email": "opted_in"})

    await apply(signup("a"), consent("a"))  # both versions first
    await apply(welcome("a"))
    await apply(signup("b"))  # the welcome between the versions
    await apply(welcome("b"))
    await apply(consent("b"))
    await apply(signup("c"), welcome("c"), consent("c"))  # one batch, in arrival order
    await apply(consent("d"), welcome("d"), signup("d"))  # one batch, in any order
    got = {cid: await decision(pool, f"w-{cid}") for cid in "abcd"}
    assert got["a"][:3] == ("suppressed", "no_consent", None)
    assert got["a"] == got["b"] == got["c"] == got["d"]
    # A trigger fired after the consent is decided on it.
    await apply(trigger("geo", "a", kind="geo_thank_you", at=SIGNUP + 20 * SEC, period="x"))
    assert (await decision(pool, "geo"))[:3] == ("pending", None, "email")


async def test_trigger_held_then_profile_equals_profile_then_trigger(env):
    """A brand-new customer: the welcome overtakes every profile version, or comes after them."""
    pool, apply, clock = env
    first = (SIGNUP + dt.timedelta(hours=3), {"email": "opted_in", "sms": "opted_in"})
    later = (SIGNUP + dt.timedelta(days=2), {})  # opted out since: not the profile at the welcome

    def versions(cid):
        return [profile(cid, first[0], 1, consents=first[1], first_name="Lan"),
                profile(cid, later[0], 2, consents=later[1], first_name="Lan")]

    await apply(welcome("held"))
    row = await pool.fetchrow("SELECT * FROM notifications WHERE trigger_id = 'w-held'")
    assert (row["status"], row["reason"], row["channel"]) == ("pending", "awaiting_profile", None)
    assert row["due_at"] == SIGNUP + EVENT_HORIZON  # the hold ends in event time, far ahead
    await apply(*versions("held"))
    await apply(*versions("split")[:1])
    await apply(welcome("split"))
    await apply(*versions("split")[1:])
    await apply(*versions("after"))
    await apply(welcome("after"))
    got = {cid: await decision(pool, f"w-{cid}") for cid in ("held", "split", "after")}
    assert got["held"][:3] == ("pending", None, "sms") and got["held"][6].startswith("Welcome, Lan")
    assert got["held"] == got["split"] == got["after"]
    assert got["held"][4] == SIGNUP  # decided as of its fired_at
    # published: the hold, then the decision replacing it; the others only their decision
    published = [(o["trigger_id"], o["status"], o["reason"]) for o in await outcomes(pool)]
    assert published.count(("w-held", "pending", "awaiting_profile")) == 1
    assert [p for p in published if p[0] != "w-held"] == [
        ("w-split", "pending", None), ("w-after", "pending", None)]
    assert clock.now() == SIGNUP  # the clock is the triggers' event time


async def test_a_first_profile_after_the_horizon_ends_the_trigger_no_contact_either_way(env):
    pool, apply, _ = env
    too_late = SIGNUP + EVENT_HORIZON
    await apply(welcome("x"))
    await apply(profile("x", too_late, 1, consents={"email": "opted_in"}))
    await apply(profile("y", too_late, 1, consents={"email": "opted_in"}))
    await apply(welcome("y"))
    x, y = await decision(pool, "w-x"), await decision(pool, "w-y")
    assert x[:3] == ("suppressed", "no_contact", None) and x == y


async def test_offers_of_one_day_go_to_the_first_in_event_time_whether_held_or_not(env):
    """geo_thank_you at 13:00, then abandoned_cart (a higher priority) at 14:00: decided together
    after a hold or one by one, the day's one slot goes to the earlier."""
    pool, apply, _ = env

    def offers(cid):
        return [trigger(f"geo-{cid}", cid, kind="geo_thank_you", at=SIGNUP + dt.timedelta(hours=1),
                        period="g1"),
                trigger(f"cart-{cid}", cid, kind="abandoned_cart", at=SIGNUP + dt.timedelta(hours=2),
                        period="c1")]

    def first_profile(cid):
        return profile(cid, SIGNUP + dt.timedelta(hours=5), 1, consents={"sms": "opted_in"})

    await apply(*offers("held"))  # both wait for the profile, then are decided together
    await apply(first_profile("held"))
    await apply(first_profile("known"))
    for t in offers("known"):  # one batch each, in fired_at order
        await apply(t)
    got = {cid: [(await decision(pool, f"{k}-{cid}"))[:3] for k in ("geo", "cart")]
           for cid in ("held", "known")}
    assert got["held"] == got["known"] == [("pending", None, "sms"),
                                           ("suppressed", "frequency_cap", None)]


async def test_versions_keep_no_contact_point_and_go_with_the_erasure(env):
    pool, apply, _ = env
    await apply(profile("e", SIGNUP, 1), profile("e", SIGNUP + SEC, 2, consents={"sms": "opted_in"}),
                profile("k", SIGNUP, 1))
    rows = await pool.fetch("SELECT * FROM contact_versions WHERE customer_id = 'e' ORDER BY valid_from")
    assert [(r["version"], list(r["reachable"])) for r in rows] == [
        (1, ["email", "sms", "whatsapp"]), (2, ["email", "sms", "whatsapp"])]
    assert await clear_contact_data(pool) == []
    await apply(profile("e", SIGNUP + SEC, 2))  # a redelivered profile: no new version
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'e'") == 2

    await apply(tombstone("e"))
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'e'") == 0
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'k'") == 1
    erasure = await pool.fetchrow("SELECT * FROM erasures WHERE customer_id = 'e'")
    assert "contact" in erasure["what"]
    # a trigger fired before the erasure and arriving after it finds nothing to decide on
    await apply(welcome("e"))
    assert (await decision(pool, "w-e"))[:2] == ("suppressed", "erased")


async def test_versions_superseded_before_the_horizon_are_pruned(env):
    pool, apply, clock = env
    old = SIGNUP - 2 * EVENT_HORIZON
    await apply(profile("p", old, 1), profile("p", old + SEC, 2), profile("p", SIGNUP - SEC, 3))
    clock.observe(SIGNUP)
    await apply(profile("p", SIGNUP, 4))  # prunes what was superseded before SIGNUP - horizon
    kept = [r["version"] for r in await pool.fetch(
        "SELECT version FROM contact_versions WHERE customer_id = 'p' ORDER BY valid_from, version")]
    assert kept == [2, 3, 4]  # 2 is still in force at the horizon
    async with pool.acquire() as conn:
        await store.add_versions(conn, [], SIGNUP)  # nothing to add: nothing done


async def test_a_tombstone_after_a_trigger_in_one_batch_acts_where_it_arrived(env):
    """A tombstone has no event time: it takes effect where it arrives, so one batch decides as two
    batches cut between the trigger and the tombstone would."""
    pool, apply, _ = env
    consented = {"email": "opted_in"}
    await apply(profile("one", SIGNUP, 1, consents=consented), profile("two", SIGNUP, 1, consents=consented))
    await apply(welcome("one", SIGNUP + SEC), tombstone("one"))
    await apply(welcome("two", SIGNUP + SEC))
    await apply(tombstone("two"))
    published = {}
    for o in await outcomes(pool):
        published.setdefault(o["customer_id"], []).append((o["status"], o["reason"], o["channel"]))
    assert published["one"] == published["two"] == [("pending", None, "email"),
                                                    ("suppressed", "erased", "email")]


def dated_tombstone(cid: str, at: dt.datetime):
    """A tombstone as the event-time merge hands it over: dated by identity's event-at header."""
    r = tombstone(cid)
    r.at = at
    return r


async def published(pool) -> dict[str, list[tuple]]:
    got: dict[str, list[tuple]] = {}
    for o in await outcomes(pool):
        got.setdefault(o["customer_id"], []).append((o["trigger_id"], o["status"], o["reason"], o["channel"]))
    return got


async def test_a_dated_tombstone_stops_earlier_triggers_whichever_arrived_first(env):
    """Merged away at 12:05; the welcome fired at 12:00:01 reaches notifications before the
    tombstone for `first` and after it for `late` (triggers is a hop behind identity). Both are
    decided on the profile as it stood at 12:00:01, then stopped by the tombstone: the same outcomes
    in the same order. A trigger fired after the tombstone's time is erased."""
    pool, apply, _ = env
    consented = {"email": "opted_in"}
    gone = SIGNUP + dt.timedelta(minutes=5)
    for cid in ("first", "late"):
        await apply(profile(cid, SIGNUP, 1, consents=consented))
    await apply(welcome("first", SIGNUP + SEC))
    await apply(dated_tombstone("first", gone), dated_tombstone("late", gone))
    await apply(welcome("late", SIGNUP + SEC))
    after = trigger("after-late", "late", kind="welcome", at=gone + SEC, period="")
    await apply(after)
    got = await published(pool)
    assert [o[1:] for o in got["first"]] == [o[1:] for o in got["late"][:2]] == [
        ("pending", None, "email"), ("suppressed", "erased", "email")]
    assert got["late"][2] == ("after-late", "suppressed", "erased", None)
    assert (await decision(pool, "w-first"))[:3] == (await decision(pool, "w-late"))[:3]
    # the body rendered for the late decision went with the profile, as the first one's did
    assert (await decision(pool, "w-late"))[-1] is None
    assert await clear_contact_data(pool) == []


async def test_versions_kept_past_a_dated_tombstone_go_a_horizon_later(env):
    pool, apply, clock = env
    gone = SIGNUP + dt.timedelta(minutes=5)
    await apply(profile("m", SIGNUP, 1), profile("m", gone + SEC, 2))  # 2 came after: dropped
    await apply(dated_tombstone("m", gone))
    kept = [r["version"] for r in await pool.fetch(
        "SELECT version FROM contact_versions WHERE customer_id = 'm'")]
    assert kept == [1]
    assert await pool.fetchval("SELECT count(*) FROM contacts WHERE customer_id = 'm'") == 0
    clock.observe(gone + EVENT_HORIZON + SEC)
    await apply(profile("n", SIGNUP, 1), dated_tombstone("n", gone + EVENT_HORIZON))
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'm'") == 0
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'n'") == 1


async def test_an_undated_tombstone_after_a_dated_one_erases_for_every_trigger(env):
    pool, apply, _ = env
    gone = SIGNUP + dt.timedelta(minutes=5)
    await apply(profile("u", SIGNUP, 1, consents={"email": "opted_in"}))
    await apply(dated_tombstone("u", gone))
    await apply(tombstone("u"))
    assert await pool.fetchval("SELECT count(*) FROM contact_versions WHERE customer_id = 'u'") == 0
    await apply(welcome("u", SIGNUP + SEC))
    assert (await decision(pool, "w-u"))[:2] == ("suppressed", "erased")


async def test_a_held_trigger_is_released_before_a_dated_tombstone_in_the_same_batch(env):
    """The welcome reached notifications before any profile (held). The first profile and a dated
    tombstone then come in one batch for `one`, in two batches for `two`: both decide the welcome
    on the profile, then stop it."""
    pool, apply, _ = env
    consented = {"email": "opted_in"}
    gone = SIGNUP + dt.timedelta(minutes=5)
    await apply(welcome("one", SIGNUP + SEC), welcome("two", SIGNUP + SEC))
    await apply(profile("one", SIGNUP, 1, consents=consented), dated_tombstone("one", gone))
    await apply(profile("two", SIGNUP, 1, consents=consented))
    await apply(dated_tombstone("two", gone))
    got = await published(pool)
    decided = {cid: [o[1:] for o in got[cid] if o[2] != "awaiting_profile"] for cid in ("one", "two")}
    assert decided["one"] == decided["two"] == [("pending", None, "email"), ("suppressed", "erased", "email")]
