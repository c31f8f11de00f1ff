"""Identity resolution rules as pure functions: match, attach, merge, the over-merge guard,
erase, unmerge, and the property that order and repetition do not change the outcome."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.identity import profile
from services.identity.resolution import (
    NAMESPACE,
    Graph,
    Guard,
    Incoming,
    NoIdentifier,
    customer_id_for,
    merge_id_for,
    resolve,
    unmerge,
)

T0 = dt.datetime(2026, 11, 1, 10, 0, tzinfo=dt.UTC)


def ev(event_id: str, *ids: tuple[str, str], minutes: int = 0, kind: str = "sale",
       props: dict | None = None) -> Incoming:
    at = T0 + dt.timedelta(minutes=minutes)
    raw = {"event_id": event_id, "type": kind, "occurred_at": at, "properties": props}
    return Incoming(event_id, kind, at, tuple(sorted(ids)), profile.delta_of(raw))


E1, E2, E3 = ("email", "a@example.com"), ("email", "b@example.com"), ("email", "c@example.com")
P1, P2 = ("phone", "+12125550100"), ("phone", "+12125550101")
L1, L2, L3, L4, L5 = (("loyalty_id", f"L{i}") for i in range(1, 6))


def test_no_match_creates_a_customer_with_a_deterministic_id() -> None:
    g = Graph()
    r = resolve(g, ev("e1", E1, P1))
    assert r.outcome == "new" and r.customer_id == customer_id_for("e1")
    assert g.owners == {E1: r.customer_id, P1: r.customer_id}
    assert resolve(Graph(), ev("e1", E1)).customer_id == r.customer_id


@given(st.text(max_size=80), st.text(max_size=40), st.one_of(st.none(), st.text(max_size=40)))
@settings(max_examples=200, deadline=None)
def test_ids_are_uuid5_of_the_creating_event_and_of_the_merge(event_id, other, cause) -> None:
    assert customer_id_for(event_id) == str(uuid.uuid5(NAMESPACE, f"customer:{event_id}"))
    assert merge_id_for(event_id, other, cause) == str(
        uuid.uuid5(NAMESPACE, f"merge:{event_id}:{other}:{cause or ''}"))


def test_one_match_attaches_new_identifiers() -> None:
    g = Graph()
    c = resolve(g, ev("e1", P1)).customer_id
    r = resolve(g, ev("e2", P1, E1, minutes=5))
    assert (r.customer_id, r.outcome) == (c, "attached")
    assert g.owners[E1] == c and g.homes[E1] == c
    assert resolve(g, ev("e3", E1, minutes=6)).outcome == "matched"


def test_several_matches_merge_into_the_oldest_with_a_merge_edge() -> None:
    g = Graph()
    later = resolve(g, ev("web", E1, minutes=10)).customer_id
    older = resolve(g, ev("pos", P1, minutes=0)).customer_id
    r = resolve(g, ev("wa", E1, P1, minutes=20))
    assert r.outcome == "merged" and r.customer_id == older
    (edge,) = r.merges
    assert (edge.survivor, edge.merged, edge.cause_event_id) == (older, later, "wa")
    assert edge.merge_id == merge_id_for(older, later, "wa")
    assert edge.reason == "shared email,phone"
    assert g.customers[later].merged_into == older and g.customers[later].tombstone
    assert g.customers[older].members == sorted([older, later])
    assert g.partition() == {frozenset({E1, P1})}


def test_same_created_at_tie_breaks_by_id() -> None:
    g = Graph()
    a = resolve(g, ev("x1", E1)).customer_id
    b = resolve(g, ev("x2", P1)).customer_id
    r = resolve(g, ev("x3", E1, P1))
    assert r.customer_id == min(a, b)


def test_newest_non_empty_field_wins_and_merge_folds_profiles() -> None:
    g = Graph()
    a = resolve(g, ev("s1", E1, kind="signup", props={"first_name": "Ann", "locale": "en"})).customer_id
    resolve(g, ev("s2", P1, minutes=30, kind="signup", props={"first_name": "Annie", "locale": None,
                                                               "tags": ["vip"]}))
    resolve(g, ev("s3", P1, minutes=10, kind="profile_update", props={"first_name": "OLD"}))
    resolve(g, ev("c1", E1, minutes=5, kind="consent_update",
                  props={"consents": {"sms": "opted_in", "email": "opted_out"}}))
    resolve(g, ev("c2", P1, minutes=1, kind="consent_update", props={"consents": {"sms": "opted_out"}}))
    resolve(g, ev("m", E1, P1, minutes=40))
    v = profile.view(g.customers[a].golden)
    assert v["first_name"] == "Annie" and v["locale"] == "en" and v["tags"] == ["vip"]
    assert v["consents"] == {"email": "opted_out", "sms": "opted_in"}


def test_tags_removed_after_added_are_gone() -> None:
    g = Graph()
    c = resolve(g, ev("t1", E1, kind="profile_update", props={"tags": ["a", "b"]})).customer_id
    resolve(g, ev("t2", E1, minutes=1, kind="profile_update", props={"tags_removed": ["a"]}))
    assert profile.view(g.customers[c].golden)["tags"] == ["b"]


def test_event_without_usable_identifier_is_refused() -> None:
    with pytest.raises(NoIdentifier):
        resolve(Graph(), ev("none"))


def test_type_limit_keeps_extra_emails_off_the_customer() -> None:
    g = Graph(guard=Guard(max_per_type=2, quarantine_customers=100))
    c = resolve(g, ev("a", E1, E2)).customer_id
    r = resolve(g, ev("b", E1, E3, minutes=1))
    assert r.customer_id == c and E3 not in g.owners
    assert r.quarantined == [(E3, "type_limit")]
    assert {"type": "email", "value": E3[1], "reason": "type_limit"} in g.customers[c].quarantined


def test_merge_that_would_exceed_the_limit_is_refused_and_noted() -> None:
    g = Graph(guard=Guard(max_per_type=2, quarantine_customers=100))
    a = resolve(g, ev("a", E1, E2, L1)).customer_id
    b = resolve(g, ev("b", E3, ("email", "d@example.com"), L2, minutes=1)).customer_id
    r = resolve(g, ev("c", L1, L2, minutes=2))
    assert r.customer_id == a and not r.merges
    assert g.owners[L2] == b
    assert (L2, "merge_limit") in r.quarantined


def test_identifier_seen_on_too_many_customers_is_quarantined_not_merged() -> None:
    # A store's phone typed in for every shopper, each with their own loyalty card.
    g = Graph(guard=Guard(max_per_type=5, quarantine_customers=3))
    first = resolve(g, ev("p1", L1, P1)).customer_id
    resolve(g, ev("p2", L2, P1, minutes=1))
    resolve(g, ev("p3", L3, P1, minutes=2))
    r = resolve(g, ev("p4", L4, P1, minutes=3))
    assert g.quarantined[P1] == "shared_identifier"
    assert r.customer_id != first and r.customer_id == customer_id_for("p4")
    assert (P1, "shared_identifier") in r.quarantined
    r5 = resolve(g, ev("p5", L5, P1, minutes=4))
    assert r5.outcome == "new" and P1 not in r5.identifiers
    with pytest.raises(NoIdentifier):
        resolve(g, ev("p6", P1, minutes=5))


def test_the_same_person_returning_does_not_count_as_another_customer() -> None:
    g = Graph(guard=Guard(max_per_type=5, quarantine_customers=1))
    resolve(g, ev("a", L1, P1))
    for i in range(5):
        resolve(g, ev(f"again{i}", L1, P1, minutes=i + 1))
    assert P1 not in g.quarantined


def test_erase_forgets_identifiers_and_a_later_event_makes_a_new_customer() -> None:
    g = Graph()
    c = resolve(g, ev("s", E1, P1, kind="signup", props={"first_name": "Ann"})).customer_id
    r = resolve(g, ev("er", E1, minutes=1, kind="erase_request"))
    assert r.erased and r.customer_id == c
    cust = g.customers[c]
    assert cust.erased and not cust.identifiers and profile.is_empty(cust.golden)
    assert E1 not in g.owners and P1 not in g.owners
    again = resolve(g, ev("later", E1, minutes=2))
    assert again.outcome == "new" and again.customer_id != c


def test_unmerge_splits_along_the_edge_and_blocks_remerging() -> None:
    g = Graph()
    a = resolve(g, ev("pos", P1, L1, kind="signup", props={"first_name": "Ann"})).customer_id
    b = resolve(g, ev("web", E1, minutes=5, kind="signup", props={"first_name": "Bob"})).customer_id
    resolve(g, ev("link", P1, E1, E2, minutes=10))
    assert profile.view(g.customers[a].golden)["first_name"] == "Bob"
    homes = {i: (g.homes.get(i) or a) for i in g.customers[a].identifiers}
    split = unmerge(g.customers, a, b, homes)
    assert split.moved == [E1]
    assert g.customers[a].identifiers == {P1, L1, E2}
    assert profile.view(split.merged.golden)["first_name"] == "Bob"
    assert profile.view(split.survivor.golden)["first_name"] == "Ann"
    assert g.customers[b].merged_into is None and g.customers[a].members == [a]
    for ident in split.moved:
        g.owners[ident] = b
    r = resolve(g, ev("again", P1, E1, minutes=20))
    assert not r.merges and r.customer_id == a
    assert (E1, "unmerged_pair") in r.quarantined


# -- properties -----------------------------------------------------------------------------
POOL = [("email", f"u{i}@example.com") for i in range(4)] + \
       [("phone", f"+1212555010{i}") for i in range(4)] + [("loyalty_id", f"L{i}") for i in range(4)]

events_strategy = st.lists(
    st.tuples(st.sets(st.sampled_from(POOL), min_size=1, max_size=3), st.integers(0, 500)),
    min_size=1, max_size=14)


def _events(spec) -> list[Incoming]:
    return [ev(f"e{n}", *sorted(ids), minutes=m) for n, (ids, m) in enumerate(spec)]


def _expected_partition(events: list[Incoming]) -> set[frozenset]:
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in events:
        first = e.identifiers[0]
        for other in e.identifiers:
            parent[find(other)] = find(first)
    groups: dict = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return {frozenset(g) for g in groups.values()}


@settings(max_examples=200, deadline=None)
@given(events_strategy, st.randoms(use_true_random=False))
def test_any_order_or_twice_gives_the_same_partition(spec, rnd) -> None:
    events = _events(spec)
    in_order = Graph(guard=Guard.off())
    for e in events:
        resolve(in_order, e)
    shuffled = list(events)
    rnd.shuffle(shuffled)
    twice = Graph(guard=Guard.off())
    for e in shuffled + shuffled:
        resolve(twice, e)
    assert in_order.partition() == twice.partition() == _expected_partition(events)


@settings(max_examples=100, deadline=None)
@given(events_strategy, st.randoms(use_true_random=False))
def test_golden_profile_does_not_depend_on_order(spec, rnd) -> None:
    events = [ev(f"e{n}", *sorted(ids), minutes=m, kind="profile_update",
                 props={"first_name": f"N{n}", "tags": [f"t{n % 3}"]})
              for n, (ids, m) in enumerate(spec)]
    results = []
    for order in (events, rnd.sample(events, len(events))):
        g = Graph(guard=Guard.off())
        for e in order:
            resolve(g, e)
        roots = {g.owners[i] for i in g.owners}
        results.append({frozenset(g.customers[r].identifiers): profile.view(g.customers[r].golden)
                        for r in roots})
    assert results[0] == results[1]


def test_profile_view_shapes_every_field() -> None:
    """Empty states show every field empty; a partial address shows its other parts as None;
    only present tags, and consents by channel."""
    none = dict.fromkeys(profile.FIELDS)
    assert profile.view(profile.empty()) == {**none, "address": None, "tags": [], "consents": {}}
    assert profile.view({}) == profile.view(profile.empty())
    state = {"f": {"first_name": ["Ann", 2, "e2"], "address.city": ["Paris", 1, "e1"]},
             "t": {"vip": [True, 1, "e1"], "old": [False, 2, "e2"], "new": [True, 2, "e2"]},
             "c": {"sms": ["opted_out", 1, "e1"], "email": ["opted_in", 2, "e2"]}}
    v = profile.view(state)
    assert v == {**none, "first_name": "Ann",
                 "address": {**dict.fromkeys(profile.ADDRESS_FIELDS), "city": "Paris"},
                 "tags": ["new", "vip"], "consents": {"email": "opted_in", "sms": "opted_out"}}
    assert list(v) == [*profile.FIELDS, "address", "tags", "consents"]
