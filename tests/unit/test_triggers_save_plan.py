"""save_facts writes only what changed since load_facts read a customer (store.plan_save, pure)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from services.triggers import store
from services.triggers.facts import (
    Cart,
    CategoryHistory,
    CustomerFacts,
    PointLot,
    apply_loyalty,
    apply_profile,
    reset_activity,
)
from services.triggers.rules import RuleConfig
from shared.rules import load_rules

CFG = RuleConfig.from_rules(load_rules(environ={}))
T0 = dt.datetime(2026, 6, 1, 14, 0, tzinfo=dt.UTC)


def customer() -> CustomerFacts:
    f = CustomerFacts("c1", birthday="--07-07", timezone="Europe/Paris", tags=["vip", 'q"uote\\'],
                      consents={"sms": "opted_in"}, profile_version=3, profile_at=T0, last_event_at=T0,
                      first_seen_at=T0, first_purchase_at=T0, last_purchase_at=T0, orders_count=2,
                      lifetime_spend=4200)
    f.carts["k1"] = Cart("k1", T0, 1, 990, "tea", "s-1")
    f.categories["coffee"] = CategoryHistory("coffee", [T0 - dt.timedelta(days=20), T0], 3)
    f.lots.append(PointLot("l1", 40, T0 + dt.timedelta(days=300), "o-1"))
    return f


def loaded(f: CustomerFacts, **stored_changes) -> CustomerFacts:
    """`f` as load_facts returns it: with the rows it was read from."""
    carts, categories, lots = store._child_rows(f, CFG)
    stored = store.StoredFacts(store._facts_row(f, CFG), carts, categories, lots)
    f.stored = dataclasses.replace(stored, **stored_changes)
    return f


def nothing(plan: store.SavePlan) -> bool:
    return (not plan.rows and not plan.touch and not plan.wipe
            and not any(plan.put.values()) and not any(plan.gone.values()))


def test_facts_read_and_unchanged_write_nothing():
    assert nothing(store.plan_save([loaded(customer())], CFG))


def test_a_profile_that_changes_nothing_writes_nothing():
    f = loaded(customer())
    apply_profile(f, {"version": 2, "birthday": "--01-01"})  # an older version: ignored
    assert nothing(store.plan_save([f], CFG))


def test_a_changed_field_writes_the_row_and_only_the_row():
    f = loaded(customer())
    f.timezone = "Asia/Tokyo"
    plan = store.plan_save([f], CFG)
    assert [r[0] for r in plan.rows] == ["c1"] and plan.rows[0][5] == "Asia/Tokyo"
    assert not plan.touch and not plan.wipe and not any(plan.put.values()) and not any(plan.gone.values())


def test_a_new_points_lot_is_inserted_alone_and_the_row_gets_a_new_version():
    f = loaded(customer())
    apply_loyalty(f, {"kind": "points_earned", "event_id": "l2", "occurred_at": T0, "points": 10,
                      "expires_at": T0 + dt.timedelta(days=365), "order_id": "o-2", "balance": 50})
    plan = store.plan_save([f], CFG)
    assert plan.rows == [] and plan.touch == ["c1"]
    assert plan.put["point_lots"] == [("c1", "l2", 10, T0 + dt.timedelta(days=365), "o-2")]
    assert not plan.put["carts"] and not plan.put["category_facts"] and not any(plan.gone.values())


def test_spent_lots_converted_carts_and_carts_done_with_earlier_are_deleted():
    f = loaded(customer(), carts={"k1": store._child_rows(customer(), CFG)[0]["k1"],
                                  "k0": (T0, T0, 1, 5, None, None, "abandoned")})  # abandoned by an earlier scan
    f.carts["k1"].status = "converted"
    apply_loyalty(f, {"kind": "points_redeemed", "event_id": "r", "occurred_at": T0, "points": 40, "balance": 0})
    plan = store.plan_save([f], CFG)
    assert plan.touch == ["c1"] and not any(plan.put.values())
    assert sorted(plan.gone["carts"]) == [("c1", "k0"), ("c1", "k1")]
    assert plan.gone["point_lots"] == [("c1", "l1")]


def test_a_changed_child_row_is_upserted_with_what_it_derives():
    f = loaded(customer())
    f.categories["coffee"].purchases.append(T0 + dt.timedelta(days=1))
    f.carts["k1"].status = "abandoned"  # kept, as abandoned
    plan = store.plan_save([f], CFG)
    (cid, name, purchases, quantity, last_at, remind_at, reminded_for), = plan.put["category_facts"]
    assert (cid, name, quantity, last_at) == ("c1", "coffee", 3, T0 + dt.timedelta(days=1))
    assert purchases == (T0 - dt.timedelta(days=20), T0, T0 + dt.timedelta(days=1))
    assert plan.put["carts"][0][:3] == ("c1", "k1", T0) and plan.put["carts"][0][-1] == "abandoned"
    assert plan.touch == ["c1"]


def test_rows_derived_from_the_configuration_are_rewritten_when_it_changes():
    f = loaded(customer())
    later = dataclasses.replace(CFG, cart_after=CFG.cart_after + dt.timedelta(minutes=5))
    plan = store.plan_save([f], later)
    assert [p[:2] for p in plan.put["carts"]] == [("c1", "k1")] and plan.put["carts"][0][3] == T0 + later.cart_after


def test_facts_not_read_replace_every_row_and_new_ones_insert_theirs():
    unknown, new = customer(), dataclasses.replace(customer(), customer_id="c2", stored=store.ABSENT)
    new.carts, new.categories, new.lots = {}, {}, [PointLot("l9", 5, T0)]
    plan = store.plan_save([unknown, new], CFG)
    assert plan.wipe == ["c1"]  # its rows may be anywhere: all deleted first, as before change tracking
    assert [r[0] for r in plan.rows] == ["c1", "c2"] and not plan.touch
    assert [p[:2] for p in plan.put["point_lots"]] == [("c1", "l1"), ("c2", "l9")]
    assert [p[:2] for p in plan.put["carts"]] == [("c1", "k1")] and not any(plan.gone.values())


def test_refolded_facts_compare_with_what_was_read():
    f = loaded(customer())
    again = reset_activity(f)  # an unmerge folds the customer's events again from here
    assert again.stored is f.stored
    plan = store.plan_save([again], CFG)
    assert [r[0] for r in plan.rows] == ["c1"] and plan.rows[0][22] == 0  # orders_count
    assert plan.gone["carts"] == [("c1", "k1")] and plan.gone["point_lots"] == [("c1", "l1")]
    assert not plan.wipe


def test_text_array_literals_quote_everything():
    assert store._text_array([]) == "{}"
    assert store._text_array(["a", 'q"uote\\', None, "", "{,}"]) == '{"a","q\\"uote\\\\",NULL,"","{,}"}'
