"""The triggers service's SQL: set-based reads and writes of facts, events, stores and fired triggers."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg

from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot, Store
from services.triggers.rules import RuleConfig, Trigger, replenishment_remind_at

UTC = dt.UTC

# -- facts -------------------------------------------------------------------------------------

_LOAD_FACTS = """
SELECT f.*, s.timezone AS hs_tz, s.lat AS hs_lat, s.lon AS hs_lon
FROM customer_facts f LEFT JOIN stores s ON s.store_id = f.home_store_id
WHERE f.customer_id = ANY($1::text[])
ORDER BY f.customer_id
"""


async def load_facts(conn: asyncpg.Connection, ids: Iterable[str], *,
                     lock: bool = True) -> dict[str, CustomerFacts]:
    """Facts of `ids` that exist, with their open carts, categories and points lots (rows locked)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    sql = _LOAD_FACTS + (" FOR UPDATE OF f" if lock else "")
    facts: dict[str, CustomerFacts] = {}
    for r in await conn.fetch(sql, wanted):
        facts[r["customer_id"]] = CustomerFacts(
            customer_id=r["customer_id"], birthday=r["birthday"], locale=r["locale"],
            timezone=r["timezone"], home_store_id=r["home_store_id"], city=r["city"],
            country=r["country"], lat=r["lat"], lon=r["lon"], tags=list(r["tags"]),
            consents=dict(r["consents"] or {}), preferred_channel=r["preferred_channel"],
            profile_version=r["profile_version"], profile_at=r["profile_at"], last_event_at=r["last_event_at"],
            first_seen_at=r["first_seen_at"],
            signed_up_at=r["signed_up_at"], first_purchase_at=r["first_purchase_at"],
            last_purchase_at=r["last_purchase_at"], orders_count=r["orders_count"],
            lifetime_spend=r["lifetime_spend"], tier=r["tier"], tier_at=r["tier_at"],
            winback_fired_for=r["winback_fired_for"], birthday_fired_for=r["birthday_fired_for"],
            points_fired_for=r["points_fired_for"],
            home_store_tz=r["hs_tz"], home_store_lat=r["hs_lat"], home_store_lon=r["hs_lon"])
    if not facts:
        return facts
    present = list(facts)
    for r in await conn.fetch(
            "SELECT * FROM carts WHERE customer_id = ANY($1::text[]) AND status = 'open'", present):
        facts[r["customer_id"]].carts[r["cart_id"]] = Cart(
            r["cart_id"], r["last_activity_at"], r["items"], r["total"], r["category"], r["sku"],
            r["status"])
    for r in await conn.fetch("SELECT * FROM category_facts WHERE customer_id = ANY($1::text[])", present):
        facts[r["customer_id"]].categories[r["category"]] = CategoryHistory(
            r["category"], list(r["purchases"]), r["quantity"], r["reminded_for"])
    for r in await conn.fetch(
            "SELECT * FROM point_lots WHERE customer_id = ANY($1::text[]) ORDER BY expires_at, lot_id", present):
        facts[r["customer_id"]].lots.append(
            PointLot(r["lot_id"], r["points"], r["expires_at"], r["order_id"]))
    return facts


_UPSERT_FACTS = """
INSERT INTO customer_facts (customer_id, birthday, birthday_month, birthday_day, locale, timezone,
    home_store_id, city, country, lat, lon, tags, consents, consented_channels, preferred_channel,
    profile_version, profile_at, last_event_at, first_seen_at, signed_up_at, first_purchase_at, last_purchase_at, orders_count,
    lifetime_spend, tier, tier_at, winback_due_at, winback_fired_for, birthday_fired_for, points_fired_for,
    updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
        $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, now())
ON CONFLICT (customer_id) DO UPDATE SET
    birthday = EXCLUDED.birthday, birthday_month = EXCLUDED.birthday_month,
    birthday_day = EXCLUDED.birthday_day, locale = EXCLUDED.locale, timezone = EXCLUDED.timezone,
    home_store_id = EXCLUDED.home_store_id, city = EXCLUDED.city, country = EXCLUDED.country,
    lat = EXCLUDED.lat, lon = EXCLUDED.lon, tags = EXCLUDED.tags, consents = EXCLUDED.consents,
    consented_channels = EXCLUDED.consented_channels, preferred_channel = EXCLUDED.preferred_channel,
    profile_version = EXCLUDED.profile_version, profile_at = EXCLUDED.profile_at, last_event_at = EXCLUDED.last_event_at,
    first_seen_at = EXCLUDED.first_seen_at,
    signed_up_at = EXCLUDED.signed_up_at, first_purchase_at = EXCLUDED.first_purchase_at,
    last_purchase_at = EXCLUDED.last_purchase_at, orders_count = EXCLUDED.orders_count,
    lifetime_spend = EXCLUDED.lifetime_spend, tier = EXCLUDED.tier, tier_at = EXCLUDED.tier_at,
    winback_due_at = EXCLUDED.winback_due_at, winback_fired_for = EXCLUDED.winback_fired_for,
    birthday_fired_for = EXCLUDED.birthday_fired_for, points_fired_for = EXCLUDED.points_fired_for,
    updated_at = now()
"""


