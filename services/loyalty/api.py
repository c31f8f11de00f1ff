"""HTTP reads of the ledger (CONTRACTS §3): a member's balance and tier, and their ledger pages."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel

from services.loyalty import store
from services.loyalty.rules import LoyaltyRules, format_money, next_tier, tier_for
from shared.clock import Clock
from shared.http import ApiError, require

MAX_EXPIRING_ROWS = 24


class ExpiringPoints(BaseModel):
    points: int
    expires_at: dt.datetime


class Benefits(BaseModel):
    discount_percent: int
    personal_shopper: bool


class LoyaltySummary(BaseModel):
    customer_id: str
    points_balance: int
    tier: str
    trailing_spend: str
    currency: str
    next_tier: str | None
    spend_to_next_tier: str | None
    points_expiring: list[ExpiringPoints]
    benefits: Benefits
    erased: bool


class LedgerEntry(BaseModel):
    entry_id: str
    kind: str
    points: int
    balance_after: int
    order_id: str | None
    occurred_at: dt.datetime
    expires_at: dt.datetime | None = None
    details: dict[str, Any] | None = None


class LedgerPage(BaseModel):
    customer_id: str
    entries: list[LedgerEntry]
    next_cursor: str | None


class Erasure(BaseModel):
    service: str
    customer_id: str
    erased_at: str
    what: list[str]


class RejectedRedemption(BaseModel):
    event_id: str
    order_id: str | None
    requested: int
    balance: int
    reason: str
    occurred_at: dt.datetime


def router(pool: Callable[[], asyncpg.Pool], rules: LoyaltyRules, clock: Clock) -> APIRouter:
    """The loyalty read routes over the service's pool (looked up per request: opened at start)."""
    r = APIRouter(tags=["loyalty"])

    @r.get("/v1/customers/{customer_id}/loyalty", response_model=LoyaltySummary,
           responses={404: {"description": "no loyalty account for this customer"}})
    async def loyalty(customer_id: str, _key=require("read")) -> LoyaltySummary:
        """Balance, tier and what is about to expire; a merged-away id answers its survivor."""
        now = clock.now()
        async with pool().acquire() as conn:
            cid = await _resolve(conn, customer_id)
            row = await conn.fetchrow(
                "SELECT balance, erased_at IS NOT NULL AS erased FROM accounts WHERE customer_id = $1", cid)
            if row is None:
                raise ApiError(404, "not_found", "no loyalty account for this customer")
            lots = await conn.fetch(
                "SELECT expires_at, sum(remaining) AS points FROM orders "
                "WHERE owner = $1 AND remaining > 0 GROUP BY expires_at ORDER BY expires_at", cid)
            spend = await conn.fetchval(
                "SELECT coalesce(sum(spend), 0) FROM orders WHERE owner = $1 AND sale_at > $2",
                cid, now - rules.window)
        # Points past expiry the timer has not reached yet are not spendable: do not show them.
        due = sum(x["points"] for x in lots if x["expires_at"] <= now)
        tier = tier_for(rules, spend)
        upcoming = next_tier(rules, spend)
        base = rules.base_currency
        return LoyaltySummary(
            customer_id=cid, points_balance=max(0, row["balance"] - due), tier=tier.name,
            trailing_spend=format_money(spend, base), currency=base,
            next_tier=upcoming.name if upcoming else None,
            spend_to_next_tier=format_money(upcoming.min_spend - spend, base) if upcoming else None,
            points_expiring=[ExpiringPoints(points=x["points"], expires_at=x["expires_at"])
                             for x in lots if x["expires_at"] > now][:MAX_EXPIRING_ROWS],
            benefits=Benefits(discount_percent=tier.discount_percent,
                              personal_shopper=tier.personal_shopper),
            erased=row["erased"])

    @r.get("/v1/customers/{customer_id}/loyalty/ledger", response_model=LedgerPage,
           responses={400: {"description": "invalid cursor"}, 404: {"description": "no account"}})
    async def ledger(customer_id: str, limit: int = Query(50, ge=1, le=500),
                     cursor: str | None = Query(None, description="next_cursor of the previous page"),
                     _key=require("read")) -> LedgerPage:
        """Ledger entries, newest first; pages continue from an opaque cursor, not an offset."""
        after = _decode_cursor(cursor) if cursor else None
        async with pool().acquire() as conn:
            cid = await _resolve(conn, customer_id)
            if not await conn.fetchval("SELECT true FROM accounts WHERE customer_id = $1", cid):
                raise ApiError(404, "not_found", "no loyalty account for this customer")
            sql = ("SELECT seq, entry_id, kind, points, balance_after, order_id, occurred_at, "
                   "expires_at, detail::text AS detail FROM ledger WHERE customer_id = $1 {where} "
                   "ORDER BY occurred_at DESC, seq DESC LIMIT $2")
            if after is None:
                rows = await conn.fetch(sql.format(where=""), cid, limit + 1)
            else:
                rows = await conn.fetch(sql.format(where="AND (occurred_at, seq) < ($3, $4)"),
                                        cid, limit + 1, after[0], after[1])
        more = len(rows) > limit
        rows = rows[:limit]
        entries = [LedgerEntry(entry_id=str(x["entry_id"]), kind=x["kind"], points=x["points"],
                               balance_after=x["balance_after"], order_id=x["order_id"],
                               occurred_at=x["occurred_at"], expires_at=x["expires_at"],
                               details=orjson.loads(x["detail"]) if x["detail"] else None)
                   for x in rows]
        next_cursor = _encode_cursor(rows[-1]["occurred_at"], rows[-1]["seq"]) if more else None
        return LedgerPage(customer_id=cid, entries=entries, next_cursor=next_cursor)

    @r.get("/v1/customers/{customer_id}/loyalty/rejected-redemptions",
           response_model=list[RejectedRedemption])
    async def rejected(customer_id: str, _key=require("read")) -> list[RejectedRedemption]:
        """Redemptions the ledger refused, with the reason (for store staff answering a member)."""
        async with pool().acquire() as conn:
            cid = await _resolve(conn, customer_id)
            rows = await conn.fetch(
                "SELECT event_id, order_id, requested, balance, reason, occurred_at "
                "FROM redemption_rejections WHERE customer_id = $1 ORDER BY occurred_at DESC LIMIT 100", cid)
        return [RejectedRedemption(**dict(x)) for x in rows]

    @r.get("/v1/erasures/{customer_id}", response_model=Erasure, tags=["privacy"],
           responses={404: {"description": "no erasure recorded for this customer"}})
    async def erasure(customer_id: str, _key=require("admin")) -> Erasure:
        """When loyalty applied the customer's erasure and what kinds of data it dropped."""
        async with pool().acquire() as conn:
            row = await store.erasure_of(conn, customer_id)
        if row is None:
            raise ApiError(404, "not_found", "no erasure recorded for this customer")
        return Erasure(service="loyalty", customer_id=row["customer_id"],
                       erased_at=row["erased_at"].isoformat(), what=list(row["what"]))

    return r


async def _resolve(conn: asyncpg.Connection, customer_id: str) -> str:
    aliases = await store.load_aliases(conn, [customer_id])
    current = customer_id
    for _ in range(32):
        if current not in aliases:
            break
        current = aliases[current]
    return current


def _encode_cursor(occurred_at: dt.datetime, seq: int) -> str:
    raw = orjson.dumps([occurred_at.isoformat(), seq])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, seq = orjson.loads(raw)
        when = dt.datetime.fromisoformat(at)
        if when.tzinfo is None or not isinstance(seq, int):
            raise ValueError("cursor shape")
        return when, seq
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
