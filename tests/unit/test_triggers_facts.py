"""Folding events into customer facts, merges, loyalty lots and the segment language (no I/O)."""

from __future__ import annotations

import datetime as dt

import pytest

from services.triggers.facts import (
    CustomerFacts,
    apply_event,
    apply_loyalty,
    apply_profile,
    merge_facts,
    parse_birthday,
    purchase_amount,
    reset_activity,
)
from services.triggers.money import Money
from services.triggers.segments import SegmentError, compile_segment

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 1, 12, tzinfo=UTC)
MONEY = Money(base="USD", rates={"USD": 1, "EUR": __import__("decimal").Decimal("1.08")})


def ev(kind: str, event_id: str, when: dt.datetime, **props) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": when, "store_id": None, "properties": props}


def test_parse_birthday_forms():
    assert parse_birthday("1990-12-10") == (12, 10)
    assert parse_birthday("--02-29") == (2, 29)
    assert parse_birthday("1990-13-01") is None
    assert parse_birthday("garbage") is None
    assert parse_birthday(None) is None


def test_sales_and_returns_fold_into_counts_spend_and_categories():
    f = CustomerFacts("c1")
    apply_event(f, ev("sale", "s1", T0, order_id="o1", currency="EUR", total=10000, lines=[
        {"sku": "a", "category": "coffee", "quantity": 2, "unit_price": 2500},
        {"sku": "b", "category": "tea", "quantity": 1, "unit_price": 5000}]), MONEY)
    apply_event(f, ev("sale", "s2", T0 + dt.timedelta(days=5), order_id="o2", currency="USD", total=500,
                      lines=[{"sku": "a", "category": "coffee", "quantity": 1, "unit_price": 500}]), MONEY)
    apply_event(f, ev("return", "r1", T0 + dt.timedelta(days=6), order_id="o2", return_id="r", currency="USD",
                      total=500), MONEY)
    assert f.orders_count == 2 and f.lifetime_spend == 10800
    assert f.first_purchase_at == T0 and f.last_purchase_at == T0 + dt.timedelta(days=5)
    assert f.categories["coffee"].quantity == 3 and len(f.categories["coffee"].purchases) == 2
    assert f.most_bought_category() == "coffee"
    assert purchase_amount(ev("return", "r", T0, total=500, currency="USD"), MONEY) == -500
    assert purchase_amount(ev("page_view", "p", T0), MONEY) is None


def test_a_sale_closes_open_carts_and_a_new_add_reopens():
    f = CustomerFacts("c1")
    apply_event(f, ev("cart_add", "a1", T0, cart_id="k", sku="x", quantity=1, unit_price=100, currency="USD"), MONEY)
    apply_event(f, ev("sale", "s1", T0 + dt.timedelta(minutes=10), order_id="o", currency="USD", total=100,
                      lines=[]), MONEY)
    assert f.carts["k"].status == "converted"
    apply_event(f, ev("cart_add", "a2", T0 + dt.timedelta(days=1), cart_id="k", sku="y"), MONEY)
    assert f.carts["k"].status == "open" and f.carts["k"].items == 1


def test_profile_versions_and_reset_keeps_the_profile():
    f = CustomerFacts("c1")
    apply_profile(f, {"version": 3, "birthday": "--05-01", "timezone": "Asia/Tokyo", "tags": ["vip", "vip"],
                      "consents": {"sms": "opted_in", "email": "opted_out"},
                      "address": {"city": "Tokyo", "country": "JP", "lat": 35.6, "lon": 139.7}})
    apply_profile(f, {"version": 2, "birthday": "--01-01"})  # older: ignored
    assert f.birthday == "--05-01" and f.tags == ["vip"] and f.consented_channels == ["sms"]
    apply_event(f, ev("signup", "u", T0), MONEY)
    fresh = reset_activity(f)
    assert fresh.signed_up_at is None and fresh.birthday == "--05-01" and fresh.city == "Tokyo"


