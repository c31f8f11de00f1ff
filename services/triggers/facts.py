"""Customer facts, the read model trigger rules look at, and the folding of events into them (no I/O).

Profile fields come from `identity.profiles.v1`; activity (purchases, carts, categories, tier,
points lots) is folded from `identity.events.v1` and `loyalty.events.v1`. Activity can always be
re-derived by folding a customer's stored events again from `reset_activity(facts)`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace
from typing import Any

from services.triggers.money import Money

UTC = dt.UTC
_BIRTHDAY = re.compile(r"^(?:(\d{4})|-)-(\d{2})-(\d{2})$")


@dataclass(slots=True)
class Store:
    """A store from `ingest.stores.v1`."""

    store_id: str
    name: str
    timezone: str | None = None
    country: str | None = None
    city: str | None = None
    lat: float | None = None
    lon: float | None = None
    currency: str | None = None


@dataclass(slots=True)
class Cart:
    """An open cart: its last activity decides when it counts as abandoned."""

    cart_id: str
    last_activity_at: dt.datetime
    items: int = 0
    total: int = 0  # base-currency minor units, best known
    category: str | None = None
    sku: str | None = None
    status: str = "open"  # open | converted | emptied | abandoned


@dataclass(slots=True)
class CategoryHistory:
    """Purchases of one category: one timestamp per order, ascending."""

    category: str
    purchases: list[dt.datetime] = field(default_factory=list)
    quantity: int = 0
    reminded_for: dt.datetime | None = None  # the last purchase a replenishment reminder went out for

    @property
    def last_at(self) -> dt.datetime | None:
        return self.purchases[-1] if self.purchases else None


@dataclass(slots=True)
class PointLot:
    """Points earned together that expire together (oldest are spent first)."""

    lot_id: str
    points: int
    expires_at: dt.datetime
    order_id: str | None = None


@dataclass(slots=True)
class CustomerFacts:
    """Everything the rules know about one customer."""

    customer_id: str
    # -- from identity.profiles.v1
    birthday: str | None = None
    locale: str | None = None
    timezone: str | None = None
    home_store_id: str | None = None
    city: str | None = None
    country: str | None = None
    lat: float | None = None
    lon: float | None = None
    tags: list[str] = field(default_factory=list)
    consents: dict[str, str] = field(default_factory=dict)
    preferred_channel: str | None = None
    profile_version: int = -1
    profile_at: dt.datetime | None = None  # event time of the profile's last change
    # -- from events
    last_event_at: dt.datetime | None = None  # event time of the last activity folded in
    first_seen_at: dt.datetime | None = None
    signed_up_at: dt.datetime | None = None
    first_purchase_at: dt.datetime | None = None
    last_purchase_at: dt.datetime | None = None
    orders_count: int = 0
    lifetime_spend: int = 0  # base-currency minor units, net of returns
    tier: str = "member"
    tier_at: dt.datetime | None = None
    carts: dict[str, Cart] = field(default_factory=dict)
    categories: dict[str, CategoryHistory] = field(default_factory=dict)
    lots: list[PointLot] = field(default_factory=list)
    # -- marks that let scans skip what was already decided
    winback_fired_for: dt.datetime | None = None
    birthday_fired_for: int | None = None
    points_fired_for: str | None = None
    # -- joined, not stored: the home store's time zone and location
    home_store_tz: str | None = None
    home_store_lat: float | None = None
    home_store_lon: float | None = None
    # -- not a fact: the rows these facts were read from (store.load_facts), so store.save_facts
    # writes only what changed; None when unknown (every row is written).
    stored: Any = field(default=None, repr=False, compare=False)

    @property
    def birthday_month_day(self) -> tuple[int, int] | None:
        return parse_birthday(self.birthday)

    @property
    def consented_channels(self) -> list[str]:
        return sorted(c for c, v in self.consents.items() if v == "opted_in")

    @property
    def points_open(self) -> int:
        return sum(lot.points for lot in self.lots)

    def most_bought_category(self) -> str | None:
        """The category bought most (quantity, then orders, then name for a stable tie-break)."""
        if not self.categories:
            return None
        best = min(self.categories.values(),
                   key=lambda h: (-h.quantity, -len(h.purchases), h.category))
        return best.category


def parse_birthday(value: str | None) -> tuple[int, int] | None:
    """(month, day) of `YYYY-MM-DD` or `--MM-DD`; None when absent or not a calendar day."""
    if not value:
        return None
    m = _BIRTHDAY.match(value.strip())
    if not m:
        return None
    month, day = int(m.group(2)), int(m.group(3))
    try:
        dt.date(2000, month, day)  # a leap year, so 29 February is valid
    except ValueError:
        return None
    return month, day


# -- profiles --------------------------------------------------------------------------------

def apply_profile(facts: CustomerFacts, profile: dict[str, Any]) -> CustomerFacts:
    """Take the profile part from the latest golden profile (an older version changes nothing)."""
    version = int(profile.get("version") or 0)
    if version < facts.profile_version:
        return facts
    address = profile.get("address") or {}
    facts.birthday = profile.get("birthday")
    facts.locale = profile.get("locale")
    facts.timezone = profile.get("timezone")
    facts.home_store_id = profile.get("home_store_id")
    facts.city = address.get("city")
    facts.country = address.get("country")
    facts.lat = address.get("lat")
    facts.lon = address.get("lon")
    facts.tags = sorted(set(profile.get("tags") or []))
    facts.consents = dict(profile.get("consents") or {})
    facts.preferred_channel = profile.get("preferred_channel")
    facts.profile_version = version
    if profile.get("updated_at") is not None:
        facts.profile_at = profile["updated_at"]
    return facts


def reset_activity(facts: CustomerFacts) -> CustomerFacts:
    """The same customer with only the profile part, ready to fold its events again."""
    return replace(facts, first_seen_at=None, signed_up_at=None, first_purchase_at=None,
                   last_purchase_at=None, orders_count=0, lifetime_spend=0, tier="member",
                   tier_at=None, carts={}, categories={}, lots=[])


# -- identity events ---------------------------------------------------------------------------

def _min(a: dt.datetime | None, b: dt.datetime) -> dt.datetime:
    return b if a is None or b < a else a


def _max(a: dt.datetime | None, b: dt.datetime) -> dt.datetime:
    return b if a is None or b > a else a


def apply_event(facts: CustomerFacts, event: dict[str, Any], money: Money) -> CustomerFacts:
    """Fold one `omnicrm.ingest.Event` of this customer into its facts."""
    at: dt.datetime = event["occurred_at"]
    props = event.get("properties") or {}
    kind = event["type"]
    facts.first_seen_at = _min(facts.first_seen_at, at)
    facts.last_event_at = _max(facts.last_event_at, at)
    if kind == "sale":
        _apply_sale(facts, at, props, money)
    elif kind == "return":
        amount = money.to_base(int(props.get("total") or 0), props.get("currency"))
        if amount is not None:
            facts.lifetime_spend -= amount
    elif kind in ("cart_add", "cart_remove", "checkout_started"):
        _apply_cart(facts, kind, at, props, money)
    elif kind == "signup":
        facts.signed_up_at = _min(facts.signed_up_at, at)
    return facts


def _apply_sale(facts: CustomerFacts, at: dt.datetime, props: dict[str, Any], money: Money) -> None:
    facts.orders_count += 1
    facts.first_purchase_at = _min(facts.first_purchase_at, at)
    facts.last_purchase_at = _max(facts.last_purchase_at, at)
    amount = money.to_base(int(props.get("total") or 0), props.get("currency"))
    if amount is not None:
        facts.lifetime_spend += amount
    bought: dict[str, int] = {}
    for line in props.get("lines") or []:
        category = line.get("category")
        if category:
            bought[category] = bought.get(category, 0) + int(line.get("quantity") or 1)
    for category, quantity in bought.items():
        history = facts.categories.setdefault(category, CategoryHistory(category))
        if at not in history.purchases:
            history.purchases.append(at)
            history.purchases.sort()
        history.quantity += quantity
    # A sale closes the customer's open carts (a sale cannot name the cart it came from);
    # whether a cart was abandoned first was decided before this fold, at its due time.
    for cart in facts.carts.values():
        if cart.status == "open" and cart.last_activity_at <= at:
            cart.status = "converted"


def _apply_cart(facts: CustomerFacts, kind: str, at: dt.datetime, props: dict[str, Any],
                money: Money) -> None:
    cart_id = props.get("cart_id")
    if not cart_id:
        return
    cart = facts.carts.get(cart_id)
    if cart is None:
        cart = facts.carts[cart_id] = Cart(cart_id, at)
    elif cart.status in ("converted", "emptied"):
        cart.status = "open"  # activity on a closed cart opens it again
        cart.items, cart.total = 0, 0
    cart.last_activity_at = _max(cart.last_activity_at, at)
    quantity = int(props.get("quantity") or 1)
    if kind == "cart_add":
        cart.items += quantity
        price = props.get("unit_price")
        if price is not None:
            value = money.to_base(int(price) * quantity, props.get("currency"))
            cart.total += value or 0
        cart.category = props.get("category") or cart.category
        cart.sku = props.get("sku") or cart.sku
    elif kind == "cart_remove":
        cart.items = max(0, cart.items - quantity)
        price = props.get("unit_price")
        if price is not None:
            cart.total = max(0, cart.total - (money.to_base(int(price) * quantity, props.get("currency")) or 0))
        if cart.items == 0 and cart.status == "open":
            cart.status = "emptied"
    else:  # checkout_started
        total = props.get("total")
        if total is not None:
            cart.total = money.to_base(int(total), props.get("currency")) or cart.total


def purchase_amount(event: dict[str, Any], money: Money) -> int | None:
    """Signed base-currency amount a sale (+) or return (-) adds to spend; None for other events."""
    kind = event["type"]
    if kind not in ("sale", "return"):
        return None
    props = event.get("properties") or {}
    amount = money.to_base(int(props.get("total") or 0), props.get("currency"))
    if amount is None:
        return None
    return amount if kind == "sale" else -amount


# -- loyalty events ----------------------------------------------------------------------------

def apply_loyalty(facts: CustomerFacts, event: dict[str, Any]) -> CustomerFacts:
    """Fold one `omnicrm.loyalty.LoyaltyEvent`: tier, and points lots spent oldest first."""
    kind = event["kind"]
    at: dt.datetime = event["occurred_at"]
    points = int(event.get("points") or 0)
    if kind == "tier_changed":
        if facts.tier_at is None or at >= facts.tier_at:
            facts.tier = event.get("new_tier") or facts.tier
            facts.tier_at = at
        return facts
    if kind == "points_earned":
        if event.get("expires_at") is not None and points > 0 and \
                all(lot.lot_id != event["event_id"] for lot in facts.lots):
            facts.lots.append(PointLot(event["event_id"], points, event["expires_at"],
                                       event.get("order_id")))
            facts.lots.sort(key=lambda lot: (lot.expires_at, lot.lot_id))
    elif kind == "points_redeemed":
        _spend(facts.lots, points)
    elif kind == "points_reversed":
        same_order = [lot for lot in facts.lots if lot.order_id and lot.order_id == event.get("order_id")]
        rest = _spend(same_order, points)
        _spend(facts.lots, rest)
    elif kind == "points_expired":
        due = [lot for lot in facts.lots if lot.expires_at <= at]
        rest = _spend(due, points)
        _spend(facts.lots, rest)
    # The ledger's balance is the truth: never hold more open points than it.
    balance = event.get("balance")
    if balance is not None and facts.points_open > int(balance):
        _spend(facts.lots, facts.points_open - int(balance))
    facts.lots = [lot for lot in facts.lots if lot.points > 0]
    return facts


def _spend(lots: list[PointLot], points: int) -> int:
    """Take `points` from `lots`, earliest expiry first; returns what could not be taken."""
    for lot in sorted(lots, key=lambda lot: (lot.expires_at, lot.lot_id)):
        if points <= 0:
            break
        take = min(lot.points, points)
        lot.points -= take
        points -= take
    return max(points, 0)


# -- merges ------------------------------------------------------------------------------------

TIER_ORDER = ("member", "silver", "gold")


def merge_facts(survivor: CustomerFacts, merged: CustomerFacts,
                tier_order: tuple[str, ...] = TIER_ORDER) -> CustomerFacts:
    """The survivor holding both customers' activity (its own profile part wins)."""
    s, m = survivor, merged
    s.first_seen_at = _opt_min(s.first_seen_at, m.first_seen_at)
    s.last_event_at = _opt_max(s.last_event_at, m.last_event_at)
    s.signed_up_at = _opt_min(s.signed_up_at, m.signed_up_at)
    s.first_purchase_at = _opt_min(s.first_purchase_at, m.first_purchase_at)
    s.last_purchase_at = _opt_max(s.last_purchase_at, m.last_purchase_at)
    s.orders_count += m.orders_count
    s.lifetime_spend += m.lifetime_spend
    rank = {t: i for i, t in enumerate(tier_order)}
    if rank.get(m.tier, 0) > rank.get(s.tier, 0):
        s.tier, s.tier_at = m.tier, m.tier_at
    for cart_id, cart in m.carts.items():
        s.carts.setdefault(cart_id, cart)
    for name, history in m.categories.items():
        mine = s.categories.setdefault(name, CategoryHistory(name))
        mine.purchases = sorted(set(mine.purchases) | set(history.purchases))
        mine.quantity += history.quantity
    known = {lot.lot_id for lot in s.lots}
    s.lots = sorted([*s.lots, *(lot for lot in m.lots if lot.lot_id not in known)],
                    key=lambda lot: (lot.expires_at, lot.lot_id))
    for field_name in ("birthday", "locale", "timezone", "home_store_id", "city", "country",
                       "lat", "lon", "preferred_channel"):
        if getattr(s, field_name) is None:
            setattr(s, field_name, getattr(m, field_name))
    s.tags = sorted(set(s.tags) | set(m.tags))
    return s


def _opt_min(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    return b if a is None else (a if b is None else min(a, b))


def _opt_max(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    return b if a is None else (a if b is None else max(a, b))
