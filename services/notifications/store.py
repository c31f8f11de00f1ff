"""The notifications schema's SQL: contacts read model, decisions, the send queue and its claims.

Consumer-side writes are set-based (one statement per kind of change per batch). The
dispatcher claims due rows with FOR UPDATE SKIP LOCKED, then sends outside any transaction;
a claim is held by a worker whose session advisory lock is alive, or until its lease ends,
so a killed dispatcher's in-flight sends are picked up again at once by the next one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from services.notifications.contacts import (
    CONTACT_FIELDS,
    Contact,
    Sealed,
    contact_from_row,
    seal_context,
    version_from_row,
)
from services.notifications.policy import ACTIVE, EVENT_HORIZON, Decision, PriorNotice
from shared.crypto import DecryptionError, Vault
from shared.db import json_rows

# -- read model --------------------------------------------------------------------------------

# Sealed values travel as hex text inside one text[] literal per row (unnest cannot carry a
# ragged bytea[][]); PostgreSQL decodes them back to bytea[] in order.
def _unhex(column: str) -> str:
    return (f"ARRAY(SELECT decode(h, 'hex') FROM unnest(u.{column}::text[]) WITH ORDINALITY AS x(h, i) "
            f"ORDER BY i)")


_UPSERT_CONTACTS = f"""
INSERT INTO contacts (customer_id, emails_sealed, phones_sealed, whatsapp_ids_sealed, key_id,
                      first_name, locale, timezone, home_store_id, preferred_channel, consents,
                      version, updated_at)
SELECT u.cid, {_unhex("emails")}, {_unhex("phones")}, {_unhex("was")}, u.kid, u.fname, u.loc, u.tz,
       u.store, u.pref, u.consents::jsonb, u.ver, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[])
     AS u(cid, emails, phones, was, kid, fname, loc, tz, store, pref, consents, ver)
ON CONFLICT (customer_id) DO UPDATE SET
    emails_sealed = EXCLUDED.emails_sealed, phones_sealed = EXCLUDED.phones_sealed,
    whatsapp_ids_sealed = EXCLUDED.whatsapp_ids_sealed, key_id = EXCLUDED.key_id,
    first_name = EXCLUDED.first_name, locale = EXCLUDED.locale, timezone = EXCLUDED.timezone,
    home_store_id = EXCLUDED.home_store_id, preferred_channel = EXCLUDED.preferred_channel,
    consents = EXCLUDED.consents, version = EXCLUDED.version, updated_at = now()
WHERE contacts.version <= EXCLUDED.version
"""
# One round trip for what applying profiles does (a data-modifying WITH runs whether or not the
# query reads it): the upsert; no longer forgotten (an unmerge, a profile after an erasure); and the
# triggers held for these customers (waiting for their profile), locked until this transaction ends.
_APPLY_CONTACTS = f"""
WITH unforget AS (DELETE FROM forgotten WHERE customer_id = ANY($1::text[])),
upserted AS ({_UPSERT_CONTACTS.strip()} RETURNING 1)
SELECT notification_id, trigger_id, customer_id, due_at, held_trigger FROM notifications
WHERE customer_id = ANY($1::text[]) AND status = 'pending' AND reason = 'awaiting_profile'
  AND channel IS NULL
ORDER BY customer_id, trigger_id
FOR UPDATE
"""


def _pg_array(values: Iterable[str]) -> str:
    """A text[] literal; values are quoted so commas and quotes survive."""
    items = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
    return "{" + ",".join(items) + "}"


def _sealed_array(vault: Vault, contact: Contact, column: str) -> str:
    """The column's values sealed under the active key, as a hex text[] literal."""
    context = seal_context(contact.customer_id, CONTACT_FIELDS[column])
    blobs = [v.blob if isinstance(v, Sealed) else vault.seal(v, context)
             for v in getattr(contact, column)]
    return "{" + ",".join(b.hex() for b in blobs) + "}"


async def upsert_contacts(conn: asyncpg.Connection, contacts: Sequence[Contact],
                          vault: Vault) -> list[asyncpg.Record]:
    """Keep the latest profile of each customer; contact points are sealed before they leave.

    Returns their triggers held for the profile, locked, for the caller to release.
    """
    if not contacts:
        return []
    return await conn.fetch(
        _APPLY_CONTACTS,
        [c.customer_id for c in contacts],
        [_sealed_array(vault, c, "emails") for c in contacts],
        [_sealed_array(vault, c, "phones") for c in contacts],
        [_sealed_array(vault, c, "whatsapp_ids") for c in contacts],
        [vault.active_key_id for _ in contacts],
        [c.first_name for c in contacts],
        [c.locale for c in contacts],
        [c.timezone for c in contacts],
        [c.home_store_id for c in contacts],
        [c.preferred_channel for c in contacts],
        [orjson.dumps(dict(c.consents)).decode() for c in contacts],
        [c.version for c in contacts],
    )


