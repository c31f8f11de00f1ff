"""The loyalty tables in PostgreSQL: set-based loads and writes, one round trip per table per batch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import asyncpg
import orjson

from services.loyalty.book import Book
from services.loyalty.ledger import Account, Lot, Order
from shared.avro import AvroCodec
from shared.outbox import OutboxMessage, add_to_outbox
from shared.topics import LOYALTY, LOYALTY_EVENTS

_MARK = """
INSERT INTO processed (key) SELECT unnest($1::text[])
ON CONFLICT DO NOTHING RETURNING key
"""
_ALIASES = """
WITH RECURSIVE r(merged, survivor, depth) AS (
    SELECT a.merged, a.survivor, 1 FROM aliases a WHERE a.merged = ANY($1::text[])
    UNION ALL
    SELECT a.merged, a.survivor, r.depth + 1 FROM aliases a JOIN r ON a.merged = r.survivor
    WHERE r.depth < 32
)
SELECT DISTINCT merged, survivor FROM r
"""
_ORDER_COLUMNS = ("order_key, order_id, owner, sale_event_id, sale_at, currency, total, refunded, "
                  "gross_spend, spend, earned, reversed")
_ENSURE_ACCOUNTS = """
INSERT INTO accounts (customer_id) SELECT id FROM unnest($1::text[]) AS u(id) ORDER BY id
ON CONFLICT DO NOTHING
"""
_LOCK_ACCOUNTS = """
SELECT customer_id, balance, tier, trailing_spend, evaluated_at, review_at, merged_into,
       erased_at IS NOT NULL AS erased
FROM accounts WHERE customer_id = ANY($1::text[]) ORDER BY customer_id FOR UPDATE
"""
_OPEN_LOTS = """
SELECT lot_id, owner, order_id, points, remaining, earned_at, expires_at FROM lots
WHERE owner = ANY($1::text[]) AND remaining > 0
ORDER BY owner, expires_at, lot_id
"""
_INSERT_LEDGER = """
INSERT INTO ledger (entry_id, customer_id, kind, points, balance_after, event_id, order_id,
                    occurred_at, expires_at, detail)
SELECT e, c, k, p, b, ev, o, t, x, d::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
            $8::timestamptz[], $9::timestamptz[], $10::text[]) WITH ORDINALITY
     AS u(e, c, k, p, b, ev, o, t, x, d, n)
ORDER BY n
ON CONFLICT (event_id, kind) DO NOTHING
"""
_UPSERT_LOTS = """
INSERT INTO lots (lot_id, owner, order_id, points, remaining, earned_at, expires_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (lot_id) DO UPDATE SET owner = EXCLUDED.owner, order_id = EXCLUDED.order_id,
                                   remaining = EXCLUDED.remaining
"""
_UPSERT_ORDERS = f"""
INSERT INTO orders ({_ORDER_COLUMNS})
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                     $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
ON CONFLICT (order_key) DO UPDATE SET order_id = EXCLUDED.order_id, owner = EXCLUDED.owner,
    refunded = EXCLUDED.refunded, spend = EXCLUDED.spend, reversed = EXCLUDED.reversed
"""
_UPSERT_ACCOUNTS = """
INSERT INTO accounts AS a (customer_id, balance, tier, trailing_spend, evaluated_at, review_at,
                           next_expiry_at, merged_into)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::timestamptz[],
                     $6::timestamptz[], $7::timestamptz[], $8::text[])
ON CONFLICT (customer_id) DO UPDATE SET balance = EXCLUDED.balance, tier = EXCLUDED.tier,
    trailing_spend = EXCLUDED.trailing_spend, evaluated_at = EXCLUDED.evaluated_at,
    review_at = EXCLUDED.review_at, next_expiry_at = EXCLUDED.next_expiry_at,
    merged_into = EXCLUDED.merged_into, updated_at = now()
"""
_INSERT_REJECTIONS = """
INSERT INTO redemption_rejections (event_id, customer_id, order_id, requested, balance, reason, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
                     $7::timestamptz[])
