"""Every trigger rule as a pure function: edges of time zones, DST, 29 February, lapses, carts, periods."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from services.triggers import rules as R
from services.triggers.facts import (
    Cart,
    CategoryHistory,
    CustomerFacts,
    PointLot,
    Store,
    apply_event,
    merge_facts,
)
from services.triggers.money import Money
from shared.rules import load_rules

UTC = dt.UTC
CFG = R.RuleConfig.from_rules(load_rules(environ={}))
MONEY = CFG.money


def at(y, mo, d, h=0, mi=0, tz="UTC") -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def sale(event_id: str, when: dt.datetime, total: int = 10000, *, store_id: str | None = "soho",
         channel: str | None = "in_store", lines=None, offset: int = 0) -> dict:
    return {"event_id": event_id, "type": "sale", "occurred_at": when, "utc_offset_minutes": offset,
            "store_id": store_id, "properties": {
                "order_id": f"o-{event_id}", "currency": "USD", "total": total, "channel": channel,
                "lines": lines or [{"sku": "s1", "category": "coffee", "quantity": 1, "unit_price": total}]}}


# -- ids and config -----------------------------------------------------------------------------

def test_trigger_id_is_deterministic_per_kind_customer_and_period():
    a = R.trigger_id("birthday_coupon", "c1", "2026")
    assert a == R.trigger_id("birthday_coupon", "c1", "2026")
    assert len({a, R.trigger_id("birthday_coupon", "c1", "2027"), R.trigger_id("birthday_coupon", "c2", "2026"),
                R.trigger_id("win_back", "c1", "2026")}) == 4


def test_config_reads_rules_yaml_in_minor_units():
    assert CFG.birthday_amount == 5000 and CFG.birthday_min_spend == 30000
    assert CFG.win_back_amount == 2000 and CFG.win_back_lapse == dt.timedelta(days=90)
    assert CFG.replenishment_cycles["pet-food"] == 30
    assert CFG.currency == "USD"


# -- birthday -------------------------------------------------------------------------------------

def bday(birthday: str, tz: str | None = None, **kw) -> CustomerFacts:
    return CustomerFacts("c1", birthday=birthday, timezone=tz, **kw)


def test_birthday_fires_three_days_before_in_the_customers_local_date():
    f = bday("1990-12-10", "Asia/Shanghai")
    # 6 Dec 23:59 Shanghai: not yet; 7 Dec 00:00 Shanghai (6 Dec 16:00 UTC): due.
    assert R.birthday_coupon(f, at(2026, 12, 6, 23, 59, "Asia/Shanghai"), CFG) == []
    got = R.birthday_coupon(f, at(2026, 12, 7, 0, 0, "Asia/Shanghai"), CFG)
    assert [t.period for t in got] == ["2026"]
    t = got[0]
    assert t.occurred_at == at(2026, 12, 7, tz="Asia/Shanghai")
    assert t.offer.amount == 5000 and t.offer.min_spend == 30000 and t.offer.currency == "USD"
    assert t.offer.expires_at == at(2026, 12, 21, tz="Asia/Shanghai")  # valid 14 days
    assert t.context["birthday"] == "2026-12-10" and t.context["days_until"] == "3"
    assert t.offer.code.startswith("BDAY-")


def test_birthday_time_zones_either_side_of_midnight():
    instant = at(2026, 6, 7, 2, 0)  # 7 Jun 02:00 UTC = 6 Jun 19:00 in Los Angeles, 7 Jun 10:00 in Tokyo
    tokyo = bday("--06-10", "Asia/Tokyo")
    la = bday("--06-10", "America/Los_Angeles")
    assert [t.period for t in R.birthday_coupon(tokyo, instant, CFG)] == ["2026"]
    assert R.birthday_coupon(la, instant, CFG) == []
    assert [t.period for t in R.birthday_coupon(la, at(2026, 6, 7, 7, 0), CFG)] == ["2026"]


def test_birthday_uses_home_store_zone_then_default():
    f = bday("--06-10", None, home_store_tz="Asia/Tokyo")
    assert R.birthday_coupon(f, at(2026, 6, 7, 2, 0), CFG)  # Tokyo already on 7 June
    g = bday("--06-10", None)
    assert R.birthday_coupon(g, at(2026, 6, 7, 2, 0), CFG)  # UTC: 7 June 02:00
    assert R.birthday_coupon(g, at(2026, 6, 6, 23, 0), CFG) == []


@pytest.mark.parametrize(("year", "expected_day"), [(2027, dt.date(2027, 2, 28)), (2028, dt.date(2028, 2, 29))])
def test_birthday_on_29_february(year, expected_day):
    f = bday("2000-02-29", "UTC")
    due = dt.datetime.combine(expected_day - dt.timedelta(days=3), dt.time(0), UTC)
    assert R.birthday_coupon(f, due - dt.timedelta(seconds=1), CFG) == []
    got = R.birthday_coupon(f, due, CFG)
    assert [(t.period, t.context["birthday"]) for t in got] == [(str(year), expected_day.isoformat())]


def test_birthday_window_crossing_new_year_belongs_to_next_year():
    f = bday("--01-01", "UTC")
    got = R.birthday_coupon(f, at(2026, 12, 29, 12), CFG)
    assert [t.period for t in got] == ["2027"]


def test_birthday_fires_once_per_year_and_not_after_the_day():
    f = bday("--03-15", "Europe/Paris")
    inside = R.birthday_coupon(f, at(2026, 3, 14, 9, tz="Europe/Paris"), CFG)
    assert len(inside) == 1
    R.mark_fired(f, inside[0])
    assert R.birthday_coupon(f, at(2026, 3, 15, 9, tz="Europe/Paris"), CFG) == []
    g = bday("--03-15", "Europe/Paris")
    assert R.birthday_coupon(g, at(2026, 3, 16, 0, 1, tz="Europe/Paris"), CFG) == []  # missed: stale
    # ... unless the due instant passed since the previous scan (event-clock scans never skip one).
    assert R.birthday_coupon(g, at(2026, 3, 16, 0, 1, tz="Europe/Paris"), CFG,
                             since=at(2026, 3, 11, tz="Europe/Paris"))


def test_birthday_across_dst_gap_at_midnight():
    # Chile starts DST at local midnight on 6 Sep 2026: 00:00 does not exist, the day starts at 01:00.
    f = bday("--09-09", "America/Santiago")
    due = R.birthday_coupon(f, at(2026, 9, 7, 12, tz="America/Santiago"), CFG)[0].occurred_at
    assert due.astimezone(ZoneInfo("America/Santiago")).date() == dt.date(2026, 9, 6)
    assert R.birthday_coupon(f, due - dt.timedelta(seconds=1), CFG) == []
    assert R.birthday_coupon(f, due, CFG)


def test_birthday_in_a_dst_zone_uses_local_midnight_of_that_day():
    # 8 Mar 2026: US DST starts at 02:00; the window for an 11 March birthday opens 8 Mar 00:00 EST.
    f = bday("--03-11", "America/New_York")
    assert R.birthday_coupon(f, at(2026, 3, 8, 4, 59), CFG) == []
    assert R.birthday_coupon(f, at(2026, 3, 8, 5, 0), CFG)


def test_no_birthday_no_coupon_and_bad_birthday_ignored():
    assert R.birthday_coupon(CustomerFacts("c"), at(2026, 1, 1), CFG) == []
    assert R.birthday_coupon(bday("1990-02-30"), at(2026, 2, 27), CFG) == []


# -- geo thank-you --------------------------------------------------------------------------------

SOHO = Store("soho", "SoHo", "America/New_York", "US", "New York", 40.7233, -74.0030)


def test_geo_thank_you_names_the_store_once_per_store_and_local_day():
    f = CustomerFacts("c1")
    e1 = sale("e1", at(2026, 11, 22, 22, 30, "America/New_York"))
    t1 = R.geo_thank_you(f, e1, e1["occurred_at"] + dt.timedelta(minutes=1), CFG, SOHO)
    assert len(t1) == 1
    assert t1[0].context["store_name"] == "SoHo" and t1[0].period == "soho:2026-11-22"
    assert t1[0].cause_event_id == "e1" and t1[0].offer is None
    # The same local evening, later (already the next day in UTC): same trigger id.
    e2 = sale("e2", at(2026, 11, 22, 23, 50, "America/New_York"))
    assert R.geo_thank_you(f, e2, e2["occurred_at"], CFG, SOHO)[0].trigger_id == t1[0].trigger_id
    e3 = sale("e3", at(2026, 11, 23, 0, 10, "America/New_York"))
    assert R.geo_thank_you(f, e3, e3["occurred_at"], CFG, SOHO)[0].period == "soho:2026-11-23"


def test_geo_thank_you_not_for_stale_online_or_storeless_sales():
    f = CustomerFacts("c1")
    e = sale("e1", at(2026, 11, 8, 12))
    assert R.geo_thank_you(f, e, at(2026, 11, 22, 12), CFG, SOHO) == []  # two weeks old
    assert R.geo_thank_you(f, e, e["occurred_at"] + dt.timedelta(hours=12), CFG, SOHO)
    assert R.geo_thank_you(f, e, e["occurred_at"] + dt.timedelta(hours=12, seconds=1), CFG, SOHO) == []
    online = sale("e2", at(2026, 11, 8, 12), channel="online")
    assert R.geo_thank_you(f, online, online["occurred_at"], CFG, SOHO) == []
    nowhere = sale("e3", at(2026, 11, 8, 12), store_id=None)
    assert R.geo_thank_you(f, nowhere, nowhere["occurred_at"], CFG, None) == []


def test_geo_thank_you_unknown_store_uses_the_events_own_offset():
    f = CustomerFacts("c1")
    e = sale("e1", at(2026, 11, 22, 20, 0), offset=8 * 60)  # 23 Nov 04:00 at +08:00
    t = R.geo_thank_you(f, e, e["occurred_at"], CFG, None)[0]
    assert t.period == "soho:2026-11-23" and t.context["store_name"] == "soho"


# -- win-back -------------------------------------------------------------------------------------

def buyer(*times: dt.datetime, cid: str = "c1") -> CustomerFacts:
    f = CustomerFacts(cid)
    for i, when in enumerate(times):
        apply_event(f, sale(f"{cid}-s{i}", when, lines=[
            {"sku": "a", "category": "pet-food", "quantity": 2, "unit_price": 100},
            {"sku": "b", "category": "toys", "quantity": 1, "unit_price": 100}]), MONEY)
    return f


def test_win_back_after_90_days_without_purchase_with_most_bought_category():
    last = at(2026, 1, 10, 15)
    f = buyer(at(2025, 12, 1), last)
    assert R.win_back(f, last + dt.timedelta(days=90) - dt.timedelta(seconds=1), CFG) == []
    got = R.win_back(f, last + dt.timedelta(days=90), CFG)
    assert len(got) == 1
    t = got[0]
    assert t.context["days_since_last_purchase"] == "90" and t.context["category"] == "pet-food"
    assert t.offer.amount == 2000 and t.offer.min_spend == 0
    assert t.period == last.isoformat()


def test_win_back_needs_a_purchase_and_fires_once_per_lapse():
    assert R.win_back(CustomerFacts("c"), at(2027, 1, 1), CFG) == []
    last = at(2026, 1, 10)
    f = buyer(last)
    t = R.win_back(f, last + dt.timedelta(days=91), CFG)[0]
    R.mark_fired(f, t)
    assert R.win_back(f, last + dt.timedelta(days=92), CFG) == []


def test_win_back_lapse_rearmed_by_a_new_purchase():
    first = at(2026, 1, 10)
    f = buyer(first)
    t1 = R.win_back(f, first + dt.timedelta(days=90), CFG)[0]
    R.mark_fired(f, t1)
    back = first + dt.timedelta(days=100)
    apply_event(f, sale("again", back), MONEY)
    assert R.win_back(f, back + dt.timedelta(days=89), CFG) == []
    t2 = R.win_back(f, back + dt.timedelta(days=90), CFG)[0]
    assert t2.trigger_id != t1.trigger_id


def test_customer_merged_mid_lapse_takes_the_later_purchase():
    survivor = buyer(at(2026, 1, 1), cid="s")  # lapsed 60 days by 2 Mar
    merged = buyer(at(2026, 2, 20), cid="m")  # bought 10 days ago
    combined = merge_facts(survivor, merged)
    assert combined.orders_count == 2 and combined.last_purchase_at == at(2026, 2, 20)
    assert R.win_back(combined, at(2026, 4, 1), CFG) == []  # 90 days after 1 Jan, but not after 20 Feb
    assert R.win_back(combined, at(2026, 2, 20) + dt.timedelta(days=90), CFG)


def test_win_back_stale_lapse_is_not_fired_late():
    last = at(2026, 1, 10)
    f = buyer(last)
    assert R.win_back(f, last + dt.timedelta(days=90 + 31), CFG) == []


# -- abandoned cart -------------------------------------------------------------------------------

def cart_facts(added: dt.datetime) -> CustomerFacts:
    f = CustomerFacts("c1")
    apply_event(f, {"event_id": "a1", "type": "cart_add", "occurred_at": added, "properties": {
        "cart_id": "k1", "sku": "s", "quantity": 2, "unit_price": 1250, "currency": "USD",
        "category": "coffee"}}, MONEY)
    return f


@pytest.mark.parametrize(("minutes_later", "abandoned"), [(59, False), (61, True)])
def test_cart_converted_by_a_sale_59_vs_61_minutes_later(minutes_later, abandoned):
    added = at(2026, 5, 1, 12)
    f = cart_facts(added)
    sold = added + dt.timedelta(minutes=minutes_later)
    # The handler decides what fell due before folding the sale, then folds it.
    due = R.abandoned_cart(f, sold, CFG)
    apply_event(f, sale("s1", sold, store_id=None, channel="online"), MONEY)
    later = R.abandoned_cart(f, added + dt.timedelta(hours=3), CFG)
    fired = due + later
    assert bool(fired) is abandoned
    if abandoned:
        t = fired[0]
        assert t.period == "k1" and t.context["cart_total"] == "25.00" and t.context["items"] == "2"
        assert t.occurred_at == added + dt.timedelta(minutes=60)


def test_abandoned_cart_once_per_cart_and_not_when_emptied_or_stale():
    added = at(2026, 5, 1, 12)
    f = cart_facts(added)
    t = R.abandoned_cart(f, added + dt.timedelta(minutes=60), CFG)
    assert len(t) == 1
    R.mark_fired(f, t[0])
    assert R.abandoned_cart(f, added + dt.timedelta(minutes=90), CFG) == []
    g = cart_facts(added)
    apply_event(g, {"event_id": "r1", "type": "cart_remove", "occurred_at": added + dt.timedelta(minutes=5),
                    "properties": {"cart_id": "k1", "sku": "s", "quantity": 2}}, MONEY)
    assert R.abandoned_cart(g, added + dt.timedelta(hours=2), CFG) == []
    h = cart_facts(added)
    assert R.abandoned_cart(h, added + dt.timedelta(days=3), CFG) == []


def test_checkout_started_extends_the_cart_activity():
    added = at(2026, 5, 1, 12)
    f = cart_facts(added)
    apply_event(f, {"event_id": "c1", "type": "checkout_started", "occurred_at": added + dt.timedelta(minutes=30),
                    "properties": {"cart_id": "k1", "total": 2300, "currency": "USD"}}, MONEY)
    assert R.abandoned_cart(f, added + dt.timedelta(minutes=61), CFG) == []
    t = R.abandoned_cart(f, added + dt.timedelta(minutes=90), CFG)[0]
    assert t.context["cart_total"] == "23.00"


# -- replenishment -------------------------------------------------------------------------------

def test_replenishment_from_configured_cycle_three_days_before_due():
    f = CustomerFacts("c1", categories={"pet-food": CategoryHistory("pet-food", [at(2026, 3, 1)], 1)})
    due = at(2026, 3, 31)
    assert R.replenishment(f, due - dt.timedelta(days=3, seconds=1), CFG) == []
    t = R.replenishment(f, due - dt.timedelta(days=3), CFG)[0]
    assert t.context["category"] == "pet-food" and t.context["due_date"] == "2026-03-31"
    assert t.context["cycle_days"] == "30"
    R.mark_fired(f, t)
    assert R.replenishment(f, due, CFG) == []


def test_replenishment_own_median_after_three_purchases_and_unknown_category():
    times = [at(2026, 1, 1), at(2026, 1, 11), at(2026, 1, 23)]  # gaps 10 and 12 days: median 11
    f = CustomerFacts("c1", categories={"tea": CategoryHistory("tea", times, 3)})
    assert R.replenishment(f, at(2026, 1, 30, 23), CFG) == []
    t = R.replenishment(f, at(2026, 1, 31), CFG)[0]  # 23 Jan + 11 days - 3 days
    assert t.context["cycle_days"] == "11"
    g = CustomerFacts("c1", categories={"tea": CategoryHistory("tea", times[:2], 2)})
    assert R.replenishment(g, at(2026, 6, 1), CFG) == []  # no config cycle, too few purchases


def test_replenishment_rearmed_by_the_next_purchase():
    f = CustomerFacts("c1", categories={"coffee": CategoryHistory("coffee", [at(2026, 3, 1)], 1)})
    t1 = R.replenishment(f, at(2026, 3, 19), CFG)[0]
    R.mark_fired(f, t1)
    f.categories["coffee"].purchases.append(at(2026, 3, 20))
    t2 = R.replenishment(f, at(2026, 4, 7), CFG)[0]
    assert t2.trigger_id != t1.trigger_id


# -- points expiring --------------------------------------------------------------------------------

def test_points_expiring_thirty_days_before_at_least_100_points():
    f = CustomerFacts("c1", lots=[PointLot("l1", 60, at(2026, 7, 10)), PointLot("l2", 50, at(2026, 7, 20)),
                                  PointLot("l3", 80, at(2026, 8, 15))])
    assert R.points_expiring(f, at(2026, 6, 9, 23), CFG) == []
    got = R.points_expiring(f, at(2026, 6, 10), CFG)
    assert [(t.period, t.context["points"]) for t in got] == [("2026-07", "110")]
    assert R.points_expiring(f, at(2026, 7, 17), CFG) == []  # August has only 80


def test_points_expiring_not_after_expiry_or_below_minimum():
    f = CustomerFacts("c1", lots=[PointLot("l1", 99, at(2026, 7, 10))])
    assert R.points_expiring(f, at(2026, 6, 20), CFG) == []
    g = CustomerFacts("c1", lots=[PointLot("l1", 150, at(2026, 7, 10))])
    assert R.points_expiring(g, at(2026, 7, 10), CFG) == []


# -- event-driven: welcome, tier upgrade, store event invite ----------------------------------------

def test_welcome_on_first_signup_or_purchase_once():
    f = CustomerFacts("c1")
    signup = {"event_id": "u1", "type": "signup", "occurred_at": at(2026, 1, 1), "properties": {}}
    t = R.welcome(f, signup, at(2026, 1, 1, 0, 1), CFG)
    assert [x.period for x in t] == ["welcome"] and t[0].context["via"] == "signup"
    first_sale = sale("s1", at(2026, 1, 2))
    assert R.welcome(f, first_sale, at(2026, 1, 2), CFG)[0].trigger_id == t[0].trigger_id
    apply_event(f, first_sale, MONEY)
    assert R.welcome(f, sale("s2", at(2026, 1, 3)), at(2026, 1, 3), CFG) == []
    assert R.welcome(CustomerFacts("c2"), signup, at(2026, 2, 1), CFG) == []  # stale signup


def test_tier_upgrade_only_when_up():
    f = CustomerFacts("c1")
    up = {"event_id": "t1", "kind": "tier_changed", "occurred_at": at(2026, 1, 1), "old_tier": "member",
          "new_tier": "gold", "trailing_spend": 1500000, "currency": "USD"}
    t = R.tier_upgrade(f, up, at(2026, 1, 1), CFG)[0]
    assert t.context["tier"] == "gold" and t.context["discount_percent"] == "10"
    assert t.context["personal_shopper"] == "true" and t.context["trailing_spend"] == "15000.00"
    down = {**up, "event_id": "t2", "old_tier": "gold", "new_tier": "silver"}
    assert R.tier_upgrade(f, down, at(2026, 1, 1), CFG) == []


def test_store_event_invite_by_haversine_distance_and_tier():
    event = {"event_id": "se1", "type": "store_event", "occurred_at": at(2026, 5, 1),
             "properties": {"store_id": "soho", "title": "Tasting", "starts_at": at(2026, 5, 10, 18),
                            "radius_km": 5.0}}
    near = CustomerFacts("n", tier="gold", lat=40.7306, lon=-73.9866)  # ~1.6 km
    far = CustomerFacts("f", tier="gold", lat=40.6782, lon=-73.9442)  # Brooklyn, ~7 km
    member = CustomerFacts("m", tier="member", lat=40.7306, lon=-73.9866)
    by_home = CustomerFacts("h", tier="silver", home_store_id="soho")
    now = at(2026, 5, 1)
    got = {c.customer_id: R.store_event_invite(c, event, SOHO, now, CFG) for c in (near, far, member, by_home)}
    assert len(got["n"]) == 1 and got["f"] == [] and got["m"] == [] and len(got["h"]) == 1
    t = got["n"][0]
    assert t.context["store_name"] == "SoHo" and t.context["event_title"] == "Tasting"
    assert t.period == "se1" and float(t.context["distance_km"]) < 2
    assert R.store_event_invite(near, event, SOHO, at(2026, 5, 11), CFG) == []  # already started


def test_haversine():
    assert R.haversine_km(0, 0, 0, 1) == pytest.approx(111.19, abs=0.05)
    assert R.haversine_km(40.7233, -74.0030, 40.7233, -74.0030) == 0


def test_campaign_once_per_name_with_offer_in_minor_units():
    t = R.campaign("c1", "xmas-2026", {"kind": "campaign", "offer": {"amount": "15", "min_spend": "100",
                                                                      "description": "Xmas"}},
                   at(2026, 12, 1), CFG)
    assert t.trigger_id == R.trigger_id("campaign", "c1", "xmas-2026")
    assert t.offer.amount == 1500 and t.offer.min_spend == 10000 and t.offer.expires_at == at(2026, 12, 15)


def test_money_conversion_never_uses_float():
    m = Money.from_rules(load_rules(environ={}))
    assert m.to_base(10000, "EUR") == 10800
    assert m.to_base(1000, "JPY") == 670
    assert m.to_base(100, "XXX") is None
    with pytest.raises(ValueError):
        m.minor(1.5)


def test_time_based_is_independent_of_when_it_is_evaluated():
    """Replay determinism: evaluating at any instant after the due time (within lateness) gives the same ids."""
    f = CustomerFacts("c1", birthday="--04-20", timezone="Asia/Shanghai",
                      lots=[PointLot("l", 500, at(2026, 5, 10))])
    apply_event(f, sale("s", at(2026, 1, 20)), MONEY)
    f.carts = {"k": Cart("k", at(2026, 4, 20, 9), items=1)}
    ids = set()
    for minutes in (0, 15, 47, 180, 290):  # the birthday window closes at 16:00 UTC
        instant = at(2026, 4, 20, 11) + dt.timedelta(minutes=minutes)
        ids.add(frozenset(t.trigger_id for t in R.time_based(f, instant, CFG)))
    assert len(ids) == 1
    assert {t.kind for t in R.time_based(f, at(2026, 4, 20, 11), CFG)} == {
        "birthday_coupon", "win_back", "points_expiring", "abandoned_cart"}
