"""The identity graph's SQL: set-based, a fixed handful of round trips per batch whatever its size."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from services.identity.normalise import Ident
from services.identity.resolution import Customer, Graph, MergeEdge

_CLAIM = """
INSERT INTO processed_events (event_id)
SELECT DISTINCT e FROM unnest($1::text[]) AS u(e) ORDER BY 1
ON CONFLICT DO NOTHING RETURNING event_id
"""

# Customers owning any identifier of the batch, locked in id order (a fixed order: no deadlocks).
_LOCK = """
SELECT c.* FROM customers c
WHERE c.customer_id IN (
    SELECT i.customer_id FROM unnest($1::text[], $2::text[]) AS q(t, v)
    -- LATERAL + LIMIT keeps this an index probe per identifier (a hash join would scan them all)
    CROSS JOIN LATERAL (SELECT customer_id FROM identifiers
                        WHERE id_type = q.t AND value = q.v LIMIT 1) AS i)
ORDER BY c.customer_id
FOR UPDATE OF c
"""

# After the lock (a fresh snapshot): every identifier of the locked customers, the quarantine
# entries and the recent sightings of the batch's identifiers.
_DETAILS = """
SELECT 'i' AS k, id_type, value, customer_id AS ref, NULL::timestamptz AS at
  FROM identifiers WHERE customer_id = ANY($1::text[])
UNION ALL
SELECT 'q', q.id_type, q.value, q.reason, q.since FROM unnest($2::text[], $3::text[]) AS u(t, v)
  CROSS JOIN LATERAL (SELECT * FROM quarantined_identifiers
                      WHERE id_type = u.t AND value = u.v LIMIT 1) AS q
UNION ALL
SELECT 's', s.id_type, s.value, s.anchor, s.seen_at FROM unnest($2::text[], $3::text[]) AS u(t, v)
  CROSS JOIN LATERAL (SELECT * FROM sightings
                      WHERE id_type = u.t AND value = u.v AND seen_at >= $4 LIMIT 100) AS s
"""

_UPSERT_CUSTOMERS = """
INSERT INTO customers (customer_id, created_at, updated_at, merged_into, erased, version, own,
                       golden, members, blocked, quarantined, created_by)
SELECT r.customer_id, r.created_at, r.updated_at, r.merged_into, r.erased, r.version, r.own,
       r.golden, r.members, r.blocked, r.quarantined, r.created_by
FROM jsonb_to_recordset($1::jsonb) AS r(customer_id text, created_at timestamptz,
     updated_at timestamptz, merged_into text, erased boolean, version bigint, own jsonb,
     golden jsonb, members jsonb, blocked jsonb, quarantined jsonb, created_by text)
ORDER BY r.customer_id
ON CONFLICT (customer_id) DO UPDATE SET
    created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
    merged_into = EXCLUDED.merged_into, erased = EXCLUDED.erased, version = EXCLUDED.version,
    own = EXCLUDED.own, golden = EXCLUDED.golden, members = EXCLUDED.members,
    blocked = EXCLUDED.blocked, quarantined = EXCLUDED.quarantined
