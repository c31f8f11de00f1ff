"""Rows read by the loyalty store become the same domain objects as their named fields say."""

from __future__ import annotations

import asyncio
import datetime as dt

from services.loyalty import store
from services.loyalty.ledger import Account

AT = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


class _Conn:
    def __init__(self, rows):
        self.rows = rows

    async def fetch(self, query, *args):
        return self.rows


def test_locked_accounts_are_built_field_by_field():
    rows = [("ann", 120, "gold", 5000_00, AT, AT + dt.timedelta(days=1), "bob", True,
             AT + dt.timedelta(days=2)),
            ("cy", None, None, None, None, None, None, None, None)]
    accounts, new = asyncio.run(store.lock_accounts(_Conn(rows), ["ann", "cy"], "member"))
    assert new == {"cy"}
    assert accounts["cy"] == Account("cy", tier="member")
    assert accounts["ann"] == Account(
        "ann", balance=120, tier="gold", trailing_spend=5000_00, evaluated_at=AT,
        review_at=AT + dt.timedelta(days=1), merged_into="bob", erased=True, spend_exact=False,
        lots_loaded=False, next_expiry_at=AT + dt.timedelta(days=2))
