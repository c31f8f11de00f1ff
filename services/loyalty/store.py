"""The loyalty tables in PostgreSQL: set-based loads and writes, one statement per table per batch."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterable, Sequence

import asyncpg

from services.loyalty.book import Book, next_expiry
from services.loyalty.ledger import Account, Notice, Order
from shared.db import json_rows
from shared.errors import PermanentError
from shared.outbox import OutboxMessage, add_to_outbox
from shared.topics import LOYALTY_EVENTS

EVER = dt.datetime(1, 1, 2, tzinfo=dt.UTC)

# Key and id lists travel as one JSON array (orjson here, jsonb_array_elements_text there): asyncpg
# checks each element of a text[] parameter against collections.abc in Python, ~4% of the worker's
# CPU in a perf profile (2026-12-07) for the batch's thousands of ids and keys. `= ANY(ARRAY(SELECT
# ...))` keeps the index scans `= ANY($1::text[])` had.
_MARK = """
INSERT INTO processed (key) SELECT jsonb_array_elements_text($1::text::jsonb)
ON CONFLICT DO NOTHING RETURNING key
"""
_ALIASES = """
WITH RECURSIVE r(merged, survivor, depth) AS (
    SELECT a.merged, a.survivor, 1 FROM aliases a
    WHERE a.merged = ANY(ARRAY(SELECT jsonb_array_elements_text($1::text::jsonb)))
    UNION ALL
    SELECT a.merged, a.survivor, r.depth + 1 FROM aliases a JOIN r ON a.merged = r.survivor
    WHERE r.depth < 32
)
SELECT DISTINCT merged, survivor FROM r
"""
# Members are serialised by a transaction-scoped advisory lock per customer id, taken in id
# order: nothing is written to lock, and an account that does not exist yet is locked too.
# The accounts are read by a second statement: a statement reads the snapshot taken when it
# started, so a read in the locking statement would miss what the lock holder committed while
# this one waited (and the upsert would then write over it).
_LOCK_MEMBERS = """
SELECT count(*) FROM jsonb_array_elements_text($1::text::jsonb) WITH ORDINALITY AS u(id, n)
CROSS JOIN LATERAL (SELECT pg_advisory_xact_lock(hashtextextended('omnicrm-loyalty:' || u.id, 0))) AS l
"""
# One index probe per member (OFFSET 0 keeps it a loop): `customer_id = ANY($1)` planned while the
# table was small (no statistics: autovacuum may be off) can keep reading it whole once it is not.
_READ_ACCOUNTS = """
SELECT a.customer_id, a.balance, a.tier, a.trailing_spend, a.evaluated_at, a.review_at, a.merged_into,
       a.erased_at IS NOT NULL, a.next_expiry_at