def _facts_row(f: CustomerFacts, cfg: RuleConfig) -> tuple:
    md = f.birthday_month_day
    due = f.last_purchase_at + cfg.win_back_lapse if f.last_purchase_at and f.orders_count > 0 else None
    return (f.customer_id, f.birthday, md[0] if md else None, md[1] if md else None, f.locale,
            f.timezone, f.home_store_id, f.city, (f.country or "").upper() or None, f.lat, f.lon,
            list(f.tags), dict(f.consents), f.consented_channels, f.preferred_channel,
            f.profile_version, f.profile_at, f.last_event_at, f.first_seen_at, f.signed_up_at, f.first_purchase_at,
            f.last_purchase_at, f.orders_count, f.lifetime_spend, f.tier, f.tier_at, due,
            f.winback_fired_for, f.birthday_fired_for, f.points_fired_for)


async def save_facts(conn: asyncpg.Connection, facts: Sequence[CustomerFacts], cfg: RuleConfig) -> None:
    """Write facts and replace their carts, categories and lots (one statement per table)."""
    if not facts:
        return
    ids = [f.customer_id for f in facts]
    await conn.executemany(_UPSERT_FACTS, [_facts_row(f, cfg) for f in facts])
    await conn.execute("DELETE FROM carts WHERE customer_id = ANY($1::text[])", ids)
    await conn.execute("DELETE FROM category_facts WHERE customer_id = ANY($1::text[])", ids)
    await conn.execute("DELETE FROM point_lots WHERE customer_id = ANY($1::text[])", ids)
    carts = [(f.customer_id, c) for f in facts for c in f.carts.values() if c.status in ("open", "abandoned")]
    if carts:
        await conn.execute(
            "INSERT INTO carts (customer_id, cart_id, last_activity_at, due_at, items, total, category, sku, status) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[], "
            "$6::bigint[], $7::text[], $8::text[], $9::text[])",
            [cid for cid, _ in carts], [c.cart_id for _, c in carts],
            [c.last_activity_at for _, c in carts], [c.last_activity_at + cfg.cart_after for _, c in carts],
            [c.items for _, c in carts], [c.total for _, c in carts], [c.category for _, c in carts],
            [c.sku for _, c in carts], [c.status for _, c in carts])
    categories = [(f.customer_id, h) for f in facts for h in f.categories.values()]
    if categories:
        await conn.executemany(
            "INSERT INTO category_facts (customer_id, category, purchases, quantity, last_at, remind_at, reminded_for) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(cid, h.category, h.purchases, h.quantity, h.last_at, replenishment_remind_at(h, cfg),
              h.reminded_for) for cid, h in categories])
    lots = [(f.customer_id, lot) for f in facts for lot in f.lots if lot.points > 0]
    if lots:
        await conn.execute(
            "INSERT INTO point_lots (customer_id, lot_id, points, expires_at, order_id) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[])",
            [cid for cid, _ in lots], [lot.lot_id for _, lot in lots], [lot.points for _, lot in lots],
            [lot.expires_at for _, lot in lots], [lot.order_id for _, lot in lots])


async def delete_facts(conn: asyncpg.Connection, ids: Sequence[str], *, purchases: bool = True) -> None:
    """Forget the read model of `ids` (tombstone, merge-away)."""
    if not ids:
        return
    ids = list(ids)
    for table in ("customer_facts", "carts", "category_facts", "point_lots",
                  *(("purchases",) if purchases else ())):
        await conn.execute(f"DELETE FROM {table} WHERE customer_id = ANY($1::text[])", ids)


