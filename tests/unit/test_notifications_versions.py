"""Event clock: a trigger is decided on the profile version in force at its fired_at, and counts only
the decisions before it, so a replay decides it the same whichever of the trigger and its
customer's later profile versions reached notifications first (issue 8)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifications.contacts import CHANNELS, Contact, contact_from_profile
from services.notifications.policy import (
    EVENT_HORIZON,
    NO_CONSENT,
    NO_CONTACT,
    PENDING,
    SUPPRESSED,
    NotificationRules,
    PriorNotice,
    Trigger,
    decide_all,
    decided_before,
    hold_deadline,
    version_at,
)
from shared.rules import load_rules

UTC = dt.UTC
RULES = NotificationRules.from_rules(load_rules(environ={}))
T0 = dt.datetime(2026, 9, 6, 12, 0, tzinfo=UTC)
RANK = {kind: i for i, kind in enumerate(RULES.priority)}
SEC = dt.timedelta(seconds=1)


def version(at: dt.datetime, n: int, consents=None, reachable=("email", "sms"), tz="UTC",
            preferred=None, cid="c1") -> Contact:
    return Contact(customer_id=cid, first_name="Mei", locale="en", timezone=tz,
                   preferred_channel=preferred, consents=consents or {}, version=n, valid_from=at,
                   reachable=frozenset(reachable))


def trig(tid: str, at: dt.datetime, kind="welcome", period="", cid="c1") -> Trigger:
    return Trigger(tid, kind, cid, at, period=period)


# -- the version in force ----------------------------------------------------------------------

def test_the_version_in_force_is_the_last_one_valid_at_or_before():
    v1, v2, v3 = version(T0, 1), version(T0 + 10 * SEC, 2), version(T0 + 10 * SEC, 3)
    versions = [v1, v2, v3]
    assert version_at(versions, T0, EVENT_HORIZON) == (v1, False)
    assert version_at(versions, T0 + 9 * SEC, EVENT_HORIZON) == (v1, False)
    # two versions of one instant: the higher version number is the later state
    assert version_at(versions, T0 + 10 * SEC, EVENT_HORIZON) == (v3, False)
    assert version_at(versions, T0 + dt.timedelta(days=400), EVENT_HORIZON) == (v3, False)


def test_before_the_first_version_the_first_one_stands_in_until_the_horizon():
    first = version(T0 + dt.timedelta(days=2), 1)
    assert version_at([first], T0, EVENT_HORIZON) == (first, False)
    assert version_at([first], T0, dt.timedelta(days=2)) == (None, True)  # came too late: no_contact
    assert version_at([], T0, EVENT_HORIZON) == (None, False)  # nothing yet: hold


def test_a_version_keeps_which_channels_could_be_reached_not_the_addresses():
    profile = {"customer_id": "c1", "identifiers": {"phone": ["+12125550100"]},
               "consents": {"whatsapp": "opted_in"}, "updated_at": T0, "version": 4}
    latest = contact_from_profile(profile)
    assert latest.valid_from == T0 and latest.channels_reachable() == frozenset({"sms", "whatsapp"})
    kept = version(T0, 4, consents={"whatsapp": "opted_in"}, reachable=latest.channels_reachable())
    assert kept.has_address("whatsapp") and not kept.has_address("email") and kept.address("sms") is None


def test_the_welcome_fired_at_signup_is_decided_without_the_consent_given_seconds_later():
    signup = version(T0, 1)
    consent = version(T0 + 10 * SEC, 2, consents={"email": "opted_in"})
    [d] = decide_all([trig("w", T0)], contacts={}, erased=set(), history={}, seen=set(), now=T0,
                     rules=RULES, as_of_fired_at=True, versions={"c1": [signup, consent]})
    assert (d.status, d.reason) == (SUPPRESSED, NO_CONSENT)
    [d] = decide_all([trig("w2", T0 + 20 * SEC)], contacts={}, erased=set(), history={}, seen=set(),
                     now=T0, rules=RULES, as_of_fired_at=True, versions={"c1": [signup, consent]})
    assert (d.status, d.channel) == (PENDING, "email") and d.contact == consent


def test_a_first_version_after_the_horizon_ends_the_trigger_no_contact_and_none_holds_it():
    late = version(T0 + EVENT_HORIZON, 1, consents={"email": "opted_in"})
    [d] = decide_all([trig("w", T0)], contacts={}, erased=set(), history={}, seen=set(), now=T0,
                     rules=RULES, as_of_fired_at=True, versions={"c1": [late]})
    assert (d.status, d.reason, d.channel) == (SUPPRESSED, NO_CONTACT, None)
    [d] = decide_all([trig("w", T0)], contacts={}, erased=set(), history={}, seen=set(), now=T0,
                     rules=RULES, as_of_fired_at=True, versions={})
    assert d.held and hold_deadline(d.trigger, T0, RULES, event_time=True) == T0 + EVENT_HORIZON


# -- caps and duplicates count only what was decided before, as decided --------------------------

def notice(tid: str, at: dt.datetime, kind="geo_thank_you", channel="sms", status="sent",
           period="p") -> PriorNotice:
    return PriorNotice(tid, kind, period, kind in RULES.promotional_kinds, at.date(), status,
                       at=at, channel=channel)


def test_decided_before_is_event_time_order_one_row_per_trigger():
    t = trig("t", T0, kind="abandoned_cart", period="cart")
    later = notice("later", T0 + SEC)
    same_instant_lower_priority = notice("geo", T0, kind="geo_thank_you")  # ranks after abandoned_cart
    same_instant_higher_priority = notice("bday", T0, kind="birthday_coupon")
    original = notice("f", T0 - SEC, status="failed")
    failover = notice("f", T0 - SEC / 2, channel="email", status="pending")
    got = decided_before([later, same_instant_lower_priority, same_instant_higher_priority,
                          original, failover], t, RANK)
    assert {(p.trigger_id, p.channel) for p in got} == {("bday", "sms"), ("f", "sms")}


def test_a_decision_counts_as_decided_whatever_delivery_did_since():
    # decided for sms, then suppressed at send time (an opt-out): the slot was still taken
    taken = notice("first", T0 - dt.timedelta(hours=1), status="suppressed")
    v = version(T0 - dt.timedelta(days=1), 1, consents={"sms": "opted_in"})
    [d] = decide_all([trig("second", T0, kind="geo_thank_you", period="q")], contacts={},
                     erased=set(), history={"c1": [taken]}, seen=set(), now=T0, rules=RULES,
                     as_of_fired_at=True, versions={"c1": [v]})
    assert d.reason == "frequency_cap"
    # one decided later in event time, though decided first, does not take an earlier one's slot
    ahead = notice("ahead", T0 + dt.timedelta(hours=1), status="pending")
    [d] = decide_all([trig("second", T0, kind="geo_thank_you", period="q")], contacts={},
                     erased=set(), history={"c1": [ahead]}, seen=set(), now=T0, rules=RULES,
                     as_of_fired_at=True, versions={"c1": [v]})
    assert (d.status, d.channel) == (PENDING, "sms")


# -- the same decisions whatever the arrival order -------------------------------------------------

KINDS = ("welcome", "geo_thank_you", "abandoned_cart", "birthday_coupon", "tier_upgrade")
CONSENTS = st.dictionaries(st.sampled_from(CHANNELS), st.sampled_from(["opted_in", "opted_out"]))


@st.composite
def worlds(draw):
    """One customer's profile versions and triggers over a few days, and an arrival of them.

    Arrival as the pipeline allows it: versions in their order (one partition), triggers in
    fired_at order (event-time merge), and a version valid at or before a trigger's fired_at never
    after that trigger (it was published before the trigger existed, and the event-time merge
    releases it first); a version after a trigger's fired_at may arrive before it or after it
    (the hop the profile saves), in any batches.
    """
    minutes = st.integers(min_value=0, max_value=5 * 24 * 60)
    v_times = sorted(draw(st.lists(minutes, min_size=0, max_size=4)))
    versions = [version(T0 + dt.timedelta(minutes=m), i + 1, consents=draw(CONSENTS),
                        reachable=draw(st.sets(st.sampled_from(CHANNELS))),
                        tz=draw(st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York"])),
                        preferred=draw(st.sampled_from([None, *CHANNELS])))
                for i, m in enumerate(v_times)]
    n = draw(st.integers(min_value=1, max_value=4))
    triggers = sorted((trig(f"t{i}", T0 + dt.timedelta(minutes=draw(minutes)),
                            kind=draw(st.sampled_from(KINDS)), period=draw(st.sampled_from(["a", "b"])))
                       for i in range(n)), key=lambda t: (t.fired_at, t.trigger_id))
    arrival: list = []
    vi = ti = 0
    while vi < len(versions) or ti < len(triggers):
        can_trigger = ti < len(triggers) and all(
            v.valid_from > triggers[ti].fired_at for v in versions[vi:])
        take_version = vi < len(versions) and (not can_trigger or draw(st.booleans()))
        if take_version:
            arrival.append(versions[vi])
            vi += 1
        else:
            arrival.append(triggers[ti])
            ti += 1
    cuts = draw(st.lists(st.booleans(), min_size=len(arrival), max_size=len(arrival)))
    return versions, triggers, cut_batches(arrival, cuts)


def _same_moment(a, b) -> bool:
    return isinstance(a, Trigger) and isinstance(b, Trigger) and a.fired_at == b.fired_at


def cut_batches(arrival: list, cuts: list[bool]) -> list[list]:
    """Batches cut where `cuts` says, except between two triggers of one moment: the event-time
    merge (shared/event_order.py) releases the records of one moment in one batch."""
    batches, current = [], []
    for i, (item, cut) in enumerate(zip(arrival, cuts, strict=True)):
        current.append(item)
        if cut and not (i + 1 < len(arrival) and _same_moment(item, arrival[i + 1])):
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches


def apply_batches(batches: list[list]) -> dict[str, tuple]:
    """What the handler does under the event clock, without the database: versions applied, held
    triggers released when a version arrives, everything decided by decide_all as of fired_at."""
    versions: list[Contact] = []
    held: dict[str, Trigger] = {}
    history: list[PriorNotice] = []
    decided: dict[str, tuple] = {}
    for batch in batches:
        new_versions = [x for x in batch if isinstance(x, Contact)]
        versions += new_versions
        released = list(held.values()) if new_versions else []
        if released:
            held.clear()
            gone = {t.trigger_id for t in released}
            history = [p for p in history if p.trigger_id not in gone]
        fresh = [x for x in batch if isinstance(x, Trigger)]
        seen = set(decided) | set(held)
        for d in decide_all(released + fresh, contacts={}, erased=set(), history={"c1": history},
                            seen=seen, now=T0, rules=RULES, as_of_fired_at=True,
                            versions={"c1": versions}):
            t = d.trigger
            history.append(PriorNotice(t.trigger_id, t.kind, t.period, d.promotional, d.cap_date,
                                       d.status, d.reason, at=t.fired_at, channel=d.channel))
            if d.held:
                held[t.trigger_id] = t
            else:
                decided[t.trigger_id] = (d.notification_id, d.status, d.reason, d.channel,
                                         d.scheduled_for, d.fallbacks)
    return {**decided, **{tid: "held" for tid in held}}


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_decisions_do_not_depend_on_the_arrival_order_or_batching(world):
    versions, triggers, batches = world
    canonical = apply_batches([versions, triggers])  # every version first, one batch
    assert apply_batches(batches) == canonical
    arrival = [x for b in batches for x in b]
    assert apply_batches(cut_batches(arrival, [True] * len(arrival))) == canonical  # smallest batches
    if versions:
        assert "held" not in canonical.values()


@pytest.mark.parametrize("arrival", ["profile-first", "trigger-first", "split"])
def test_the_consent_after_signup_race_from_the_issue(arrival):
    signup, consent = version(T0, 1), version(T0 + 10 * SEC, 2, consents={"email": "opted_in"})
    welcome = trig("w", T0)
    batches = {"profile-first": [[signup, consent, welcome]],
               "trigger-first": [[signup], [welcome], [consent]],
               "split": [[signup], [welcome, consent]]}[arrival]
    [(_, status, reason, channel, _, _)] = apply_batches(batches).values()
    assert (status, reason, channel) == (SUPPRESSED, NO_CONSENT, None)
