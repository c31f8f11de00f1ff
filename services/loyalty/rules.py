"""Pure loyalty rules (CONTRACTS §5): currency conversion, earning, redemption checks, reversal
amounts, FIFO consumption and expiry of lots, and tiers on trailing net spend.

No I/O: values in, decisions out. Amounts are integer minor units; conversion uses Decimal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from babel.numbers import get_currency_precision, is_currency

from services.loyalty.ledger import Order

REJECT_INSUFFICIENT = "insufficient_points"


class UnknownCurrency(ValueError):
    """A currency with no configured exchange rate: points cannot be computed."""


@lru_cache(maxsize=256)
def exponent(currency: str) -> int:
    """Digits after the decimal point of `currency` (USD 2, JPY 0, BHD 3), from Babel's CLDR data."""
    code = currency.upper()
    if not is_currency(code):  # Babel answers 2 digits for any string; refuse what is not ISO 4217
        raise UnknownCurrency(currency)
    return int(get_currency_precision(code))


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    min_spend: int                 # base-currency minor units
    discount_percent: int = 0
    personal_shopper: bool = False


@dataclass(frozen=True)
class LoyaltyRules:
    """The loyalty section of rules.yaml, parsed once into exact values."""

    base_currency: str
    rates: Mapping[str, Decimal]   # units of base currency per unit of each currency
    points_per_unit: Decimal
    redemption_points: int
    redemption_value: Decimal
    expiry: dt.timedelta
    window: dt.timedelta
    tiers: tuple[Tier, ...]        # ascending by min_spend; tiers[0] is the entry tier

    @classmethod
    def from_config(cls, rules: Mapping[str, Any], base_currency: str | None = None) -> LoyaltyRules:
        """Build from the rules dict; `base_currency` (OMNICRM_BASE_CURRENCY) re-bases the rate table."""
        currency = rules.get("currency", {})
        table_base = str(currency.get("base", "USD")).upper()
        base = (base_currency or table_base).upper()
        raw = {str(k).upper(): Decimal(str(v)) for k, v in currency.get("exchange_rates", {}).items()}
        raw.setdefault(table_base, Decimal(1))
        if base not in raw:
            raise ValueError(f"base currency {base} has no exchange rate in rules.yaml")
        # Rates are written against the table's base; divide through to express them in `base`.
        rates = {code: rate / raw[base] for code, rate in raw.items()}
        loyalty = rules.get("loyalty", {})
        exp = exponent(base)
        tiers = tuple(sorted(
            (Tier(str(t["name"]), _to_minor(Decimal(str(t.get("min_spend", "0"))), exp),
                  int(t.get("discount_percent", 0) or 0), bool(t.get("personal_shopper", False)))
             for t in loyalty.get("tiers", [{"name": "member", "min_spend": "0"}])),
            key=lambda t: t.min_spend))
        return cls(
            base_currency=base, rates=rates,
            points_per_unit=Decimal(str(loyalty.get("points_per_unit", 1))),
            redemption_points=int(loyalty.get("redemption_points", 100)),
            redemption_value=Decimal(str(loyalty.get("redemption_value", "10"))),
            expiry=dt.timedelta(days=int(loyalty.get("points_expiry_days", 365))),
            window=dt.timedelta(days=int(loyalty.get("tier_window_days", 365))),
            tiers=tiers,
        )

    @property
    def entry_tier(self) -> str:
        return self.tiers[0].name


def _to_minor(major: Decimal, exp: int) -> int:
    return int(major.scaleb(exp).to_integral_value(rounding=ROUND_HALF_EVEN))


def to_base_major(rules: LoyaltyRules, amount_minor: int, currency: str) -> Decimal:
    """An amount in minor units of `currency` as an exact Decimal of base-currency units."""
    code = currency.upper()
    rate = rules.rates.get(code)
    if rate is None:
        raise UnknownCurrency(code)
    try:
        return Decimal(amount_minor).scaleb(-exponent(code)) * rate
    except InvalidOperation as exc:
        raise UnknownCurrency(code) from exc


def to_base_minor(rules: LoyaltyRules, amount_minor: int, currency: str) -> int:
    """Minor units of `currency` -> minor units of the base currency (banker's rounding)."""
    if currency.upper() == rules.base_currency:
        return amount_minor
    return _to_minor(to_base_major(rules, amount_minor, currency), exponent(rules.base_currency))