FROM jsonb_array_elements_text($1::text::jsonb) AS u(id)
CROSS JOIN LATERAL (SELECT * FROM accounts WHERE customer_id = u.id OFFSET 0) a
"""
_ORDER_COLUMNS = ("order_key, order_id, owner, sale_event_id, sale_at, currency, total, refunded, "
                  "gross_spend, spend, earned, reversed, remaining, expires_at")
# Three index lookups (by key; by owner for points held; by owner and time for the window);
# rows found twice are dropped on this side. (Looking the keys up one by one, LATERAL ... LIMIT 1,
# avoids the planner's sequential scan for a batch's thousands of keys, but measured slower end
# to end on 200k events: left as it was.)
_LOAD_ORDERS = f"""
SELECT {_ORDER_COLUMNS} FROM orders WHERE order_key = ANY(ARRAY(SELECT jsonb_array_elements_text($1::text::jsonb)))
UNION ALL
SELECT {_ORDER_COLUMNS} FROM orders
WHERE owner = ANY(ARRAY(SELECT jsonb_array_elements_text($2::text::jsonb))) AND remaining > 0
UNION ALL
SELECT {_ORDER_COLUMNS} FROM orders
WHERE owner = ANY(ARRAY(SELECT jsonb_array_elements_text($3::text::jsonb))) AND sale_at > $4
"""
# Ledger entries and new orders go by binary COPY: both are plain inserts, and COPY costs the server
# 2.3 us a row less than reading them from a JSON document (measured 2026-12-07, 2000-row batches),
# for ~1 us more on this side. The other wide writes travel as one JSON array of rows (orjson here,
# jsonb on the server): far cheaper to encode than a dozen typed arrays, one statement all the same.
# No ON CONFLICT (COPY has none): every command is applied at most once before its entries are made
# (sales by their order, returns and merges by the processed table, expiry by the lot it empties), so
# an entry's (event_id, kind) exists already only when two different commands carry one event id.
# Skipping that entry, as DO NOTHING did, left a balance that was not the sum of its ledger; the key
# violation fails the batch (write raises PermanentError "event_id_reused") and the consumer
# dead-letters the second command. Entries take their `seq` in the order they are copied.
_LEDGER_COLUMNS = ("entry_id", "customer_id", "kind", "points", "balance_after", "event_id", "order_id",
                   "occurred_at", "expires_at", "detail")
# Orders the batch created (their keys were looked up under the batch's locks and not found) are
# copied too. Two workers selling one order id at once make the second fail on the key and retry,
# finding the order.
_ORDER_COLUMN_NAMES = tuple(c.strip() for c in _ORDER_COLUMNS.split(","))
# Orders read and changed (returns, redemptions, expiry, merges).
_UPSERT_ORDERS = f"""
INSERT INTO orders ({_ORDER_COLUMNS})
SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::timestamptz, e->>5, (e->>6)::bigint,
       (e->>7)::bigint, (e->>8)::bigint, (e->>9)::bigint, (e->>10)::bigint, (e->>11)::bigint,
       (e->>12)::bigint, (e->>13)::timestamptz
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
ON CONFLICT (order_key) DO UPDATE SET order_id = EXCLUDED.order_id, owner = EXCLUDED.owner,
    refunded = EXCLUDED.refunded, spend = EXCLUDED.spend, reversed = EXCLUDED.reversed,
    remaining = EXCLUDED.remaining
"""
_UPSERT_ACCOUNTS = """
INSERT INTO accounts AS a (customer_id, balance, tier, trailing_spend, evaluated_at, review_at,
                           next_expiry_at, merged_into)
SELECT e->>0, (e->>1)::bigint, e->>2, (e->>3)::bigint, (e->>4)::timestamptz,
       (e->>5)::timestamptz, (e->>6)::timestamptz, e->>7
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
ON CONFLICT (customer_id) DO UPDATE SET balance = EXCLUDED.balance, tier = EXCLUDED.tier,
    trailing_spend = EXCLUDED.trailing_spend, evaluated_at = EXCLUDED.evaluated_at,
    review_at = EXCLUDED.review_at, next_expiry_at = EXCLUDED.next_expiry_at,
    merged_into = EXCLUDED.merged_into, updated_at = now()
"""
# Accounts read under their lock exist: a plain UPDATE skips the upsert's speculative insert
# (server CPU measured 6.3 against 8.9 us a row).
_UPDATE_ACCOUNTS = """
UPDATE accounts AS a SET balance = (e->>1)::bigint, tier = e->>2, trailing_spend = (e->>3)::bigint,
    evaluated_at = (e->>4)::timestamptz, review_at = (e->>5)::timestamptz,
    next_expiry_at = (e->>6)::timestamptz, merged_into = e->>7, updated_at = now()
FROM jsonb_array_elements($1::text::jsonb) AS u(e)
WHERE a.customer_id = e->>0
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
    return {r[0] for r in await conn.fetch(_MARK, json_rows(list(dict.fromkeys(keys))))}


