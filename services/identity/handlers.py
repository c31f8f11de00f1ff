"""Batches in, identity decisions out: normalise, de-duplicate, load the graph once, resolve each
event, write the changes and the outbox records (resolved events, profiles, merges) in the
consumer's transaction.

Per event, in this order: its resolved record, the merges it caused, then a profile record (or
tombstone) for each customer it changed, as of that event. A profile is never folded across events,
so the profile records (and their version and updated_at) depend on the events alone, not on where
the fetches happened to cut the batches: a replay under the event clock publishes the same history,
and notifications decides each trigger on the version in force at its fired_at.

Two workers can see the same person at once. The batch runs in a savepoint: customers are locked
in id order, new identifiers are inserted in key order under their unique key, and when another
worker got there first (unique violation, or a locked customer turned out merged away) the
savepoint is rolled back and the batch is resolved again against the now-committed graph.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.identity import profile, store
from services.identity.normalise import Ident, Normaliser
from services.identity.records import profile_record
from services.identity.resolution import Customer, Graph, Guard, Incoming, NoIdentifier, resolve
from services.identity.sealing import Sealer
from shared.avro import HEADER_LEN, AvroCodec, fingerprint
from shared.batch_consumer import Record
from shared.clock import Clock
from shared.crypto import Vault
from shared.errors import PermanentError, TransientError
from shared.events import STORE_TYPES, for_encoding
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxMessage, add_to_outbox
from shared.topics import (
    EVENT,
    IDENTITY_EVENTS,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    MERGE,
    PROFILE,
    RESOLVED,
    ROUTES,
)

log = logging.getLogger(__name__)
CUSTOMER_TYPES = frozenset(t for t in ROUTES if t not in STORE_TYPES)
# Only these types can say something about the profile (profile.delta_of); every other event
# shares one empty delta, which nothing mutates (profile.merge builds new states).
_DELTA_TYPES = profile.PROFILE_TYPES | {"consent_update"}
_NO_DELTA = profile.empty()


class _GraphMoved(Exception):
    """A customer this batch locked was merged away by another worker meanwhile."""


# From this many events a batch plans its statements for its own arrays (custom plans). asyncpg
# prepares every statement, and after five executions PostgreSQL may keep a generic plan costed on
# the table sizes of that moment: planned while `sightings` was (nearly) empty, the graph load's
# look-ups became a sequential scan per identifier and stayed one as the table grew (measured:
# ~10 us of backend CPU per event in 1000-event batches). In a large batch planning each statement
# costs far less; in a small one (20 events, measured) it costs more than it saves.
CUSTOM_PLANS_FROM = 256
_SAVEPOINT = "SAVEPOINT identity_batch"
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


class _Savepoint:
    """The batch's savepoint inside the consumer's transaction, in one round trip instead of two:
    opened (with the plan setting, one simple query), rolled back to on a graph conflict, and
    never released: the consumer's commit releases it (a release would change nothing but cost
    a round trip per batch). SET LOCAL after the savepoint is undone by a rollback to it; the next
    attempt opens a new one and sets it again. Outside a transaction: a transaction of its own."""

    def __init__(self, conn: asyncpg.Connection, *, custom_plans: bool) -> None:
        self.conn = conn
        self.sql = f"{_SAVEPOINT}; {_CUSTOM_PLANS}" if custom_plans else _SAVEPOINT
        self.own: Any = None

    async def __aenter__(self) -> None:
        if not self.conn.is_in_transaction():
            self.own = self.conn.transaction()
            await self.own.__aenter__()
            if self.sql != _SAVEPOINT:
                await self.conn.execute(_CUSTOM_PLANS)
            return
        await self.conn.execute(self.sql)

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self.own is not None:
            await self.own.__aexit__(kind, exc, tb)
        elif kind is not None and issubclass(kind, (asyncpg.UniqueViolationError, _GraphMoved)):
            await self.conn.execute("ROLLBACK TO SAVEPOINT identity_batch")


@dataclass
class _Item:
    event: dict[str, Any]
    incoming: Incoming
    raw: bytes | None = None
    tail: bytes | None = None  # the ResolvedEvent after customer_id, for incoming.identifiers


def _avro_long(buf: bytearray, n: int) -> None:
    n = (n << 1) ^ (n >> 63)  # zig-zag
    while n & ~0x7F:
        buf.append((n & 0x7F) | 0x80)
        n >>= 7
    buf.append(n)


_SMALL = [bytes(((n << 1),)) for n in range(64)]  # zig-zag varints of 0..63: one byte


def _avro_len(n: int) -> bytes:
    if n < 64:
        return _SMALL[n]
    buf = bytearray()
    _avro_long(buf, n)
    return bytes(buf)


def _avro_str(text: str) -> bytes:
    data = text.encode()
    return _avro_len(len(data)) + data


class IdentityMetrics:
    """The identity-specific metric families (labels are outcomes and reasons, never identifiers)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.resolutions = metrics.counter("resolutions", "Events resolved, by outcome.", ("outcome",))
        self.merges = metrics.counter("merges", "Merge edges recorded or undone.", ("kind",))
        self.quarantined = metrics.counter(
            "quarantined", "Identifiers held back by the over-merge guard, by reason.", ("reason",))
        self.conflicts = metrics.counter(
            "graph_conflicts", "Batches resolved again after another worker changed the graph.")
        self.duplicates = metrics.counter("duplicate_events", "Re-delivered events skipped.")
        self.erased = metrics.counter("erased", "Customers erased on request.")