ON CONFLICT DO NOTHING
"""


# -- loading ---------------------------------------------------------------------------------------

async def mark_processed(conn: asyncpg.Connection, keys: Sequence[str]) -> set[str]:
    """Record command keys as applied; returns those that were new (re-delivered ones are not)."""
    if not keys:
        return set()
    return {r[0] for r in await conn.fetch(_MARK, list(dict.fromkeys(keys)))}


async def load_aliases(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, str]:
    """Merge edges reachable from `ids` (merged -> survivor), chains included."""
    rows = await conn.fetch(_ALIASES, list(set(ids)))
    return {r[0]: r[1] for r in rows}


def _order(r: asyncpg.Record) -> Order:
    return Order(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11])


async def load_orders(conn: asyncpg.Connection, keys: Iterable[str]) -> dict[str, Order]:
    keys = list(set(keys))
    if not keys:
        return {}
    rows = await conn.fetch(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_key = ANY($1::text[])", keys)
    return {r[0]: _order(r) for r in rows}


async def lock_accounts(conn: asyncpg.Connection, ids: Iterable[str],
                        orders: dict[str, Order], *, spend_since: dt.datetime | None,
                        create: bool = True) -> dict[str, Account]:
    """Lock (creating when missing) the accounts of `ids` with their open lots and the orders that
    count for their tier (placed after `spend_since`; every order when it is None)."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    if create:
        await conn.execute(_ENSURE_ACCOUNTS, ids)
    accounts: dict[str, Account] = {}
    for r in await conn.fetch(_LOCK_ACCOUNTS, ids):
        accounts[r[0]] = Account(r[0], balance=r[1], tier=r[2], trailing_spend=r[3],
                                 evaluated_at=r[4], review_at=r[5], merged_into=r[6], erased=r[7])
    for r in await conn.fetch(_OPEN_LOTS, ids):
        accounts[r[1]].lots.append(Lot(r[0], r[1], r[2], r[3], r[4], r[5], r[6]))
    if spend_since is None:
        rows = await conn.fetch(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE owner = ANY($1::text[])", ids)
    else:
        rows = await conn.fetch(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE owner = ANY($1::text[]) "
                                "AND sale_at > $2", ids, spend_since)
    for r in rows:
        orders.setdefault(r[0], _order(r))
    for order in orders.values():
        acct = accounts.get(order.owner)
        if acct is not None:
            acct.orders[order.order_key] = order
    return accounts


async def load_moves(conn: asyncpg.Connection, merge_id: str) -> tuple[list[str], list[str]]:
    rows = await conn.fetch("SELECT item, item_id FROM merge_moves WHERE merge_id = $1 ORDER BY item_id",
                            merge_id)
    return ([r[1] for r in rows if r[0] == "lot"], [r[1] for r in rows if r[0] == "order"])


async def lot_owners(conn: asyncpg.Connection, lot_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT DISTINCT owner FROM lots WHERE lot_id = ANY($1::text[])", list(lot_ids))
    return {r[0] for r in rows}


async def due_customers(conn: asyncpg.Connection, now: dt.datetime, limit: int) -> list[str]:
    """Members with lots past expiry or spend leaving the tier window, locked (skipping busy rows)."""
    rows = await conn.fetch(
        "SELECT customer_id FROM accounts WHERE merged_into IS NULL AND "
        "(next_expiry_at <= $1 OR review_at <= $1) ORDER BY customer_id LIMIT $2 "
        "FOR UPDATE SKIP LOCKED", now, limit)
    return [r[0] for r in rows]


# -- writing ---------------------------------------------------------------------------------------

async def write(conn: asyncpg.Connection, book: Book, codec: AvroCodec,
                topic: str = LOYALTY_EVENTS.name) -> None:
    """Everything the book changed, one statement per table, plus the outbox rows."""
    if book.entries:
        es = book.entries
        await conn.execute(
            _INSERT_LEDGER, [e.entry_id for e in es], [e.customer_id for e in es],
            [e.kind for e in es], [e.points for e in es], [e.balance_after for e in es],
            [e.event_id for e in es], [e.order_id for e in es], [e.occurred_at for e in es],
            [e.expires_at for e in es],
            [orjson.dumps(e.detail).decode() if e.detail else None for e in es])
    if book.dirty_lots:
        ls = list(book.dirty_lots.values())
        await conn.execute(
            _UPSERT_LOTS, [x.lot_id for x in ls], [x.owner for x in ls], [x.order_id for x in ls],
            [x.points for x in ls], [x.remaining for x in ls], [x.earned_at for x in ls],
            [x.expires_at for x in ls])
    if book.dirty_orders:
        os_ = list(book.dirty_orders.values())
        await conn.execute(
            _UPSERT_ORDERS, [o.order_key for o in os_], [o.order_id for o in os_],
            [o.owner for o in os_], [o.sale_event_id for o in os_], [o.sale_at for o in os_],
            [o.currency for o in os_], [o.total for o in os_], [o.refunded for o in os_],
            [o.gross_spend for o in os_], [o.spend for o in os_], [o.earned for o in os_],
            [o.reversed for o in os_])
    if book.dirty_accounts:
        accts = sorted(book.dirty_accounts.values(), key=lambda a: a.customer_id)
        await conn.execute(
            _UPSERT_ACCOUNTS, [a.customer_id for a in accts], [a.balance for a in accts],
            [a.tier for a in accts], [a.trailing_spend for a in accts],
            [a.evaluated_at for a in accts], [a.review_at for a in accts],
            [min((lot.expires_at for lot in a.lots), default=None) for a in accts],
            [a.merged_into for a in accts])
    if book.rejections:
        rs = book.rejections
        await conn.execute(
            _INSERT_REJECTIONS, [r.event_id for r in rs], [r.customer_id for r in rs],
            [r.order_id for r in rs], [r.requested for r in rs], [r.balance for r in rs],
            [r.reason for r in rs], [r.occurred_at for r in rs])
    if book.merges or book.alias_changes or book.moves:
        await _write_merges(conn, book)
    if book.erased:
        await _write_erasures(conn, book)
    if book.notices:
        await add_to_outbox(conn, [
            OutboxMessage(topic, n.customer_id, codec.encode(LOYALTY, n.as_record()))
            for n in book.notices])


async def _write_merges(conn: asyncpg.Connection, book: Book) -> None:
    if book.moves:
        await conn.execute(
            "INSERT INTO merge_moves (merge_id, item, item_id) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            [m[0] for m in book.moves], [m[1] for m in book.moves], [m[2] for m in book.moves])
    for merged, change in book.alias_changes.items():
        if change is None:
            await conn.execute("DELETE FROM aliases WHERE merged = $1", merged)
        else:
            await conn.execute(
                "INSERT INTO aliases (merged, survivor, merge_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (merged) DO UPDATE SET survivor = EXCLUDED.survivor, merge_id = EXCLUDED.merge_id",
                merged, change[0], change[1])
    for merge_id, kind, cmd, points in book.merges:
        if kind == "merged":
            await conn.execute(
                "INSERT INTO merges (merge_id, survivor, merged, reason, merged_at, points_in) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                merge_id, cmd.survivor, cmd.merged, cmd.reason, cmd.occurred_at, points)
        else:
            await conn.execute(
                "UPDATE merges SET unmerged_at = $2, points_out = $3 WHERE merge_id = $1",
                merge_id, cmd.occurred_at, points)


async def _write_erasures(conn: asyncpg.Connection, book: Book) -> None:
    """Erasure keeps amounts and drops order references everywhere loyalty holds them."""
    ids = [cid for cid, _ in book.erased]
    at = max(t for _, t in book.erased)
    await conn.execute("UPDATE ledger SET order_id = NULL WHERE customer_id = ANY($1::text[]) "
                       "AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE lots SET order_id = NULL WHERE owner = ANY($1::text[]) "
                       "AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE orders SET order_id = NULL WHERE owner = ANY($1::text[]) "
                       "AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE redemption_rejections SET order_id = NULL "
                       "WHERE customer_id = ANY($1::text[]) AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE accounts SET erased_at = coalesce(erased_at, $2) "
                       "WHERE customer_id = ANY($1::text[])", ids, at)