async def load_aliases(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, str]:
    """Merge edges reachable from `ids` (merged -> survivor), chains included."""
    rows = await conn.fetch(_ALIASES, json_rows(list(set(ids))))
    return {r[0]: r[1] for r in rows}


async def lock_accounts(conn: asyncpg.Connection, ids: Iterable[str],
                        entry_tier: str) -> tuple[dict[str, Account], set[str]]:
    """Lock the members of `ids` for this transaction and read their accounts; returns the
    accounts (new, empty ones for ids never seen) and the ids that are new."""
    ids = sorted(set(ids))
    accounts: dict[str, Account] = {}
    new: set[str] = set()
    if not ids:
        return accounts, new
    listed = json_rows(ids)
    await conn.fetchval(_LOCK_MEMBERS, listed)
    rows = {r[0]: r for r in await conn.fetch(_READ_ACCOUNTS, listed)}
    for cid in ids:  # in id order, as before (expiry walks the accounts in this order)
        r = rows.get(cid)
        if r is None:
            accounts[cid] = Account(cid, tier=entry_tier)
            new.add(cid)
        else:
            # Spend is carried forward until its window moves; load_orders makes it exact then.
            # Lots are loaded only for members whose points are consumed (load_orders).
            # (Positional, in Account's field order: this runs for every member of a batch.)
            accounts[cid] = Account(cid, r[1], r[2], [], False, r[8], None, {}, False, r[5],
                                    r[6], r[7], r[3], r[4])
    return accounts, new


def _order(r: asyncpg.Record) -> Order:
    return Order(*r)  # the columns are selected in the field order (_ORDER_COLUMNS)


async def load_orders(conn: asyncpg.Connection, orders: dict[str, Order], *,
                      keys: Iterable[str] = (), open_for: Iterable[Account] = (),
                      window_for: Iterable[Account] = (), since: dt.datetime | None = None) -> None:
    """Into `orders`: the orders with `keys`, the orders holding points of `open_for`, and every
    order of `window_for` placed after `since` (every order at all when `since` is None); the
    orders are attached to their owners' accounts: `open_for` accounts then hold all their lots
    and `window_for` accounts their exact trailing spend."""
    open_for, window_for = list(open_for), list(window_for)
    keys = [k for k in set(keys) if k not in orders]
    rows = []
    if keys or open_for or window_for:
        rows = await conn.fetch(_LOAD_ORDERS, json_rows(keys), json_rows([a.customer_id for a in open_for]),
                                json_rows([a.customer_id for a in window_for]), since or EVER)
    for r in rows:
        if r[0] not in orders:
            orders[r[0]] = _order(r)
    owners = {a.customer_id: a for a in (*open_for, *window_for)}
    for order in orders.values():
        acct = owners.get(order.owner)
        if acct is not None and order.order_key not in acct.orders:
            acct.orders[order.order_key] = order
            if order.remaining > 0:
                acct.lots.append(order)
    for acct in owners.values():
        acct.lots.sort(key=Order.fifo_key)
    for acct in open_for:
        acct.lots_loaded = True
    for acct in window_for:
        acct.spend_exact = True


# The oldest open lots of each member, oldest expiry first (orders_fifo answers each member with
# an index range scan that stops after $2 open lots).
_LOAD_LOTS = f"""
SELECT l.* FROM jsonb_array_elements_text($1::text::jsonb) AS u(owner)
CROSS JOIN LATERAL (
    SELECT {_ORDER_COLUMNS} FROM orders o
    WHERE o.owner = u.owner AND o.remaining > 0
    ORDER BY o.expires_at, o.order_key LIMIT $2
) AS l
"""