async def erase_customers(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """Erase everything personal kept about `ids`: facts, stored events, aliases (fired trigger ids stay)."""
    if not ids:
        return
    await delete_facts(conn, ids)
    await conn.execute("DELETE FROM customer_events WHERE owner = ANY($1::text[])", list(ids))


# What an erasure drops here, as named in `erasures.what` and the erase report. Fired trigger ids,
# kinds, periods and offers stay: they hold nothing personal and keep a replay from firing twice.
ERASED_FACTS = "facts"                  # profile facts, carts, categories, points lots
ERASED_EVENTS = "stored_events"         # the customer's events kept for re-deriving facts
ERASED_PURCHASES = "purchases"          # spend per order
ERASED_FIRED_CONTEXT = "fired_context"  # context of fired triggers (birthday, store, category ...)
ERASED_WHAT = (ERASED_FACTS, ERASED_EVENTS, ERASED_PURCHASES, ERASED_FIRED_CONTEXT)
# A re-delivered or repeated erase_request keeps the first record.
_RECORD_ERASURES = """
INSERT INTO erasures (customer_id, erased_at, what)
SELECT u.cid, u.at, $3::text[] FROM unnest($1::text[], $2::timestamptz[]) AS u(cid, at)
ON CONFLICT (customer_id) DO NOTHING
"""


async def record_erasures(conn: asyncpg.Connection, erased: Mapping[str, dt.datetime]) -> None:
    """Blank the context of the customers' fired triggers and record their erasures (when, what)."""
    if not erased:
        return
    ids = sorted(erased)
    await conn.execute("UPDATE fired_triggers SET context = '{}'::jsonb "
                       "WHERE customer_id = ANY($1::text[]) AND context <> '{}'::jsonb", ids)
    await conn.execute(_RECORD_ERASURES, ids, [erased[c] for c in ids], list(ERASED_WHAT))


async def erasure_of(conn: asyncpg.Connection, customer_id: str) -> asyncpg.Record | None:
    """The erasure record of `customer_id`, None when triggers applied none."""
    return await conn.fetchrow(
        "SELECT customer_id, erased_at, what FROM erasures WHERE customer_id = $1", customer_id)


# -- events, purchases, merges -----------------------------------------------------------------

async def insert_events(conn: asyncpg.Connection,
                        rows: Sequence[tuple[str, str, str, dt.datetime, bytes]]) -> set[tuple[str, str]]:
    """Store (source, event_id, owner, occurred_at, raw) rows; returns the keys that are new."""
    if not rows:
        return set()
    got = await conn.fetch(
        "INSERT INTO customer_events (source, event_id, owner, occurred_at, raw) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[]) "
        "ON CONFLICT (source, event_id) DO NOTHING RETURNING source, event_id",
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
        [r[4] for r in rows])
    return {(r["source"], r["event_id"]) for r in got}


async def group_of(conn: asyncpg.Connection, head: str) -> list[str]:
    """`head` and every customer merged into it, directly or through others."""
    rows = await conn.fetch(
        "WITH RECURSIVE g(id) AS (SELECT $1::text UNION "
        "SELECT m.merged FROM merged_into m JOIN g ON m.survivor = g.id) SELECT id FROM g", head)
    return sorted(r["id"] for r in rows)


async def owned_events(conn: asyncpg.Connection, owners: Sequence[str]) -> list[tuple[str, bytes]]:
    """(source, raw) of every stored event of `owners`, in event-time order."""
    rows = await conn.fetch(
        "SELECT source, raw FROM customer_events WHERE owner = ANY($1::text[]) ORDER BY occurred_at, seq",
        list(owners))
    return [(r["source"], r["raw"]) for r in rows]


async def merge_is_new(conn: asyncpg.Connection, merge_id: str, kind: str, at: dt.datetime) -> bool:
    return await conn.fetchval(
        "INSERT INTO merges_applied (merge_id, kind, occurred_at) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING RETURNING true", merge_id, kind, at) is True


async def set_alias(conn: asyncpg.Connection, merged: str, survivor: str, merge_id: str) -> None:
    await conn.execute(
        "INSERT INTO merged_into (merged, survivor, merge_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (merged) DO UPDATE SET survivor = EXCLUDED.survivor, merge_id = EXCLUDED.merge_id",
        merged, survivor, merge_id)


async def remove_alias(conn: asyncpg.Connection, merged: str, survivor: str) -> bool:
    return await conn.fetchval(
        "DELETE FROM merged_into WHERE merged = $1 AND survivor = $2 RETURNING true", merged, survivor) is True


async def resolve(conn: asyncpg.Connection, customer_id: str) -> str:
    """The customer an id now lives in (itself unless merged away)."""
    current = customer_id
    for _ in range(32):
        nxt = await conn.fetchval("SELECT survivor FROM merged_into WHERE merged = $1", current)
        if nxt is None:
            return current
        current = nxt
    return current


async def insert_purchases(conn: asyncpg.Connection,
                           rows: Sequence[tuple[str, str, dt.datetime, int]]) -> None:
    if rows:
        await conn.execute(
            "INSERT INTO purchases (customer_id, event_id, occurred_at, amount) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) "
            "ON CONFLICT DO NOTHING",
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


async def move_purchases(conn: asyncpg.Connection, source: str, target: str) -> None:
    await conn.execute("UPDATE purchases SET customer_id = $2 WHERE customer_id = $1", source, target)


# -- stores ------------------------------------------------------------------------------------

async def upsert_stores(conn: asyncpg.Connection, stores: Sequence[Store]) -> None:
    if stores:
        await conn.executemany(
            "INSERT INTO stores (store_id, name, timezone, country, city, lat, lon, currency, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) ON CONFLICT (store_id) DO UPDATE SET "
            "name = EXCLUDED.name, timezone = EXCLUDED.timezone, country = EXCLUDED.country, "
            "city = EXCLUDED.city, lat = EXCLUDED.lat, lon = EXCLUDED.lon, currency = EXCLUDED.currency, "
            "updated_at = now()",
            [(s.store_id, s.name, s.timezone, s.country, s.city, s.lat, s.lon, s.currency) for s in stores])


async def load_stores(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, Store]:
    wanted = sorted({i for i in ids if i})
    if not wanted:
        return {}
    rows = await conn.fetch("SELECT * FROM stores WHERE store_id = ANY($1::text[])", wanted)
    return {r["store_id"]: Store(r["store_id"], r["name"], r["timezone"], r["country"], r["city"],
                                 r["lat"], r["lon"], r["currency"]) for r in rows}


async def customers_near(conn: asyncpg.Connection, store: Store, radius_km: float,
                         tiers: Sequence[str]) -> list[str]:
    """Customers of `tiers` whose address or home store is inside the bounding box of the radius.

    The box uses the (lat, lon) indexes; the exact haversine distance is the rule's to check.
    """
    if store.lat is None or store.lon is None:
        return []
    dlat = radius_km / 111.0
    coslat = max(math.cos(math.radians(store.lat)), 1e-6)
    dlon = min(radius_km / (111.320 * coslat), 360.0)
    lat_lo, lat_hi = store.lat - dlat, store.lat + dlat
    lon_lo, lon_hi = store.lon - dlon, store.lon + dlon
    wraps = lon_lo < -180 or lon_hi > 180
    rows = await conn.fetch(
        """
        SELECT customer_id FROM customer_facts
        WHERE tier = ANY($1::text[]) AND lat BETWEEN $2 AND $3 AND ($6 OR lon BETWEEN $4 AND $5)
        UNION
        SELECT c.customer_id FROM customer_facts c
        WHERE c.tier = ANY($1::text[]) AND c.home_store_id IN (
            SELECT store_id FROM stores WHERE lat BETWEEN $2 AND $3 AND ($6 OR lon BETWEEN $4 AND $5)
            UNION SELECT $7::text)
        """, list(tiers), lat_lo, lat_hi, lon_lo, lon_hi, wraps, store.store_id)
    return sorted(r["customer_id"] for r in rows)


# -- fired triggers ----------------------------------------------------------------------------

def _offer_json(t: Trigger) -> dict[str, Any] | None:
    if t.offer is None:
        return None
    o = t.offer
    return {"code": o.code, "description": o.description, "amount": o.amount,
            "min_spend": o.min_spend, "currency": o.currency, "expires_at": o.expires_at.isoformat()}


async def record_fired(conn: asyncpg.Connection, triggers: Sequence[Trigger]) -> list[Trigger]:
    """Insert triggers; returns those fired for the first time (the trigger_id key makes it once)."""
    if not triggers:
        return []
    unique: dict[str, Trigger] = {}
    for t in triggers:
        unique.setdefault(t.trigger_id, t)
    ts = list(unique.values())
    rows = await conn.fetch(
        "INSERT INTO fired_triggers (trigger_id, kind, customer_id, period, fired_at, occurred_at, "
        "cause_event_id, context, offer) "
        "SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], "
        "$6::timestamptz[], $7::text[], $8::jsonb[], $9::jsonb[]) "
        "ON CONFLICT (trigger_id) DO NOTHING RETURNING trigger_id",
        [t.trigger_id for t in ts], [t.kind for t in ts], [t.customer_id for t in ts],
        [t.period for t in ts], [t.fired_at for t in ts], [t.occurred_at for t in ts],
        [t.cause_event_id for t in ts], [dict(t.context) for t in ts], [_offer_json(t) for t in ts])
    new = {str(r["trigger_id"]) for r in rows}
    return [t for t in ts if t.trigger_id in new]


async def customer_triggers(conn: asyncpg.Connection, customer_id: str, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM fired_triggers WHERE customer_id = $1 ORDER BY fired_at DESC, trigger_id LIMIT $2",
        customer_id, limit)


# -- clocks and scans --------------------------------------------------------------------------

async def load_watermarks(conn: asyncpg.Connection) -> dict[tuple[str, int], dt.datetime]:
    rows = await conn.fetch("SELECT topic, partition, watermark FROM partition_watermarks")
    return {(r["topic"], r["partition"]): r["watermark"] for r in rows}


async def save_watermarks(conn: asyncpg.Connection, marks: dict[tuple[str, int], dt.datetime]) -> None:
    if marks:
        keys = list(marks)
        await conn.execute(
            "INSERT INTO partition_watermarks (topic, partition, watermark) "
            "SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[]) "
            "ON CONFLICT (topic, partition) DO UPDATE SET "
            "watermark = GREATEST(partition_watermarks.watermark, EXCLUDED.watermark)",
            [k[0] for k in keys], [k[1] for k in keys], [marks[k] for k in keys])


async def min_watermark(conn: asyncpg.Connection, topic: str, partitions: int | None = None) -> dt.datetime | None:
    """How far every partition of `topic` has come; None until each of `partitions` has been seen."""
    row = await conn.fetchrow(
        "SELECT min(watermark) AS low, count(*) AS n FROM partition_watermarks WHERE topic = $1", topic)
    if row["n"] == 0 or (partitions is not None and row["n"] < partitions):
        return None
    return row["low"]


async def last_scan(conn: asyncpg.Connection, name: str = "scan") -> dt.datetime | None:
    return await conn.fetchval("SELECT as_of FROM scan_state WHERE name = $1", name)


async def save_scan(conn: asyncpg.Connection, as_of: dt.datetime, name: str = "scan") -> None:
    await conn.execute(
        "INSERT INTO scan_state (name, as_of) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE "
        "SET as_of = GREATEST(scan_state.as_of, EXCLUDED.as_of)", name, as_of)


def birthday_window(as_of: dt.datetime, lower: dt.datetime, days_before: int) -> tuple[list[int], list[int]]:
    """(months, days) whose birthday window [birthday - days_before, birthday] may hold a local date in (lower, as_of]."""
    start = (lower.astimezone(UTC) - dt.timedelta(days=1)).date()
    end = (as_of.astimezone(UTC) + dt.timedelta(days=days_before + 1)).date()
    if (end - start).days > 370:
        start = end - dt.timedelta(days=370)
    months: list[int] = []
    days: list[int] = []
    d = start
    while d <= end:
        months.append(d.month)
        days.append(d.day)
        if (d.month, d.day) == (2, 28):
            months.append(2)
            days.append(29)  # celebrated on 28 February in common years
        d += dt.timedelta(days=1)
    return months, days


async def scan_candidates(conn: asyncpg.Connection, as_of: dt.datetime, cfg: RuleConfig,
                          since: dt.datetime | None = None) -> list[str]:
    """Customers for whom a time-based trigger may be due at `as_of` (the rules decide)."""

    def lower(kind: str) -> dt.datetime:
        bound = as_of - cfg.lateness(kind)
        return min(bound, since) if since is not None else bound

    months, days = birthday_window(as_of, lower("birthday_coupon"), cfg.birthday_days_before)
    year = as_of.astimezone(UTC).year
    december = as_of.astimezone(UTC).month == 12
    rows = await conn.fetch(
        """
        SELECT customer_id FROM customer_facts
        WHERE (birthday_month, birthday_day) IN (SELECT * FROM unnest($1::smallint[], $2::smallint[]))
          AND (birthday_fired_for IS NULL
               OR birthday_fired_for < $3 + CASE WHEN birthday_month = 1 AND $4 THEN 1 ELSE 0 END)
        UNION
        SELECT customer_id FROM customer_facts
        WHERE winback_due_at <= $5 AND winback_due_at > $6
          AND winback_fired_for IS DISTINCT FROM last_purchase_at
        UNION
        SELECT customer_id FROM carts WHERE status = 'open' AND due_at <= $5 AND due_at > $7
        UNION
        SELECT customer_id FROM category_facts
        WHERE remind_at <= $5 AND remind_at > $8 AND reminded_for IS DISTINCT FROM last_at
        UNION
        SELECT l.customer_id FROM point_lots l JOIN customer_facts f USING (customer_id)
        WHERE l.expires_at > $10 AND l.expires_at <= $9
        GROUP BY l.customer_id, f.points_fired_for
        HAVING f.points_fired_for IS NULL
            OR f.points_fired_for < to_char(max(l.expires_at) + interval '14 hours', 'YYYY-MM')
        """,
        months, days, year, december, as_of, lower("win_back"), lower("abandoned_cart"),
        lower("replenishment"), as_of + dt.timedelta(days=cfg.points_days_before),
        min(as_of, since) if since is not None else as_of)
    return sorted(r["customer_id"] for r in rows)


# -- campaigns ---------------------------------------------------------------------------------

async def campaign(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM campaigns WHERE name = $1", name)


async def insert_campaign(conn: asyncpg.Connection, name: str, segment: Any, message: Any,
                          members: int, fired: int, at: dt.datetime) -> None:
    await conn.execute(
        "INSERT INTO campaigns (name, segment, message, members, fired, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6)", name, segment, message, members, fired, at)


async def segment_members(conn: asyncpg.Connection, where: str, params: list[Any],
                          limit: int | None) -> tuple[int, list[str]]:
    """Count and (first `limit`) ids of customers matching a compiled segment."""
    if limit is None:
        rows = await conn.fetch(
            f"SELECT c.customer_id FROM customer_facts c WHERE {where} ORDER BY c.customer_id", *params)
        ids = [r["customer_id"] for r in rows]
        return len(ids), ids
    count = await conn.fetchval(f"SELECT count(*) FROM customer_facts c WHERE {where}", *params)
    rows = await conn.fetch(
        f"SELECT c.customer_id FROM customer_facts c WHERE {where} ORDER BY c.customer_id "
        f"LIMIT {int(limit)}", *params)
    return count, [r["customer_id"] for r in rows]


# -- store events --------------------------------------------------------------------------------

async def add_store_events(conn: asyncpg.Connection, events: Sequence[dict[str, Any]]) -> None:
    if events:
        await conn.executemany(
            "INSERT INTO store_events (event_id, store_id, title, starts_at, radius_km, occurred_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
            [(e["event_id"], e["properties"]["store_id"], e["properties"]["title"], e["properties"]["starts_at"],
              e["properties"].get("radius_km"), e["occurred_at"]) for e in events])


async def pending_store_events(conn: asyncpg.Connection, as_of: dt.datetime) -> list[dict[str, Any]]:
    """Store events that happened by `as_of` and have not sent their invitations."""
    rows = await conn.fetch(
        "SELECT * FROM store_events WHERE invited_at IS NULL AND occurred_at <= $1 ORDER BY occurred_at, event_id",
        as_of)
    return [{"event_id": r["event_id"], "type": "store_event", "occurred_at": r["occurred_at"],
             "properties": {"store_id": r["store_id"], "title": r["title"], "starts_at": r["starts_at"],
                            "radius_km": r["radius_km"]}} for r in rows]


async def mark_invited(conn: asyncpg.Connection, event_id: str, at: dt.datetime) -> None:
    await conn.execute("UPDATE store_events SET invited_at = $2 WHERE event_id = $1", event_id, at)


async def survivors_of(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, str]:
    """For ids merged away, the customer they now live in."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "WITH RECURSIVE up(start, id, depth) AS ("
        " SELECT merged, survivor, 1 FROM merged_into WHERE merged = ANY($1::text[])"
        " UNION ALL SELECT up.start, m.survivor, up.depth + 1 FROM up JOIN merged_into m ON m.merged = up.id"
        " WHERE up.depth < 32)"
        " SELECT DISTINCT ON (start) start, id FROM up ORDER BY start, depth DESC", wanted)
    return {r["start"]: r["id"] for r in rows}
