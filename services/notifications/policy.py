"""The notification decision, as pure functions: which channel, or why not; now, or at 09:00 local.

No I/O here: a trigger, what is known of the customer and their recent notifications go in, a
Decision comes out. The same inputs always give the same decision (CONTRACTS §5 Notifications).
"""

from __future__ import annotations

import bisect
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.notifications.contacts import CHANNELS, Address, Contact
from shared.ids import uuid5

UTC = dt.UTC
NOTIFICATION_NS = uuid.UUID("5b0f6f7e-8d0c-4c1e-9e55-6f1c1f1e0a04")

# Statuses of a notification (CONTRACTS §3).
PENDING, DEFERRED, SENT, DELIVERED, FAILED, SUPPRESSED = (
    "pending", "deferred", "sent", "delivered", "failed", "suppressed")
# A notification that reached, or may still reach, the customer: it counts for caps and duplicates.
ACTIVE = frozenset({PENDING, DEFERRED, SENT, DELIVERED})

# Suppression reasons.
NO_CONSENT, NO_CONTACT, FREQUENCY_CAP, ERASED, DUPLICATE, UNKNOWN_KIND = (
    "no_consent", "no_contact", "frequency_cap", "erased", "duplicate", "unknown_kind")
QUIET_HOURS = "quiet_hours"
# A trigger for a customer whose profile has not reached this service yet (the trigger is two hops
# after identity, the profile one: a brand-new signup's welcome can overtake its profile). It waits,
# `pending` with no channel, until the profile arrives or the grace period ends (then no_contact).
AWAITING_PROFILE = "awaiting_profile"

# When two promotional triggers compete for one day's slot in the same batch, the first here
# wins: time-critical, personal offers before generic ones. Overridable by rules `priority`.
DEFAULT_PRIORITY = (
    "welcome", "tier_upgrade", "points_expiring",
    "birthday_coupon", "abandoned_cart", "geo_thank_you", "store_event_invite",
    "replenishment", "win_back", "campaign",
)


_NS = NOTIFICATION_NS.bytes


def notification_id(trigger_id: str, channel: str | None) -> str:
    """uuid5 of trigger_id and channel: re-deciding a trigger never makes a second notification."""
    return uuid5(_NS, f"{trigger_id}:{channel or '-'}")


def outcome_id(notification: str, status: str, attempt: int, reason: str | None) -> str:
    """Deterministic id of one status change, so a republished outcome is recognisably the same."""
    return uuid5(_NS, f"{notification}:{status}:{attempt}:{reason or ''}")


def _hhmm(value: str) -> dt.time:
    hours, _, minutes = str(value).partition(":")
    return dt.time(int(hours), int(minutes or 0))


@dataclass(frozen=True)
class NotificationRules:
    """The `notifications` section of rules.yaml, typed."""

    channel_order: tuple[str, ...] = ("whatsapp", "sms", "email")
    quiet_start: dt.time = dt.time(21, 0)
    quiet_end: dt.time = dt.time(9, 0)
    default_timezone: str = "UTC"
    per_day: int = 1
    per_7_days: int = 3
    promotional_kinds: frozenset[str] = frozenset({
        "birthday_coupon", "geo_thank_you", "win_back", "abandoned_cart", "replenishment",
        "store_event_invite", "campaign"})
    service_kinds: frozenset[str] = frozenset({"welcome", "tier_upgrade", "points_expiring"})
    priority: tuple[str, ...] = DEFAULT_PRIORITY
    max_attempts: int = 4
    base_delay_seconds: float = 2.0
    max_delay_seconds: float = 300.0
    provider_concurrency: Mapping[str, int] = field(
        default_factory=lambda: {"email": 8, "sms": 8, "whatsapp": 8})
    locales: tuple[str, ...] = ("en", "zh-Hans", "zh-Hant")
    profile_grace_seconds: float = 300.0

    @classmethod
    def from_rules(cls, rules: Mapping[str, Any]) -> NotificationRules:
        """From the whole rules dict (its `notifications` section)."""
        n = rules.get("notifications") or {}
        quiet = n.get("quiet_hours") or {}
        caps = n.get("frequency_caps") or {}
        retry = n.get("retry") or {}
        d = cls()
        return cls(
            channel_order=tuple(n.get("channel_order") or d.channel_order),
            quiet_start=_hhmm(quiet.get("start", "21:00")),
            quiet_end=_hhmm(quiet.get("end", "09:00")),
            default_timezone=str(n.get("default_timezone") or d.default_timezone),
            per_day=int(caps.get("per_day", d.per_day)),
            per_7_days=int(caps.get("per_7_days", d.per_7_days)),
            promotional_kinds=frozenset(n.get("promotional_kinds") or d.promotional_kinds),
            service_kinds=frozenset(n.get("service_kinds") or d.service_kinds),
            priority=tuple(n.get("priority") or d.priority),
            max_attempts=int(retry.get("max_attempts", d.max_attempts)),
            base_delay_seconds=float(retry.get("base_delay_seconds", d.base_delay_seconds)),
            max_delay_seconds=float(retry.get("max_delay_seconds", d.max_delay_seconds)),
            provider_concurrency=dict(n.get("provider_concurrency") or d.provider_concurrency),
            locales=tuple(n.get("locales") or d.locales),
            profile_grace_seconds=float(n.get("profile_grace_seconds", d.profile_grace_seconds)),
        )

    @property
    def kinds(self) -> frozenset[str]:
        return self.promotional_kinds | self.service_kinds