async def load_lots(conn: asyncpg.Connection, orders: dict[str, Order],
                    wanted: Sequence[tuple[Account, int]], review_by: dt.datetime,
                    limit: int = 4) -> list[Account]:
    """Load only the oldest lots of each member: enough to hold the points it may consume and
    every lot expiring by `review_by`. The account then has `lots_after` (the first lot left
    out) and the orders of `orders` it holds. Returns the members for whom `limit` lots were not
    enough; those are left untouched (load them whole)."""
    rows = await conn.fetch(_LOAD_LOTS, json_rows([a.customer_id for a, _ in wanted]), limit + 1)
    found: dict[str, list[asyncpg.Record]] = {a.customer_id: [] for a, _ in wanted}
    for r in rows:
        found[r[2]].append(r)
    held: dict[str, list[Order]] = {}  # orders already at hand (fetched by key), per wanted owner
    for order in orders.values():
        if order.owner in found:
            held.setdefault(order.owner, []).append(order)
    rest: list[Account] = []
    for acct, need in wanted:
        cid = acct.customer_id
        points, after, taken = 0, None, []
        for r in found[cid]:
            if points >= need and r[13] > review_by:
                after = (r[13], r[0])
                break
            taken.append(r)
            points += r[12]
        if after is None and len(found[cid]) > limit:
            rest.append(acct)  # more lots than looked at, all of them needed
            continue
        mine = held.get(cid, [])
        for r in taken:
            if r[0] not in orders:
                orders[r[0]] = order = _order(r)
                mine.append(order)
        for order in mine:
            if order.order_key not in acct.orders:
                acct.orders[order.order_key] = order
                if order.remaining > 0:
                    acct.lots.append(order)
        acct.lots.sort(key=Order.fifo_key)
        acct.lots_loaded = True
        acct.lots_after = after
    return rest


async def load_moves(conn: asyncpg.Connection, merge_id: str) -> list[str]:
    rows = await conn.fetch("SELECT order_key FROM merge_moves WHERE merge_id = $1 ORDER BY order_key",
                            merge_id)
    return [r[0] for r in rows]


async def due_customers(conn: asyncpg.Connection, now: dt.datetime, entry_tier: str,
                        limit: int) -> list[str]:
    """Members with points past expiry, or a tier whose spend is leaving the window."""
    rows = await conn.fetch(
        "SELECT customer_id FROM accounts WHERE merged_into IS NULL AND "
        "(next_expiry_at <= $1 OR (review_at <= $1 AND tier <> $2)) ORDER BY customer_id LIMIT $3",
        now, entry_tier, limit)
    return [r[0] for r in rows]


# -- writing ---------------------------------------------------------------------------------------