# Versions (event clock): each applied profile, valid from its updated_at, with the channels it had a
# contact point for and no contact point itself. In the same statement, versions of these customers
# superseded before the horizon go: the one in force at the horizon and all later ones are kept.
_INSERT_VERSIONS = """
WITH added AS (
    INSERT INTO contact_versions (customer_id, valid_from, version, reachable, first_name, locale,
                                  timezone, home_store_id, preferred_channel, consents)
    SELECT u.cid, u.valid_from, u.ver, u.reachable::text[], u.fname, u.loc, u.tz, u.store, u.pref,
           u.consents::jsonb
    FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::text[])
         AS u(cid, valid_from, ver, reachable, fname, loc, tz, store, pref, consents)
    ON CONFLICT (customer_id, valid_from, version) DO NOTHING
    RETURNING 1
)
DELETE FROM contact_versions v
USING (SELECT DISTINCT unnest($1::text[]) AS cid) AS u
WHERE v.customer_id = u.cid AND v.valid_from < $11
  AND EXISTS (SELECT 1 FROM contact_versions w
              WHERE w.customer_id = v.customer_id AND w.valid_from <= $11
                AND (w.valid_from, w.version) > (v.valid_from, v.version))
"""
# How long a superseded version is kept (event time before the clock). A trigger is decided on the
# version in force at its fired_at, and a trigger can reach this service well after the clock has
# passed its fired_at (a time-based rule found at the customer's next event, a late sale); the
# horizon is far longer than any such lag, and a long replay keeps a bounded few versions.
VERSION_HORIZON = EVENT_HORIZON


async def add_versions(conn: asyncpg.Connection, versions: Sequence[Contact],
                       now: dt.datetime) -> None:
    """Keep each profile as a version valid from its updated_at; prune what can no longer matter.

    Re-applying a profile (a redelivery, a replay) finds its version there and changes nothing.
    """
    rows = [v for v in versions if v.valid_from is not None]
    if not rows:
        return
    await conn.execute(
        _INSERT_VERSIONS,
        [v.customer_id for v in rows],
        [v.valid_from for v in rows],
        [v.version for v in rows],
        [_pg_array(sorted(v.channels_reachable())) for v in rows],
        [v.first_name for v in rows],
        [v.locale for v in rows],
        [v.timezone for v in rows],
        [v.home_store_id for v in rows],
        [v.preferred_channel for v in rows],
        [orjson.dumps(dict(v.consents)).decode() for v in rows],
        now - VERSION_HORIZON,
    )


_FORGET_PENDING = """
UPDATE notifications SET status = 'suppressed', reason = 'erased', due_at = NULL,
       claimed_by = NULL, held_trigger = NULL, updated_at = now()
WHERE customer_id = ANY($1::text[]) AND status IN ('pending', 'deferred')
RETURNING *
"""
_BLANK_BODIES = """
WITH blanked AS (
    UPDATE notifications SET body = NULL, subject = NULL, params = '{}'::jsonb
    WHERE customer_id = ANY($1::text[])
      AND (body IS NOT NULL OR subject IS NOT NULL OR params <> '{}'::jsonb)
    RETURNING customer_id
)
SELECT DISTINCT customer_id FROM blanked
"""
_RECORD_ERASURES = """
INSERT INTO erasures (customer_id, erased_at, what)
SELECT u.cid, $2, u.what::text[] FROM unnest($1::text[], $3::text[]) AS u(cid, what)
ON CONFLICT (customer_id) DO UPDATE SET
    erased_at = EXCLUDED.erased_at,
    what = ARRAY(SELECT DISTINCT w FROM unnest(erasures.what || EXCLUDED.what) AS w ORDER BY w)
WHERE cardinality(EXCLUDED.what) > 0
"""

# What an erasure drops here, as named in `erasures.what` and the erase report.
ERASED_CONTACT = "contact"                # sealed email/phone/WhatsApp, first name, locale, consents
ERASED_MESSAGES = "message_content"       # rendered subjects, bodies and template parameters
ERASED_PENDING = "pending_notifications"  # unsent messages stopped (suppressed `erased`)