@dataclass(frozen=True)
class Offer:
    """The coupon a trigger carries; money in minor units."""

    code: str
    description: str
    amount: int
    min_spend: int
    currency: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Trigger:
    """A decoded `triggers.fired.v1` record."""

    trigger_id: str
    kind: str
    customer_id: str
    fired_at: dt.datetime
    period: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    offer: Offer | None = None
    occurred_at: dt.datetime | None = None

    @classmethod
    def from_record(cls, value: Mapping[str, Any]) -> Trigger:
        offer = value.get("offer")
        return cls(
            trigger_id=value["trigger_id"], kind=value["kind"], customer_id=value["customer_id"],
            fired_at=value["fired_at"], period=value.get("period") or "",
            context=dict(value.get("context") or {}),
            offer=Offer(code=offer["code"], description=offer["description"],
                        amount=int(offer["amount"]), min_spend=int(offer.get("min_spend") or 0),
                        currency=offer["currency"], expires_at=offer["expires_at"])
            if offer else None,
            occurred_at=value.get("occurred_at"),
        )


@dataclass(frozen=True)
class PriorNotice:
    """A notification already decided for this customer (or one merged into them)."""

    trigger_id: str
    kind: str
    period: str
    promotional: bool
    cap_date: dt.date | None
    status: str
    reason: str | None = None
    at: dt.datetime | None = None  # when it was decided (under the event clock: its fired_at)
    channel: str | None = None     # the channel it was decided for (None: suppressed or held)

    @property
    def counts(self) -> bool:
        """Reached, or may still reach, the customer: counts for caps and duplicates.

        A trigger held for its profile does not: it has no channel yet and may end no_contact;
        when it is decided, its real decision joins the history instead.
        """
        return self.status in ACTIVE and not is_held(self.status, self.reason)

    @property
    def counts_as_decided(self) -> bool:
        """Event clock: it was decided to be sent (a channel chosen), whatever delivery did since.

        What the dispatcher did later (an opt-out at send time, a failed provider) runs on its own
        timer; counting the decision keeps the next decision a function of event times only.
        """
        return self.channel is not None


def is_held(status: str, reason: str | None) -> bool:
    """A notification waiting for its customer's profile (no channel chosen yet)."""
    return status == PENDING and reason == AWAITING_PROFILE


@dataclass(frozen=True)
class Decision:
    """What to do with one trigger."""

    trigger: Trigger
    status: str  # pending, deferred or suppressed
    reason: str | None
    channel: str | None
    fallbacks: tuple[str, ...]
    scheduled_for: dt.datetime | None
    cap_date: dt.date | None
    timezone: str
    promotional: bool
    # The customer as the decision saw them (the version in force, under the event clock).
    contact: Contact | None = field(default=None, compare=False, repr=False)

    @property
    def notification_id(self) -> str:
        return notification_id(self.trigger.trigger_id, self.channel)

    @property
    def held(self) -> bool:
        return is_held(self.status, self.reason)


def hold_deadline(trigger: Trigger, now: dt.datetime, rules: NotificationRules,
                  event_time: bool = False) -> dt.datetime:
    """Until when a trigger waits for its customer's profile before it ends no_contact.

    `event_time` (the event clock): EVENT_HORIZON after its fired_at, the same bound version_at
    judges a first version by, so the sweep and a late profile end it alike.
    """
    if event_time:
        return trigger.fired_at + EVENT_HORIZON
    return max(now, trigger.fired_at) + dt.timedelta(seconds=rules.profile_grace_seconds)