class _InFlight:
    """The batch's writes, one statement at a time on the connection, each checked against the
    status it must answer. A statement starts when this side next awaits (the next send or wait),
    so within one batch the server and this side take turns; the consumer's other lanes run in
    those waits. (Starting each statement at once, one pass of the loop after ensure_future, measured
    no faster in bench.loyalty, three alternating pairs, 2026-12-07.)"""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.running: asyncio.Future | None = None
        self.expect: str | None = None

    async def send(self, query: str, *args, expect: str | None = None) -> None:
        """Start `query`; `expect`: the status it must answer (else the transaction fails)."""
        await self.wait()
        self.running = asyncio.ensure_future(self.conn.execute(query, *args))
        self.expect = expect

    async def copy(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        """Start a binary COPY of `rows` into `table`; it must store every row."""
        await self.wait()
        self.running = asyncio.ensure_future(
            self.conn.copy_records_to_table(table, records=rows, columns=columns))
        self.expect = f"COPY {len(rows)}"

    async def wait(self) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            status = await running
            if self.expect is not None and status != self.expect:
                raise RuntimeError(f"expected {self.expect}, the server answered {status}")


async def write(conn: asyncpg.Connection, book: Book, encode: Callable[[Notice], bytes],
                topic: str = LOYALTY_EVENTS.name) -> None:
    """Everything the book changed, one statement per table, plus the outbox rows."""
    flight = _InFlight(conn)
    try:
        if book.entries:
            await flight.copy("ledger", _LEDGER_COLUMNS, [
                (e.entry_id, e.customer_id, e.kind, e.points, e.balance_after, e.event_id,
                 e.order_id, e.occurred_at, e.expires_at, e.detail) for e in book.entries])
        if book.dirty_orders:
            new = book.new_orders
            fresh, changed = [], []
            for o in book.dirty_orders.values():
                (fresh if o.order_key in new else changed).append(
                    (o.order_key, o.order_id, o.owner, o.sale_event_id, o.sale_at, o.currency,
                     o.total, o.refunded, o.gross_spend, o.spend, o.earned, o.reversed,
                     o.remaining, o.expires_at))
            if fresh:
                await flight.copy("orders", _ORDER_COLUMN_NAMES, fresh)
            if changed:
                await flight.send(_UPSERT_ORDERS, json_rows(changed))
        if book.dirty_accounts:
            stored = book.stored
            known, other = [], []
            for a in sorted(book.dirty_accounts.values(), key=lambda a: a.customer_id):
                (known if a.customer_id in stored else other).append(
                    (a.customer_id, a.balance, a.tier, a.trailing_spend, a.evaluated_at,
                     a.review_at, next_expiry(a), a.merged_into))
            if known:
                await flight.send(_UPDATE_ACCOUNTS, json_rows(known), expect=f"UPDATE {len(known)}")
            if other:
                await flight.send(_UPSERT_ACCOUNTS, json_rows(other))
        messages = [OutboxMessage(topic, n.customer_id, encode(n)) for n in book.notices]
        await flight.wait()
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "ledger_pkey":
            raise
        # Event ids are publishers' ids, not personal data: they may be named.
        raise PermanentError("event_id_reused", "another command already made a ledger entry under "
                             f"this event id ({exc.detail})") from exc
    finally:
        if flight.running is not None:  # something failed on this side: let the statement end
            await asyncio.gather(flight.running, return_exceptions=True)
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
    if messages:
        await add_to_outbox(conn, messages)


async def _write_merges(conn: asyncpg.Connection, book: Book) -> None:
    if book.moves:
        await conn.execute(
            "INSERT INTO merge_moves (merge_id, order_key) "
            "SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
            [m[0] for m in book.moves], [m[1] for m in book.moves])
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
    await conn.execute("UPDATE orders SET order_id = NULL WHERE owner = ANY($1::text[]) "
                       "AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE redemption_rejections SET order_id = NULL "
                       "WHERE customer_id = ANY($1::text[]) AND order_id IS NOT NULL", ids)
    await conn.execute("UPDATE accounts SET erased_at = coalesce(erased_at, $2) "
                       "WHERE customer_id = ANY($1::text[])", ids, at)
    first: dict[str, dt.datetime] = {}
    for cid, when in book.erased:
        first[cid] = min(when, first.get(cid, when))
    await conn.execute(_RECORD_ERASURES, list(first), list(first.values()), list(ERASED_WHAT))


# What an erasure drops here, as named in `erasures.what` and the erase report: the order ids of
# the ledger, the orders and the refused redemptions. Points, amounts and dates stay, anonymised.
ERASED_ORDER_REFS = "order_refs"
ERASED_WHAT = (ERASED_ORDER_REFS,)
# A re-delivered erase_request keeps the first record.
_RECORD_ERASURES = """
INSERT INTO erasures (customer_id, erased_at, what)
SELECT u.cid, u.at, $3::text[] FROM unnest($1::text[], $2::timestamptz[]) AS u(cid, at)
ON CONFLICT (customer_id) DO NOTHING
"""


async def erasure_of(conn: asyncpg.Connection, customer_id: str) -> asyncpg.Record | None:
    """The erasure record of `customer_id`, None when loyalty applied none."""
    return await conn.fetchrow(
        "SELECT customer_id, erased_at, what FROM erasures WHERE customer_id = $1", customer_id)