def points_for(rules: LoyaltyRules, amount_minor: int, currency: str) -> int:
    """Points an amount earns: points_per_unit per whole base unit, floored per order."""
    if amount_minor <= 0:
        return 0
    ppu = rules.points_per_unit
    if currency == rules.base_currency and ppu == ppu.to_integral_value():
        return amount_minor * int(ppu) // 10 ** exponent(currency)  # exact in integers
    value = to_base_major(rules, amount_minor, currency) * ppu
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def redemption_rejection(balance: int, requested: int) -> str | None:
    """Why a redemption cannot be honoured, or None: a till never spends points the member lacks."""
    if requested > balance:
        return REJECT_INSUFFICIENT
    return None


def reversal_points(rules: LoyaltyRules, order: Order, refunded_after: int) -> int:
    """Points a return reverses: the cumulative refund's points minus those already reversed,
    never beyond what the order earned; a full refund reverses exactly what it earned."""
    if refunded_after >= order.total:
        target = order.earned
    else:
        target = min(order.earned, points_for(rules, refunded_after, order.currency))
    return max(0, target - order.reversed)


def net_spend_after(rules: LoyaltyRules, order: Order, refunded_after: int) -> int:
    """The order's net base spend once `refunded_after` is refunded (0 for a full refund, never below)."""
    if refunded_after >= order.total:
        return 0
    removed = min(order.gross_spend, to_base_minor(rules, refunded_after, order.currency))
    return order.gross_spend - removed


def consume(lots: list[Order], points: int, prefer: str | None = None) -> list[tuple[Order, int]]:
    """Take `points` from open lots: the order `prefer` first (a return takes back its own order's
    points), then oldest expiry first. Mutates `remaining`; returns what was taken from each lot."""
    taken: list[tuple[Order, int]] = []
    need = points
    ordered: Iterable[Order] = lots
    if prefer is not None:
        ordered = sorted(lots, key=lambda o: (o.order_key != prefer, o.expires_at, o.order_key))
    for lot in ordered:
        if need <= 0:
            break
        take = min(lot.remaining, need)
        if take > 0:
            lot.remaining -= take
            need -= take
            taken.append((lot, take))
    if need > 0:
        raise ValueError("consume() asked for more points than the lots hold")
    return taken


def due_lots(lots: Iterable[Order], as_of: dt.datetime) -> list[Order]:
    """Open lots whose expiry has arrived, oldest first."""
    return sorted((o for o in lots if o.remaining > 0 and o.expires_at <= as_of), key=Order.fifo_key)


def trailing_spend(orders: Iterable[Order], as_of: dt.datetime, window: dt.timedelta) -> int:
    """Net spend of the orders placed in the window ending at `as_of` (base minor units)."""
    start = as_of - window
    return sum(o.spend for o in orders if o.sale_at > start)


def next_window_exit(orders: Iterable[Order], as_of: dt.datetime, window: dt.timedelta) -> dt.datetime | None:
    """When the oldest spend still in the window leaves it (the next time the tier may drop)."""
    start = as_of - window
    times = [o.sale_at for o in orders if o.sale_at > start and o.spend > 0]
    return min(times) + window if times else None


def tier_for(rules: LoyaltyRules, spend: int) -> Tier:
    """The highest tier whose minimum the spend reaches."""
    current = rules.tiers[0]
    for tier in rules.tiers:
        if spend >= tier.min_spend:
            current = tier
    return current


def tier_named(rules: LoyaltyRules, name: str) -> Tier:
    for tier in rules.tiers:
        if tier.name == name:
            return tier
    return rules.tiers[0]


def next_tier(rules: LoyaltyRules, spend: int) -> Tier | None:
    """The next tier above what `spend` reaches, or None at the top."""
    for tier in rules.tiers:
        if tier.min_spend > spend:
            return tier
    return None


def format_money(minor: int, currency: str) -> str:
    """Minor units as a decimal string with the currency's digits ("5000.00", JPY "500")."""
    exp = exponent(currency)
    return str(Decimal(minor).scaleb(-exp).quantize(Decimal(1).scaleb(-exp)))