def test_loyalty_lots_spent_oldest_first_and_capped_by_balance():
    f = CustomerFacts("c1")
    exp1, exp2 = T0 + dt.timedelta(days=30), T0 + dt.timedelta(days=60)
    apply_loyalty(f, {"event_id": "e1", "kind": "points_earned", "occurred_at": T0, "points": 100,
                      "balance": 100, "expires_at": exp1, "order_id": "o1"})
    apply_loyalty(f, {"event_id": "e2", "kind": "points_earned", "occurred_at": T0, "points": 200,
                      "balance": 300, "expires_at": exp2, "order_id": "o2"})
    apply_loyalty(f, {"event_id": "e3", "kind": "points_redeemed", "occurred_at": T0, "points": 150, "balance": 150})
    assert [(lot.lot_id, lot.points) for lot in f.lots] == [("e2", 150)]
    apply_loyalty(f, {"event_id": "e4", "kind": "points_reversed", "occurred_at": T0, "points": 50,
                      "balance": 100, "order_id": "o2"})
    assert f.points_open == 100
    apply_loyalty(f, {"event_id": "e5", "kind": "tier_changed", "occurred_at": T0, "old_tier": "member",
                      "new_tier": "silver", "balance": 100})
    assert f.tier == "silver"
    apply_loyalty(f, {"event_id": "e6", "kind": "points_redeemed", "occurred_at": T0, "points": 10, "balance": 20})
    assert f.points_open == 20  # the ledger's balance wins


def test_merge_folds_activity_into_the_survivor():
    s, m = CustomerFacts("s", timezone="Europe/Paris", tier="silver"), CustomerFacts("m", birthday="--07-07", tier="gold")
    apply_event(s, ev("sale", "s1", T0, order_id="o", currency="USD", total=100,
                      lines=[{"sku": "a", "category": "tea", "quantity": 1, "unit_price": 100}]), MONEY)
    apply_event(m, ev("sale", "m1", T0 + dt.timedelta(days=1), order_id="p", currency="USD", total=300,
                      lines=[{"sku": "a", "category": "tea", "quantity": 2, "unit_price": 150}]), MONEY)
    apply_event(m, ev("cart_add", "c", T0, cart_id="mk", sku="z"), MONEY)
    out = merge_facts(s, m)
    assert out.orders_count == 2 and out.lifetime_spend == 400 and out.tier == "gold"
    assert out.timezone == "Europe/Paris" and out.birthday == "--07-07"
    assert out.categories["tea"].quantity == 3 and len(out.categories["tea"].purchases) == 2
    assert "mk" in out.carts


# -- segments ----------------------------------------------------------------------------------

NOW = dt.datetime(2026, 12, 1, tzinfo=UTC)


def test_segment_compiles_to_parameterised_sql():
    c = compile_segment({"all": [
        {"field": "birthday_month", "op": "eq", "value": 12},
        {"field": "trailing_spend", "op": "gte", "value": "5000"},
        {"field": "purchased_category", "op": "eq", "value": "pet-health"},
        {"any": [{"field": "tag", "op": "in", "value": ["vip", "x'); DROP TABLE customer_facts; --"]},
                 {"not": {"field": "country", "op": "eq", "value": "us"}}]}]}, now=NOW)
    assert "DROP" not in c.where and "pet-health" not in c.where
    assert 500000 in c.params and ["pet-health"] in c.params and "US" in c.params
    assert c.where.count("$") == len(c.params)


@pytest.mark.parametrize(("query", "path"), [
    ({"all": [{"field": "shoe_size", "op": "eq", "value": 1}]}, "all[0].field"),
    ({"all": [{"field": "tier", "op": "gte", "value": "gold"}]}, "all[0].op"),
    ({"any": [{"field": "tier", "op": "eq", "value": "gold"}, {"field": "birthday_month", "op": "eq", "value": 13}]},
     "any[1].value"),
    ({"all": [{"field": "trailing_spend", "op": "gte", "value": 1.5}]}, "all[0].value"),
    ({"all": {"field": "tier"}}, "all"),
    ({"field": "tier", "op": "in", "value": []}, "value"),
    ({"all": [], "any": []}, "segment"),
])
def test_segment_errors_name_the_bad_part(query, path):
    with pytest.raises(SegmentError) as err:
        compile_segment(query, now=NOW)
    assert err.value.path == path
