"""The trigger rules of CONTRACTS §5: pure functions from facts (+ the event) and a time to triggers.

Time-based rules are due-based: each trigger has a due instant derived from the facts alone
(a birthday's local midnight three days before, a cart's last activity + 60 minutes, ...) and a
lateness after which it is stale. Evaluated at `as_of`, a trigger fires when some instant of
[since, as_of] lies in [due, due + lateness], where `since` is the customer's last activity
(event clock; for birthdays the later of that and the profile's change) or `as_of` itself
(wall clock). Facts are constant between a customer's
events, so this is exactly "a scan at some moment would have fired it", whenever scans ran:
replaying the same input fires the same trigger ids.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.triggers.facts import CategoryHistory, CustomerFacts, Store
from services.triggers.money import Money, to_decimal_string, to_minor
from shared.ids import uuid5

UTC = dt.UTC
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://omnicrm/triggers")

KINDS = ("birthday_coupon", "geo_thank_you", "win_back", "abandoned_cart", "replenishment",
         "tier_upgrade", "points_expiring", "welcome", "store_event_invite", "campaign")
TIME_BASED = ("birthday_coupon", "win_back", "abandoned_cart", "replenishment", "points_expiring")


@dataclass(frozen=True, slots=True)
class Offer:
    """A coupon: amounts in minor units of `currency`."""

    code: str
    description: str
    amount: int
    min_spend: int
    currency: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Trigger:
    """A reason to talk to a customer, identified by uuid5(kind, customer_id, period)."""

    trigger_id: str
    kind: str
    customer_id: str
    period: str
    fired_at: dt.datetime
    context: Mapping[str, str] = field(default_factory=dict)
    offer: Offer | None = None
    cause_event_id: str | None = None
    occurred_at: dt.datetime | None = None  # the cause's time (event time or due time)


_NAMESPACE_BYTES = NAMESPACE.bytes


def trigger_id(kind: str, customer_id: str, period: str) -> str:
    """The deterministic id: the same trigger in the same period always has the same id."""
    return uuid5(_NAMESPACE_BYTES, f"{kind}\x1f{customer_id}\x1f{period}")


def make_trigger(kind: str, customer_id: str, period: str, fired_at: dt.datetime, *,
                 context: Mapping[str, Any] | None = None, offer: Offer | None = None,
                 cause_event_id: str | None = None,
                 occurred_at: dt.datetime | None = None) -> Trigger:
    ctx = {k: str(v) for k, v in (context or {}).items() if v is not None}
    return Trigger(trigger_id(kind, customer_id, period), kind, customer_id, period, fired_at,
                   ctx, offer, cause_event_id, occurred_at)


def offer_code(prefix: str, tid: str) -> str:
    """A coupon code derived from the trigger id, so a re-fired trigger offers the same code."""
    return f"{prefix}-{uuid.UUID(tid).hex[:10].upper()}"


# -- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleConfig:
    """The `triggers` section of rules.yaml, money in base-currency minor units."""

    money: Money = field(default_factory=Money)
    default_timezone: str = "UTC"
    tier_order: tuple[str, ...] = ("member", "silver", "gold")
    tier_benefits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    birthday_days_before: int = 3
    birthday_amount: int = 5000
    birthday_min_spend: int = 30000
    birthday_valid_days: int = 14
    geo_max_sale_age: dt.timedelta = dt.timedelta(hours=12)
    win_back_lapse: dt.timedelta = dt.timedelta(days=90)
    win_back_amount: int = 2000
    win_back_min_spend: int = 0
    win_back_valid_days: int = 30
    cart_after: dt.timedelta = dt.timedelta(minutes=60)
    cart_lateness: dt.timedelta = dt.timedelta(hours=24)
    replenishment_days_before: int = 3
    replenishment_min_purchases: int = 3
    replenishment_cycles: Mapping[str, int] = field(default_factory=dict)
    replenishment_lateness: dt.timedelta = dt.timedelta(days=7)
    points_days_before: int = 30
    points_min: int = 100
    invite_tiers: tuple[str, ...] = ("silver", "gold")
    invite_default_radius_km: float = 10.0
    event_max_age: dt.timedelta = dt.timedelta(hours=72)  # welcome, tier_upgrade

    @property
    def currency(self) -> str:
        return self.money.base

    @classmethod
    def from_rules(cls, rules: Mapping[str, Any]) -> RuleConfig:
        money = Money.from_rules(rules)
        t = rules.get("triggers") or {}
        b = t.get("birthday_coupon") or {}
        g = t.get("geo_thank_you") or {}
        w = t.get("win_back") or {}
        a = t.get("abandoned_cart") or {}
        r = t.get("replenishment") or {}
        p = t.get("points_expiring") or {}
        s = t.get("store_event_invite") or {}
        tiers = (rules.get("loyalty") or {}).get("tiers") or []
        return cls(
            money=money,
            default_timezone=str((rules.get("notifications") or {}).get("default_timezone") or "UTC"),
            tier_order=tuple(x["name"] for x in tiers) or ("member", "silver", "gold"),
            tier_benefits={x["name"]: {k: v for k, v in x.items() if k not in ("name", "min_spend")}
                           for x in tiers},
            birthday_days_before=int(b.get("days_before", 3)),
            birthday_amount=money.minor(b.get("amount", "50")),
            birthday_min_spend=money.minor(b.get("min_spend", "300")),
            birthday_valid_days=int(b.get("valid_days", 14)),
            geo_max_sale_age=dt.timedelta(hours=float(g.get("max_sale_age_hours", 12))),
            win_back_lapse=dt.timedelta(days=int(w.get("lapse_days", 90))),
            win_back_amount=money.minor(w.get("amount", "20")),
            win_back_min_spend=money.minor(w.get("min_spend", "0")),
            win_back_valid_days=int(w.get("valid_days", 30)),
            cart_after=dt.timedelta(minutes=float(a.get("after_minutes", 60))),
            cart_lateness=dt.timedelta(hours=float(a.get("max_late_hours", 24))),
            replenishment_days_before=int(r.get("days_before", 3)),
            replenishment_min_purchases=int(r.get("min_purchases_for_own_cycle", 3)),
            replenishment_cycles={str(k): int(v) for k, v in (r.get("cycles_days") or {}).items()},
            replenishment_lateness=dt.timedelta(days=float(r.get("max_late_days", 7))),
            points_days_before=int(p.get("days_before", 30)),
            points_min=int(p.get("min_points", 100)),
            invite_tiers=tuple(s.get("tiers") or ("silver", "gold")),
            invite_default_radius_km=float(s.get("default_radius_km", 10)),
            event_max_age=dt.timedelta(hours=float(t.get("max_event_age_hours", 72))),
        )

    def tier_rank(self, tier: str | None) -> int:
        return self.tier_order.index(tier) if tier in self.tier_order else -1

    def lateness(self, kind: str) -> dt.timedelta:
        """How long after its due instant a time-based trigger may still fire."""
        return {
            "birthday_coupon": dt.timedelta(days=self.birthday_days_before + 1),
            "win_back": dt.timedelta(days=self.win_back_valid_days),
            "abandoned_cart": self.cart_lateness,
            "replenishment": self.replenishment_lateness,
            "points_expiring": dt.timedelta(days=self.points_days_before),
        }[kind]


def zone(name: str | None, fallback: str = "UTC") -> ZoneInfo:
    """The IANA zone `name`, or `fallback` when absent or unknown."""
    for candidate in (name, fallback, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def customer_zone(facts: CustomerFacts, cfg: RuleConfig) -> ZoneInfo:
    """The customer's time zone, else their home store's, else the default."""
    return zone(facts.timezone or facts.home_store_tz, cfg.default_timezone)


def local_midnight(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    """The instant a local day starts (in a zone whose midnight is skipped by DST, the first instant of the day)."""
    # fold=0: a midnight skipped by DST maps to the first instant after the gap, on the same day.
    return dt.datetime.combine(day, dt.time(0), tzinfo=tz).astimezone(UTC)


def _start(as_of: dt.datetime, since: dt.datetime | None) -> dt.datetime:
    return as_of if since is None or since > as_of else since


def _is_due(due: dt.datetime, as_of: dt.datetime, since: dt.datetime | None,
            lateness: dt.timedelta) -> bool:
    return due <= as_of and due + lateness >= _start(as_of, since)


# -- time-based rules ----------------------------------------------------------------------------

def birthday_on(year: int, month: int, day: int) -> dt.date:
    """The birthday's date in `year`: 29 February is celebrated on 28 February in common years."""
    if (month, day) == (2, 29) and not _leap(year):
        return dt.date(year, 2, 28)
    return dt.date(year, month, day)


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def birthday_coupon(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
                    since: dt.datetime | None = None) -> list[Trigger]:
    """`days_before` the birthday in the customer's local date; once per birthday year."""
    md = facts.birthday_month_day
    if md is None:
        return []
    if since is not None and facts.profile_at is not None and facts.profile_at > since:
        since = facts.profile_at  # the birthday is known from the profile's change on
    tz = customer_zone(facts, cfg)
    today = as_of.astimezone(tz).date()
    first_year = _start(as_of, since).astimezone(tz).year - 1
    out: list[Trigger] = []
    for year in range(first_year, today.year + 2):
        bday = birthday_on(year, *md)
        start = bday - dt.timedelta(days=cfg.birthday_days_before)
        due = local_midnight(start, tz)
        end = local_midnight(bday + dt.timedelta(days=1), tz)
        if not (due <= as_of and end > _start(as_of, since)):
            continue
        if facts.birthday_fired_for is not None and facts.birthday_fired_for >= year:
            continue
        period = str(year)
        tid = trigger_id("birthday_coupon", facts.customer_id, period)
        expires = local_midnight(start + dt.timedelta(days=cfg.birthday_valid_days), tz)
        offer = Offer(offer_code("BDAY", tid),
                      f"Happy birthday: {to_decimal_string(cfg.birthday_amount, cfg.currency)} off "
                      f"when you spend {to_decimal_string(cfg.birthday_min_spend, cfg.currency)}",
                      cfg.birthday_amount, cfg.birthday_min_spend, cfg.currency, expires)
        out.append(make_trigger("birthday_coupon", facts.customer_id, period, as_of, context={
            "birthday": bday.isoformat(), "days_until": (bday - today).days,
            "timezone": tz.key}, offer=offer, occurred_at=due))
    return out


