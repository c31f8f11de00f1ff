"""The notification decision: consent matrix, quiet hours across zones and DST, caps, priority."""

from __future__ import annotations

import datetime as dt

import pytest

from services.notifications.contacts import Contact
from services.notifications.policy import (
    DEFERRED,
    PENDING,
    SUPPRESSED,
    NotificationRules,
    PriorNotice,
    Trigger,
    cap_blocks,
    check_before_send,
    decide,
    decide_all,
    hold_deadline,
    hold_expired,
    next_fallback,
    notification_id,
    retry_delay,
)
from shared.rules import load_rules

UTC = dt.UTC
RULES = NotificationRules.from_rules(load_rules(environ={}))
NOON_UTC = dt.datetime(2026, 6, 10, 12, 0, tzinfo=UTC)


def contact(**kw) -> Contact:
    base = dict(customer_id="c1", emails=("a@example.com",), phones=("+12125550100",),
                consents={"whatsapp": "opted_in", "sms": "opted_in", "email": "opted_in"},
                timezone="UTC")
    base.update(kw)
    return Contact(**base)


def trig(kind="birthday_coupon", at=NOON_UTC, tid="t1", period="2026", cid="c1") -> Trigger:
    return Trigger(tid, kind, cid, at, period=period)


def run(t, c, history=(), now=None, erased=False, stores=None):
    return decide(t, c, erased=erased, history=list(history), now=now or t.fired_at, rules=RULES,
                  store_timezones=stores or {})


def test_rules_come_from_rules_yaml():
    assert RULES.per_day == 1 and RULES.per_7_days == 3
    assert RULES.quiet_start == dt.time(21) and RULES.quiet_end == dt.time(9)
    assert "welcome" in RULES.service_kinds and "campaign" in RULES.promotional_kinds


# -- consent matrix ------------------------------------------------------------------------

@pytest.mark.parametrize("consents,preferred,expected,fallbacks", [
    ({"whatsapp": "opted_in", "sms": "opted_in", "email": "opted_in"}, None, "whatsapp", ("sms", "email")),
    ({"whatsapp": "opted_in", "sms": "opted_in", "email": "opted_in"}, "email", "email", ("whatsapp", "sms")),
    ({"whatsapp": "opted_out", "sms": "opted_in", "email": "opted_in"}, "whatsapp", "sms", ("email",)),
    ({"email": "opted_in"}, "sms", "email", ()),
    ({"sms": "opted_in"}, None, "sms", ()),
])
def test_channel_is_preferred_if_consented_else_first_consented(consents, preferred, expected, fallbacks):
    d = run(trig(), contact(consents=consents, preferred_channel=preferred))
    assert (d.status, d.channel, d.fallbacks) == (PENDING, expected, fallbacks)
    assert d.notification_id == notification_id("t1", expected)


@pytest.mark.parametrize("kind", ["birthday_coupon", "welcome", "tier_upgrade"])
@pytest.mark.parametrize("consents", [{}, {"sms": "opted_out", "email": "opted_out", "whatsapp": "opted_out"}])
def test_no_recorded_consent_means_no_message_even_for_service_kinds(kind, consents):
    d = run(trig(kind), contact(consents=consents))
    assert (d.status, d.reason, d.channel) == (SUPPRESSED, "no_consent", None)


def test_consent_without_an_address_is_no_contact():
    d = run(trig(), contact(emails=(), consents={"email": "opted_in", "sms": "opted_out"}))
    assert (d.status, d.reason) == (SUPPRESSED, "no_contact")


def test_whatsapp_uses_the_phone_when_no_whatsapp_id_and_skips_unreachable_channels():
    d = run(trig(), contact(phones=(), consents={"whatsapp": "opted_in", "email": "opted_in"}))
    assert d.channel == "email" and d.fallbacks == ()


def test_unknown_customer_awaits_its_profile_and_erased_customer_erased():
    d = run(trig(), None)
    assert (d.status, d.reason, d.channel, d.scheduled_for, d.held) == (
        PENDING, "awaiting_profile", None, None, True)
    assert d.notification_id == notification_id("t1", None)
    assert run(trig(), None, erased=True).reason == "erased"


