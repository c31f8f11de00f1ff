"""A consumed batch in, decisions applied: contacts kept, triggers decided, outcomes to the outbox.

Nothing is sent here: a decided notification is a row due at `scheduled_for` that the
dispatcher (sender.py) picks up after this transaction commits.

A trigger can overtake its customer's profile (it is two hops after identity, the profile one).
Such a trigger is held (`pending` / `awaiting_profile`, no channel, keyed by
notification_id(trigger_id, None)) and decided for real when the profile is applied; its real
decision replaces the held row, so the customer's list shows one current decision per trigger.

Under the event clock (replays) each trigger is decided as of its fired_at on the profile version in
force then (contact_versions, policy.version_at), whatever has arrived since: a consent given ten
seconds after the signup does not count for the welcome fired at the signup, whether its profile
reached this service before the welcome or after. A trigger is held only while its customer has no
version at all, and is released when the first one arrives, decided the same way; whether the hold
ran out is judged on event times alone (the first version's valid_from against the hold's end,
policy.EVENT_HORIZON after fired_at; the dispatcher's sweep ends it at the same event time).
A tombstone dated by identity (merge-away, erasure) ends the customer from its event time: a trigger
fired before it that reaches this service after it (triggers is a hop behind identity) is decided
on the version then in force and stopped by the tombstone, as if it had arrived first.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from services.notifications import store
from services.notifications.contacts import contact_from_profile
from services.notifications.metrics import NotificationMetrics
from services.notifications.outcomes import outcome_message
from services.notifications.policy import (
    NO_CONTACT,
    SUPPRESSED,
    NotificationRules,
    Trigger,
    decide_all,
    hold_deadline,
    hold_expired,
)
from services.notifications.templates import Templates
from shared.avro import AvroCodec
from shared.batch_consumer import Record
from shared.clock import Clock, EventClock
from shared.crypto import Vault
from shared.errors import PermanentError
from shared.outbox import add_to_outbox
from shared.topics import IDENTITY_MERGES, IDENTITY_PROFILES, INGEST_STORES, TRIGGER, TRIGGERS_FIRED

log = logging.getLogger(__name__)


class NotificationHandler:
    """The batch handler for triggers.fired, identity.profiles, identity.merges and stores."""

    def __init__(self, *, codec: AvroCodec, clock: Clock, rules: NotificationRules,
                 templates: Templates, metrics: NotificationMetrics,
                 save_watermark: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                 vault: Vault | None = None) -> None:
        self.codec = codec
        # Seals contact points before they are stored; the environment's keys by default.
        self.vault = vault if vault is not None else Vault.from_env()
        self.clock = clock
        # Under the event clock each trigger is decided as of its own fired_at (deterministic replays).
        self.as_of_fired_at = isinstance(clock, EventClock)
        self.rules = rules
        self.templates = templates
        self.metrics = metrics
        self.save_watermark = save_watermark

    async def __call__(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        messages = []
        # Event clock: versions make the order of profiles and triggers inside the batch irrelevant;
        # only a tombstone (no event time: it takes effect where it arrives) still splits it.
        for segment in in_order_segments(records, only_tombstones=self.as_of_fired_at):
            messages += await self._apply(conn, segment)
        await add_to_outbox(conn, messages)
        if self.save_watermark is not None:
            await self.save_watermark(conn)

    async def _apply(self, conn: asyncpg.Connection, records: list[Record]) -> list:
        """Profiles, merges and stores of the segment first, then its triggers are decided."""
        profiles: dict[str, dict | None] = {}
        versions: dict[str, list[dict]] = {}  # live profiles since the customer's last tombstone
        stores: dict[str, str] = {}
        merged: list[tuple[str, str]] = []
        unmerged: list[str] = []
        triggers: list[Trigger] = []
        raw: dict[str, bytes] = {}  # trigger_id -> the record as consumed, kept if it is held
        tombstoned_at: dict[str, dt.datetime | None] = {}  # event clock: when each one went
        for r in records:
            if r.topic == IDENTITY_PROFILES.name:
                cid = r.value["customer_id"] if r.value else (r.key or b"").decode()
                if cid:
                    profiles[cid] = r.value  # the latest in the batch wins
                    if not r.value or r.value.get("erased"):
                        tombstoned_at.setdefault(cid, r.at)
                    else:
                        tombstoned_at.pop(cid, None)
                    if r.value and not r.value.get("erased"):
                        if self.as_of_fired_at:  # each one is a version
                            versions.setdefault(cid, []).append(r.value)
                        else:
                            versions[cid] = [r.value]
                    elif not (self.as_of_fired_at and r.at is not None):
                        versions.pop(cid, None)  # a dated tombstone keeps what came before it
            elif r.topic == IDENTITY_MERGES.name:
                if r.value["kind"] == "merged":
                    merged.append((r.value["merged"], r.value["survivor"]))
                else:
                    unmerged.append(r.value["merged"])
            elif r.topic == INGEST_STORES.name:
                store_rec = (r.value or {}).get("properties", {}) or {}
                if r.value and r.value.get("type") == "store_upsert" and store_rec.get("store"):
                    s = store_rec["store"]
                    if s.get("store_id") and s.get("timezone"):
                        stores[s["store_id"]] = s["timezone"]
            elif r.topic == TRIGGERS_FIRED.name:
                try:
                    t = Trigger.from_record(r.value)
                except (KeyError, TypeError, ValueError) as exc:
                    raise PermanentError("bad_trigger", type(exc).__name__) from exc
                triggers.append(t)
                raw.setdefault(t.trigger_id, r.raw if r.raw is not None
                               else self.codec.encode(TRIGGER, r.value))

        await store.upsert_stores(conn, sorted(stores.items()))
        await store.apply_merges(conn, merged, unmerged)
        applied = {cid: [contact_from_profile(v) for v in vs] for cid, vs in versions.items()}
        gone = [cid for cid, v in profiles.items() if v is None or v.get("erased")]
        live = [cs[-1] for cid, cs in applied.items() if cid not in tombstoned_at]
        held = await store.upsert_contacts(conn, live, self.vault)
        now = self.clock.now()
        messages = []
        if self.as_of_fired_at:
            await store.add_versions(conn, [c for cs in applied.values() for c in cs], now)
            # A first profile and a dated tombstone in one batch: the customer's held triggers are
            # released on the profile before the tombstone stops them, as two batches cut between
            # the two would have done.
            going = [cid for cid in applied if tombstoned_at.get(cid) is not None]
            if going:
                early, _ = await self._release(conn, await store.held_for(conn, going))
                if early:
                    messages += await self._decide(conn, [], raw, early)
        messages += self._erased(
            await store.forget(conn, gone, now, tombstoned_at if self.as_of_fired_at else None), now)
        # Held triggers of the customers whose profile was applied: those of live customers came
        # with the upsert; a customer tombstoned in this batch had theirs stopped by forget.
        released, expired = await self._release(conn, held)
        messages += expired
        if triggers or released:
            messages += await self._decide(conn, triggers, raw, released)
        # Only now: the dispatcher's sweep of holds that ran out (same clock) must not see this
        # batch's time before the holds this batch's profiles release are locked and decided.
        for t in triggers:
            self.clock.observe(t.fired_at)
        return messages

    async def _release(self, conn: asyncpg.Connection,
                       held: list[asyncpg.Record]) -> tuple[list[Trigger], list]:
        """Held triggers of customers whose profile was just applied: to decide now, or too late.

        Wall clock: a hold whose grace period is already over ends no_contact here exactly as the
        dispatcher's sweep would have ended it. Event clock: all are decided, on the versions
        (policy.version_at judges a first version that came after the hold's end as its end, on
        event times alone).
        """
        if not held:
            return [], []
        now = self.clock.now()
        # The holds already over, by position (not a closure: see tests/support/cycles.py).
        expired = set() if self.as_of_fired_at else {i for i, r in enumerate(held) if hold_expired(r["due_at"], now)}
        late = [str(held[i]["notification_id"]) for i in sorted(expired)]
        messages = []
        for row in await store.expire_held(conn, now, late):
            messages.append(outcome_message(self.codec, row, status=SUPPRESSED, reason=NO_CONTACT,
                                            occurred_at=now))
            self.metrics.status(None, SUPPRESSED, NO_CONTACT)
        triggers, taken = [], []
        for i, r in enumerate(held):
            if i in expired:
                continue
            try:
                triggers.append(Trigger.from_record(self.codec.decode(bytes(r["held_trigger"]), TRIGGER)))
            except Exception:  # noqa: BLE001 - left held: the sweep ends it no_contact
                log.exception("held trigger unreadable", extra={"trigger_id": r["trigger_id"]})
                continue
            taken.append(str(r["notification_id"]))
        await store.drop_held(conn, taken)
        return triggers, messages

    async def _decide(self, conn: asyncpg.Connection, triggers: list[Trigger],
                      raw: dict[str, bytes], released: list[Trigger]) -> list:
        now = self.clock.now()
        everything = released + triggers
        inputs = await store.decision_inputs(conn, [t.customer_id for t in everything],
                                             [t.trigger_id for t in triggers],
                                             versioned=self.as_of_fired_at)
        # Released triggers were seen (their held row, dropped above), and are decided now.
        inputs["seen"] -= {t.trigger_id for t in released}
        decisions = decide_all(everything, now=now, rules=self.rules, as_of_fired_at=self.as_of_fired_at,
                               **inputs)
        self.metrics.duplicates.inc(len(everything) - len(decisions))
        rows = []
        for d in decisions:
            subject = body = locale = None
            params: dict[str, str] = {}
            at = d.trigger.fired_at if self.as_of_fired_at else now
            if d.held:
                rows.append(store.decision_row(
                    d, subject=None, body=None, locale=None, params={}, decided_at=at,
                    due_at=hold_deadline(d.trigger, at, self.rules, self.as_of_fired_at),
                    held_trigger=raw.get(d.trigger.trigger_id)))
                continue
            if d.status != SUPPRESSED:
                contact = d.contact or inputs["contacts"].get(d.trigger.customer_id)
                rendered = self.templates.render(d.trigger, contact, d.timezone)
                subject, body, locale, params = (rendered.subject, rendered.body, rendered.locale,
                                                 dict(rendered.params))
            rows.append(store.decision_row(d, subject=subject, body=body, locale=locale,
                                           params=params, decided_at=at))
        inserted = await store.insert_decisions(conn, rows)
        messages = []
        for row in rows:
            if row["notification_id"] not in inserted:
                continue
            messages.append(outcome_message(self.codec, row, status=row["status"],
                                            reason=row["reason"], occurred_at=row["decided_at"]))
            self.metrics.status(row["channel"], row["status"], row["reason"])
            occurred = row["trigger_occurred_at"]
            if isinstance(occurred, dt.datetime) and row["held_trigger"] is None:
                self.metrics.e2e_seconds.observe(max(0.0, (now - occurred).total_seconds()))
        # Event clock: a trigger fired before its customer's dated tombstone but arriving after it
        # was decided above on its profile version; the tombstone now stops it, as it would have
        # stopped it had the trigger come first.
        went = inputs["gone_from"]
        late = sorted({d.trigger.customer_id for d in decisions if d.trigger.customer_id in went})
        messages += self._erased(await store.forget(conn, late, now, {cid: went[cid] for cid in late}), now)
        return messages

    def _erased(self, stopped: list[asyncpg.Record], now: dt.datetime) -> list:
        """Outcomes of the unsent messages a tombstone stopped."""
        for row in stopped:
            self.metrics.status(row["channel"], SUPPRESSED, "erased")
        return [outcome_message(self.codec, row, status=SUPPRESSED, reason="erased", occurred_at=now)
                for row in stopped]


def in_order_segments(records: list[Record], *, only_tombstones: bool = False) -> list[list[Record]]:
    """Split a batch where a customer's profile arrives after one of their triggers.

    Within a segment profiles are applied before triggers are decided, so a trigger must not
    share a segment with a later profile of its customer: it was fired on the earlier state (a
    thank-you fired before the consent arrived is decided without that consent). Such splits are
    rare, so a batch stays a handful of statements. `only_tombstones` (event clock, where profile
    versions are chosen by time): split only for a tombstone or erased profile, which has no time
    and must act where it arrived, as it would have if the batch had been cut there.
    """
    segments: list[list[Record]] = [[]]
    triggered: set[str] = set()
    for r in records:
        if r.topic == IDENTITY_PROFILES.name:
            cid = r.value["customer_id"] if r.value else (r.key or b"").decode()
            gone = r.value is None or bool(r.value.get("erased"))
            if cid in triggered and (gone or not only_tombstones):
                segments.append([])
                triggered = set()
        elif r.topic == TRIGGERS_FIRED.name:
            cid = (r.value or {}).get("customer_id") if isinstance(r.value, dict) else None
            if cid:
                triggered.add(cid)
        segments[-1].append(r)
    return [s for s in segments if s]
