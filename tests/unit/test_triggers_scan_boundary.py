"""Event clock: a time-based trigger is judged at the scan boundary it fell due at, whoever finds it."""

from __future__ import annotations

import copy
import datetime as dt

from services.triggers import rules as R
from services.triggers.facts import Cart, CustomerFacts
from shared.rules import load_rules

CFG = R.RuleConfig.from_rules(load_rules(environ={}))
UTC = dt.UTC
STEP = dt.timedelta(minutes=15)


def test_scan_boundary_rounds_up_to_the_step():
    assert R.scan_boundary(dt.datetime(2026, 9, 1, 10, 7, tzinfo=UTC), STEP) == dt.datetime(2026, 9, 1, 10, 15, tzinfo=UTC)
    assert R.scan_boundary(dt.datetime(2026, 9, 1, 10, 15, tzinfo=UTC), STEP) == dt.datetime(2026, 9, 1, 10, 15, tzinfo=UTC)


def test_a_cart_fires_at_its_boundary_whenever_it_is_looked_at():
    left = dt.datetime(2026, 9, 1, 10, 7, tzinfo=UTC)
    f = CustomerFacts("c1", last_event_at=left, carts={"k": Cart("k", left, items=1, total=2500)})
    seen = []
    for look in (dt.timedelta(hours=1, minutes=10), dt.timedelta(hours=3), dt.timedelta(hours=20)):
        g = copy.deepcopy(f)
        got = R.due_by_boundary(g, left + look, CFG, left, STEP)
        assert [t.kind for t in got] == ["abandoned_cart"] and g.carts["k"].status == "abandoned"
        seen.append((got[0].trigger_id, got[0].fired_at, dict(got[0].context)))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][1] == dt.datetime(2026, 9, 1, 11, 15, tzinfo=UTC)  # due 11:07, first boundary 11:15
    assert R.due_by_boundary(copy.deepcopy(f), left + dt.timedelta(minutes=59), CFG, left, STEP) == []


def test_never_before_the_customers_last_activity_nor_after_as_of():
    left = dt.datetime(2026, 9, 1, 10, 7, tzinfo=UTC)
    later = left + dt.timedelta(hours=5, minutes=1)  # another event after the cart fell due
    f = CustomerFacts("c1", last_event_at=later, carts={"k": Cart("k", left, items=1, total=2500)})
    (t,) = R.due_by_boundary(copy.deepcopy(f), later + dt.timedelta(days=2), CFG, later, STEP)
    assert t.fired_at == dt.datetime(2026, 9, 1, 15, 15, tzinfo=UTC)
    (t,) = R.due_by_boundary(copy.deepcopy(f), later + dt.timedelta(minutes=5), CFG, later, STEP)
    assert t.fired_at == later + dt.timedelta(minutes=5)