def test_same_kind_and_period_under_another_trigger_id_is_duplicate():
    prior = [PriorNotice("other", "birthday_coupon", "2026", True, NOON_UTC.date(), "sent")]
    assert run(trig(), contact(), prior).reason == "duplicate"
    failed = [PriorNotice("other", "birthday_coupon", "2026", True, NOON_UTC.date(), "failed")]
    assert run(trig(), contact(), failed).status == PENDING


# -- quiet hours -----------------------------------------------------------------------------

@pytest.mark.parametrize("tz,utc_at,expected_utc", [
    # 22:00 in Shanghai (UTC+8) -> 09:00 next day local = 01:00 UTC
    ("Asia/Shanghai", dt.datetime(2026, 6, 10, 14, 0, tzinfo=UTC), dt.datetime(2026, 6, 11, 1, 0, tzinfo=UTC)),
    # 03:00 in New York (EDT) -> 09:00 same day local = 13:00 UTC
    ("America/New_York", dt.datetime(2026, 6, 10, 7, 0, tzinfo=UTC), dt.datetime(2026, 6, 10, 13, 0, tzinfo=UTC)),
    # exactly 21:00 local is quiet
    ("UTC", dt.datetime(2026, 6, 10, 21, 0, tzinfo=UTC), dt.datetime(2026, 6, 11, 9, 0, tzinfo=UTC)),
])
def test_quiet_hours_defer_to_nine_local(tz, utc_at, expected_utc):
    d = run(trig(at=utc_at), contact(timezone=tz))
    assert (d.status, d.reason, d.scheduled_for) == (DEFERRED, "quiet_hours", expected_utc)


@pytest.mark.parametrize("local_time", [dt.time(9, 0), dt.time(12, 0), dt.time(20, 59)])
def test_outside_quiet_hours_is_sent_now(local_time):
    at = dt.datetime.combine(dt.date(2026, 6, 10), local_time, tzinfo=UTC)
    d = run(trig(at=at), contact())
    assert (d.status, d.scheduled_for) == (PENDING, at)


def test_same_instant_is_quiet_in_one_zone_and_not_in_another():
    at = dt.datetime(2026, 6, 10, 14, 0, tzinfo=UTC)  # 22:00 Shanghai, 10:00 New York
    assert run(trig(at=at), contact(timezone="Asia/Shanghai")).status == DEFERRED
    assert run(trig(at=at), contact(timezone="America/New_York")).status == PENDING


def test_dst_spring_forward_wakes_at_nine_edt_not_est():
    # 2026-03-08 New York springs forward at 02:00. 00:30 EST = 05:30 UTC; 09:00 EDT = 13:00 UTC.
    d = run(trig(at=dt.datetime(2026, 3, 8, 5, 30, tzinfo=UTC)), contact(timezone="America/New_York"))
    assert d.scheduled_for == dt.datetime(2026, 3, 8, 13, 0, tzinfo=UTC)


def test_dst_fall_back_wakes_at_nine_est():
    # 2026-11-01 New York falls back at 02:00. 23:00 EDT on Oct 31 = 03:00 UTC Nov 1;
    # 09:00 EST on Nov 1 = 14:00 UTC.
    d = run(trig(at=dt.datetime(2026, 11, 1, 3, 0, tzinfo=UTC)), contact(timezone="America/New_York"))
    assert d.scheduled_for == dt.datetime(2026, 11, 1, 14, 0, tzinfo=UTC)
    assert d.cap_date == dt.date(2026, 11, 1)


def test_time_zone_falls_back_to_home_store_then_default():
    at = dt.datetime(2026, 6, 10, 14, 0, tzinfo=UTC)  # 22:00 in Shanghai
    c = contact(timezone=None, home_store_id="sh")
    assert run(trig(at=at), c, stores={"sh": "Asia/Shanghai"}).status == DEFERRED
    assert run(trig(at=at), c).timezone == RULES.default_timezone
    assert run(trig(at=at), contact(timezone="Not/AZone")).timezone == RULES.default_timezone


def test_processing_late_uses_now_not_the_old_fire_time():
    fired = dt.datetime(2026, 6, 10, 20, 30, tzinfo=UTC)
    d = run(trig(at=fired), contact(), now=fired + dt.timedelta(hours=1))
    assert d.status == DEFERRED and d.scheduled_for == dt.datetime(2026, 6, 11, 9, 0, tzinfo=UTC)


