"""The triggers service's SQL: set-based reads and writes of facts, events, stores and fired triggers."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot, Store
from services.triggers.money import exponent
from services.triggers.rules import RuleConfig, Trigger, replenishment_remind_at
from shared.db import json_rows
from shared.outbox import ROW_RECORDS

UTC = dt.UTC

# -- facts -------------------------------------------------------------------------------------

# The customer_facts columns save_facts writes, in _facts_row order (updated_at aside).
_FACTS_COLUMNS = (
    "customer_id", "birthday", "birthday_month", "birthday_day", "locale", "timezone", "home_store_id", "city",
    "country", "lat", "lon", "tags", "consents", "consented_channels", "preferred_channel", "profile_version",
    "profile_at", "last_event_at", "first_seen_at", "signed_up_at", "first_purchase_at", "last_purchase_at",
    "orders_count", "lifetime_spend", "tier", "tier_at", "winback_due_at", "winback_fired_for",
    "birthday_fired_for", "points_fired_for")
_N_FACTS = len(_FACTS_COLUMNS)

# One index probe per wanted id, in the order given (sorted: rows are locked in that order), for the
# reason _LOAD_CHILDREN gives: `customer_id = ANY($1)` read the whole table in the first (custom) plans
# of each pooled connection while the table had no statistics yet.
_LOAD_FACTS = f"""
SELECT x.* FROM unnest($1::text[]) WITH ORDINALITY AS w(id, n) CROSS JOIN LATERAL (
SELECT {", ".join("f." + c for c in _FACTS_COLUMNS)}, s.timezone AS hs_tz, s.lat AS hs_lat, s.lon AS hs_lon
FROM customer_facts f LEFT JOIN stores s ON s.store_id = f.home_store_id
WHERE f.customer_id = w.id {{lock}}OFFSET 0) x
ORDER BY w.n
"""
_LOAD_FACTS_LOCKED = _LOAD_FACTS.format(lock="FOR UPDATE OF f ")
_LOAD_FACTS = _LOAD_FACTS.format(lock="")

# Every cart (whatever its status: save_facts replaces them all), category and points lot of the
# customers, in one statement: t 0 cart, 1 category, 2 lot; lots in (expires_at, lot_id) order.
# Read by one index probe per customer and table (OFFSET 0 keeps the subquery a per-customer loop):
# with `customer_id = ANY($1)` a table without statistics yet (a young database) was read whole, and
# the cached generic plan compared every row with every id of the batch (~100 ms a batch at 20,000 rows).
_LOAD_CHILDREN = """
SELECT x.* FROM unnest($1::text[]) AS w(id) CROSS JOIN LATERAL (
SELECT 0 AS t, customer_id, cart_id AS k, last_activity_at AS a, due_at AS b, NULL::timestamptz AS c,
       items::bigint AS n, total AS m, category AS s1, sku AS s2, status AS s3, NULL::timestamptz[] AS p
FROM carts WHERE customer_id = w.id
UNION ALL
SELECT 1, customer_id, category, last_at, remind_at, reminded_for, quantity, NULL, NULL, NULL, NULL, purchases
FROM category_facts WHERE customer_id = w.id
UNION ALL
SELECT 2, customer_id, lot_id, expires_at, NULL, NULL, points, NULL, order_id, NULL, NULL, NULL
FROM point_lots WHERE customer_id = w.id
OFFSET 0) x
ORDER BY 1, 4, 3
"""


@dataclass(frozen=True, slots=True)
class StoredFacts:
    """The rows of one customer as load_facts read them (row None: no customer_facts row).

    Rows are what save_facts would write for them: `row` as _facts_row gives it; carts by cart_id
    (last_activity_at, due_at, items, total, category, sku, status); categories by name (purchases
    tuple, quantity, last_at, remind_at, reminded_for); lots by lot_id (points, expires_at, order_id).
    Never changed, also not by a save: saving the same facts again writes the same rows again
    (idempotent), and facts built rather than read (stored None) are written whole wherever saved.
    """

    row: tuple | None
    carts: Mapping[str, tuple]
    categories: Mapping[str, tuple]
    lots: Mapping[str, tuple]


# A customer load_facts looked for and did not find: no rows anywhere (delete_facts and save_facts
# keep a customer's child rows with its customer_facts row).
ABSENT = StoredFacts(None, {}, {}, {})


async def load_facts(conn: asyncpg.Connection, ids: Iterable[str], *,
                     lock: bool = True) -> dict[str, CustomerFacts]:
    """Facts of `ids` that exist, with their open carts, categories and points lots (rows locked).

    Each carries what was read (CustomerFacts.stored), so save_facts can write only what changed.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    sql = _LOAD_FACTS_LOCKED if lock else _LOAD_FACTS
    facts: dict[str, CustomerFacts] = {}
    rows: dict[str, tuple] = {}
    for r in await conn.fetch(sql, wanted):
        cid = r["customer_id"]
        rows[cid] = r[:_N_FACTS]
        facts[cid] = CustomerFacts(
            customer_id=cid, birthday=r["birthday"], locale=r["locale"],
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
    carts: dict[str, dict[str, tuple]] = {cid: {} for cid in facts}
    categories: dict[str, dict[str, tuple]] = {cid: {} for cid in facts}
    lots: dict[str, dict[str, tuple]] = {cid: {} for cid in facts}
    for t, cid, key, a, b, c, n, m, s1, s2, s3, p in await conn.fetch(_LOAD_CHILDREN, list(facts)):
        f = facts[cid]
        if t == 0:
            carts[cid][key] = (a, b, n, m, s1, s2, s3)
            if s3 == "open":  # the others are done with: the next save drops them
                f.carts[key] = Cart(key, a, n, m, s1, s2, s3)
        elif t == 1:
            categories[cid][key] = (tuple(p), n, a, b, c)
            f.categories[key] = CategoryHistory(key, list(p), n, c)
        else:
            lots[cid][key] = (n, a, s1)
            f.lots.append(PointLot(key, n, a, s1))
    for cid, f in facts.items():
        f.stored = StoredFacts(rows[cid], carts[cid], categories[cid], lots[cid])
    return facts


_UPSERT_FACTS = """
INSERT INTO customer_facts (customer_id, birthday, birthday_month, birthday_day, locale, timezone,
    home_store_id, city, country, lat, lon, tags, consents, consented_channels, preferred_channel,
    profile_version, profile_at, last_event_at, first_seen_at, signed_up_at, first_purchase_at, last_purchase_at, orders_count,
    lifetime_spend, tier, tier_at, winback_due_at, winback_fired_for, birthday_fired_for, points_fired_for,
    updated_at)
SELECT e->>0, e->>1, (e->>2)::smallint, (e->>3)::smallint, e->>4, e->>5, e->>6, e->>7, e->>8,
       (e->>9)::float8, (e->>10)::float8, (e->>11)::text[], e->12, (e->>13)::text[], e->>14,
       (e->>15)::bigint, (e->>16)::timestamptz, (e->>17)::timestamptz, (e->>18)::timestamptz,
       (e->>19)::timestamptz, (e->>20)::timestamptz, (e->>21)::timestamptz, (e->>22)::int, (e->>23)::bigint,
       e->>24, (e->>25)::timestamptz, (e->>26)::timestamptz, (e->>27)::timestamptz, (e->>28)::int, e->>29, now()
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
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
# A customer whose carts, categories or lots changed and whose own row did not gets a new row version
# all the same: that is how the SQL scan (fire_scan_due) recognises facts changed since it read them.
# An upsert, so that each row is found through the primary key whatever the plan: the UPDATE ... WHERE
# customer_id = ANY($1) it replaces was cached as a generic plan while the table was small and then read
# the whole table for every batch (7 ms of a 10 ms save at 5,000 customers, growing with them). The
# rows exist (load_facts read and locked them), so nothing is inserted.
_TOUCH_FACTS = """
INSERT INTO customer_facts (customer_id) SELECT unnest($1::text[])
ON CONFLICT (customer_id) DO UPDATE SET updated_at = now()
"""
# Rows that went, by key, and rows new or changed, per child table. One statement per part that has
# rows (a single statement of them all costs PostgreSQL more to plan than the parts to run).
_CHILDREN_GONE = {
    table: f"DELETE FROM {table} t USING (SELECT e->>0 AS c, e->>1 AS k FROM jsonb_array_elements($1::text::jsonb) "
           f"AS u(e)) d WHERE t.customer_id = d.c AND t.{key} = d.k"
    for table, key in (("carts", "cart_id"), ("category_facts", "category"), ("point_lots", "lot_id"))}
_CHILDREN_PUT = {
    "carts": """
INSERT INTO carts (customer_id, cart_id, last_activity_at, due_at, items, total, category, sku, status)
SELECT e->>0, e->>1, (e->>2)::timestamptz, (e->>3)::timestamptz, (e->>4)::int, (e->>5)::bigint, e->>6, e->>7,
       e->>8
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
ON CONFLICT (customer_id, cart_id) DO UPDATE SET last_activity_at = EXCLUDED.last_activity_at,
    due_at = EXCLUDED.due_at, items = EXCLUDED.items, total = EXCLUDED.total, category = EXCLUDED.category,
    sku = EXCLUDED.sku, status = EXCLUDED.status
""",
    "category_facts": """
INSERT INTO category_facts (customer_id, category, purchases, quantity, last_at, remind_at, reminded_for)
SELECT e->>0, e->>1, (e->>2)::timestamptz[], (e->>3)::bigint, (e->>4)::timestamptz, (e->>5)::timestamptz,
       (e->>6)::timestamptz
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
ON CONFLICT (customer_id, category) DO UPDATE SET purchases = EXCLUDED.purchases,
    quantity = EXCLUDED.quantity, last_at = EXCLUDED.last_at, remind_at = EXCLUDED.remind_at,
    reminded_for = EXCLUDED.reminded_for
""",
    "point_lots": """
INSERT INTO point_lots (customer_id, lot_id, points, expires_at, order_id)
SELECT e->>0, e->>1, (e->>2)::bigint, (e->>3)::timestamptz, e->>4
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
ON CONFLICT (customer_id, lot_id) DO UPDATE SET points = EXCLUDED.points, expires_at = EXCLUDED.expires_at,
    order_id = EXCLUDED.order_id
"""}
_WIPE_CHILDREN = """
WITH carts_gone AS (DELETE FROM carts WHERE customer_id = ANY($1::text[])),
     categories_gone AS (DELETE FROM category_facts WHERE customer_id = ANY($1::text[]))
DELETE FROM point_lots WHERE customer_id = ANY($1::text[])
"""
_CHILD_TABLES = ("carts", "category_facts", "point_lots")


def _text_array(values: Iterable[str | None]) -> str:
    """A text[] literal (every element quoted), for text[] values inside the JSON rows of a batch write."""
    parts = ["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
    return "{" + ",".join(parts) + "}" if parts else "{}"


def _timestamp_array(values: Iterable[dt.datetime]) -> str:
    """A timestamptz[] literal: ISO 8601 with the offset, an exact instant (naive ones taken as local
    time, as asyncpg takes them)."""
    return "{" + ",".join('"' + (v if v.tzinfo is not None else v.astimezone(UTC)).isoformat() + '"' for v in values) + "}"


def _facts_row(f: CustomerFacts, cfg: RuleConfig) -> tuple:
    md = f.birthday_month_day
    due = f.last_purchase_at + cfg.win_back_lapse if f.last_purchase_at and f.orders_count > 0 else None
    return (f.customer_id, f.birthday, md[0] if md else None, md[1] if md else None, f.locale,
            f.timezone, f.home_store_id, f.city, (f.country or "").upper() or None, f.lat, f.lon,
            list(f.tags), dict(f.consents), f.consented_channels, f.preferred_channel,
            f.profile_version, f.profile_at, f.last_event_at, f.first_seen_at, f.signed_up_at, f.first_purchase_at,
            f.last_purchase_at, f.orders_count, f.lifetime_spend, f.tier, f.tier_at, due,
            f.winback_fired_for, f.birthday_fired_for, f.points_fired_for)


def _child_rows(f: CustomerFacts, cfg: RuleConfig) -> tuple[dict[str, tuple], dict[str, tuple], dict[str, tuple]]:
    """The carts, categories and lots rows save_facts keeps of `f`, keyed as in StoredFacts."""
    after = cfg.cart_after
    carts = {c.cart_id: (c.last_activity_at, c.last_activity_at + after, c.items, c.total, c.category, c.sku,
                         c.status)
             for c in f.carts.values() if c.status in ("open", "abandoned")}
    categories = {h.category: (tuple(h.purchases), h.quantity, h.last_at, replenishment_remind_at(h, cfg),
                               h.reminded_for)
                  for h in f.categories.values()}
    lots = {lot.lot_id: (lot.points, lot.expires_at, lot.order_id) for lot in f.lots if lot.points > 0}
    return carts, categories, lots


def _diff(cid: str, new: Mapping[str, tuple], old: Mapping[str, tuple],
          put: list[tuple], gone: list[tuple[str, str]]) -> bool:
    """Rows of `new` that `old` lacks or holds otherwise go to `put`, keys only `old` has to `gone`."""
    if new == old:
        return False
    for key, row in new.items():
        if old.get(key) != row:
            put.append((cid, key, *row))
    for key in old:
        if key not in new:
            gone.append((cid, key))
    return True


@dataclass(slots=True)
class SavePlan:
    """What save_facts writes: only what differs from what the facts were read from."""

    rows: list[tuple] = field(default_factory=list)  # customer_facts rows to upsert
    touch: list[str] = field(default_factory=list)  # customers whose only changes are child rows
    wipe: list[str] = field(default_factory=list)  # customers read from nowhere: all child rows replaced
    put: dict[str, list[tuple]] = field(  # per child table: (customer_id, key, *row) to upsert
        default_factory=lambda: {table: [] for table in _CHILD_TABLES})
    gone: dict[str, list[tuple[str, str]]] = field(  # per child table: (customer_id, key) to delete
        default_factory=lambda: {table: [] for table in _CHILD_TABLES})


def plan_save(facts: Sequence[CustomerFacts], cfg: RuleConfig) -> SavePlan:
    """The writes that bring the database from each customer's `stored` rows to its facts (pure)."""
    plan = SavePlan()
    put, gone = plan.put, plan.gone
    for f in facts:
        cid = f.customer_id
        row = _facts_row(f, cfg)
        carts, categories, lots = _child_rows(f, cfg)
        old = f.stored
        if old is None:
            plan.wipe.append(cid)
            old = ABSENT
        children = _diff(cid, carts, old.carts, put["carts"], gone["carts"])
        children = _diff(cid, categories, old.categories, put["category_facts"], gone["category_facts"]) or children
        children = _diff(cid, lots, old.lots, put["point_lots"], gone["point_lots"]) or children
        if row != old.row:
            plan.rows.append(row)
        elif children:
            plan.touch.append(cid)
    return plan


async def save_facts(conn: asyncpg.Connection, facts: Sequence[CustomerFacts], cfg: RuleConfig) -> None:
    """Write what changed of `facts` since load_facts read them; all of those it did not read.

    The customer_facts row of a customer any of whose rows changed gets a new version (see
    _TOUCH_FACTS); a customer nothing of which changed is not written at all.
    """
    if not facts:
        return
    plan = plan_save(facts, cfg)
    if plan.wipe:  # customers read from nowhere: whatever child rows they have go first
        await conn.execute(_WIPE_CHILDREN, plan.wipe)
    parts: list[tuple[str, list]] = []  # the writes, one statement (see _together)
    if plan.rows:
        parts.append((_UPSERT_FACTS, [json_rows(
            [(*r[:11], _text_array(r[11]), r[12] or {}, _text_array(r[13]), *r[14:]) for r in plan.rows])]))
    if plan.touch:
        parts.append((_TOUCH_FACTS, [plan.touch]))
    for table in _CHILD_TABLES:
        if plan.gone[table]:
            parts.append((_CHILDREN_GONE[table], [json_rows(plan.gone[table])]))
        if rows := plan.put[table]:
            if table == "category_facts":
                rows = [(c, k, _timestamp_array(p), *rest) for c, k, p, *rest in rows]
            parts.append((_CHILDREN_PUT[table], [json_rows(rows)]))
    if parts:
        await conn.execute(_together(tuple(sql for sql, _ in parts)), *(a for _, args in parts for a in args))


_TOGETHER: dict[tuple[str, ...], str] = {}


def _together(statements: tuple[str, ...]) -> str:
    """The statements as one (data-modifying WITH queries, parameters numbered on), for one round trip:
    a batch's save was up to eight statements of ~0.1 ms fixed cost each in the client and as much in
    the server. They write different tables, or different rows of one (save_facts' parts), so the one
    snapshot they share changes nothing."""
    if len(statements) == 1:
        return statements[0]
    sql = _TOGETHER.get(statements)
    if sql is None:
        parts, offset = [], 0
        for i, part in enumerate(statements):
            parts.append(f"w{i} AS ({_PARAM.sub(lambda m, o=offset: f'${int(m.group(1)) + o}', part)})")
            offset += max(int(n) for n in _PARAM.findall(part))
        sql = _TOGETHER[statements] = "WITH " + ",\n".join(parts) + "\nSELECT"
    return sql


_PARAM = re.compile(r"\$(\d+)")


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


# insert_events and, in the same statement, survivors_of for the events' owners.
_INSERT_EVENTS_AND_ALIASES = """
WITH RECURSIVE ins AS (
    INSERT INTO customer_events (source, event_id, owner, occurred_at, raw)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[])
    ON CONFLICT (source, event_id) DO NOTHING RETURNING source, event_id
), up(start, id, depth) AS (
    SELECT merged, survivor, 1 FROM merged_into WHERE merged = ANY($6::text[])
    UNION ALL SELECT up.start, m.survivor, up.depth + 1 FROM up JOIN merged_into m ON m.merged = up.id
    WHERE up.depth < 32
)
SELECT true AS new, source AS a, event_id AS b FROM ins
UNION ALL
SELECT * FROM (SELECT DISTINCT ON (start) false, start, id FROM up ORDER BY start, depth DESC) s
"""


async def insert_events_and_aliases(
        conn: asyncpg.Connection, rows: Sequence[tuple[str, str, str, dt.datetime, bytes]],
) -> tuple[set[tuple[str, str]], dict[str, str]]:
    """insert_events(rows), and survivors_of the rows' owners, in one round trip."""
    if not rows:
        return set(), {}
    got = await conn.fetch(
        _INSERT_EVENTS_AND_ALIASES, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        [r[3] for r in rows], [r[4] for r in rows], sorted({r[2] for r in rows}))
    return ({(a, b) for new, a, b in got if new}, {a: b for new, a, b in got if not new})


async def group_of(conn: asyncpg.Connection, head: str) -> list[str]:
    """`head` and every customer merged into it, directly or through others."""
    rows = await conn.fetch(
        "WITH RECURSIVE g(id) AS (SELECT $1::text COLLATE \"C\" UNION "
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


_RECORD_FIRED = """
INSERT INTO fired_triggers (trigger_id, kind, customer_id, period, fired_at, occurred_at, cause_event_id,
                            context, offer)
SELECT u.id, u.kind, u.cid, u.period, u.fired_at, u.occurred_at, u.cause, u.context::jsonb, u.offer::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[],
            $8::text[], $9::text[]) AS u(id, kind, cid, period, fired_at, occurred_at, cause, context, offer)
ON CONFLICT (trigger_id) DO NOTHING RETURNING trigger_id
"""
# The same, and the new ones' values into the outbox (in the order given), in one statement.
_RECORD_AND_SEND = f"""
WITH ins AS ({_RECORD_FIRED}), sent AS (
    INSERT INTO outbox_batches (topic, n, keys, vals)
    SELECT $10::text, count(*), array_agg(convert_to(u.cid, 'UTF8') ORDER BY u.n), array_agg(u.value ORDER BY u.n)
    FROM unnest($1::uuid[], $3::text[], $11::bytea[]) WITH ORDINALITY AS u(trigger_id, cid, value, n)
    JOIN ins USING (trigger_id)
    GROUP BY (u.n - 1) / {ROW_RECORDS} ORDER BY (u.n - 1) / {ROW_RECORDS}
)
SELECT trigger_id FROM ins
"""


async def record_fired(conn: asyncpg.Connection, triggers: Sequence[Trigger], *, topic: str | None = None,
                       encode: Callable[[Trigger], bytes] | None = None) -> list[Trigger]:
    """Insert triggers; returns those fired for the first time (the trigger_id key makes it once).

    With `topic` (and `encode`), the first-time ones also go to the outbox for `topic`, keyed by
    customer, in the same statement.
    """
    if not triggers:
        return []
    unique: dict[str, Trigger] = {}
    for t in triggers:
        unique.setdefault(t.trigger_id, t)
    ts = list(unique.values())
    dumps = orjson.dumps
    args = [[t.trigger_id for t in ts], [t.kind for t in ts], [t.customer_id for t in ts],
            [t.period for t in ts], [t.fired_at for t in ts], [t.occurred_at for t in ts],
            [t.cause_event_id for t in ts], [dumps(dict(t.context)).decode() for t in ts],
            [None if (o := _offer_json(t)) is None else dumps(o).decode() for t in ts]]
    if topic is None:
        rows = await conn.fetch(_RECORD_FIRED, *args)
    else:
        assert encode is not None, "an encoder for the outbox values"
        rows = await conn.fetch(_RECORD_AND_SEND, *args, topic, [encode(t) for t in ts])
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


# A trigger due exactly its lateness ago still fires (rules._is_due): the lower bounds are inclusive.
# Two statements, so that with a second connection they run at once (the first half of a scan, every
# chunk waits for them): the candidates in customer_facts itself, and those through its children.
# The birthdays of the window's days are read through their index (OFFSET 0 keeps the planner from
# scanning every customer for them); points expiring are grouped per customer before their facts are read.
# Each returns one array, deduplicated and sorted bytewise in one sort (code point order, as Python
# sorts): cheaper to send and read than a row each.
_FACTS_CANDIDATES = """
SELECT coalesce(array_agg(DISTINCT c.customer_id COLLATE "C" ORDER BY c.customer_id COLLATE "C"), '{}') FROM (
SELECT customer_id
FROM (SELECT DISTINCT m, d FROM unnest($1::smallint[], $2::smallint[]) AS w(m, d)) w
CROSS JOIN LATERAL (SELECT customer_id, birthday_month, birthday_fired_for FROM customer_facts
                    WHERE birthday_month = w.m AND birthday_day = w.d OFFSET 0) f
WHERE (birthday_fired_for IS NULL
       OR birthday_fired_for < $3 + CASE WHEN birthday_month = 1 AND $4 THEN 1 ELSE 0 END)
UNION ALL
SELECT customer_id FROM customer_facts
WHERE winback_due_at <= $5 AND winback_due_at >= $6
  AND winback_fired_for IS DISTINCT FROM last_purchase_at
) c
"""
_CHILD_CANDIDATES = """
SELECT coalesce(array_agg(DISTINCT c.customer_id COLLATE "C" ORDER BY c.customer_id COLLATE "C"), '{}') FROM (
SELECT customer_id FROM carts WHERE status = 'open' AND due_at <= $1 AND due_at >= $2
UNION ALL
SELECT customer_id FROM category_facts
WHERE remind_at <= $1 AND remind_at >= $3 AND reminded_for IS DISTINCT FROM last_at
UNION ALL
SELECT l.customer_id
FROM (SELECT customer_id, max(expires_at) AS last FROM point_lots
      WHERE expires_at > $5 AND expires_at <= $4 GROUP BY customer_id) l
JOIN customer_facts f USING (customer_id)
WHERE f.points_fired_for IS NULL OR f.points_fired_for < to_char(l.last + interval '14 hours', 'YYYY-MM')
) c
"""


def _lower(kind: str, as_of: dt.datetime, cfg: RuleConfig, since: dt.datetime | None) -> dt.datetime:
    """The earliest time a `kind` trigger due by `as_of` may have fallen due and still fire."""
    bound = as_of - cfg.lateness(kind)
    return min(bound, since) if since is not None else bound


async def _fetch_ids(c: asyncpg.Connection, sql: str, *args: Any) -> list[str]:
    async with c.transaction():
        # No JIT (it spent a quarter of a second compiling this); memory to deduplicate in one pass.
        await c.execute("SET LOCAL jit = off; SET LOCAL work_mem = '64MB'")
        return await c.fetchval(sql, *args)


async def scan_candidates(conn: asyncpg.Connection, as_of: dt.datetime, cfg: RuleConfig,
                          since: dt.datetime | None = None, other: asyncpg.Connection | None = None) -> list[str]:
    """Customers for whom a time-based trigger may be due at `as_of` (the rules decide), sorted.

    With `other`, a second connection, the two halves of the query run at once. (No closures here:
    see tests/support/cycles.py.)"""
    # Wall clock (no `since`), a birthday fires only while its window is open at `as_of`: the birthdays
    # whose windows closed within the lateness are no candidates (without this, every scan re-read them).
    birthdays_from = _lower("birthday_coupon", as_of, cfg, since) if since is not None else as_of
    months, days = birthday_window(as_of, birthdays_from, cfg.birthday_days_before)
    year = as_of.astimezone(UTC).year
    december = as_of.astimezone(UTC).month == 12
    on_facts = (_FACTS_CANDIDATES, months, days, year, december, as_of, _lower("win_back", as_of, cfg, since))
    on_children = (_CHILD_CANDIDATES, as_of, _lower("abandoned_cart", as_of, cfg, since),
                   _lower("replenishment", as_of, cfg, since),
                   as_of + dt.timedelta(days=cfg.points_days_before), min(as_of, since) if since is not None else as_of)
    if other is None:
        halves = [await _fetch_ids(conn, *on_facts), await _fetch_ids(conn, *on_children)]
    else:
        halves = await asyncio.gather(_fetch_ids(conn, *on_facts), _fetch_ids(other, *on_children))
    return _merged(*halves)


def _merged(a: list[str], b: list[str]) -> list[str]:
    """The union of two sorted lists without repeats, sorted."""
    if not a or not b:
        return a or b
    return list(dict.fromkeys(sorted(a + b)))  # two sorted runs: one merge pass


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
# The wall-clock scan decides, describes and marks due triggers here, in one statement per chunk of
# candidates (Python then encodes them; a second statement records them), with the rules of rules.py (birthday_coupon, win_back, abandoned_cart, replenishment,
# points_expiring) at since = as_of. Context values are the strings make_trigger would keep, in its
# key order (NULL values are dropped). Customers it cannot judge exactly (a time zone PostgreSQL
# reads differently from zoneinfo; a replenishment cycle from the customer's own purchase median)
# come back as kind NULL for the Python rules to judge.

_SCAN_TABLES = """
DROP TABLE IF EXISTS pg_temp.scan_due, pg_temp.scan_enc;
CREATE TEMP TABLE scan_due (
    rn bigint, customer_id text, kind text, period text, occurred_at timestamptz, ctx_vals text[],
    offer_expires timestamptz, category text) ON COMMIT DROP;
CREATE TEMP TABLE scan_enc (rn bigint, trigger_id uuid, code text, key bytea, value bytea) ON COMMIT DROP
"""

# Decides the chunk's due triggers and, in the same statement, marks them in the facts (what the Python
# rules' mark_fired + save_facts remember) of the customers whose facts are still as read: a concurrent
# batch that changed them meanwhile makes the update skip the row (its version moved on), and those
# customers come back with kind NULL, as do the ones the SQL cannot judge, for the Python rules.
_SCAN_DUE = """
WITH f AS MATERIALIZED (
    SELECT f.customer_id, f.xmin AS version, f.ctid AS at, f.birthday_month AS bm, f.birthday_day AS bd, f.birthday_fired_for,
           f.last_purchase_at, f.orders_count, f.winback_fired_for, f.points_fired_for, z.tz,
           ($2::timestamptz AT TIME ZONE coalesce(z.tz, 'UTC'))::date AS today
    FROM customer_facts f LEFT JOIN stores s ON s.store_id = f.home_store_id
    CROSS JOIN LATERAL (SELECT coalesce(nullif(f.timezone, ''), nullif(s.timezone, '')) AS n) nn
    CROSS JOIN LATERAL (SELECT CASE WHEN nn.n IS NULL THEN $4::text WHEN nn.n = ANY($3::text[]) THEN nn.n END AS tz) z
    WHERE f.customer_id = ANY($1::text[])  -- a hashed array or index scan in key order, not probes
),
-- The chunk's bounds: candidates come sorted, so when they are dense ($22) a chunk's children are one
-- index range of each table rather than the whole table (min and max in the column's own collation:
-- exact whatever the order); sparse ones (a scan after most fired) are looked up one by one instead.
-- ($22 is a constant in the statement's custom plan: the CASE folds to one indexable condition.)
lo AS MATERIALIZED (SELECT min(u) AS lo, max(u) AS hi FROM unnest($1::text[]) AS u),
cat AS MATERIALIZED (
    SELECT c.customer_id, c.category, c.quantity, cardinality(c.purchases) AS n, c.remind_at,
           c.reminded_for, c.purchases[cardinality(c.purchases)] AS last, f.tz, f.today, f.at, f.version,
           (SELECT u.d FROM unnest($13::text[], $14::int[]) AS u(name, d) WHERE u.name = c.category) AS cfg_days
    FROM category_facts c JOIN f USING (customer_id)
    WHERE CASE WHEN $22 THEN c.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo)
               ELSE c.customer_id = ANY($1::text[]) END
),
top AS MATERIALIZED (  -- CustomerFacts.most_bought_category (ids grouped bytewise: cheaper, same groups)
    SELECT DISTINCT ON (c.customer_id COLLATE "C") c.customer_id, c.category
    FROM cat c ORDER BY c.customer_id COLLATE "C", c.quantity DESC, c.n DESC, c.category COLLATE "C"
),
lots AS MATERIALIZED (
    SELECT l.customer_id, l.points, l.expires_at FROM point_lots l
    WHERE CASE WHEN $22 THEN l.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo)
               ELSE l.customer_id = ANY($1::text[]) END
),
rules AS (
    -- birthday_coupon: [local midnight days_before the birthday, local midnight after it)
    SELECT f.customer_id, 0 AS rank, y.year::text COLLATE "C" AS sub, y.year::text AS period,
           m.due AS occurred_at,
           ARRAY[to_char(b.bday, 'YYYY-MM-DD'), (b.bday - f.today)::text, f.tz] AS ctx_vals,
           triggers_local_midnight(b.bday - $9::int + $10::int, f.tz) AS offer_expires,
           NULL::text AS category, f.at, f.version  -- the facts row version read, for the marks
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
           ARRAY[floor(extract(epoch FROM $2 - f.last_purchase_at) / 86400)::bigint::text,
                 to_char((f.last_purchase_at AT TIME ZONE f.tz)::date, 'YYYY-MM-DD'),
                 t.category, f.orders_count::text],
           NULL::timestamptz, NULL, f.at, f.version
    FROM f LEFT JOIN top t USING (customer_id)
    WHERE f.tz IS NOT NULL AND f.orders_count >= 1 AND f.last_purchase_at IS NOT NULL
      AND f.winback_fired_for IS DISTINCT FROM f.last_purchase_at
      AND f.last_purchase_at + $5::interval <= $2 AND f.last_purchase_at + $5::interval + $6::interval >= $2
    UNION ALL
    -- abandoned_cart: once per open cart, after_minutes after its last activity
    SELECT f.customer_id, 2, k.cart_id COLLATE "C", k.cart_id, k.last_activity_at + $7::interval,
           ARRAY[k.cart_id, k.items::text,
                 round(k.total::numeric / (10::numeric ^ $18::int), $18::int)::text, $19::text,
                 k.category, k.sku, floor(extract(epoch FROM $2 - k.last_activity_at) / 60)::bigint::text],
           NULL, NULL, f.at, f.version
    FROM carts k JOIN f USING (customer_id)
    WHERE CASE WHEN $22 THEN k.customer_id BETWEEN (SELECT lo FROM lo) AND (SELECT hi FROM lo)
               ELSE k.customer_id = ANY($1::text[]) END
      AND f.tz IS NOT NULL AND k.status = 'open'
      AND k.last_activity_at + $7::interval <= $2 AND k.last_activity_at + $7::interval + $8::interval >= $2
    UNION ALL
    -- replenishment with the category's configured cycle (fewer purchases than min_purchases)
    SELECT c.customer_id, 3, c.category COLLATE "C", c.category || ':' || triggers_iso_utc(c.last),
           c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day',
           ARRAY[c.category, c.cfg_days::text,
                 to_char(((c.last + c.cfg_days * interval '1 day') AT TIME ZONE c.tz)::date, 'YYYY-MM-DD'),
                 to_char((c.last AT TIME ZONE c.tz)::date, 'YYYY-MM-DD'),
                 floor(extract(epoch FROM $2 - c.last) / 86400)::bigint::text],
           NULL, c.category, c.at, c.version
    FROM cat c
    WHERE c.tz IS NOT NULL AND c.n > 0 AND c.n < $12::int AND c.cfg_days <> 0
      AND c.reminded_for IS DISTINCT FROM c.last
      AND c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day' <= $2
      AND c.last + c.cfg_days * interval '1 day' - $11::int * interval '1 day' + $15::interval >= $2
    UNION ALL
    -- points_expiring: per local month of expiry, days_before the first lot of it expires
    SELECT p.customer_id, 4, p.month COLLATE "C", p.month, p.first - $16::int * interval '1 day',
           ARRAY[p.points::text, triggers_iso_utc(p.first), to_char((p.first AT TIME ZONE p.tz)::date, 'YYYY-MM-DD'),
                 b.balance::text],
           NULL, NULL, p.at, p.version
    FROM (SELECT l.customer_id, f.tz, f.points_fired_for, f.at, f.version,
                 to_char(l.expires_at AT TIME ZONE f.tz, 'YYYY-MM') AS month, sum(l.points) AS points,
                 min(l.expires_at) AS first
          FROM lots l JOIN f USING (customer_id)
          WHERE f.tz IS NOT NULL AND l.points > 0 AND l.expires_at > $2
            -- a lot expiring later is in no month whose first lot is due (a month is under 32 days)
            AND l.expires_at <= $2 + ($16::int + 32) * interval '1 day'
          GROUP BY l.customer_id, f.tz, f.points_fired_for, f.at, f.version, 6) p
    JOIN (SELECT customer_id, sum(points) AS balance FROM lots GROUP BY customer_id) b  -- CustomerFacts.points_open
        USING (customer_id)
    WHERE (p.points_fired_for IS NULL OR p.points_fired_for COLLATE "C" < p.month COLLATE "C")
      AND p.points >= $17::int AND p.first - $16::int * interval '1 day' <= $2
),
py AS MATERIALIZED (
    SELECT f.customer_id FROM f WHERE f.tz IS NULL
    UNION
    SELECT c.customer_id FROM cat c WHERE c.n >= $12::int AND c.reminded_for IS DISTINCT FROM c.last
      AND c.remind_at <= $2 AND c.remind_at + $15::interval >= $2
),
due AS MATERIALIZED (  -- what fires, of the customers the SQL judges
    SELECT r.* FROM rules r WHERE NOT EXISTS (SELECT 1 FROM py WHERE py.customer_id = r.customer_id)
),
m AS MATERIALIZED (  -- per customer: what rules.mark_fired remembers, and the facts row version read
    SELECT d.customer_id, d.at, d.version, max(d.period::int) FILTER (WHERE d.rank = 0) AS year,
           bool_or(d.rank = 1) AS winback, max(d.period COLLATE "C") FILTER (WHERE d.rank = 4) AS month
    FROM due d GROUP BY d.customer_id, d.at, d.version
),
marked AS (  -- only where the facts row is still the version read: one fetch by its ctid each (the row
             -- version, ctid and xmin, names the customer: no key lookup)
    UPDATE customer_facts c SET
        birthday_fired_for = CASE WHEN m.year IS NULL THEN c.birthday_fired_for
                                  ELSE greatest(coalesce(c.birthday_fired_for, 0), m.year) END,
        winback_fired_for = CASE WHEN m.winback THEN c.last_purchase_at ELSE c.winback_fired_for END,
        points_fired_for = CASE WHEN m.month IS NULL THEN c.points_fired_for
                                ELSE greatest(coalesce(c.points_fired_for, '') COLLATE "C", m.month COLLATE "C") END,
        updated_at = now()
    FROM m
    WHERE c.ctid = m.at AND c.xmin = m.version
    RETURNING c.customer_id
),
kept AS (  -- in scan order (per customer: kind, then period); the changed customers' rows are not encoded
    INSERT INTO scan_due
    SELECT row_number() OVER (ORDER BY d.customer_id COLLATE "C", d.rank, d.sub), d.customer_id,
           (ARRAY['birthday_coupon', 'win_back', 'abandoned_cart', 'replenishment', 'points_expiring'])[d.rank + 1],
           d.period, d.occurred_at, d.ctx_vals, d.offer_expires, d.category
    FROM due d
    RETURNING rn, customer_id, kind, period, triggers_epoch_ms(occurred_at) AS occurred_ms, ctx_vals,
              triggers_epoch_ms(offer_expires) AS expires_ms
)
SELECT * FROM kept
UNION ALL
SELECT NULL, customer_id, NULL, NULL, NULL, NULL, NULL FROM py
UNION ALL  -- changed since read, judged again (grouped rather than joined: no plan can turn it quadratic);
           -- looked for only when fewer rows were marked than m holds (one per customer): when every mark
           -- took, as without a concurrent batch, the grouping does not run at all
SELECT NULL, customer_id, NULL, NULL, NULL, NULL, NULL
FROM (SELECT customer_id, false AS ok FROM m UNION ALL SELECT customer_id, true FROM marked) x
WHERE (SELECT count(*) FROM marked) < (SELECT count(*) FROM m)
GROUP BY customer_id HAVING NOT bool_or(ok)
"""

# Records the triggers Python encoded (scan_enc: rn, trigger_id, offer code, key, Avro value) and marks
# their carts and categories (scan_due holds no rows of the customers judged again by then); those new
# by trigger_id go to the outbox in scan order.
_SCAN_FIRE = f"""
WITH new AS MATERIALIZED (  -- not recorded before (a re-derivation after an unmerge may re-arm a trigger)
    SELECT d.rn, d.kind, d.customer_id, d.period, d.occurred_at, d.ctx_vals, d.offer_expires,
           e.trigger_id, e.code, e.key, e.value
    FROM scan_due d JOIN scan_enc e USING (rn)
    -- one probe of the key per trigger (OFFSET 0 keeps the planner from reading all of fired_triggers,
    -- which only grows, to hash it)
    WHERE NOT EXISTS (SELECT 1 FROM fired_triggers t WHERE t.trigger_id = e.trigger_id OFFSET 0)
), ins AS (  -- no ON CONFLICT: nothing else fires these customers' triggers while their facts rows are
             -- locked; should it happen, the unique violation rolls the chunk back for the Python rules
    INSERT INTO fired_triggers (trigger_id, kind, customer_id, period, fired_at, occurred_at, cause_event_id,
                                context, offer)
    SELECT n.trigger_id, n.kind, n.customer_id, n.period, $1::timestamptz, n.occurred_at, NULL,
           -- SCAN_CONTEXT_KEYS of the kind: one array each, not one per row of scan_due
           jsonb_strip_nulls(jsonb_object(CASE n.kind WHEN 'birthday_coupon' THEN $8::text[]
                                                      WHEN 'win_back' THEN $9::text[]
                                                      WHEN 'abandoned_cart' THEN $10::text[]
                                                      WHEN 'replenishment' THEN $11::text[]
                                                      ELSE $12::text[] END, n.ctx_vals)),
           CASE n.kind
               WHEN 'birthday_coupon' THEN jsonb_build_object(
                   'code', n.code, 'description', $2::text, 'amount', $3::bigint, 'min_spend', $4::bigint,
                   'currency', $5::text, 'expires_at', triggers_iso_utc(n.offer_expires))
               -- all but the code the same in every win-back offer of a scan: the rest comes as JSON text
               WHEN 'win_back' THEN ($6::text || ', "code": ' || to_json(n.code)::text || '}}')::jsonb
           END
    FROM new n
), sent AS (
    INSERT INTO outbox_batches (topic, n, keys, vals)  -- rows of ROW_RECORDS records, in order
    SELECT $7::text, count(*), array_agg(n.key ORDER BY n.rn), array_agg(n.value ORDER BY n.rn)
    FROM new n GROUP BY (n.rn - 1) / {ROW_RECORDS} ORDER BY (n.rn - 1) / {ROW_RECORDS}
), carts_marked AS (
    UPDATE carts k SET status = 'abandoned' FROM scan_due d
    WHERE d.kind = 'abandoned_cart' AND k.customer_id = d.customer_id AND k.cart_id = d.period
), categories_marked AS (
    UPDATE category_facts c SET reminded_for = c.purchases[cardinality(c.purchases)] FROM scan_due d
    WHERE d.kind = 'replenishment' AND c.customer_id = d.customer_id AND c.category = d.category
)
SELECT kind, count(*) AS n FROM new GROUP BY kind
"""


# The context keys of each kind's triggers, in make_trigger's order (rules.py); the scan returns only
# the values (NULL where make_trigger drops the key).
SCAN_CONTEXT_KEYS: dict[str, tuple[str, ...]] = {
    "birthday_coupon": ("birthday", "days_until", "timezone"),
    "win_back": ("days_since_last_purchase", "last_purchase_date", "category", "orders_count"),
    "abandoned_cart": ("cart_id", "items", "cart_total", "currency", "category", "sku", "minutes_since_activity"),
    "replenishment": ("category", "cycle_days", "due_date", "last_purchase_date", "days_since_last_purchase"),
    "points_expiring": ("points", "expires_at", "expires_date", "points_balance"),
}


# SCAN_CONTEXT_KEYS as _SCAN_FIRE takes them ($8 to $12).
_SCAN_KEYS = tuple(list(SCAN_CONTEXT_KEYS[k]) for k in ("birthday_coupon", "win_back", "abandoned_cart",
                                                        "replenishment", "points_expiring"))


async def sql_zones(conn: asyncpg.Connection) -> set[str]:
    """Zone names PostgreSQL reads as the same zoneinfo zone (not as a fixed-offset abbreviation)."""
    rows = await conn.fetch(
        "SELECT name FROM pg_timezone_names WHERE name IN ('UTC', 'GMT') "
        "OR name NOT IN (SELECT abbrev FROM pg_timezone_abbrevs)")
    return {r["name"] for r in rows}


async def scan_due_sql(conn: asyncpg.Connection, ids: Sequence[str], as_of: dt.datetime, cfg: RuleConfig,
                       zones: Sequence[str], default_zone: str, *, dense: bool = True) -> list[asyncpg.Record]:
    """Decide the candidates' due time-based triggers (wall clock, since = as_of) and mark them in the facts.

    Rows: (rn, customer_id, kind, period, occurred_at_ms, ctx_vals, offer_expires_ms), the values of
    SCAN_CONTEXT_KEYS[kind]; kind
    NULL names a customer the Python rules must judge (one the SQL cannot judge exactly, or whose facts
    a concurrent batch changed since this statement read them). Call inside a transaction; the rows
    stay in the temporary table scan_due for fire_scan_due until it ends. `dense`: the ids are a large
    share of the customers (their carts, categories and lots are read by key range rather than by key).
    """
    # Interval days are 24 hours, as in Python; no JIT: it compiles for seconds what runs in milliseconds.
    # A chunk is a known heavy batch statement: it may take longer than the services' query timeout.
    # Custom plans only: from its sixth run on a connection PostgreSQL may switch the prepared statement
    # to a generic plan, blind to the chunk's array and instant, which took 16 s for a 1 s chunk.
    await conn.execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL jit = off; SET LOCAL statement_timeout = '10min'; "
                       "SET LOCAL work_mem = '64MB'; SET LOCAL plan_cache_mode = force_custom_plan")
    await conn.execute(_SCAN_TABLES)
    cycles = sorted(cfg.replenishment_cycles.items())
    months, days = birthday_window(as_of, as_of, cfg.birthday_days_before)  # windows open at as_of
    return await conn.fetch(
        _SCAN_DUE, list(ids), as_of, list(zones), default_zone, cfg.win_back_lapse, cfg.lateness("win_back"),
        cfg.cart_after, cfg.lateness("abandoned_cart"), cfg.birthday_days_before, cfg.birthday_valid_days,
        cfg.replenishment_days_before, cfg.replenishment_min_purchases, [k for k, _ in cycles],
        [v for _, v in cycles], cfg.lateness("replenishment"), cfg.points_days_before, cfg.points_min,
        exponent(cfg.currency), cfg.currency, months, days, dense)


async def customers_estimate(conn: asyncpg.Connection) -> float:
    """How many customers' facts there are, as the planner's statistics say (no count)."""
    return await conn.fetchval(
        "SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = 'customer_facts'::regclass") or 0.0


async def fire_scan_due(conn: asyncpg.Connection, encoded: Sequence[tuple[int, str, str | None, bytes, bytes]],
                        as_of: dt.datetime, cfg: RuleConfig, descriptions: Mapping[str, str],
                        winback_expires: dt.datetime, topic: str, judged_again: Sequence[str] = ()) -> dict[str, int]:
    """Record the scan_due triggers, encoded as (rn, trigger_id, offer code, outbox key, Avro value).

    `judged_again`: the customers scan_due_sql returned for the Python rules, whose rows leave scan_due.
    Triggers new by trigger_id go to the outbox in scan order. Returns how many were new per kind.
    """
    if judged_again:
        await conn.execute("DELETE FROM scan_due WHERE customer_id = ANY($1::text[])", list(judged_again))
    if not encoded:
        return {}
    await conn.copy_records_to_table("scan_enc", records=encoded, columns=["rn", "trigger_id", "code", "key", "value"])
    winback_offer = orjson.dumps({  # _offer_json's but the code, as an unclosed JSON object
        "description": descriptions["win_back"], "amount": cfg.win_back_amount, "min_spend": cfg.win_back_min_spend,
        "currency": cfg.currency, "expires_at": winback_expires.isoformat()}).decode()[:-1]
    rows = await conn.fetch(
        _SCAN_FIRE, as_of, descriptions["birthday_coupon"], cfg.birthday_amount, cfg.birthday_min_spend,
        cfg.currency, winback_offer, topic, *_SCAN_KEYS)
    return {r["kind"]: r["n"] for r in rows}
