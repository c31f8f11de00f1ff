"""Per-event change tracking in identity resolution: which customers an event changed (the handler
publishes their profiles right after it) and updated_at as the event time of the latest change,
independent of what else the batch held."""

from __future__ import annotations

import datetime as dt

from services.identity import profile
from services.identity.resolution import Graph, Guard, Incoming, customer_id_for, resolve

T0 = dt.datetime(2026, 11, 1, 10, 0, tzinfo=dt.UTC)
E1, P1 = ("email", "a@example.com"), ("phone", "+12125550100")


def ev(event_id: str, *ids: tuple[str, str], seconds: int = 0, kind: str = "sale",
       props: dict | None = None) -> Incoming:
    at = T0 + dt.timedelta(seconds=seconds)
    raw = {"event_id": event_id, "type": kind, "occurred_at": at, "properties": props}
    return Incoming(event_id, kind, at, tuple(sorted(ids)), profile.delta_of(raw))


def test_an_event_that_changes_nothing_touches_nobody_and_keeps_updated_at() -> None:
    g = Graph()
    c = resolve(g, ev("e1", E1, kind="signup", props={"first_name": "Ann"})).customer_id
    assert list(g.touched) == [c] and g.customers[c].updated_at == T0
    # In the same batch (same graph, the row already `changed`): a sale that says nothing new.
    resolve(g, ev("e2", E1, seconds=30))
    assert g.touched == {} and g.customers[c].updated_at == T0
    resolve(g, ev("e3", E1, seconds=40, kind="consent_update",
                  props={"consents": {"email": "opted_in"}}))
    assert list(g.touched) == [c] and g.customers[c].updated_at == T0 + dt.timedelta(seconds=40)


def test_an_older_update_that_loses_everywhere_is_no_change() -> None:
    g = Graph()
    c = resolve(g, ev("e1", E1, kind="signup", props={"first_name": "Ann"})).customer_id
    resolve(g, ev("e2", E1, seconds=60, kind="profile_update", props={"first_name": "Anna"}))
    resolve(g, ev("e3", E1, seconds=10, kind="profile_update", props={"first_name": "Old"}))
    assert g.touched == {} and g.customers[c].updated_at == T0 + dt.timedelta(seconds=60)
    assert profile.view(g.customers[c].golden)["first_name"] == "Anna"


def test_a_merge_touches_both_and_an_older_event_moves_created_at_only() -> None:
    g = Graph()
    a = resolve(g, ev("e1", E1)).customer_id
    b = resolve(g, ev("e2", P1, seconds=5)).customer_id
    resolve(g, ev("e3", E1, P1, seconds=9))
    assert set(g.touched) == {a, b} and g.customers[b].tombstone
    assert g.customers[a].updated_at == T0 + dt.timedelta(seconds=9)
    resolve(g, ev("e4", P1, seconds=-50))
    assert list(g.touched) == [a] and g.customers[a].profile_changed
    assert g.customers[a].created_at == T0 - dt.timedelta(seconds=50)
    assert g.customers[a].updated_at == T0 + dt.timedelta(seconds=9)


def test_a_quarantine_note_touches_the_owner_at_the_event_time() -> None:
    g = Graph(guard=Guard(quarantine_customers=1))
    shared = ("phone", "+12125550999")
    owner = resolve(g, ev("q1", shared, ("loyalty_id", "L1"))).customer_id
    resolve(g, ev("q2", shared, ("loyalty_id", "L2"), seconds=20))
    assert owner in g.touched
    assert g.customers[owner].updated_at == T0 + dt.timedelta(seconds=20)
    assert customer_id_for("q2") in g.customers