"""

_REPOINT = """
UPDATE identifiers SET customer_id = ($2::text[])[array_position($1::text[], customer_id)]
WHERE customer_id = ANY($1::text[])
"""

# Sorted inserts: two workers inserting overlapping identifiers wait in the same order.
_LINK = """
INSERT INTO identifiers (id_type, value, customer_id, home_customer_id, linked_at, event_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
ORDER BY 1, 2
"""

_MERGES = """
INSERT INTO merges (merge_id, survivor, merged, reason, cause_event_id, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
ON CONFLICT (merge_id) DO NOTHING
"""

_SIGHTINGS = """
INSERT INTO sightings (id_type, value, anchor, seen_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT DO NOTHING
"""

_QUARANTINE = """
INSERT INTO quarantined_identifiers (id_type, value, reason, since)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT DO NOTHING
"""

_ERASE_MEMBERS = """
UPDATE customers SET own = '{}'::jsonb, golden = '{}'::jsonb, quarantined = '[]'::jsonb,
       erased = true
WHERE customer_id IN (SELECT jsonb_array_elements_text(members) FROM customers
                      WHERE customer_id = ANY($1::text[]))
"""


async def claim_events(conn: asyncpg.Connection, event_ids: Sequence[str]) -> set[str]:
    """Record event ids as processed; returns the ones not seen before."""
    rows = await conn.fetch(_CLAIM, list(event_ids))
    return {r["event_id"] for r in rows}


async def load_graph(conn: asyncpg.Connection, graph: Graph, idents: Iterable[Ident],
                     since: dt.datetime) -> list[str]:
    """Lock the customers owning `idents` and load them into `graph`; returns ids that were
    merged away meanwhile (the caller retries: another worker moved their identifiers)."""
    idents = sorted(set(idents))
    types = [t for t, _ in idents]
    values = [v for _, v in idents]
    locked = await conn.fetch(_LOCK, types, values)
    stale = [r["customer_id"] for r in locked if r["merged_into"] is not None or r["erased"]]
    ids = [r["customer_id"] for r in locked]
    owned: dict[str, set[Ident]] = {cid: set() for cid in ids}
    for r in await conn.fetch(_DETAILS, ids, types, values, since):
        ident = (r["id_type"], r["value"])
        if r["k"] == "i":
            owned[r["ref"]].add(ident)
        elif r["k"] == "q":
            graph.quarantined[ident] = r["ref"]
        else:
            graph.sightings.setdefault(ident, []).append((r["ref"], r["at"]))
    for r in locked:
        graph.add(customer_from_row(r, owned[r["customer_id"]]))
    return stale


def customer_from_row(r: Any, identifiers: set[Ident]) -> Customer:
    return Customer(
        customer_id=r["customer_id"], created_at=r["created_at"], updated_at=r["updated_at"],
        identifiers=identifiers, own=r["own"] or {}, golden=r["golden"] or {},
        members=list(r["members"] or []), blocked=set(r["blocked"] or []),
        quarantined=list(r["quarantined"] or []), merged_into=r["merged_into"],
        erased=r["erased"], version=r["version"], created_by=r["created_by"])


def _row(c: Customer) -> dict[str, Any]:
    return {"customer_id": c.customer_id, "created_at": c.created_at.isoformat(),
            "updated_at": c.updated_at.isoformat(), "merged_into": c.merged_into,
            "erased": c.erased, "version": c.version, "own": c.own, "golden": c.golden,
            "members": sorted(c.members), "blocked": sorted(c.blocked),
            "quarantined": c.quarantined, "created_by": c.created_by}


async def save_customers(conn: asyncpg.Connection, customers: Iterable[Customer]) -> None:
    rows = [_row(c) for c in customers]
    if rows:
        await conn.execute(_UPSERT_CUSTOMERS, rows)  # the pool's jsonb codec encodes it


async def save_graph(conn: asyncpg.Connection, graph: Graph, merges: Sequence[MergeEdge],
                     link_events: dict[Ident, tuple[str, dt.datetime]]) -> None:
    """Write what a batch changed: customers, re-pointed / erased / new links, merges, guard state."""
    await save_customers(conn, (c for c in graph.customers.values() if c.changed))
    if graph.merged_away:
        old = sorted(graph.merged_away)
        await conn.execute(_REPOINT, old, [graph.merged_away[m] for m in old])
    if graph.erased:
        erased = sorted(graph.erased)
        await conn.execute("DELETE FROM identifiers WHERE customer_id = ANY($1::text[])", erased)
        await conn.execute(_ERASE_MEMBERS, erased)
    if graph.removed:
        gone = sorted(graph.removed)
        await conn.execute(
            "DELETE FROM sightings s USING unnest($1::text[], $2::text[]) AS u(t, v) "
            "WHERE s.id_type = u.t AND s.value = u.v", [t for t, _ in gone], [v for _, v in gone])
    links = sorted(i for i in graph.homes if i in graph.owners)
    if links:
        await conn.execute(
            _LINK, [t for t, _ in links], [v for _, v in links], [graph.owners[i] for i in links],
            [graph.homes[i] for i in links], [link_events[i][1] for i in links],
            [link_events[i][0] for i in links])
    if merges:
        await conn.execute(
            _MERGES, [m.merge_id for m in merges], [m.survivor for m in merges],
            [m.merged for m in merges], [m.reason for m in merges],
            [m.cause_event_id for m in merges], [m.occurred_at for m in merges])
    if graph.new_sightings:
        s = graph.new_sightings
        await conn.execute(_SIGHTINGS, [i[0] for i, _, _ in s], [i[1] for i, _, _ in s],
                           [a for _, a, _ in s], [at for _, _, at in s])
    if graph.new_quarantine:
        q = sorted(graph.new_quarantine.items())
        await conn.execute(_QUARANTINE, [i[0] for i, _ in q], [i[1] for i, _ in q],
                           [r for _, (r, _) in q], [at for _, (_, at) in q])


# -- stores ---------------------------------------------------------------------------------
async def store_countries(conn: asyncpg.Connection, store_ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.fetch("SELECT store_id, country FROM stores WHERE store_id = ANY($1::text[])",
                            list(store_ids))
    return {r["store_id"]: r["country"] for r in rows}


async def upsert_stores(conn: asyncpg.Connection, stores: Sequence[tuple[str, str, str | None]]) -> None:
    if not stores:
        return
    await conn.execute(
        "INSERT INTO stores (store_id, country, timezone) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
        "ON CONFLICT (store_id) DO UPDATE SET country = EXCLUDED.country, "
        "timezone = EXCLUDED.timezone, updated_at = now()",
        [s[0] for s in stores], [s[1] for s in stores], [s[2] for s in stores])


# -- reads for the API ------------------------------------------------------------------------
async def owner_of(conn: asyncpg.Connection, ident: Ident) -> str | None:
    return await conn.fetchval(
        "SELECT customer_id FROM identifiers WHERE id_type = $1 AND value = $2", *ident)


async def root_of(conn: asyncpg.Connection, customer_id: str) -> str | None:
    """The surviving customer of `customer_id` (itself unless merged away); None if unknown."""
    return await conn.fetchval(
        """
        WITH RECURSIVE chain(id, parent, depth) AS (
            SELECT customer_id, merged_into, 0 FROM customers WHERE customer_id = $1
            UNION ALL
            SELECT c.customer_id, c.merged_into, chain.depth + 1 FROM customers c
            JOIN chain ON c.customer_id = chain.parent WHERE chain.depth < 1000)
        SELECT id FROM chain WHERE parent IS NULL LIMIT 1
        """, customer_id)


async def customer_with_identifiers(conn: asyncpg.Connection, customer_id: str,
                                    lock: bool = False) -> Customer | None:
    row = await conn.fetchrow(
        "SELECT * FROM customers WHERE customer_id = $1" + (" FOR UPDATE" if lock else ""),
        customer_id)
    if row is None:
        return None
    idents = await conn.fetch(
        "SELECT id_type, value FROM identifiers WHERE customer_id = $1", customer_id)
    return customer_from_row(row, {(r["id_type"], r["value"]) for r in idents})


# -- unmerge ----------------------------------------------------------------------------------
async def load_tree(conn: asyncpg.Connection, root_id: str) -> tuple[dict[str, Customer], dict[Ident, str]]:
    """Every node of the root's subtree (locked, id order) and the homes of the root's identifiers."""
    rows = await conn.fetch(
        "SELECT * FROM customers WHERE customer_id IN "
        "(SELECT jsonb_array_elements_text(members) FROM customers WHERE customer_id = $1) "
        "ORDER BY customer_id FOR UPDATE", root_id)
    idents = await conn.fetch(
        "SELECT id_type, value, home_customer_id FROM identifiers WHERE customer_id = $1", root_id)
    homes = {(r["id_type"], r["value"]): r["home_customer_id"] for r in idents}
    tree = {r["customer_id"]: customer_from_row(r, set()) for r in rows}
    tree[root_id].identifiers = set(homes)
    return tree, homes


async def merge_edge(conn: asyncpg.Connection, survivor: str, merged: str) -> Any:
    return await conn.fetchrow(
        "SELECT * FROM merges WHERE survivor = $1 AND merged = $2 AND unmerged_at IS NULL "
        "ORDER BY occurred_at DESC LIMIT 1", survivor, merged)


async def save_split(conn: asyncpg.Connection, customers: Iterable[Customer], merged_id: str,
                     moved: Sequence[Ident], merge_id: str, at: dt.datetime) -> None:
    await save_customers(conn, customers)
    if moved:
        await conn.execute(
            "UPDATE identifiers SET customer_id = $1 FROM unnest($2::text[], $3::text[]) AS u(t, v) "
            "WHERE identifiers.id_type = u.t AND identifiers.value = u.v",
            merged_id, [t for t, _ in moved], [v for _, v in moved])
    await conn.execute("UPDATE merges SET unmerged_at = $2 WHERE merge_id = $1", merge_id, at)


async def prune_sightings(conn: asyncpg.Connection, before: dt.datetime) -> int:
    result = await conn.execute("DELETE FROM sightings WHERE seen_at < $1", before)
    return int(result.split()[-1])