class IdentityHandler:
    """The batch handler of the ingest topics."""

    def __init__(self, *, codec: AvroCodec, normaliser: Normaliser, guard: Guard,
                 metrics: IdentityMetrics, clock: Clock,
                 save_watermark: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                 max_attempts: int = 8, vault: Vault | None = None) -> None:
        self.codec = codec
        self.normaliser = normaliser
        self.guard = guard
        self.metrics = metrics
        self.clock = clock
        self.save_watermark = save_watermark
        self.max_attempts = max_attempts
        # Embedded development keys when none is given (tests, bench); app.py passes the real one.
        self.sealer = Sealer(vault or Vault.from_env(embedded=True))
        self._legacy_checked = False
        self.countries: dict[str, str] = {}
        resolved = codec.registry.latest(RESOLVED)
        embedded = next(f["type"] for f in resolved.schema["fields"] if f["name"] == "event")
        event = codec.registry.latest(EVENT)
        self._resolved_header = resolved.header
        self._event_header = event.header if fingerprint(embedded) == event.fingerprint else None

    async def __call__(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        bound = [r for r in records
                 if isinstance(r.value, dict) and dict.get(r.value, "type") in CUSTOMER_TYPES]
        if not bound:
            return
        events = [r.value for r in bound]
        await self._learn_countries(conn, {s for e in events if (s := dict.get(e, "store_id"))})
        if not self._legacy_checked:  # a database from before 002: convert its clear rows first
            self._legacy_checked = await store.convert_legacy(conn, self.sealer) is None
        self.sealer.forget()
        # The claim goes out first, and the batch is normalised and its blind indexes computed
        # while PostgreSQL runs it: the two overlap instead of taking turns. The claim stays in
        # the consumer's transaction (a graph conflict below rolls back only the savepoint, and
        # the retry resolves the same claimed events).
        claim = asyncio.ensure_future(store.claim_events(conn, [e["event_id"] for e in events]))
        await asyncio.sleep(0)  # let it write the query
        try:
            items = [self._item(r.value, r.raw) for r in bound]
            self.sealer.tokens(sorted({i for item in items for i in item.incoming.identifiers}))
        except BaseException:
            await asyncio.gather(claim, return_exceptions=True)  # the connection is free again
            raise
        claimed = await claim
        for attempt in range(self.max_attempts):
            try:
                async with _Savepoint(conn, custom_plans=len(items) >= CUSTOM_PLANS_FROM):
                    await self._apply(conn, items, claimed)
                break
            except (asyncpg.UniqueViolationError, _GraphMoved):
                self.metrics.conflicts.inc()
                log.info("identity graph changed under the batch; resolving again (%d)", attempt + 1)
        else:
            raise TransientError("identity graph kept changing under the batch")
        self.clock.observe(max(e["occurred_at"] for e in events))  # the clock keeps the largest
        if self.save_watermark is not None:
            await self.save_watermark(conn)

    def _item(self, event: dict[str, Any], raw: bytes | None) -> _Item:
        # dict.get: the lean decoder's event decodes `properties` lazily, nothing else is lazy.
        store_id = dict.get(event, "store_id")
        country = self.countries.get(store_id) if store_id else None
        idents = self.normaliser.identifiers(dict.get(event, "customer"), country)
        kind = event["type"]
        if not idents:
            raise PermanentError("no_identifier", f"{kind} event has no usable customer identifier")
        delta = profile.delta_of(event) if kind in _DELTA_TYPES else _NO_DELTA
        return _Item(event, Incoming(event["event_id"], kind, event["occurred_at"], tuple(idents), delta),
                     raw)

    async def _learn_countries(self, conn: asyncpg.Connection, store_ids: set[str]) -> None:
        unknown = sorted(s for s in store_ids if s not in self.countries)
        if unknown:
            self.countries.update(await store.store_countries(conn, unknown))

    async def _apply(self, conn: asyncpg.Connection, items: list[_Item], claimed: set[str]) -> None:
        fresh = set(claimed)
        todo: list[_Item] = []
        for item in items:
            if item.incoming.event_id in fresh:
                fresh.discard(item.incoming.event_id)  # first copy in the batch wins
                todo.append(item)
        self.metrics.duplicates.inc(len(items) - len(todo))
        if not todo:
            return
        matched = await self._plain_matches(conn, todo)
        graph = Graph(guard=self.guard)
        changing = [i for n, i in enumerate(todo) if n not in matched]
        if changing:
            since = min(i.incoming.occurred_at for i in changing) - self.guard.window
            idents = {ident for i in changing for ident in i.incoming.identifiers}
            if await store.load_graph(conn, graph, idents, since, self.sealer):
                raise _GraphMoved()
        out: list[OutboxMessage] = []
        merges = []
        links: dict[Ident, tuple[str, dt.datetime]] = {}
        outcomes: dict[str, int] = {"matched": len(matched)} if matched else {}
        for n, item in enumerate(todo):
            inc = item.incoming
            owner = matched.get(n)
            if owner is not None:
                out.append(OutboxMessage(IDENTITY_EVENTS.name, owner,
                                         self.resolved_bytes(owner, inc.identifiers, item)))
                continue
            try:
                res = resolve(graph, inc)
            except NoIdentifier as exc:
                raise PermanentError("no_identifier", f"{inc.type} event: {exc}") from None
            for ident in res.identifiers:
                if ident in graph.homes and ident not in links:
                    links[ident] = (inc.event_id, inc.occurred_at)
            outcomes[res.outcome] = outcomes.get(res.outcome, 0) + 1
            for _, reason in res.quarantined:
                self.metrics.quarantined.labels(reason=reason).inc()
            out.append(OutboxMessage(IDENTITY_EVENTS.name, res.customer_id,
                                     self.resolved_bytes(res.customer_id, res.identifiers, item)))
            for m in res.merges:
                merges.append(m)
                out.append(self._merge_message(m))
            if res.erased:
                self.metrics.erased.inc()
            touched = graph.touched
            if touched:
                self._profile_messages(touched, out, inc.occurred_at)
        await store.save_graph(conn, graph, merges, links, self.sealer)
        await add_to_outbox(conn, out)
        for outcome, count in outcomes.items():
            self.metrics.resolutions.labels(outcome=outcome).inc(count)
        if merges:
            self.metrics.merges.labels(kind="merged").inc(len(merges))

    async def _plain_matches(self, conn: asyncpg.Connection, todo: list[_Item]) -> dict[int, str]:
        """Events that only match an existing customer and change nothing: every identifier
        already owned by that one customer, none quarantined, no profile delta, not an erase, not
        older than a link it holds (so not older than the customer), and no other event of the
        batch touching that customer. They
        resolve from one lock-free probe; only the rest lock and load their customers.

        Read without a lock, a match can race a merge or erase committed by another worker at the
        same moment: the event is then keyed by the id as it was an instant before (downstream
        services fold merged-away ids into survivors, as they must for events and merges that
        travel on different topics anyway); the graph itself is not written for these events."""
        idents = sorted({ident for i in todo for ident in i.incoming.identifiers})
        probe = asyncio.ensure_future(store.probe(conn, idents, self.sealer))
        await asyncio.sleep(0)  # let it write the query
        try:  # while PostgreSQL answers: the part of each resolved record that needs no owner
            for item in todo:
                item.tail = self._resolved_tail(item.incoming.identifiers, item)
        finally:
            known = await probe
        owner_at, linked_at, quarantined = store.OWNER, store.LINKED_AT, store.QUARANTINED
        matched: dict[int, str] = {}
        touched: set[str] = set()
        for n, item in enumerate(todo):
            inc = item.incoming
            owner = None
            for ident in inc.identifiers:  # one owner, unquarantined, for every identifier
                p = known.get(ident)
                if p is None or p[quarantined] is not None or p[owner_at] is None or (
                        owner is not None and p[owner_at] != owner):
                    owner = None
                    break
                owner = p[owner_at]
            if (owner is not None and not inc.erase
                    and (inc.delta is _NO_DELTA or profile.is_empty(inc.delta))
                    and any(inc.occurred_at >= known[i][linked_at] for i in inc.identifiers)):
                matched[n] = owner
            else:
                for ident in inc.identifiers:
                    p = known.get(ident)
                    if p is not None and p[owner_at] is not None:
                        touched.add(p[owner_at])
        return {n: owner for n, owner in matched.items() if owner not in touched}

    def resolved_bytes(self, customer_id: str, identifiers: tuple[Ident, ...], item: _Item) -> bytes:
        """The ResolvedEvent value. When the input was written with the very Event schema that
        ResolvedEvent embeds, its Avro body is reused as is (a record's encoding is its fields'
        encodings in order), which saves re-encoding every event."""
        tail = item.tail if identifiers == item.incoming.identifiers else None
        if tail is None:
            tail = self._resolved_tail(identifiers, item)
        if tail is not None:
            return b"".join((self._resolved_header, _avro_str(customer_id), tail))
        return self.codec.encode(RESOLVED, {
            "customer_id": customer_id,
            "identifiers": [{"type": t, "value": v} for t, v in identifiers],
            "event": for_encoding(item.event),
        })

    def _resolved_tail(self, identifiers: tuple[Ident, ...], item: _Item) -> bytes | None:
        """The encoded `identifiers` and `event` fields, when the input's body can be reused."""
        raw = item.raw
        if self._event_header is None or raw is None or raw[:HEADER_LEN] != self._event_header:
            return None
        parts = []
        if identifiers:
            parts.append(_avro_len(len(identifiers)))
            for kind, value in identifiers:
                parts.append(_avro_str(kind))
                parts.append(_avro_str(value))
        parts.append(b"\0")  # end of the identifiers array
        parts.append(memoryview(raw)[HEADER_LEN:])
        return b"".join(parts)

    def _merge_message(self, m) -> OutboxMessage:
        return OutboxMessage(IDENTITY_MERGES.name, m.survivor, self.codec.encode(MERGE, {
            "merge_id": m.merge_id, "kind": m.kind, "survivor": m.survivor, "merged": m.merged,
            "reason": m.reason, "cause_event_id": m.cause_event_id, "occurred_at": m.occurred_at,
        }))

    def _profile_messages(self, touched: dict[str, Customer], out: list[OutboxMessage],
                          at: dt.datetime) -> None:
        """The profile records due after one event: each customer it changed, as of that event
        (a tombstone for one it merged away or erased, carrying the event's time as a header, so a
        replay orders it where it happened), one version each, in customer id order."""
        for cid in sorted(touched) if len(touched) > 1 else touched:
            c = touched[cid]
            c.changed = True  # the version is stored with the row
            if c.tombstone:
                c.tombstone = c.profile_changed = False
                c.version += 1
                out.append(OutboxMessage(IDENTITY_PROFILES.name, cid, None, at=at))
            elif c.profile_changed and c.merged_into is None:
                c.profile_changed = False
                c.version += 1
                out.append(OutboxMessage(IDENTITY_PROFILES.name, cid,
                                         self.codec.encode(PROFILE, profile_record(c))))


async def handle_stores(handler: IdentityHandler, conn: asyncpg.Connection,
                        records: list[Record]) -> None:
    """Keep store countries (the default region for phone numbers captured in each store)."""
    latest: dict[str, tuple[str, str, str | None]] = {}
    for r in records:
        e = r.value
        if not isinstance(e, dict) or e.get("type") != "store_upsert":
            continue
        s = (e.get("properties") or {}).get("store") or {}
        if s.get("store_id") and s.get("country"):
            latest[s["store_id"]] = (s["store_id"], str(s["country"]).upper(), s.get("timezone"))
    await store.upsert_stores(conn, sorted(latest.values()))
    for store_id, country, _ in latest.values():
        handler.countries[store_id] = country
