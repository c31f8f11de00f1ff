"""The triggers service's SQL: set-based reads and writes of facts, events, stores and fired triggers."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg

from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot, Store
from services.triggers.money import exponent
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
        SELECT customer_id
        FROM (SELECT DISTINCT m, d FROM unnest($1::smallint[], $2::smallint[]) AS w(m, d)) w
        CROSS JOIN LATERAL (SELECT customer_id, birthday_month, birthday_fired_for FROM customer_facts
                            WHERE birthday_month = w.m AND birthday_day = w.d) f  -- a plain join: parallel or indexed
        WHERE (birthday_fired_for IS NULL
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


# -- the set-based time-based scan ---------------------------------------------------------------
# The wall-clock scan decides and describes due triggers here, in one statement per chunk of
# candidates, with the rules of rules.py (birthday_coupon, win_back, abandoned_cart, replenishment,
# points_expiring) at since = as_of. Context values are the strings make_trigger would keep, in its
# key order (NULL values are dropped). Customers it cannot judge exactly (a time zone PostgreSQL
# reads differently from zoneinfo; a replenishment cycle from the customer's own purchase median)
# come back as kind NULL for the Python rules to judge.

_SCAN_TABLES = """
DROP TABLE IF EXISTS pg_temp.scan_due, pg_temp.scan_enc;
CREATE TEMP TABLE scan_due (
    rn bigint, customer_id text, kind text, period text, occurred_at timestamptz, ctx_keys text[],
    ctx_vals text[], offer_expires timestamptz, category text, version xid, at tid) ON COMMIT DROP;
