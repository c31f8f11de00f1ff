"""Rows read by the loyalty store become the same domain objects as their named fields say."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from services.loyalty import store
from services.loyalty.ledger import Account

AT = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


class _Conn:
    def __init__(self, rows):
        self.rows = rows
        self.statements: list[str] = []

    async def fetch(self, query, *args):
        self.statements.append(query)
        return self.rows

    async def fetchval(self, query, *args):
        self.statements.append(query)


def test_locked_accounts_are_built_field_by_field():
    rows = [("ann", 120, "gold", 5000_00, AT, AT + dt.timedelta(days=1), "bob", True,
             AT + dt.timedelta(days=2))]
    conn = _Conn(rows)
    accounts, new = asyncio.run(store.lock_accounts(conn, ["cy", "ann"], "member"))
    # Locked first, read by a later statement (whose snapshot sees what lock holders committed).
    assert conn.statements == [store._LOCK_MEMBERS, store._READ_ACCOUNTS]
    assert list(accounts) == ["ann", "cy"]
    assert new == {"cy"}
    assert accounts["cy"] == Account("cy", tier="member")
    assert accounts["ann"] == Account(
        "ann", balance=120, tier="gold", trailing_spend=5000_00, evaluated_at=AT,
        review_at=AT + dt.timedelta(days=1), merged_into="bob", erased=True, spend_exact=False,
        lots_loaded=False, next_expiry_at=AT + dt.timedelta(days=2))


def test_an_account_update_that_misses_a_row_fails_the_transaction():
    """Accounts read under their lock are written with a plain UPDATE: one that finds fewer rows
    than it was given must not pass silently (the balance would be lost)."""
    class Conn:
        async def execute(self, query, *args):
            return "UPDATE 1"

    async def run(expect):
        flight = store._InFlight(Conn())
        await flight.send(store._UPDATE_ACCOUNTS, "[]", expect=expect)
        await flight.wait()

    asyncio.run(run("UPDATE 1"))
    with pytest.raises(RuntimeError, match="UPDATE 2"):
        asyncio.run(run("UPDATE 2"))
