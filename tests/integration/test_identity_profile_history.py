"""Identity publishes a customer's profile per changing event, on real PostgreSQL: the same events
cut into batches anywhere give byte-identical outbox records, topic by topic (resolved events,
merges, profiles with their versions and updated_at; Kafka orders records within a partition, never
across topics), and the same stored customers. This is what lets a replay
under OMNICRM_CLOCK=event hand notifications the same profile history whatever the fetches did."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.identity.handlers import IdentityHandler, IdentityMetrics
from services.identity.normalise import Normaliser
from services.identity.resolution import Guard, customer_id_for
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.db import setup_database
from shared.events import for_encoding
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.topics import EVENT, ROUTES

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "identity" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = load_rules(environ={})["identity"]
T0 = dt.datetime(2026, 11, 22, 2, 15, tzinfo=dt.UTC)
SALE = {"order_id": "o-1", "currency": "USD", "total": 12990, "lines": []}
TABLES = ("customers", "identifiers", "merges", "quarantined_identifiers", "sightings",
          "processed_events", "erasures", "outbox_batches")


def event(event_id: str, kind: str, seconds: int, props: dict | None = None, **customer: str) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": T0 + dt.timedelta(seconds=seconds),
            "utc_offset_minutes": 0, "received_at": T0, "source": "web", "store_id": None,
            "customer": customer, "properties": props}


# In event-time order (as the event-time buffer releases them), covering each way a profile
# changes: a new customer, a consent ten seconds after the signup, a delta at the same instant as
# another, a known shopper who changes nothing, a new identifier, a merge, a shared phone
# quarantined on its owner, an event older than its customer, an update that loses to a newer
# one, an erase, and the stranger who comes after it.
STORY = [
    event("h-01", "signup", 0, {"first_name": "Ann", "locale": "en"}, email="ann@example.com"),
    event("h-02", "consent_update", 10, {"consents": {"email": "opted_in"}}, email="ann@example.com"),
    event("h-03", "sale", 20, SALE, email="ann@example.com"),
    event("h-04", "page_view", 30, {"url": "/"}, email="ann@example.com",
          anonymous_id="anon-ann"),
    event("h-05", "signup", 40, {"first_name": "Bob", "tags": ["vip"]}, phone="+12125550140"),
    event("h-06", "consent_update", 40, {"consents": {"sms": "opted_in"}}, phone="+12125550140"),
    event("h-07", "page_view", 50, {"url": "/x"}, phone="+12125550140"),
    event("h-08", "sale", 60, SALE, email="ann@example.com", phone="+12125550140"),
    event("h-09", "profile_update", 61, {"first_name": "Anna", "tags_removed": ["vip"]},
          phone="+12125550140"),
    event("h-10", "sale", 70, SALE, loyalty_id="LQ-1", phone="+12125550199"),
    event("h-11", "sale", 71, SALE, loyalty_id="LQ-2", phone="+12125550199"),
    event("h-12", "sale", 72, SALE, loyalty_id="LQ-3", phone="+12125550199"),
    event("h-13", "sale", 73, SALE, loyalty_id="LQ-4", phone="+12125550199"),
    event("h-14", "sale", 74, SALE, loyalty_id="LQ-5", phone="+12125550199"),
    event("h-15", "page_view", -30, {"url": "/early"}, anonymous_id="anon-ann"),
    event("h-16", "profile_update", 5, {"first_name": "Old"}, email="ann@example.com"),
    event("h-17", "signup", 80, {"first_name": "Cy"}, email="cy@example.com", loyalty_id="LC"),
    event("h-18", "consent_update", 81, {"consents": {"email": "opted_in"}}, loyalty_id="LC"),
    event("h-19", "erase_request", 90, {}, email="cy@example.com"),
    event("h-20", "sale", 95, SALE, email="cy@example.com"),
    event("h-21", "page_view", 96, {"url": "/"}, email="ann@example.com"),
]


def record(ev: dict, offset: int) -> Record:
    raw = CODEC.encode(EVENT, for_encoding(ev))
    return Record(ROUTES[ev["type"]].name, 0, offset, None, CODEC.decode(raw, EVENT), raw, 0)


def handler() -> IdentityHandler:
    return IdentityHandler(codec=CODEC, normaliser=Normaliser.from_rules(RULES),
                           guard=Guard.from_rules(RULES),
                           metrics=IdentityMetrics(ServiceMetrics("identity")), clock=FixedClock(T0))


def batches(cuts: set[int]) -> list[list[dict]]:
    """STORY cut before each index in `cuts`."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(STORY)), len(STORY)]
    return [STORY[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


async def run(pool, cuts: set[int]) -> tuple[list, list]:
    """Apply STORY from an empty graph in the given batches: (outbox rows, customer rows)."""
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    h = handler()
    offset = 0
    for batch in batches(cuts):
        async with pool.acquire() as conn, conn.transaction():
            await h(conn, [record(e, offset + i) for i, e in enumerate(batch)])
        offset += len(batch)
    out = await pool.fetch("SELECT topic, key, value FROM outbox ORDER BY topic, id")
    customers = await pool.fetch(
        "SELECT customer_id, created_at, updated_at, merged_into, erased, version, own, golden, "
        "members, blocked, quarantined FROM customers ORDER BY customer_id")
    rows = [dict(r) for r in customers]
    for row in rows:  # a sealed value has a random nonce: compare what it seals (the token)
        row["quarantined"] = [{k: v for k, v in n.items() if k != "sealed"} for n in row["quarantined"]]
    return [(r["topic"], bytes(r["key"]), r["value"]) for r in out], rows


def profiles(outbox: list) -> list[tuple[str, dict | None]]:
    return [(key.decode(), CODEC.decode(value) if value is not None else None)
            for topic, key, value in outbox if topic == "identity.profiles.v1"]


@pytest.fixture(scope="module")
def schema(database: str) -> str:
    name = "identity_history"
    asyncio.run(_migrate(database, name))
    return name


async def _migrate(dsn: str, name: str) -> None:
    pool = await setup_database(dsn, name, MIGRATIONS, max_size=2)
    await pool.close()


async def _runs(dsn: str, schema: str, cut_sets: list[set[int]]) -> list[tuple[list, list]]:
    pool = await setup_database(dsn, schema, MIGRATIONS, max_size=2)
    try:
        return [await run(pool, cuts) for cuts in cut_sets]
    finally:
        await pool.close()


def test_one_profile_record_per_changing_event_as_of_that_event(database: str, schema: str) -> None:
    (outbox, customers), = asyncio.run(_runs(database, schema, [set()]))
    ann, bob, cy = customer_id_for("h-01"), customer_id_for("h-05"), customer_id_for("h-17")
    history = [(k, v["version"], v["updated_at"], v["first_name"], v["consents"])
               for k, v in profiles(outbox) if k == ann and v]
    at = [T0 + dt.timedelta(seconds=s) for s in (0, 10, 30, 60, 61)]
    # The signup without consent and the consent ten seconds later are two versions, each valid
    # from its own event's time; the sale that changed nothing made none; the stale update of
    # h-16 (older than Anna's name) changed nothing in the profile.
    assert history[:5] == [
        (ann, 1, at[0], "Ann", {}),
        (ann, 2, at[1], "Ann", {"email": "opted_in"}),
        (ann, 3, at[2], "Ann", {"email": "opted_in"}),           # + anonymous id
        (ann, 4, at[3], "Bob", {"email": "opted_in", "sms": "opted_in"}),  # merged with Bob
        (ann, 5, at[4], "Anna", {"email": "opted_in", "sms": "opted_in"}),
    ]
    assert history[5][1:3] == (6, at[4])  # h-15 made her older: created_at moved, not updated_at
    assert len(history) == 6
    # Bob: two versions at the same instant (signup, consent), then the merge tombstone.
    assert [(v and v["version"], v and v["consents"]) for k, v in profiles(outbox) if k == bob] == [
        (1, {}), (2, {"sms": "opted_in"}), (None, None)]
    # Cy: signup, consent, then erased (a tombstone); the later sale is a new customer.
    assert [v and v["version"] for k, v in profiles(outbox) if k == cy] == [1, 2, None]
    rows = {c["customer_id"]: c for c in customers}
    assert rows[ann]["version"] == 6 and rows[ann]["updated_at"] == at[4]
    assert rows[ann]["created_at"] == T0 - dt.timedelta(seconds=30)
    assert rows[bob]["version"] == 3 and rows[cy]["version"] == 3 and rows[cy]["erased"]
    # The merge event's records: resolved and merge keyed by the survivor, and in the profiles the
    # tombstone and the survivor's profile next to each other (in key order).
    events = [(k.decode(), CODEC.decode(v)) for t, k, v in outbox if t == "identity.events.v1"]
    assert [k for k, v in events if v["event"]["event_id"] == "h-08"] == [ann]
    merges = [(k.decode(), CODEC.decode(v)) for t, k, v in outbox if t == "identity.merges.v1"]
    assert [k for k, v in merges if v["cause_event_id"] == "h-08"] == [ann]
    stream = profiles(outbox)
    gone = stream.index((bob, None))
    pair = stream[gone:gone + 2] if bob < ann else stream[gone - 1:gone + 1]
    assert [k for k, _ in pair] == sorted((ann, bob))
    assert {k: v is None for k, v in pair} == {ann: False, bob: True}
    # The shared phone was quarantined on its owner, which published that change at that event.
    noted = [(v["version"], v["updated_at"]) for k, v in profiles(outbox)
             if k == customer_id_for("h-10") and v and v["quarantined"]]
    assert noted and noted[0][1] > T0 + dt.timedelta(seconds=70)


def test_every_single_cut_and_every_event_alone_publish_the_same(database: str, schema: str) -> None:
    n = len(STORY)
    cut_sets = [set(), *({c} for c in range(1, n)), set(range(1, n))]
    runs = asyncio.run(_runs(database, schema, cut_sets))
    whole = runs[0]
    for cuts, got in zip(cut_sets, runs, strict=True):
        assert got[0] == whole[0], f"outbox differs with cuts {sorted(cuts)}"
        assert got[1] == whole[1], f"customers differ with cuts {sorted(cuts)}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(min_value=1, max_value=len(STORY) - 1)))
def test_any_batch_cuts_publish_the_same_profiles(database: str, schema: str, cuts: set[int]) -> None:
    whole, cut = asyncio.run(_runs(database, schema, [set(), cuts]))
    assert profiles(cut[0]) == profiles(whole[0])
    assert cut == whole