def win_back(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
             since: dt.datetime | None = None) -> list[Trigger]:
    """A customer with purchases and none for `lapse_days`; once per lapse (a new purchase re-arms)."""
    last = facts.last_purchase_at
    if facts.orders_count < 1 or last is None or facts.winback_fired_for == last:
        return []
    due = last + cfg.win_back_lapse
    if not _is_due(due, as_of, since, cfg.lateness("win_back")):
        return []
    period = last.astimezone(UTC).isoformat()
    tid = trigger_id("win_back", facts.customer_id, period)
    offer = Offer(offer_code("BACK", tid),
                  f"We miss you: {to_decimal_string(cfg.win_back_amount, cfg.currency)} off your next order",
                  cfg.win_back_amount, cfg.win_back_min_spend, cfg.currency,
                  as_of + dt.timedelta(days=cfg.win_back_valid_days))
    return [make_trigger("win_back", facts.customer_id, period, as_of, context={
        "days_since_last_purchase": (as_of - last).days,
        "last_purchase_date": last.astimezone(customer_zone(facts, cfg)).date().isoformat(),
        "category": facts.most_bought_category(), "orders_count": facts.orders_count,
    }, offer=offer, occurred_at=due)]


def abandoned_cart(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
                   since: dt.datetime | None = None) -> list[Trigger]:
    """A cart with activity and no sale within `after_minutes`; once per cart."""
    out: list[Trigger] = []
    for cart in sorted(facts.carts.values(), key=lambda c: c.cart_id):
        if cart.status != "open":
            continue
        due = cart.last_activity_at + cfg.cart_after
        if not _is_due(due, as_of, since, cfg.lateness("abandoned_cart")):
            continue
        out.append(make_trigger("abandoned_cart", facts.customer_id, cart.cart_id, as_of, context={
            "cart_id": cart.cart_id, "items": cart.items,
            "cart_total": to_decimal_string(cart.total, cfg.currency), "currency": cfg.currency,
            "category": cart.category, "sku": cart.sku,
            "minutes_since_activity": int((as_of - cart.last_activity_at).total_seconds() // 60),
        }, occurred_at=due))
    return out


def replenishment_cycle(history: CategoryHistory, cfg: RuleConfig) -> dt.timedelta | None:
    """The customer's own median interval after enough purchases, else the category's configured cycle."""
    if len(history.purchases) >= cfg.replenishment_min_purchases:
        gaps = [b - a for a, b in zip(history.purchases, history.purchases[1:], strict=False)]
        median = dt.timedelta(seconds=statistics.median(g.total_seconds() for g in gaps))
        if median >= dt.timedelta(days=1):
            return median
    days = cfg.replenishment_cycles.get(history.category)
    return dt.timedelta(days=days) if days else None


def replenishment_remind_at(history: CategoryHistory, cfg: RuleConfig) -> dt.datetime | None:
    """When a reminder for this category is due: `days_before` the next purchase is due."""
    cycle = replenishment_cycle(history, cfg)
    last = history.last_at
    if cycle is None or last is None:
        return None
    return last + cycle - dt.timedelta(days=cfg.replenishment_days_before)


def replenishment(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
                  since: dt.datetime | None = None) -> list[Trigger]:
    """Per category, `days_before` the next purchase is due; once per last purchase."""
    out: list[Trigger] = []
    for name in sorted(facts.categories):
        history = facts.categories[name]
        last = history.last_at
        remind = replenishment_remind_at(history, cfg)
        if remind is None or last is None or history.reminded_for == last:
            continue
        if not _is_due(remind, as_of, since, cfg.lateness("replenishment")):
            continue
        cycle = replenishment_cycle(history, cfg)
        assert cycle is not None
        due = last + cycle
        period = f"{name}:{last.astimezone(UTC).isoformat()}"
        out.append(make_trigger("replenishment", facts.customer_id, period, as_of, context={
            "category": name, "cycle_days": round(cycle.total_seconds() / 86400),
            "due_date": due.astimezone(customer_zone(facts, cfg)).date().isoformat(),
            "last_purchase_date": last.astimezone(customer_zone(facts, cfg)).date().isoformat(),
            "days_since_last_purchase": (as_of - last).days,
        }, occurred_at=remind))
    return out


def points_expiring(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
                    since: dt.datetime | None = None) -> list[Trigger]:
    """`days_before` points expire, when at least `min_points` expire in that (local) month; once per month."""
    tz = customer_zone(facts, cfg)
    months: dict[str, list] = {}
    for lot in facts.lots:
        if lot.points > 0 and lot.expires_at > _start(as_of, since):
            months.setdefault(lot.expires_at.astimezone(tz).strftime("%Y-%m"), []).append(lot)
    out: list[Trigger] = []
    for month in sorted(months):
        lots = months[month]
        points = sum(lot.points for lot in lots)
        first = min(lot.expires_at for lot in lots)
        due = first - dt.timedelta(days=cfg.points_days_before)
        if facts.points_fired_for is not None and facts.points_fired_for >= month:
            continue
        if points < cfg.points_min or not (due <= as_of and first > _start(as_of, since)):
            continue
        out.append(make_trigger("points_expiring", facts.customer_id, month, as_of, context={
            "points": points, "expires_at": first.isoformat(),
            "expires_date": first.astimezone(tz).date().isoformat(),
            "points_balance": facts.points_open,
        }, occurred_at=due))
    return out


TIME_RULES = (birthday_coupon, win_back, abandoned_cart, replenishment, points_expiring)


def time_based(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig,
               since: dt.datetime | None = None) -> list[Trigger]:
    """Every time-based rule for one customer."""
    return [t for rule in TIME_RULES for t in rule(facts, as_of, cfg, since)]


def scan_boundary(at: dt.datetime, step: dt.timedelta) -> dt.datetime:
    """The first scan boundary (a multiple of `step` since the epoch) at or after `at`."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
    seconds = int(step.total_seconds()) or 1
    elapsed = (at - epoch).total_seconds()
    return epoch + dt.timedelta(seconds=math.ceil(elapsed / seconds) * seconds)


def due_by_boundary(facts: CustomerFacts, as_of: dt.datetime, cfg: RuleConfig, since: dt.datetime,
                    step: dt.timedelta, rules: tuple = ()) -> list[Trigger]:
    """Event clock: every time-based trigger of `facts` due by `as_of`, each judged (and fired_at) at
    the first scan boundary at or after it fell due (and after `since`), capped at `as_of`.

    That is what a scan at every boundary would have fired, so the triggers, their fired_at and
    context do not depend on when scans actually ran, nor on whether the customer's next event or a
    scan found them. Marks what fired in `facts`. `rules`: only these (default every time-based rule).
    """
    chosen = rules or TIME_RULES
    fired: set[str] = set()

    def evaluate(at: dt.datetime) -> list[Trigger]:
        return [t for rule in chosen for t in rule(facts, at, cfg, since) if t.trigger_id not in fired]

    out: list[Trigger] = []
    while True:
        due = evaluate(as_of)
        if not due:
            return out
        first = min(_known_from(facts, t, as_of) for t in due)
        at = min(as_of, scan_boundary(max(first, since), step))
        now = evaluate(at) if at < as_of else due
        if not now:  # cannot happen for due-based rules; never loop on it
            at, now = as_of, due
        for t in now:
            mark_fired(facts, t)
            fired.add(t.trigger_id)
            out.append(t)


def _known_from(facts: CustomerFacts, t: Trigger, as_of: dt.datetime) -> dt.datetime:
    """When a trigger became due and knowable: a birthday only from the profile that told it."""
    at = t.occurred_at or as_of
    if t.kind == "birthday_coupon" and facts.profile_at is not None and facts.profile_at > at:
        return facts.profile_at
    return at


def mark_fired(facts: CustomerFacts, trigger: Trigger) -> None:
    """Remember in the facts what a time-based trigger decided, so later scans skip it."""
    if trigger.kind == "win_back":
        facts.winback_fired_for = facts.last_purchase_at
    elif trigger.kind == "birthday_coupon":
        facts.birthday_fired_for = max(facts.birthday_fired_for or 0, int(trigger.period))
    elif trigger.kind == "points_expiring":
        facts.points_fired_for = max(facts.points_fired_for or "", trigger.period)
    elif trigger.kind == "abandoned_cart":
        cart = facts.carts.get(trigger.period)
        if cart is not None:
            cart.status = "abandoned"
    elif trigger.kind == "replenishment":
        history = facts.categories.get(trigger.context.get("category", ""))
        if history is not None:
            history.reminded_for = history.last_at


# -- event-driven rules ------------------------------------------------------------------------

def _fresh(occurred_at: dt.datetime, now: dt.datetime, max_age: dt.timedelta) -> bool:
    return now - occurred_at <= max_age


def geo_thank_you(facts: CustomerFacts, event: Mapping[str, Any], now: dt.datetime,
                  cfg: RuleConfig, store: Store | None) -> list[Trigger]:
    """After an in-store sale, naming the store; once per customer, store and local day; never for stale sales."""
    props = event.get("properties") or {}
    store_id = event.get("store_id")
    if event["type"] != "sale" or not store_id or props.get("channel") == "online":
        return []
    at: dt.datetime = event["occurred_at"]
    if not _fresh(at, now, cfg.geo_max_sale_age):
        return []
    if store is not None and store.timezone:
        local = at.astimezone(zone(store.timezone))
    else:
        local = at.astimezone(dt.timezone(dt.timedelta(minutes=event.get("utc_offset_minutes") or 0)))
    day = local.date().isoformat()
    return [make_trigger("geo_thank_you", facts.customer_id, f"{store_id}:{day}", now, context={
        "store_id": store_id, "store_name": store.name if store else store_id,
        "store_city": store.city if store else None, "visit_date": day,
        "order_id": props.get("order_id"),
    }, cause_event_id=event["event_id"], occurred_at=at)]


def welcome(before: CustomerFacts, event: Mapping[str, Any], now: dt.datetime,
            cfg: RuleConfig, store: Store | None = None) -> list[Trigger]:
    """On the customer's first signup or first purchase; once per customer."""
    kind = event["type"]
    if kind == "signup":
        if before.signed_up_at is not None and before.signed_up_at < event["occurred_at"]:
            return []
    elif kind == "sale":
        if before.orders_count > 0 or before.signed_up_at is not None:
            return []
    else:
        return []
    if not _fresh(event["occurred_at"], now, cfg.event_max_age):
        return []
    return [make_trigger("welcome", before.customer_id, "welcome", now, context={
        "via": "signup" if kind == "signup" else "purchase",
        "store_name": store.name if store else None,
    }, cause_event_id=event["event_id"], occurred_at=event["occurred_at"])]


def tier_upgrade(facts: CustomerFacts, event: Mapping[str, Any], now: dt.datetime,
                 cfg: RuleConfig) -> list[Trigger]:
    """When loyalty moves the customer up a tier; once per tier change."""
    if event["kind"] != "tier_changed":
        return []
    new, old = event.get("new_tier"), event.get("old_tier")
    if cfg.tier_rank(new) <= cfg.tier_rank(old) or not _fresh(event["occurred_at"], now, cfg.event_max_age):
        return []
    benefits = cfg.tier_benefits.get(new or "", {})
    currency = event.get("currency") or cfg.currency
    return [make_trigger("tier_upgrade", facts.customer_id, f"{new}:{event['event_id']}", now, context={
        "tier": new, "old_tier": old,
        "trailing_spend": to_decimal_string(int(event.get("trailing_spend") or 0), currency),
        "currency": currency,
        "discount_percent": benefits.get("discount_percent"),
        "personal_shopper": "true" if benefits.get("personal_shopper") else None,
    }, cause_event_id=event["event_id"], occurred_at=event["occurred_at"])]


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres."""
    r = 6371.0088
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(min(1.0, math.sqrt(a)))


def distance_to_store_km(facts: CustomerFacts, store: Store) -> float | None:
    """The nearer of the customer's address and home store to `store`, if either has a location."""
    if store.lat is None or store.lon is None:
        return None
    options = []
    if facts.lat is not None and facts.lon is not None:
        options.append(haversine_km(facts.lat, facts.lon, store.lat, store.lon))
    if facts.home_store_lat is not None and facts.home_store_lon is not None:
        options.append(haversine_km(facts.home_store_lat, facts.home_store_lon, store.lat, store.lon))
    if facts.home_store_id == store.store_id:
        options.append(0.0)
    return min(options) if options else None


def store_event_invite(facts: CustomerFacts, event: Mapping[str, Any], store: Store,
                       now: dt.datetime, cfg: RuleConfig) -> list[Trigger]:
    """Silver or gold customers whose home store or address is within `radius_km`; once per store event."""
    props = event.get("properties") or {}
    starts_at: dt.datetime = props["starts_at"]
    radius = float(props.get("radius_km") if props.get("radius_km") is not None else cfg.invite_default_radius_km)
    if facts.tier not in cfg.invite_tiers or starts_at <= now:
        return []
    distance = distance_to_store_km(facts, store)
    if distance is None or distance > radius:
        return []
    tz = zone(store.timezone)
    return [make_trigger("store_event_invite", facts.customer_id, event["event_id"], now, context={
        "store_id": store.store_id, "store_name": store.name, "store_city": store.city,
        "event_title": props.get("title"), "starts_at": starts_at.isoformat(),
        "starts_local": starts_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
        "distance_km": f"{distance:.1f}", "radius_km": f"{radius:g}", "tier": facts.tier,
    }, cause_event_id=event["event_id"], occurred_at=event["occurred_at"])]


def campaign(customer_id: str, name: str, message: Mapping[str, Any], now: dt.datetime,
             cfg: RuleConfig) -> Trigger:
    """One member's trigger of a named campaign (once per campaign name)."""
    tid = trigger_id("campaign", customer_id, name)
    offer = None
    spec = message.get("offer")
    if spec:
        currency = str(spec.get("currency") or cfg.currency).upper()
        expires = spec.get("expires_at")
        if isinstance(expires, str):
            expires = dt.datetime.fromisoformat(expires)
        if expires is None:
            expires = now + dt.timedelta(days=int(spec.get("valid_days") or 14))
        offer = Offer(str(spec.get("code") or offer_code("CAMP", tid)),
                      str(spec.get("description") or name),
                      to_minor(spec.get("amount", "0"), currency),
                      to_minor(spec.get("min_spend", "0"), currency), currency,
                      expires.astimezone(UTC))
    context = {"campaign": name, **{k: v for k, v in (message.get("context") or {}).items()}}
    for key in ("title", "text"):
        if message.get(key):
            context[key] = message[key]
    return make_trigger("campaign", customer_id, name, now, context=context, offer=offer)
