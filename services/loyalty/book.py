"""The loyalty book: loaded accounts and orders for one unit of work, changed only through the rules.

Commands (sales, returns, merges, expiry) are applied in order; the book records every entry,
notice, rejection and changed row so the store can write them in one statement per table.
Pure: the same code runs the unit/property tests (everything in memory) and the service
(state loaded per batch). Each command is applied at most once (`processed` holds its key;
a sale is keyed by its order, so an order re-sent under another event id also counts once).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import defaultdict
from dataclasses import replace
from decimal import ROUND_HALF_EVEN

from services.loyalty import rules as R
from services.loyalty.ledger import (
    NOTICE_OF_KIND,
    TIER_CHANGED,
    Account,
    Command,
    Enrol,
    Entry,
    Erase,
    Kind,
    MergeCommand,
    Notice,
    Order,
    Rejection,
    Return,
    Sale,
    derived_id,
    entry_id,
    order_key,
)

MAX_ALIAS_DEPTH = 32


def command_key(cmd: Command) -> str:
    """The idempotency key of a command: its event id, or the merge edge and direction."""
    if isinstance(cmd, MergeCommand):
        return f"{'merge' if cmd.kind == 'merged' else 'unmerge'}:{cmd.merge_id}"
    return cmd.event_id


def return_key(ret: Return) -> str:
    """A return counts once by what it returns, as a sale does by its order: a till that sends the
    same return again under a new event id must not take the member's points back twice."""
    return f"return:{order_key(ret.order_id)}:{ret.return_id}"


class LotsNotLoaded(RuntimeError):
    """Points had to be consumed from lots the store did not load (a bug in what was loaded)."""


def next_expiry(acct: Account) -> dt.datetime | None:
    """When the account's oldest points expire (what the expiry timer looks for)."""
    first = acct.lots[0].expires_at if acct.lots else None
    if acct.lots_loaded and acct.lots_after is not None:
        after = acct.lots_after[0]
        return after if first is None else min(first, after)
    if acct.lots_loaded or acct.next_expiry_at is None:
        return first
    return acct.next_expiry_at if first is None else min(first, acct.next_expiry_at)