_FORGET_VERSIONS = """
DELETE FROM contact_versions v USING unnest($1::text[], $2::timestamptz[]) AS u(cid, since)
WHERE v.customer_id = u.cid AND (u.since IS NULL OR v.valid_from >= u.since)
RETURNING v.customer_id
"""
# The earliest dated tombstone wins; an undated one (it acts where it arrives) makes it gone for all.
_MARK_FORGOTTEN = """
INSERT INTO forgotten (customer_id, gone_from, keep_versions_until)
SELECT u.cid, u.since, u.since + $3::interval FROM unnest($1::text[], $2::timestamptz[]) AS u(cid, since)
ON CONFLICT (customer_id) DO UPDATE SET
    gone_from = CASE WHEN forgotten.gone_from IS NULL OR EXCLUDED.gone_from IS NULL THEN NULL
                     ELSE LEAST(forgotten.gone_from, EXCLUDED.gone_from) END,
    keep_versions_until = CASE WHEN forgotten.gone_from IS NULL OR EXCLUDED.gone_from IS NULL THEN NULL
                               ELSE LEAST(forgotten.keep_versions_until, EXCLUDED.keep_versions_until) END
"""
_DROP_KEPT_VERSIONS = """
WITH due AS (
    UPDATE forgotten SET keep_versions_until = NULL
    WHERE keep_versions_until IS NOT NULL AND keep_versions_until < $1
    RETURNING customer_id
)
DELETE FROM contact_versions v USING due WHERE v.customer_id = due.customer_id
"""


async def forget(conn: asyncpg.Connection, customer_ids: Sequence[str], erased_at: dt.datetime,
                 gone_from: Mapping[str, dt.datetime | None] | None = None) -> list[asyncpg.Record]:
    """Tombstone: drop contact points, remember the erasure, stop unsent messages, blank bodies.

    `gone_from` (event clock): the tombstone's event time per customer. The profile versions
    before it stay (no contact point in them) so a trigger fired earlier and arriving later is
    decided as it would have been had it come first, then stopped here like any unsent message;
    they go a horizon later. Without a time a customer is gone for every trigger.

    Records in `erasures` what was dropped for each customer (a replayed tombstone that finds
    nothing left keeps the first record). Returns the notifications that were still waiting
    (now suppressed `erased`).
    """
    if not customer_ids:
        return []
    ids = list(customer_ids)
    since = [(gone_from or {}).get(cid) for cid in ids]
    contact = {r["customer_id"] for r in await conn.fetch(
        "DELETE FROM contacts WHERE customer_id = ANY($1::text[]) RETURNING customer_id", ids)}
    contact |= {r["customer_id"] for r in await conn.fetch(_FORGET_VERSIONS, ids, since)}
    await conn.execute(_MARK_FORGOTTEN, ids, since, VERSION_HORIZON)
    if any(since):
        await conn.execute(_DROP_KEPT_VERSIONS, erased_at)
    stopped = await conn.fetch(_FORGET_PENDING, ids)
    pending = {r["customer_id"] for r in stopped}
    # Rendered bodies may hold a first name: personal data goes with the profile.
    messages = {r["customer_id"] for r in await conn.fetch(_BLANK_BODIES, ids)}
    what = []
    for cid in ids:
        kinds = [k for k, held in ((ERASED_CONTACT, contact), (ERASED_MESSAGES, messages),
                                   (ERASED_PENDING, pending)) if cid in held]
        what.append(_pg_array(kinds))
    await conn.execute(_RECORD_ERASURES, ids, erased_at, what)
    return stopped


