"""Domain types of the loyalty ledger: accounts, point lots, orders, ledger entries, outgoing notices.

Plain dataclasses, no I/O. Points are integers; money is integer minor units (spend in the base
currency, order totals in the order's own currency).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

# Namespace of every id loyalty derives (ledger entries, loyalty events), so re-runs give the same ids.
LOYALTY_NAMESPACE = uuid.UUID("6f1c1b0e-7a55-5d1e-9a43-0c0ffee10a17")


class Kind(StrEnum):
    """Ledger entry kinds (CONTRACTS §3)."""

    EARN = "earn"
    REDEEM = "redeem"
    REVERSE = "reverse"
    EXPIRE = "expire"
    MERGE_IN = "merge_in"
    ADJUST = "adjust"


# Loyalty event kind announced for each ledger kind (merges and adjustments announce nothing).
NOTICE_OF_KIND: dict[str, str] = {
    Kind.EARN: "points_earned",
    Kind.REDEEM: "points_redeemed",
    Kind.REVERSE: "points_reversed",
    Kind.EXPIRE: "points_expired",
}
TIER_CHANGED = "tier_changed"


_NAMESPACE_BYTES = LOYALTY_NAMESPACE.bytes
# uuid5's variant bits on the hex digit they land in (its two high bits become 10).
_VARIANT_DIGIT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def derived_id(*parts: str) -> str:
    """A deterministic id (uuid5) from the parts that identify a derived fact.

    Same value as `uuid.uuid5(LOYALTY_NAMESPACE, "|".join(parts))`, made from the SHA-1 hex digest
    directly (version digit 5, variant digit looked up): this runs for every ledger entry."""
    h = hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode(), usedforsecurity=False).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


def entry_id(event_id: str, kind: str) -> str:
    """Ledger entries are unique per (event_id, kind); their id is derived from exactly that."""
    return derived_id("entry", event_id, kind)


@dataclass(slots=True)
class Order:
    """A sale as loyalty remembers it: the points it earned (a lot, consumed oldest-expiry first
    and expiring together) and its net spend, both reduced by returns."""

    order_key: str
    order_id: str | None
    owner: str
    sale_event_id: str
    sale_at: dt.datetime
    currency: str
    total: int            # minor units of `currency`, as paid
    refunded: int         # minor units of `currency`, cumulative over returns
    gross_spend: int      # base-currency minor units the sale added
    spend: int            # net base-currency minor units still counted (gross minus returns)
    earned: int           # points the sale earned
    reversed: int         # points reversed by returns so far
    remaining: int        # points of this lot not yet redeemed, reversed, expired or moved
    expires_at: dt.datetime

    def fifo_key(self) -> tuple[dt.datetime, str]:
        return (self.expires_at, self.order_key)


@dataclass(slots=True)
class Account:
    """A member's derived state: balance, tier, open lots and the orders that count for the tier."""

    customer_id: str
    balance: int = 0
    tier: str = "member"
    lots: list[Order] = field(default_factory=list)      # orders with points left, FIFO order
    # False when only the lots created in this unit of work are in `lots` (the stored ones were
    # not needed: no redemption, return or expiry); next_expiry_at covers the stored ones then.
    lots_loaded: bool = True
    next_expiry_at: dt.datetime | None = None
    # With lots_loaded: None when every open lot is in `lots`; else the FIFO key of the first
    # stored lot left out (only the oldest lots, enough for the points this unit of work may
    # consume, were loaded). Consuming or expiring past it raises LotsNotLoaded (book.py).
    lots_after: tuple[dt.datetime, str] | None = None
    orders: dict[str, Order] = field(default_factory=dict)
    # True when `orders` holds every order in the tier window, so spend can be recomputed;
    # otherwise trailing_spend is carried forward (valid until review_at).
    spend_exact: bool = True
    review_at: dt.datetime | None = None                 # next time spend leaves the window
    merged_into: str | None = None
    erased: bool = False
    trailing_spend: int = 0
    evaluated_at: dt.datetime | None = None


# Entries, notices and commands are values, never changed after construction (dataclasses.replace
# makes changed copies); they are not declared frozen because a frozen dataclass's __init__ costs
# several times as much, and a few of them are built for every event.
@dataclass(slots=True)
class Entry:
    """One append-only ledger line; `points` is signed (earn and merge-in positive)."""

    entry_id: str
    customer_id: str
    kind: str
    points: int
    balance_after: int
    event_id: str
    occurred_at: dt.datetime
    order_id: str | None = None
    expires_at: dt.datetime | None = None
    detail: dict[str, Any] | None = None


@dataclass(slots=True)
class Notice:
    """A loyalty.events.v1 record to publish (omnicrm.loyalty.LoyaltyEvent)."""

    event_id: str
    kind: str
    customer_id: str
    occurred_at: dt.datetime
    points: int = 0
    balance: int = 0
    order_id: str | None = None
    cause_event_id: str | None = None
    old_tier: str | None = None
    new_tier: str | None = None
    trailing_spend: int = 0
    currency: str = "USD"
    expires_at: dt.datetime | None = None

    def as_record(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id, "kind": self.kind, "customer_id": self.customer_id,
            "occurred_at": self.occurred_at, "points": self.points, "balance": self.balance,
            "order_id": self.order_id, "cause_event_id": self.cause_event_id,
            "old_tier": self.old_tier, "new_tier": self.new_tier,
            "trailing_spend": self.trailing_spend, "currency": self.currency,
            "expires_at": self.expires_at,
        }


@dataclass(slots=True)
class Rejection:
    """A redemption that was not honoured, recorded with its reason (never silently clamped)."""

    event_id: str
    customer_id: str
    order_id: str | None
    requested: int
    balance: int
    reason: str
    occurred_at: dt.datetime


# -- commands: what the input topics ask for -------------------------------------------------------

@dataclass(slots=True)
class Sale:
    event_id: str
    customer_id: str
    occurred_at: dt.datetime
    order_id: str
    currency: str
    total: int
    points_redeemed: int = 0


@dataclass(slots=True)
class Return:
    event_id: str
    customer_id: str
    occurred_at: dt.datetime
    order_id: str
    return_id: str
    currency: str
    total: int


@dataclass(slots=True)
class Enrol:
    """A signup (or any first contact): the member exists with an empty account."""

    event_id: str
    customer_id: str
    occurred_at: dt.datetime


@dataclass(slots=True)
class Erase:
    event_id: str
    customer_id: str
    occurred_at: dt.datetime


@dataclass(slots=True)
class MergeCommand:
    merge_id: str
    kind: str  # merged | unmerged
    survivor: str
    merged: str
    reason: str
    cause_event_id: str | None
    occurred_at: dt.datetime


Command = Sale | Return | Enrol | Erase | MergeCommand


@lru_cache(maxsize=8192)  # asked several times per sale and return of a batch (plan, book)
def order_key(order_id: str) -> str:
    """Orders are found by a digest of their id, so an erased member's order refs can be dropped
    while a later return still finds what the order earned."""
    return hashlib.blake2b(order_id.encode(), digest_size=16).hexdigest()