# Event clock: how long, in event time, a trigger waits for its customer's first profile version,
# and how long a superseded version is kept. Under the event clock the wait is not for a profile
# still on the network (the wall clock's `profile_grace_seconds`) but for identity to have published
# the customer at all. Identity publishes a version per changing event, valid from that event's
# time, so a customer's first version normally precedes every trigger of theirs; the bound is kept
# far longer than any lag of a trigger's fired_at behind the clock, so it never decides a replay.
EVENT_HORIZON = dt.timedelta(days=35)


def version_at(versions: Sequence[Contact], at: dt.datetime,
               within: dt.timedelta = EVENT_HORIZON) -> tuple[Contact | None, bool]:
    """The customer's profile as it stood at `at`, from its versions sorted by (valid_from, version).

    The version in force (the last one valid from `at` or earlier). If the customer had none yet,
    the first one, when it came within `within` after `at`: it is what the customer first became
    known as (rare: identity publishes a version per changing event, valid from its time). Returns
    (version, late): (None, True) when the first version came later than that (the hold's end:
    no_contact), (None, False) when there is none at all (hold). Versions of one
    customer arrive in order (one partition, identity's updated_at never goes back), so no version
    older than those known turns up later: the answer does not depend on whether the trigger or
    any version after it arrived first.
    """
    if not versions:
        return None, False
    keys = [v.valid_from for v in versions]
    i = bisect.bisect_right(keys, at)  # type: ignore[arg-type]
    if i:
        return versions[i - 1], False
    first = versions[0]
    if first.valid_from is not None and first.valid_from < at + within:
        return first, False
    return None, True


def hold_expired(deadline: dt.datetime | None, now: dt.datetime) -> bool:
    """The grace period is over: the held trigger ends no_contact, even if its profile is here now.

    Checked both by the dispatcher's sweep and when a profile arrives, so under the event clock
    the result depends on event times only, not on whether the sweep ran first.
    """
    return deadline is not None and deadline <= now


