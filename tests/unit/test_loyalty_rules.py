"""The pure loyalty rules: currency precision and rates, earning, reversal, FIFO, tiers."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from services.loyalty import rules as R
from services.loyalty.ledger import Order
from shared.rules import load_rules

RULES = R.LoyaltyRules.from_config(load_rules())
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def order(total: int, currency: str = "USD", **kw) -> Order:
    earned = R.points_for(RULES, total, currency)
    gross = R.to_base_minor(RULES, total, currency)
    return Order("k", "o", "c", "e", T0, currency, total, kw.get("refunded", 0), gross, gross,
                 earned, kw.get("reversed", 0), earned, T0 + RULES.expiry)


def lot(key: str, remaining: int, days: int) -> Order:
    return Order(key, None, "c", f"e-{key}", T0, "USD", remaining * 100, 0, remaining * 100,
                 remaining * 100, remaining, 0, remaining, T0 + dt.timedelta(days=days))


def test_currency_precision_comes_from_babel():
    assert (R.exponent("USD"), R.exponent("JPY"), R.exponent("BHD"), R.exponent("eur")) == (2, 0, 3, 2)
    with pytest.raises(R.UnknownCurrency):
        R.exponent("ZZZ")


@pytest.mark.parametrize(("amount", "currency", "points", "base"), [
    (129_90, "USD", 129, 129_90),          # floored per order
    (99, "USD", 0, 99),
    (100_00, "EUR", 108, 108_00),          # 1 EUR = 1.08 USD
    (150_000, "JPY", 1005, 1005_00),       # JPY has no minor unit
    (7, "JPY", 0, 5),                      # 0.0469 USD, banker's rounding to cents
    (1_000_00, "CNY", 140, 140_00),
])
def test_points_and_base_spend(amount, currency, points, base):
    assert R.points_for(RULES, amount, currency) == points
    assert R.to_base_minor(RULES, amount, currency) == base


def test_unknown_rate_is_refused():
    with pytest.raises(R.UnknownCurrency):
        R.points_for(RULES, 100, "CHF")


def test_another_base_currency_rebases_the_rate_table():
    eur = R.LoyaltyRules.from_config(load_rules(), base_currency="EUR")
    assert eur.rates["EUR"] == 1
    assert R.points_for(eur, 108_00, "USD") == 100
    assert eur.tiers[1].min_spend == 5000_00      # thresholds are read in the base currency


def test_points_per_unit_and_tiers_come_from_config():
    cfg = load_rules()
    cfg["loyalty"]["points_per_unit"] = "2.5"
    doubled = R.LoyaltyRules.from_config(cfg)
    assert R.points_for(doubled, 10_99, "USD") == 27      # 10.99 * 2.5 = 27.475 -> 27
    assert [t.name for t in RULES.tiers] == ["member", "silver", "gold"]
    assert RULES.expiry == RULES.window == dt.timedelta(days=365)


@pytest.mark.parametrize(("spend", "tier", "nxt"), [
    (0, "member", "silver"), (4999_99, "member", "silver"), (5000_00, "silver", "gold"),
    (14999_99, "silver", "gold"), (15000_00, "gold", None),
])
def test_tiers_on_spend(spend, tier, nxt):
    assert R.tier_for(RULES, spend).name == tier
    assert (R.next_tier(RULES, spend).name if R.next_tier(RULES, spend) else None) == nxt
    assert R.tier_for(RULES, 15000_00).discount_percent == 10
    assert R.tier_for(RULES, 15000_00).personal_shopper


def test_reversal_is_cumulative_and_never_more_than_earned():
    o = order(100_99)                                      # 100 points
    assert R.reversal_points(RULES, o, 50_50) == 50
    o.reversed = 50
    assert R.reversal_points(RULES, o, 101_00) == 50       # capped, and the rest of a full refund
    assert R.reversal_points(RULES, order(100_99, reversed=100), 100_99) == 0
    # Floors per return would lose a point; cumulative refunds do not.
    o = order(10_98)                                       # 10 points
    o.reversed = R.reversal_points(RULES, o, 5_49)         # 5
    assert o.reversed + R.reversal_points(RULES, o, 10_98) == 10


def test_net_spend_after_returns():
    o = order(100_00, "EUR")                               # 108.00 USD
    assert R.net_spend_after(RULES, o, 50_00) == 54_00
    assert R.net_spend_after(RULES, o, 100_00) == 0
    assert R.net_spend_after(RULES, o, 500_00) == 0


def test_consume_takes_oldest_first_or_the_preferred_lot_first():
    lots = [lot("a", 10, 10), lot("b", 10, 20), lot("c", 10, 30)]
    taken = R.consume(lots, 15)
    assert [(x.order_key, n) for x, n in taken] == [("a", 10), ("b", 5)]
    taken = R.consume(lots, 12, prefer="c")
    assert [(x.order_key, n) for x, n in taken] == [("c", 10), ("b", 2)]
    with pytest.raises(ValueError):
        R.consume(lots, 100)


def test_due_lots_and_window_exit():
    lots = [lot("b", 5, 20), lot("a", 5, 10), lot("z", 0, 1)]
    assert [x.order_key for x in R.due_lots(lots, T0 + dt.timedelta(days=20))] == ["a", "b"]
    o1, o2 = order(100_00), order(50_00)
    o2.sale_at = T0 + dt.timedelta(days=100)
    assert R.trailing_spend([o1, o2], T0 + dt.timedelta(days=200), RULES.window) == 150_00
    assert R.trailing_spend([o1, o2], T0 + dt.timedelta(days=365), RULES.window) == 50_00
    assert R.next_window_exit([o1, o2], T0, RULES.window) == T0 + RULES.window


def test_redemption_rejection_and_money_format():
    assert R.redemption_rejection(100, 100) is None
    assert R.redemption_rejection(99, 100) == R.REJECT_INSUFFICIENT
    assert R.format_money(5000_00, "USD") == "5000.00"
    assert R.format_money(500, "JPY") == "500"
    assert R.format_money(0, "BHD") == "0.000"
    assert Decimal(R.format_money(1, "USD")) == Decimal("0.01")