CREATE TEMP TABLE scan_enc (rn bigint, trigger_id uuid, code text, value bytea) ON COMMIT DROP
"""

_SCAN_DUE = """
INSERT INTO scan_due
WITH f AS MATERIALIZED (
    SELECT f.customer_id, f.xmin AS version, f.ctid AS at, f.birthday_month AS bm, f.birthday_day AS bd, f.birthday_fired_for,
           f.last_purchase_at, f.orders_count, f.winback_fired_for, f.points_fired_for, z.tz,
           ($2::timestamptz AT TIME ZONE coalesce(z.tz, 'UTC'))::date AS today
    FROM customer_facts f LEFT JOIN stores s ON s.store_id = f.home_store_id
    CROSS JOIN LATERAL (SELECT coalesce(nullif(f.timezone, ''), nullif(s.timezone, '')) AS n) nn
    LEFT JOIN unnest($3::text[]) AS ok(name) ON ok.name = nn.n
    CROSS JOIN LATERAL (SELECT CASE WHEN nn.n IS NULL THEN $4::text WHEN ok.name IS NOT NULL THEN nn.n END AS tz) z
    WHERE f.customer_id = ANY($1::text[])  -- a hashed array or index scan in key order, not probes
),
-- The chunk's bounds: candidates come sorted, so a chunk's children are one index range of each table
-- rather than the whole table (min and max in the column's own collation: exact whatever the order).
lo AS MATERIALIZED (SELECT min(u) AS lo, max(u) AS hi FROM unnest($1::text[]) AS u),
cat AS MATERIALIZED (
    SELECT c.customer_id, c.category, c.quantity, cardinality(c.purchases) AS n, c.remind_at,
           c.reminded_for, c.purchases[cardinality(c.purchases)] AS last, f.tz, f.today,
           (SELECT u.d FROM unnest($13::text[], $14::int[]) AS u(name, d) WHERE u.name = c.category) AS cfg_days
    FROM category_facts c JOIN f USING (customer_id)
    WHERE c.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo)
),
top AS MATERIALIZED (  -- CustomerFacts.most_bought_category
    SELECT DISTINCT ON (c.customer_id) c.customer_id, c.category
    FROM cat c ORDER BY c.customer_id, c.quantity DESC, c.n DESC, c.category COLLATE "C"
),
due AS (
    -- birthday_coupon: [local midnight days_before the birthday, local midnight after it)
    SELECT f.customer_id, 0 AS rank, y.year::text COLLATE "C" AS sub, y.year::text AS period,
           m.due AS occurred_at,
           ARRAY['birthday', 'days_until', 'timezone'] AS ctx_keys,
           ARRAY[to_char(b.bday, 'YYYY-MM-DD'), (b.bday - f.today)::text, f.tz] AS ctx_vals,
           triggers_local_midnight(b.bday - $9::int + $10::int, f.tz) AS offer_expires,
           NULL::text AS category
    FROM f
    CROSS JOIN LATERAL generate_series(extract(year FROM f.today)::int - 1,
                                       extract(year FROM f.today)::int + 1) AS y(year)
    CROSS JOIN LATERAL (SELECT make_date(y.year, f.bm::int,
        CASE WHEN f.bm = 2 AND f.bd = 29 AND NOT (y.year % 4 = 0 AND (y.year % 100 <> 0 OR y.year % 400 = 0))
             THEN 28 ELSE f.bd::int END) AS bday) b
    CROSS JOIN LATERAL (SELECT triggers_local_midnight(b.bday - $9::int, f.tz) AS due,
                               triggers_local_midnight(b.bday + 1, f.tz) AS fin) m
    WHERE f.tz IS NOT NULL AND (f.bm, f.bd) IN (SELECT * FROM unnest($20::smallint[], $21::smallint[]))
      AND b.bday BETWEEN f.today - 2 AND f.today + $9::int + 2
      AND m.due <= $2 AND m.fin > $2
      AND (f.birthday_fired_for IS NULL OR f.birthday_fired_for < y.year)
    UNION ALL
    -- win_back: once per last purchase, lapse_days after it
    SELECT f.customer_id, 1, '', triggers_iso_utc(f.last_purchase_at), f.last_purchase_at + $5::interval,
           ARRAY['days_since_last_purchase', 'last_purchase_date', 'category', 'orders_count'],
           ARRAY[floor(extract(epoch FROM $2 - f.last_purchase_at) / 86400)::bigint::text,
                 to_char((f.last_purchase_at AT TIME ZONE f.tz)::date, 'YYYY-MM-DD'),
                 t.category, f.orders_count::text],
           NULL::timestamptz, NULL
    FROM f LEFT JOIN top t USING (customer_id)
    WHERE f.tz IS NOT NULL AND f.orders_count >= 1 AND f.last_purchase_at IS NOT NULL
      AND f.winback_fired_for IS DISTINCT FROM f.last_purchase_at
      AND f.last_purchase_at + $5::interval <= $2 AND f.last_purchase_at + $5::interval + $6::interval >= $2
    UNION ALL
    -- abandoned_cart: once per open cart, after_minutes after its last activity
    SELECT f.customer_id, 2, k.cart_id COLLATE "C", k.cart_id, k.last_activity_at + $7::interval,
           ARRAY['cart_id', 'items', 'cart_total', 'currency', 'category', 'sku', 'minutes_since_activity'],
           ARRAY[k.cart_id, k.items::text,
                 round(k.total::numeric / (10::numeric ^ $18::int), $18::int)::text, $19::text,
                 k.category, k.sku, floor(extract(epoch FROM $2 - k.last_activity_at) / 60)::bigint::text],
           NULL, NULL
    FROM carts k JOIN f USING (customer_id)
    WHERE k.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo) AND f.tz IS NOT NULL AND k.status = 'open'
      AND k.last_activity_at + $7::interval <= $2 AND k.last_activity_at + $7::interval + $8::interval >= $2
    UNION ALL
    -- replenishment with the category's configured cycle (fewer purchases than min_purchases)
    SELECT c.customer_id, 3, c.category COLLATE "C", c.category || ':' || triggers_iso_utc(c.last),
           c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day',
           ARRAY['category', 'cycle_days', 'due_date', 'last_purchase_date', 'days_since_last_purchase'],
           ARRAY[c.category, c.cfg_days::text,
                 to_char(((c.last + c.cfg_days * interval '1 day') AT TIME ZONE c.tz)::date, 'YYYY-MM-DD'),
                 to_char((c.last AT TIME ZONE c.tz)::date, 'YYYY-MM-DD'),
                 floor(extract(epoch FROM $2 - c.last) / 86400)::bigint::text],
           NULL, c.category
    FROM cat c
    WHERE c.tz IS NOT NULL AND c.n > 0 AND c.n < $12::int AND c.cfg_days <> 0
      AND c.reminded_for IS DISTINCT FROM c.last
      AND c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day' <= $2
      AND c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day' + $15::interval >= $2
    UNION ALL
    -- points_expiring: per local month of expiry, days_before the first lot of it expires
    SELECT p.customer_id, 4, p.month COLLATE "C", p.month, p.first - $16::int * interval '1 day',
           ARRAY['points', 'expires_at', 'expires_date', 'points_balance'],
           ARRAY[p.points::text, triggers_iso_utc(p.first), to_char((p.first AT TIME ZONE p.tz)::date, 'YYYY-MM-DD'),
                 p.balance::text],
           NULL, NULL
    FROM (SELECT l.customer_id, l.tz, l.points_fired_for, to_char(l.expires_at AT TIME ZONE l.tz, 'YYYY-MM') AS month,
                 sum(l.points) AS points, min(l.expires_at) AS first, max(l.balance) AS balance
          FROM (SELECT l.customer_id, l.points, l.expires_at, f.tz, f.points_fired_for,
                       sum(l.points) OVER (PARTITION BY l.customer_id) AS balance  -- CustomerFacts.points_open
                FROM point_lots l JOIN f USING (customer_id)
                WHERE l.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo) AND f.tz IS NOT NULL) l
          WHERE l.points > 0 AND l.expires_at > $2
          GROUP BY l.customer_id, l.tz, l.points_fired_for, 4) p
    WHERE (p.points_fired_for IS NULL OR p.points_fired_for COLLATE "C" < p.month COLLATE "C")
      AND p.points >= $17::int AND p.first - $16::int * interval '1 day' <= $2
),
py AS MATERIALIZED (
    SELECT f.customer_id FROM f WHERE f.tz IS NULL
    UNION
    SELECT c.customer_id FROM cat c WHERE c.n >= $12::int AND c.reminded_for IS DISTINCT FROM c.last
      AND c.remind_at <= $2 AND c.remind_at + $15::interval >= $2
)
SELECT row_number() OVER (ORDER BY d.customer_id, d.rank, d.sub), d.customer_id,
       (ARRAY['birthday_coupon', 'win_back', 'abandoned_cart', 'replenishment', 'points_expiring'])[d.rank + 1],
       d.period, d.occurred_at, d.ctx_keys, d.ctx_vals, d.offer_expires, d.category, f.version, f.at
