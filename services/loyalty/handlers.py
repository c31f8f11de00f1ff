"""Batches from identity.events.v1 and identity.merges.v1 applied to the ledger, and expiry on the
clock: parse -> load what the batch touches -> apply through the book -> write, one transaction."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from functools import cache
from typing import Any

import asyncpg

from services.loyalty import store
from services.loyalty.book import Book, LotsNotLoaded, command_key, return_key
from services.loyalty.ledger import (
    TIER_CHANGED,
    Account,
    Command,
    Enrol,
    Erase,
    MergeCommand,
    Return,
    Sale,
    order_key,
)
from services.loyalty.rules import LoyaltyRules, UnknownCurrency, exponent, points_for
from services.loyalty.wire import IGNORED, loyalty_encoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import Clock, FixedClock
from shared.errors import PermanentError
from shared.metrics import ServiceMetrics
from shared.topics import LOYALTY_EVENTS

ENROLLING_TYPES = frozenset({"signup"})
# Tuples, not `A | B`: the union object would be built again for every command checked.
_KEYED = (Return, MergeCommand)   # applied at most once through the processed table
_ORDERED = (Sale, Return)         # carry an order


def parse(value: dict[str, Any] | None, rules: LoyaltyRules) -> Command | None:
    """The loyalty command a decoded record carries, None when it is nothing to loyalty.
    Raises PermanentError for records that can never be applied (they go to the DLQ)."""
    if value is None or value is IGNORED:
        return None
    if isinstance(value, Sale):  # read straight from the Avro bytes (wire.resolved_decoder)
        currency = _currency(value.currency, rules)
        if value.total < 0 or value.points_redeemed < 0:
            raise PermanentError("invalid_amount", "a sale's total and points_redeemed cannot be negative")
        return value if currency == value.currency else replace(value, currency=currency)
    if isinstance(value, Return):
        currency = _currency(value.currency, rules)
        if value.total < 0:
            raise PermanentError("invalid_amount", "a return's total cannot be negative")
        return value if currency == value.currency else replace(value, currency=currency)
    if isinstance(value, (Erase, Enrol)):
        return value
    if "merge_id" in value:
        if value["kind"] not in ("merged", "unmerged"):
            raise PermanentError("invalid_merge", f"unknown merge kind {value['kind']!r}")
        return MergeCommand(value["merge_id"], value["kind"], value["survivor"], value["merged"],
                            value.get("reason") or "", value.get("cause_event_id"), value["occurred_at"])
    event = value["event"]
    kind = event["type"]
    if kind == "sale":
        p = _properties(event)
        currency = _currency(p["currency"], rules)
        if p["total"] < 0 or (p.get("points_redeemed") or 0) < 0:
            raise PermanentError("invalid_amount", "a sale's total and points_redeemed cannot be negative")
        return Sale(event["event_id"], value["customer_id"], event["occurred_at"], p["order_id"],
                    currency, p["total"], p.get("points_redeemed") or 0)
    if kind == "return":
        p = _properties(event)
        currency = _currency(p["currency"], rules)
        if p["total"] < 0:
            raise PermanentError("invalid_amount", "a return's total cannot be negative")
        return Return(event["event_id"], value["customer_id"], event["occurred_at"], p["order_id"],
                      p["return_id"], currency, p["total"])
    if kind == "erase_request":
        return Erase(event["event_id"], value["customer_id"], event["occurred_at"])
    if kind in ENROLLING_TYPES:
        return Enrol(event["event_id"], value["customer_id"], event["occurred_at"])
    return None


def _keys(c: Return | MergeCommand) -> tuple[str, ...]:
    return (command_key(c), return_key(c)) if isinstance(c, Return) else (command_key(c),)


def _properties(event: dict[str, Any]) -> dict[str, Any]:
    props = event.get("properties")
    if isinstance(props, tuple):  # decoded with union branch names
        props = props[1]
    if not isinstance(props, dict):
        raise PermanentError("invalid_event", f"{event['type']} without properties")
    return props


def _currency(code: str, rules: LoyaltyRules) -> str:
    code = code.upper()
    try:
        exponent(code)
    except UnknownCurrency:
        raise PermanentError("unknown_currency", f"{code!r} is not an ISO 4217 currency") from None
    if code not in rules.rates:
        raise PermanentError("unknown_currency", f"no exchange rate for {code} in rules.yaml")
    return code


class LoyaltyHandler:
    """The batch handler of the loyalty consumer, and the expiry job of its leader timer."""

    def __init__(self, rules: LoyaltyRules, codec: AvroCodec, clock: Clock, *,
                 metrics: ServiceMetrics | None = None, topic: str = LOYALTY_EVENTS.name,
                 save_watermark: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> None:
        self.rules = rules
        self.codec = codec
        self.encode = loyalty_encoder(codec)
        self.clock = clock
        self.topic = topic
        self.save_watermark = save_watermark
        self._entries = self._rejections = self._tiers = self._unmatched = None
        if metrics is not None:
            self._entries = metrics.counter("ledger_entries", "Ledger entries written, per kind.", ("kind",))
            self._rejections = metrics.counter("redemptions_rejected", "Redemptions not honoured, per reason.", ("reason",))
            self._tiers = metrics.counter("tier_changes", "Tier changes, per new tier.", ("tier",))
            self._unmatched = metrics.counter("returns_unmatched", "Returns of orders loyalty never saw.")

    async def __call__(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        before = self.clock.now()
        commands = [c for c in (parse(r.value, self.rules) for r in records) if c is not None]
        for c in commands:
            self.clock.observe(c.occurred_at)
        if commands:
            await self.apply(conn, commands, before)
        if self.save_watermark is not None:
            await self.save_watermark(conn)

    async def apply(self, conn: asyncpg.Connection, commands: Sequence[Command],
                    now: dt.datetime) -> None:
        """Apply commands in order, each at most once ever; merges run on their own.

        Sales are made idempotent by their order (the orders table); returns and merges by
        processed keys, recorded here in one statement: a return by its event id and by what it
        returns (return_key), so neither a re-delivery nor the same return under a new event id
        counts twice."""
        keyed = [k for c in commands if isinstance(c, _KEYED) for k in _keys(c)]
        fresh = await store.mark_processed(conn, keyed)
        segment: list[Command] = []
        for c in commands:
            if isinstance(c, _KEYED):
                keys = _keys(c)
                if not all(k in fresh for k in keys):
                    continue
                fresh.difference_update(keys)  # a second copy in the same batch is a duplicate too
            if isinstance(c, MergeCommand):
                await self._segment(conn, segment, now)
                segment = []
                await self._merge(conn, c, now)
            else:
                segment.append(c)
        await self._segment(conn, segment, now)

    async def _load(self, conn: asyncpg.Connection, book: Book, ids: set[str], *,
                    keys: Iterable[str] = (), lots_for: set[str] = frozenset(),
                    since: dt.datetime | None, review_by: dt.datetime, whole: bool = False,
                    need: dict[str, int | None] | None = None) -> None:
        """Lock and load the members `ids` into the book with the orders `keys`. Lots are loaded
        for `lots_for` and for members with points expiring by `review_by`; window orders for
        members whose spend leaves the window by then. `whole` loads all of both for everyone
        (every order ever when `since` is None). A member of `lots_for` with a number in `need`
        (and nothing expiring) gets only its oldest lots holding that many points."""
        accounts, new = await store.lock_accounts(conn, ids - book.accounts.keys(), self.rules.entry_tier)
        book.accounts.update(accounts)
        book.stored.update(accounts.keys() - new)
        for cid in new:
            book.dirty_accounts[cid] = accounts[cid]
        known = [a for a in accounts.values() if a.customer_id not in new]
        partial: list[tuple[Account, int]] = []
        if whole:
            lots, window = known, known
        else:
            lots = []
            for a in known:
                expiring = a.next_expiry_at is not None and a.next_expiry_at <= review_by
                if expiring or (a.customer_id in lots_for and (need or {}).get(a.customer_id) is None):
                    lots.append(a)
                elif a.customer_id in lots_for:
                    partial.append((a, need[a.customer_id]))
            window = [a for a in known if a.review_at is not None and a.review_at <= review_by]
        await store.load_orders(conn, book.orders, keys=keys, open_for=lots, window_for=window,
                                since=since)
        if partial:
            rest = await store.load_lots(conn, book.orders, partial, review_by)
            if rest:
                await store.load_orders(conn, book.orders, open_for=rest)

    async def _segment(self, conn: asyncpg.Connection, commands: list[Command], now: dt.datetime) -> None:
        if not commands:
            return
        try:
            book = await self._plan(conn, commands, now, partial_lots=True)
        except LotsNotLoaded:
            # Points had to come from lots left out: plan again with every lot loaded (the first
            # book is dropped; nothing was written).
            book = await self._plan(conn, commands, now, partial_lots=False)
        await self._write(conn, book)

    async def _plan(self, conn: asyncpg.Connection, commands: list[Command], now: dt.datetime, *,
                    partial_lots: bool) -> Book:
        as_ofs = [max(now, c.occurred_at) for c in commands]
        since, latest = min(as_ofs) - self.rules.window, max(as_ofs)
        keys = {order_key(c.order_id) for c in commands if isinstance(c, _ORDERED)}
        ids = {c.customer_id for c in commands}
        book = Book(self.rules, aliases=await store.load_aliases(conn, ids))
        # Points are consumed by redemptions and by returns (from whoever holds the order: the
        # returning customer, the buyer if the sale is in this batch, or the stored owner).
        returned = {order_key(c.order_id) for c in commands if isinstance(c, Return)}
        consuming = {book.resolve(c.customer_id) for c in commands
                     if (isinstance(c, Sale) and (c.points_redeemed > 0 or order_key(c.order_id) in returned))
                     or isinstance(c, Return)}
        need = self._need(book, commands, returned) if partial_lots else None
        await self._load(conn, book, {book.resolve(i) for i in ids}, keys=keys, lots_for=consuming,
                         since=since, review_by=latest, need=need)
        owners = {o.owner for k, o in book.orders.items() if k in returned}
        if owners - book.accounts.keys():
            book.aliases.update(await store.load_aliases(conn, owners - book.accounts.keys()))
        holders = {book.resolve(o) for o in owners}
        if holders - book.accounts.keys():
            await self._load(conn, book, holders - book.accounts.keys(), lots_for=holders,
                             since=since, review_by=latest)
        lacking = [book.accounts[h] for h in sorted(holders) if not book.accounts[h].lots_loaded]
        if lacking:
            await store.load_orders(conn, book.orders, open_for=lacking)
        for c, as_of in zip(commands, as_ofs, strict=True):
            book.apply(c, as_of)
        return book

    def _need(self, book: Book, commands: list[Command], returned: set[str]) -> dict[str, int | None]:
        """Per consuming member, the most points this segment may take from its stored lots
        (None: unknown, load them all): what its sales redeem, and for a return what the
        returned amount earned (taken from the order's own lot first). An estimate only: taking
        more raises LotsNotLoaded and the segment is planned again with every lot."""
        need: dict[str, int | None] = {}
        for c in commands:
            if isinstance(c, Sale):
                cid = book.resolve(c.customer_id)
                if order_key(c.order_id) in returned:
                    need[cid] = None
                elif c.points_redeemed > 0 and need.get(cid, 0) is not None:
                    need[cid] = need.get(cid, 0) + c.points_redeemed
            elif isinstance(c, Return):
                cid = book.resolve(c.customer_id)
                if need.get(cid, 0) is not None:
                    need[cid] = need.get(cid, 0) + points_for(self.rules, max(0, c.total), c.currency) + 1
        return need

    async def _merge(self, conn: asyncpg.Connection, m: MergeCommand, now: dt.datetime) -> None:
        as_of = max(now, m.occurred_at)
        book = Book(self.rules)
        moved: list[str] = []
        if m.kind == "merged":
            book.aliases.update(await store.load_aliases(conn, {m.survivor, m.merged}))
            ids = {book.resolve(m.survivor), m.merged}
            await self._load(conn, book, ids, since=None, review_by=as_of, whole=True)
        else:
            moved = await store.load_moves(conn, m.merge_id)
            await store.load_orders(conn, book.orders, keys=moved)
            owners = {o.owner for o in book.orders.values()}
            book.aliases.update(await store.load_aliases(conn, owners | {m.survivor, m.merged}))
            ids = owners | {m.merged, book.resolve(m.survivor)}
            await self._load(conn, book, ids, since=as_of - self.rules.window, review_by=as_of,
                             whole=True)
        book.apply(m, as_of, unmerge_orders=moved if m.kind == "unmerged" else None)
        await self._write(conn, book)

    async def expire_due(self, conn: asyncpg.Connection, now: dt.datetime | None = None,
                         limit: int = 500, max_rounds: int = 1000) -> int:
        """Expire points past their date and drop tiers whose spend left the window, as of `now`
        (the clock's time by default); returns how many members were brought up to date."""
        now = now or self.clock.now()
        done = 0
        for _ in range(max_rounds):
            async with conn.transaction():
                ids = await store.due_customers(conn, now, self.rules.entry_tier, limit)
                if ids:
                    book = Book(self.rules)
                    await self._load(conn, book, set(ids), since=now - self.rules.window,
                                     review_by=now)
                    book.expire_due(now)
                    await self._write(conn, book)
            done += len(ids)
            if len(ids) < limit:
                break
        return done

    async def _write(self, conn: asyncpg.Connection, book: Book) -> None:
        await store.write(conn, book, self.encode, self.topic)
        if self._entries is not None:
            # Counted here, one labels() look-up per kind: a few per batch instead of one per entry.
            for kind, count in Counter(e.kind for e in book.entries).items():
                self._entries.labels(kind=kind).inc(count)
            for reason, count in Counter(r.reason for r in book.rejections).items():
                self._rejections.labels(reason=reason).inc(count)
            tiers = Counter(n.new_tier or "" for n in book.notices if n.kind == TIER_CHANGED)
            for tier, count in tiers.items():
                self._tiers.labels(tier=tier).inc(count)
            if book.unmatched_returns:
                self._unmatched.inc(book.unmatched_returns)


@cache
def _default_handler() -> LoyaltyHandler:
    from shared.rules import load_rules

    return LoyaltyHandler(LoyaltyRules.from_config(load_rules()), AvroCodec(SchemaRegistry.load()),
                          FixedClock(dt.datetime(1970, 1, 1, tzinfo=dt.UTC)))


async def expire_due(conn: asyncpg.Connection, now: dt.datetime, *,
                     handler: LoyaltyHandler | None = None) -> int:
    """Run expiry as of `now` on `conn` (what the leader timer does); tests call it directly."""
    return await (handler or _default_handler()).expire_due(conn, now)
