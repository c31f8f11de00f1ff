"""A consumed batch in, decisions applied: contacts kept, triggers decided, outcomes to the outbox.

Nothing is sent here: a decided notification is a row due at `scheduled_for` that the
dispatcher (sender.py) picks up after this transaction commits.
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
    SUPPRESSED,
    NotificationRules,
    Trigger,
    decide_all,
)
from services.notifications.templates import Templates
from shared.avro import AvroCodec
from shared.batch_consumer import Record
from shared.clock import Clock
from shared.crypto import Vault
from shared.errors import PermanentError
from shared.outbox import add_to_outbox
from shared.topics import IDENTITY_MERGES, IDENTITY_PROFILES, INGEST_STORES, TRIGGERS_FIRED

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
        self.rules = rules
        self.templates = templates
        self.metrics = metrics
        self.save_watermark = save_watermark

    async def __call__(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        messages = []
        for segment in in_order_segments(records):
            messages += await self._apply(conn, segment)
        await add_to_outbox(conn, messages)
        if self.save_watermark is not None:
            await self.save_watermark(conn)

    async def _apply(self, conn: asyncpg.Connection, records: list[Record]) -> list:
        """Profiles, merges and stores of the segment first, then its triggers are decided."""
        profiles: dict[str, dict | None] = {}
        stores: dict[str, str] = {}
        merged: list[tuple[str, str]] = []
        unmerged: list[str] = []
        triggers: list[Trigger] = []
        for r in records:
            if r.topic == IDENTITY_PROFILES.name:
                cid = r.value["customer_id"] if r.value else (r.key or b"").decode()
                if cid:
                    profiles[cid] = r.value  # the latest in the batch wins
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
                    triggers.append(Trigger.from_record(r.value))
                except (KeyError, TypeError, ValueError) as exc:
                    raise PermanentError("bad_trigger", type(exc).__name__) from exc

        await store.upsert_stores(conn, sorted(stores.items()))
        await store.apply_merges(conn, merged, unmerged)
        live = [contact_from_profile(v) for v in profiles.values() if v and not v.get("erased")]
        gone = [cid for cid, v in profiles.items() if v is None or v.get("erased")]
        await store.upsert_contacts(conn, live, self.vault)
        now = self.clock.now()
        messages = []
        for row in await store.forget(conn, gone, now):
            messages.append(outcome_message(self.codec, row, status=SUPPRESSED, reason="erased",
                                            occurred_at=now))
            self.metrics.status(row["channel"], SUPPRESSED, "erased")
        if triggers:
            messages += await self._decide(conn, triggers)
        return messages

    async def _decide(self, conn: asyncpg.Connection, triggers: list[Trigger]) -> list:
        for t in triggers:
            self.clock.observe(t.fired_at)
        now = self.clock.now()
        inputs = await store.decision_inputs(conn, [t.customer_id for t in triggers],
                                             [t.trigger_id for t in triggers])
        decisions = decide_all(triggers, now=now, rules=self.rules, **inputs)
        self.metrics.duplicates.inc(len(triggers) - len(decisions))
        rows = []
        for d in decisions:
            subject = body = locale = None
            params: dict[str, str] = {}
            if d.status != SUPPRESSED:
                rendered = self.templates.render(d.trigger, inputs["contacts"].get(d.trigger.customer_id),
                                                 d.timezone)
                subject, body, locale, params = (rendered.subject, rendered.body, rendered.locale,
                                                 dict(rendered.params))
            rows.append(store.decision_row(d, subject=subject, body=body, locale=locale,
                                           params=params, decided_at=now))
        inserted = await store.insert_decisions(conn, rows)
        messages = []
        for row in rows:
            if row["notification_id"] not in inserted:
                continue
            messages.append(outcome_message(self.codec, row, status=row["status"],
                                            reason=row["reason"], occurred_at=now))
            self.metrics.status(row["channel"], row["status"], row["reason"])
            occurred = row["trigger_occurred_at"]
            if isinstance(occurred, dt.datetime):
                self.metrics.e2e_seconds.observe(max(0.0, (now - occurred).total_seconds()))
        return messages


def in_order_segments(records: list[Record]) -> list[list[Record]]:
    """Split a batch where a customer's profile arrives after one of their triggers.

    Within a segment profiles are applied before triggers are decided, so a trigger must not
    share a segment with a later profile of its customer: it was fired on the earlier state (a
    thank-you fired before the consent arrived is decided without that consent). Such splits are
    rare, so a batch stays a handful of statements.
    """
    segments: list[list[Record]] = [[]]
    triggered: set[str] = set()
    for r in records:
        if r.topic == IDENTITY_PROFILES.name:
            cid = r.value["customer_id"] if r.value else (r.key or b"").decode()
            if cid in triggered:
                segments.append([])
                triggered = set()
        elif r.topic == TRIGGERS_FIRED.name:
            cid = (r.value or {}).get("customer_id") if isinstance(r.value, dict) else None
            if cid:
                triggered.add(cid)
        segments[-1].append(r)
    return [s for s in segments if s]