async def erasure_of(conn: asyncpg.Connection, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT customer_id, erased_at, what FROM erasures WHERE customer_id = $1", customer_id)


@dataclass(frozen=True)
class RekeyReport:
    """What `rekey` did: rows moved to the active key, rows whose key is not configured."""

    active_key_id: str
    resealed: int
    unreadable: int


_REKEY_BATCH = """
SELECT customer_id, key_id, emails_sealed, phones_sealed, whatsapp_ids_sealed
FROM contacts
WHERE customer_id > $1 AND key_id IS DISTINCT FROM $2
ORDER BY customer_id
LIMIT $3
FOR UPDATE
"""
_REKEY_WRITE = f"""
UPDATE contacts c SET emails_sealed = {_unhex("emails")}, phones_sealed = {_unhex("phones")},
       whatsapp_ids_sealed = {_unhex("was")}, key_id = $5
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(cid, emails, phones, was)
WHERE c.customer_id = u.cid
"""


async def rekey(conn: asyncpg.Connection, vault: Vault, *, batch_size: int = 500) -> RekeyReport:
    """Re-seal every contact row not under the vault's active key (after a key rotation).

    Walks the table in primary-key order, one transaction per batch: rows are locked while they
    are re-sealed, so a concurrent profile update waits instead of being overwritten. Rows sealed
    with a key the vault does not hold are left as they are and counted as unreadable; run again
    with that key configured. Safe to interrupt and to re-run.
    """
    active = vault.active_key_id
    resealed = unreadable = 0
    last = ""
    while True:
        async with conn.transaction():
            rows = await conn.fetch(_REKEY_BATCH, last, active, batch_size)
            if not rows:
                break
            last = rows[-1]["customer_id"]
            out: list[tuple[str, list[str]]] = []
            for row in rows:
                try:
                    out.append((row["customer_id"], [
                        _reseal(vault, row, column) for column in CONTACT_FIELDS]))
                except DecryptionError:
                    unreadable += 1
            if out:
                await conn.execute(
                    _REKEY_WRITE, [cid for cid, _ in out], *[[cols[i] for _, cols in out]
                                                             for i in range(3)], active)
            resealed += len(out)
    return RekeyReport(active, resealed, unreadable)


def _reseal(vault: Vault, row: asyncpg.Record, column: str) -> str:
    context = seal_context(row["customer_id"], CONTACT_FIELDS[column])
    blobs = [vault.seal(vault.open(bytes(b), context), context)
             for b in row[f"{column}_sealed"] or ()]
    return "{" + ",".join(b.hex() for b in blobs) + "}"


async def upsert_stores(conn: asyncpg.Connection, stores: Sequence[tuple[str, str]]) -> None:
    if not stores:
        return
    await conn.execute(
        "INSERT INTO stores (store_id, timezone) SELECT * FROM unnest($1::text[], $2::text[]) "
        "ON CONFLICT (store_id) DO UPDATE SET timezone = EXCLUDED.timezone",
        [s for s, _ in stores], [tz for _, tz in stores])


async def apply_merges(conn: asyncpg.Connection, merged: Sequence[tuple[str, str]],
                       unmerged: Sequence[str]) -> None:
    """merged: (merged, survivor) pairs; anything already aliased to `merged` follows it."""
    if merged:
        await conn.execute(
            "UPDATE aliases a SET survivor = u.s FROM unnest($1::text[], $2::text[]) AS u(m, s) "
            "WHERE a.survivor = u.m", [m for m, _ in merged], [s for _, s in merged])
        await conn.execute(
            "INSERT INTO aliases (merged, survivor) SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT (merged) DO UPDATE SET survivor = EXCLUDED.survivor",
            [m for m, _ in merged], [s for _, s in merged])
    if unmerged:
        await conn.execute("DELETE FROM aliases WHERE merged = ANY($1::text[])", list(unmerged))


# -- decision inputs ---------------------------------------------------------------------------

_HISTORY = """
WITH req AS (SELECT DISTINCT unnest($1::text[]) AS cid),
members AS (
    SELECT cid, cid AS member FROM req
    UNION SELECT r.cid, a.merged FROM req r
    CROSS JOIN LATERAL (SELECT merged FROM aliases a WHERE a.survivor = r.cid OFFSET 0) a
)
SELECT m.cid, n.trigger_id, n.kind, n.period, n.promotional, n.cap_date, n.status, n.reason,
       n.decided_at, n.channel
FROM members m
CROSS JOIN LATERAL (
    SELECT * FROM notifications n
    WHERE n.customer_id = m.member AND (n.status = ANY($2::text[]) OR ($3 AND n.channel IS NOT NULL))
    OFFSET 0  -- a fence: not pulled up into a join the planner may hash
) n
"""
# The lookups above and below are LATERAL: index probes per customer or trigger, whatever the
# statistics say. As plain joins, a plan made on stale statistics (a table that grew since it was
# last analysed) hashed the batch and scanned all of `notifications` once per batch: ~12 ms of
# PostgreSQL per batch, which at a steady 1,000 events/s (batches of ~100) was most of this
# service's database time.


# Joined to unnest, not `= ANY($1)`: a cached generic plan planned while the table was small can
# keep a sequential scan whose filter walks the whole array for every row (a cost that grows with
# table x batch); a join is index lookups or one hash either way.
# With the home store's time zone (the fallback when the profile has none): one round trip.
_VERSIONS_OF = """
SELECT v.*, s.timezone AS store_timezone
FROM unnest($1::text[]) AS u(cid)
CROSS JOIN LATERAL (SELECT * FROM contact_versions v WHERE v.customer_id = u.cid OFFSET 0) v
LEFT JOIN stores s ON s.store_id = v.home_store_id
ORDER BY v.customer_id, v.valid_from, v.version
"""
_CONTACTS_OF = """
SELECT c.*, s.timezone AS store_timezone
FROM contacts c LEFT JOIN stores s ON s.store_id = c.home_store_id
WHERE c.customer_id = ANY($1::text[])
"""
# Which customers are forgotten (and from when) and which triggers were decided already: one
# round trip for both.
_FORGOTTEN_AND_SEEN = """
SELECT false, customer_id, gone_from FROM forgotten WHERE customer_id = ANY($1::text[])
UNION ALL
SELECT true, u.tid, NULL::timestamptz
FROM (SELECT DISTINCT unnest($2::text[]) AS tid) AS u
CROSS JOIN LATERAL (SELECT 1 FROM notifications n WHERE n.trigger_id = u.tid LIMIT 1) AS seen
"""


async def decision_inputs(conn: asyncpg.Connection, customer_ids: Sequence[str],
                          trigger_ids: Sequence[str], *, versioned: bool = False) -> dict[str, Any]:
    """Everything `policy.decide_all` needs for a batch, a handful of set-based queries.

    `versioned` (event clock): the customers' profile versions instead of their latest contact,
    and every decision that chose a channel, whatever its status now (see PriorNotice).
    """
    cids = list(set(customer_ids))
    contacts: dict[str, Contact] = {}
    versions: dict[str, list[Contact]] | None = None
    stores: dict[str, str] = {}
    if versioned:
        versions = {}
        for r in await conn.fetch(_VERSIONS_OF, cids):
            versions.setdefault(r["customer_id"], []).append(version_from_row(r))
            if r["store_timezone"] is not None:
                stores[r["home_store_id"]] = r["store_timezone"]
    else:
        for r in await conn.fetch(_CONTACTS_OF, cids):
            contacts[r["customer_id"]] = contact_from_row(r)
            if r["store_timezone"] is not None:
                stores[r["home_store_id"]] = r["store_timezone"]
    gone_from: dict[str, dt.datetime] = {}
    erased: set[str] = set()
    seen: set[str] = set()
    for is_seen, key, at in await conn.fetch(_FORGOTTEN_AND_SEEN, cids, list(trigger_ids)):
        if is_seen:
            seen.add(key)
        else:
            erased.add(key)
            if at is not None:
                gone_from[key] = at
    history: dict[str, list[PriorNotice]] = {}
    for r in await conn.fetch(_HISTORY, cids, sorted(ACTIVE), versioned):
        history.setdefault(r["cid"], []).append(PriorNotice(
            r["trigger_id"], r["kind"], r["period"], r["promotional"], r["cap_date"], r["status"],
            r["reason"], at=r["decided_at"], channel=r["channel"]))
    return {"contacts": contacts, "erased": erased, "seen": seen, "history": history,
            "store_timezones": stores, "versions": versions, "gone_from": gone_from}


_INSERT = """
INSERT INTO notifications (notification_id, trigger_id, customer_id, kind, period, promotional,
    channel, status, reason, locale, subject, body, params, fallbacks, timezone, cap_date,
    scheduled_for, due_at, trigger_occurred_at, decided_at, held_trigger)
SELECT u.nid, u.tid, u.cid, u.kind, u.period, u.promo, u.channel, u.status, u.reason, u.locale,
       u.subject, u.body, u.params, u.fallbacks::text[], u.tz, u.cap_date, u.sched,
       CASE WHEN u.status IN ('pending', 'deferred') THEN COALESCE(u.due, u.sched) END,
       u.occurred, u.decided, u.held
FROM (SELECT (e->>0)::uuid AS nid, e->>1 AS tid, e->>2 AS cid, e->>3 AS kind, e->>4 AS period,
             (e->>5)::boolean AS promo, e->>6 AS channel, e->>7 AS status, e->>8 AS reason, e->>9 AS locale,
             e->>10 AS subject, e->>11 AS body, e->12 AS params, e->>13 AS fallbacks, e->>14 AS tz,
             (e->>15)::date AS cap_date, (e->>16)::timestamptz AS sched, (e->>17)::timestamptz AS occurred,
             (e->>18)::timestamptz AS decided, (e->>19)::timestamptz AS due, decode(e->>20, 'hex') AS held
      FROM jsonb_array_elements($1::text::jsonb) AS j(e)) AS u
ON CONFLICT (notification_id) DO NOTHING
RETURNING notification_id
"""


async def insert_decisions(conn: asyncpg.Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert decided notifications; returns the ids actually inserted (new)."""
    if not rows:
        return set()
    inserted = await conn.fetch(_INSERT, json_rows([
        (r["notification_id"], r["trigger_id"], r["customer_id"], r["kind"], r["period"], r["promotional"],
         r["channel"], r["status"], r["reason"], r["locale"], r["subject"], r["body"],
         dict(r.get("params") or {}), _pg_array(r.get("fallbacks") or ()), r.get("timezone"),
         r.get("cap_date"), r.get("scheduled_for"), r.get("trigger_occurred_at"), r.get("decided_at"),
         r.get("due_at"), None if (held := r.get("held_trigger")) is None else held.hex())
        for r in rows]))
    return {str(r["notification_id"]) for r in inserted}


def decision_row(d: Decision, *, subject: str | None, body: str | None, locale: str | None,
                 params: dict[str, str], decided_at: dt.datetime,
                 due_at: dt.datetime | None = None, held_trigger: bytes | None = None) -> dict[str, Any]:
    """The notifications row of a decision; a held one carries its trigger and grace deadline."""
    t = d.trigger
    return {
        "notification_id": d.notification_id, "trigger_id": t.trigger_id,
        "customer_id": t.customer_id, "kind": t.kind, "period": t.period,
        "promotional": d.promotional, "channel": d.channel, "status": d.status,
        "reason": d.reason, "locale": locale, "subject": subject, "body": body,
        "params": params, "fallbacks": d.fallbacks, "timezone": d.timezone,
        "cap_date": d.cap_date, "scheduled_for": d.scheduled_for,
        "trigger_occurred_at": t.occurred_at, "decided_at": decided_at,
        "attempt": 0, "sent_at": None, "provider": None, "provider_message_id": None,
        "due_at": due_at, "held_trigger": held_trigger,
    }


# -- triggers held for their profile -------------------------------------------------------------

# Rows a consumer transaction is releasing right now are skipped (SKIP LOCKED): no waiting, no
# deadlock, and whichever commits first wins (the other finds the row no longer held).
_EXPIRE_HELD = """
WITH due AS (
    SELECT notification_id FROM notifications
    WHERE status = 'pending' AND reason = 'awaiting_profile' AND channel IS NULL AND due_at <= $1
      AND ($2::uuid[] IS NULL OR notification_id = ANY($2::uuid[]))
    ORDER BY customer_id, trigger_id
    FOR UPDATE SKIP LOCKED
)
UPDATE notifications n SET status = 'suppressed', reason = 'no_contact', due_at = NULL,
       held_trigger = NULL, claimed_by = NULL, lease_until = NULL, attempt = 0, updated_at = now()
FROM due WHERE n.notification_id = due.notification_id
RETURNING n.*
"""


_HELD_FOR = """
SELECT notification_id, trigger_id, customer_id, due_at, held_trigger FROM notifications
WHERE customer_id = ANY($1::text[]) AND status = 'pending' AND reason = 'awaiting_profile'
  AND channel IS NULL
ORDER BY customer_id, trigger_id
FOR UPDATE
"""


async def held_for(conn: asyncpg.Connection, customer_ids: Sequence[str]) -> list[asyncpg.Record]:
    """The customers' triggers waiting for their profile, locked until this transaction ends
    (for customers whose profile is applied without an upsert: see upsert_contacts)."""
    if not customer_ids:
        return []
    return await conn.fetch(_HELD_FOR, sorted(set(customer_ids)))


async def expire_held(conn: asyncpg.Connection, now: dt.datetime,
                      ids: Sequence[str] | None = None) -> list[asyncpg.Record]:
    """Held triggers whose grace period is over end `suppressed` / `no_contact` (all, or `ids`).

    Conditional on still being held, so a profile applied concurrently wins or loses cleanly.
    """
    if ids is not None and not ids:
        return []
    return await conn.fetch(_EXPIRE_HELD, now, list(ids) if ids is not None else None)


async def drop_held(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """Remove held rows whose trigger is being decided now: its real decision replaces them."""
    if ids:
        await conn.execute(
            "DELETE FROM notifications WHERE notification_id = ANY($1::uuid[]) "
            "AND status = 'pending' AND reason = 'awaiting_profile'", list(ids))


# -- the send queue --------------------------------------------------------------------------------

_DUE = """
WITH live_workers AS (
    SELECT (l.classid::bigint << 32) | l.objid::bigint AS worker
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT notification_id FROM notifications
WHERE status IN ('pending', 'deferred') AND due_at <= $1 AND channel IS NOT NULL
  AND (retry_at IS NULL OR retry_at <= clock_timestamp())
  AND (claimed_by IS NULL OR lease_until < clock_timestamp()
       OR claimed_by NOT IN (SELECT worker FROM live_workers))
ORDER BY due_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

_CLAIM = f"""
WITH due AS ({_DUE})
UPDATE notifications n
SET claimed_by = $3, lease_until = clock_timestamp() + make_interval(secs => $4),
    attempt = n.attempt + 1, updated_at = now()
FROM due WHERE n.notification_id = due.notification_id
RETURNING n.*
"""

# Due rows locked for the caller's transaction, unclaimed: the sandbox records them sent right away.
_TAKE = f"""
WITH due AS ({_DUE})
SELECT n.* FROM notifications n JOIN due USING (notification_id) ORDER BY n.due_at
"""

_CLAIM_IDS = """
UPDATE notifications n
SET claimed_by = $2, lease_until = clock_timestamp() + make_interval(secs => $3),
    attempt = n.attempt + 1, updated_at = now()
WHERE n.notification_id = ANY($1::uuid[])
RETURNING n.*
"""


async def claim_due(pool: asyncpg.Pool, *, now: dt.datetime, limit: int, worker: int,
                    lease_seconds: float) -> tuple[list[asyncpg.Record], dict[str, Contact], set[str]]:
    """Claim up to `limit` due sends for `worker` (committed at once); with their contacts."""
    if limit <= 0:
        return [], {}, set()
    async with pool.acquire() as conn:
        async with conn.transaction():
            rows = await conn.fetch(_CLAIM, now, limit, worker, float(lease_seconds))
        if not rows:
            return [], {}, set()
        contacts, erased = await _contacts_of(conn, rows)
    return list(rows), contacts, erased


# The latest contact of each customer and whether they are forgotten: one round trip.
_CONTACTS_AND_FORGOTTEN = """
SELECT u.cid, EXISTS (SELECT 1 FROM forgotten f WHERE f.customer_id = u.cid) AS forgotten, c.*
FROM unnest($1::text[]) AS u(cid)
LEFT JOIN LATERAL (SELECT * FROM contacts c WHERE c.customer_id = u.cid OFFSET 0) c ON true
"""


async def _contacts_of(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> tuple[dict[str, Contact], set[str]]:
    contacts: dict[str, Contact] = {}
    erased: set[str] = set()
    for r in await conn.fetch(_CONTACTS_AND_FORGOTTEN, list({r["customer_id"] for r in rows})):
        if r["customer_id"] is not None:
            contacts[r["cid"]] = contact_from_row(r)
        if r["forgotten"]:
            erased.add(r["cid"])
    return contacts, erased


async def take_due(conn: asyncpg.Connection, *, now: dt.datetime, limit: int
                   ) -> tuple[list[asyncpg.Record], dict[str, Contact], set[str]]:
    """Lock up to `limit` due sends in the caller's transaction without claiming them (no write):
    for a sender that settles them in that same transaction; with their contacts."""
    rows = await conn.fetch(_TAKE, now, limit)
    if not rows:
        return [], {}, set()
    contacts, erased = await _contacts_of(conn, rows)
    return list(rows), contacts, erased


async def claim_rows(conn: asyncpg.Connection, ids: list[str], *, worker: int,
                     lease_seconds: float) -> list[asyncpg.Record]:
    """Claim rows locked by `take_due` for sending outside the transaction (a lease, one attempt)."""
    if not ids:
        return []
    return list(await conn.fetch(_CLAIM_IDS, ids, worker, float(lease_seconds)))


async def next_due_at(pool: asyncpg.Pool) -> dt.datetime | None:
    return await pool.fetchval(
        "SELECT min(due_at) FROM notifications WHERE status IN ('pending', 'deferred') "
        "AND channel IS NOT NULL")


async def mark_sent(conn: asyncpg.Connection, nid: str, *, provider: str,
                    provider_message_id: str | None, sent_at: dt.datetime) -> asyncpg.Record | None:
    """pending -> sent; a callback that already said delivered is not downgraded."""
    row = await conn.fetchrow(
        "UPDATE notifications SET status = 'sent', reason = NULL, provider = $2, "
        "provider_message_id = $3, sent_at = $4, due_at = NULL, claimed_by = NULL, "
        "lease_until = NULL, updated_at = now() "
        "WHERE notification_id = $1 AND status IN ('pending', 'deferred') RETURNING *",
        nid, provider, provider_message_id, sent_at)
    if row is None:
        await conn.execute(
            "UPDATE notifications SET provider = $2, provider_message_id = $3, "
            "sent_at = COALESCE(sent_at, $4), claimed_by = NULL, updated_at = now() "
            "WHERE notification_id = $1", nid, provider, provider_message_id, sent_at)
    return row


async def mark_sent_many(conn: asyncpg.Connection, sends: list[tuple[str, str, str, dt.datetime]],
                         *, attempt: bool = False) -> list[asyncpg.Record]:
    """Many pending -> sent in one statement: (notification_id, provider, message id, sent_at).

    `attempt`: the rows were taken unclaimed (take_due), so this send is counted here."""
    if not sends:
        return []
    return await conn.fetch(
        "UPDATE notifications n SET status = 'sent', reason = NULL, provider = u.provider, "
        + ("attempt = n.attempt + 1, " if attempt else "") +
        "provider_message_id = u.pmid, sent_at = u.at, due_at = NULL, claimed_by = NULL, "
        "lease_until = NULL, updated_at = now() "
        "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS u(id, provider, pmid, at) "
        "WHERE n.notification_id = u.id AND n.status IN ('pending', 'deferred') RETURNING n.*",
        [s[0] for s in sends], [s[1] for s in sends], [s[2] for s in sends], [s[3] for s in sends])


async def retry_later(conn: asyncpg.Connection, nid: str, *, delay_seconds: float,
                      reason: str) -> asyncpg.Record | None:
    """Back to the queue after a retryable failure; back-off runs on wall time, not business time."""
    return await conn.fetchrow(
        "UPDATE notifications SET reason = $2, claimed_by = NULL, lease_until = NULL, "
        "retry_at = clock_timestamp() + make_interval(secs => $3), updated_at = now() "
        "WHERE notification_id = $1 AND status IN ('pending', 'deferred') RETURNING *",
        nid, reason, float(delay_seconds))


async def reschedule(conn: asyncpg.Connection, nid: str, *, status: str, due_at: dt.datetime,
                     reason: str | None, undo_attempt: bool = False) -> asyncpg.Record | None:
    """Back to the queue at `due_at` (business time), e.g. after quiet hours (deferred)."""
    return await conn.fetchrow(
        "UPDATE notifications SET status = $2, due_at = $3, reason = $4, claimed_by = NULL, retry_at = NULL, "
        "lease_until = NULL, scheduled_for = CASE WHEN $2 = 'deferred' THEN $3 ELSE scheduled_for END, "
        "attempt = attempt - CASE WHEN $5 THEN 1 ELSE 0 END, updated_at = now() "
        "WHERE notification_id = $1 AND status IN ('pending', 'deferred') RETURNING *",
        nid, status, due_at, reason, undo_attempt)


async def finish(conn: asyncpg.Connection, nid: str, *, status: str, reason: str | None,
                 from_statuses: Sequence[str] = ("pending", "deferred")) -> asyncpg.Record | None:
    """A final status (failed, suppressed, delivered) from one of `from_statuses`."""
    return await conn.fetchrow(
        "UPDATE notifications SET status = $2, reason = $3, due_at = NULL, claimed_by = NULL, "
        "lease_until = NULL, updated_at = now() "
        "WHERE notification_id = $1 AND status = ANY($4::text[]) RETURNING *",
        nid, status, reason, list(from_statuses))


async def insert_failover(conn: asyncpg.Connection, previous: asyncpg.Record, *, nid: str,
                          channel: str, fallbacks: Sequence[str],
                          due_at: dt.datetime) -> asyncpg.Record | None:
    """The same message on the next channel, due now."""
    return await conn.fetchrow(
        "INSERT INTO notifications (notification_id, trigger_id, customer_id, kind, period, "
        " promotional, channel, status, reason, locale, subject, body, params, fallbacks, timezone, "
        " cap_date, scheduled_for, due_at, trigger_occurred_at, decided_at) "
        "SELECT $1, trigger_id, customer_id, kind, period, promotional, $2, 'pending', 'failover', "
        " locale, subject, body, params, $3::text[], timezone, cap_date, $4, $4, "
        " trigger_occurred_at, $4 FROM notifications WHERE notification_id = $5 "
        "ON CONFLICT (notification_id) DO NOTHING RETURNING *",
        nid, channel, list(fallbacks), due_at, previous["notification_id"])


async def find_for_callback(conn: asyncpg.Connection, provider: str, provider_message_id: str | None,
                            nid: str | None) -> asyncpg.Record | None:
    if provider_message_id:
        row = await conn.fetchrow(
            "SELECT * FROM notifications WHERE provider = $1 AND provider_message_id = $2",
            provider, provider_message_id)
        if row is not None:
            return row
    if nid:
        try:
            return await conn.fetchrow("SELECT * FROM notifications WHERE notification_id = $1::uuid", nid)
        except (asyncpg.DataError, ValueError):
            return None
    return None


async def contact_of(conn: asyncpg.Connection, customer_id: str) -> Contact | None:
    row = await conn.fetchrow("SELECT * FROM contacts WHERE customer_id = $1", customer_id)
    return contact_from_row(row) if row else None


async def list_for_customer(conn: asyncpg.Connection, customer_id: str, limit: int = 500,
                            *, include_held: bool = False) -> list[asyncpg.Record]:
    """The customer's notifications, newest first, including those of customers merged into them.

    Triggers still waiting for the profile are not decisions yet and are left out unless asked for.
    """
    return await conn.fetch(
        "SELECT * FROM notifications WHERE (customer_id = $1 "
        "OR customer_id IN (SELECT merged FROM aliases WHERE survivor = $1)) "
        "AND ($3 OR NOT (status = 'pending' AND reason IS NOT DISTINCT FROM 'awaiting_profile')) "
        "ORDER BY decided_at DESC, notification_id LIMIT $2", customer_id, limit, include_held)
