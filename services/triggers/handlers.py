"""Batches in, triggers out: folds records into facts, runs the rules, and fires through the outbox.

Event-driven rules fire while their event is applied. Before an event is folded, the customer's
time-based rules are evaluated as of that event's time, so a trigger that fell due before the
customer's next event fires whether or not a scan happened to run in between (a cart left 61
minutes before a sale is abandoned either way; one left 59 minutes before is converted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gc
import hashlib
import logging
import time
import zoneinfo
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import asyncpg

from services.triggers import rules as R
from services.triggers import store
from services.triggers.facts import (
    CustomerFacts,
    Store,
    apply_event,
    apply_loyalty,
    apply_profile,
    merge_facts,
    purchase_amount,
    reset_activity,
)
from services.triggers.money import to_decimal_string
from services.triggers.rules import RuleConfig, Trigger
from services.triggers.segments import compile_segment
from shared.avro import AvroCodec
from shared.batch_consumer import Record
from shared.clock import Clock
from shared.ids import uuid5
from shared.metrics import ServiceMetrics
from shared.topics import (
    IDENTITY_EVENTS,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_STORES,
    LOYALTY,
    LOYALTY_EVENTS,
    RESOLVED,
    TRIGGER,
    TRIGGERS_FIRED,
)

log = logging.getLogger(__name__)
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
INPUT_TOPICS = (IDENTITY_EVENTS, IDENTITY_PROFILES, IDENTITY_MERGES, LOYALTY_EVENTS, INGEST_STORES)


class CampaignConflict(Exception):
    """A campaign name already used with a different definition."""


def encode_trigger(codec: AvroCodec, t: Trigger) -> bytes:
    """The `triggers.fired.v1` value of a trigger."""
    offer = None
    if t.offer is not None:
        o = t.offer
        offer = {"code": o.code, "description": o.description, "amount": o.amount,
                 "min_spend": o.min_spend, "currency": o.currency, "expires_at": o.expires_at}
    return codec.encode(TRIGGER, {
        "trigger_id": t.trigger_id, "kind": t.kind, "customer_id": t.customer_id,
        "fired_at": t.fired_at, "period": t.period, "context": dict(t.context), "offer": offer,
        "cause_event_id": t.cause_event_id, "occurred_at": t.occurred_at,
    })


def _event_time(record: Record) -> dt.datetime | None:
    """Event time of any input record: the event's, a profile's last change, a merge's or loyalty's."""
    v = record.value
    if v is None:
        return None
    if isinstance(v.get("event"), dict):
        return v["event"]["occurred_at"]
    return v.get("occurred_at") or v.get("updated_at")


def _event_key(ev: dict[str, Any]) -> tuple[str, str]:
    """The key an identity event is stored and folded once under (customer_events' source, event_id).

    A sale by its order and a return by its order and return id, as loyalty counts them: a till that
    sends one again under a new event id must not add a second purchase to the customer's order count
    and lifetime spend. Everything else by its event id."""
    kind = ev["type"]
    if kind == "sale" or kind == "return":
        props = ev.get("properties") or {}
        order = props.get("order_id")
        if order:
            if kind == "sale":
                return "identity:order", order
            if props.get("return_id"):
                return "identity:return", f"{order}\x1f{props['return_id']}"
    return "identity", ev["event_id"]


def _store_of(event: dict[str, Any]) -> Store | None:
    s = (event.get("properties") or {}).get("store") or {}
    if not s.get("store_id") or not s.get("name"):
        return None
    return Store(s["store_id"], s["name"], s.get("timezone"), s.get("country"), s.get("city"),
                 s.get("lat"), s.get("lon"), s.get("currency"))


def _attach_home_store(facts: CustomerFacts, stores: dict[str, Store]) -> None:
    home = stores.get(facts.home_store_id or "")
    if home is not None:
        facts.home_store_tz, facts.home_store_lat, facts.home_store_lon = home.timezone, home.lat, home.lon


def _live(cid: str, facts: dict[str, CustomerFacts | None], loaded: Mapping[str, CustomerFacts],
          touched: set[str], deleted: set[str]) -> CustomerFacts:
    """The facts of `cid` a batch changes: new, or gone earlier in the batch (its rows may still be
    there), or as loaded. (Not a closure in __call__: see tests/support/cycles.py.)"""
    f = facts.get(cid)
    if f is None:
        f = facts[cid] = CustomerFacts(cid, stored=None if cid in loaded else store.ABSENT)
    touched.add(cid)
    deleted.discard(cid)
    return f


class TriggersHandler:
    """The batch handler, the time-based scan and campaigns, over one connection at a time."""

    def __init__(self, *, codec: AvroCodec, cfg: RuleConfig, clock: Clock, event_clock: bool = False,
                 save_watermark: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                 metrics: ServiceMetrics | None = None, scan_interval: dt.timedelta | None = None,
                 topics: dict[str, str] | None = None, partitions: int | None = None) -> None:
        self.codec = codec
        self.partitions = partitions  # of the events topic: an event-clock scan waits for all of them
        # Topic names by role (tests run on topics of their own).
        names = {"events": IDENTITY_EVENTS.name, "profiles": IDENTITY_PROFILES.name,
                 "merges": IDENTITY_MERGES.name, "loyalty": LOYALTY_EVENTS.name,
                 "stores": INGEST_STORES.name, "fired": TRIGGERS_FIRED.name, **(topics or {})}
        self.t_events, self.t_profiles, self.t_merges = names["events"], names["profiles"], names["merges"]
        self.t_loyalty, self.t_stores, self.t_fired = names["loyalty"], names["stores"], names["fired"]
        self.cfg = cfg
        self.clock = clock
        self.event_clock = event_clock
        self.save_watermark = save_watermark
        self.scan_interval = scan_interval or dt.timedelta(minutes=15)
        self._fired = metrics.counter("fired", "Triggers fired, per kind.", ("kind",)) if metrics else None
        self._scan_seconds = (metrics.histogram("scan_seconds", "Time of one time-based scan.")
                              if metrics else None)
        self._zones: tuple[list[str], str] | None = None
        self._encoder = _TriggerEncoder(codec)
        self._descriptions = {
            "birthday_coupon": f"Happy birthday: {to_decimal_string(cfg.birthday_amount, cfg.currency)} off "
                               f"when you spend {to_decimal_string(cfg.birthday_min_spend, cfg.currency)}",
            "win_back": f"We miss you: {to_decimal_string(cfg.win_back_amount, cfg.currency)} off your next order"}

    # -- batches -----------------------------------------------------------------------------
    async def __call__(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        cfg, money = self.cfg, self.cfg.money
        now_of = await self._observe(conn, records)

        # Stores first: the events of this batch may name them.
        upserts = [s for r in records if r.topic == self.t_stores and r.value
                   and r.value["type"] == "store_upsert" and (s := _store_of(r.value))]
        await store.upsert_stores(conn, upserts)

        # Store each customer event once; a re-delivered one is not folded again.
        rows = []
        for r in records:
            if r.topic == self.t_events and r.value is not None:
                ev = r.value["event"]
                rows.append((*_event_key(ev), r.value["customer_id"], ev["occurred_at"], r.raw or b""))
            elif r.topic == self.t_loyalty and r.value is not None:
                rows.append(("loyalty", r.value["event_id"], r.value["customer_id"], r.value["occurred_at"], r.raw or b""))
        # Events resolved before a merge that we applied already belong to the survivor now.
        new, alias = await store.insert_events_and_aliases(conn, rows)

        ids: set[str] = set()
        store_ids: set[str] = set()
        for r in records:
            v = r.value
            if r.topic == self.t_events and v is not None:
                ids.add(v["customer_id"])
                store_ids.add(v["event"].get("store_id") or "")
            elif r.topic == self.t_loyalty and v is not None:
                ids.add(v["customer_id"])
            elif r.topic == self.t_profiles:
                cid = v["customer_id"] if v is not None else (r.key or b"").decode()
                if cid:
                    ids.add(cid)
                if v is not None:
                    store_ids.add(v.get("home_store_id") or "")
            elif r.topic == self.t_merges and v is not None:
                ids.update((v["survivor"], v["merged"]))
        ids.update(alias.values())
        loaded = await store.load_facts(conn, ids)
        facts: dict[str, CustomerFacts | None] = dict(loaded)
        stores = await store.load_stores(conn, store_ids)

        touched: set[str] = set()
        deleted: set[str] = set()
        erased: dict[str, dt.datetime] = {}  # customer -> when its erase_request was applied
        purchases: list[tuple[str, str, dt.datetime, int]] = []
        triggers: list[Trigger] = []
        merges: list[dict[str, Any]] = []

        for i, r in enumerate(records):
            v = r.value
            now = now_of[i]
            if r.topic == self.t_profiles:
                cid = v["customer_id"] if v is not None else (r.key or b"").decode()
                if not cid:
                    continue
                if v is None:  # tombstone: erase or merge-away; the merge record folds the history
                    facts[cid] = None
                    touched.discard(cid)
                    deleted.add(cid)
                    continue
                f = _live(cid, facts, loaded, touched, deleted)
                late = f.last_event_at
                apply_profile(f, v)
                _attach_home_store(f, stores)
                triggers += self._retro(f, late, v.get("updated_at"), now, R.birthday_coupon)
            elif r.topic == self.t_events:
                ev, cid = v["event"], alias.get(v["customer_id"], v["customer_id"])
                key = _event_key(ev)
                if key not in new:
                    continue
                new.discard(key)  # a second copy in this batch is a duplicate too
                if ev["type"] == "erase_request":
                    facts[cid] = None
                    touched.discard(cid)
                    erased.setdefault(cid, now)
                    continue
                f = _live(cid, facts, loaded, touched, deleted)
                # Whatever fell due before this event happened is decided before it is folded.
                triggers += self._due(f, ev["occurred_at"], now)
                shop = stores.get(ev.get("store_id") or "")
                triggers += R.welcome(f, ev, now, cfg, shop)
                apply_event(f, ev, money)
                triggers += R.geo_thank_you(f, ev, now, cfg, shop)
                amount = purchase_amount(ev, money)
                if amount is not None:
                    purchases.append((cid, ev["event_id"], ev["occurred_at"], amount))
            elif r.topic == self.t_loyalty:
                key = ("loyalty", v["event_id"])
                if key not in new:
                    continue
                new.discard(key)
                f = _live(alias.get(v["customer_id"], v["customer_id"]), facts, loaded, touched, deleted)
                late = f.last_event_at
                apply_loyalty(f, v)
                triggers += self._retro(f, late, v["occurred_at"], now, R.points_expiring)
                triggers += R.tier_upgrade(f, v, now, cfg)
            elif r.topic == self.t_merges:
                merges.append(v)

        await store.insert_purchases(conn, purchases)
        for m in merges:
            await self._apply_merge(conn, m, facts, touched, deleted)

        gone = [c for c in deleted if facts.get(c) is None]
        await store.delete_facts(conn, gone)
        await store.erase_customers(conn, sorted(erased))
        await store.save_facts(conn, [f for c in sorted(touched) if (f := facts.get(c)) is not None], cfg)

        store_events = [(i, r.value) for i, r in enumerate(records)
                        if r.topic == self.t_stores and r.value and r.value["type"] == "store_event"]
        await store.add_store_events(conn, [e for _, e in store_events])
        if not self.event_clock:
            for i, e in store_events:
                triggers += await self._invite(conn, e, now_of[i])
                await store.mark_invited(conn, e["event_id"], now_of[i])
        # With the event clock the scan invites, once every partition has reached the event's time,
        # so the customers' tiers and places are judged identically in every replay.

        await self.fire(conn, triggers)
        # After firing: a trigger of this batch that fired before the erasure loses its context too.
        await store.record_erasures(conn, erased)
        if self.event_clock:
            await store.save_watermarks(conn, self._batch_marks)
        if self.save_watermark is not None:
            await self.save_watermark(conn)

    def _due(self, f: CustomerFacts, as_of: dt.datetime, now: dt.datetime) -> list[Trigger]:
        """Time-based triggers of `f` due by `as_of`, marked fired in `f`.

        Event clock: each is judged at the scan boundary it fell due at (rules.due_by_boundary), so
        neither wall-clock scan timing nor which of a scan or the customer's next event found it
        changes its fired_at or context. Wall clock: judged and fired now.
        """
        if self.event_clock:
            return R.due_by_boundary(f, as_of, self.cfg, f.last_event_at or EPOCH, self.scan_interval)
        due = R.time_based(f, as_of, self.cfg, None)
        for t in due:
            R.mark_fired(f, t)
        return [dataclasses.replace(t, fired_at=now) for t in due]

    def _since(self, f: CustomerFacts) -> dt.datetime | None:
        """Event clock: the customer's facts are as they were since its last activity; wall clock: now."""
        if not self.event_clock:
            return None
        return f.last_event_at or EPOCH

    def _retro(self, f: CustomerFacts, latest: dt.datetime | None, at: dt.datetime | None,
               now: dt.datetime, rule) -> list[Trigger]:
        """A record from another topic that is older than the customer's latest event: what it would
        have made due in between is decided now, as if it had been read in event-time order."""
        if not self.event_clock or latest is None or at is None or at >= latest:
            return []
        # Each judged at the scan boundary it fell due at, not at this record's arrival.
        return R.due_by_boundary(f, latest, self.cfg, at, self.scan_interval, rules=(rule,))

    async def _observe(self, conn: asyncpg.Connection, records: Sequence[Record]) -> list[dt.datetime]:
        """Advance the clock by each record's event time; the 'now' each record is judged at.

        With the event clock, 'now' for a record is its own partition's watermark, so a stale
        event is recognised identically however the partitions interleave in a replay.
        """
        marks = await store.load_watermarks(conn) if self.event_clock else {}
        self._batch_marks: dict[tuple[str, int], dt.datetime] = {}
        out: list[dt.datetime] = []
        for r in records:
            at = _event_time(r)
            if at is not None:
                self.clock.observe(at)
            if not self.event_clock:
                out.append(self.clock.now())
                continue
            key = (r.topic, r.partition)
            if at is not None and (key not in marks or at > marks[key]):
                marks[key] = at
                self._batch_marks[key] = at
            out.append(marks.get(key) or self.clock.now())
        return out

    async def _apply_merge(self, conn: asyncpg.Connection, m: dict[str, Any],
                           facts: dict[str, CustomerFacts | None], touched: set[str],
                           deleted: set[str]) -> None:
        survivor, merged = m["survivor"], m["merged"]
        if survivor == merged or not await store.merge_is_new(conn, m["merge_id"], m["kind"], m["occurred_at"]):
            return
        if m["kind"] == "merged":
            await store.set_alias(conn, merged, survivor, m["merge_id"])
            absorbed = facts.get(merged)
            current = facts.get(survivor)
            if absorbed is not None and current is not None:
                facts[survivor] = merge_facts(current, absorbed, self.cfg.tier_order)
                await store.move_purchases(conn, merged, survivor)
            else:  # one side's facts are gone (its tombstone came first): fold the stored events
                facts[survivor] = await self._rederive(conn, survivor, current)
            merged_facts = facts[survivor]
            assert merged_facts is not None
            if merged_facts.last_event_at is None or merged_facts.last_event_at < m["occurred_at"]:
                merged_facts.last_event_at = m["occurred_at"]
            facts[merged] = None
            touched.discard(merged)
            deleted.add(merged)
            touched.add(survivor)
            deleted.discard(survivor)
        elif m["kind"] == "unmerged":
            if not await store.remove_alias(conn, merged, survivor):
                return
            # Split back by re-deriving each side from its own stored events, not by guessing.
            for head in (survivor, merged):
                facts[head] = await self._rederive(conn, head, facts.get(head))
                touched.add(head)
                deleted.discard(head)

    async def _rederive(self, conn: asyncpg.Connection, head: str,
                        current: CustomerFacts | None) -> CustomerFacts:
        """Facts of `head` folded again from the stored events of it and everyone merged into it."""
        members = await store.group_of(conn, head)
        f = reset_activity(current) if current is not None else CustomerFacts(head)
        purchases = []
        for source, raw in await store.owned_events(conn, members):
            if source != "loyalty":  # identity's, under whichever key _event_key gave it
                ev = self.codec.decode(raw, RESOLVED)["event"]
                if ev["type"] == "erase_request":
                    continue
                apply_event(f, ev, self.cfg.money)
                amount = purchase_amount(ev, self.cfg.money)
                if amount is not None:
                    purchases.append((head, ev["event_id"], ev["occurred_at"], amount))
            else:
                apply_loyalty(f, self.codec.decode(raw, LOYALTY))
        await conn.execute("DELETE FROM purchases WHERE customer_id = ANY($1::text[])", members)
        await store.insert_purchases(conn, purchases)
        return f

    async def _invite(self, conn: asyncpg.Connection, event: dict[str, Any], now: dt.datetime) -> list[Trigger]:
        props = event.get("properties") or {}
        shops = await store.load_stores(conn, [props.get("store_id") or ""])
        shop = shops.get(props.get("store_id") or "")
        if shop is None or shop.lat is None or shop.lon is None:
            log.info("store event %s: store unknown or without location; no invitations", event["event_id"])
            return []
        radius = props.get("radius_km")
        radius = float(radius) if radius is not None else self.cfg.invite_default_radius_km
        ids = await store.customers_near(conn, shop, radius, self.cfg.invite_tiers)
        out: list[Trigger] = []
        for chunk in _chunks(ids, 5000):
            for f in (await store.load_facts(conn, chunk, lock=False)).values():
                out += R.store_event_invite(f, event, shop, now, self.cfg)
        return out

    # -- firing --------------------------------------------------------------------------------
    async def fire(self, conn: asyncpg.Connection, triggers: Sequence[Trigger]) -> list[Trigger]:
        """Record triggers; the ones new by trigger_id go to `triggers.fired.v1` through the outbox."""
        new = await store.record_fired(conn, triggers, topic=self.t_fired, encode=self._encoder.trigger)
        if self._fired is not None and new:
            counts: dict[str, int] = {}
            for t in new:
                counts[t.kind] = counts.get(t.kind, 0) + 1
            for kind, n in counts.items():
                self._fired.labels(kind=kind).inc(n)
        return new

    # -- time-based scan -------------------------------------------------------------------------
    async def _scan_work(self, c: asyncpg.Connection, parts: Iterator[list[str]], now: dt.datetime,
                         zones: tuple[list[str], str] | None, dense: bool) -> int:
        """One connection's share of a scan: chunks from `parts` (shared by the connections, each
        chunk to whichever is free first) until none is left; how many fired. (A method, not a
        closure in scan: see tests/support/cycles.py.)"""
        fired = 0
        for part in parts:
            done = None
            if zones is not None:
                try:
                    async with c.transaction():
                        done = await self._scan_sql(c, part, now, zones, dense=dense)
                except (asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError):
                    # With a batch locking the same customers, or a trigger recorded meanwhile
                    # (store._SCAN_FIRE): rolled back, judged again.
                    done = None
            if done is None:  # event clock, or rolled back above: the Python rules, under row locks
                done = 0
                for sub in _chunks(part, 5000):
                    async with c.transaction():
                        done += await self._scan_rules(c, sub, now)
            fired += done
        return fired

    async def scan(self, conn: asyncpg.Connection, now: dt.datetime, *,
                   since: dt.datetime | None = None, chunk: int = 100_000, pool: asyncpg.Pool | None = None,
                   connections: int = 2) -> int:
        """Fire the time-based rules due at `now`: set-based SQL picks candidates, the rules decide.

        Wall clock: each chunk of candidates is judged by the SQL form of the rules (store.scan_due_sql)
        and fired, marked and put in the outbox in one transaction, so a crash loses or repeats no
        chunk and a repeated scan finds nothing left to fire. Customers the SQL cannot judge exactly,
        and every event-clock scan, go through the Python rules. Given a pool with connections to
        spare, up to `connections` take chunks as they come free (chunks hold disjoint customers), so
        the database works on several chunks at once while Python encodes another; the chunks'
        sizes are staggered (_scan_parts) so the connections do not all wait on Python at once.
        """
        started = time.perf_counter()
        others: list[asyncpg.Connection] = []
        paused = False
        try:
            while pool is not None and len(others) < connections - 1:
                try:
                    others.append(await pool.acquire(timeout=0.05))
                except TimeoutError:
                    break  # no connection to spare: with those there are
            ids = await store.scan_candidates(conn, now, self.cfg, since, other=others[0] if others else None)
            if len(ids) <= min(chunk, 5000):  # one chunk: no use for the spares
                for c in others:
                    await pool.release(c)
                others.clear()
            zones = None if self.event_clock else await self._sql_zones(conn)
            # At least four chunks when there are enough candidates, so both connections have work to overlap.
            parts = iter(_scan_parts(ids, min(chunk, max(5000, -(-len(ids) // 4))), max(1, connections)))
            # Candidates one in twenty customers or more: a chunk's children are read by key range.
            dense = zones is not None and len(ids) * 20 >= await store.customers_estimate(conn)

            # The chunks keep their rows and encoded triggers (a few hundred thousand objects) alive at
            # once, which the cyclic collector would traverse again and again (a fifth of a large scan's
            # Python CPU): reference counting frees all of it, and the collector pauses while they run.
            paused = len(ids) > min(chunk, 5000) and gc.isenabled()
            if paused:
                gc.disable()
            # All run to their end before the spare connections go back, even when one fails.
            results = await asyncio.gather(*(self._scan_work(c, parts, now, zones, dense) for c in (conn, *others)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            fired = sum(results)
        finally:
            if paused:
                gc.enable()
            for c in others:
                await pool.release(c)
        async with conn.transaction():
            invites: list[Trigger] = []
            for e in await store.pending_store_events(conn, now):
                # Judged as of the announcement, whenever the scan got to it.
                at = min(now, R.scan_boundary(e["occurred_at"], self.scan_interval)) if self.event_clock else now
                invites += [dataclasses.replace(t, fired_at=at)
                            for t in await self._invite(conn, e, e["occurred_at"])]
                await store.mark_invited(conn, e["event_id"], now)
            fired += len(await self.fire(conn, invites))
        if self._scan_seconds is not None:
            self._scan_seconds.observe(time.perf_counter() - started)
        return fired

    async def _scan_rules(self, conn: asyncpg.Connection, ids: Sequence[str], now: dt.datetime) -> int:
        """The Python rules over `ids` (inside the caller's transaction)."""
        facts = await store.load_facts(conn, ids)
        triggers: list[Trigger] = []
        changed: list[CustomerFacts] = []
        for f in facts.values():
            if self.event_clock and f.last_event_at is not None and f.last_event_at > now:
                continue  # its partition is ahead: its own next event or a later scan decides
            due = self._due(f, now, now)
            if due:
                changed.append(f)
                triggers += due
        await store.save_facts(conn, changed, self.cfg)
        return len(await self.fire(conn, triggers))

    async def _sql_zones(self, conn: asyncpg.Connection) -> tuple[list[str], str] | None:
        """Zones the SQL rules read as zoneinfo does, and the default zone; None: no SQL scan."""
        if self._zones is None:
            usable = sorted(await store.sql_zones(conn) & zoneinfo.available_timezones())
            self._zones = (usable, R.zone(None, self.cfg.default_timezone).key)
        usable, default = self._zones
        return self._zones if default in usable else None

    async def _scan_sql(self, conn: asyncpg.Connection, ids: Sequence[str], now: dt.datetime,
                        zones: tuple[list[str], str], *, dense: bool = True) -> int:
        """The SQL rules over `ids` (inside the caller's transaction); the rest by the Python rules.

        Customers whose facts a concurrent batch changed meanwhile are judged again by the Python rules.
        Triggers are decided and marked in the facts in one statement, encoded here, and recorded
        with their outbox rows in a second.
        """
        cfg = self.cfg
        rows = await store.scan_due_sql(conn, ids, now, cfg, *zones, dense=dense)
        enc = self._encoder
        fired_ms = _millis(now)
        birthday_offer = (self._descriptions["birthday_coupon"], cfg.birthday_amount, cfg.birthday_min_spend,
                          cfg.currency)
        winback_expires = now + dt.timedelta(days=cfg.win_back_valid_days)
        winback_offer = (self._descriptions["win_back"], cfg.win_back_amount, cfg.win_back_min_spend,
                         cfg.currency, _millis(winback_expires))
        rules_ids = {r[1] for r in rows if r[2] is None}  # the SQL cannot judge them, or their facts changed
        if enc.fast:
            encoded = enc.scan_rows(rows, rules_ids, fired_ms, birthday_offer, winback_offer)
        else:
            encoded = []
            context_keys = store.SCAN_CONTEXT_KEYS
            for rn, cid, kind, period, occurred_ms, values, expires_ms in rows:
                if kind is None or cid in rules_ids:
                    continue
                tid = _trigger_id(f"{kind}\x1f{cid}\x1f{period}")
                code = offer = None
                if kind == "birthday_coupon":
                    code = "BDAY-" + tid.replace("-", "")[:10].upper()
                    offer = (code, *birthday_offer, expires_ms)
                elif kind == "win_back":
                    code = "BACK-" + tid.replace("-", "")[:10].upper()
                    offer = (code, *winback_offer)
                encoded.append((rn, tid, code, cid.encode(), enc.encode(
                    tid, kind, cid, fired_ms, period, context_keys[kind], values, offer, occurred_ms)))
        counts = await store.fire_scan_due(conn, encoded, now, cfg, self._descriptions, winback_expires, self.t_fired,
                                           sorted(rules_ids))
        if self._fired is not None:
            for kind, n in counts.items():
                self._fired.labels(kind=kind).inc(n)
        fired = sum(counts.values())
        if rules_ids:
            fired += await self._scan_rules(conn, sorted(rules_ids), now)
        return fired

    async def scheduled_scan(self, pool: asyncpg.Pool) -> int:
        """The leader's timer job: scan when the clock has passed the next scan boundary."""
        async with pool.acquire() as conn:
            since = await store.last_scan(conn)
            now = self.clock.now()
            if self.event_clock:
                # Only as far as every partition has come, so no customer is judged on missing events.
                low = await store.min_watermark(conn, self.t_events, self.partitions)
                if low is None:
                    return 0
                now = min(now, low)
            as_of = _floor(now, self.scan_interval)
            if since is not None and as_of <= since:
                return 0
            # With the event clock, candidates are whatever fell due since the previous scan (from the
            # start of time on the first); in wall time, what is due now within its lateness.
            chain = (since or EPOCH) if self.event_clock else None
            fired = await self.scan(conn, as_of, since=chain, pool=pool)
            await store.save_scan(conn, as_of)
            return fired

    async def scan_on_demand(self, conn: asyncpg.Connection, as_of: dt.datetime) -> int:
        """The admin scan. Event clock: everything due since the previous scan (not only within the
        rules' lateness of `as_of`), and the chain moves on, so the result is the same whether or not
        the leader's timer had caught up first; wall clock: what is due at `as_of`."""
        if not self.event_clock:
            return await self.scan(conn, as_of)
        since = await store.last_scan(conn)
        if since is not None and as_of <= since:
            return await self.scan(conn, as_of, since=as_of)  # a look back at an earlier time
        fired = await self.scan(conn, as_of, since=since or EPOCH)
        await store.save_scan(conn, as_of)
        return fired

    # -- campaigns -------------------------------------------------------------------------------
    async def run_campaign(self, conn: asyncpg.Connection, name: str, segment: dict[str, Any],
                           message: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        """Fire a `campaign` trigger for every member of the segment, once per campaign name."""
        compiled = compile_segment(segment, now=now, money=self.cfg.money)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('campaign:' || $1))", name)
            existing = await store.campaign(conn, name)
            if existing is not None:
                if existing["segment"] != segment or existing["message"] != message:
                    raise CampaignConflict(name)
                return {"name": name, "members": existing["members"], "fired": 0, "created": False}
            count, ids = await store.segment_members(conn, compiled.where, compiled.params, None)
            fired = 0
            for part in _chunks(ids, 5000):
                fired += len(await self.fire(conn, [R.campaign(cid, name, message, now, self.cfg) for cid in part]))
            await store.insert_campaign(conn, name, segment, message, count, fired, now)
        return {"name": name, "members": count, "fired": fired, "created": True}


def _floor(at: dt.datetime, step: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
    seconds = int(step.total_seconds()) or 1
    return epoch + dt.timedelta(seconds=(int((at - epoch).total_seconds()) // seconds) * seconds)


def _millis(at: dt.datetime) -> int:
    """Avro timestamp-millis of an aware datetime, as fastavro computes it."""
    delta = at - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


_UUID_NAMESPACE = R.NAMESPACE.bytes
_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant of a hex digit


def _trigger_id(name: str) -> str:
    """rules.trigger_id for the name kind\x1fcustomer_id\x1fperiod (uuid5)."""
    return uuid5(_UUID_NAMESPACE, name)


_SMALL_LONGS = [bytes([i << 1]) for i in range(64)]


def _avro_long(n: int) -> bytes:
    if 0 <= n < 64:
        return _SMALL_LONGS[n]
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_str(s: str) -> bytes:
    b = s.encode()
    return _avro_long(len(b)) + b


_LONGS: dict[int, bytes] = {}  # instants many triggers of a scan share (fired_at, local midnights)


def _avro_long_repeated(n: int) -> bytes:
    b = _LONGS.get(n)
    if b is None:
        b = _avro_long(n)
        if len(_LONGS) >= 100_000:
            _LONGS.clear()  # the instants of earlier scans: start again rather than stop caching
        _LONGS[n] = b
    return b


_REPEATED: dict[str, bytes] = {}  # context keys and the values many triggers share (dates, counts, zones)


def _avro_str_repeated(s: str) -> bytes:
    b = _REPEATED.get(s)
    if b is None:
        b = _avro_str(s)
        if len(_REPEATED) >= 100_000:
            _REPEATED.clear()  # mostly the dates of earlier scans: start again rather than stop caching
        _REPEATED[s] = b
    return b


class _TriggerEncoder:
    """`triggers.fired.v1` values of scan rows and fired triggers, byte for byte what encode_trigger writes.

    A tight encoder for the current TriggerFired schema; it checks itself against the codec at
    start and, should the schema have moved on, encodes through the codec instead.
    """

    def __init__(self, codec: AvroCodec) -> None:
        self.codec = codec
        self.header = codec.registry.latest(TRIGGER).header
        self.fast = True
        self._tails: dict[tuple, bytes] = {}
        sample = R.make_trigger("win_back", "c\u00e9-1", "2026-01-01T00:00:00+00:00", EPOCH + dt.timedelta(days=20000),
                                context={"a": "x", "days": 120}, occurred_at=EPOCH - dt.timedelta(milliseconds=1500),
                                offer=R.Offer("BACK-1", "d\u00e9", 2000, 0, "USD", EPOCH + dt.timedelta(days=9)))
        for t in (sample, dataclasses.replace(sample, context={}, offer=None),
                  dataclasses.replace(sample, cause_event_id="ev-\u00e9", occurred_at=None)):
            if self._encode(t) != encode_trigger(codec, t):
                self.fast = False

    def _encode(self, t: Trigger) -> bytes:
        o = t.offer
        return self.encode(t.trigger_id, t.kind, t.customer_id, _millis(t.fired_at), t.period,
                           list(t.context), list(t.context.values()),
                           (o.code, o.description, o.amount, o.min_spend, o.currency, _millis(o.expires_at))
                           if o else None, None if t.occurred_at is None else _millis(t.occurred_at),
                           cause_event_id=t.cause_event_id)

    def trigger(self, t: Trigger) -> bytes:
        """encode_trigger(codec, t): the tight way for the values it writes (strings in the context,
        aware datetimes), through the codec for anything else."""
        if self.fast and all(v.__class__ is str for v in t.context.values()):
            try:
                return self._encode(t)
            except (TypeError, AttributeError, ValueError, OverflowError):
                pass  # a value the codec takes otherwise (or refuses, with its own error)
        return encode_trigger(self.codec, t)

    def _tail(self, rest: tuple) -> bytes:
        """An offer after its code: what all offers of a kind share in a scan (description, amounts,
        currency, end)."""
        tail = self._tails.get(rest)
        if tail is None:
            description, amount, min_spend, currency, expires_ms = rest
            rep = _avro_str_repeated
            tail = rep(description) + _avro_long(amount) + _avro_long(min_spend) + rep(currency) \
                + _avro_long(expires_ms)
            if len(self._tails) >= 10_000:
                self._tails.clear()
            self._tails[rest] = tail
        return tail

    def scan_rows(self, rows: Sequence[Sequence[Any]], skip: set[str], fired_ms: int, birthday_offer: tuple,
                  winback_offer: tuple) -> list[tuple[int, str, str | None, bytes, bytes]]:
        """(rn, trigger_id, offer code, outbox key, value) of store.scan_due_sql rows that have a kind and
        whose customer is not in `skip`: the ids _trigger_id gives and the values encode writes (only
        while `fast`), in one loop: a million customers' scan encodes ~300,000 of them."""
        sha1, ns, variant = hashlib.sha1, _UUID_NAMESPACE, _UUID_VARIANT
        header, fired = self.header, _avro_long_repeated(fired_ms)
        repeated, rep, small, long_ = _REPEATED, _avro_str_repeated, _SMALL_LONGS, _avro_long
        kinds = {kind: (rep(kind), tuple(rep(k) for k in keys)) for kind, keys in store.SCAN_CONTEXT_KEYS.items()}
        winback_tail = self._tail(tuple(winback_offer))
        birthday_tails: dict[int, bytes] = {}
        out: list[tuple[int, str, str | None, bytes, bytes]] = []
        append = out.append
        for rn, cid, kind, period, occurred_ms, values, expires_ms in rows:
            if kind is None or cid in skip:
                continue
            # rules.trigger_id (uuid5 of kind, customer, period): the version and variant nibbles set
            h = sha1(ns + f"{kind}\x1f{cid}\x1f{period}".encode()).hexdigest()
            tid = f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{variant[h[16]]}{h[17:20]}-{h[20:32]}"
            kind_b, keys_b = kinds[kind]
            key = cid.encode()
            p = period.encode()
            parts = [header, b"\x48", tid.encode(), kind_b,  # 36 characters: zig-zag 72
                     small[len(key)] if len(key) < 64 else long_(len(key)), key, fired,
                     small[len(p)] if len(p) < 64 else long_(len(p)), p]
            n = len(parts)
            for k, v in zip(keys_b, values, strict=True):
                if v is not None:
                    parts.append(k)
                    parts.append(repeated.get(v) or rep(v))
            if len(parts) > n:
                parts.insert(n, small[(len(parts) - n) >> 1])  # at most 7 pairs
            parts.append(b"\x00")
            code = None
            if kind == "birthday_coupon":
                code = "BDAY-" + h[:10].upper()  # the id's first ten hex digits
                tail = birthday_tails.get(expires_ms)
                if tail is None:
                    tail = birthday_tails[expires_ms] = self._tail((*birthday_offer, expires_ms))
                parts += (b"\x02\x1e", code.encode(), tail)  # 15 characters: zig-zag 30
            elif kind == "win_back":
                code = "BACK-" + h[:10].upper()
                parts += (b"\x02\x1e", code.encode(), winback_tail)
            else:
                parts.append(b"\x00")
            if occurred_ms is None:
                parts.append(b"\x00\x00")  # no cause event, no occurred_at
            else:
                parts += (b"\x00\x02", _avro_long_repeated(occurred_ms))
            append((rn, tid, code, key, b"".join(parts)))
        return out

    def encode(self, tid: str, kind: str, customer_id: str, fired_ms: int, period: str, keys: Sequence[str],
               values: Sequence[str | None], offer: tuple | None, occurred_ms: int | None, *,
               cause_event_id: str | None = None) -> bytes:
        pairs = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]
        if not self.fast:
            return self.codec.encode(TRIGGER, {
                "trigger_id": tid, "kind": kind, "customer_id": customer_id, "fired_at": fired_ms,
                "period": period, "context": dict(pairs), "cause_event_id": cause_event_id,
                "occurred_at": occurred_ms,
                "offer": None if offer is None else dict(zip(
                    ("code", "description", "amount", "min_spend", "currency", "expires_at"), offer, strict=True))})
        rep = _avro_str_repeated
        parts = [self.header, _avro_str(tid), rep(kind), _avro_str(customer_id), _avro_long_repeated(fired_ms),
                 _avro_str(period)]
        if pairs:
            parts.append(_avro_long(len(pairs)))
            for k, v in pairs:
                parts.append(rep(k))
                parts.append(rep(v))
        parts.append(b"\x00")
        if offer is None:
            parts.append(b"\x00")
        else:
            parts += [b"\x02", _avro_str(offer[0]), self._tail(tuple(offer[1:]))]
        if cause_event_id is None:
            parts.append(b"\x00")
        else:
            parts += [b"\x02", _avro_str(cause_event_id)]
        if occurred_ms is None:
            parts.append(b"\x00")
        else:
            parts += [b"\x02", _avro_long_repeated(occurred_ms)]
        return b"".join(parts)


def _scan_parts(ids: Sequence[str], size: int, connections: int) -> list[list[str]]:
    """The scan's chunks of about `size`, staggered when they make whole rounds for the connections.

    Equal chunks keep the connections in step: all of them decide their chunk at once, then wait
    together for Python to encode, then record at once, and the last to finish records alone. The
    first round's chunks grow (0.6 to 1.2 of the size) and the last round's shrink by as much, so
    the connections drift apart in phase and still finish together.
    """
    k = -(-len(ids) // size) if ids else 0
    if connections < 2 or k < 2 * connections or k % connections:
        return [list(ids[i:i + size]) for i in range(0, len(ids), size)]
    first = [0.6 + 0.6 * j / (connections - 1) for j in range(connections)]
    weights = first + [1.0] * (k - 2 * connections) + [2.0 - w for w in first]
    total, parts, start = sum(weights), [], 0
    for i, w in enumerate(weights):
        end = len(ids) if i == k - 1 else start + round(len(ids) * w / total)
        parts.append(list(ids[start:end]))
        start = end
    return parts


def _chunks(items: Sequence[str], size: int):
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


