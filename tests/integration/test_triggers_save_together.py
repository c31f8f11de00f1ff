"""save_facts writes every part of a save (facts rows, touches, child rows gone and put in all three
tables) in one statement: each part lands, and nothing else is written."""

from __future__ import annotations

import datetime as dt

import pytest

from services.triggers import store
from services.triggers.facts import Cart, CategoryHistory, CustomerFacts, PointLot
from shared.db import setup_database
from tests.integration.test_triggers_handler import CFG, MIGRATIONS, row_versions

pytestmark = pytest.mark.asyncio
T0 = dt.datetime(2026, 6, 1, 14, tzinfo=dt.UTC)


def _customer(cid: str) -> CustomerFacts:
    f = CustomerFacts(cid, stored=store.ABSENT, orders_count=1, last_purchase_at=T0, tags=["a"])
    f.carts["k1"] = Cart("k1", T0, 1, 100)
    f.carts["k2"] = Cart("k2", T0, 2, 200)
    f.categories["tea"] = CategoryHistory("tea", [T0], 1)
    f.categories["coffee"] = CategoryHistory("coffee", [T0 - dt.timedelta(days=9), T0], 2)
    f.lots += [PointLot("l1", 10, T0 + dt.timedelta(days=9)), PointLot("l2", 20, T0 + dt.timedelta(days=99))]
    return f


class _Counting:
    """A connection that counts the statements sent through it."""

    def __init__(self, conn) -> None:
        self.conn, self.statements = conn, 0

    async def execute(self, *args):
        self.statements += 1
        return await self.conn.execute(*args)


async def test_every_part_of_a_save_lands_in_one_statement(database, unique):
    pool = await setup_database(database, f"trgsave_{unique}", MIGRATIONS)
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await store.save_facts(conn, [_customer("ann"), _customer("bob")], CFG)
            before = {c: await row_versions(conn, c) for c in ("ann", "bob")}
            async with conn.transaction():
                loaded = await store.load_facts(conn, ["ann", "bob"])
                ann, bob = loaded["ann"], loaded["bob"]
                ann.tags = ["b"]  # ann's row changes, bob's does not: one upsert, one touch
                for f in (ann, bob):  # and in every child table a row goes, one changes, one comes
                    del f.carts["k1"]
                    f.carts["k2"].items = 5
                    f.carts["k3"] = Cart("k3", T0, 1, 50)
                    del f.categories["tea"]
                    f.categories["coffee"].purchases.append(T0 + dt.timedelta(days=1))
                    f.categories["milk"] = CategoryHistory("milk", [T0], 1)
                    f.lots[0].points = 5
                    f.lots.pop()
                    f.lots.append(PointLot("l3", 30, T0 + dt.timedelta(days=300)))
                plan = store.plan_save([ann, bob], CFG)
                assert len(plan.rows) == 1 and plan.touch == ["bob"]
                assert all(len(plan.put[t]) == 4 and len(plan.gone[t]) == 2 for t in store._CHILD_TABLES)
                counting = _Counting(conn)
                await store.save_facts(counting, [ann, bob], CFG)
                assert counting.statements == 1  # one round trip, not eight
            async with conn.transaction():
                back = await store.load_facts(conn, ["ann", "bob"])
                assert not store.plan_save(list(back.values()), CFG).rows  # read back as saved
                for cid, f in (("ann", ann), ("bob", bob)):
                    b = back[cid]
                    assert b.tags == f.tags and sorted(b.carts) == ["k2", "k3"] and b.carts["k2"].items == 5
                    assert sorted(b.categories) == ["coffee", "milk"]
                    assert b.categories["coffee"].purchases == f.categories["coffee"].purchases
                    assert [(lot.lot_id, lot.points) for lot in b.lots] == [("l1", 5), ("l3", 30)]
                    assert store.plan_save([b], CFG).put == {t: [] for t in store._CHILD_TABLES}
            for cid in ("ann", "bob"):
                after = await row_versions(conn, cid)
                assert after["facts"] != before[cid]["facts"]  # bob's too: the SQL scan sees the change
                assert "carts:k1" not in after and "category_facts:tea" not in after and "point_lots:l2" not in after
                assert all(after[k] != before[cid][k] for k in ("carts:k2", "category_facts:coffee", "point_lots:l1"))
    finally:
        await pool.close()
