"""The identity graph's SQL: set-based, a fixed handful of round trips per batch whatever its size."""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from services.identity.normalise import Ident
from services.identity.resolution import Customer, Graph, MergeEdge
from services.identity.sealing import CONTACT_TYPES, Sealer
from shared.crypto import Vault

# Nearly always every id is new: then the answer is NULL instead of the ids back, one row per event
# (decoding them cost ~0.35 us of client and server CPU an event, for what the caller knows).
_CLAIM = """
WITH claimed AS (
    INSERT INTO processed_events (event_id)
    SELECT DISTINCT e FROM unnest($1::text[]) AS u(e) ORDER BY 1
    ON CONFLICT DO NOTHING RETURNING event_id)
SELECT CASE WHEN count(*) < $2 THEN coalesce(array_agg(event_id), '{}') END FROM claimed
"""

TOKEN_LEN = 32  # a blind-index token: an HMAC-SHA256 digest


def _keys(types: str, tokens: str) -> str:
    """Identifier keys as rows (t, k) from two scalars instead of two arrays: the types joined by
    commas (IDENTIFIER_TYPES names, which have none) and the tokens concatenated (`key_params`).
    asyncpg encodes an array element by element, with two isinstance checks against
    collections.abc each: ~0.3 us of client CPU an element (two per identifier, for the probe of
    every event and again for the lock of the changing ones), against next to nothing for one
    value; the server splits them a little faster than it reads arrays."""
    return (f"unnest(string_to_array({types}::text, ','), "
            f"ARRAY(SELECT substring({tokens}::bytea FROM g * {TOKEN_LEN} + 1 FOR {TOKEN_LEN}) "
            f"FROM generate_series(0, length({tokens}::bytea) / {TOKEN_LEN} - 1) AS g ORDER BY g))")


def key_params(idents: Sequence[Ident], tokens: Sequence[bytes]) -> tuple[str, bytes]:
    """The two parameters `_keys` reads for these identifiers and their tokens."""
    types = ",".join([t for t, _ in idents])
    blob = b"".join(tokens)
    if types.count(",") != max(len(idents) - 1, 0) or len(blob) != TOKEN_LEN * len(idents):
        raise ValueError("identifier keys that do not split back")  # types are a fixed set
    return types, blob


# Who owns each identifier of the batch (and since when: a customer is never younger than the links
# it holds, so an event after `linked_at` cannot move its created_at), and which are quarantined: no lock and no
# profile columns; most events only match a customer they do not change.
_PROBE = f"""
SELECT i.customer_id, i.linked_at, q.reason, u.n
FROM {_keys('$1', '$2')} WITH ORDINALITY AS u(t, k, n)
LEFT JOIN LATERAL (SELECT customer_id, linked_at FROM identifiers
                   WHERE id_type = u.t AND token = u.k LIMIT 1) AS i ON true
LEFT JOIN LATERAL (SELECT reason FROM quarantined_identifiers
                   WHERE id_type = u.t AND token = u.k LIMIT 1) AS q ON true
WHERE i.customer_id IS NOT NULL OR q.reason IS NOT NULL
"""

# Customers owning any identifier of the batch, locked in id order (a fixed order: no deadlocks).
_LOCK = f"""
SELECT c.* FROM customers c
WHERE c.customer_id IN (
    SELECT i.customer_id FROM {_keys('$1', '$2')} AS q(t, k)
    -- LATERAL + LIMIT keeps this an index probe per identifier (a hash join would scan them all)
    CROSS JOIN LATERAL (SELECT customer_id FROM identifiers
                        WHERE id_type = q.t AND token = q.k LIMIT 1) AS i)
ORDER BY c.customer_id
FOR UPDATE OF c
"""

# After the lock (a fresh snapshot): every identifier of the locked customers, the quarantine
# entries and the recent sightings of the batch's identifiers.
_DETAILS = f"""
SELECT 'i' AS k, id_type, token, value, sealed, customer_id AS ref, NULL::timestamptz AS at
  FROM identifiers WHERE customer_id = ANY($1::text[])
UNION ALL
SELECT 'q', q.id_type, q.token, NULL, NULL, q.reason, q.since
  FROM {_keys('$2', '$3')} AS u(t, k)
  CROSS JOIN LATERAL (SELECT * FROM quarantined_identifiers
                      WHERE id_type = u.t AND token = u.k LIMIT 1) AS q
UNION ALL
SELECT 's', s.id_type, s.token, NULL, NULL, s.anchor, s.seen_at
  FROM {_keys('$2', '$3')} AS u(t, k)
  CROSS JOIN LATERAL (SELECT * FROM sightings
                      WHERE id_type = u.t AND token = u.k AND seen_at >= $4 LIMIT 100) AS s
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
INSERT INTO identifiers (id_type, token, value, sealed, customer_id, home_customer_id, linked_at,
                         event_id)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::bytea[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::text[])
ORDER BY 1, 2
"""