@lru_cache(maxsize=512)
def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The IANA zone, or the default one when unknown or missing."""
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def customer_timezone(contact: Contact | None, store_timezones: Mapping[str, str],
                      rules: NotificationRules) -> str:
    """The customer's zone, else their home store's, else the default."""
    for name in (contact.timezone if contact else None,
                 store_timezones.get(contact.home_store_id or "") if contact else None):
        if name and zone(name).key == name:
            return name
    return rules.default_timezone


def in_quiet_hours(local: dt.time, start: dt.time, end: dt.time) -> bool:
    if start == end:
        return False
    if start > end:  # wraps midnight, e.g. 21:00-09:00
        return local >= start or local < end
    return start <= local < end


def quiet_hours_end(at: dt.datetime, tz: ZoneInfo, rules: NotificationRules) -> dt.datetime | None:
    """When quiet hours end if `at` falls in them (UTC), else None; DST-correct via zoneinfo."""
    local = at.astimezone(tz)
    if not in_quiet_hours(local.time().replace(tzinfo=None), rules.quiet_start, rules.quiet_end):
        return None
    day = local.date()
    if rules.quiet_start > rules.quiet_end and local.time() >= rules.quiet_start:
        day += dt.timedelta(days=1)
    wake = dt.datetime.combine(day, rules.quiet_end, tzinfo=tz)
    return wake.astimezone(UTC)


def cap_blocks(day: dt.date, counted: Iterable[dt.date], rules: NotificationRules) -> bool:
    """True if one more promotional message on local `day` would break a frequency cap.

    Per-day: at most `per_day` on one local date. Per-7-days: every 7 consecutive local dates
    containing `day` hold at most `per_7_days` (so day d and d+7 never share a window).
    """
    dates = [d for d in counted if d is not None and abs((d - day).days) <= 6]
    if sum(1 for d in dates if d == day) + 1 > rules.per_day:
        return True
    for offset in range(7):
        start = day - dt.timedelta(days=6 - offset)
        end = start + dt.timedelta(days=6)
        if sum(1 for d in dates if start <= d <= end) + 1 > rules.per_7_days:
            return True
    return False


def choose_channels(contact: Contact, rules: NotificationRules) -> tuple[tuple[str, ...], str | None]:
    """Consented channels with an address, best first; or the suppression reason."""
    order = list(rules.channel_order) + [c for c in CHANNELS if c not in rules.channel_order]
    if contact.preferred_channel in order:
        order.remove(contact.preferred_channel)
        order.insert(0, contact.preferred_channel)
    consented = [c for c in order if contact.consented(c)]
    if not consented:
        return (), NO_CONSENT
    usable = tuple(c for c in consented if contact.has_address(c))
    if not usable:
        return (), NO_CONTACT
    return usable, None


def decide(trigger: Trigger, contact: Contact | None, *, erased: bool,
           history: Iterable[PriorNotice], now: dt.datetime, rules: NotificationRules,
           store_timezones: Mapping[str, str] | None = None, late: bool = False,
           counts: Callable[[PriorNotice], bool] | None = None) -> Decision:
    """The decision for one trigger given the customer and their notifications so far.

    `late`: the customer's profile came only after the grace period (event time): no_contact, as
    the end of a hold. `counts`: which notices of `history` count for caps and duplicates
    (default: those that reached, or may still reach, the customer).
    """
    store_timezones = store_timezones or {}
    promotional = trigger.kind not in rules.service_kinds
    tz_name = customer_timezone(contact, store_timezones, rules)
    counting = counts or (lambda p: p.counts)
    history = [p for p in history if counting(p)]

    def suppressed(reason: str) -> Decision:
        return Decision(trigger, SUPPRESSED, reason, None, (), None, None, tz_name, promotional)

    if trigger.kind not in rules.kinds:
        return suppressed(UNKNOWN_KIND)
    if erased and contact is None:
        return suppressed(ERASED)
    if trigger.period and any(
            p.kind == trigger.kind and p.period == trigger.period
            and p.trigger_id != trigger.trigger_id for p in history):
        return suppressed(DUPLICATE)
    if contact is None and late:
        return suppressed(NO_CONTACT)
    if contact is None:
        # Not known here yet, not erased: the profile is most likely still on its way.
        return Decision(trigger, PENDING, AWAITING_PROFILE, None, (), None, None, tz_name,
                        promotional)
    channels, reason = choose_channels(contact, rules)
    if reason is not None:
        return suppressed(reason)
    tz = zone(tz_name, rules.default_timezone)
    send_at = max(now, trigger.fired_at)
    wake = quiet_hours_end(send_at, tz, rules)
    scheduled = wake or send_at
    cap_date = scheduled.astimezone(tz).date()
    if promotional:
        counted = [p.cap_date for p in history if p.promotional and p.cap_date is not None]
        if cap_blocks(cap_date, counted, rules):
            return suppressed(FREQUENCY_CAP)
    return Decision(trigger, DEFERRED if wake else PENDING, QUIET_HOURS if wake else None,
                    channels[0], channels[1:], scheduled, cap_date, tz_name, promotional, contact)


def decide_all(triggers: Iterable[Trigger], *, contacts: Mapping[str, Contact],
               erased: set[str], history: Mapping[str, list[PriorNotice]], seen: set[str],
               now: dt.datetime, rules: NotificationRules,
               store_timezones: Mapping[str, str] | None = None,
               as_of_fired_at: bool = False,
               versions: Mapping[str, Sequence[Contact]] | None = None,
               gone_from: Mapping[str, dt.datetime] | None = None) -> list[Decision]:
    """Decide a batch: triggers already seen are dropped; per customer, higher priority first.

    Triggers released from a hold (their profile arrived) come in here too, with the new ones,
    so they compete for the day's slot exactly as if the profile had come first.

    Each decision joins the customer's history before the next one is decided, so two offers
    competing for one day's slot go to the higher-priority kind, whatever their batch order.

    `as_of_fired_at` (the event clock) decides each trigger at its own fired_at rather than at the
    batch's now, so a replay decides it identically however the batches were cut: on the profile
    version in force then (`versions`, see version_at), counting for caps and duplicates only the
    decisions before it in event time ((fired_at, priority, trigger_id), see `decided_before`) and
    as they were decided, so the order in which the triggers reached this service does not matter.
    A customer tombstoned at a known event time (`gone_from`) is erased for the triggers fired from
    then on; one fired before is decided on its version like any other (the caller then stops it
    as the tombstone stopped the customer's unsent messages).
    """
    gone_from = gone_from or {}
    rank = {kind: i for i, kind in enumerate(rules.priority)}
    fresh: dict[str, Trigger] = {}
    for t in triggers:
        if t.trigger_id not in seen and t.trigger_id not in fresh:
            fresh[t.trigger_id] = t
    if as_of_fired_at:
        order = lambda t: (t.customer_id, t.fired_at, rank.get(t.kind, len(rank)), t.trigger_id)  # noqa: E731
    else:
        order = lambda t: (t.customer_id, rank.get(t.kind, len(rank)), t.fired_at, t.trigger_id)  # noqa: E731
    ordered = sorted(fresh.values(), key=order)
    running = {cid: list(items) for cid, items in history.items()}
    decisions: list[Decision] = []
    for t in ordered:
        prior = running.setdefault(t.customer_id, [])
        if as_of_fired_at and versions is not None:
            gone = t.customer_id in erased
            if gone and t.customer_id in gone_from and t.fired_at < gone_from[t.customer_id]:
                gone = False
            contact, late = (None, False) if gone else version_at(versions.get(t.customer_id, ()),
                                                                   t.fired_at)
            d = decide(t, contact, erased=gone, late=late, now=t.fired_at,
                       history=decided_before(prior, t, rank), rules=rules,
                       store_timezones=store_timezones, counts=_as_decided)
        else:
            d = decide(t, contacts.get(t.customer_id), erased=t.customer_id in erased,
                       history=prior, now=t.fired_at if as_of_fired_at else now, rules=rules,
                       store_timezones=store_timezones)
        decisions.append(d)
        prior.append(PriorNotice(t.trigger_id, t.kind, t.period, d.promotional, d.cap_date,
                                 d.status, d.reason, at=t.fired_at if as_of_fired_at else now,
                                 channel=d.channel))
    return decisions


def _as_decided(p: PriorNotice) -> bool:
    return p.counts_as_decided


def decided_before(history: Iterable[PriorNotice], trigger: Trigger,
                   rank: Mapping[str, int]) -> list[PriorNotice]:
    """Event clock: the customer's decisions that precede `trigger` in event time, one per trigger.

    Ordered by (decided at, priority of the kind, trigger_id), the order decide_all decides in; a
    later trigger that happened to be decided first does not take an earlier one's slot. A trigger
    failed over to another channel has two rows: its first decision counts, once.
    """
    key = (trigger.fired_at, rank.get(trigger.kind, len(rank)), trigger.trigger_id)
    first: dict[str, PriorNotice] = {}
    for p in history:
        if p.at is None or p.trigger_id == trigger.trigger_id:
            continue
        if (p.at, rank.get(p.kind, len(rank)), p.trigger_id) >= key:
            continue
        if p.trigger_id not in first or p.at < first[p.trigger_id].at:  # type: ignore[operator]
            first[p.trigger_id] = p
    return list(first.values())


# -- at send time --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SendCheck:
    """What the dispatcher does with a due notification right now."""

    action: str  # send, defer, suppress
    reason: str | None = None
    until: dt.datetime | None = None
    address: Address | None = None  # still sealed: the dispatcher opens it as it sends


def check_before_send(channel: str, contact: Contact | None, *, erased: bool, now: dt.datetime,
                      tz_name: str | None, rules: NotificationRules) -> SendCheck:
    """Re-check consent, contact and quiet hours when a notification falls due.

    An opt-out or an erasure after the decision still stops the message, and a send delayed
    into the night (backlog, retries) waits for morning instead of waking someone up.
    """
    if contact is None or channel is None:
        return SendCheck("suppress", ERASED if erased else NO_CONTACT)
    if not contact.consented(channel):
        return SendCheck("suppress", NO_CONSENT)
    address = contact.address(channel)
    if not contact.has_address(channel) or address is None:
        return SendCheck("suppress", NO_CONTACT)
    wake = quiet_hours_end(now, zone(tz_name, rules.default_timezone), rules)
    if wake is not None:
        return SendCheck("defer", QUIET_HOURS, until=wake)
    return SendCheck("send", address=address)


def next_fallback(fallbacks: Iterable[str], contact: Contact | None) -> tuple[str | None, tuple[str, ...]]:
    """The next channel still consented and reachable, and the ones left after it."""
    remaining = list(fallbacks)
    while remaining:
        channel = remaining.pop(0)
        if contact is not None and contact.consented(channel) and contact.has_address(channel):
            return channel, tuple(remaining)
    return None, ()


def retry_delay(attempt: int, rules: NotificationRules, jitter: float) -> float:
    """Exponential back-off with jitter (`jitter` in [0, 1)): base * 2^(attempt-1), capped."""
    raw = min(rules.max_delay_seconds, rules.base_delay_seconds * (2 ** max(0, attempt - 1)))
    return raw * (0.5 + 0.5 * jitter)


def with_status(decision: Decision, status: str, reason: str | None) -> Decision:
    return replace(decision, status=status, reason=reason)