FROM due d JOIN f USING (customer_id) WHERE NOT EXISTS (SELECT 1 FROM py WHERE py.customer_id = d.customer_id)
UNION ALL
SELECT NULL, py.customer_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM py
RETURNING rn, customer_id, kind, period, triggers_epoch_ms(occurred_at), ctx_keys, ctx_vals,
          triggers_epoch_ms(offer_expires)
"""

_SCAN_FIRE = """
WITH ins AS (
    INSERT INTO fired_triggers (trigger_id, kind, customer_id, period, fired_at, occurred_at, cause_event_id,
                                context, offer)
    SELECT e.trigger_id, d.kind, d.customer_id, d.period, $1::timestamptz, d.occurred_at, NULL,
           jsonb_strip_nulls(jsonb_object(d.ctx_keys, d.ctx_vals)),
           CASE d.kind
               WHEN 'birthday_coupon' THEN jsonb_build_object(
                   'code', e.code, 'description', $2::text, 'amount', $3::bigint, 'min_spend', $4::bigint,
                   'currency', $8::text, 'expires_at', triggers_iso_utc(d.offer_expires))
               WHEN 'win_back' THEN jsonb_build_object(
                   'code', e.code, 'description', $5::text, 'amount', $6::bigint, 'min_spend', $7::bigint,
                   'currency', $8::text, 'expires_at', $9::text)
           END
    FROM scan_due d JOIN scan_enc e USING (rn)
    ON CONFLICT (trigger_id) DO NOTHING
    RETURNING trigger_id, kind, customer_id
), sent AS (
    INSERT INTO outbox (topic, key, value)
    SELECT $10::text, convert_to(ins.customer_id, 'UTF8'), e.value
    FROM scan_enc e JOIN ins USING (trigger_id)
    ORDER BY e.rn
)
SELECT kind, count(*) AS n FROM ins GROUP BY kind
"""

# What the Python rules' mark_fired + save_facts remember of fired triggers, for the scanned customers
# whose facts are as they were read (row version); the others' rows leave scan_due and are returned.
_SCAN_MARK = """
WITH m AS (
    SELECT customer_id, max(period::int) FILTER (WHERE kind = 'birthday_coupon') AS year,
           bool_or(kind = 'win_back') AS winback,
           max(period COLLATE "C") FILTER (WHERE kind = 'points_expiring') AS month,
           min(version::text)::xid AS version, min(at) AS at
    FROM scan_due WHERE kind IS NOT NULL GROUP BY customer_id
), u AS (
    UPDATE customer_facts f SET
        birthday_fired_for = CASE WHEN m.year IS NULL THEN f.birthday_fired_for
                                  ELSE greatest(coalesce(f.birthday_fired_for, 0), m.year) END,
        winback_fired_for = CASE WHEN m.winback THEN f.last_purchase_at ELSE f.winback_fired_for END,
        points_fired_for = CASE WHEN m.month IS NULL THEN f.points_fired_for
                                ELSE greatest(coalesce(f.points_fired_for, '') COLLATE "C", m.month COLLATE "C") END,
        updated_at = now()
    FROM m
    WHERE f.ctid = m.at AND f.customer_id = m.customer_id AND f.xmin = m.version
    RETURNING f.customer_id
), stale AS (
    DELETE FROM scan_due d
    WHERE d.kind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM u WHERE u.customer_id = d.customer_id)
    RETURNING d.customer_id
)
SELECT DISTINCT customer_id FROM stale
"""

_SCAN_MARK_CHILDREN = """
UPDATE carts k SET status = 'abandoned' FROM scan_due d
WHERE d.kind = 'abandoned_cart' AND k.customer_id = d.customer_id AND k.cart_id = d.period;
UPDATE category_facts c SET reminded_for = c.purchases[cardinality(c.purchases)] FROM scan_due d
WHERE d.kind = 'replenishment' AND c.customer_id = d.customer_id AND c.category = d.category
"""


async def sql_zones(conn: asyncpg.Connection) -> set[str]:
    """Zone names PostgreSQL reads as the same zoneinfo zone (not as a fixed-offset abbreviation)."""
    rows = await conn.fetch(
        "SELECT name FROM pg_timezone_names WHERE name IN ('UTC', 'GMT') "
        "OR name NOT IN (SELECT abbrev FROM pg_timezone_abbrevs)")
    return {r["name"] for r in rows}


async def scan_due_sql(conn: asyncpg.Connection, ids: Sequence[str], as_of: dt.datetime, cfg: RuleConfig,
                       zones: Sequence[str], default_zone: str) -> list[asyncpg.Record]:
    """Decide the candidates' due time-based triggers (wall clock, since = as_of), without locks.

    Rows: (rn, customer_id, kind, period, occurred_at_ms, ctx_keys, ctx_vals, offer_expires_ms); kind
    NULL names a customer the Python rules must judge. Call inside a transaction; the rows stay in
    the temporary table scan_due until it ends.
    """
    # Interval days are 24 hours, as in Python; no JIT: it compiles for seconds what runs in milliseconds.
    # A chunk is a known heavy batch statement: it may take longer than the services' query timeout.
    await conn.execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL jit = off; SET LOCAL statement_timeout = '10min'; "
                       "SET LOCAL work_mem = '64MB'")
    await conn.execute(_SCAN_TABLES)
    cycles = sorted(cfg.replenishment_cycles.items())
    months, days = birthday_window(as_of, as_of - cfg.lateness("birthday_coupon"), cfg.birthday_days_before)
    return await conn.fetch(
        _SCAN_DUE, list(ids), as_of, list(zones), default_zone, cfg.win_back_lapse, cfg.lateness("win_back"),
        cfg.cart_after, cfg.lateness("abandoned_cart"), cfg.birthday_days_before, cfg.birthday_valid_days,
        cfg.replenishment_days_before, cfg.replenishment_min_purchases, [k for k, _ in cycles],
        [v for _, v in cycles], cfg.lateness("replenishment"), cfg.points_days_before, cfg.points_min,
        exponent(cfg.currency), cfg.currency, months, days)


async def fire_scan_due(conn: asyncpg.Connection, encoded: Sequence[tuple[int, str, str | None, bytes]],
                        as_of: dt.datetime, cfg: RuleConfig, descriptions: Mapping[str, str],
                        winback_expires: dt.datetime, topic: str) -> tuple[dict[str, int], list[str]]:
    """Mark the scan_due triggers in the facts and record them (rn, trigger_id, offer code, Avro value).


    Triggers new by trigger_id go to the outbox in scan order. Customers whose facts a concurrent
    batch changed since scan_due_sql read them get nothing from here (their rows are dropped) and
    are returned for the Python rules to judge again, under row locks, in the same transaction.
    Returns (how many were new per kind, the customers to judge again).
    """
    stale = [r["customer_id"] for r in await conn.fetch(_SCAN_MARK)]
    await conn.execute(_SCAN_MARK_CHILDREN)
    if encoded:
        await conn.copy_records_to_table("scan_enc", records=encoded, columns=["rn", "trigger_id", "code", "value"])
    rows = await conn.fetch(
        _SCAN_FIRE, as_of, descriptions["birthday_coupon"], cfg.birthday_amount, cfg.birthday_min_spend,
        descriptions["win_back"], cfg.win_back_amount, cfg.win_back_min_spend, cfg.currency,
        winback_expires.isoformat(), topic)
    return {r["kind"]: r["n"] for r in rows}, stale
