"""Ingestion's SQL: the de-duplication table and what Shopify refunds need from their orders.

Set-based: one round trip per batch, in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from services.ingestion.shopify import OrderCustomer

# Sorted so concurrent batches sharing ids take the unique-index locks in one order (no deadlock).
_CLAIM = """
INSERT INTO seen_events (event_id)
SELECT DISTINCT id FROM unnest($1::text[]) AS u(id) ORDER BY id
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""


async def claim_event_ids(conn: asyncpg.Connection, event_ids: Sequence[str]) -> set[str]:
    """Mark ids as seen; returns those that were new (the rest are duplicates)."""
    if not event_ids:
        return set()
    rows = await conn.fetch(_CLAIM, list(event_ids))
    return {r["event_id"] for r in rows}


async def seen(conn: asyncpg.Connection, event_ids: Sequence[str]) -> set[str]:
    """Which of the ids were accepted before (read-only; tests and tooling)."""
    rows = await conn.fetch("SELECT event_id FROM seen_events WHERE event_id = ANY($1::text[])",
                            list(event_ids))
    return {r["event_id"] for r in rows}


async def claim_webhook(conn: asyncpg.Connection, webhook_id: str, topic: str | None) -> bool:
    """Record a Shopify webhook delivery; False when it was processed before."""
    return await conn.fetchval(
        "INSERT INTO shopify_webhooks (webhook_id, topic) VALUES ($1, $2) "
        "ON CONFLICT (webhook_id) DO NOTHING RETURNING true", webhook_id, topic) is not None


async def remember_order(conn: asyncpg.Connection, order_id: str, customer: OrderCustomer) -> None:
    """Keep the order's identifier for its refunds (first writer wins)."""
    (kind, value), = customer.identifiers.items()
    await conn.execute(
        "INSERT INTO shopify_orders (order_id, identifier_kind, identifier, currency) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING",
        order_id, kind, value, customer.currency)


async def order_customer(conn: asyncpg.Connection, order_id: str) -> OrderCustomer | None:
    row = await conn.fetchrow(
        "SELECT identifier_kind, identifier, currency FROM shopify_orders WHERE order_id = $1",
        order_id)
    if row is None:
        return None
    return OrderCustomer({row["identifier_kind"]: row["identifier"]}, row["currency"])