_MERGES = """
INSERT INTO merges (merge_id, survivor, merged, reason, cause_event_id, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
ON CONFLICT (merge_id) DO NOTHING
"""

_SIGHTINGS = """
INSERT INTO sightings (id_type, token, anchor, seen_at)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::timestamptz[])
ON CONFLICT DO NOTHING
"""

_QUARANTINE = """
INSERT INTO quarantined_identifiers (id_type, token, reason, since)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::timestamptz[])
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
    ids = set(event_ids)
    fresh = await conn.fetchval(_CLAIM, list(event_ids), len(ids))
    return ids if fresh is None else set(fresh)


# A probe answer (an asyncpg Record, read by position: this runs for every identifier of a batch).
OWNER, LINKED_AT, QUARANTINED = 0, 1, 2   # owner: customer id or None; the owner's created_at is
                                          # at most linked_at; quarantined: reason or None


async def probe(conn: asyncpg.Connection, idents: Sequence[Ident],
                sealer: Sealer) -> dict[Ident, Any]:
    """Owner and quarantine state of identifiers, read without locks (absent = unknown)."""
    rows = await conn.fetch(_PROBE, *key_params(idents, sealer.tokens(list(idents))))
    return {idents[r[3] - 1]: r for r in rows}


async def load_graph(conn: asyncpg.Connection, graph: Graph, idents: Iterable[Ident],
                     since: dt.datetime, sealer: Sealer) -> list[str]:
    """Lock the customers owning `idents` and load them into `graph`; returns ids that were
    merged away meanwhile (the caller retries: another worker moved their identifiers)."""
    idents = sorted(set(idents))
    tokens = [sealer.token(i) for i in idents]
    known = dict(zip(tokens, idents, strict=True))  # the batch's own identifiers need no opening
    keys = key_params(idents, tokens)
    locked = await conn.fetch(_LOCK, *keys)
    stale = [r["customer_id"] for r in locked if r["merged_into"] is not None or r["erased"]]
    ids = [r["customer_id"] for r in locked]
    owned: dict[str, set[Ident]] = {cid: set() for cid in ids}
    for r in await conn.fetch(_DETAILS, ids, *keys, since):
        token = bytes(r["token"])
        if r["k"] == "i":
            ident = known.get(token)
            if ident is None or ident[0] != r["id_type"]:
                ident = (r["id_type"], sealer.open(r["id_type"], token, r["value"], r["sealed"]))
            owned[r["ref"]].add(ident)
        elif r["k"] == "q":
            graph.quarantined[known[token]] = r["ref"]
        else:
            graph.sightings.setdefault(known[token], []).append((r["ref"], r["at"]))
    for r in locked:
        graph.add(customer_from_row(r, owned[r["customer_id"]], sealer))
    return stale


def customer_from_row(r: Any, identifiers: set[Ident], sealer: Sealer) -> Customer:
    return Customer(
        customer_id=r["customer_id"], created_at=r["created_at"], updated_at=r["updated_at"],
        identifiers=identifiers, own=r["own"] or {}, golden=r["golden"] or {},
        members=list(r["members"] or []), blocked=set(r["blocked"] or []),
        quarantined=[sealer.open_note(n) for n in r["quarantined"] or []],
        merged_into=r["merged_into"], erased=r["erased"], version=r["version"],
        created_by=r["created_by"])


def _row(c: Customer, sealer: Sealer) -> dict[str, Any]:
    return {"customer_id": c.customer_id, "created_at": c.created_at.isoformat(),
            "updated_at": c.updated_at.isoformat(), "merged_into": c.merged_into,
            "erased": c.erased, "version": c.version, "own": c.own, "golden": c.golden,
            "members": sorted(c.members), "blocked": sorted(c.blocked),
            "quarantined": [sealer.seal_note(n) for n in c.quarantined],
            "created_by": c.created_by}


async def save_customers(conn: asyncpg.Connection, customers: Iterable[Customer],
                         sealer: Sealer) -> None:
    rows = [_row(c, sealer) for c in customers]
    if rows:
        await conn.execute(_UPSERT_CUSTOMERS, rows)  # the pool's jsonb codec encodes it


_RECORD_ERASURES = """
INSERT INTO erasures (customer_id, erased_at, what)
SELECT m, now(), ARRAY['identifiers', 'profile_fields', 'quarantine_notes']
FROM customers c, jsonb_array_elements_text(c.members) AS m
WHERE c.customer_id = ANY($1::text[])
UNION
SELECT id, now(), ARRAY['identifiers', 'profile_fields', 'quarantine_notes'] FROM unnest($1::text[]) AS id
ON CONFLICT (customer_id) DO NOTHING
"""


async def erasure_of(conn: asyncpg.Connection, customer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT customer_id, erased_at, what FROM erasures WHERE customer_id = $1",
                               customer_id)


async def save_graph(conn: asyncpg.Connection, graph: Graph, merges: Sequence[MergeEdge],
                     link_events: dict[Ident, tuple[str, dt.datetime]], sealer: Sealer) -> None:
    """Write what a batch changed: customers, re-pointed / erased / new links, merges, guard state.

    The writes go in this order; without erasures (nearly every batch) they go as one statement
    (one round trip instead of up to six, which is most of a small batch's cost): each write is a
    data-modifying CTE on its own table, or, for the re-pointing UPDATE and the new-link INSERT on
    identifiers, on different rows (the UPDATE's snapshot does not see the inserted rows, as it did
    not when it ran first)."""
    steps: list[tuple[str, list[Any]]] = []
    rows = [_row(c, sealer) for c in graph.customers.values() if c.changed]
    if rows:
        steps.append((_UPSERT_CUSTOMERS, [rows]))  # the pool's jsonb codec encodes it
    if graph.merged_away:
        old = sorted(graph.merged_away)
        steps.append((_REPOINT, [old, [graph.merged_away[m] for m in old]]))
    if graph.erased or graph.removed:
        for sql, args in steps:
            await conn.execute(sql, *args)
        steps = []
    if graph.erased:
        erased = sorted(graph.erased)
        await conn.execute("DELETE FROM identifiers WHERE customer_id = ANY($1::text[])", erased)
        await conn.execute(_ERASE_MEMBERS, erased)
        await conn.execute(_RECORD_ERASURES, erased)
    if graph.removed:
        gone = sorted(graph.removed)
        await conn.execute(
            "DELETE FROM sightings s USING unnest($1::text[], $2::bytea[]) AS u(t, k) "
            "WHERE s.id_type = u.t AND s.token = u.k",
            [t for t, _ in gone], [sealer.token(i) for i in gone])
    links = sorted(i for i in graph.homes if i in graph.owners)
    if links:
        cols = [sealer.columns(i) for i in links]
        ordered = sorted(zip(links, cols, strict=True), key=lambda x: (x[0][0], x[1][0]))
        steps.append((_LINK, [
            [i[0] for i, _ in ordered], [c[0] for _, c in ordered], [c[1] for _, c in ordered],
            [c[2] for _, c in ordered], [graph.owners[i] for i, _ in ordered],
            [graph.homes[i] for i, _ in ordered], [link_events[i][1] for i, _ in ordered],
            [link_events[i][0] for i, _ in ordered]]))
    if merges:
        steps.append((_MERGES, [
            [m.merge_id for m in merges], [m.survivor for m in merges], [m.merged for m in merges],
            [m.reason for m in merges], [m.cause_event_id for m in merges],
            [m.occurred_at for m in merges]]))
    if graph.new_sightings:
        s = graph.new_sightings
        steps.append((_SIGHTINGS, [[i[0] for i, _, _ in s], [sealer.token(i) for i, _, _ in s],
                                   [a for _, a, _ in s], [at for _, _, at in s]]))
    if graph.new_quarantine:
        q = sorted(graph.new_quarantine.items())
        steps.append((_QUARANTINE, [[i[0] for i, _ in q], [sealer.token(i) for i, _ in q],
                                    [r for _, (r, _) in q], [at for _, (_, at) in q]]))
    if len(steps) == 1:
        await conn.execute(steps[0][0], *steps[0][1])
    elif steps:
        await conn.execute(_together(tuple(sql for sql, _ in steps)),
                           *(arg for _, args in steps for arg in args))


_PARAM = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=64)
def _together(statements: tuple[str, ...]) -> str:
    """Several writes as one statement: each a data-modifying CTE (PostgreSQL runs every one,
    referenced or not), their parameters numbered on from the previous one's."""
    parts = []
    offset = 0
    for n, sql in enumerate(statements):
        used = [int(m) for m in _PARAM.findall(sql)]
        parts.append(f"w{n} AS ({_PARAM.sub(lambda m, o=offset: f'${int(m.group(1)) + o}', sql.strip())})")
        offset += max(used)
    return "WITH " + ",\n".join(parts) + "\nSELECT 1"


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
async def owner_of(conn: asyncpg.Connection, ident: Ident, sealer: Sealer) -> str | None:
    return await conn.fetchval(
        "SELECT customer_id FROM identifiers WHERE id_type = $1 AND token = $2",
        ident[0], sealer.token(ident))


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


async def customer_with_identifiers(conn: asyncpg.Connection, customer_id: str, sealer: Sealer,
                                    lock: bool = False) -> Customer | None:
    row = await conn.fetchrow(
        "SELECT * FROM customers WHERE customer_id = $1" + (" FOR UPDATE" if lock else ""),
        customer_id)
    if row is None:
        return None
    idents = await conn.fetch(
        "SELECT id_type, token, value, sealed FROM identifiers WHERE customer_id = $1", customer_id)
    return customer_from_row(row, {_opened(sealer, r) for r in idents}, sealer)


def _opened(sealer: Sealer, r: Any) -> Ident:
    return (r["id_type"], sealer.open(r["id_type"], bytes(r["token"]), r["value"], r["sealed"]))


# -- unmerge ----------------------------------------------------------------------------------
async def load_tree(conn: asyncpg.Connection, root_id: str,
                    sealer: Sealer) -> tuple[dict[str, Customer], dict[Ident, str]]:
    """Every node of the root's subtree (locked, id order) and the homes of the root's identifiers."""
    rows = await conn.fetch(
        "SELECT * FROM customers WHERE customer_id IN "
        "(SELECT jsonb_array_elements_text(members) FROM customers WHERE customer_id = $1) "
        "ORDER BY customer_id FOR UPDATE", root_id)
    idents = await conn.fetch(
        "SELECT id_type, token, value, sealed, home_customer_id FROM identifiers "
        "WHERE customer_id = $1", root_id)
    homes = {_opened(sealer, r): r["home_customer_id"] for r in idents}
    tree = {r["customer_id"]: customer_from_row(r, set(), sealer) for r in rows}
    tree[root_id].identifiers = set(homes)
    return tree, homes


async def merge_edge(conn: asyncpg.Connection, survivor: str, merged: str) -> Any:
    return await conn.fetchrow(
        "SELECT * FROM merges WHERE survivor = $1 AND merged = $2 AND unmerged_at IS NULL "
        "ORDER BY occurred_at DESC LIMIT 1", survivor, merged)


async def save_split(conn: asyncpg.Connection, customers: Iterable[Customer], merged_id: str,
                     moved: Sequence[Ident], merge_id: str, at: dt.datetime, sealer: Sealer) -> None:
    await save_customers(conn, customers, sealer)
    if moved:
        await conn.execute(
            "UPDATE identifiers SET customer_id = $1 FROM unnest($2::text[], $3::bytea[]) AS u(t, k) "
            "WHERE identifiers.id_type = u.t AND identifiers.token = u.k",
            merged_id, [t for t, _ in moved], [sealer.token(i) for i in moved])
    await conn.execute("UPDATE merges SET unmerged_at = $2 WHERE merge_id = $1", merge_id, at)


async def prune_sightings(conn: asyncpg.Connection, before: dt.datetime) -> int:
    result = await conn.execute("DELETE FROM sightings WHERE seen_at < $1", before)
    return int(result.split()[-1])


# -- keys: legacy clear rows and rotation ------------------------------------------------------
_LEGACY_TABLES = ("identifiers_v1", "quarantined_identifiers_v1", "sightings_v1")
_STALE_NOTES = """
SELECT customer_id, quarantined FROM customers
WHERE EXISTS (SELECT 1 FROM jsonb_array_elements(quarantined) AS n
              WHERE n->>'type' = ANY($1::text[]) AND (n->>'kid') IS DISTINCT FROM $2)
ORDER BY customer_id LIMIT $3
"""
_SET_NOTES = """
UPDATE customers c SET quarantined = r.new
FROM jsonb_to_recordset($1::jsonb) AS r(customer_id text, old jsonb, new jsonb)
WHERE c.customer_id = r.customer_id AND c.quarantined = r.old
"""


async def convert_legacy(conn: asyncpg.Connection, sealer: Sealer, batch: int = 5000) -> int | None:
    """Move rows a database kept in clear before 002 (the *_v1 tables) into the sealed tables.
    Returns None when there is nothing left to convert (the caller stops asking), else the count."""
    present = await conn.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) AS t(n) WHERE to_regclass(t.n) IS NOT NULL",
        list(_LEGACY_TABLES))
    if not present:
        return None
    converted = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('omnicrm-identity-convert-legacy'))")
        if await conn.fetchval("SELECT to_regclass('identifiers_v1') IS NULL"):
            return 0  # another worker converted them while we waited
        while rows := await conn.fetch(
                "DELETE FROM identifiers_v1 WHERE ctid IN (SELECT ctid FROM identifiers_v1 LIMIT $1) "
                "RETURNING *", batch):
            cols = [sealer.columns((r["id_type"], r["value"])) for r in rows]
            await conn.execute(
                _LINK.rstrip() + " ON CONFLICT DO NOTHING", [r["id_type"] for r in rows],
                [c[0] for c in cols], [c[1] for c in cols], [c[2] for c in cols],
                [r["customer_id"] for r in rows], [r["home_customer_id"] for r in rows],
                [r["linked_at"] for r in rows], [r["event_id"] for r in rows])
            converted += len(rows)
        for table, insert, extra in (("quarantined_identifiers_v1", _QUARANTINE, ("reason", "since")),
                                     ("sightings_v1", _SIGHTINGS, ("anchor", "seen_at"))):
            rows = await conn.fetch(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
            if rows:
                await conn.execute(insert, [r["id_type"] for r in rows],
                                   [sealer.token((r["id_type"], r["value"])) for r in rows],
                                   [r[extra[0]] for r in rows], [r[extra[1]] for r in rows])
            converted += len(rows)
        await conn.execute("DROP TABLE identifiers_v1, quarantined_identifiers_v1, sightings_v1")
        converted += await _reseal_notes(conn, sealer, batch)
    return converted


async def _reseal_notes(conn: asyncpg.Connection, sealer: Sealer, batch: int) -> int:
    done = 0
    while rows := await conn.fetch(_STALE_NOTES, sorted(CONTACT_TYPES), sealer.active_key_id, batch):
        updates = [{"customer_id": r["customer_id"], "old": r["quarantined"],
                    "new": [n if sealer.note_is_current(n) else sealer.seal_note(sealer.open_note(n))
                            for n in r["quarantined"]]} for r in rows]
        await conn.execute(_SET_NOTES, updates)
        done += len(rows)
    return done


async def rekey(conn: asyncpg.Connection, vault: Vault, batch: int = 5000) -> dict[str, int]:
    """Re-seal every contact value not under the vault's active key (rotation: put the new key
    first, restart, run this, then drop the old key). Batched; safe while workers run (each
    update only replaces the blob it read). Also converts rows kept in clear before 002.
    A value sealed under a key the vault no longer has raises DecryptionError: keep the old key
    until this has run."""
    sealer = Sealer(vault)
    legacy = await convert_legacy(conn, sealer, batch) or 0
    kid = vault.active_key_id.encode()
    identifiers = 0
    while rows := await conn.fetch(
            "SELECT id_type, token, sealed FROM identifiers WHERE sealed IS NOT NULL "
            "AND substring(sealed FROM 3 FOR get_byte(sealed, 1)) <> $1 LIMIT $2", kid, batch):
        await conn.execute(
            "UPDATE identifiers i SET sealed = u.new "
            "FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[]) AS u(t, k, old, new) "
            "WHERE i.id_type = u.t AND i.token = u.k AND i.sealed = u.old",
            [r["id_type"] for r in rows], [r["token"] for r in rows], [r["sealed"] for r in rows],
            [sealer.reseal(r["id_type"], bytes(r["token"]), bytes(r["sealed"])) for r in rows])
        identifiers += len(rows)
    notes = await _reseal_notes(conn, sealer, batch)
    return {"legacy_rows": legacy, "identifiers": identifiers, "customers_notes": notes}