# -- frequency caps --------------------------------------------------------------------------

def prior(day: dt.date, kind="win_back", status="sent", tid=None) -> PriorNotice:
    return PriorNotice(tid or f"p{day}{kind}", kind, f"{day}", kind in RULES.promotional_kinds, day, status)


def test_one_promotional_message_a_local_day():
    today = NOON_UTC.date()
    assert run(trig(), contact(), [prior(today)]).reason == "frequency_cap"
    assert run(trig(), contact(), [prior(today - dt.timedelta(days=1))]).status == PENDING
    # suppressed and failed ones do not count
    assert run(trig(), contact(), [prior(today, status="suppressed"), prior(today, status="failed", tid="x")]).status == PENDING


def test_three_in_seven_days_at_the_boundary():
    d = dt.date(2026, 6, 10)
    three_in_window = [prior(d - dt.timedelta(days=n)) for n in (2, 4, 6)]
    assert cap_blocks(d, [p.cap_date for p in three_in_window], RULES)
    # the oldest one is 7 days before: outside every 7-day window that holds today
    shifted = [prior(d - dt.timedelta(days=n)) for n in (2, 4, 7)]
    assert not cap_blocks(d, [p.cap_date for p in shifted], RULES)
    two = [prior(d - dt.timedelta(days=n)) for n in (1, 6)]
    assert not cap_blocks(d, [p.cap_date for p in two], RULES)
    # later ones count too: windows are any 7 consecutive days containing today
    around = [d - dt.timedelta(days=3), d + dt.timedelta(days=2), d + dt.timedelta(days=3)]
    assert cap_blocks(d, around, RULES)
    assert not cap_blocks(d, [d - dt.timedelta(days=6), d + dt.timedelta(days=1), d + dt.timedelta(days=6)], RULES)


def test_service_kinds_are_not_capped_and_do_not_count():
    today = NOON_UTC.date()
    assert run(trig("welcome"), contact(), [prior(today)]).status == PENDING
    services = [prior(today, kind="tier_upgrade"), prior(today, kind="welcome")]
    assert run(trig(), contact(), services).status == PENDING


def test_deferred_message_counts_on_the_day_it_will_be_sent():
    evening = dt.datetime(2026, 6, 10, 22, 0, tzinfo=UTC)
    d = run(trig(at=evening), contact(), [prior(dt.date(2026, 6, 10))])
    assert (d.status, d.cap_date) == (DEFERRED, dt.date(2026, 6, 11))


def test_priority_when_two_triggers_compete_for_one_day():
    c = contact()
    win_back = trig("win_back", tid="w", period="lapse-1")
    birthday = trig("birthday_coupon", tid="b", period="2026")
    for order in ([win_back, birthday], [birthday, win_back]):
        decisions = {d.trigger.kind: d for d in decide_all(
            order, contacts={"c1": c}, erased=set(), history={}, seen=set(), now=NOON_UTC, rules=RULES)}
        assert decisions["birthday_coupon"].status == PENDING
        assert decisions["win_back"].reason == "frequency_cap"


def test_batch_drops_seen_and_repeated_trigger_ids():
    c = contact()
    decisions = decide_all([trig(tid="a"), trig(tid="a"), trig(tid="seen", kind="welcome")],
                           contacts={"c1": c}, erased=set(), history={}, seen={"seen"},
                           now=NOON_UTC, rules=RULES)
    assert [d.trigger.trigger_id for d in decisions] == ["a"]


# -- at send time ----------------------------------------------------------------------------

def test_send_check_rechecks_consent_erasure_and_quiet_hours():
    c = contact()
    assert check_before_send("sms", c, erased=False, now=NOON_UTC, tz_name="UTC", rules=RULES).action == "send"
    opted_out = contact(consents={"sms": "opted_out"})
    assert check_before_send("sms", opted_out, erased=False, now=NOON_UTC, tz_name="UTC", rules=RULES).reason == "no_consent"
    assert check_before_send("sms", None, erased=True, now=NOON_UTC, tz_name="UTC", rules=RULES).reason == "erased"
    night = dt.datetime(2026, 6, 10, 23, 0, tzinfo=UTC)
    check = check_before_send("sms", c, erased=False, now=night, tz_name="UTC", rules=RULES)
    assert check.action == "defer" and check.until == dt.datetime(2026, 6, 11, 9, 0, tzinfo=UTC)