class Book:
    """Accounts, orders and aliases in memory, with the changes made to them."""

    def __init__(self, rules: R.LoyaltyRules, *, accounts: dict[str, Account] | None = None,
                 orders: dict[str, Order] | None = None, aliases: dict[str, str] | None = None,
                 processed: set[str] | None = None) -> None:
        self.rules = rules
        self.accounts: dict[str, Account] = accounts if accounts is not None else {}
        self.orders: dict[str, Order] = orders if orders is not None else {}
        self.aliases: dict[str, str] = aliases if aliases is not None else {}
        self.processed: set[str] = processed if processed is not None else set()
        self.entries: list[Entry] = []
        self.notices: list[Notice] = []
        self.rejections: list[Rejection] = []
        self.dirty_accounts: dict[str, Account] = {}
        # Members whose account row the store read under their lock (it exists: written with an
        # UPDATE); the others are upserted.
        self.stored: set[str] = set()
        self.dirty_orders: dict[str, Order] = {}
        # Keys of dirty_orders this book created: sales of orders the store was asked for and did
        # not have (written with a plain INSERT; the others are upserted).
        self.new_orders: set[str] = set()
        self.moves: list[tuple[str, str]] = []                      # (merge_id, order_key)
        self.alias_changes: dict[str, tuple[str, str] | None] = {}  # merged -> (survivor, merge_id) | None
        self.merges: list[tuple[str, str, MergeCommand, int]] = []  # (merge_id, kind, command, points)
        self.erased: list[tuple[str, dt.datetime]] = []
        self.unmatched_returns = 0

    # -- lookups ------------------------------------------------------------------------------
    def resolve(self, customer_id: str) -> str:
        """The customer an id stands for now: a merged-away id answers its survivor."""
        current = customer_id
        for _ in range(MAX_ALIAS_DEPTH):
            nxt = self.aliases.get(current)
            if nxt is None or nxt == current:
                return current
            current = nxt
        return current

    def account(self, customer_id: str) -> Account:
        acct = self.accounts.get(customer_id)
        if acct is None:
            acct = Account(customer_id, tier=self.rules.entry_tier)
            self.accounts[customer_id] = acct
            self.dirty_accounts[customer_id] = acct
        return acct

    # -- applying commands --------------------------------------------------------------------
    def apply(self, cmd: Command, as_of: dt.datetime,
              unmerge_orders: list[str] | None = None) -> bool:
        """Apply one command as of `as_of` (>= its event time); False when it was already applied.
        A sale counts once by its order (_sale), not by its event id: a second order under a used
        event id is not a re-delivery, and its ledger entry's key refuses it (store.write)."""
        if not isinstance(cmd, Sale):
            key = command_key(cmd)
            if key in self.processed:
                return False
            self.processed.add(key)
        if isinstance(cmd, Sale):
            self._sale(cmd, as_of)
        elif isinstance(cmd, Return):
            self._return(cmd, as_of)
        elif isinstance(cmd, MergeCommand):
            if cmd.kind == "merged":
                self._merge(cmd, as_of)
            else:
                moved = unmerge_orders if unmerge_orders is not None else [
                    k for mid, k in self.moves if mid == cmd.merge_id]
                self._unmerge(cmd, as_of, moved)
        elif isinstance(cmd, Erase):
            self._erase(cmd)
        elif isinstance(cmd, Enrol):
            self.account(self.resolve(cmd.customer_id))
        return True

    def expire_due(self, as_of: dt.datetime) -> None:
        """Expire every loaded account's due lots and drop tiers whose spend left the window."""
        for acct in list(self.accounts.values()):
            if acct.merged_into is None:
                self.catch_up(acct, as_of)

    def catch_up(self, acct: Account, as_of: dt.datetime) -> None:
        """Bring an account to `as_of`: lots past expiry expire (oldest first) and a tier whose
        spend left the window is re-evaluated. Runs before every command, so outcomes do not
        depend on when the timer last ran."""
        if not acct.lots_loaded and acct.next_expiry_at is not None and acct.next_expiry_at <= as_of:
            raise LotsNotLoaded(acct.customer_id)
        if acct.lots_after is not None and acct.lots_after[0] <= as_of:
            raise LotsNotLoaded(acct.customer_id)  # a lot left out would expire now
        if acct.lots and acct.lots[0].expires_at <= as_of:
            due = R.due_lots(acct.lots, as_of)
            for lot in due:
                points = lot.remaining
                lot.remaining = 0
                acct.balance -= points
                self.dirty_orders[lot.order_key] = lot
                self._entry(acct, Kind.EXPIRE, -points, f"expire:{lot.order_key}", lot.expires_at,
                            order_id=lot.order_id, cause=lot.sale_event_id, notice_points=points)
            acct.lots = [lot for lot in acct.lots if lot.remaining > 0]
        if acct.review_at is not None and acct.review_at <= as_of and acct.spend_exact:
            # (Not exact: the window moved inside this batch; review_at stays due and the next
            # batch or expiry run, which loads the window, re-evaluates.)
            at = acct.review_at
            self._refresh_spend(acct, as_of)
            self._announce_tier(acct, cause=f"review:{at.isoformat()}", at=at)

    # -- sales and returns --------------------------------------------------------------------
    def _sale(self, sale: Sale, as_of: dt.datetime) -> None:
        key = order_key(sale.order_id)
        if key in self.orders:
            return  # the same order sent again (under any event id) counts once
        acct = self.account(self.resolve(sale.customer_id))
        self.catch_up(acct, as_of)
        # Redemption first: points earned by this sale cannot pay for it.
        if sale.points_redeemed > 0:
            reason = R.redemption_rejection(acct.balance, sale.points_redeemed)
            if reason is not None:
                self.rejections.append(Rejection(sale.event_id, acct.customer_id,
                                                 None if acct.erased else sale.order_id,
                                                 sale.points_redeemed, acct.balance, reason,
                                                 sale.occurred_at))
            else:
                self._take(acct, sale.points_redeemed, prefer=None)
                self._entry(acct, Kind.REDEEM, -sale.points_redeemed, sale.event_id,
                            sale.occurred_at, order_id=sale.order_id, cause=sale.event_id,
                            notice_points=sale.points_redeemed)
        ref = None if acct.erased else sale.order_id
        points = R.points_for(self.rules, sale.total, sale.currency)
        gross = max(0, R.to_base_minor(self.rules, sale.total, sale.currency))
        order = Order(key, ref, acct.customer_id, sale.event_id, sale.occurred_at, sale.currency,
                      sale.total, 0, gross, gross, points, 0, points,
                      sale.occurred_at + self.rules.expiry)
        self.orders[key] = order
        acct.orders[key] = order
        self.dirty_orders[key] = order
        self.new_orders.add(key)
        if order.sale_at > as_of - self.rules.window and gross > 0:
            acct.trailing_spend += gross
            exit_at = order.sale_at + self.rules.window
            acct.review_at = exit_at if acct.review_at is None else min(acct.review_at, exit_at)
        self._refresh_spend(acct, as_of)
        if points > 0:
            bisect.insort(acct.lots, order, key=Order.fifo_key)
            acct.balance += points
            self._entry(acct, Kind.EARN, points, sale.event_id, sale.occurred_at,
                        order_id=sale.order_id, expires_at=order.expires_at, cause=sale.event_id,
                        notice_points=points)
        self._announce_tier(acct, cause=sale.event_id, at=sale.occurred_at)

    def _return(self, ret: Return, as_of: dt.datetime) -> None:
        order = self.orders.get(order_key(ret.order_id))
        if order is None:
            self.unmatched_returns += 1  # a sale loyalty never saw earned nothing to take back
            return
        acct = self.account(self.resolve(order.owner))
        if order.owner != acct.customer_id:  # an order left behind by a merge follows its member
            order.owner = acct.customer_id
            acct.orders[order.order_key] = order
        self.catch_up(acct, as_of)
        refund = ret.total
        if ret.currency != order.currency:
            refund = _convert(self.rules, ret.total, ret.currency, order.currency)
        refunded_after = min(order.total, order.refunded + max(0, refund))
        points = R.reversal_points(self.rules, order, refunded_after)
        spend_after = R.net_spend_after(self.rules, order, refunded_after)
        if order.sale_at > as_of - self.rules.window:
            acct.trailing_spend -= order.spend - spend_after
        order.spend = spend_after
        order.refunded = refunded_after
        order.reversed += points
        self.dirty_orders[order.order_key] = order
        self._refresh_spend(acct, as_of)
        if points > 0:
            # Points already spent cannot be taken back; the shortfall is recorded, never negative.
            take = min(points, acct.balance)
            self._take(acct, take, prefer=order.order_key)
            detail: dict = {"return_id": ret.return_id}
            if take < points:
                detail["unrecovered"] = points - take
            self._entry(acct, Kind.REVERSE, -take, ret.event_id, ret.occurred_at,
                        order_id=order.order_id, cause=ret.event_id, notice_points=take,
                        detail=detail)
        self._announce_tier(acct, cause=ret.event_id, at=ret.occurred_at)

    # -- merges -------------------------------------------------------------------------------
    def _merge(self, m: MergeCommand, as_of: dt.datetime) -> None:
        """Fold the merged customer's points and orders into the survivor (needs both loaded
        with every order)."""
        survivor = self.account(self.resolve(m.survivor))
        merged = self.account(m.merged)
        points = 0
        if survivor.lots_after is not None or merged.lots_after is not None:
            raise LotsNotLoaded(merged.customer_id)  # merges move every lot: all must be loaded
        if merged is not survivor:
            self.catch_up(survivor, as_of)
            self.catch_up(merged, as_of)
            points = merged.balance
            for key, order in merged.orders.items():
                order.owner = survivor.customer_id
                survivor.orders[key] = order
                self.dirty_orders[key] = order
                self.moves.append((m.merge_id, key))
            survivor.lots = sorted([*survivor.lots, *merged.lots], key=Order.fifo_key)
            merged.lots, merged.orders = [], {}
            merged.balance = 0
            survivor.balance += points
            if points:
                detail = {"merge_id": m.merge_id, "reason": m.reason}
                self._entry(merged, Kind.MERGE_IN, -points, f"merge:{m.merge_id}:out", m.occurred_at,
                            detail={**detail, "to": survivor.customer_id})
                self._entry(survivor, Kind.MERGE_IN, points, f"merge:{m.merge_id}", m.occurred_at,
                            detail={**detail, "from": merged.customer_id})
            merged.merged_into = survivor.customer_id
            merged.tier = self.rules.entry_tier  # no longer a member of its own; not announced
            self._refresh_spend(merged, as_of)
            self.aliases[merged.customer_id] = survivor.customer_id
            self.alias_changes[merged.customer_id] = (survivor.customer_id, m.merge_id)
            self._refresh_spend(survivor, as_of)
            self._announce_tier(survivor, cause=f"merge:{m.merge_id}", at=m.occurred_at)
        self.merges.append((m.merge_id, "merged", m, points))

    def _unmerge(self, m: MergeCommand, as_of: dt.datetime, moved_keys: list[str]) -> None:
        """Split the merged customer back out: the orders that came in with the merge, and what
        is left of their points, move back with compensating entries; nothing is rewritten."""
        target = self.account(m.merged)
        target.merged_into = None
        self.aliases.pop(target.customer_id, None)
        self.alias_changes[target.customer_id] = None
        self._touch(target)
        orders = [self.orders[k] for k in moved_keys if k in self.orders]
        holders = sorted({o.owner for o in orders} - {target.customer_id})
        if any(self.account(h).lots_after is not None for h in [*holders, target.customer_id]):
            raise LotsNotLoaded(target.customer_id)
        for holder_id in holders:
            self.catch_up(self.account(holder_id), as_of)
        self.catch_up(target, as_of)
        moved: dict[str, int] = defaultdict(int)
        for order in orders:
            if order.owner == target.customer_id:
                continue
            holder = self.account(order.owner)
            holder.orders.pop(order.order_key, None)
            if order.remaining > 0:
                holder.lots = [x for x in holder.lots if x is not order]
                holder.balance -= order.remaining
                moved[holder.customer_id] += order.remaining
                bisect.insort(target.lots, order, key=Order.fifo_key)
            order.owner = target.customer_id
            target.orders[order.order_key] = order
            self.dirty_orders[order.order_key] = order
        total = 0
        detail = {"merge_id": m.merge_id, "reason": m.reason}
        for holder_id in sorted(moved):
            points = moved[holder_id]
            total += points
            self._entry(self.accounts[holder_id], Kind.MERGE_IN, -points,
                        f"unmerge:{m.merge_id}:{holder_id}", m.occurred_at,
                        detail={**detail, "to": target.customer_id})
        target.balance += total
        if total:
            self._entry(target, Kind.MERGE_IN, total, f"unmerge:{m.merge_id}", m.occurred_at,
                        detail={**detail, "from": sorted(moved)})
        cause = f"unmerge:{m.merge_id}"
        for acct in [*(self.accounts[h] for h in holders), target]:
            self._refresh_spend(acct, as_of)
            self._announce_tier(acct, cause=cause, at=m.occurred_at)
        self.merges.append((m.merge_id, "unmerged", m, total))

    # -- erasure ------------------------------------------------------------------------------
    def _erase(self, e: Erase) -> None:
        """Keep the amounts, drop the order references (the store nulls those already written)."""
        acct = self.account(self.resolve(e.customer_id))
        acct.erased = True
        self._touch(acct)
        for order in acct.orders.values():
            order.order_id = None
            self.dirty_orders[order.order_key] = order
        cid = acct.customer_id
        self.entries = [_without_order(x, cid) for x in self.entries]
        self.notices = [_without_order(x, cid) for x in self.notices]
        self.rejections = [_without_order(x, cid) for x in self.rejections]
        self.erased.append((cid, e.occurred_at))

    # -- internals ----------------------------------------------------------------------------
    def _touch(self, acct: Account) -> None:
        self.dirty_accounts[acct.customer_id] = acct

    def _take(self, acct: Account, points: int, prefer: str | None) -> None:
        if points <= 0:
            return
        if not acct.lots_loaded:
            raise LotsNotLoaded(acct.customer_id)
        after = acct.lots_after
        if after is not None and sum(lot.remaining for lot in acct.lots) < points:
            raise LotsNotLoaded(acct.customer_id)  # the rest is in lots left out
        for lot, _ in R.consume(acct.lots, points, prefer=prefer):
            if after is not None and lot.order_key != prefer and lot.fifo_key() >= after:
                raise LotsNotLoaded(acct.customer_id)  # an older lot left out comes first
            self.dirty_orders[lot.order_key] = lot
        acct.lots = [lot for lot in acct.lots if lot.remaining > 0]
        acct.balance -= points
        self._touch(acct)

    def _entry(self, acct: Account, kind: Kind, points: int, event_id: str, at: dt.datetime, *,
               order_id: str | None = None, expires_at: dt.datetime | None = None,
               cause: str | None = None, notice_points: int = 0,
               detail: dict | None = None) -> None:
        self._touch(acct)
        eid = entry_id(event_id, kind)
        if acct.erased:
            order_id = None
        self.entries.append(Entry(eid, acct.customer_id, kind.value, points, acct.balance, event_id,
                                  at, order_id, expires_at, detail))
        notice_kind = NOTICE_OF_KIND.get(kind)
        if notice_kind is not None and notice_points > 0:
            self.notices.append(Notice(
                eid, notice_kind, acct.customer_id, at, notice_points, acct.balance, order_id,
                cause, trailing_spend=acct.trailing_spend, currency=self.rules.base_currency,
                expires_at=expires_at))

    def _refresh_spend(self, acct: Account, as_of: dt.datetime) -> None:
        """Trailing net spend as of `as_of`: recomputed when every window order is at hand,
        else carried forward (valid until review_at, when the store loads the window)."""
        if acct.spend_exact:
            window = self.rules.window
            acct.trailing_spend = R.trailing_spend(acct.orders.values(), as_of, window)
            acct.review_at = R.next_window_exit(acct.orders.values(), as_of, window)
        acct.evaluated_at = as_of
        self._touch(acct)

    def _announce_tier(self, acct: Account, *, cause: str, at: dt.datetime) -> None:
        """Tier from trailing net spend: up at once on a sale, down when a return or the window
        takes the spend away; each change is announced once with a deterministic id."""
        tier = R.tier_for(self.rules, acct.trailing_spend).name
        if tier != acct.tier:
            old, acct.tier = acct.tier, tier
            self._touch(acct)
            self.notices.append(Notice(
                derived_id("tier", acct.customer_id, cause, old, tier), TIER_CHANGED,
                acct.customer_id, at, 0, acct.balance, None,
                None if cause.startswith("review:") else cause, old, tier,
                trailing_spend=acct.trailing_spend, currency=self.rules.base_currency))


def _without_order(item, customer_id: str):
    if item.customer_id == customer_id and item.order_id is not None:
        return replace(item, order_id=None)
    return item


def _convert(rules: R.LoyaltyRules, amount: int, source: str, target: str) -> int:
    """Minor units of `source` -> minor units of `target` through the base currency."""
    base = R.to_base_major(rules, amount, source)
    rate = rules.rates.get(target.upper())
    if not rate:
        raise R.UnknownCurrency(target)
    value = (base / rate).scaleb(R.exponent(target))
    return max(0, int(value.to_integral_value(rounding=ROUND_HALF_EVEN)))