def test_fallback_skips_channels_no_longer_consented():
    c = contact(consents={"sms": "opted_out", "email": "opted_in"})
    assert next_fallback(("sms", "email"), c) == ("email", ())
    assert next_fallback(("sms",), c) == (None, ())


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap():
    assert retry_delay(1, RULES, 0.999) == pytest.approx(2.0, rel=0.01)
    assert retry_delay(3, RULES, 0.0) == pytest.approx(4.0)
    assert retry_delay(30, RULES, 0.999) <= RULES.max_delay_seconds


# -- a trigger that overtakes its customer's profile ---------------------------------------------

def test_grace_period_comes_from_rules_yaml_and_bounds_the_hold():
    assert RULES.profile_grace_seconds == 300
    t = trig(at=NOON_UTC)
    deadline = hold_deadline(t, NOON_UTC - dt.timedelta(minutes=1), RULES)
    assert deadline == NOON_UTC + dt.timedelta(seconds=300)  # from the later of now and fired_at
    assert hold_deadline(t, NOON_UTC + dt.timedelta(minutes=1), RULES) == NOON_UTC + dt.timedelta(minutes=6)
    assert not hold_expired(deadline, deadline - dt.timedelta(milliseconds=1))
    assert hold_expired(deadline, deadline)


def test_held_trigger_needs_no_consent_check_yet_but_erasure_unknown_kind_and_duplicates_still_win():
    assert run(trig(kind="mystery"), None).reason == "unknown_kind"
    assert run(trig(), None, erased=True).status == SUPPRESSED
    sent = [PriorNotice("other", "birthday_coupon", "2026", True, NOON_UTC.date(), "sent")]
    assert run(trig(), None, sent).reason == "duplicate"


def test_a_held_trigger_counts_neither_for_duplicates_nor_caps():
    held = PriorNotice("other", "birthday_coupon", "2026", True, None, PENDING, "awaiting_profile")
    assert not held.counts
    assert run(trig(), contact(), [held]).status == PENDING
    capped = PriorNotice("x", "win_back", "lapse", True, NOON_UTC.date(), PENDING, None)
    assert capped.counts and run(trig(), contact(), [capped]).reason == "frequency_cap"


def test_the_released_trigger_is_decided_like_one_whose_profile_came_first():
    """Held then released with the profile, or decided after it: the same decision and id."""
    t = trig(kind="welcome", period="", tid="w1")
    assert run(t, None).held
    later = NOON_UTC + dt.timedelta(minutes=2)
    released = run(t, contact(consents={"email": "opted_in"}), now=later)
    assert (released.status, released.channel, released.scheduled_for) == (PENDING, "email", later)
    assert released.notification_id == notification_id("w1", "email")
    refused = run(t, contact(consents={}), now=later)
    assert (refused.status, refused.reason) == (SUPPRESSED, "no_consent")
    assert refused.notification_id == run(t, None).notification_id  # the held row's id, in place


def test_held_triggers_released_in_one_batch_compete_by_priority():
    """Two offers held for one customer: once the profile is there, one day's slot, by priority."""
    a = trig(kind="win_back", tid="a", period="lapse")
    b = trig(kind="birthday_coupon", tid="b", period="2026")
    held = decide_all([a, b], contacts={}, erased=set(), history={}, seen=set(), now=NOON_UTC,
                      rules=RULES)
    assert all(d.held for d in held)  # neither blocks the other while they wait
    decided = {d.trigger.trigger_id: d for d in decide_all(
        [a, b], contacts={"c1": contact()}, erased=set(), history={}, seen=set(), now=NOON_UTC,
        rules=RULES)}
    assert decided["b"].status == PENDING and decided["a"].reason == "frequency_cap"


def test_the_dispatcher_never_sends_a_notification_without_a_channel():
    check = check_before_send(None, contact(), erased=False, now=NOON_UTC, tz_name="UTC", rules=RULES)
    assert (check.action, check.reason) == ("suppress", "no_contact")
